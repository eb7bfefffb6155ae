"""Fusing channel scores into one ranking.

All functions work on arrays over one query's candidate set ``U`` (``n`` documents, the union of
every first-stage channel's top-C): a channel's scores are ``(n,)`` with NaN where that channel
did not see the document.

* :func:`weighted_sum` -- ``sum_c w_c * g_c * f(s_c)`` over channels.

  - ``f`` makes the channels comparable per query, over the union: ``"zscore"`` (the default:
    ``(s - mean) / std``) or ``"minmax"`` (to [0, 1]). A document a channel did not see first
    counts as that channel's lowest score on the union (it ranked below the channel's top-C).
    Both are scale-free: a channel rescaled as ``a * s + b`` (``a > 0``) fuses identically, so a
    model whose cosines sit in a narrow band (E5, BGE) weighs as much as one that spreads them.
  - ``g`` is the noise gate: a channel whose best candidate stands no higher above the others
    than the best of ``n`` random numbers would (the expected maximum of ``n`` standard normals,
    ``m_n``, about 3.2 for n = 1000) carries no evidence for this query and is switched off, one
    whose best stands out a little is weighted down:
    ``g = clip((max z - m_n - gate[0]) / gate[1], 0, 1)`` on the channel's z-scores, with a floor
    of :data:`GATE_FLOOR` so a gated channel still breaks ties, and open below
    :data:`GATE_MIN_CANDIDATES` candidates. BM25 and a good dense model
    nearly always pass with ``g`` near 1; an English-only model on Russian text scores like noise
    and is gated off (bench/results/fusion.md).
  - Channels not in ``normalize`` enter raw (a missing score counts as 0) and ungated: with
    ``normalize=()`` and weights dense 0.4, sparse 0.2, ColBERT 0.4 this is BGE-M3's own
    ``compute_score`` (:meth:`FusionConfig.m3_raw`).
* :func:`rrf` -- reciprocal rank fusion, ``sum_c w_c / (k + rank_c)`` with ranks from 1.

:func:`fuse_terms` also returns each channel's term of the sum (what a hit's
``contributions`` show), from the same code path as :func:`fuse`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

CHANNELS = ("dense", "sparse", "colbert", "bm25")
SCALES = ("zscore", "minmax")
#: Noise gate ``(offset, width)`` in z units: a channel gets full weight when its best candidate's
#: z-score exceeds the expected maximum of n standard normals by ``offset + width``, none below
#: ``offset``, linearly in between. Picked with the dense + BM25 weights on SciFact train and 2-fold
#: cross-validation on XQuAD-R, for all-MiniLM-L6-v2 and multilingual-e5-small together
#: (bench/results/fusion.md).
DEFAULT_GATE = (0.25, 3.0)
#: A gated-off channel keeps this fraction of its weight: enough to order what the other channels
#: leave tied, too little to move anything else.
GATE_FLOOR = 1e-3
#: Below this many candidates the gate is open (1): n values cannot show a clear outlier (the
#: largest z-score n values can reach is sqrt(n - 1)), so noise and evidence look alike.
GATE_MIN_CANDIDATES = 50


@dataclass(frozen=True)
class FusionConfig:
    """How a hybrid query combines channels. The defaults are the library's recommended fusion.

    Attributes:
        weights: channel -> weight; channels absent or 0 do not contribute to the fused score.
        method: ``"weighted"`` (weighted sum) or ``"rrf"``.
        normalize: channels normalised (``scale``) and gated per query before the weighted sum;
            the others enter raw. Default: every channel.
        rrf_k: the constant of RRF.
        scale: ``"zscore"`` (default) or ``"minmax"``, over the query's candidate union.
        gate: noise gate ``(offset, width)`` for the normalised channels, or None for none.
    """

    weights: dict[str, float] = field(default_factory=dict)
    method: str = "weighted"
    normalize: tuple[str, ...] = CHANNELS
    rrf_k: int = 60
    scale: str = "zscore"
    gate: tuple[float, float] | None = DEFAULT_GATE

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
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale!r}")
        g = self.gate
        if g is not None and not (isinstance(g, (tuple, list)) and len(g) == 2
                                  and all(isinstance(v, (int, float)) and np.isfinite(v) for v in g) and g[1] > 0):
            raise ValueError(f"gate must be None or (offset, width > 0), got {g!r}")

    @classmethod
    def m3_raw(cls, weights: dict[str, float] | None = None) -> FusionConfig:
        """BGE-M3's own formula (``compute_score``): raw scores, dense 0.4, sparse 0.2, ColBERT 0.4."""
        return cls(weights=dict(weights or {"dense": 0.4, "sparse": 0.2, "colbert": 0.4}), normalize=(), gate=None)


