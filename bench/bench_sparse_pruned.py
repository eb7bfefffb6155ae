"""Exact pruned learned-sparse search against today's term-at-a-time kernel, in one run.

Both kernels are ``SparsePostings.search`` (``kernel="taat"`` and ``kernel="pruned"``) on the
same index; the run first checks that they return identical ids and float32 scores for every
query (and, up to 100k documents, that both equal ``brute_force_topk``), then times single
queries after warm-up, the kernels taking turns query by query and, separately, each over all
the queries in a row: per round the median (p50) and p99 over the queries, then the median
over rounds. With one numba thread and with the default number.

Synthetic data shaped like learned-sparse postings: a Zipf(1) vocabulary of 250k terms, 64
draws a document (~60 distinct terms), lognormal weights scaled down for frequent terms (a
learned model's IDF-like shrinkage: ``log(2 + rank) / log(2 + V)``). Two query sets, 30-100
terms each:

* ``doc``: a random document's 8-20 heaviest terms plus Zipf-drawn expansion terms, weights
  scaled like the documents' (what a learned query encoder produces for a real query);
* ``flat``: Zipf-drawn terms only, unscaled lognormal weights (no structure to prune on: the
  kernel's worst case).

Usage: python bench/bench_sparse_pruned.py [--docs 100000 1000000] [--queries 50]
       [--repeat 3] [--k 10] [--out bench/results/sparse_pruned.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info, table

from hybridsearch.retrievers import sparse
from hybridsearch.retrievers.sparse import SparsePostings, brute_force_topk

VOCAB = 250_000


def zipf_terms(rng, n):
    cdf = np.cumsum(1.0 / np.arange(1, VOCAB + 1))
    return np.searchsorted(cdf / cdf[-1], rng.random(n))


def idf_scale(terms):
    return np.log(2.0 + terms) / np.log(2.0 + VOCAB)


def make_docs(rng, n, draws=64, chunk=100_000):
    parts = []
    for lo in range(0, n, chunk):  # chunks bound the temporary memory at 1M docs
        m = min(chunk, n - lo)
        terms = zipf_terms(rng, m * draws)
        w = (rng.lognormal(0.0, 0.5, terms.size) * idf_scale(terms)).astype(np.float32)
        part = sp.csr_matrix((w, (np.repeat(np.arange(m), draws), terms)), shape=(m, VOCAB))
        part.sum_duplicates()
        parts.append(part)
    return sp.vstack(parts, format="csr")


def make_queries(rng, docs, n, flat):
    rows, cols, vals = [], [], []
    for r in range(n):
        length = int(rng.integers(30, 101))
        core = np.zeros(0, np.int64)
        if not flat:
            d = docs[int(rng.integers(docs.shape[0]))]
            core = d.indices[np.argsort(-d.data)][: int(rng.integers(8, 21))]
        terms = np.unique(np.concatenate([core, zipf_terms(rng, length - core.size)]))
        w = rng.lognormal(0.0 if flat else -0.5, 0.6, terms.size)
        if not flat:
            w *= idf_scale(terms)
        rows += [r] * terms.size
        cols += list(terms)
        vals += list(w)
    return sp.csr_matrix((np.array(vals, np.float32), (rows, cols)), shape=(n, VOCAB))


def with_threads(n, fn, *args, **kwargs):
    before = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        return fn(*args, **kwargs)
    finally:
        numba.set_num_threads(before)


def time_single(ix, queries, k, threads, repeat, alternate):
    """{kernel: (p50 ms, p99 ms)}: medians over rounds of per-round percentiles. Each call is
    one ``search`` of one query (rows sliced beforehand); with ``alternate`` the kernels take
    turns query by query (each runs after the other has churned the caches), else each runs
    all the queries in a row."""
    return with_threads(threads, _time_single, ix, [queries[r] for r in range(queries.shape[0])],
                        k, repeat, alternate)


def _time_single(ix, rows, k, repeat, alternate):
    per = {"taat": [], "pruned": []}
    for _ in range(repeat):
        lat = {v: [] for v in per}
        order = ([(q, v) for q in rows for v in per] if alternate
                 else [(q, v) for v in per for q in rows])
        for q, v in order:
            t = time.perf_counter()
            ix.search(q, k, kernel=v)
            lat[v].append(time.perf_counter() - t)
        for v in per:
            per[v].append((np.percentile(lat[v], 50) * 1e3, np.percentile(lat[v], 99) * 1e3))
    return {v: (statistics.median(a for a, _ in ts), statistics.median(b for _, b in ts))
            for v, ts in per.items()}


def run(n_docs, n_queries, repeat, k, rng, k_sweep=()):
    t = time.perf_counter()
    docs = make_docs(rng, n_docs)
    qsets = {"doc": make_queries(rng, docs, n_queries, flat=False),
             "flat": make_queries(rng, docs, n_queries, flat=True)}
    t_gen = time.perf_counter() - t
    t = time.perf_counter()
    ix = SparsePostings.from_csr(docs)
    t_build = time.perf_counter() - t
    t = time.perf_counter()
    split = ix._split()
    t_split = time.perf_counter() - t
    split_mb = sum(a.nbytes for a in split[:-1]) / 2**20
    fwd_bytes = split[-1][0].nbytes + split[-1][1].nbytes  # [2] views [1]'s buffer
    postings_mb = (ix.docs.nbytes + ix.weights.nbytes) / 2**20
    rows = []
    for name, queries in qsets.items():
        # Identical results, whole batch and both thread settings, before any timing.
        ref = ix.search(queries, k, kernel="taat")
        if n_docs <= 100_000:
            bf = brute_force_topk(docs, queries, k)
            assert np.array_equal(bf[1], ref[1]) and np.array_equal(bf[0], ref[0])
        for threads in sorted({1, numba.get_num_threads()}):
            for kern in ("taat", "pruned"):
                got = with_threads(threads, ix.search, queries, k, kernel=kern)
                assert np.array_equal(got[1], ref[1]) and np.array_equal(got[0], ref[0]), \
                    (name, threads, kern)
                for r in range(queries.shape[0]):
                    one = with_threads(threads, ix.search, queries[r], k, kernel=kern)
                    assert np.array_equal(one[1][0], ref[1][r]), (name, threads, kern, r)
                    assert np.array_equal(one[0][0], ref[0][r]), (name, threads, kern, r)
        ix.prune_stats[:] = 0
        with_threads(1, ix.search, queries, k, kernel="pruned")
        read = ix.prune_stats[0, 2] / int(np.diff(ix.indptr)[queries.indices].sum())
        terms = np.diff(queries.indptr).mean()
        postings = np.diff(ix.indptr)[queries.indices].sum() / queries.shape[0]
        for threads in sorted({1, numba.get_num_threads()}):
            res = time_single(ix, queries, k, threads, repeat, alternate=True)
            seq = time_single(ix, queries, k, threads, repeat, alternate=False)
            rows.append([f"{n_docs:,}", name, f"{terms:.0f}", f"{postings / 1e6:.2f}M",
                         threads, res["taat"][0], res["pruned"][0],
                         f"{res['taat'][0] / res['pruned'][0]:.2f}x", res["taat"][1],
                         res["pruned"][1], seq["taat"][0], seq["pruned"][0],
                         f"{seq['taat'][0] / seq['pruned'][0]:.2f}x", f"{read:.1%}"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    info = (f"{n_docs:,} docs: {ix.docs.size / n_docs:.1f} terms a doc, {postings_mb:.0f} MiB "
            f"of postings; generated in {t_gen:.1f} s, index built in {t_build:.2f} s; split "
            f"lists and forward index (first pruned query) {t_split:.2f} s, {split_mb:.0f} MiB "
            f"in memory + {fwd_bytes / 2**20:.0f} MiB forward index "
            f"({fwd_bytes / n_docs:.0f} bytes a doc)")
    print(info, flush=True)
    sweep = []
    for kk in k_sweep:  # doc queries, one thread, each kernel in a row
        queries = qsets["doc"]
        ref = ix.search(queries, kk, kernel="taat")
        got = ix.search(queries, kk, kernel="pruned")
        assert np.array_equal(got[1], ref[1]) and np.array_equal(got[0], ref[0]), kk
        seq = time_single(ix, queries, kk, 1, repeat, alternate=False)
        sweep.append([f"{n_docs:,}", kk, seq["taat"][0], seq["pruned"][0],
                      f"{seq['taat'][0] / seq['pruned'][0]:.2f}x"])
        print(" | ".join(str(c) for c in sweep[-1]), flush=True)
    return rows, info, sweep


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--k-sweep", type=int, nargs="*", default=[1, 100, 250, 500],
                    help="other k timed on the largest index (doc queries, one thread)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sparse_pruned.md"))
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    # Compile both kernels (serial and parallel paths) before any timing.
    warm = SparsePostings.from_csr(make_docs(rng, 20_000))  # parallel build path too
    wq = make_queries(rng, sp.csr_matrix((1, VOCAB), dtype=np.float32), 4, flat=True)
    for kern in ("taat", "pruned"):
        for threads in sorted({1, numba.get_num_threads()}):
            with_threads(threads, warm.search, wq, args.k, kernel=kern)
    all_rows, infos, sweep = [], [], []
    for n in args.docs:
        rows, info, sw = run(n, args.queries, args.repeat, args.k, rng,
                             args.k_sweep if n == max(args.docs) else ())
        all_rows += rows
        infos.append(info)
        sweep += sw
    header = ["docs", "queries", "terms/q", "postings/q", "threads", "TAAT p50 ms",
              "pruned p50 ms", "speedup p50", "TAAT p99 ms", "pruned p99 ms",
              "in a row: TAAT p50", "pruned p50", "speedup", "postings read"]
    cmd = "python bench/bench_sparse_pruned.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        "# Exact pruned learned-sparse search vs term at a time", "",
        machine_info(("numpy", "numba", "scipy")), "",
        f"Command: `{cmd}` (k={args.k}, {args.queries} single queries per set, median of "
        f"{args.repeat} rounds; both kernels on the same index, taking turns query by query; "
        "the `in a row` columns time each kernel over all the queries in a row instead, so "
        "its working set stays in cache from one query to the next). Before timing, "
        "the run checked that both kernels return identical ids and float32 scores on every "
        "query, in batches and one at a time, with every thread setting"
        + (" (and equal `brute_force_topk` at 100k documents)." if min(args.docs) <= 100_000
           else "."), "",
        "Settings: " + ", ".join(f"{n} = {getattr(sparse, n)}" for n in (
            "PRUNE_BLOCK_SHIFT", "PRUNE_FIRST_DOCS", "PRUNE_SPLIT_MIN", "PRUNE_SPLIT_FACTOR",
            "PRUNE_MID_FACTOR", "PRUNE_NE_FRAC", "PRUNE_SEED_LOOKUPS", "PRUNE_FORWARD",
            "PRUNE_SEED_FWD_MULT", "PRUNED_MIN_DOCS",
            "PRUNED_DOCS_PER_K")) + ".", "",
        table(header, all_rows), "",
        "\n".join(f"- {i}" for i in infos), "",
        "`postings read`: postings the pruned kernel scanned (whole lists, mid lists, high "
        "lists and the first windows read in full), as a share of the postings of the query "
        "terms that term at a time reads, one thread; candidate look-ups are not counted.", "",
        *(["Other k (`doc` queries, one thread, each kernel over the queries in a row; "
           "identical results checked):", "",
           table(["docs", "k", "TAAT p50 ms", "pruned p50 ms", "speedup"], sweep), ""]
          if sweep else [])])
    Path(args.out).write_text(text + NOTES)
    print(f"wrote {args.out}")


NOTES = """
## Notes

