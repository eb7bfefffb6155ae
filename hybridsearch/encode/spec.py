"""What a model folder provides and how to use it: read from its files, never guessed at random.

A :class:`ModelSpec` is built once when a model loads. It says which outputs the model has
(dense always; sparse and ColBERT only with BGE-M3 head files), its pooling, its instruction
prefixes, and its length limits.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# Instruction prefixes of well-known retrieval models, matched on the model name.
# (pattern, query prefix, passage prefix)
KNOWN_PREFIXES: list[tuple[str, str, str]] = [
    (r"bge-(small|base|large)-en(-v1\.5)?$", "Represent this sentence for searching relevant passages: ", ""),
    (r"bge-(small|base|large)-zh(-v1\.5)?$", "为这个句子生成表示以用于检索相关文章：", ""),
    (r"(^|/)(multilingual-)?e5-", "query: ", "passage: "),
]


@dataclass(frozen=True)
class ModelSpec:
    """Static facts about a loaded encoder.

    Attributes:
        name: what the user asked for (hub id or path).
        path: the local folder it resolved to.
        pooling: ``"cls"`` or ``"mean"``.
        has_sparse: the folder has ``sparse_linear.pt``.
        has_colbert: the folder has ``colbert_linear.pt``.
        dim: dense dimension (hidden size).
        colbert_dim: ColBERT dimension, 0 without the head.
        vocab_size: size of the sparse space.
        query_prefix, passage_prefix: prepended to queries / passages before tokenising.
        query_max_length, passage_max_length: default truncation lengths in tokens (with MCLS,
            the inserted CLS tokens count against them).
        mcls: MCLS interval (a CLS token inserted every ``mcls`` text tokens and the dense vector
            averaged over every CLS position), or ``None`` when off. See ``BGEM3Encoder``.
    """

    name: str
    path: str
    pooling: str
    has_sparse: bool
    has_colbert: bool
    dim: int
    colbert_dim: int
    vocab_size: int
    query_prefix: str
    passage_prefix: str
    query_max_length: int
    passage_max_length: int
    mcls: int | None = None

    @property
    def outputs(self) -> tuple[str, ...]:
        """The representations this model produces, e.g. ``("dense", "sparse", "colbert")``."""
        return ("dense",) + (("sparse",) if self.has_sparse else ()) + (
            ("colbert",) if self.has_colbert else ()
        )


def read_pooling(path: Path, is_m3: bool) -> str:
    """Pooling from ``1_Pooling/config.json``; BGE-M3 uses CLS; otherwise mean (sentence-transformers' default)."""
    cfg = path / "1_Pooling" / "config.json"
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        if c.get("pooling_mode_cls_token"):
            return "cls"
        if c.get("pooling_mode_mean_tokens"):
            return "mean"
        modes = [k for k, v in c.items() if k.startswith("pooling_mode") and v]
        raise ValueError(f"{cfg}: unsupported pooling {modes}; only CLS and mean are supported")
    return "cls" if is_m3 else "mean"


def read_max_seq_length(path: Path) -> int | None:
    """``max_seq_length`` from ``sentence_bert_config.json`` where present."""
    cfg = path / "sentence_bert_config.json"
    if cfg.is_file():
        v = json.loads(cfg.read_text()).get("max_seq_length")
        return int(v) if v else None
    return None


def model_prefixes(path: Path, name: str) -> tuple[str, str]:
    """(query prefix, passage prefix): the ``prompts`` of ``config_sentence_transformers.json``
    (keys ``query`` and ``passage`` or ``document``) when the folder declares them, else
    :func:`known_prefixes` of the name."""
    cfg = Path(path) / "config_sentence_transformers.json"
    if cfg.is_file():
        try:
            prompts = json.loads(cfg.read_text()).get("prompts") or {}
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{cfg} is not a valid sentence-transformers config: {e}") from e
        q = prompts.get("query")
        p = prompts.get("passage", prompts.get("document"))
        if isinstance(q, str) or isinstance(p, str):
            return (q if isinstance(q, str) else ""), (p if isinstance(p, str) else "")
    return known_prefixes(name)


def known_prefixes(name: str) -> tuple[str, str]:
    """(query prefix, passage prefix) for a well-known model name, else empty strings."""
    for pattern, q, p in KNOWN_PREFIXES:
        if re.search(pattern, name.rstrip("/"), flags=re.IGNORECASE):
            return q, p
    return "", ""
