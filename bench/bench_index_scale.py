"""HybridIndex at scale on synthetic data: build rate, query latency, bytes per document.

    python bench/bench_index_scale.py [--docs 10000 100000 1000000] [--queries 200]

Synthetic corpus shaped like MiniLM/BGE-M3 output: dense d=384 (unit vectors), learned-sparse
weights over a 250k vocabulary (Zipf, ~40 distinct tokens a document), ColBERT d=128 (~48 vectors
a document, float16 on disk), and ~60-word texts over a 50k-word Zipf vocabulary for BM25. Query
representations are precomputed (``query_encoded``) so the figures are the index's own; the
encoder is benchmarked separately (bench_encode.py).

For each size, in one run and on the same data:
* build: documents/s of ``HybridIndex.add`` (all channels, one atomic commit per 100k chunk);
* per mode: latency p50/p99 of single queries and per-query time of 64-query batches;
* bytes per document on disk for each channel (``stats()``), and process RSS after opening;
* the alternative a user would write instead, side by side: BM25 with the ``bm25s`` package
  (build + query), dense with bare FAISS ``IndexFlatIP`` (what our wrapper costs on top).
ColBERT is stored only up to --colbert-max docs (default 100k): at 1M x 48 x 128 float16 it would
be 12 GiB of vectors plus the same again while building, beyond this 24 GiB machine with the
other channels resident.

Writes bench/results/index_scale.md.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info, table  # noqa: E402

from hybridsearch import BGEM3Encoder, HybridIndex  # noqa: E402
from hybridsearch.representations import Encoded  # noqa: E402

V, D, DC = 250_002, 384, 128


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_model(folder: Path, colbert: bool, layers: int = 1) -> Path:
    """A random encoder (1 layer by default) whose config has a 250k vocabulary (heads as above)."""
    import json

    import torch

    from hybridsearch.testing import make_tiny_m3

    p = make_tiny_m3(folder, hidden=D, layers=layers, colbert_dim=DC, heads=colbert, max_positions=512)
    cfg = json.loads((p / "config.json").read_text())
    cfg["vocab_size"] = V
    (p / "config.json").write_text(json.dumps(cfg))
    from transformers import XLMRobertaConfig, XLMRobertaModel

    XLMRobertaModel(XLMRobertaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})).save_pretrained(p)
    if not colbert:
        for f in ("sparse_linear.pt", "colbert_linear.pt"):
            (p / f).unlink(missing_ok=True)
    del torch
    return p


def synth_texts(n, rng, n_words=50_000):
    """n texts of 60 words drawn from a Zipf(1.1) vocabulary of ``n_words`` (``w0``, ``w1``...)."""
    words = rng.zipf(1.1, (n, 60)) % n_words
    return [" ".join(f"w{w}" for w in row) for row in words]


def synth(n, rng, colbert: bool, n_words=50_000):
    """Encoded + texts for n documents."""
    dense = rng.standard_normal((n, D), dtype=np.float32)
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    nnz = rng.integers(20, 60, n)
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(nnz, out=indptr[1:])
    cols = (rng.zipf(1.2, indptr[-1]) % (V - 10) + 5).astype(np.int32)
    vals = rng.random(indptr[-1], dtype=np.float32) * 0.3
    csr = sp.csr_matrix((vals, cols, indptr), shape=(n, V))
    csr.sum_duplicates()
    csr.data = np.minimum(csr.data, 0.4).astype(np.float32)  # sum_duplicates adds; keep weights sane
    cb = cb_off = None
    if colbert:
        ntok = rng.integers(24, 72, n)
        cb_off = np.zeros(n + 1, np.int64)
        np.cumsum(ntok, out=cb_off[1:])
        cb = rng.standard_normal((cb_off[-1], DC), dtype=np.float32)
        cb /= np.linalg.norm(cb, axis=1, keepdims=True)
    texts = synth_texts(n, rng, n_words)
    enc = Encoded(dense=dense, sparse=csr if colbert else None, colbert=cb, colbert_offsets=cb_off,
                  n_tokens=(cb_off[1:] - cb_off[:-1] + 1) if colbert else np.full(n, 62, np.int64))
    return enc, texts


def query_set(nq, rng, colbert):
    """Query representations: a dense vector, ~10 sparse terms, 32 ColBERT vectors, 8 words."""
    enc, texts = synth(nq, rng, False)
    texts = [" ".join(t.split()[:8]) for t in texts]
    sparse = cb = off = None
    if colbert:
        cols = (rng.zipf(1.2, (nq, 10)) % (V - 10) + 5).astype(np.int32)
        rows = np.repeat(np.arange(nq), 10)
        sparse = sp.csr_matrix((rng.random(nq * 10, dtype=np.float32) * 0.3, (rows, cols.ravel())), shape=(nq, V))
        off = np.arange(nq + 1, dtype=np.int64) * 32
        cb = rng.standard_normal((nq * 32, DC), dtype=np.float32)
        cb /= np.linalg.norm(cb, axis=1, keepdims=True)
    return Encoded(dense=enc.dense, sparse=sparse, colbert=cb, colbert_offsets=off,
                   n_tokens=np.full(nq, 33, np.int64)), texts


def lat(fn, n):
    ts = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        ts.append(time.perf_counter() - t)
    return 1000 * np.percentile(ts, 50), 1000 * np.percentile(ts, 99)


def bench_size(n, args, model_m3, model_dense, rows_build, rows_q, rows_mem, rows_alt):
    rng = np.random.default_rng(n)
    colbert = n <= args.colbert_max
    enc_model = BGEM3Encoder(model_m3 if colbert else model_dense, device="cpu")
    gc.collect()
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        idx = HybridIndex.create(Path(tmp) / "idx", enc_model)
        t_total, chunk = 0.0, 100_000
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            enc, texts = synth(m, rng, colbert)
            docs = [{"id": f"d{s + i}", "text": t} for i, t in enumerate(texts)]
            t = time.perf_counter()
            idx.add(docs, encoded=enc)
            t_total += time.perf_counter() - t
            del enc, docs
        rows_build.append([f"{n:,}", "+".join(idx.channels), t_total, n / t_total])
        idx.close()
        gc.collect()
        rss0 = rss_mib()
        idx = HybridIndex.open(Path(tmp) / "idx", enc_model)
        qenc, qtexts = query_set(args.queries, np.random.default_rng(7), colbert)
        modes = ["dense", "bm25", "hybrid"] + (["sparse", "colbert"] if colbert else [])
        for mode in modes:
            def one(i, mode=mode):
                idx.search(qtexts[i], k=10, mode=mode, query_encoded=_row(qenc, i))
            one(0)  # warm-up (page cache, JIT)
            nq = args.queries if mode != "colbert" else min(args.queries, 20)
            p50, p99 = lat(one, nq)
            b = 64 if mode != "colbert" else 4
            t = time.perf_counter()
            for s in range(0, nq - b + 1, b):
                idx.search_batch(qtexts[s:s + b], k=10, mode=mode, query_encoded=_rows(qenc, s, s + b))
            nb = max(1, (nq // b))
            per_q = 1000 * (time.perf_counter() - t) / (nb * b)
            rows_q.append([f"{n:,}", mode + (" (exhaustive)" if mode == "colbert" else ""), p50, p99, per_q])
        st = idx.stats()
        rss1 = rss_mib()
        for ch, v in st["channel_bytes"].items():
            rows_mem.append([f"{n:,}", ch, v["bytes_per_doc"]])
        rows_mem.append([f"{n:,}", "process RSS growth after open + queries (MiB)", rss1 - rss0])
        # alternatives on the same data
        import faiss

        dense = np.concatenate([np.asarray(s.dense) for s in idx._state.segments])
        flat = faiss.IndexFlatIP(D)
        flat.add(dense)
        ours = lat(lambda i: idx.search(qtexts[i], k=10, mode="dense", query_encoded=_row(qenc, i)), args.queries)
        bare = lat(lambda i: flat.search(qenc.dense[i:i + 1], 10), args.queries)
        rows_alt.append([f"{n:,}", "dense top-10: ours vs bare FAISS FlatIP, default threads (p50 ms)",
                         ours[0], bare[0], ours[0] / bare[0]])
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        bare1 = lat(lambda i: flat.search(qenc.dense[i:i + 1], 10), args.queries)
        faiss.omp_set_num_threads(threads)
        rows_alt.append([f"{n:,}", "dense top-10: ours vs bare FAISS FlatIP, 1 thread (p50 ms)",
                         ours[0], bare1[0], ours[0] / bare1[0]])
        flat = dense = None
        idx.close()
    if not args.skip_bm25s and n <= args.bm25s_max:
        import bm25s

        rng = np.random.default_rng(n)
        texts = []
        for s in range(0, n, 100_000):
            texts += synth(min(100_000, n - s), rng, False)[1]
        t = time.perf_counter()
        retriever = bm25s.BM25(method="lucene", k1=1.2, b=0.75)
        retriever.index(bm25s.tokenize(texts, stopwords=None, show_progress=False), show_progress=False)
        t_b = time.perf_counter() - t
        qt = bm25s.tokenize(qtexts, stopwords=None, show_progress=False)
        retriever.retrieve(bm25s.tokenize(qtexts[:1], stopwords=None, show_progress=False), k=10, show_progress=False)
        p50, p99 = lat(lambda i: retriever.retrieve(bm25s.tokenize(qtexts[i:i + 1], stopwords=None, show_progress=False),
                                                   k=10, show_progress=False), args.queries)
        ours_bm25 = next(r for r in rows_q if r[0] == f"{n:,}" and r[1] == "bm25")
        rows_alt.append([f"{n:,}", "BM25 top-10: ours (tantivy) vs bm25s (p50 ms)", ours_bm25[2], p50, ours_bm25[2] / p50])
        rows_alt.append([f"{n:,}", "bm25s build (s), for reference", t_b, float("nan"), float("nan")])
        del retriever, texts, qt


def _row(q: Encoded, i):
    return _rows(q, i, i + 1)


def _rows(q: Encoded, a, b):
    cb = off = None
    if q.colbert is not None:
        cb = q.colbert[q.colbert_offsets[a]:q.colbert_offsets[b]]
        off = q.colbert_offsets[a:b + 1] - q.colbert_offsets[a]
    return Encoded(dense=q.dense[a:b], sparse=q.sparse[a:b] if q.sparse is not None else None,
                   colbert=cb, colbert_offsets=off, n_tokens=q.n_tokens[a:b])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--colbert-max", type=int, default=100_000)
    ap.add_argument("--bm25s-max", type=int, default=1_000_000)
    ap.add_argument("--skip-bm25s", action="store_true")
    ap.add_argument("--tmp", default=None, help="folder for the temporary indexes")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "index_scale.md"))
    args = ap.parse_args()
    rows_build, rows_q, rows_mem, rows_alt = [], [], [], []
    with tempfile.TemporaryDirectory() as mtmp:
        m3 = make_model(Path(mtmp) / "m3", colbert=True)
        dn = make_model(Path(mtmp) / "dense", colbert=False)
        for n in sorted(args.docs):
            t = time.perf_counter()
            bench_size(n, args, m3, dn, rows_build, rows_q, rows_mem, rows_alt)
            print(f"{n:,} docs done in {time.perf_counter() - t:.0f} s; peak RSS "
                  f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB", file=sys.stderr)
    text = "\n\n".join([
        "# HybridIndex at scale (synthetic data)", machine_info(),
        f"dense d={D} (FAISS Flat), learned sparse over V={V:,} (~40 terms/doc), ColBERT d={DC} "
        f"(~48 vectors/doc, float16) up to {args.colbert_max:,} docs, BM25 over ~60-word texts. "
        f"{args.queries} queries, k=10, hybrid candidates C=100. Query encoding excluded "
        "(precomputed); single-query figures are p50/p99 over the queries, batched figures are per "
        "query in 64-query calls (4 for exhaustive ColBERT).",
        "## Build", table(["docs", "channels", "add() seconds", "docs/s"], rows_build),
        "## Query latency (ms)", table(["docs", "mode", "p50", "p99", "batched, per query"], rows_q),
        "## Bytes per document on disk", table(["docs", "channel", "bytes/doc"], rows_mem),
        "## Against the alternatives, same data, same run", table(["docs", "comparison", "ours", "theirs", "ours/theirs"], rows_alt),
        "Command: `python bench/bench_index_scale.py " + " ".join(sys.argv[1:]) + "`",
    ]) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
