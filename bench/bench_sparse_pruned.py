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
    split_mb = sum(a.nbytes for a in split[:-2] + split[-2]) / 2**20  # [-2]: heaviest postings
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
            "PRUNE_MID_FACTOR", "PRUNE_NE_FRAC", "PRUNE_SEED_TERMS", "PRUNE_SEED_TOPS",
            "PRUNE_SEED_LOOKUPS", "PRUNE_FORWARD", "PRUNE_SEED_FWD_MULT", "PRUNED_MIN_DOCS",
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

- **Target (issue 13, item 2): exact mode >= 5x faster than today at 1M documents, k = 10:
  met both ways this round.** `doc` queries at 1M, one thread, this file on an idle machine
  (load average 0.8-1.0): taking turns query by query 5.20x (6.20 vs 1.19 ms, the table), each
  kernel in a row 6.64x (6.62 vs 1.00 ms); a run at 1M alone (other queries: 60 terms a query)
  6.01x / 6.80x. The round before: taking turns 4.28-5.13x (median ~4.6x over eight idle
  runs), in a row 5.45-6.08x. Two threads at 1M: 4.73x / 5.72x. `flat` queries at 1M: 2.5x /
  2.8x (1.9-2.0x before); 300k: 3.2x / 3.8x `doc`, 1.6x `flat` (1.1x before); 100k (where
  `auto` scans): 2.0x / 2.1x `doc`, 0.9x `flat` (0.6x before).
- This round, three changes (scratch A/B in `/tmp`, not kept: both codes on the same arrays in
  one process, 1M, `doc`, one thread, 5 rounds alternating which code goes first, medians,
  ratio new/old; the machine shared its host with other jobs, so absolute times moved
  1.3-2.2 ms between runs while the ratios held):
  - **A first k-th score from each list's heaviest postings.** `_tops` keeps each list's
    `PRUNE_SEED_TOPS` = 32 heaviest postings (built with the split lists: 39 MiB at 1M, one
    pass with a heap a list); the seed sums them by doc over the `PRUNE_SEED_TERMS` = 16 query
    terms of largest bound in a small hash table and scores the 4k best sums exactly from
    their forward rows. It replaces a merge of up to 4 whole lists of <= 50k postings. In a
    Python model of it (exact scores by brute force), 16 terms x 32 postings gave 0.999-1.000
    of the true k-th score (median over 50 queries; 4 terms x 16 postings: 0.986). The kernel
    then read 318.8k postings a query instead of 328.0k, against 316.3k with the true k-th
    score handed in beforehand, so the first k-th score is no longer where the time goes.
    A/B: 0.93 taking turns, 0.90 in a row.
  - **Candidates' forward rows prefetched** (`_prefetch`, LLVM's prefetch intrinsic through
    numba): the offsets of every candidate that can still enter first, then every line of
    their rows, then the scoring. Cycle counters (`llvm.readcyclecounter` in an instrumented
    copy) put candidate scoring at 220-250k cycles a query against 410-440k without it. With
    the seed: 0.86 taking turns, 0.75 in a row (new/old).
  - **Fewer numpy and scipy calls in `search()`** (one check of a float32 CSR query, list
    lengths kept, the thread count asked only where threads could be used, one reduction for
    finiteness): each costs microseconds warm and tens of microseconds after a scan has
    churned the caches; `search()` around the kernel took ~0.2-0.3 ms a query in that state
    (numba's dispatch of the kernel alone: ~40 us, 4 us warm). With both changes above:
    0.83 taking turns, 0.81 in a row.
- Where the time goes now (cycle counters, 1M, `doc`, one thread, per query): the scatter
  of the essential tiers ~68% (~319k postings, ~5 cycles each: a micro-benchmark of the same
  loop over warm data runs at ~3), candidates ~10%, the seed ~9%, each window's bounds and
  tier choice ~7%. Tried and dropped this round: a larger non-essential share now that
  candidates cost less (`PRUNE_NE_FRAC` 0.55: 1.10x the time taking turns, 0.6: 1.09x; before
  the prefetch, 0.45: 1.06x); prefetching the first lines of every run before the scatter (1.02
  / 1.01); before the prefetch, a seed over 8 terms x 16 postings (1.01 taking turns, 1.23 in a
  row, against 16 x 32). Four tiers instead of three
  (a model of the greedy choice with the true k-th score: 0.75x, 1.0x or 0.5x the mean as a
  fourth split) would read 0-4% fewer postings: not built.
- Previous round: a **forward index** (doc -> its terms ascending, then their weights, one int32
  buffer; 8 bytes a posting + 8 a doc: 447 bytes a doc here, 427 MiB next to 419 MiB of
  postings at 1M), built with the split lists on a segment's first pruned query
  (`PRUNE_FORWARD`, on by default). Candidates whose partial sum plus every unread bound can
  still enter get their exact score from their row (the float32 sum in query order, as term at
  a time: a bit per vocabulary term rules out a row's other terms, a small hash table gives a
  query term's entry; rows searched per entry when a query repeats a term), and so do the
  first k-th score's docs, now 4k of them (`PRUNE_SEED_FWD_MULT`). This replaces ~2,700
  searches a query in the posting lists (20 seed docs x 57 lists, ~900 bound look-ups for
  ~265 candidates, ~650 for the ~12 exact scores), most of them cache misses once the scan has
  churned the caches, with ~300 row reads. Cost: the memory, and the first pruned query on a
  1M segment now takes 2.5 s to build (0.5 s before; the forward index is filled doc range by
  doc range, 1.0 s against 2.3 s in one pass). `PRUNE_FORWARD = False` keeps the searches and
  the previous memory.
- Previous round's scratch A/B (`/tmp` harness, not kept: both codes on the same arrays in one process, 1M,
  `doc`, one thread, each pruned query after a scan of the same query, 4-5 rounds, medians,
  ratio new/old; the same code against itself read 0.96 taking turns; the machine was
  loaded, load average 1.7-2.4, except where said): forward rows scored by
  a merge 0.94 / 0.95 (turns / in a row), by a hash table 0.91 / 0.91, with the bit per term
  0.88 / 0.84, with 4k seed docs 0.84-0.87 / 0.82 (8k: 0.87 / 0.86; 12 docs instead of 20:
  1.08 / 1.13). Tried and dropped: reading the query terms' doc-id samples and the accumulator
  sequentially before the query (the cold working set: ~2%, within the noise); touching a
  chunk's forward rows before scoring them (no change: scoring a row costs ~0.4 us of compute
  and misses, not latency alone); a branch-free score through a per-query byte map of the
  vocabulary (no change); first k-th score from the high lists of the top 4 or 8 terms instead
  of whole lists of at most 50k postings (0.85 / 0.86 and 0.93 / 1.08); seed lists capped at
  10k or 200k postings (0.95 both); a larger non-essential share now that candidates are
  cheaper (`PRUNE_NE_FRAC` 0.6: 1.08, 0.65: 1.43: 4x the candidates at ~0.5 us each for ~27%
  fewer postings).
