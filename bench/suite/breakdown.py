"""Where the time goes in one hybrid query: tokenise, forward (+ heads), each first-stage channel,
exact rescoring, fusion, building hits, and a cross-encoder rerank.

The stages are the calls ``HybridIndex.search`` makes, timed one by one (the bench reaches into
the index's private stage methods for this); the whole ``search()`` is timed too, and the table
says how much of it the stages account for. Model: a random MiniLM-sized encoder (hidden 384,
6 layers) in the bge-m3 layout with a 250k vocabulary; index: synthetic documents with every
channel (as in the scale section); reranker: all-MiniLM-L6-v2 as a cross-encoder (fresh head:
the cost is what matters here).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .report import Section

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_encode import make_texts  # noqa: E402
from bench_index_scale import _row, make_model, query_set, synth  # noqa: E402
from common import table  # noqa: E402

from hybridsearch import BGEM3Encoder, HybridIndex, Reranker  # noqa: E402
from hybridsearch.fusion import fuse  # noqa: E402


def run(cfg, tmp_root: Path, log) -> Section:
    n, nq, top = cfg.breakdown_docs, cfg.breakdown_queries, cfg.rerank_top
    stages: dict[str, list[float]] = {}

    def clock(name, fn, *a):
        t = time.perf_counter()
        r = fn(*a)
        stages.setdefault(name, []).append(1000 * (time.perf_counter() - t))
        return r

    with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        tmp = Path(tmp)
        log(f"breakdown: model + {n:,} synthetic documents")
        enc = BGEM3Encoder(make_model(tmp / "m3", colbert=True, layers=6), device="cpu")
        idx = HybridIndex.create(tmp / "idx", enc)
        docs_enc, texts = synth(n, np.random.default_rng(n), True)
        idx.add([{"id": f"d{i}", "text": t} for i, t in enumerate(texts)], encoded=docs_enc, show_progress=False)
        del docs_enc, texts
        rr = None
        try:
            from hybridsearch.train.reranker import _save, load_cross_encoder

            m, tok = load_cross_encoder("sentence-transformers/all-MiniLM-L6-v2")
            _save(m, tok, tmp / "ce")
            rr = Reranker(str(tmp / "ce"), device="cpu", max_length=256)
        except Exception as e:  # noqa: BLE001 -- the packaged MiniLM may be missing
            log(f"breakdown: no reranker ({e})")
        qenc, qtexts = query_set(nq, np.random.default_rng(7), True)
        english = [" ".join(t.split()[:12]) for t in make_texts(nq, seed=3)]
        state, cfgf, C = idx._state, idx.default_fusion(), idx.default_candidates()
        log(f"breakdown: {nq} queries x {cfg.rounds} rounds")
        for r in range(cfg.rounds + 1):  # round 0 warms up and is dropped
            for i in range(nq):
                t_all = time.perf_counter()
                clock("tokenise", enc.tokenizer, [english[i]])
                t = time.perf_counter()
                enc.encode_arrays([english[i]], kind="query", show_progress=False)
                stages.setdefault("forward + heads", []).append(1000 * (time.perf_counter() - t) - stages["tokenise"][-1])
                q = _row(qenc, i)
                firsts = [clock("dense top-C (FAISS)", idx._dense_topk, state, q.dense, C, None),
                          clock("sparse top-C (Numba)", idx._sparse_topk, state, q.sparse, C, None),
                          clock("BM25 top-C (Numba postings)", idx._bm25_topk, state, [qtexts[i]], C, None)]
                t = time.perf_counter()
                union = np.unique(np.concatenate([ids[0][ids[0] >= 0] for _, ids in firsts]))
                scores = idx._rescore(state, q, 0, union)
                stages.setdefault("union + exact rescoring (dense, sparse, ColBERT MaxSim)", []).append(
                    1000 * (time.perf_counter() - t))
                b = np.full(len(union), np.nan, np.float32)
                bm = firsts[2]
                ok = bm[1][0] >= 0
                b[np.searchsorted(union, bm[1][0][ok])] = bm[0][0][ok]
                scores["bm25"] = b
                fused = clock("fusion", fuse, scores, cfgf)
                t = time.perf_counter()
                best = np.argsort(-fused, kind="stable")[:max(10, top)]
                docs = [idx._doc(state, int(union[j])) for j in best]
                stages.setdefault("top-k + document fetch", []).append(1000 * (time.perf_counter() - t))
                if rr is not None:
                    clock(f"rerank top {top} (MiniLM-L6 cross-encoder)", rr.compute_score,
                          [(english[i], d["text"]) for d in docs[:top]])
                stages.setdefault("sum of stages", []).append(1000 * (time.perf_counter() - t_all))
                clock("search() end to end, without rerank", idx.search, english[i], 10)
            if r == 0:
                stages = {}
        idx.close()
    med = {k: float(np.median(v)) for k, v in stages.items()}
    total = med["sum of stages"]
    rows = [[k, v, f"{100 * v / total:.1f}%" if k not in ("sum of stages", "search() end to end, without rerank")
             else ""] for k, v in med.items()]
    body = "\n\n".join([
        f"{n:,} documents with every channel (dense 384, sparse, ColBERT 128, BM25), hybrid with "
        f"C={C} candidates per channel, k=10. Query text: a 12-word English query for tokenise and "
        "forward; the channel stages use synthetic query representations (shaped like the encoder's) "
        "so that they hit the synthetic corpus. Medians over "
        f"{nq} queries x {cfg.rounds} rounds (a warm-up round dropped); the percent column is the "
        "share of the sum of stages. `search() end to end` runs the library's own path on the English "
        "query (encode + channels + fusion) as a cross-check.",
        table(["stage", "median ms", "share"], rows),
    ])
    return Section("Where the time goes in one hybrid query", body, data={"stages_ms": med})
