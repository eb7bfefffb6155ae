"""Retrieval metrics with graded relevance, and a BEIR data set loader.

Definitions (those of trec_eval / pytrec_eval, which BEIR reports):

* ``ndcg_at_k``: DCG@k = sum over ranks r = 1..k of ``grade(doc_r) / log2(r + 1)`` (linear gain,
  trec_eval's ``ndcg_cut``); the ideal DCG ranks the query's judged grades in decreasing order.
* ``recall_at_k``: relevant documents in the top k / relevant documents judged.
* ``mrr_at_k``: 1 / rank of the first relevant document within the top k, 0 if none.

A document is relevant when its grade is > 0; grades <= 0 and unjudged documents gain nothing.
A document listed twice in a ranking counts at its first rank only.

``qrels`` map a query id to ``{doc_id: grade}``; a ranking is a sequence of doc ids, best first
(padding such as ``-1`` is simply an unjudged id).
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path

from .jsonl import iter_jsonl

__all__ = ["evaluate", "load_beir", "mrr_at_k", "ndcg_at_k", "recall_at_k"]


def _check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")


def _top_k(ranked_ids: Iterable[Hashable], k: int) -> list[Hashable]:
    """The first ``k`` distinct ids of a ranking."""
    seen: set = set()
    out = []
    for d in ranked_ids:
        if d in seen:
            continue
        seen.add(d)
        out.append(d)
        if len(out) == k:
            break
    return out


def ndcg_at_k(ranked_ids: Sequence[Hashable], qrels: Mapping[Hashable, int], k: int = 10) -> float:
    """nDCG@k of one ranking against one query's graded qrels; 0.0 if nothing is relevant."""
    _check_k(k)
    ideal_gains = sorted((g for g in qrels.values() if g > 0), reverse=True)[:k]
    if not ideal_gains:
        return 0.0
    idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal_gains))
    dcg = 0.0
    for r, d in enumerate(_top_k(ranked_ids, k)):
        g = qrels.get(d, 0)
        if g > 0:
            dcg += g / math.log2(r + 2)
    return dcg / idcg


def recall_at_k(
    ranked_ids: Sequence[Hashable], qrels: Mapping[Hashable, int], k: int = 100
) -> float:
    """Fraction of the relevant documents found in the top ``k``; 0.0 if nothing is relevant."""
    _check_k(k)
    n_rel = sum(1 for g in qrels.values() if g > 0)
    if n_rel == 0:
        return 0.0
    return sum(1 for d in _top_k(ranked_ids, k) if qrels.get(d, 0) > 0) / n_rel


def mrr_at_k(ranked_ids: Sequence[Hashable], qrels: Mapping[Hashable, int], k: int = 10) -> float:
    """Reciprocal rank of the first relevant document in the top ``k``, else 0.0."""
    _check_k(k)
    for r, d in enumerate(_top_k(ranked_ids, k)):
        if qrels.get(d, 0) > 0:
            return 1.0 / (r + 1)
    return 0.0


def evaluate(
    run: Mapping[Hashable, Sequence[Hashable]],
    qrels: Mapping[Hashable, Mapping[Hashable, int]],
    ks: Sequence[int] = (1, 10, 100),
) -> dict[str, float]:
    """Mean nDCG@k, Recall@k and MRR@k for every k in ``ks``.

    Averages over the queries of ``qrels`` that have at least one relevant document (BEIR's
    convention); such a query missing from ``run`` scores 0. Queries only in ``run`` are ignored.

    Returns:
        ``{"ndcg@10": ..., "recall@10": ..., "mrr@10": ..., ..., "num_queries": n}``; the means
        are 0.0 when no query is judged relevant.
    """
    for k in ks:
        _check_k(k)
    judged = [q for q, rels in qrels.items() if any(g > 0 for g in rels.values())]
    out: dict[str, float] = {}
    for k in ks:
        for name, fn in (("ndcg", ndcg_at_k), ("recall", recall_at_k), ("mrr", mrr_at_k)):
            vals = [fn(run.get(q, ()), qrels[q], k) for q in judged]
            out[f"{name}@{k}"] = sum(vals) / len(vals) if vals else 0.0
    out["num_queries"] = len(judged)
    return out


# ------------------------------------------------------------------------------ BEIR loaders


def _read_jsonl(path: Path, fields: tuple[str, ...]) -> dict[str, dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"BEIR file {path} not found")
    out: dict[str, dict[str, str]] = {}
    for obj, where in iter_jsonl(path, ValueError):
        if not isinstance(obj, dict) or "_id" not in obj:
            raise ValueError(f"{where}: expected a JSON object with an '_id' key")
        rec = {}
        for name in fields:
            v = obj.get(name, "")
            if v is None:
                v = ""
            if not isinstance(v, str):
                # ValueError like every other malformed line, so callers catch one type
                raise ValueError(f"{where}: field {name!r} is not a string")  # noqa: TRY004
            rec[name] = v
        out[str(obj["_id"])] = rec
    return out


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    if not path.is_file():
        raise FileNotFoundError(f"BEIR qrels file {path} not found")
    out: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) != 3:
                parts = line.split()
            if len(parts) != 3:
                raise ValueError(
                    f"{path}:{lineno}: expected 3 tab-separated columns "
                    f"(query-id, corpus-id, score), got {len(parts)}"
                )
            qid, did, score = (p.strip() for p in parts)
            try:
                grade = int(score)
            except ValueError:
                if lineno == 1:  # the header line "query-id corpus-id score"
                    continue
                raise ValueError(f"{path}:{lineno}: score {score!r} is not an integer") from None
            out.setdefault(qid, {})[did] = grade  # a repeated pair keeps its last grade
    return out


def load_beir(
    folder: str | os.PathLike, split: str = "test"
) -> tuple[dict[str, dict[str, str]], dict[str, str], dict[str, dict[str, int]]]:
    """Load a BEIR data set folder.

    Reads ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``)
    and ``qrels/{split}.tsv`` (header ``query-id corpus-id score``, then tab-separated rows).

    Returns:
        ``(corpus, queries, qrels)``: ``{doc_id: {"title": str, "text": str}}``,
        ``{query_id: text}`` and ``{query_id: {doc_id: grade}}``, all ids as str.

    Raises:
        FileNotFoundError: the folder or one of the files is missing (named in the message).
        ValueError: a malformed line, named as ``file:line``.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"BEIR folder {root} not found")
    paths = (root / "corpus.jsonl", root / "queries.jsonl", root / "qrels" / f"{split}.tsv")
    for p in paths:  # before parsing a large corpus only to find the qrels missing
        if not p.is_file():
            raise FileNotFoundError(f"BEIR file {p} not found")
    corpus = _read_jsonl(paths[0], ("title", "text"))
    queries = {q: rec["text"] for q, rec in _read_jsonl(paths[1], ("text",)).items()}
    qrels = _read_qrels(paths[2])
    return corpus, queries, qrels
