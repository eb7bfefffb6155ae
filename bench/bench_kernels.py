"""Retriever kernels against the obvious alternatives, side by side in one run.

* Learned-sparse top-10: ``SparsePostings.search`` (Numba, inverted index) against scipy:
  ``q @ D.T`` followed by ``argpartition``. scipy gets ``D.T`` pre-transposed to CSR once (not
  timed); plain ``q @ D.T`` on a CSR ``D`` would redo that O(nnz) transpose on every call.
  One query at a time (p50/p99 latency over many queries) and batches of 64 queries.
* ColBERT MaxSim of one 32-token query over 1000 candidates: ``ColbertStore.maxsim`` (Numba,
  float16 store) against torch: gather the candidates' float16 vectors padded to the longest,
  widen to float32, ``torch.einsum`` + mask + max + mean.
* Index build: ``SparsePostings.from_csr`` (Numba counting-sort transpose plus per-term maxima)
  against scipy's ``D.T.tocsr()``, the same transpose.

Each kernel is also run with one thread (numba/torch) since scipy is single-threaded. Variants
run interleaved, after warm-up (numba compiled); figures are medians over ``--repeat`` rounds.
Synthetic data: Zipf(1) vocabulary of 250k terms, ~60 distinct terms per document and ~10 per
query; ColBERT vectors are unit-norm Gaussian, ~100 per document.

Usage: python bench/bench_kernels.py [--docs 10000 100000] [--repeat 3] [--dim 128]
Writes bench/results/kernels.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numba
import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info, table

from hybridsearch.retrievers.multivector import ColbertStore
from hybridsearch.retrievers.sparse import SparsePostings

VOCAB = 250_000
K = 10
BATCH = 64


def zipf_csr(rng, n_rows, draws, vocab=VOCAB):
    """(n_rows, vocab) float32 CSR: ``draws`` Zipf(1) term draws per row, repeats merged."""
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1))
    cdf /= cdf[-1]
    rows = []
    for lo in range(0, n_rows, 100_000):  # chunks bound the temporary memory at 1M docs
        n = min(100_000, n_rows - lo)
        terms = np.searchsorted(cdf, rng.random(n * draws)).astype(np.int32)
        w = rng.uniform(0.01, 0.3, n * draws).astype(np.float32)
        coo = sp.coo_matrix((w, (np.repeat(np.arange(n), draws), terms)), shape=(n, vocab))
        m = coo.tocsr()
        m.sum_duplicates()
        rows.append(m)
    return sp.vstack(rows, format="csr")


def percentiles(ts):
    return float(np.percentile(ts, 50)) * 1e3, float(np.percentile(ts, 99)) * 1e3


def scipy_topk(DT, q, k=K):
    """scipy baseline: sparse (nq, n_docs) product, then per-row argpartition of its entries."""
    res = (q @ DT).tocsr()
    out = []
    for r in range(res.shape[0]):
        lo, hi = res.indptr[r], res.indptr[r + 1]
        data, idx = res.data[lo:hi], res.indices[lo:hi]
        if data.size > k:
            top = np.argpartition(-data, k)[:k]
            data, idx = data[top], idx[top]
        order = np.argsort(-data, kind="stable")
        out.append((data[order], idx[order]))
    return out


def with_threads(n, fn, *args):
    """Run fn with numba and torch limited to n threads."""
    nb, tt = numba.get_num_threads(), torch.get_num_threads()
    numba.set_num_threads(n)
    torch.set_num_threads(n)
    try:
        return fn(*args)
    finally:
        numba.set_num_threads(nb)
        torch.set_num_threads(tt)


def bench_sparse(n_docs, repeat, n_single, rng):
    threads = numba.get_num_threads()
    D = zipf_csr(rng, n_docs, 64)
    Qs = zipf_csr(rng, n_single, 10)
    SparsePostings.from_csr(D[:10])  # compile before timing
    builds = {"scipy": [], "ours": [], "ours, 1 thread": []}
    for _ in range(repeat):
        t = time.perf_counter()
        DT = D.T.tocsr()
        builds["scipy"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ix = SparsePostings.from_csr(D)
        builds["ours"].append(time.perf_counter() - t)
        t = time.perf_counter()
        with_threads(1, SparsePostings.from_csr, D)
        builds["ours, 1 thread"].append(time.perf_counter() - t)
    t_build = {v: statistics.median(ts) for v, ts in builds.items()}
    # warm-up compiles every path (serial, parallel, blocks) and checks agreement with scipy
    for n in (1, threads):
        s, _ = with_threads(n, ix.search, Qs[:BATCH], K)
    for r, (ds, _) in enumerate(scipy_topk(DT, Qs[:BATCH])):
        np.testing.assert_allclose(s[r][: ds.size], ds, rtol=1e-5)
    variants = {"scipy q @ D.T + argpartition": lambda q: scipy_topk(DT, q),
                f"ours, {threads} threads": lambda q: ix.search(q, K),
                "ours, 1 thread": lambda q: with_threads(1, ix.search, q, K)}
    single = {v: [] for v in variants}
    batch = {v: [] for v in variants}
    for _ in range(repeat):
        lat = {v: [] for v in variants}
        for j in range(n_single):
            q = Qs[j]
            for v, fn in variants.items():
                t = time.perf_counter()
                fn(q)
                lat[v].append(time.perf_counter() - t)
        blat = {v: [] for v in variants}
        for b in range(0, n_single - BATCH + 1, BATCH):
            q = Qs[b:b + BATCH]
            for v, fn in variants.items():
                t = time.perf_counter()
                fn(q)
                blat[v].append(time.perf_counter() - t)
        for v in variants:
            single[v].append(percentiles(lat[v]))
            batch[v].append(percentiles(blat[v]))
    rows = []
    base = "scipy q @ D.T + argpartition"
    for kind, res in (("1 query", single), (f"batch of {BATCH}", batch)):
        med = {v: [statistics.median(x[0] for x in r), statistics.median(x[1] for x in r)]
               for v, r in res.items()}
        for v in variants:
            rows.append([f"{n_docs:,}", kind, v, med[v][0], med[v][1], med[base][0] / med[v][0]])
    info = (f"{n_docs:,} docs, {D.nnz / n_docs:.1f} terms/doc, "
            f"{Qs.nnz / n_single:.1f} terms/query, {ix.docs.size:,} postings")
    build = [f"{n_docs:,}", t_build["scipy"], t_build["ours"], t_build["ours, 1 thread"],
             t_build["scipy"] / t_build["ours"], t_build["scipy"] / t_build["ours, 1 thread"]]
    return rows, info, build


def torch_maxsim(V16, offsets, q, cand):
    """Baseline: padded gather, float32, einsum, masked max, mean over query tokens."""
    lens = offsets[cand + 1] - offsets[cand]
    width = int(lens.max())
    mask = np.arange(width)[None, :] < lens[:, None]
    idx = np.where(mask, offsets[cand][:, None] + np.arange(width)[None, :], 0)
    p = V16[torch.from_numpy(idx.ravel())].float().reshape(len(cand), width, -1)
    s = torch.einsum("md,cwd->cmw", torch.from_numpy(q), p)
    s.masked_fill_(~torch.from_numpy(mask)[:, None, :], float("-inf"))
    return (s.max(dim=-1).values.sum(dim=-1) / q.shape[0]).numpy()


def bench_maxsim(dim, repeat, rng, n_queries=20, n_cand=1000):
    threads = numba.get_num_threads()
    n_docs = 20_000 * 128 // dim  # ~512 MB of float16 vectors, far beyond the caches
    lens = rng.integers(60, 141, n_docs)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    vec = rng.standard_normal((int(offsets[-1]), dim), dtype=np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    store = ColbertStore.from_arrays(vec, offsets)
    del vec
    with warnings.catch_warnings():  # the store is read-only and torch only reads it here
        warnings.simplefilter("ignore", UserWarning)
        V16 = torch.from_numpy(np.asarray(store.vectors))
    qs = [rng.standard_normal((32, dim), dtype=np.float32) for _ in range(n_queries)]
    cands = [rng.choice(n_docs, n_cand, replace=False).astype(np.int64) for _ in range(n_queries)]
    for n in (1, threads):
        got = with_threads(n, store.maxsim, qs[0], cands[0])
    want = torch_maxsim(V16, offsets, qs[0], cands[0])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    variants = {f"torch einsum, {threads} threads": lambda q, c: torch_maxsim(V16, offsets, q, c),
                "torch einsum, 1 thread":
                    lambda q, c: with_threads(1, torch_maxsim, V16, offsets, q, c),
                f"ours, {threads} threads": store.maxsim,
                "ours, 1 thread": lambda q, c: with_threads(1, store.maxsim, q, c)}
    res = {v: [] for v in variants}
    for _ in range(repeat):
        lat = {v: [] for v in variants}
        for q, c in zip(qs, cands):
            for v, fn in variants.items():
                t = time.perf_counter()
                fn(q, c)
                lat[v].append(time.perf_counter() - t)
        for v in variants:
            res[v].append(percentiles(lat[v]))
    base = next(iter(variants))
    med = {v: [statistics.median(x[0] for x in r), statistics.median(x[1] for x in r)]
           for v, r in res.items()}
    rows = [[dim, v, med[v][0], med[v][1], med[base][0] / med[v][0]] for v in variants]
    return rows, (f"d={dim}: {n_docs:,} docs, {int(offsets[-1]):,} vectors, "
                  f"{n_cand} candidates/query")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dim", type=int, nargs="+", default=[128])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--queries", type=int, default=256, help="single queries per round (sparse)")
    ap.add_argument("--note", default="", help="free text added to the report (e.g. machine load)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernels.md")
    args = ap.parse_args()
    load_start = os.getloadavg()
    rng = np.random.default_rng(0)
    sparse_rows, sparse_info, build_rows = [], [], []
    for n in args.docs:
        r, info, build = bench_sparse(n, args.repeat, args.queries, rng)
        sparse_rows += r
        sparse_info.append(info)
        build_rows.append(build)
        print(info, flush=True)
    ms_rows, ms_info = [], []
    for d in args.dim:
        r, info = bench_maxsim(d, args.repeat, rng)
        ms_rows += r
        ms_info.append(info)
        print(info, flush=True)
    load = ", ".join(f"{x:.1f}" for x in load_start + os.getloadavg())
    out = [
        "# Retriever kernels", "",
        machine_info(packages=("hybridsearch", "numpy", "scipy", "numba", "torch")),
        (f"numba threading layer: {numba.threading_layer()}, {numba.get_num_threads()} threads; "
         f"torch {torch.get_num_threads()} threads. Load average (1/5/15 min) at start and "
         f"end: {load}."), "",
        (f"Medians over {args.repeat} interleaved rounds, after warm-up. "
         "Speed-up = baseline p50 / variant p50."), "",
        "## Learned-sparse exact top-10", "",
        table(["docs", "queries", "variant", "p50 ms", "p99 ms", "speed-up"], sparse_rows), "",
        *[f"* {i}" for i in sparse_info], "",
        "## Sparse index build (median seconds)", "",
        table(["docs", "scipy D.T.tocsr()", f"from_csr, {numba.get_num_threads()} threads",
               "from_csr, 1 thread", "speed-up", "speed-up, 1 thread"], build_rows), "",
        "## ColBERT MaxSim, 32 query tokens x 1000 candidates", "",
        table(["d", "variant", "p50 ms", "p99 ms", "speed-up"], ms_rows), "",
        *[f"* {i}" for i in ms_info], "",
        (f"Command: `python bench/bench_kernels.py --docs {' '.join(map(str, args.docs))} "
         f"--dim {' '.join(map(str, args.dim))} --repeat {args.repeat} --queries {args.queries}`"),
    ]
    if args.note:
        out += ["", args.note]
    text = "\n".join(out) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
