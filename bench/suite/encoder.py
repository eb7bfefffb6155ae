"""Encoder throughput against FlagEmbedding's BGEM3FlagModel and a bare forward pass, and
FlagEmbedding's brute-force hybrid scoring against our index, on one checkpoint.

The checkpoint is a random XLM-RoBERTa in the exact ``BAAI/bge-m3`` layout (real weights are not
reachable offline), MiniLM-sized by default (hidden 384, 6 layers). FlagEmbedding 1.4 needs
transformers < 5, so it runs in its own venv (``--fe-python``) as a long-lived worker
(``fe_worker.py``) that loads the model once; every round times ours, the bare forward pass and
FlagEmbedding back to back, and the figure is the median over rounds.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .report import Section

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_encode import bare, make_texts  # noqa: E402
from bench_index_scale import _row  # noqa: E402
from common import table, timed  # noqa: E402

from hybridsearch import BGEM3Encoder, HybridIndex  # noqa: E402
from hybridsearch.testing import make_tiny_m3  # noqa: E402


class FEWorker:
    def __init__(self, python: str, model: Path):
        self.p = subprocess.Popen([python, str(Path(__file__).with_name("fe_worker.py"))], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        self.info = self("load", model=str(model))

    def __call__(self, cmd: str, **kw) -> dict:
        self.p.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"FlagEmbedding worker exited (code {self.p.wait()})")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=60)


def run(cfg, tmp_root: Path, log) -> Section:
    losses, notes = [], []
    with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        tmp = Path(tmp)
        path = make_tiny_m3(tmp / "m3", hidden=384, layers=cfg.enc_layers, max_positions=512)
        enc = BGEM3Encoder(path, device="cpu", batch_size=32, max_batch_tokens=10**9)
        texts = make_texts(cfg.enc_texts)
        (tmp / "texts.json").write_text(json.dumps(texts))
        n_tok = int(sum(len(x) for x in enc.tokenizer(texts, truncation=True, max_length=512)["input_ids"]))
        fe = fe_version = None
        if cfg.fe_python:
            log("encoder: starting the FlagEmbedding worker")
            fe = FEWorker(cfg.fe_python, path)
            fe_version = (f"FlagEmbedding {fe.info['version']} (transformers {fe.info['transformers']}, "
                          f"torch {fe.info['torch']}, own venv)")
        else:
            notes.append("FlagEmbedding was not measured: no `--fe-python` given (see bench/README.md "
                         "for its venv).")
        variants = {
            "hybridsearch BGEM3Encoder (dense+sparse+ColBERT)":
                lambda: enc.encode_arrays(texts, sparse=True, colbert=True, show_progress=False),
            "bare forward pass, length-sorted (no heads)":
                lambda: bare(enc.model, enc.tokenizer, texts, 32, True),
        }
        if fe is not None:
            variants[f"FlagEmbedding {fe.info['version']} BGEM3FlagModel.encode (dense+sparse+ColBERT)"] = \
                lambda: fe("encode", texts=str(tmp / "texts.json"), batch_size=32)["seconds"]
        bare(enc.model, enc.tokenizer, texts[:64], 32, True)  # warm-up
        times = {k: [] for k in variants}
        for r in range(cfg.rounds):
            log(f"encoder: round {r + 1}/{cfg.rounds}")
            for k, f in variants.items():
                dt, res = timed(f)
                times[k].append(res if isinstance(res, float) else dt)  # FE reports its own encode time
        med = {k: statistics.median(v) for k, v in times.items()}
        base = med["bare forward pass, length-sorted (no heads)"]
        rows = [[k, med[k], len(texts) / med[k], n_tok / med[k], f"{(med[k] / base - 1) * 100:+.1f}%"]
                for k in variants]
        ours_k = "hybridsearch BGEM3Encoder (dense+sparse+ColBERT)"
        fe_k = next((k for k in variants if k.startswith("FlagEmbedding")), None)
        enc_ratio = None
        if fe_k:
            enc_ratio = statistics.median([a / b for a, b in zip(times[ours_k], times[fe_k])])
            if enc_ratio > 1.0:
                losses.append(f"encoder: ours takes {enc_ratio:.2f}x FlagEmbedding's time on the same texts"
                              + (" (within noise)" if enc_ratio < 1.1 else ""))

        # ---- brute-force hybrid scoring (FlagEmbedding) vs our index, same vectors
        score_rows = []
        if fe is not None:
            docs = make_texts(cfg.score_docs, seed=1)
            docs = [" ".join(d.split()[:60]) for d in docs]
            queries = [" ".join(q.split()[:12]) for q in make_texts(cfg.score_queries, seed=2)]
            (tmp / "docs.json").write_text(json.dumps(docs))
            (tmp / "queries.json").write_text(json.dumps(queries))
            log(f"encoder: FlagEmbedding encodes {len(docs)} documents for brute-force scoring")
            fe("corpus", texts=str(tmp / "docs.json"))
            log(f"encoder: our index over the same {len(docs)} documents")
            idx = HybridIndex.create(tmp / "idx", enc)
            idx.add([{"id": str(i), "text": d} for i, d in enumerate(docs)], show_progress=False)
            w = idx.default_fusion().weights
            weights = [w["dense"], w["sparse"], w["colbert"]]
            fe_out = fe("score", texts=str(tmp / "queries.json"), k=10, weights=weights)
            qenc = enc.encode_arrays(queries, kind="query", sparse=True, colbert=True, show_progress=False)
            ours_t, overlap = [], []
            for i in range(len(queries)):
                dt, hits = timed(idx.search, queries[i], k=10, query_encoded=_row(qenc, i))
                ours_t.append(dt)
                overlap.append(len({int(h.id) for h in hits} & set(fe_out["top"][i])) / 10)
            idx.close()
            fe_ms = 1000 * float(np.median(fe_out["seconds"]))
            ours_ms = 1000 * float(np.median(ours_t))
            score_rows = [
                [f"FlagEmbedding brute force (dense + compute_lexical_matching_score + colbert_score), "
                 f"{len(docs)} docs", fe_ms, 1.0],
                ["hybridsearch HybridIndex.search, hybrid (top-100 candidates, exact rescoring)", ours_ms,
                 float(np.mean(overlap))],
            ]
            if ours_ms > fe_ms:
                losses.append(f"hybrid scoring over {len(docs)} docs: ours {ours_ms:.3g} ms vs FlagEmbedding "
                              f"brute force {fe_ms:.3g} ms")
            fe.close()
    body = [
        f"Random XLM-RoBERTa in the bge-m3 layout: hidden 384, {cfg.enc_layers} layers, ColBERT dim 384; "
        f"{len(texts)} texts of 8-200 words, {n_tok:,} tokens; batch size 32; fp32 on CPU; median of "
        f"{cfg.rounds} interleaved rounds.",
        table(["encoder", "median s", "texts/s", "tokens/s", "vs bare forward"], rows),
    ]
    if enc_ratio is not None:
        body.append(f"Ours / FlagEmbedding time, median over rounds: **{enc_ratio:.2f}x** "
                    "(< 1: we are faster).")
    if score_rows:
        body += [
            "#### Hybrid scoring of one query (query encoding excluded on both sides)",
            "FlagEmbedding has no index: scoring a corpus means looping its pair functions over every "
            "document. Same checkpoint, same weights (dense 0.4, sparse 0.2, ColBERT 0.4); p50 over "
            f"{cfg.score_queries} queries. Agreement = mean overlap of our top 10 with the brute-force top 10.",
            table(["method", "p50 ms/query", "top-10 agreement"], score_rows),
        ]
    body += notes
    return Section("Encoder: throughput and brute-force scoring vs FlagEmbedding", "\n\n".join(body),
                   losses=losses, data={"encode_texts_per_s": {k: len(texts) / v for k, v in med.items()},
                                        **({"flagembedding": fe_version} if fe_version else {})})

