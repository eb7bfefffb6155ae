"""Quality on BEIR SciFact (test split): our modes against Milvus Lite's hybrid search on the
same all-MiniLM-L6-v2 embeddings, nDCG@10 / Recall@100 / MRR@10.

Both engines get the same corpus vectors and query vectors (encoded once by our encoder and
cached, see ``bench_scifact.cached_dense``); BM25 is each engine's own (ours: tantivy with an
English analyzer with stemming; Milvus Lite: its BM25 function with the standard tokenizer,
lowercase and the same English stopwords -- its analyzer has no stemmer, see ``milvus.py``). Milvus Lite's hybrid_search takes the top 100 of each route.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import milvus as mv
from .report import Section, version

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_scifact import cached_dense  # noqa: E402
from common import table  # noqa: E402

from hybridsearch import BGEM3Encoder, HybridIndex  # noqa: E402
from hybridsearch.evaluation import evaluate, load_beir  # noqa: E402
from hybridsearch.representations import Encoded  # noqa: E402
from hybridsearch.train.data import doc_text  # noqa: E402

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
METRICS = ("ndcg@10", "recall@100", "mrr@10")


def run(cfg, tmp_root: Path, log) -> Section:
    corpus, queries, qrels = load_beir(cfg.scifact, "test")
    enc = BGEM3Encoder(MODEL)
    doc_ids = list(corpus)
    texts = [doc_text(corpus[d]) for d in doc_ids]
    log(f"quality: {len(texts)} SciFact documents (MiniLM vectors cached under bench/.cache after the first run)")
    dvecs = cached_dense(enc, texts, "passage", "corpus")
    qids = [q for q in qrels if q in queries]
    qtexts = [queries[q] for q in qids]
    qvecs = cached_dense(enc, qtexts, "query", "qtest")
    qenc = Encoded(dense=qvecs, sparse=None, colbert=None, colbert_offsets=None,
                   n_tokens=np.zeros(len(qids), np.int64))
    runs, times = {}, {}
    with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        idx = HybridIndex.create(Path(tmp) / "ours", enc)
        idx.add([{"id": d, "text": t} for d, t in zip(doc_ids, texts)],
                encoded=Encoded(dense=dvecs, sparse=None, colbert=None, colbert_offsets=None,
                                n_tokens=np.zeros(len(dvecs), np.int64)), show_progress=False)
        for label, kw in [("hybridsearch BM25", {"mode": "bm25"}),
                          ("hybridsearch dense", {"mode": "dense"}),
                          ("hybridsearch hybrid (defaults: weighted, dense 1.0 + normalised BM25 0.7)", {}),
                          ("hybridsearch hybrid, RRF k=60", {"fusion": "rrf"})]:
            t = time.perf_counter()
            hits = idx.search_batch(qtexts, k=100, query_encoded=qenc, **kw)
            times[label] = time.perf_counter() - t
            runs[label] = {q: [h.id for h in hs] for q, hs in zip(qids, hits)}
        idx.close()
        if mv.available():
            log("quality: Milvus Lite insert + queries")
            m = mv.MilvusLite(Path(tmp) / "milvus", dvecs.shape[1], sparse=False, bm25=True)
            m.insert(dvecs, texts)
            variants = [
                ("Milvus Lite BM25", lambda i: m.search("bm25", text=qtexts[i], k=100)[0]),
                ("Milvus Lite dense", lambda i: m.search("dense", dense=qvecs[i], k=100)[0]),
                ("Milvus Lite hybrid, RRF k=60", lambda i: m.hybrid(
                    ["dense", "bm25"], dense=qvecs[i], text=qtexts[i], k=100, rrf_k=60)),
                ("Milvus Lite hybrid, WeightedRanker 0.5/0.5", lambda i: m.hybrid(
                    ["dense", "bm25"], dense=qvecs[i], text=qtexts[i], k=100, weights=[0.5, 0.5])),
                ("Milvus Lite hybrid, WeightedRanker 1.0/0.7 (our default weights)", lambda i: m.hybrid(
                    ["dense", "bm25"], dense=qvecs[i], text=qtexts[i], k=100, weights=[1.0, 0.7])),
            ]
            for label, fn in variants:
                t = time.perf_counter()
                runs[label] = {q: [doc_ids[j] for j in fn(i)] for i, q in enumerate(qids)}
                times[label] = time.perf_counter() - t
            m.close()
    res = {label: evaluate(r, qrels) for label, r in runs.items()}
    rows = [[label] + [f"{res[label][m_]:.4f}" for m_ in METRICS] + [f"{1000 * times[label] / len(qids):.2f}"]
            for label in runs]
    ours_best = max((lbl for lbl in res if lbl.startswith("hybridsearch")), key=lambda lbl: res[lbl]["ndcg@10"])
    losses = []
    for lbl in res:
        if lbl.startswith("Milvus") and res[lbl]["ndcg@10"] > res[ours_best]["ndcg@10"]:
            losses.append(f"SciFact nDCG@10: {lbl} {res[lbl]['ndcg@10']:.4f} beats our best "
                          f"({ours_best}) {res[ours_best]['ndcg@10']:.4f}")
        for a, b in (("BM25", "BM25"), ("dense", "dense")):
            if lbl == f"Milvus Lite {a}" and res[lbl]["ndcg@10"] > res[f"hybridsearch {b}"]["ndcg@10"]:
                losses.append(f"SciFact nDCG@10, {a} alone: Milvus Lite {res[lbl]['ndcg@10']:.4f} vs ours "
                              f"{res[f'hybridsearch {b}']['ndcg@10']:.4f}")
    body = "\n\n".join([
        f"{len(doc_ids):,} documents, {len(qids)} test queries; `{MODEL}` vectors (max length 256, "
        f"normalised) shared by both engines; Milvus Lite {version('milvus-lite') or 'not installed'}. "
        "BM25: ours stems English (Snowball) and drops Lucene's English stopwords; Milvus Lite 3.2's "
        "pure-Python analyzer gets the same stopwords but has no stemmer (its `stemmer` filter is "
        "ignored). "
        "Our default fusion weights were chosen on SciFact *train* queries (bench/bench_scifact.py); "
        "nothing here was tuned on test. The last column is wall time per query for the whole 300-query "
        "run (ours batched in one call, Milvus Lite one call per query), query encoding excluded.",
        table(["run", "nDCG@10", "Recall@100", "MRR@10", "ms/query"], rows),
    ])
    return Section("Quality: SciFact test split", body, losses=losses,
                   data={"ndcg@10": {lbl: r["ndcg@10"] for lbl, r in res.items()},
                         "recall@100": {lbl: r["recall@100"] for lbl, r in res.items()}})