- **Target (issue 13, item 2): exact mode >= 5x faster than today at 1M documents, k = 10.
  Met when each kernel runs the queries in a row, missed when they take turns.** On the
  learned-sparse-like `doc` queries at 1M, one thread: 5.25x in a row (6.27 vs 1.19 ms; 5.11x
  in a second run of this file), 4.26x taking turns (5.95 vs 1.40 ms; 4.30x in the second run),
  where each pruned query starts from caches the term-at-a-time scan of the same query has just
  churned. Two threads: 3.65x / 3.06x. 2.4x at 300k, 1.3-1.6x at 100k (where `auto` scans).
  The pruned kernel reads 4.9% of the postings at 1M (6.5% before this round). On `flat`
  queries it is 2.0x at 1M and 1.1x at 300k, as before; slower at 100k.
- This round (4.14x / 4.81x before, same file): block-max bounds (the largest weights of each
  list in each block of 65,536 docs, ~6% fewer postings read), three weight tiers per long list
  instead of two (a "mid" list of the postings above 1.5x the list's mean next to the high list
  above 3x: 19% fewer postings, ~5% faster), candidate look-ups and exact scoring done list by
  list for a window's candidates at once so that their cache misses overlap (~7%), and an
  interpolation search on the 1-in-64 doc-id sample (30-40% cheaper searches in long lists).
  Tried and dropped, no gain measured: software prefetch of the runs to scatter, bigger or
  smaller blocks, copying the split lists to huge pages, a vectorized scan of the accumulator
  instead of tracking the docs that cross the cut during the scatter (4x slower), a first k-th
  score from partial sums instead of exact ones (8% slower on `flat` queries, even on `doc`;
  kept as `PRUNE_SEED_LOOKUPS = 0`). A larger non-essential share (`PRUNE_NE_FRAC` 0.6-0.7)
  reads 20-40% fewer postings but its extra candidates cost as much.
