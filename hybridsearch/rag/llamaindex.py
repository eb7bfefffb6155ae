"""LlamaIndex adapter: a ``llama_index.core.retrievers.BaseRetriever`` over a HybridIndex.

::

    from hybridsearch.rag import as_llamaindex_retriever

    retriever = as_llamaindex_retriever(index, k=5)
    nodes = retriever.retrieve("How does late interaction work?")   # list[NodeWithScore]
    # e.g. RetrieverQueryEngine.from_args(retriever, llm=...) for answers

llama-index-core is imported only when the adapter is first used
(``pip install "hybridsearch[llamaindex]"``).
"""

from __future__ import annotations

from typing import Any

from .retriever import Passage, Retriever, coerce_retriever

__all__ = ["as_llamaindex_retriever", "llamaindex_retriever_class", "passage_to_node"]

INSTALL_HINT = 'pip install "hybridsearch[llamaindex]"'
# Kept out of what LlamaIndex shows the LLM and the embedder (they are retrieval bookkeeping).
_HIDDEN_KEYS = ["id", "doc_id", "score", "scores"]
_CLASS: type | None = None


def _import():
    try:
        from llama_index.core.retrievers import BaseRetriever
        from llama_index.core.schema import (
            NodeRelationship,
            NodeWithScore,
            QueryBundle,
            RelatedNodeInfo,
            TextNode,
        )
    except ImportError as e:
        raise ImportError(
            f"the LlamaIndex adapter needs the llama-index-core package ({e}); install it with: {INSTALL_HINT}"
        ) from e
    return BaseRetriever, NodeWithScore, TextNode, QueryBundle, NodeRelationship, RelatedNodeInfo


def passage_to_node(p: Passage):
    """``NodeWithScore(TextNode(...), score)``: node id = the passage id, source document =
    ``doc_id`` (``node.ref_doc_id``), metadata = the passage's plus ``id``, ``doc_id``, ``score``,
    ``scores`` (hidden from the LLM and embedding views)."""
    _, NodeWithScore, TextNode, _, NodeRelationship, RelatedNodeInfo = _import()
    md = {**p.metadata, "id": p.id, "doc_id": p.doc_id, "score": p.score, "scores": dict(p.scores)}
    node = TextNode(
        id_=p.id, text=p.text, metadata=md,
        excluded_llm_metadata_keys=list(_HIDDEN_KEYS), excluded_embed_metadata_keys=list(_HIDDEN_KEYS),
        relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=p.doc_id)},
    )
    return NodeWithScore(node=node, score=p.score)


def llamaindex_retriever_class() -> type:
    """The ``BaseRetriever`` subclass (built on first call, so that importing this module is free)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    BaseRetriever, NodeWithScore, _, QueryBundle, _, _ = _import()

    class HybridSearchRetriever(BaseRetriever):
        """LlamaIndex retriever over a hybridsearch index; build it with :func:`as_llamaindex_retriever`."""

        def __init__(self, retriever: Retriever, **kwargs: Any):
            if not isinstance(retriever, Retriever):
                raise TypeError(f"expected a hybridsearch.rag.Retriever, got {type(retriever).__name__}")
            self.retriever = retriever
            super().__init__(**kwargs)

        def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
            return [passage_to_node(p) for p in self.retriever.retrieve(query_bundle.query_str)]

    HybridSearchRetriever.__module__ = __name__
    _CLASS = HybridSearchRetriever
    return _CLASS


def as_llamaindex_retriever(index, k: int = 5, mode: str = "hybrid", *, callback_manager=None,
                            verbose: bool = False, **search_kwargs: Any):
    """A LlamaIndex retriever returning the top ``k`` passages of ``index`` as ``NodeWithScore``.

    ``index`` is a HybridIndex or a :class:`~hybridsearch.rag.Retriever`; ``search_kwargs``
    (``weights``, ``filter``, ``candidates``, ``fusion``, ``normalize``) go to every search.
    """
    cls = llamaindex_retriever_class()
    r = coerce_retriever(index, k, mode, search_kwargs)
    return cls(r, callback_manager=callback_manager, verbose=verbose)
