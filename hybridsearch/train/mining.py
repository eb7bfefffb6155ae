"""Hard-negative mining with our own index, and optional teacher scores from a reranker.

For each record the query is searched in a :class:`~hybridsearch.index.hybrid.HybridIndex`;
hits ranked in ``[lo, hi)`` (0-based, FlagEmbedding's ``range_for_sampling``) that are not
positives (same id as a ``pos_ids`` entry, or same text as a ``pos`` passage after stripping) are
candidates, and ``n_neg`` of them are sampled with a seeded generator. Too few candidates give
fewer negatives (the collator tops groups up by resampling).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .data import Record, check_record


def mine_hard_negatives(index, records: Sequence[Record], mode: str = "hybrid",
                        range_: tuple[int, int] = (10, 100), n_neg: int = 7, seed: int = 0,
                        reranker: Any = None, *, batch_size: int = 64, candidates: int | None = None,
                        show_progress: bool = False) -> list[Record]:
    """Return copies of ``records`` whose ``neg``/``neg_ids`` are mined from ``index``.

    Args:
        index: an open HybridIndex over the corpus the negatives come from.
        mode: search mode (``dense``, ``sparse``, ``colbert``, ``bm25``, ``hybrid``).
        range_: rank window ``(lo, hi)`` to sample from; ``hi`` results are retrieved.
        n_neg: negatives per query.
        reranker: a :class:`hybridsearch.rerank.Reranker`; when given, ``pos_scores`` and
            ``neg_scores`` are its raw logits for every (query, passage) pair (teacher scores).
    """
    lo, hi = int(range_[0]), int(range_[1])
    if not (0 <= lo < hi):
        raise ValueError(f"range_ must be (lo, hi) with 0 <= lo < hi, got {range_!r}")
    if n_neg < 1:
        raise ValueError(f"n_neg must be positive, got {n_neg}")
    recs = [check_record(r, f"record {i}") | {k: r[k] for k in ("query_id",) if k in r}
            for i, r in enumerate(records)]
    rng = np.random.default_rng(seed)
    out: list[Record] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(recs), desc="mine", unit="query", disable=not show_progress)
    for s in range(0, len(recs), batch_size):
        chunk = recs[s : s + batch_size]
        kw = {"candidates": max(candidates or 0, hi)} if mode == "hybrid" else {}
        hits = index.search_batch([r["query"] for r in chunk], k=hi, mode=mode, **kw)
        for r, hs in zip(chunk, hits):
            pos_text = {p.strip() for p in r["pos"]}
            pos_ids = set(r.get("pos_ids", []))
            seen: set[str] = set()
            window = []
            for h in hs[lo:hi]:
                t = h.text.strip()
                if h.id in pos_ids or t in pos_text or t in seen or not t:
                    continue
                seen.add(t)
                window.append(h)
            take = min(n_neg, len(window))
            pick = sorted(rng.choice(len(window), size=take, replace=False).tolist()) if take else []
            new = dict(r)
            new["neg"] = [window[j].text for j in pick]
            new["neg_ids"] = [window[j].id for j in pick]
            new.pop("pos_scores", None)
            new.pop("neg_scores", None)
            out.append(new)
        bar.update(len(chunk))
    bar.close()
    if reranker is not None:
        add_teacher_scores(out, reranker)
    return out


def add_teacher_scores(records: list[Record], reranker, batch_size: int | None = None) -> list[Record]:
    """Set ``pos_scores``/``neg_scores`` (in place) to the reranker's logits for each pair."""
    pairs = [(r["query"], p) for r in records for p in r["pos"] + r["neg"]]
    if not pairs:
        return records
    scores = reranker.compute_score(pairs, batch_size=batch_size)
    if isinstance(scores, float):
        scores = [scores]
    i = 0
    for r in records:
        n_p, n_n = len(r["pos"]), len(r["neg"])
        r["pos_scores"] = [float(x) for x in scores[i : i + n_p]]
        r["neg_scores"] = [float(x) for x in scores[i + n_p : i + n_p + n_n]]
        i += n_p + n_n
    return records
