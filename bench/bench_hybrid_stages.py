"""Where one hybrid query's time goes on a kept ``bench_scale_m3.py`` index: each first stage at the
hybrid's depth (dense, learned sparse, BM25), the union's exact rescoring per channel (dense,
sparse, ColBERT MaxSim), and the whole ``search(mode="hybrid")``, interleaved query by query.

Usage::

    python bench/bench_hybrid_stages.py RUN_FOLDER [--queries 30] [--rounds 3] [--query-tokens N]
                                        [--json OUT.json]

It also times every query in one ``search_batch`` call under the BLAS scope of today (one BLAS
thread for hybrid batches) and of before (BLAS threads from 4 queries), taking turns.

``RUN_FOLDER`` is what ``bench_scale_m3.py --keep`` leaves (``index/``, ``queries/``, ``build.json``).
Stages call the index's private first-stage methods (the same ones ``search`` runs, under the same
one-BLAS-thread scope); medians in ms. Then ``search`` alone, query after query, gives the p50 and p99
a user sees (stage calls in between would leave BLAS threads spinning).
``--query-tokens N`` keeps each query's first ``N`` ColBERT vectors (the generated queries have 32;
BGE-M3 gives one a token after CLS: the XLM-R tokenizer's median is 22 for SciFact's test queries and
16-17 for XQuAD-R's, p90 36 and 25).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--query-tokens", type=int, default=0,
                    help="keep each query's first N ColBERT vectors (0: all, as generated)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from suite.scale_m3 import Queries, Shape, load_encoder

    from hybridsearch import HybridIndex
    from hybridsearch.retrievers.multivector import maxsim_many

    build = json.loads((args.run / "build.json").read_text())
    model = HERE / ".cache" / "m3-shape-d1024-c1024-v250002-l1"
    idx = HybridIndex.open(args.run / "index", load_encoder(model))
    Q = Queries.load(args.run / "queries", Shape(), int(build["docs"]))
    state = idx._current()
    C = idx.default_candidates()
    nq = min(args.queries, len(Q))
    names = ["dense first stage", "sparse first stage", "bm25 first stage", "union",
             "rescore dense", "rescore sparse", "rescore colbert", "search(mode='hybrid')"]
    T = {n: [] for n in names}
    unions = []
    try:  # what search() runs a single query under (absent before 2026-12-07 evening)
        from hybridsearch._blas import one_blas_thread
    except ImportError:
        one_blas_thread = nullcontext
    for rnd in range(args.rounds + 1):  # round 0 warms caches and compiles
        for i in range(nq):
            q = Q.row(i)
            if args.query_tokens:
                q = _first_tokens(q, args.query_tokens)
            with one_blas_thread():  # the stages as search() runs them
                t = [time.perf_counter()]
                d = idx._dense_topk(state, q.dense, C, None)
                t.append(time.perf_counter())
                s = idx._sparse_topk(state, q.sparse, C, None)
                t.append(time.perf_counter())
                b = idx._bm25_topk(state, [Q.texts[i]], C, None)
                t.append(time.perf_counter())
                union = np.unique(np.concatenate([ids[0][ids[0] >= 0] for _, ids in (d, s, b)]))
                t.append(time.perf_counter())
                seg_of = state.locate(union)
                parts = []
                for si in np.unique(seg_of):
                    sg = state.segments[si]
                    parts.append((sg, sg.rows_of(union[seg_of == si])))
                for sg, rows in parts:
                    sg.dense_rows(rows) @ q.dense[0]
                t.append(time.perf_counter())
                for sg, rows in parts:
                    sg.sparse.score(q.sparse.indices, q.sparse.data, rows)
                t.append(time.perf_counter())
                maxsim_many(q.colbert_of(0), [(sg.colbert, rows) for sg, rows in parts])
                t.append(time.perf_counter())
            idx.search(Q.texts[i], k=10, mode="hybrid", query_encoded=q)
            t.append(time.perf_counter())
            if rnd:
                for n, a, z in zip(names, t, t[1:]):
                    T[n].append(1000 * (z - a))
                unions.append(len(union))
    # The whole search alone, query after query (no stage calls in between), per round.
    alone = []
    rows = [(Q.texts[i], _first_tokens(Q.row(i), args.query_tokens) if args.query_tokens else Q.row(i))
            for i in range(nq)]
    for rnd in range(args.rounds + 1):
        lat = []
        for text, q in rows:
            a = time.perf_counter()
            idx.search(text, k=10, mode="hybrid", query_encoded=q)
            lat.append(1000 * (time.perf_counter() - a))
        if rnd:
            alone.append((float(np.percentile(lat, 50)), float(np.percentile(lat, 99))))
    # Batched: every query in one search_batch call, under today's BLAS scope (one BLAS thread for
    # hybrid batches) and under the rule before 2026-12-07 evening (BLAS threads from 4 queries),
    # taking turns round by round.
    batch = {}
    try:
        if args.query_tokens:  # the batch is timed on the queries as generated only
            raise ImportError
        from hybridsearch import _blas
        from hybridsearch.index import hybrid as hybrid_mod

        texts = [t for t, _ in rows]
        enc = Queries(Q.dense[:nq], Q.sparse[:nq], Q.colbert[:Q.colbert_offsets[nq]], Q.colbert_offsets[:nq + 1],
                      Q.texts[:nq], Q.sources[:nq]).encoded()
        policies = {"one BLAS thread (now)": _blas.search_scope,
                    "BLAS threads from 4 queries (before)": lambda mode, n: (
                        _blas.one_blas_thread() if n < _blas.BLAS_THREADS_FROM else nullcontext())}
        qps = {p: [] for p in policies}
        for rnd in range(args.rounds + 1):
            for p, fn in policies.items():
                hybrid_mod.search_scope = fn
                a = time.perf_counter()
                idx.search_batch(texts, k=10, mode="hybrid", query_encoded=enc)
                if rnd:
                    qps[p].append(nq / (time.perf_counter() - a))
        hybrid_mod.search_scope = _blas.search_scope
        batch = {p: float(np.median(v)) for p, v in qps.items()}
    except (ImportError, AttributeError):  # code before search_scope
        pass
    med = {n: float(np.median(v)) for n, v in T.items()}
    stages = {"dense": med["dense first stage"], "sparse": med["sparse first stage"],
              "bm25": med["bm25 first stage"], "colbert rescoring": med["rescore colbert"],
              "rest": max(0.0, med["search(mode='hybrid')"] - max(med["dense first stage"],
                          med["sparse first stage"] + med["bm25 first stage"]) - med["rescore colbert"])}
    out = {"docs": build["docs"], "queries": nq, "rounds": args.rounds, "candidates": C,
           "query_tokens": args.query_tokens or "all",
           "search_alone": {"p50": float(np.median([a[0] for a in alone])),
                            "p99": float(np.median([a[1] for a in alone])), "rounds": alone},
           "union_median": float(np.median(unions)), "median_ms": med, "stages": stages,
           "batch_queries_per_s": batch}
    for n in names:
        print(f"{n:24s} {med[n]:8.2f} ms")
    print(f"union median {out['union_median']:.0f} documents")
    print(f"search alone, p50 {out['search_alone']['p50']:.2f} ms, p99 {out['search_alone']['p99']:.2f} ms "
          f"(medians over {args.rounds} rounds of {nq} queries)")
    for p, v in batch.items():
        print(f"search_batch of {nq} hybrid queries, {p}: {v:.1f} queries/s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    idx.close()
    return 0


def _first_tokens(q, n: int):
    """``q`` (one query's Encoded) with its first ``n`` ColBERT vectors only."""
    from hybridsearch.representations import Encoded

    m = min(n, len(q.colbert))
    return Encoded(dense=q.dense, sparse=q.sparse, colbert=q.colbert[:m],
                   colbert_offsets=np.array([0, m], np.int64), n_tokens=np.array([m + 1], np.int64))


if __name__ == "__main__":
    raise SystemExit(main())