- Previous round's view of the time (counters, no cycle counters): mostly the scatter; taking
  turns added ~0.2 ms a query (postings that stay in the 32 MiB L3 between pruned queries in a
  row but not after a scan streams ~45 MB). Documents reordered so that similar ones share
  blocks would let block-max bounds skip whole blocks (random order here: block maxima are
  close to the global ones), but that changes doc ids and belongs to the segment writer.
- Earlier rounds (see git history of this file): block-max bounds over blocks of 65,536 docs,
  three weight tiers per long list (high above 3x the list's mean, mid above 1.5x), candidate
  look-ups list by list, an interpolating search on a 1-in-64 doc-id sample; tried and dropped
  then: software prefetch of the runs to scatter, other block sizes, huge pages for the split
  lists, a vectorized accumulator scan, a first k-th score from partial sums.
- k matters (second table, each kernel in a row): at 1M, 11.7x for k = 1, 3.6x for k = 100,
  2.3x for k = 250 and 1.2x at k = 500 (previous round: 10.2x, 2.5x, 1.35x, 1.2x).
  `search(kernel="auto")` still prunes only while k <= n_docs / `PRUNED_DOCS_PER_K` (250 at
  1M).
- The data decide the figure. Weights shrink for frequent terms (``log(2 + rank)``), as learned
  models learn to do; with uniform weights (the `flat` set, or `bench_kernels.py`'s data) the
  long lists carry bounds as large as any and little can be left unread.
- `search(kernel="auto")` also needs `PRUNED_MIN_DOCS` = 131,072 documents: at 100k the
  pruned kernel wins on `doc` queries but loses on `flat` ones; from 300k it wins on both.
- Nothing is stored on disk (old segments keep working); the lines under the table give each
  size's build time and memory.
- Not done: the approximate (SEISMIC-style) mode; 10M documents; batched throughput (a batch
  runs one query per thread, each as here); a smaller forward index (term ids delta-coded in
  16 bits would take it to ~6 bytes a posting).
"""


if __name__ == "__main__":
    main()