def minmax(s: np.ndarray) -> np.ndarray:
    """Min-max normalise the finite entries to [0, 1]; NaN stays NaN; a constant maps to 1."""
    out = np.full_like(s, np.nan, dtype=np.float32)
    ok = np.isfinite(s)
    if ok.any():
        lo, hi = s[ok].min(), s[ok].max()
        out[ok] = (s[ok] - lo) / (hi - lo) if hi > lo else 1.0
    return out


def zscore(s: np.ndarray) -> np.ndarray:
    """``(s - mean) / std`` (population std) over the finite entries; NaN stays NaN; a constant maps to 0."""
    s = np.asarray(s, dtype=np.float64)
    out = np.full(s.shape, np.nan)
    ok = np.isfinite(s)
    if ok.any():
        v = s[ok]
        sd = v.std()
        out[ok] = (v - v.mean()) / sd if sd > 0 else 0.0
    return out


def floor_missing(s: np.ndarray) -> np.ndarray:
    """float64 copy with NaN (not seen by the channel) replaced by the channel's lowest score.

    When everything the channel saw scored alike (one document, say), the seen documents become
    1 and the unseen 0, so the channel still lifts what it retrieved (as min-max always did).
    """
    s = np.array(s, dtype=np.float64)
    ok = np.isfinite(s)
    if ok.any() and not ok.all():
        lo = s[ok].min()
        if s[ok].max() > lo:
            s[~ok] = lo
        else:
            s = ok.astype(np.float64)
    return s


def normalized(s: np.ndarray, scale: str = "zscore") -> np.ndarray:
    """One channel made comparable over the union: missing entries floored, then ``scale``.

    Returns float64 without NaN (a channel that saw nothing is all 0).
    """
    return _scaled(s, scale)[0]


def expected_max_normal(n: int) -> float:
    """Expected largest of ``n`` independent standard normals (Blom's approximation)."""
    if n < 1:
        raise ValueError("n must be >= 1")
    return NormalDist().inv_cdf((n - 0.375) / (n + 0.25))


def noise_gate(s: np.ndarray, offset: float, width: float, min_candidates: int = GATE_MIN_CANDIDATES) -> float:
    """``clip((max z - m_n - offset) / width, 0, 1)`` for one channel's scores over the union.

    ``z`` are the z-scores with missing entries floored, ``m_n`` the expected maximum of
    ``n = len(s)`` standard normals. 1 when there are fewer than ``min_candidates`` (too few to
    judge); 0 when the channel saw nothing or scores every candidate alike.
    """
    return _scaled(s, "zscore", (offset, width), min_candidates)[1]


