"""Retrieval quality on BEIR SciFact: every mode of HybridIndex, fusion defaults tuned on train.

    python bench/bench_scifact.py /path/to/scifact [--model sentence-transformers/all-MiniLM-L6-v2]

1. Encodes the corpus once (cached under bench/.cache) and builds a real HybridIndex (FAISS Flat
   + tantivy BM25; the model's sparse/ColBERT channels when it has them).
2. Tunes the hybrid weights on the *train* queries (grid below), so the defaults are chosen on
   data the reported figures never saw.
3. Reports nDCG@10 / Recall@100 / MRR@10 on the *test* split for each mode, the tuned hybrid,
   RRF, and the "ten lines" baseline (min-max dense + min-max BM25, 0.5/0.5, over the top 1000).

Writes bench/results/scifact.md.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info, table  # noqa: E402

from hybridsearch import BGEM3Encoder  # noqa: E402
from hybridsearch.evaluation import evaluate, load_beir  # noqa: E402
from hybridsearch.index.hybrid import HybridIndex  # noqa: E402
from hybridsearch.representations import Encoded  # noqa: E402

CACHE = Path(__file__).parent / ".cache"


def cached_dense(enc: BGEM3Encoder, texts: list[str], kind: str, tag: str) -> np.ndarray:
    key = hashlib.sha256((enc.spec.name + kind + "\n".join(texts)).encode()).hexdigest()[:16]
    path = CACHE / f"{tag}-{key}.npy"
    if path.exists():
        return np.load(path)
    CACHE.mkdir(exist_ok=True)
    v = enc.encode_arrays(texts, kind=kind, sparse=False, show_progress=True).dense
    np.save(path, v)
    return v


def run(idx, qids, qtexts, qvecs, k=100, **kw):
    enc = Encoded(dense=qvecs, sparse=None, colbert=None, colbert_offsets=None,
                  n_tokens=np.zeros(len(qids), np.int64))
    hits = idx.search_batch(qtexts, k=k, query_encoded=enc, **kw)
    return {q: [h.id for h in hs] for q, hs in zip(qids, hits)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("beir_dir")
    ap.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "scifact.md"))
    args = ap.parse_args()

    corpus, queries, qrels_test = load_beir(args.beir_dir, "test")
    _, _, qrels_train = load_beir(args.beir_dir, "train")
    enc = BGEM3Encoder(args.model)
    if enc.spec.has_sparse:
        raise SystemExit("this script caches dense vectors only; use a dense-only model")
    doc_ids = list(corpus)
    texts = [(corpus[d].get("title", "") + " " + corpus[d]["text"]).strip() for d in doc_ids]
    t0 = time.perf_counter()
    dvecs = cached_dense(enc, texts, "passage", "corpus")
    t_enc = time.perf_counter() - t0
    splits = {}
    for name, qrels in (("train", qrels_train), ("test", qrels_test)):
        qids = [q for q in qrels if q in queries]
        qt = [queries[q] for q in qids]
        splits[name] = (qids, qt, cached_dense(enc, qt, "query", f"q{name}"), qrels)

    with tempfile.TemporaryDirectory() as tmp:
        idx = HybridIndex.create(Path(tmp) / "idx", enc)
        docs = [{"id": d, "text": t} for d, t in zip(doc_ids, texts)]
        t0 = time.perf_counter()
        idx.add(docs, encoded=Encoded(dense=dvecs, sparse=None, colbert=None, colbert_offsets=None,
                                      n_tokens=np.zeros(len(docs), np.int64)))
        t_build = time.perf_counter() - t0

        def score(split, **kw):
            qids, qt, qv, qrels = splits[split]
            return evaluate(run(idx, qids, qt, qv, **kw), qrels)

        # --- tune on train
        grid = []
        for w_bm25, norm, cand in itertools.product(
                [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0], [("bm25",), ("dense", "bm25")], [100, 1000]):
            cfg = dict(mode="hybrid", weights={"dense": 1.0, "bm25": w_bm25}, normalize=norm, candidates=cand)
            grid.append((score("train", **cfg)["ndcg@10"], w_bm25, norm, cand, cfg))
        grid.sort(key=lambda g: -g[0])
        best = grid[0]
        rrf_train = {c: score("train", mode="hybrid", fusion="rrf", weights={"dense": 1.0, "bm25": 1.0},
                              candidates=c)["ndcg@10"] for c in (100, 1000)}

        # --- report on test
        rows = []
        for label, kw in [
            ("bm25", dict(mode="bm25")),
            ("dense", dict(mode="dense")),
            ("hybrid, library defaults", dict(mode="hybrid")),
            (f"hybrid, best on train (dense 1, bm25 {best[1]}, normalise {'+'.join(best[2])}, C={best[3]})", best[4]),
            ("hybrid RRF k=60, C=1000", dict(mode="hybrid", fusion="rrf", weights={"dense": 1.0, "bm25": 1.0}, candidates=1000)),
            ("ten-lines baseline: min-max 0.5/0.5 over top 1000", dict(mode="hybrid", weights={"dense": 0.5, "bm25": 0.5},
                                                                        normalize=("dense", "bm25"), candidates=1000)),
        ]:
            r = score("test", **kw)
            rows.append([label] + [f"{r[m]:.4f}" for m in ("ndcg@10", "recall@100", "mrr@10")])
        defaults, cands = idx.default_fusion(), idx.default_candidates()
        idx.close()
    tune_rows = [[f"{g[1]}", "+".join(g[2]), g[3], f"{g[0]:.4f}"] for g in grid[:8]]
    text = "\n\n".join([
        "# SciFact (BEIR) retrieval quality", machine_info(),
        f"Model `{args.model}` (dense only) + BM25 (tantivy). Corpus {len(doc_ids)} docs "
        f"(encode {t_enc:.0f} s{' (cached)' if t_enc < 5 else ''}, index build from vectors {t_build:.1f} s); "
        f"{len(splits['test'][0])} test queries, {len(splits['train'][0])} train queries.",
        "## Test split",
        table(["mode", "nDCG@10", "Recall@100", "MRR@10"], rows),
        f"Library defaults for a dense-only model: weights {defaults.weights}, normalise "
        f"{defaults.normalize}, candidates {cands} (set from the best train configuration below).",
        "Targets (issue 3): BM25 >= 0.66, dense >= 0.62, hybrid >= 0.72. Reference figures measured "
        "earlier on this machine: bm25s 0.686, MiniLM dense 0.645, min-max 0.5/0.5 fusion 0.727.",
        "## Tuning on the train split (top 8 of the grid, nDCG@10)",
        table(["bm25 weight (dense 1)", "normalised", "candidates", "train nDCG@10"], tune_rows),
        f"RRF on train: C=100 {rrf_train[100]:.4f}, C=1000 {rrf_train[1000]:.4f}.",
        "Command: `python bench/bench_scifact.py " + " ".join(sys.argv[1:]) + "`",
    ]) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
