"""hybridsearch: embedded hybrid retrieval on BGE-M3 (dense + learned sparse + ColBERT + BM25)."""

from ._version import __version__
from .encode import BGEM3Encoder
from .index.hybrid import Hit, HybridIndex
from .representations import Encoded

__all__ = ["BGEM3Encoder", "Encoded", "Hit", "HybridIndex", "__version__"]
