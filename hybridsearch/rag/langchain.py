"""LangChain adapter: a ``langchain_core.retrievers.BaseRetriever`` over a HybridIndex.

::

    from hybridsearch.rag import as_langchain_retriever

    retriever = as_langchain_retriever(index, k=5, filter={"lang": "en"})
    docs = retriever.invoke("How does late interaction work?")   # list[langchain Document]

langchain-core is imported only when the adapter is first used
(``pip install "hybridsearch[langchain]"``).
"""

from __future__ import annotations

from typing import Any

from .retriever import Passage, coerce_retriever

__all__ = ["as_langchain_retriever", "langchain_retriever_class", "passage_to_document"]

INSTALL_HINT = 'pip install "hybridsearch[langchain]"'
_CLASS: type | None = None


def _import():
    try:
        from langchain_core.callbacks import CallbackManagerForRetrieverRun
        from langchain_core.documents import Document
        from langchain_core.retrievers import BaseRetriever
    except ImportError as e:
        raise ImportError(
            f"the LangChain adapter needs the langchain-core package ({e}); install it with: {INSTALL_HINT}"
        ) from e
    return BaseRetriever, Document, CallbackManagerForRetrieverRun


def passage_to_document(p: Passage):
    """A LangChain ``Document``: the text as ``page_content``; the passage's metadata plus
    ``id``, ``doc_id``, ``score`` and ``scores`` (these four win over metadata keys of the same name)."""
    _, Document, _ = _import()
    md = {**p.metadata, "id": p.id, "doc_id": p.doc_id, "score": p.score, "scores": dict(p.scores)}
    return Document(page_content=p.text, metadata=md, id=p.id)


def langchain_retriever_class() -> type:
    """The ``BaseRetriever`` subclass (built on first call, so that importing this module is free)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    BaseRetriever, Document, RunManager = _import()

    class HybridSearchRetriever(BaseRetriever):
        """LangChain retriever over a hybridsearch index; build it with :func:`as_langchain_retriever`."""

        retriever: Any  # a hybridsearch.rag.Retriever (pydantic field; Any avoids schema generation)

        def _get_relevant_documents(self, query: str, *, run_manager: RunManager) -> list[Document]:
            return [passage_to_document(p) for p in self.retriever.retrieve(query)]

    HybridSearchRetriever.__module__ = __name__
    _CLASS = HybridSearchRetriever
    return _CLASS


def as_langchain_retriever(index, k: int = 5, mode: str = "hybrid", *, tags: list[str] | None = None,
                           metadata: dict | None = None, **search_kwargs: Any):
    """A LangChain retriever returning the top ``k`` passages of ``index`` as ``Document``\\ s.

    ``index`` is a HybridIndex or a :class:`~hybridsearch.rag.Retriever`; ``search_kwargs``
    (``weights``, ``filter``, ``candidates``, ``fusion``, ``normalize``) go to every search.
    ``tags``/``metadata`` are LangChain's run tags and metadata for callbacks and tracing.
    """
    cls = langchain_retriever_class()
    r = coerce_retriever(index, k, mode, search_kwargs)
    return cls(retriever=r, tags=tags, metadata=metadata)
