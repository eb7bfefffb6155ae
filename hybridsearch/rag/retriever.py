"""Retrieval for RAG: passages from a HybridIndex, and a prompt with numbered sources.

::

    from hybridsearch.rag import Retriever, build_prompt

    retriever = Retriever(index, k=5, mode="hybrid", filter={"lang": "en"})
    passages = retriever.retrieve("How does late interaction work?")
    prompt = build_prompt("How does late interaction work?", passages)   # give it to any LLM
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..index.hybrid import MODES, HybridIndex

__all__ = ["DEFAULT_TEMPLATE", "Passage", "Retriever", "build_prompt", "format_sources"]

# The keyword arguments of HybridIndex.search that a Retriever passes through.
SEARCH_OPTIONS = ("weights", "filter", "candidates", "fusion", "normalize")

DEFAULT_TEMPLATE = (
    "Answer the question using only the numbered sources below. Cite the sources you use by "
    "number, like [1]. If the sources do not contain the answer, say that you do not know.\n"
    "\n"
    "Sources:\n"
    "{context}\n"
    "\n"
    "Question: {question}\n"
    "Answer:"
)


@dataclass(frozen=True)
class Passage:
    """One retrieved passage.

    Attributes:
        text: the stored text.
        metadata: the stored metadata (a copy).
        doc_id: ``metadata["doc_id"]`` when present (the document a chunk came from), else ``id``.
        id: the id in the index.
        score: the fused (hybrid) or channel score; higher is better.
        scores: each channel's score, None where the channel did not see the passage.
    """

    text: str
    metadata: dict[str, Any] = field(hash=False)
    doc_id: str
    id: str
    score: float
    scores: dict[str, float | None] = field(default_factory=dict, hash=False)

    @classmethod
    def from_hit(cls, hit) -> Passage:
        md = dict(hit.metadata or {})
        doc_id = md.get("doc_id")
        return cls(text=hit.text, metadata=md, doc_id=str(doc_id) if doc_id is not None else hit.id,
                   id=hit.id, score=float(hit.score), scores=dict(hit.scores))


class Retriever:
    """Top-``k`` passages of a question from a :class:`HybridIndex`.

    Args:
        index: an open index.
        k: passages per question.
        mode: ``hybrid`` (default), ``dense``, ``sparse``, ``colbert`` or ``bm25``.
        **search_kwargs: passed to :meth:`HybridIndex.search` on every call: ``weights``,
            ``filter``, ``candidates``, ``fusion``, ``normalize``.
    """

    def __init__(self, index: HybridIndex, k: int = 5, mode: str = "hybrid", **search_kwargs: Any):
        if not isinstance(index, HybridIndex):
            raise TypeError(f"Retriever needs a HybridIndex, got {type(index).__name__}")
        self.index = index
        self.k = _check_k(k)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; modes are {MODES}")
        self.mode = mode
        self.search_kwargs = _check_options(search_kwargs)

    def retrieve(self, question: str, k: int | None = None, **search_kwargs: Any) -> list[Passage]:
        """The best passages for ``question``, best first.

        ``k`` and any ``search_kwargs`` (e.g. ``filter=``) override the retriever's for this call.
        """
        if not isinstance(question, str):
            raise TypeError(f"question must be a string, got {type(question).__name__}")
        opts = {**self.search_kwargs, **_check_options(search_kwargs)}
        hits = self.index.search(question, k=self.k if k is None else _check_k(k), mode=self.mode, **opts)
        return [Passage.from_hit(h) for h in hits]

    __call__ = retrieve

    def __repr__(self) -> str:
        return f"Retriever({self.index!r}, k={self.k}, mode={self.mode!r}, **{self.search_kwargs!r})"


def coerce_retriever(index, k: int, mode: str, search_kwargs: Mapping[str, Any]) -> Retriever:
    """``index`` itself if it is a Retriever (then no search options may be given), else a new one."""
    if isinstance(index, Retriever):
        if search_kwargs:
            raise TypeError("search options go to the Retriever, not here, when a Retriever is given")
        return index
    return Retriever(index, k=k, mode=mode, **search_kwargs)


def _check_k(k: Any) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return k


def _check_options(kw: Mapping[str, Any]) -> dict[str, Any]:
    bad = sorted(set(kw) - set(SEARCH_OPTIONS))
    if bad:
        raise TypeError(f"unknown search option(s) {bad}; options are {list(SEARCH_OPTIONS)}")
    return dict(kw)


def format_sources(passages: Sequence[Passage], max_chars: int | None = None) -> str:
    """Passages as numbered sources, ``[1] ...``, in rank order.

    Each source starts with a header line naming the document (and its title when the metadata
    has one), then the text. With ``max_chars``, sources are added while the total fits; the first
    one is cut to fit rather than dropped, so the numbering always starts at [1] and has no gaps.
    """
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"max_chars must be a positive integer, got {max_chars!r}")
    blocks: list[str] = []
    used = 0
    for n, p in enumerate(passages, 1):
        title = p.metadata.get("title")
        head = f"[{n}] {title} ({p.doc_id})" if isinstance(title, str) and title else f"[{n}] ({p.doc_id})"
        block = f"{head}\n{p.text.strip()}"
        sep = 2 if blocks else 0  # the blank line between blocks
        if max_chars is not None and used + sep + len(block) > max_chars:
            if not blocks:
                blocks.append(block[:max_chars])
            break
        blocks.append(block)
        used += sep + len(block)
    return "\n\n".join(blocks)


def build_prompt(question: str, passages: Sequence[Passage], template: str = DEFAULT_TEMPLATE, *,
                 max_context_chars: int | None = None) -> str:
    """A prompt asking ``question`` over ``passages`` as numbered sources.

    ``template`` must contain ``{context}`` and ``{question}``; they are replaced literally (other
    braces in the template are left alone, so it may contain JSON). With no passages the context
    says so. ``max_context_chars`` bounds the sources' length (see :func:`format_sources`).
    """
    if not isinstance(question, str):
        raise TypeError(f"question must be a string, got {type(question).__name__}")
    missing = [p for p in ("{context}", "{question}") if p not in template]
    if missing:
        raise ValueError(f"template must contain {missing}")
    context = format_sources(passages, max_context_chars) if passages else "(no sources found)"
    # One pass, so that a question or passage containing "{context}" is not substituted again.
    parts = template.split("{context}")
    return context.join(part.replace("{question}", question.strip()) for part in parts)
