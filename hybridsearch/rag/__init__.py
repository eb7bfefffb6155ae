"""Retrieval-augmented generation helpers over a HybridIndex.

* :class:`Retriever` / :class:`Passage` / :func:`build_prompt`: plain Python, no extra dependency.
* :func:`as_langchain_retriever`: a LangChain ``BaseRetriever`` (``pip install "hybridsearch[langchain]"``).
* :func:`as_llamaindex_retriever`: a LlamaIndex ``BaseRetriever`` (``pip install "hybridsearch[llamaindex]"``).

Importing this package imports neither LangChain nor LlamaIndex; the adapters import them when
they are first called.
"""

from __future__ import annotations

from typing import Any

from .retriever import DEFAULT_TEMPLATE, Passage, Retriever, build_prompt, format_sources

__all__ = ["DEFAULT_TEMPLATE", "Passage", "Retriever", "as_langchain_retriever", "as_llamaindex_retriever",
           "build_prompt", "format_sources"]


def as_langchain_retriever(index, k: int = 5, mode: str = "hybrid", **kwargs: Any):
    """See :func:`hybridsearch.rag.langchain.as_langchain_retriever`."""
    from .langchain import as_langchain_retriever as make

    return make(index, k=k, mode=mode, **kwargs)


def as_llamaindex_retriever(index, k: int = 5, mode: str = "hybrid", **kwargs: Any):
    """See :func:`hybridsearch.rag.llamaindex.as_llamaindex_retriever`."""
    from .llamaindex import as_llamaindex_retriever as make

    return make(index, k=k, mode=mode, **kwargs)
