"""Scale curves on synthetic data: build rate, query latency per channel and hybrid, bytes per
document and memory, for hybridsearch and, on the same vectors and texts in the same run, every
channel's anchor: bare FAISS Flat and HNSW32 (dense), bm25s with its numpy and numba backends
(BM25), our exhaustive term-at-a-time kernel (learned sparse), the exhaustive MaxSim over every
token (ColBERT) and Milvus Lite (dense + learned sparse + BM25, ``hybrid_search``): p50/p99 of
single queries, batched throughput, and recall@10 of ours against the exact anchors.

The synthetic corpus is ``bench_index_scale.synth``: dense d=384 unit vectors, learned-sparse
weights over a 250k vocabulary (~40 terms a document), ColBERT d=128 (~48 vectors a document)
and ~60-word Zipf texts. Query representations are precomputed, so these are the engines' own
costs; the encoder is measured in its own section.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import milvus as mv
from .report import Section, interleaved, ratio, rss_mib, version

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_index_scale import D, _row, _rows, make_model, query_set, synth  # noqa: E402
from common import table  # noqa: E402

from hybridsearch import BGEM3Encoder, HybridIndex  # noqa: E402


def _data(n: int, colbert: bool):
    """Synthetic documents in 100k chunks (returned whole: dense, CSR, ColBERT, texts)."""
    import scipy.sparse as sp

    from hybridsearch.representations import Encoded

    rng = np.random.default_rng(n)
    parts, texts = [], []
    for s in range(0, n, 100_000):
        e, t = synth(min(100_000, n - s), rng, colbert)
        parts.append(e)
        texts += t
    if len(parts) == 1:
        return parts[0], texts
    cb = off = None
    if colbert:
        cb = np.concatenate([p.colbert for p in parts])
        lens = np.concatenate([np.diff(p.colbert_offsets) for p in parts])
        off = np.zeros(n + 1, np.int64)
        np.cumsum(lens, out=off[1:])
    enc = Encoded(dense=np.concatenate([p.dense for p in parts]),
                  sparse=sp.vstack([p.sparse for p in parts]).tocsr() if colbert else None,
                  colbert=cb, colbert_offsets=off, n_tokens=np.concatenate([p.n_tokens for p in parts]))
    return enc, texts


def _many(idx, texts, **kw):
    """One call for a batch of queries (``search_batch`` where the index has it)."""
    fn = getattr(idx, "search_batch", None)
    return fn(list(texts), **kw) if fn is not None else idx.search(list(texts), **kw)


def _recall(found: list[list], truth: list[list]) -> float:
    """Mean over queries of |found & truth| / |truth| (queries with an empty truth skipped)."""
    r = [len(set(f) & set(t)) / len(t) for f, t in zip(found, truth) if t]
    return float(np.mean(r)) if r else float("nan")


def _taat_topk(idx, q, k):
    """Our exhaustive term-at-a-time sparse kernel over every segment (a private path: the
    public search picks its kernel itself), merged into docnos."""
    from hybridsearch.index.hybrid import _docnos

    state = idx._current()
    parts = [(sc, _docnos(sg, ix)) for sg in state.segments
             for sc, ix in [sg.sparse.search(q, k, sg.rows_mask(None), kernel="taat")]]
    return idx._merge(parts, q.shape[0], k)


def run(cfg, tmp_root: Path, log) -> Section:
    import faiss

    sizes, nq, rounds = cfg.sizes, cfg.queries, cfg.rounds
    build_rows, lat_rows, cmp_rows, mem_rows, batch_rows, notes, losses = [], [], [], [], [], [], []
    recall_rows, qps_rows, structures = [], [], []
    data = {"sizes": [], "latency": {}, "build": {}, "bytes": {}, "recall": {}, "qps": {}}
    hnsw_max = getattr(cfg, "hnsw_max", 100_000)
    exhaustive_q = getattr(cfg, "exhaustive_queries", 10)
    have_bm25s = version("bm25s") is not None
    have_milvus = mv.available()
    with tempfile.TemporaryDirectory(dir=tmp_root) as mtmp:
        models = {True: make_model(Path(mtmp) / "m3", colbert=True),
                  False: make_model(Path(mtmp) / "dense", colbert=False)}
        for n in sizes:
            t_size = time.perf_counter()
            colbert = n <= cfg.colbert_max
            log(f"scale: {n:,} docs ({'all channels' if colbert else 'dense+BM25'}): generating")
            enc, texts = _data(n, colbert)
            qenc, qtexts = query_set(nq, np.random.default_rng(7), colbert)
            data["sizes"].append(n)
            key = f"{n:,}"
            with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
                # ---- builds, one after the other; RSS growth of this process while each builds
                gc.collect()
                idx = HybridIndex.create(Path(tmp) / "ours", BGEM3Encoder(models[colbert], device="cpu"))
                t = time.perf_counter()
                for s in range(0, n, 100_000):
                    e = slice(s, min(n, s + 100_000))
                    part = enc if n <= 100_000 else _rows(enc, e.start, e.stop)
                    idx.add([{"id": f"d{i}", "text": texts[i]} for i in range(e.start, e.stop)], encoded=part,
                            show_progress=False)
                t_ours = time.perf_counter() - t
                st = idx.stats()
                disk_ours = sum(v["bytes"] for v in st["channel_bytes"].values())
                build_rows.append([key, "hybridsearch (" + "+".join(idx.channels) + ")", t_ours, n / t_ours])
                data["build"].setdefault("hybridsearch", []).append(n / t_ours)
                log(f"scale: {n:,}: ours built in {t_ours:.1f} s")

                gc.collect()
                r0 = rss_mib()
                flat = faiss.IndexFlatIP(D)
                t = time.perf_counter()
                flat.add(enc.dense)
                t_faiss = time.perf_counter() - t
                build_rows.append([key, "bare FAISS IndexFlatIP (dense only)", t_faiss, n / t_faiss])
                mem_faiss = rss_mib() - r0
                hnsw = None
                if n <= hnsw_max:
                    hnsw = faiss.IndexHNSWFlat(D, 32, faiss.METRIC_INNER_PRODUCT)
                    t = time.perf_counter()
                    hnsw.add(enc.dense)
                    t_h = time.perf_counter() - t
                    hnsw.hnsw.efSearch = 128  # ours searches its HNSW segments with efSearch 128 too
                    build_rows.append([key, "bare FAISS IndexHNSWFlat M=32 (dense only)", t_h, n / t_h])
                    data["build"].setdefault("bare FAISS HNSW32", []).append(n / t_h)
                else:
                    notes.append(f"Bare FAISS HNSW32 was not built at {key} documents (its build there would "
                                 f"take most of this run's time; --hnsw-max {hnsw_max:,}).")
                structures.append([key, ", ".join(f"{s_.dense_factory} ({s_.count:,} rows)"
                                                  for s_ in idx._current().segments)])

                retr = retr_nb = None
                if have_bm25s:
                    import bm25s

                    gc.collect()
                    r0 = rss_mib()
                    t = time.perf_counter()
                    retr = bm25s.BM25(method="lucene", k1=1.2, b=0.75)
                    retr.index(bm25s.tokenize(texts, stopwords=None, show_progress=False), show_progress=False)
                    t_b = time.perf_counter() - t
                    mem_bm25s = rss_mib() - r0
                    build_rows.append([key, f"bm25s {version('bm25s')} (BM25 only)", t_b, n / t_b])
                    data["build"].setdefault("bm25s", []).append(n / t_b)
                    retr_nb = None
                    if version("numba"):  # bm25s' fastest query path: same index, numba backend
                        retr_nb = bm25s.BM25(method="lucene", k1=1.2, b=0.75, backend="numba")
                        retr_nb.index(bm25s.tokenize(texts, stopwords=None, show_progress=False),
                                      show_progress=False)

                mil = None
                if have_milvus and n <= cfg.milvus_max:
                    gc.collect()
                    mil = mv.MilvusLite(Path(tmp) / "milvus", D, sparse=colbert, bm25=True)
                    t_m = mil.insert(enc.dense, texts, enc.sparse if colbert else None)
                    build_rows.append([key, f"Milvus Lite {version('milvus-lite')} ({'+'.join(mil.channels)}), "
                                       "insert + flush", t_m, n / t_m])
                    data["build"].setdefault("Milvus Lite", []).append(n / t_m)
                    log(f"scale: {n:,}: Milvus Lite built in {t_m:.1f} s")
                elif have_milvus:
                    notes.append(f"Milvus Lite was not run at {key} documents: at the insert rate it showed at "
                                 f"smaller sizes and ~1 s+ per hybrid query there, it would not fit this run's time "
                                 f"box (--milvus-max {cfg.milvus_max:,}).")

                # ---- queries, interleaved rounds
                systems = {}

                def ours(mode):
                    return lambda i: idx.search(qtexts[i], k=10, mode=mode, query_encoded=_row(qenc, i))

                modes = ["dense", "bm25", "hybrid"] + (["sparse", "colbert"] if colbert else [])
                for m in modes:
                    systems[f"hybridsearch {m}"] = (ours(m), nq)
                threads = faiss.omp_get_max_threads()
                systems["bare FAISS dense (1 thread)"] = (lambda i: flat.search(qenc.dense[i:i + 1], 10), nq)
                if hnsw is not None:
                    systems["bare FAISS HNSW32 (1 thread)"] = (lambda i: hnsw.search(qenc.dense[i:i + 1], 10), nq)
                if colbert:
                    systems["sparse, exhaustive term-at-a-time kernel"] = (
                        lambda i: _taat_topk(idx, qenc.sparse[i:i + 1], 10), nq)
                    nx = min(nq, exhaustive_q)
                    systems["ColBERT, exhaustive MaxSim over every token"] = (
                        lambda i: idx.search(qtexts[i], k=10, mode="colbert", query_encoded=_row(qenc, i),
                                             exhaustive=True), nx)
                if retr is not None:
                    systems["bm25s BM25"] = (lambda i: retr.retrieve(
                        bm25s.tokenize(qtexts[i:i + 1], stopwords=None, show_progress=False), k=10,
                        show_progress=False), nq)
                    if retr_nb is not None:
                        systems["bm25s BM25 (numba backend)"] = (lambda i: retr_nb.retrieve(
                            bm25s.tokenize(qtexts[i:i + 1], stopwords=None, show_progress=False), k=10,
                            show_progress=False), nq)
                if mil is not None:
                    mq = min(nq, cfg.milvus_queries(n))
                    qsp = [mv._sparse_row(qenc.sparse, i) for i in range(nq)] if colbert else None
                    systems["Milvus Lite dense"] = (lambda i: mil.search("dense", dense=qenc.dense[i]), mq)
                    systems["Milvus Lite BM25"] = (lambda i: mil.search("bm25", text=qtexts[i]), mq)
                    if colbert:
                        systems["Milvus Lite sparse"] = (lambda i: mil.search("sparse", sparse=qsp[i]), mq)
                    ch = mil.channels
                    w = {"dense": 0.4, "sparse": 0.2, "bm25": 0.4} if colbert else {"dense": 0.5, "bm25": 0.5}
                    systems["Milvus Lite hybrid (weighted)"] = (lambda i: mil.hybrid(
                        ch, dense=qenc.dense[i], sparse=qsp[i] if qsp else None, text=qtexts[i],
                        weights=[w[c] for c in ch]), mq)
                    systems["Milvus Lite hybrid (RRF)"] = (lambda i: mil.hybrid(
                        ch, dense=qenc.dense[i], sparse=qsp[i] if qsp else None, text=qtexts[i], rrf_k=60), mq)
                log(f"scale: {n:,}: timing {len(systems)} query paths, {rounds} interleaved rounds")
                faiss.omp_set_num_threads(1)  # the bare FAISS row; ours already runs single queries on 1 thread
                try:
                    lat = interleaved(systems, rounds)
                finally:
                    faiss.omp_set_num_threads(threads)
                for name, (_, q) in systems.items():
                    lat_rows.append([key, name, lat[name].p50, lat[name].p99, q])
                    data["latency"].setdefault(name, {})[n] = lat[name].p50

                def cmp(what, mine, theirs):
                    if theirs not in lat:
                        return
                    r = ratio(lat[mine], lat[theirs])
                    cmp_rows.append([key, what, mine, theirs, lat[mine].p50, lat[theirs].p50, r])
                    if r > 1.0:
                        losses.append(f"{key} docs, {what}: {mine} p50 {lat[mine].p50:.3g} ms vs {theirs} "
                                      f"{lat[theirs].p50:.3g} ms ({r:.2f}x slower"
                                      + (", within noise)" if r < 1.1 else ")"))

                cmp("dense top-10", "hybridsearch dense", "bare FAISS dense (1 thread)")
                cmp("dense top-10", "hybridsearch dense", "bare FAISS HNSW32 (1 thread)")
                cmp("learned sparse top-10", "hybridsearch sparse", "sparse, exhaustive term-at-a-time kernel")
                cmp("ColBERT top-10", "hybridsearch colbert", "ColBERT, exhaustive MaxSim over every token")
                cmp("dense top-10", "hybridsearch dense", "Milvus Lite dense")
                cmp("BM25 top-10", "hybridsearch bm25", "bm25s BM25")
                cmp("BM25 top-10", "hybridsearch bm25", "bm25s BM25 (numba backend)")
                cmp("BM25 top-10", "hybridsearch bm25", "Milvus Lite BM25")
                cmp("learned sparse top-10", "hybridsearch sparse", "Milvus Lite sparse")
                cmp("hybrid top-10", "hybridsearch hybrid", "Milvus Lite hybrid (weighted)")
                cmp("hybrid top-10", "hybridsearch hybrid", "Milvus Lite hybrid (RRF)")

                # ---- recall@10 of ours against the exact anchors
                def ids_of(mode, i, **kw):
                    return [h.id for h in idx.search(qtexts[i], k=10, mode=mode, query_encoded=_row(qenc, i),
                                                     **kw)]

                _, exact = flat.search(qenc.dense, 10)
                truth = {"dense": [[f"d{x}" for x in row if x >= 0] for row in exact.tolist()]}
                rec = {"hybridsearch dense vs exact Flat": _recall([ids_of("dense", i) for i in range(nq)],
                                                                   truth["dense"])}
                if hnsw is not None:
                    _, hi = hnsw.search(qenc.dense, 10)
                    rec["bare FAISS HNSW32 vs exact Flat"] = _recall(
                        [[f"d{x}" for x in row if x >= 0] for row in hi.tolist()], truth["dense"])
                if colbert:
                    _, ex = _taat_topk(idx, qenc.sparse[:nq], 10)
                    rec["hybridsearch sparse vs exhaustive term at a time"] = _recall(
                        [ids_of("sparse", i) for i in range(nq)],
                        [[f"d{int(x)}" for x in row if x >= 0] for row in ex.tolist()])
                    nx = min(nq, exhaustive_q)
                    rec[f"hybridsearch colbert vs exhaustive MaxSim ({nx} queries)"] = _recall(
                        [ids_of("colbert", i) for i in range(nx)],
                        [ids_of("colbert", i, exhaustive=True) for i in range(nx)])
                for what, r_ in rec.items():
                    recall_rows.append([key, what, r_])
                    data["recall"].setdefault(what, {})[n] = r_
                    if what.startswith("hybridsearch") and r_ < 0.95:
                        losses.append(f"{key} docs, recall@10: {what} {r_:.3f} (below 0.95)")

                # ---- batched throughput per channel: all queries in one call, interleaved rounds
                batch_all = {f"hybridsearch {m}, one call": (lambda m=m: _many(idx, qtexts, k=10, mode=m,
                                                                                query_encoded=qenc))
                             for m in ("dense", "hybrid") + (("sparse",) if colbert else ())}
                batch_all["bare FAISS Flat, one search()"] = lambda: flat.search(qenc.dense, 10)
                if hnsw is not None:
                    batch_all["bare FAISS HNSW32, one search()"] = lambda: hnsw.search(qenc.dense, 10)
                if colbert:
                    batch_all["sparse exhaustive term-at-a-time kernel, one call"] = (
                        lambda: _taat_topk(idx, qenc.sparse, 10))
                bq = {lbl: [] for lbl in batch_all}
                for fn in batch_all.values():
                    fn()
                for _ in range(rounds):
                    for lbl, fn in batch_all.items():
                        t = time.perf_counter()
                        fn()
                        bq[lbl].append(nq / (time.perf_counter() - t))
                for lbl, v in bq.items():
                    qps_rows.append([key, lbl, float(np.median(v))])
                    data["qps"].setdefault(lbl, {})[n] = float(np.median(v))
                for mine, theirs in (("hybridsearch dense, one call", "bare FAISS Flat, one search()"),
                                     ("hybridsearch sparse, one call",
                                      "sparse exhaustive term-at-a-time kernel, one call")):
                    if mine in bq and theirs in bq and np.median(bq[theirs]) > np.median(bq[mine]):
                        losses.append(f"{key} docs, batched throughput: {theirs} {np.median(bq[theirs]):,.0f} "
                                      f"queries/s vs {mine} {np.median(bq[mine]):,.0f}")

                # ---- batched BM25 throughput: all queries in one call, interleaved rounds
                if retr is not None:
                    batch = {"hybridsearch bm25, one call for all queries":
                             lambda: _many(idx, qtexts, k=10, mode="bm25")}
                    for lbl, r_ in (("bm25s, one retrieve() for all queries", retr),
                                    ("bm25s (numba backend), one retrieve() for all queries", retr_nb)):
                        if r_ is not None:
                            batch[lbl] = (lambda r_=r_: r_.retrieve(
                                bm25s.tokenize(qtexts, stopwords=None, show_progress=False), k=10,
                                show_progress=False))
                    bt = {lbl: [] for lbl in batch}
                    for _ in range(rounds):
                        for lbl, fn in batch.items():
                            t = time.perf_counter()
                            fn()
                            bt[lbl].append(nq / (time.perf_counter() - t))
                    ours_qps = float(np.median(bt["hybridsearch bm25, one call for all queries"]))
                    for lbl, v in bt.items():
                        qps = float(np.median(v))
                        batch_rows.append([key, lbl, qps])
                        if not lbl.startswith("hybridsearch") and qps > ours_qps:
                            losses.append(f"{key} docs, batched BM25 throughput: {lbl} {qps:,.0f} queries/s vs "
                                          f"ours {ours_qps:,.0f} ({qps / ours_qps:.2f}x)")

                # ---- memory and disk. RSS: each engine reopened in a fresh process that answers
                # the same queries (serve_rss.py); in-process deltas are skewed by what the
                # benchmark itself freed or kept.
                idx.close()
                mil_disk = None
                if mil is not None:
                    mil_disk = mil.disk_bytes()
                    mil.close()
                nmem = min(nq, 20)
                serve_ours = _serve_rss("ours", str(Path(tmp) / "ours"), str(models[colbert]), str(nmem),
                                        "1" if colbert else "0")
                for ch_, v in st["channel_bytes"].items():
                    mem_rows.append([key, f"hybridsearch {ch_} (disk)", v["bytes_per_doc"]])
                    data["bytes"].setdefault(f"hybridsearch {ch_}", {})[n] = v["bytes_per_doc"]
                mem_rows.append([key, "hybridsearch all channels (disk)", disk_ours / n])
                mem_rows.append([key, f"hybridsearch: RSS of the opened index after {nmem} queries per mode (MiB)",
                                 serve_ours])
                mem_rows.append([key, "bare FAISS IndexFlatIP: RSS growth on add (MiB)", mem_faiss])
                if retr is not None:
                    mem_rows.append([key, "bm25s: RSS growth while indexing (MiB)", mem_bm25s])
                if mil is not None:
                    serve_mil = _serve_rss("milvus", str(Path(tmp) / "milvus"), str(nmem), "1" if colbert else "0")
                    mem_rows.append([key, f"Milvus Lite ({'+'.join(mil.channels)}) (disk)", mil_disk / n])
                    mem_rows.append([key, f"Milvus Lite: RSS of the reopened collection after {nmem} queries per "
                                     "channel + hybrid (MiB)", serve_mil])
                    if serve_ours > serve_mil * 1.1:
                        why = " (ours also serves ColBERT vectors, which Milvus Lite has no field for)" if colbert else ""
                        losses.append(f"{key} docs, memory: our opened index takes {serve_ours:.0f} MiB of RSS vs "
                                      f"Milvus Lite {serve_mil:.0f} MiB{why}")
                    if disk_ours > mil_disk * 1.1:
                        why = " (ColBERT vectors are most of ours)" if colbert else ""
                        losses.append(f"{key} docs, disk: hybridsearch {disk_ours / n:,.0f} bytes/doc vs Milvus Lite "
                                      f"{mil_disk / n:,.0f}{why}")
                ours_bps = n / t_ours
                for peer in ("Milvus Lite",):
                    if peer in data["build"] and len(data["build"][peer]) == len(data["build"]["hybridsearch"]):
                        if data["build"][peer][-1] > ours_bps:
                            losses.append(f"{key} docs, build: Milvus Lite inserts {data['build'][peer][-1]:,.0f} "
                                          f"docs/s vs ours {ours_bps:,.0f}")
                flat = hnsw = retr = retr_nb = mil = idx = None
            del enc, texts
            gc.collect()
            log(f"scale: {n:,} docs done in {time.perf_counter() - t_size:.0f} s")

    body = "\n\n".join([
        "Synthetic corpus: dense d=384 (bare FAISS: Flat and HNSW32 with efSearch 128; ours: the "
        "index's default `dense_factory=\"auto\"`, structures below; Milvus Lite: FLAT), learned sparse over a 250k "
        "vocabulary (~40 terms a document), ColBERT d=128 (~48 vectors a document, float16 on disk) up "
        f"to {cfg.colbert_max:,} documents, ~60-word texts for BM25. Query representations are "
        "precomputed (encoding is excluded everywhere). Latency: single queries, top 10; p50 and p99 are "
        f"per round and the figure is the median over {rounds} interleaved rounds. Our hybrid takes the "
        "top 100 of dense, sparse and BM25, rescoring the union exactly with dense, sparse and ColBERT; "
        "Milvus Lite's hybrid takes 100 per route (dense, sparse, BM25) and fuses with its ranker (it "
        "has no ColBERT), so ours does strictly more work per query.",
        "### Build", table(["docs", "engine", "seconds", "docs/s"], build_rows),
        "### Query latency (ms)", table(["docs", "system", "p50", "p99", "queries/round"], lat_rows),
        "### Ours against each peer (ratio = median over rounds of our p50 / theirs; < 1 means we are faster)",
        table(["docs", "task", "ours", "peer", "ours p50 ms", "peer p50 ms", "ratio"], cmp_rows),
        "### Recall@10 against the exact anchors (same queries)",
        table(["docs", "what", "recall@10"], recall_rows),
        f"### Batched throughput per channel (queries/s, {nq} queries in one call, median of {rounds} rounds)",
        table(["docs", "system", "queries/s"], qps_rows),
        "### Our dense structures (`dense_factory=\"auto\"`, per segment after the build)",
        table(["docs", "segments"], structures),
        f"### Batched BM25 throughput (queries/s, {nq} queries in one call, median of {rounds} rounds)",
        table(["docs", "system", "queries/s"], batch_rows),
        "### Bytes per document and memory", table(["docs", "what", "value"], mem_rows),
        *notes,
    ])
    return Section("Scale: build, latency, memory (synthetic)", body, losses=losses, data=data)


def _serve_rss(*args: str) -> float:
    """RSS (MiB) reported by ``serve_rss.py`` run in a fresh interpreter; NaN if it failed."""
    import json
    import subprocess

    r = subprocess.run([sys.executable, str(Path(__file__).with_name("serve_rss.py")), *args],
                       capture_output=True, text=True, timeout=1800)
    try:
        return float(json.loads(r.stdout.strip().splitlines()[-1])["rss_mib"])
    except (IndexError, ValueError, KeyError):
        print(f"serve_rss {args[0]} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
        return float("nan")

