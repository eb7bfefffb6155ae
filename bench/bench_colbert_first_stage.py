"""ColBERT first stage (centroid scores -> top candidates -> exact MaxSim) against the
exhaustive MaxSim, on a coded store of BGE-M3 shape.

    python bench/bench_colbert_first_stage.py --docs 100000 --queries 20
    python bench/bench_colbert_first_stage.py --docs 1000000 --queries 20 --exhaustive-queries 3

Data: the token structure of ``bench/suite/scale_m3.py``'s ``Corpus`` (1024-d; 4,096 pool
directions; a document has a topic and 50-150 tokens, two in three from its topic's 64
directions; a token is ``unit(pool[a] + 0.35 pool[b])``). Generating and coding 100M 1024-d
vectors would take hours on 2 cores, so tokens come from a coded *vocabulary*: every direction
``a`` gets ``--variants`` second directions ``b``, those 4,096 x variants tokens are coded once
by a res1 codebook (K=256, transform layout, as an index trains it) trained on them, and the
documents' codes and residuals are gathers from it (written as the store's ``.npy`` files under
``bench/.cache/``). Queries follow ``Corpus.query``: 20 tokens of a source document plus noise
and 12 random tokens, 32 vectors.

Ground truth: the store's exhaustive search (``search(exhaustive=True)``) on the first
``--exhaustive-queries`` queries (timed, interleaved with ours); for the other queries, the
same exact MaxSim computed through the vocabulary (the query against each vocabulary token once,
then per document the max over its token ids, Numba), checked equal to the store's exhaustive
results on the timed queries. Timings: one query at a time, default Numba threads, the methods
interleaved per query, medians; the machine is shared, so read ratios from one run.

Writes ``bench/results/colbert_first_stage.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine_info  # noqa: E402

CACHE = HERE / ".cache"


def _unit(a):
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


def build_store(n_docs: int, variants: int, seed: int, folder: Path):
    """Write (or reuse) a coded store of ``n_docs`` documents; returns the folder's meta."""
    from suite.scale_m3 import TOKEN_MIX, Corpus, Shape

    from hybridsearch.retrievers.colbert_codec import ColbertCodec

    meta_path = folder / "meta.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    shape = Shape()
    corpus = Corpus(shape, seed)
    rng = np.random.default_rng([seed, 77])
    vb = rng.integers(0, shape.pool, (shape.pool, variants))
    a = np.repeat(np.arange(shape.pool), variants)
    vocab = _unit(corpus.pool[a] + np.float32(TOKEN_MIX) * corpus.pool[vb.reshape(-1)])
    t0 = time.perf_counter()
    sample = vocab[rng.choice(len(vocab), min(len(vocab), 1 << 17), replace=False)]
    codec = ColbertCodec.train(sample, nbits=1, k=256, transform=True)
    codec.save(folder / "codec")
    vcodes, vres = codec.encode(vocab)
    np.save(folder / "vocab_a.npy", a)
    np.save(folder / "vocab_b.npy", vb.reshape(-1))
    t_code = time.perf_counter() - t0
    # documents: lengths, topics, token ids into the vocabulary, written a block at a time
    lens = rng.integers(shape.tokens[0], shape.tokens[1] + 1, n_docs)
    offsets = np.zeros(n_docs + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    topics = rng.integers(0, shape.topics, n_docs)
    T = int(offsets[-1])
    codes = np.lib.format.open_memmap(folder / "colbert_codes.npy", "w+", np.uint16, (T,))
    res = np.lib.format.open_memmap(folder / "colbert_residuals.npy", "w+", np.uint8, (T, codec.residual_bytes))
    toks = np.lib.format.open_memmap(folder / "tokens.npy", "w+", np.int32, (T,))
    step = 50_000
    for s in range(0, n_docs, step):
        e = min(n_docs, s + step)
        lo, hi = int(offsets[s]), int(offsets[e])
        tt = np.repeat(topics[s:e], lens[s:e])
        own = rng.random(hi - lo) < 2 / 3
        d = np.where(own, corpus.topic_tokens[tt, rng.integers(0, shape.topic_pool, hi - lo)],
                     rng.integers(0, shape.pool, hi - lo))
        tok = (d * variants + rng.integers(0, variants, hi - lo)).astype(np.int32)
        toks[lo:hi] = tok
        codes[lo:hi] = vcodes[tok]
        res[lo:hi] = vres[tok]
    for mm in (codes, res, toks):
        mm.flush()
    del codes, res, toks
    np.save(folder / "colbert_offsets.npy", offsets)
    meta = {"docs": n_docs, "tokens": T, "variants": variants, "seed": seed, "vocab": int(len(vocab)),
            "k": codec.k, "codec": repr(codec), "train_and_code_vocab_s": round(t_code, 1)}
    meta_path.write_text(json.dumps(meta))
    return meta


def make_queries(folder: Path, n_docs: int, nq: int, seed: int):
    """``Corpus.query``'s ColBERT part on the vocabulary documents: (32, 1024) float32 each."""
    from suite.scale_m3 import TOKEN_MIX, Corpus, Shape

    shape = Shape()
    corpus = Corpus(shape, seed)
    a, b = np.load(folder / "vocab_a.npy"), np.load(folder / "vocab_b.npy")
    toks = np.load(folder / "tokens.npy", mmap_mode="r")
    off = np.load(folder / "colbert_offsets.npy", mmap_mode="r")
    rng = np.random.default_rng([seed, 5, n_docs])
    out = []
    for d in np.sort(rng.choice(n_docs, nq, replace=False)):
        t = np.asarray(toks[off[d]:off[d + 1]])
        pick = t[rng.choice(len(t), min(20, len(t)), replace=False)]
        mine = _unit(corpus.pool[a[pick]] + np.float32(TOKEN_MIX) * corpus.pool[b[pick]])
        mine = mine + rng.standard_normal(mine.shape, dtype=np.float32) * np.float32(0.5 / math.sqrt(shape.colbert_dim))
        oa, ob = rng.integers(0, shape.pool, 32 - len(mine)), rng.integers(0, shape.pool, 32 - len(mine))
        other = _unit(corpus.pool[oa] + np.float32(TOKEN_MIX) * corpus.pool[ob])
        out.append(_unit(np.concatenate([mine, other])))
    return out


def exact_by_vocabulary(store, folder: Path, q: np.ndarray, k: int):
    """Exact MaxSim top-k through the vocabulary: ``(scores, rows)``."""
    from numba import njit, prange

    global _vocab_kernel
    if "_vocab_kernel" not in globals():
        @njit(parallel=True, cache=False)
        def kern(S, toks, offsets, out):
            m = S.shape[0]
            for d in prange(offsets.shape[0] - 1):
                lo, hi = offsets[d], offsets[d + 1]
                if hi == lo:
                    out[d] = 0.0
                    continue
                tot = 0.0
                for i in range(m):
                    best = -np.inf
                    for t in range(lo, hi):
                        v = S[i, toks[t]]
                        if v > best:
                            best = v
                    tot += best
                out[d] = tot / m
        _vocab_kernel = kern
    S = np.ascontiguousarray(q @ _vocab_decoded(store, folder).T)
    toks = np.load(folder / "tokens.npy", mmap_mode="r")
    out = np.empty(store.n_docs, np.float64)
    _vocab_kernel(S, toks, np.asarray(store.offsets), out)
    order = np.lexsort((np.arange(store.n_docs), -out))[:k]
    return out[order], order


_DECODED = {}


def _vocab_decoded(store, folder):
    key = str(folder)
    if key not in _DECODED:
        from suite.scale_m3 import TOKEN_MIX, Corpus, Shape  # noqa: F401

        a, b = np.load(folder / "vocab_a.npy"), np.load(folder / "vocab_b.npy")
        meta = json.loads((folder / "meta.json").read_text())
        corpus = Corpus(Shape(), meta["seed"])
        vocab = _unit(corpus.pool[a] + np.float32(TOKEN_MIX) * corpus.pool[b])
        ids, res = store.codec.encode(vocab)
        _DECODED[key] = store.codec.decode(ids, res)
    return _DECODED[key]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--exhaustive-queries", type=int, default=None,
                    help="queries also run exhaustively through the store (default: all)")
    ap.add_argument("--candidates", default="1024,4096,16384",
                    help="two stages: the first stage's top N get the exact MaxSim")
    ap.add_argument("--refined", default="256,1024",
                    help="three stages (the default search): refine_depth(N) by centroids, N of them "
                         "by the leading coded dimensions, exact MaxSim on those")
    ap.add_argument("--variants", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", default=str(HERE / "results" / "colbert_first_stage.md"))
    ap.add_argument("--append", action="store_true", help="append a section to --out")
    a = ap.parse_args()

    import numba

    from hybridsearch.retrievers import multivector as mv
    from hybridsearch.retrievers.colbert_codec import ColbertCodec
    from hybridsearch.retrievers.multivector import CodedColbertStore

    folder = CACHE / f"colbert_fs_{a.docs}_v{a.variants}_s{a.seed}"
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    meta = build_store(a.docs, a.variants, a.seed, folder)
    print(f"store ready in {time.perf_counter() - t0:.0f} s: {meta}", flush=True)
    codec = ColbertCodec.load(folder / "codec")
    store = CodedColbertStore.load(folder, "colbert", codec=codec, check=False)
    queries = make_queries(folder, a.docs, a.queries, a.seed)
    n_ex = a.queries if a.exhaustive_queries is None else min(a.exhaustive_queries, a.queries)
    cands = [int(c) for c in a.candidates.split(",") if c]
    refined = [int(c) for c in a.refined.split(",") if c]
    configs = [("two", c) for c in cands] + [("three", c) for c in refined]
    depths = sorted(set(cands) | {mv.refine_depth(c, a.docs) for c in refined})
    k = a.k

    def run(cfg, q):
        kind, c = cfg
        if kind == "two":
            store._refines = lambda: False  # the first stage's top N straight to the exact MaxSim
        try:
            return store.search(q, k, candidates=c)
        finally:
            store.__dict__.pop("_refines", None)

    t = time.perf_counter()
    bits, _ = store.centroid_sets()
    t_sets = time.perf_counter() - t
    print(f"centroid sets: {t_sets:.2f} s, {bits.nbytes / 2**20:.0f} MiB", flush=True)
    # warm the kernels
    for cfg in configs:
        run(cfg, queries[0])

    truth, ex_times, vocab_agree = [], [], []
    times = {c: [] for c in configs}
    stage_times = {c: [] for c in depths}
    stage_rows = {c: [] for c in depths}
    results = {c: [] for c in configs}
    for j, q in enumerate(queries):
        if j < n_ex:
            t = time.perf_counter()
            s_ex, i_ex = store.search(q, k, exhaustive=True)
            ex_times.append(time.perf_counter() - t)
            s_v, i_v = exact_by_vocabulary(store, folder, q, k)
            vocab_agree.append(len(set(i_v.tolist()) & set(i_ex.tolist())) / k)
            truth.append(i_ex)
        else:
            truth.append(exact_by_vocabulary(store, folder, q, k)[1])
        for c in depths:
            t = time.perf_counter()
            rows, _ = store.first_stage(q, c)
            stage_times[c].append(time.perf_counter() - t)
            stage_rows[c].append(rows)
        for cfg in configs:
            t = time.perf_counter()
            _, i = run(cfg, q)
            times[cfg].append(time.perf_counter() - t)
            results[cfg].append(i)
        print(f"query {j}: exhaustive {ex_times[-1] if j < n_ex else float('nan'):.2f} s, "
              f"ours {[round(times[c][-1] * 1e3, 1) for c in configs]} ms", flush=True)

    def recall(found):
        return float(np.mean([len(set(r.tolist()) & set(t_.tolist())) / k for r, t_ in zip(found, truth)]))

    ex_p50 = float(np.median(ex_times))
    lines = [f"## {a.docs:,} documents, {meta['tokens']:,} tokens ({meta['tokens'] / a.docs:.0f} a document)", "",
             machine_info(("hybridsearch", "numpy", "numba")) + f" Numba threads: {numba.get_num_threads()}. "
             f"The machine was shared with other jobs (1-minute load average {load0:.1f} at the start, "
             f"{os.getloadavg()[0]:.1f} at the end): read the ratios, measured in one run.", "",
             f"Codec: {meta['codec']}; vocabulary of {meta['vocab']:,} coded tokens ({a.variants} per direction). "
             f"Queries: {a.queries} of 32 vectors, k={k}; exhaustive through the store on {n_ex} of them "
             f"(p50 {ex_p50:.2f} s), ground truth for the others exact through the vocabulary (agrees with "
             f"the store's exhaustive top-{k} on {np.mean(vocab_agree) * 100:.0f}% of ids on those {n_ex}).", "",
             f"Centroid sets built once per store: {t_sets:.2f} s, {bits.nbytes / 2**20:.1f} MiB.", "",
             "First stage alone (centroid scores of every document, top N): its p50 and the share of the "
             "exact top-10 it holds.", "",
             "| N | p50 first stage (ms) | exact top-10 within |", "|---:|---:|---:|"]
    for c in depths:
        lines.append(f"| {c} | {np.median(stage_times[c]) * 1e3:.1f} | {recall(stage_rows[c]):.3f} |")
    lines += ["", f"Search (`CodedColbertStore.search`): *two stages* = first stage top N -> exact MaxSim on N; "
              f"*three stages* (the default, N = `candidates`) = first stage top max({mv.REFINE_DEPTH} N, "
              f"allowed / {mv.REFINE_SHARE}) -> MaxSim on "
              f"the centroid part plus the {mv.REFINE_DIMS} leading coded dimensions -> exact MaxSim on the best N.", "",
              "| stages | N (exact MaxSim) | p50 search (ms) | p99 search (ms) | exhaustive / ours (p50) | recall@10 |",
              "|---|---:|---:|---:|---:|---:|"]
    for cfg in configs:
        p50 = float(np.median(times[cfg]))
        lines.append(f"| {cfg[0]} | {cfg[1]} | {p50 * 1e3:.1f} | "
                     f"{np.percentile(times[cfg], 99) * 1e3:.1f} | {ex_p50 / p50:.0f}x | {recall(results[cfg]):.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(a.out)
    if a.append and out.exists():
        out.write_text(out.read_text() + "\n" + text)
    else:
        head = ["# ColBERT first stage against the exhaustive MaxSim", "",
                "Written by `bench/bench_colbert_first_stage.py` (its docstring describes the data and the protocol).", ""]
        out.write_text("\n".join(head) + text)


if __name__ == "__main__":
    main()
