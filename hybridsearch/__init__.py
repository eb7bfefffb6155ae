"""hybridsearch: embedded hybrid retrieval on BGE-M3 (dense + learned sparse + ColBERT + BM25).

The public names are imported on first use, so ``import hybridsearch`` (and the CLI's ``--help``)
does not load torch.
"""

from ._version import __version__

__all__ = ["BGEM3Encoder", "Encoded", "Hit", "HybridIndex", "Reranker", "__version__"]

_LAZY = {
    "BGEM3Encoder": ".encode",
    "Encoded": ".representations",
    "Hit": ".index.hybrid",
    "HybridIndex": ".index.hybrid",
    "Reranker": ".rerank",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'hybridsearch' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
