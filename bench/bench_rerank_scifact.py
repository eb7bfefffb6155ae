"""Hybrid retrieval + a cross-encoder fine-tuned here, on BEIR SciFact, on CPU.

    python bench/bench_rerank_scifact.py /path/to/scifact [--steps 300] [--rerank-top 30]

1. Builds the MiniLM (dense, cached vectors as in bench_scifact.py) + BM25 HybridIndex.
2. Mines hard negatives for the *train* queries with that index (hybrid ranks 10..100).
3. Fine-tunes a cross-encoder from the same MiniLM backbone (fresh one-label head) with
   ``train_reranker`` (group-wise CE: 1 positive vs G-1 mined negatives), a few hundred steps.
4. On the *test* split, reranks the hybrid top ``--rerank-top`` with it (the rest of the top 100
   keeps its hybrid order, so Recall@100 cannot change) and reports nDCG@10 / Recall@100 /
   MRR@10 for hybrid alone vs hybrid + reranker; optionally also the untrained cross-encoder.

Writes bench/results/rerank_scifact.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_scifact import cached_dense  # noqa: E402
from common import machine_info, table  # noqa: E402

from hybridsearch import BGEM3Encoder  # noqa: E402
from hybridsearch.evaluation import evaluate, load_beir  # noqa: E402
from hybridsearch.index.hybrid import HybridIndex  # noqa: E402
from hybridsearch.representations import Encoded  # noqa: E402
from hybridsearch.rerank import Reranker  # noqa: E402
from hybridsearch.train.data import doc_text, from_beir  # noqa: E402
from hybridsearch.train.mining import mine_hard_negatives  # noqa: E402
from hybridsearch.train.reranker import _save, load_cross_encoder, train_reranker  # noqa: E402

METRICS = ("ndcg@10", "recall@100", "mrr@10")


def encoded(vecs: np.ndarray) -> Encoded:
    return Encoded(dense=vecs, sparse=None, colbert=None, colbert_offsets=None,
                   n_tokens=np.zeros(len(vecs), np.int64))


def reranked_run(idx, qids, qtexts, qvecs, base: dict[str, list[str]], reranker, top: int):
    """Top ``top`` hybrid hits reordered by the reranker (through HybridIndex.search), then the
    remaining hybrid top-100 in hybrid order."""
    hits = idx.search(qtexts, k=top, query_encoded=encoded(qvecs), reranker=reranker, rerank_top=top)
    out = {}
    for q, hs in zip(qids, hits):
        head = [h.id for h in hs]
        seen = set(head)
        out[q] = head + [d for d in base[q] if d not in seen]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("beir_dir")
    ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--rerank-top", type=int, default=30)
    ap.add_argument("--untrained", action="store_true", help="also rerank with the untrained cross-encoder")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rerank_scifact.md"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    corpus, queries, qrels_test = load_beir(args.beir_dir, "test")
    enc = BGEM3Encoder(args.model)
    doc_ids = list(corpus)
    texts = [doc_text(corpus[d]) for d in doc_ids]
    dvecs = cached_dense(enc, texts, "passage", "corpus")
    qids = [q for q in qrels_test if q in queries]
    qtexts = [queries[q] for q in qids]
    qvecs = cached_dense(enc, qtexts, "query", "qtest")

    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        idx = HybridIndex.create(tmp / "idx", enc)
        t0 = time.perf_counter()
        idx.add([{"id": d, "text": t} for d, t in zip(doc_ids, texts)], encoded=encoded(dvecs))
        timings["index build"] = time.perf_counter() - t0

        hits = idx.search(qtexts, k=100, query_encoded=encoded(qvecs))
        base = {q: [h.id for h in hs] for q, hs in zip(qids, hits)}
        results = {"hybrid (library defaults), top 100": evaluate(base, qrels_test)}

        # --- hard negatives for the train queries, from the same index
        t0 = time.perf_counter()
        train = from_beir(args.beir_dir, "train")
        mined = mine_hard_negatives(idx, train, mode="hybrid", range_=(10, 100), n_neg=args.group_size - 1, seed=0)
        timings["mining"] = time.perf_counter() - t0
        n_negs = [len(r["neg"]) for r in mined]

        # --- fine-tune the cross-encoder
        t0 = time.perf_counter()
        res = train_reranker(args.model, mined, tmp / "ce", group_size=args.group_size,
                             batch_size=args.batch_size, lr=args.lr, max_steps=args.steps,
                             max_length=args.max_length, device="cpu", seed=0, show_progress=True)
        timings["training"] = time.perf_counter() - t0
        losses = res.losses
        k = max(1, min(20, len(losses) // 5))
        loss_first, loss_last = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))

        rerankers = [("hybrid + fine-tuned MiniLM cross-encoder", tmp / "ce")]
        if args.untrained:
            m, tok = load_cross_encoder(args.model)
            _save(m, tok, tmp / "ce0")
            rerankers.append(("hybrid + untrained MiniLM cross-encoder (random head)", tmp / "ce0"))
        for label, path in rerankers:
            rr = Reranker(str(path), device="cpu", max_length=args.max_length, batch_size=32)
            t0 = time.perf_counter()
            run = reranked_run(idx, qids, qtexts, qvecs, base, rr, args.rerank_top)
            dt = time.perf_counter() - t0
            timings[f"rerank ({label.split('+ ')[1]})"] = dt
            results[f"{label}, reranks top {args.rerank_top}"] = evaluate(run, qrels_test)
            print(label, results[f"{label}, reranks top {args.rerank_top}"], f"{dt:.0f} s", flush=True)
            del rr
        idx.close()

    rows = [[label] + [f"{r[m]:.4f}" for m in METRICS] for label, r in results.items()]
    hyb = results["hybrid (library defaults), top 100"]
    ft = results[f"hybrid + fine-tuned MiniLM cross-encoder, reranks top {args.rerank_top}"]
    delta = {m: ft[m] - hyb[m] for m in METRICS}
    n_pairs = len(qids) * args.rerank_top
    rr_time = timings["rerank (fine-tuned MiniLM cross-encoder)"]
    verdict = ("The fine-tuned reranker **improves** nDCG@10" if delta["ndcg@10"] > 0
               else "The fine-tuned reranker **hurts** nDCG@10")
    text = "\n\n".join([
        "# SciFact (BEIR): hybrid retrieval + a cross-encoder fine-tuned on SciFact train", machine_info(),
        f"First stage: `{args.model}` dense (cached vectors) + BM25 (tantivy), HybridIndex library "
        f"defaults, {len(doc_ids)} docs, {len(qids)} test queries. Everything on CPU.",
        f"Training: {len(mined)} train queries (`from_beir`), hard negatives mined with the same "
        f"hybrid index from ranks 10..100 (`mine_hard_negatives`, {args.group_size - 1} per query; "
        f"min {min(n_negs)}, mean {np.mean(n_negs):.1f}). Cross-encoder = the same MiniLM backbone with "
        f"a freshly initialised one-label head, `train_reranker` with group-wise CE (1 positive vs "
        f"{args.group_size - 1} negatives), group {args.group_size}, batch {args.batch_size} queries, "
        f"{res.step} steps (= {res.step * args.batch_size / len(mined):.2f} epochs), lr {args.lr}, "
        f"max length {args.max_length} tokens, fp32. Loss: mean of first {k} steps {loss_first:.3f}, "
        f"last {k} steps {loss_last:.3f} (ln {args.group_size} = {np.log(args.group_size):.3f} is chance).",
        f"Reranking depth: **top {args.rerank_top}** of the hybrid list, not the top 100 the issue asks "
        f"for: on 2 CPU cores shared with other work (another process held about one core) a MiniLM "
        f"cross-encoder scores only a few pairs per second, so the top-100 rerank of 300 queries "
        f"(30,000 pairs) did not fit the ~30-minute time box of this run; for the same reason training "
        f"is tiny (a trial step of batch 4 x group 8 at 192 tokens took ~15 s). Hits {args.rerank_top + 1}..100 keep their hybrid order, so Recall@100 "
        "is the hybrid's by construction; only nDCG@10 and MRR@10 can move.",
        "## Test split",
        table(["run", "nDCG@10", "Recall@100", "MRR@10"], rows),
        f"{verdict}: {delta['ndcg@10']:+.4f} (MRR@10 {delta['mrr@10']:+.4f}).",
        "## Timings",
        table(["stage", "seconds"], [[k_, f"{v:.1f}"] for k_, v in timings.items()]),
        f"Reranking throughput (fine-tuned): {n_pairs / rr_time:.0f} pairs/s at max length {args.max_length}.",
        "Command: `python bench/bench_rerank_scifact.py " + " ".join(sys.argv[1:]) + "`",
    ]) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
