"""BM25 on our own postings (``retrievers/bm25_postings.py``) against bm25s, and its quality.

Usage::

    python bench/bench_bm25_postings.py [--sizes 100000 1000000] [--queries 200] [--rounds 5]
        [--batch 100] [--scifact ../shared/data/scifact] [--tantivy-max 100000] [--out FILE]

Synthetic part: ~60-word documents from the scale section's Zipf generator
(``bench_index_scale.synth_texts``), queries of 8 words from the same generator. Each system is
built once per size; then single-query latency (one query per call, query analysis / tokenisation
included, top-10) over ``--queries`` queries and batched throughput (``--batch`` queries in one
call) are timed in ``--rounds`` interleaved rounds; p50/p99 and queries/s are medians over rounds
and ratios are ours / theirs per round, then the median. bm25s: method "lucene", k1 1.2, b 0.75,
no stopwords (the scale section's setting), its numpy backend and its numba backend on the same
index. Both sides use numba's default thread count. Tantivy (our previous BM25 channel) is timed
too up to ``--tantivy-max`` documents.

SciFact part: nDCG@10 and Recall@100 of the postings channel against the tantivy channel (same
analysis; k1 1.2, b 0.75), test split.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index_scale import synth_texts  # noqa: E402
from common import machine_info, table  # noqa: E402

from hybridsearch.retrievers import bm25_postings as bp  # noqa: E402
from hybridsearch.retrievers.bm25 import BM25Index  # noqa: E402

K = 10


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def scifact(folder: Path) -> list[list]:
    from hybridsearch.evaluation import evaluate, load_beir

    corpus, queries, qrels = load_beir(folder, "test")
    doc_ids = list(corpus)
    texts = [corpus[d]["title"] + " " + corpus[d]["text"] for d in doc_ids]
    qids = [q for q in qrels if q in queries]
    qtexts = [queries[q] for q in qids]
    p = bp.Bm25Postings.from_texts(texts)
    tan = BM25Index.in_memory()
    tan.add(np.arange(len(texts)), texts)
    tan.commit()
    rows = []
    for name, ids in (("hybridsearch BM25 postings (this change)", bp.search([p], qtexts, 100)[0][1]),
                      ("hybridsearch BM25Index (tantivy, before)", tan.search(qtexts, 100)[1])):
        run = {q: [doc_ids[i] for i in row if i >= 0] for q, row in zip(qids, ids)}
        m = evaluate(run, qrels, ks=(10, 100))
        rows.append([name, round(m["ndcg@10"], 4), round(m["recall@100"], 4)])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--tantivy-max", type=int, default=100_000)
    ap.add_argument("--scifact", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bm25_postings.md")
    args = ap.parse_args(argv)

    import bm25s
    import numba

    load_before = os.getloadavg()[0]
    build_rows, lat_rows, ratio_rows, agree_rows = [], [], [], []
    for n in args.sizes:
        rng = np.random.default_rng(n)
        texts = synth_texts(n, rng)
        qtexts = [" ".join(t.split()[:8]) for t in synth_texts(max(args.queries, args.batch), rng)]
        key = f"{n:,}"
        print(f"{key}: building", file=sys.stderr)

        r0, t = _rss_mib(), time.perf_counter()
        ours = bp.Bm25Postings.from_texts(texts)
        build_rows.append([key, "hybridsearch BM25 postings", time.perf_counter() - t, _rss_mib() - r0])
        gc.collect()
        r0, t = _rss_mib(), time.perf_counter()
        retr = bm25s.BM25(method="lucene", k1=1.2, b=0.75)
        retr.index(bm25s.tokenize(texts, stopwords=None, show_progress=False), show_progress=False)
        build_rows.append([key, f"bm25s {bm25s.__version__}", time.perf_counter() - t, _rss_mib() - r0])
        retr_nb = copy.copy(retr)  # the same index, searched by bm25s' numba backend
        retr_nb.backend = "numba"
        tan = None
        if n <= args.tantivy_max:
            t = time.perf_counter()
            tan = BM25Index.in_memory()
            tan.add(np.arange(n), texts)
            tan.commit()
            build_rows.append([key, "hybridsearch BM25Index (tantivy, before)", time.perf_counter() - t, float("nan")])
        del texts
        gc.collect()

        def tok(qs):
            return bm25s.tokenize(qs, stopwords=None, show_progress=False)

        single = {
            "hybridsearch BM25 postings": lambda i: bp.search([ours], [qtexts[i]], K),
            "hybridsearch BM25 postings, no pruning": lambda i: bp.search([ours], [qtexts[i]], K,
                                                                         prune=False),
            "bm25s numpy": lambda i: retr.retrieve(tok([qtexts[i]]), k=K, show_progress=False),
            "bm25s numba": lambda i: retr_nb.retrieve(tok([qtexts[i]]), k=K, show_progress=False),
        }
        batch_q = qtexts[:args.batch]
        batched = {
            "hybridsearch BM25 postings": lambda: bp.search([ours], batch_q, K),
            "hybridsearch BM25 postings, no pruning": lambda: bp.search([ours], batch_q, K,
                                                                       prune=False),
            "bm25s numpy": lambda: retr.retrieve(tok(batch_q), k=K, show_progress=False),
            "bm25s numba": lambda: retr_nb.retrieve(tok(batch_q), k=K, show_progress=False),
        }
        if tan is not None:
            single["tantivy (before)"] = lambda i: tan.search([qtexts[i]], K)
            batched["tantivy (before)"] = lambda: tan.search(batch_q, K)

        # Agreement with bm25s (exact lengths there, one-byte field norms here): top-10 overlap.
        mine = bp.search([ours], batch_q, K)[0][1]
        theirs = np.asarray(retr_nb.retrieve(tok(batch_q), k=K, show_progress=False)[0])
        overlap = np.mean([len(set(a[a >= 0]) & set(b)) / max(1, min(K, (a >= 0).sum()))
                           for a, b in zip(mine, theirs)])
        agree_rows.append([key, "top-10 overlap, ours vs bm25s", round(float(overlap), 3)])

        print(f"{key}: timing", file=sys.stderr)
        for fn in single.values():
            fn(0)
        for fn in batched.values():
            fn()
        p50 = {s: [] for s in single}
        p99 = {s: [] for s in single}
        qps = {s: [] for s in batched}
        for _ in range(args.rounds):
            for s, fn in single.items():
                ts = np.empty(args.queries)
                for i in range(args.queries):
                    t = time.perf_counter()
                    fn(i)
                    ts[i] = time.perf_counter() - t
                p50[s].append(1e3 * np.percentile(ts, 50))
                p99[s].append(1e3 * np.percentile(ts, 99))
            for s, fn in batched.items():
                t = time.perf_counter()
                fn()
                qps[s].append(len(batch_q) / (time.perf_counter() - t))
        for s in single:
            lat_rows.append([key, s, float(np.median(p50[s])), float(np.median(p99[s])),
                             float(np.median(qps[s]))])
        me = "hybridsearch BM25 postings"
        for s in single:
            if s == me:
                continue
            r_single = float(np.median(np.asarray(p50[me]) / np.asarray(p50[s])))
            r_batch = float(np.median(np.asarray(qps[s]) / np.asarray(qps[me])))
            ratio_rows.append([key, s, r_single, r_batch])
        single = batched = ours = retr = retr_nb = tan = None  # free before the next size
        gc.collect()

    sci = scifact(args.scifact) if args.scifact.exists() else []
    md = [
        "# BM25 on our own postings vs bm25s",
        "",
        f"{machine_info(('hybridsearch', 'numpy', 'numba', 'tantivy', 'bm25s'))} "
        f"numba threads {numba.get_num_threads()}. 1-minute load average {load_before:.1f} before "
        f"the run, {os.getloadavg()[0]:.1f} after: the machine was shared with other work, so "
        "only the ratios (measured in the same interleaved rounds) are comparable.",
        "",
        f"Command: `python bench/bench_bm25_postings.py --sizes {' '.join(map(str, args.sizes))} "
        f"--queries {args.queries} --rounds {args.rounds} --batch {args.batch}`. Synthetic ~60-word "
        "Zipf documents, 8-word queries, top-10, query analysis included on every side.",
        "",
        "## Build",
        "",
        table(["docs", "system", "build s", "RSS growth MiB"], build_rows),
        "",
        "## Query speed (medians over interleaved rounds)",
        "",
        table(["docs", "system", "single p50 ms", "single p99 ms", f"batched queries/s ({args.batch} a call)"],
              lat_rows),
        "",
        "Ratios, ours against each (below 1: ours faster; median over rounds of the per-round ratio):",
        "",
        table(["docs", "against", "single p50: ours / theirs", "batched time: ours / theirs"], ratio_rows),
        "",
        table(["docs", "check", "value"], agree_rows),
        "",
    ]
    if sci:
        md += ["## SciFact (test split, 300 queries)", "",
               table(["system", "nDCG@10", "Recall@100"], sci), ""]
    text = "\n".join(md)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