def _scaled(s, scale: str, gate: tuple[float, float] | None = None,
            min_candidates: int = GATE_MIN_CANDIDATES) -> tuple[np.ndarray, float]:
    """(normalised scores, gate value) of one channel, the z-scores computed once for both."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    f = floor_missing(s)
    n = len(f)
    gated = gate is not None and n >= max(min_candidates, 2)
    if not np.isfinite(f).any():  # the channel saw nothing
        return np.zeros(n), (0.0 if gated else 1.0)
    z = zscore(f)
    v = z if scale == "zscore" else minmax(f).astype(np.float64)
    g = 1.0
    if gated:
        g = (float(z.max()) - expected_max_normal(n) - gate[0]) / gate[1]
        g = min(max(g, 0.0), 1.0)
    return v, g


def weighted_terms(scores: dict[str, np.ndarray], weights: dict[str, float],
                   normalize: tuple[str, ...] = CHANNELS, scale: str = "zscore",
                   gate: tuple[float, float] | None = DEFAULT_GATE) -> dict[str, np.ndarray]:
    """Each channel's ``(n,)`` float64 term of :func:`weighted_sum`: ``w_c * g_c * f(s_c)``.

    One entry per channel of ``scores`` (all zeros for a channel of weight 0); added up in
    ``scores``' order they give :func:`weighted_sum` exactly.
    """
    n = len(next(iter(scores.values()))) if scores else 0
    terms = {}
    for c, s in scores.items():
        w = weights.get(c, 0.0)
        if w == 0.0:
            terms[c] = np.zeros(n, np.float64)
            continue
        if c in normalize:
            v, g = _scaled(s, scale, gate)
            w *= max(g, GATE_FLOOR)
        else:
            v = np.nan_to_num(np.asarray(s, dtype=np.float64), nan=0.0)
        terms[c] = w * v
    return terms


def weighted_sum(scores: dict[str, np.ndarray], weights: dict[str, float],
                 normalize: tuple[str, ...] = CHANNELS, scale: str = "zscore",
                 gate: tuple[float, float] | None = DEFAULT_GATE) -> np.ndarray:
    """Fused ``(n,)`` float64 scores, see the module docstring.

    Channels in ``normalize`` are floored, scaled by ``scale`` and weighted by ``w_c`` times their
    noise gate (at least :data:`GATE_FLOOR`); the others enter raw with missing entries as 0.
    """
    return _total(weighted_terms(scores, weights, normalize, scale, gate), scores)


def _total(terms: dict[str, np.ndarray], scores: dict[str, np.ndarray]) -> np.ndarray:
    n = len(next(iter(scores.values()))) if scores else 0
    fused = np.zeros(n, np.float64)
    for t in terms.values():
        fused += t
    return fused


def ranks(s: np.ndarray) -> np.ndarray:
    """1-based rank of each entry by descending score (ties broken by position); NaN -> inf."""
    r = np.full(len(s), np.inf)
    ok = np.flatnonzero(np.isfinite(s))
    order = ok[np.argsort(-s[ok], kind="stable")]
    r[order] = np.arange(1, len(order) + 1)
    return r


def rrf_terms(scores: dict[str, np.ndarray], weights: dict[str, float], k: int = 60) -> dict[str, np.ndarray]:
    """Each channel's ``(n,)`` float64 term of :func:`rrf`, ``w_c / (k + rank_c)`` (0 where the
    channel did not see the document or its weight is 0), one entry per channel of ``scores``."""
    n = len(next(iter(scores.values()))) if scores else 0
    return {c: (weights.get(c, 0.0) / (k + ranks(s)) if weights.get(c, 0.0) else np.zeros(n, np.float64))
            for c, s in scores.items()}


def rrf(scores: dict[str, np.ndarray], weights: dict[str, float], k: int = 60) -> np.ndarray:
    """Reciprocal rank fusion over the channels with a positive weight."""
    return _total(rrf_terms(scores, weights, k), scores).astype(np.float32)


def fuse(scores: dict[str, np.ndarray], cfg: FusionConfig) -> np.ndarray:
    """Apply ``cfg`` to one query's channel scores."""
    return fuse_terms(scores, cfg)[0]


def fuse_terms(scores: dict[str, np.ndarray], cfg: FusionConfig) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(fused (n,), {channel: its (n,) float64 term})``: :func:`fuse` and what each channel
    added to it (the terms sum to the fused score; for RRF up to its float32 rounding)."""
    if cfg.method == "rrf":
        terms = rrf_terms(scores, cfg.weights, cfg.rrf_k)
        return _total(terms, scores).astype(np.float32), terms
    terms = weighted_terms(scores, cfg.weights, cfg.normalize, cfg.scale, cfg.gate)
    return _total(terms, scores), terms