- Where the time goes (cycle counters in a copy of the kernel, 1M, one thread, in a row): ~56%
  scattering the essential tiers into the accumulator and collecting candidates (about 2 ns a
  posting against ~1 ns for the scan's long sequential runs: the kernel reads ~900 short runs
  a query), ~21% the first k-th score (exact scores of 20 docs: ~1,100 searches, cache misses),
  ~15% candidate look-ups and exact scores, ~7% block set-up. Taking turns adds ~0.2-0.3 ms of
  cache misses to every phase. With the true k-th score given up front (an oracle, measured
  before the tiers) the kernel took 1.00 ms against 1.17: a better first k-th score is worth
  ~15% at most, and a cheaper one (partial sums) lost as much on the later phases.
  Documents are in random order here, so block maxima are close to the global ones; reordering
  documents so that similar ones share blocks would let whole blocks be skipped, but it changes
  doc ids and belongs to the segment writer.
- k matters (second table): at 1M, 9.0x for k = 1, 2.1x for k = 100, 1.3x for k = 250, and
  slower from k = 500 (more candidates survive, each scored exactly). `search(kernel="auto")`
  therefore prunes only while k <= n_docs / `PRUNED_DOCS_PER_K` (250 at 1M).
- The data decide the figure. Weights shrink for frequent terms (``log(2 + rank)``), as learned
  models learn to do; with uniform weights (the `flat` set, or `bench_kernels.py`'s data) the
  long lists carry bounds as large as any and little can be left unread.
- Threads and load: 2 cores shared with two other sessions' jobs (load average 1.3-5.5 during
  this round). The two-thread rows at 300k (and, in the second run, at 1M) caught a busy second
  core: the term-at-a-time scan's 7-8 ms there against 2 ms on one thread is that wait, not the
  kernels. The pruned kernel splits one query over threads from 2x the term-at-a-time kernel's
  threshold (so at 1M, not at 300k), each part with its own top-k.
- `search(kernel="auto")` also needs `PRUNED_MIN_DOCS` = 131,072 documents: at 100k the
  pruned kernel wins on `doc` queries but loses on `flat` ones (the ~100k crossover Milvus
  reported for the naive scan); from 300k it wins on both.
- The first pruned query on a segment builds its high and mid lists, block starts and maxima
  and doc-id sample (nothing is stored on disk, so old segments keep working): 0.5 s and 65 MiB
  next to 419 MiB of postings at 1M (see the lines under the table; 27 MiB with two tiers).
- Not done: the approximate (SEISMIC-style) mode; 10M documents; batched throughput (a batch
  runs one query per thread, each as here).
"""


if __name__ == "__main__":
    main()
