"""Dense search at 100k and 1M 1024-d vectors: ``dense_factory="auto"`` against bare FAISS, in one run.

Per corpus size, one segment's dense channel as a segment holds it: an sq8 store
(``dense_sq8.npy``, 1 byte a dimension) plus what ``"auto"`` builds over it
(:meth:`DenseIndex.build_from`, as a merge does), saved and reopened memory-mapped. Compared, in the
same process and the same interleaved rounds (:func:`suite.report.interleaved`):

* ``ours (auto)``: :meth:`DenseIndex.search` with its default effort (fetches 2k rows from the
  graph, rescores them from the stored vectors);
* ``ours exact (Flat)``: :meth:`DenseStore.search`, the exact scan every segment used before;
* ``FAISS HNSW`` / ``FAISS IVF``: the very ``dense.faiss`` file ours wrote, read by
  ``faiss.read_index`` (memory-mapped, as ours) and searched bare with ours' efSearch / nprobe
  at k = 10, without rescoring (so its build time is ours);
* ``FAISS Flat``: ``IndexFlatIP`` (float32) up to 200k rows; above, ``IndexScalarQuantizer`` SQ8
  (exhaustive, 1 GiB at 1M: float32 would be 4 GiB on a machine shared with other jobs).

Recall@10 (and @100 at k = 100) is against the exact float32 top-k of the generated vectors.
Single queries run with one thread (FAISS OpenMP and Numba); batches (every query at once) with
the machine's threads. Also: one filter keeping 30% of the rows and one keeping 2% (ours vs
exact over the allowed rows; the ground truth is exact too).

Vectors: like ``bench/suite/scale_m3.py``'s ``Corpus`` (4,096 topic centroids + noise of norm
0.8, unit rows); queries are documents plus noise of norm 1.0, renormalised. Generated in
blocks from (seed, block) alone, twice (sq8 range + ground truth, then the codes), never whole.

Usage: python bench/bench_dense_scale.py [--sizes 100000 1000000] [--queries 200] [--rounds 3]
       [--work bench/.cache/dense_scale] [--out bench/results/dense_scale.md]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, table  # noqa: E402
from suite.report import interleaved, rss_mib  # noqa: E402

DIM, TOPICS, NOISE, QUERY_NOISE, BLOCK = 1024, 4096, 0.8, 1.0, 10_000
FILTERS = {"30%": 30, "2%": 2}


def _unit(a):
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    return a


class Vectors:
    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed
        self.centroids = _unit(np.random.default_rng([seed, 0]).standard_normal((TOPICS, DIM), dtype=np.float32))

    def block(self, j: int) -> np.ndarray:
        lo, hi = j * BLOCK, min(self.n, (j + 1) * BLOCK)
        rng = np.random.default_rng([self.seed, 1, j])
        t = rng.integers(0, TOPICS, hi - lo)
        noise = rng.standard_normal((hi - lo, DIM), dtype=np.float32) * np.float32(NOISE / math.sqrt(DIM))
        return _unit(self.centroids[t] + noise)

    def blocks(self):
        for j in range(-(-self.n // BLOCK)):
            yield j * BLOCK, self.block(j)


def filter_mask(n: int, pct: int) -> np.ndarray:
    """(n,) bool, a pseudo-random ``pct`` percent of the rows (a hash of the row)."""
    r = np.arange(n, dtype=np.uint64)
    return ((r * np.uint64(2654435761)) % np.uint64(1000003)) % np.uint64(100) < np.uint64(pct)


def first_pass(vec: Vectors, nq: int, seed: int):
    """sq8 range, queries and exact float32 ground truth (top 100; top 10 per filter)."""
    rng = np.random.default_rng([seed, 3, vec.n])
    src = np.sort(rng.choice(vec.n, nq, replace=False))
    lo_v = np.full(DIM, np.inf, np.float32)
    hi_v = np.full(DIM, -np.inf, np.float32)
    q = np.zeros((nq, DIM), np.float32)
    keys = {"all": 100, **{f: 10 for f in FILTERS}}
    best = {f: (np.full((nq, 0), -np.inf, np.float32), np.zeros((nq, 0), np.int64)) for f in keys}
    masks = {f: filter_mask(vec.n, pct) for f, pct in FILTERS.items()}
    # queries first (their source rows may lie in any block)
    for lo, x in vec.blocks():
        sel = (src >= lo) & (src < lo + len(x))
        q[sel] = x[src[sel] - lo]
    qn = np.random.default_rng([seed, 4]).standard_normal((nq, DIM), dtype=np.float32)
    q = _unit(q + qn * np.float32(QUERY_NOISE / math.sqrt(DIM)))
    for lo, x in vec.blocks():
        np.minimum(lo_v, x.min(0), out=lo_v)
        np.maximum(hi_v, x.max(0), out=hi_v)
        sc = q @ x.T
        rows = np.arange(lo, lo + len(x))
        for f, k in keys.items():
            s = sc if f == "all" else np.where(masks[f][lo:lo + len(x)], sc, -np.inf)
            bs, bi = best[f]
            cs = np.concatenate([bs, s], 1)
            ci = np.concatenate([bi, np.broadcast_to(rows, s.shape)], 1)
            part = np.argpartition(-cs, k - 1, axis=1)[:, :k]
            best[f] = (np.take_along_axis(cs, part, 1), np.take_along_axis(ci, part, 1))
    truth = {}
    for f, (s, i) in best.items():
        order = np.argsort(-s, axis=1, kind="stable")
        truth[f] = np.take_along_axis(i, order, 1)
    return q, lo_v, hi_v, truth


def recall(ids: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(ids[r, :k].tolist()) & set(truth[r, :k].tolist())) / k for r in range(len(ids))]))


def run_size(n: int, args, out: list[str]) -> dict:
    import faiss
    import numba

    from hybridsearch.retrievers import dense as dense_mod
    from hybridsearch.retrievers.dense import DenseIndex, auto_factory
    from hybridsearch.retrievers.dense_store import DenseStore, DenseWriter, sq8_params

    threads = numba.get_num_threads()
    folder = Path(args.work) / f"n{n}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    vec = Vectors(n, args.seed)
    t0 = time.perf_counter()
    q, lo_v, hi_v, truth = first_pass(vec, args.queries, args.seed)
    t_truth = time.perf_counter() - t0
    t0 = time.perf_counter()
    with DenseWriter(folder, DIM, "sq8", params=sq8_params(lo_v, hi_v)) as w:
        for _, x in vec.blocks():
            w.append(x)
    t_store = time.perf_counter() - t0
    store = DenseStore.open(folder, n, DIM, "sq8")
    factory = auto_factory(n)
    t0 = time.perf_counter()
    di = DenseIndex.build_from(store, "auto")
    di.save(folder)
    t_build = time.perf_counter() - t0
    del di
    ours = DenseIndex.load(folder, store, factory, use_gpu=False)
    ann = factory != "Flat"
    print(f"n={n}: truth {t_truth:.0f}s, store {t_store:.0f}s, build {factory} {t_build:.0f}s, rss {rss_mib():.0f} MiB",
          flush=True)
    ef, npr = dense_mod.search_effort(10, 1.0)
    ivf = factory.startswith("IVF")
    # memory-mapped like ours (the same pages): bare FAISS pays nothing ours does not
    bare_ann = dense_mod.read_faiss(folder / "dense.faiss") if ann else None
    t0 = time.perf_counter()
    if n <= 200_000:
        flat_name = "FAISS Flat (IndexFlatIP, float32)"
        bare_flat = faiss.IndexFlatIP(DIM)
    else:
        flat_name = "FAISS Flat (IndexScalarQuantizer SQ8, exhaustive)"
        bare_flat = faiss.IndexScalarQuantizer(DIM, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        bare_flat.train(np.stack([lo_v, hi_v]))
    for _, x in vec.blocks():
        bare_flat.add(x)
    t_flat = time.perf_counter() - t0
    print(f"n={n}: bare flat {t_flat:.0f}s, rss {rss_mib():.0f} MiB", flush=True)
    hparams = faiss.SearchParametersIVF(nprobe=npr) if ivf else faiss.SearchParametersHNSW(efSearch=ef)

    systems = {
        "ours (auto)": lambda qq, k: ours.search(qq, k),
        "ours exact (Flat)": lambda qq, k: store.search(qq, k),
        flat_name: lambda qq, k: bare_flat.search(qq, k),
    }
    if ann:
        label = f"FAISS IVF (same file, nprobe {npr})" if ivf else f"FAISS HNSW (same file, efSearch {ef})"
        systems[label] = lambda qq, k: bare_ann.search(qq, k, params=hparams)
    res = {name: {} for name in systems}
    faiss.omp_set_num_threads(1)
    numba.set_num_threads(1)
    try:
        for k in (10, 100):
            for name, fn in systems.items():
                _, ids = fn(q, k)
                res[name][f"recall@{k}"] = recall(np.asarray(ids), truth["all"], k)
                if k == 100:  # the hybrid asks each channel for 100: how good is their top 10
                    res[name]["recall@10 of 100"] = recall(np.asarray(ids), truth["all"], 10)
            lat = interleaved({name: ((lambda i, fn=fn, k=k: fn(q[i:i + 1], k)), len(q))
                               for name, fn in systems.items()}, args.rounds)
            for name in systems:
                res[name][f"p50@{k}"], res[name][f"p99@{k}"] = lat[name].p50, lat[name].p99
            ratios = np.asarray(lat["ours (auto)"].p50s) / np.asarray(lat[flat_name].p50s)
            res["ours (auto)"][f"vs_flat@{k}"] = float(np.median(ratios))
        # filters: ours against the exact ground truth over the allowed rows
        for f, pct in FILTERS.items():
            mask = filter_mask(n, pct)
            _, ids = ours.search(q, 10, mask)
            ok = bool(mask[ids[ids >= 0]].all()) and bool((ids >= 0).all())
            lat = interleaved({"f": (lambda i: ours.search(q[i:i + 1], 10, mask), len(q))}, args.rounds)
            res["ours (auto)"][f"filter {f}"] = (recall(ids, truth[f], 10), lat["f"].p50, ok)
    finally:
        faiss.omp_set_num_threads(threads)
        numba.set_num_threads(threads)
    # batches: every query at once, all threads, rounds interleaved
    qps = {name: [] for name in systems}
    for name, fn in systems.items():
        fn(q[:4], 10)
    for _ in range(args.rounds):
        for name, fn in systems.items():
            t0 = time.perf_counter()
            fn(q, 10)
            qps[name].append(len(q) / (time.perf_counter() - t0))
    files = sorted(p for p in folder.iterdir())
    store_bytes = sum(p.stat().st_size for p in files if p.name.startswith("dense_sq8"))
    ann_bytes = (folder / "dense.faiss").stat().st_size if ann else 0
    out.append(f"\n## {n:,} vectors x {DIM}\n")
    out.append(f"Structure chosen by `auto`: `{factory}`. Build (train + add over the stored codes, "
               f"from the sq8 store as a merge does): **{t_build:.1f} s**; bare FAISS Flat add: {t_flat:.1f} s. "
               f"Bytes: sq8 store {store_bytes / 2**20:,.0f} MiB + `dense.faiss` {ann_bytes / 2**20:,.0f} MiB "
               f"(bare Flat holds {bare_flat.code_size * n / 2**20:,.0f} MiB). "
               f"Process RSS at the end: {rss_mib():,.0f} MiB.\n")
    rows = []
    for name in systems:
        r = res[name]
        rows.append([name, r["p50@10"], r["p99@10"], r["recall@10"], r["p50@100"], r["recall@100"],
                     r["recall@10 of 100"], float(np.median(qps[name]))])
    out.append(table(["system", "p50 ms (k=10)", "p99 ms (k=10)", "recall@10", "p50 ms (k=100)", "recall@100",
                      "recall@10 (k=100)", "batch q/s (k=10)"], rows))
    o = res["ours (auto)"]
    out.append(f"\nours / {flat_name.split(' (')[0]} p50 (median of per-round ratios): k=10 {o['vs_flat@10']:.3f}, "
               f"k=100 {o['vs_flat@100']:.3f}.\n")
    frows = [[f, o[f"filter {f}"][1], o[f"filter {f}"][0], "yes" if o[f"filter {f}"][2] else "NO"] for f in FILTERS]
    out.append("Filtered (ours, k=10, one thread; recall against the exact top-10 of the allowed rows):\n")
    out.append(table(["allowed rows", "p50 ms", "recall@10", "10 allowed hits, none disallowed"], frows))
    systems.clear()
    ours = bare_ann = bare_flat = store = None  # release the mappings before the folder goes
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return {"n": n, "factory": factory, "build_s": t_build, "results": res}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(Path(__file__).resolve().parent / ".cache" / "dense_scale"))
    ap.add_argument("--keep", action="store_true", help="keep the built folders")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "dense_scale.md"))
    args = ap.parse_args(argv)
    from hybridsearch.retrievers import dense as dense_mod

    out = ["# Dense structure by segment size (`dense_factory=\"auto\"`) against bare FAISS\n",
           machine_info(("hybridsearch", "numpy", "numba", "faiss-cpu")) + "\n",
           f"Command: `python bench/bench_dense_scale.py --sizes {' '.join(map(str, args.sizes))} "
           f"--queries {args.queries} --rounds {args.rounds}`. The machine was shared with other jobs "
           "(two cores): compare figures within one table, not across runs.\n",
           f"`auto`: exact scan below {dense_mod.AUTO_ANN_MIN_ROWS:,} rows, `{dense_mod.AUTO_ANN}` below "
           f"{dense_mod.AUTO_IVF_MIN_ROWS:,}, `IVF{{2 sqrt(n)}},SQ8` above; search effort (efSearch, nprobe) at "
           f"k=10: {dense_mod.search_effort(10, 1.0)}, at k=100: {dense_mod.search_effort(100, 1.0)}; "
           f"{dense_mod.RESCORE_FACTOR} x k rows rescored from the store. "
           "p50/p99: single queries, one thread, median over rounds.\n"]
    for n in args.sizes:
        run_size(n, args, out)
        Path(args.out).write_text("\n".join(out) + "\n")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
