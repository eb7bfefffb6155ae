"""Fusing channel scores into one ranking.

All functions work on arrays over one query's candidate set ``U`` (``n`` documents): a channel's
scores are ``(n,)`` float32 with NaN where that channel did not see the document.

* :func:`weighted_sum` -- ``sum_c w_c * s_c`` over channels, a missing score counting as the
  channel's floor (0 after normalisation). BGE-M3's own channels (dense, sparse, ColBERT) enter
  raw, as in ``compute_score``; BM25, whose scale is unbounded, enters min-max normalised per query.
* :func:`rrf` -- reciprocal rank fusion, ``sum_c w_c / (k + rank_c)`` with ranks from 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CHANNELS = ("dense", "sparse", "colbert", "bm25")


@dataclass(frozen=True)
class FusionConfig:
    """How a hybrid query combines channels.

    Attributes:
        weights: channel -> weight; channels absent or 0 do not contribute to the fused score.
        method: ``"weighted"`` (weighted sum) or ``"rrf"``.
        normalize: channels min-max normalised per query before the weighted sum.
        rrf_k: the constant of RRF.
    """

    weights: dict[str, float] = field(default_factory=dict)
    method: str = "weighted"
    normalize: tuple[str, ...] = ("bm25",)
    rrf_k: int = 60

    def __post_init__(self):
        bad = set(self.weights) - set(CHANNELS)
        if bad:
            raise ValueError(f"unknown channel(s) in weights: {sorted(bad)}; channels are {CHANNELS}")
        if any(not np.isfinite(w) or w < 0 for w in self.weights.values()):
            raise ValueError(f"weights must be finite and non-negative, got {self.weights}")
        if self.method not in ("weighted", "rrf"):
            raise ValueError(f"fusion method must be 'weighted' or 'rrf', got {self.method!r}")
        bad = set(self.normalize) - set(CHANNELS)
        if bad:
            raise ValueError(f"unknown channel(s) in normalize: {sorted(bad)}")
        if self.rrf_k < 0:
            raise ValueError("rrf_k must be >= 0")


def minmax(s: np.ndarray) -> np.ndarray:
    """Min-max normalise the finite entries to [0, 1]; NaN stays NaN; a constant maps to 1."""
    out = np.full_like(s, np.nan, dtype=np.float32)
    ok = np.isfinite(s)
    if ok.any():
        lo, hi = s[ok].min(), s[ok].max()
        out[ok] = (s[ok] - lo) / (hi - lo) if hi > lo else 1.0
    return out


def weighted_sum(scores: dict[str, np.ndarray], weights: dict[str, float],
                 normalize: tuple[str, ...] = ("bm25",)) -> np.ndarray:
    """Fused ``(n,)`` float32 scores. Missing (NaN) entries count as 0 after normalisation."""
    n = len(next(iter(scores.values()))) if scores else 0
    fused = np.zeros(n, np.float32)
    for c, s in scores.items():
        w = weights.get(c, 0.0)
        if w == 0.0:
            continue
        s = minmax(s) if c in normalize else s.astype(np.float32)
        fused += w * np.nan_to_num(s, nan=0.0)
    return fused


def ranks(s: np.ndarray) -> np.ndarray:
    """1-based rank of each entry by descending score (ties broken by position); NaN -> inf."""
    r = np.full(len(s), np.inf)
    ok = np.flatnonzero(np.isfinite(s))
    order = ok[np.argsort(-s[ok], kind="stable")]
    r[order] = np.arange(1, len(order) + 1)
    return r


def rrf(scores: dict[str, np.ndarray], weights: dict[str, float], k: int = 60) -> np.ndarray:
    """Reciprocal rank fusion over the channels with a positive weight."""
    n = len(next(iter(scores.values()))) if scores else 0
    fused = np.zeros(n, np.float64)
    for c, s in scores.items():
        w = weights.get(c, 0.0)
        if w:
            fused += w / (k + ranks(s))
    return fused.astype(np.float32)


def fuse(scores: dict[str, np.ndarray], cfg: FusionConfig) -> np.ndarray:
    """Apply ``cfg`` to one query's channel scores."""
    if cfg.method == "rrf":
        return rrf(scores, cfg.weights, cfg.rrf_k)
    return weighted_sum(scores, cfg.weights, cfg.normalize)
