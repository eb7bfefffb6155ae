"""Training data in FlagEmbedding's JSONL format, converters, and the grouping collator.

One line per query::

    {"query": str, "pos": [str, ...], "neg": [str, ...],
     "pos_scores": [float, ...], "neg_scores": [float, ...]}     # scores optional (teacher)

``neg`` may be missing or empty (then only in-batch negatives are available, or negatives must be
mined with :func:`hybridsearch.train.mining.mine_hard_negatives`). Our converters and the miner
also write ``pos_ids`` / ``neg_ids`` (document ids, same order as the texts); readers ignore
unknown keys.

A record is a plain ``dict``. :func:`check_record` validates one and names the file and line of
a bad one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..jsonl import iter_jsonl

Record = dict[str, Any]


class TrainingDataError(ValueError):
    """A malformed training record; the message names the file and line (or the index)."""


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_num_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def check_record(obj: Any, where: str) -> Record:
    """Validate one record; return a normalised copy. ``where`` (``"file:line"``) prefixes errors."""
    if not isinstance(obj, Mapping):
        raise TrainingDataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    q = obj.get("query")
    if not isinstance(q, str):
        got = "missing" if q is None else f"a {type(q).__name__}"
        raise TrainingDataError(f"{where}: 'query' must be a string, it is {got}")
    if not q.strip():
        raise TrainingDataError(f"{where}: 'query' is empty")
    pos = obj.get("pos")
    if pos is None:
        raise TrainingDataError(f"{where}: 'pos' is missing (a list of positive passages)")
    if not _is_str_list(pos):
        raise TrainingDataError(f"{where}: 'pos' must be a list of strings")
    if not pos:
        raise TrainingDataError(f"{where}: 'pos' is empty: every query needs a positive passage")
    neg = obj.get("neg", [])
    if neg is None:
        neg = []
    if not _is_str_list(neg):
        raise TrainingDataError(f"{where}: 'neg' must be a list of strings")
    out: Record = {"query": q, "pos": list(pos), "neg": list(neg)}
    for key, texts in (("pos_scores", pos), ("neg_scores", neg)):
        if obj.get(key) is None:
            continue
        s = obj[key]
        if not _is_num_list(s):
            raise TrainingDataError(f"{where}: '{key}' must be a list of numbers")
        if len(s) != len(texts):
            name = key.split("_")[0]
            raise TrainingDataError(
                f"{where}: '{key}' has {len(s)} value(s) but '{name}' has {len(texts)} passage(s)"
            )
        out[key] = [float(x) for x in s]
    if ("pos_scores" in out) != ("neg_scores" in out) and neg:
        raise TrainingDataError(f"{where}: give both 'pos_scores' and 'neg_scores', or neither")
    for key, texts in (("pos_ids", pos), ("neg_ids", neg)):
        if obj.get(key) is None:
            continue
        ids = obj[key]
        if not isinstance(ids, list) or len(ids) != len(texts):
            raise TrainingDataError(f"{where}: '{key}' must be a list as long as '{key[:3]}'")
        out[key] = [str(x) for x in ids]
    return out


def read_jsonl(path: str | os.PathLike) -> list[Record]:
    """Read and validate a training JSONL file (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training data file {path} not found")
    out = [check_record(obj, where) for obj, where in iter_jsonl(path, TrainingDataError)]
    if not out:
        raise TrainingDataError(f"{path}: no training records")
    return out


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write records as JSONL (UTF-8, one object per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(dict(r), ensure_ascii=False) + "\n")
    return path


def load_records(data: str | os.PathLike | Sequence[Any]) -> list[Record]:
    """Records from a JSONL path, a folder of ``*.jsonl`` files, or a list of dicts (validated)."""
    if isinstance(data, (str, os.PathLike)):
        p = Path(data)
        if p.is_dir():
            files = sorted(p.glob("*.jsonl"))
            if not files:
                raise FileNotFoundError(f"no *.jsonl files in {p}")
            return [r for f in files for r in read_jsonl(f)]
        return read_jsonl(p)
    recs = [check_record(r, f"record {i}") for i, r in enumerate(data)]
    if not recs:
        raise TrainingDataError("no training records")
    return recs


def doc_text(doc: Mapping[str, str]) -> str:
    """A BEIR document as one string: ``"title text"`` (stripped), as the benchmarks index it."""
    return (doc.get("title", "") + " " + doc.get("text", "")).strip()


def from_beir(folder: str | os.PathLike, split: str = "train") -> list[Record]:
    """Records from a BEIR folder: each judged query with its relevant (grade > 0) documents.

    ``pos`` holds the documents' ``"title text"``, ``pos_ids`` their ids, ``neg`` is empty (mine
    negatives next). Queries without a relevant document in the corpus are skipped.
    """
    from ..evaluation import load_beir

    corpus, queries, qrels = load_beir(folder, split)
    out = []
    for qid, judged in qrels.items():
        if qid not in queries or not queries[qid].strip():
            continue
        ids = [d for d, g in judged.items() if g > 0 and d in corpus]
        if not ids:
            continue
        out.append({"query": queries[qid], "pos": [doc_text(corpus[d]) for d in ids], "neg": [],
                    "pos_ids": ids, "query_id": qid})
    return out


def from_pairs(pairs: Iterable[Sequence[Any]]) -> list[Record]:
    """Records from ``(query, positive)`` or ``(query, positive, [negatives])`` tuples.

    Pairs with the same query are merged into one record (first-seen order kept).
    """
    by_q: dict[str, Record] = {}
    for i, p in enumerate(pairs):
        if not isinstance(p, (tuple, list)) or len(p) not in (2, 3):
            raise TrainingDataError(f"pair {i}: expected (query, positive) or (query, positive, negatives)")
        q, pos = p[0], p[1]
        negs = list(p[2]) if len(p) == 3 else []
        if not isinstance(q, str) or not q.strip() or not isinstance(pos, str) or not pos.strip():
            raise TrainingDataError(f"pair {i}: query and positive must be non-empty strings")
        if not _is_str_list(negs):
            raise TrainingDataError(f"pair {i}: negatives must be a list of strings")
        r = by_q.setdefault(q, {"query": q, "pos": [], "neg": []})
        if pos not in r["pos"]:
            r["pos"].append(pos)
        r["neg"].extend(n for n in negs if n not in r["neg"])
    if not by_q:
        raise TrainingDataError("no pairs given")
    return list(by_q.values())


# ---------------------------------------------------------------------------- batching


def batch_order(records: Sequence[Record], batch_size: int, seed: int, epoch: int,
                group_by_length: bool = True, drop_last: bool = False) -> list[list[int]]:
    """Record indices per batch for one epoch, deterministic in ``(seed, epoch)``.

    With ``group_by_length`` the shuffled records are cut into mega-batches of 50 batches, each
    sorted by text length, cut into batches, and the batches shuffled: padding shrinks while the
    order stays random.
    """
    rng = np.random.default_rng([seed, epoch])
    idx = rng.permutation(len(records))
    if group_by_length:
        lengths = np.array([len(r["query"]) + max(len(p) for p in r["pos"]) for r in records])
        mega = batch_size * 50
        parts = []
        for s in range(0, len(idx), mega):
            chunk = idx[s : s + mega]
            parts.append(chunk[np.argsort(-lengths[chunk], kind="stable")])
        idx = np.concatenate(parts) if parts else idx
    batches = [idx[s : s + batch_size].tolist() for s in range(0, len(idx), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class GroupCollator:
    """Per query: one positive and ``group_size - 1`` negatives, with teacher scores aligned.

    The positive is drawn from ``pos``; negatives from ``neg`` without replacement, topped up by
    resampling (with replacement) when a record has too few. Randomness comes from a generator
    seeded with ``(seed, step)``, so a resumed run draws the same groups.

    Returns ``{"queries": [B], "passages": [B*G] (group i at [i*G, (i+1)*G), positive first),
    "teacher": (B, G) float32 array or None}``; teacher scores are used only when every record
    of the batch carries them.
    """

    def __init__(self, group_size: int = 4, seed: int = 0) -> None:
        if group_size < 1:
            raise ValueError(f"group_size must be at least 1, got {group_size}")
        self.group_size = group_size
        self.seed = seed

    def group(self, rec: Record, rng: np.random.Generator) -> tuple[list[str], list[float] | None]:
        G = self.group_size
        i = int(rng.integers(len(rec["pos"])))
        texts = [rec["pos"][i]]
        has_scores = "pos_scores" in rec and "neg_scores" in rec
        scores = [rec["pos_scores"][i]] if has_scores else None
        if G > 1:
            negs = rec.get("neg") or []
            if not negs:
                raise TrainingDataError(
                    f"query {rec['query'][:60]!r} has no negatives but group_size={G}: mine hard "
                    "negatives first (hybridsearch.train.mining) or use group_size=1"
                )
            if len(negs) >= G - 1:
                pick = rng.choice(len(negs), size=G - 1, replace=False)
            else:
                extra = rng.choice(len(negs), size=G - 1 - len(negs), replace=True)
                pick = np.concatenate([rng.permutation(len(negs)), extra])
            texts += [negs[j] for j in pick]
            if has_scores:
                scores += [rec["neg_scores"][j] for j in pick]
        return texts, scores

    def __call__(self, records: Sequence[Record], step: int = 0) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, step])
        queries, passages, teacher = [], [], []
        for r in records:
            texts, scores = self.group(r, rng)
            queries.append(r["query"])
            passages.extend(texts)
            teacher.append(scores)
        t = None
        if teacher and all(s is not None for s in teacher):
            t = np.asarray(teacher, dtype=np.float32)
        return {"queries": queries, "passages": passages, "teacher": t}
