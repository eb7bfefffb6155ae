"""Fusion arithmetic on hand-computed values."""

import math
from statistics import NormalDist
from types import SimpleNamespace

import numpy as np
import pytest

from hybridsearch.fusion import (
    CHANNELS,
    DEFAULT_GATE,
    GATE_FLOOR,
    GATE_MIN_CANDIDATES,
    FusionConfig,
    expected_max_normal,
    floor_missing,
    fuse,
    fuse_terms,
    minmax,
    noise_gate,
    normalized,
    ranks,
    rrf,
    rrf_terms,
    weighted_sum,
    weighted_terms,
    zscore,
)

nan = np.nan


def test_minmax():
    np.testing.assert_allclose(minmax(np.array([2.0, 4.0, nan, 3.0])), [0, 1, nan, 0.5])
    np.testing.assert_allclose(minmax(np.array([5.0, 5.0])), [1, 1])
    assert np.isnan(minmax(np.array([nan, nan]))).all()


def test_weighted_sum_raw_and_normalised():
    s = {"dense": np.array([0.5, 0.2, 0.9]), "sparse": np.array([0.1, 0.3, 0.0]),
         "colbert": np.array([0.6, 0.4, 0.8]), "bm25": np.array([10.0, nan, 4.0])}
    w = {"dense": 0.4, "sparse": 0.2, "colbert": 0.4, "bm25": 0.5}
    want = [0.4 * 0.5 + 0.2 * 0.1 + 0.4 * 0.6 + 0.5 * 1.0,
            0.4 * 0.2 + 0.2 * 0.3 + 0.4 * 0.4 + 0.0,   # BM25 missing -> 0
            0.4 * 0.9 + 0.0 + 0.4 * 0.8 + 0.5 * 0.0]
    # the previous default: BM25 alone min-max normalised, model channels raw, no gate
    legacy = dict(normalize=("bm25",), scale="minmax", gate=None)
    np.testing.assert_allclose(weighted_sum(s, w, **legacy), want, rtol=1e-6)
    np.testing.assert_allclose(fuse(s, FusionConfig(w, **legacy)), want, rtol=1e-6)
    both = weighted_sum({"dense": np.array([0.2, 0.4, 0.3]), "bm25": np.array([1.0, 3.0, nan])},
                        {"dense": 1.0, "bm25": 0.5}, normalize=("dense", "bm25"), scale="minmax", gate=None)
    np.testing.assert_allclose(both, [0.0, 1.5, 0.5], rtol=1e-6)


def test_rrf():
    s = {"dense": np.array([0.9, 0.1, 0.5]), "bm25": np.array([nan, 2.0, 1.0])}
    np.testing.assert_array_equal(ranks(s["bm25"]), [np.inf, 1, 2])
    want = [1 / 61, 1 / 63 + 1 / 61, 1 / 62 + 1 / 62]
    np.testing.assert_allclose(rrf(s, {"dense": 1, "bm25": 1}), want, rtol=1e-6)
    np.testing.assert_allclose(fuse(s, FusionConfig({"dense": 1, "bm25": 1}, method="rrf")), want, rtol=1e-6)


def test_rrf_order_from_hand_computed_ranks():
    # Five documents a..e; channel scores chosen so that the ranks (1 = best) are:
    #   dense  0.91 0.35 0.62 0.10 0.48  -> a1 b4 c2 d5 e3
    #   sparse  -   12   3.5  7.25  -    -> b1 d2 c3        (a, e unseen)
    #   bm25   2.0  -    9.0  1.0  4.0   -> c1 e2 a3 d4     (b unseen)
    s = {"dense": np.array([0.91, 0.35, 0.62, 0.10, 0.48]),
         "sparse": np.array([nan, 12.0, 3.5, 7.25, nan]),
         "bm25": np.array([2.0, nan, 9.0, 1.0, 4.0])}
    np.testing.assert_array_equal(ranks(s["dense"]), [1, 4, 2, 5, 3])
    np.testing.assert_array_equal(ranks(s["sparse"]), [np.inf, 1, 3, 2, np.inf])
    np.testing.assert_array_equal(ranks(s["bm25"]), [3, np.inf, 1, 4, 2])
    # Equal weights, k = 60: a = 1/61 + 1/63, b = 1/64 + 1/61, c = 1/62 + 1/63 + 1/61,
    # d = 1/65 + 1/62 + 1/64, e = 1/63 + 1/62  ->  c (.04840) > d (.04714) > a (.03227)
    # > b (.03202) > e (.03200)
    w = {"dense": 1.0, "sparse": 1.0, "bm25": 1.0}
    want = [1/61 + 1/63, 1/64 + 1/61, 1/62 + 1/63 + 1/61, 1/65 + 1/62 + 1/64, 1/63 + 1/62]
    got = rrf(s, w, k=60)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.argsort(-got, kind="stable").tolist() == [2, 3, 0, 1, 4]  # c d a b e
    # Weights 2 / 1 / 0.5: a = 2/61 + .5/63, b = 2/64 + 1/61, c = 2/62 + 1/63 + .5/61,
    # d = 2/65 + 1/62 + .5/64, e = 2/63 + .5/62  ->  c > d > b > a > e
    w2 = {"dense": 2.0, "sparse": 1.0, "bm25": 0.5}
    got2 = fuse(s, FusionConfig(w2, method="rrf"))
    np.testing.assert_allclose(got2, [2/61 + .5/63, 2/64 + 1/61, 2/62 + 1/63 + .5/61,
                                      2/65 + 1/62 + .5/64, 2/63 + .5/62], rtol=1e-6)
    assert np.argsort(-got2, kind="stable").tolist() == [2, 3, 1, 0, 4]  # c d b a e
    # Only ranks matter: a monotone rescaling of any channel changes nothing.
    t = {"dense": np.exp(10 * s["dense"]), "sparse": s["sparse"] / 1000, "bm25": s["bm25"] ** 3}
    np.testing.assert_array_equal(rrf(t, w, k=60), got)
    # k = 0: plain sum of 1/rank: a = 1 + 1/3, b = 1/4 + 1, c = 1/2 + 1/3 + 1, d = 1/5 + 1/2 + 1/4,
    # e = 1/3 + 1/2  ->  c a b d e
    got0 = rrf(s, w, k=0)
    np.testing.assert_allclose(got0, [4/3, 5/4, 11/6, 19/20, 5/6], rtol=1e-6)
    assert np.argsort(-got0, kind="stable").tolist() == [2, 0, 1, 3, 4]
    # A zero weight drops the channel: dense alone orders by dense rank.
    assert np.argsort(-rrf(s, {"dense": 1.0, "bm25": 0.0}), kind="stable").tolist() == [0, 2, 4, 1, 3]


def test_config_validation():
    with pytest.raises(ValueError, match="unknown channel"):
        FusionConfig({"splade": 1.0})
    with pytest.raises(ValueError, match="non-negative"):
        FusionConfig({"dense": -1.0})
    with pytest.raises(ValueError, match="rrf"):
        FusionConfig({"dense": 1.0}, method="borda")
    with pytest.raises(ValueError, match="scale"):
        FusionConfig({"dense": 1.0}, scale="rank")
    for bad in ((0.5,), (0.5, 0.0), (nan, 1.0), (0.5, -1.0), 0.5, ("a", 1.0)):
        with pytest.raises(ValueError, match="gate"):
            FusionConfig({"dense": 1.0}, gate=bad)
    with pytest.raises(ValueError, match="scale"):
        normalized(np.array([1.0, 2.0]), "rank")


# ---------------------------------------------------------------- scale-free fusion (the default)


def test_zscore_and_floor_by_hand():
    # [1, 2, 3]: mean 2, population std sqrt(2/3)
    np.testing.assert_allclose(zscore(np.array([1.0, 2.0, 3.0, nan])),
                               [-math.sqrt(1.5), 0.0, math.sqrt(1.5), nan])
    np.testing.assert_array_equal(zscore(np.array([5.0, 5.0, nan])), [0.0, 0.0, nan])
    assert np.isnan(zscore(np.array([nan, nan]))).all()
    # a document the channel did not see counts as the channel's lowest score on the union
    np.testing.assert_array_equal(floor_missing(np.array([4.0, nan, 1.0, 3.0])), [4, 1, 1, 3])
    np.testing.assert_array_equal(floor_missing(np.array([2.0, 3.0])), [2, 3])
    # what the channel saw scored alike: seen 1, unseen 0 (it still lifts what it retrieved)
    np.testing.assert_array_equal(floor_missing(np.array([nan, 7.5, nan])), [0, 1, 0])
    np.testing.assert_array_equal(floor_missing(np.array([2.0, nan, 2.0])), [1, 0, 1])
    np.testing.assert_array_equal(floor_missing(np.array([2.0, 2.0])), [2, 2])
    np.testing.assert_allclose(normalized(np.array([nan, 7.5, nan])),
                               [-1 / math.sqrt(2), math.sqrt(2), -1 / math.sqrt(2)])
    np.testing.assert_array_equal(normalized(np.array([nan, 7.5, nan]), "minmax"), [0, 1, 0])
    assert np.isnan(floor_missing(np.array([nan, nan]))).all()


def test_normalized_over_the_union_with_missing_entries():
    s = np.array([4.0, nan, 1.0, 3.0])  # floored: 4 1 1 3, mean 9/4, variance 27/16
    sd = math.sqrt(27 / 16)
    np.testing.assert_allclose(normalized(s, "zscore"),
                               [(4 - 2.25) / sd, (1 - 2.25) / sd, (1 - 2.25) / sd, (3 - 2.25) / sd])
    np.testing.assert_allclose(normalized(s, "minmax"), [1.0, 0.0, 0.0, 2 / 3])
    # a channel that saw nothing contributes nothing; a constant one nothing either under z-scores
    np.testing.assert_array_equal(normalized(np.array([nan, nan, nan])), [0, 0, 0])
    np.testing.assert_array_equal(normalized(np.array([7.0, 7.0])), [0, 0])
    np.testing.assert_array_equal(normalized(np.array([7.0, 7.0]), "minmax"), [1, 1])


def test_weighted_zscore_sum_by_hand():
    # four candidates a b c d; BM25 did not retrieve a
    s = {"dense": np.array([1.0, 2.0, 3.0, 2.0]),  # mean 2, std sqrt(1/2)
         "bm25": np.array([nan, 5.0, 1.0, 3.0])}  # floored 1 5 1 3: mean 2.5, std sqrt(11/4)
    zd = np.array([-1, 0, 1, 0]) / math.sqrt(0.5)
    zb = (np.array([1, 5, 1, 3]) - 2.5) / math.sqrt(11 / 4)
    want = 1.0 * zd + 0.5 * zb  # -1.867 0.754 0.962 0.151 -> c b d a
    got = weighted_sum(s, {"dense": 1.0, "bm25": 0.5}, gate=None)
    np.testing.assert_allclose(got, want)
    assert np.argsort(-got, kind="stable").tolist() == [2, 1, 3, 0]
    np.testing.assert_allclose(fuse(s, FusionConfig({"dense": 1.0, "bm25": 0.5}, gate=None)), want)
    # min-max over the same union: dense 0 .5 1 .5, BM25 0 1 0 .5 -> b and c tie at 1.0
    np.testing.assert_allclose(weighted_sum(s, {"dense": 1.0, "bm25": 0.5}, scale="minmax", gate=None),
                               [0.0, 1.0, 1.0, 0.75])
    # a channel left out of `normalize` enters raw, missing as 0, and is never gated
    np.testing.assert_allclose(weighted_sum(s, {"dense": 1.0, "bm25": 0.5}, normalize=("dense",)),
                               weighted_sum({"dense": s["dense"]}, {"dense": 1.0}) + 0.5 * np.array([0, 5, 1, 3]))


def test_a_channel_that_retrieved_one_document_still_counts():
    rng = np.random.default_rng(3)
    for n in (8, 500):  # below and above GATE_MIN_CANDIDATES
        dense = rng.normal(0.8, 0.01, n)
        bm25 = np.full(n, nan)
        bm25[n // 2] = 4.2  # the only document with the query's word
        got = fuse({"dense": dense, "bm25": bm25}, FusionConfig({"dense": 1.0, "bm25": 1.0}))
        assert int(np.argmax(got)) == n // 2


def test_expected_max_normal():
    # exact expected maxima of n standard normals: 0, 1/sqrt(pi), 1.5388, 2.5076, 3.2414
    for n, exact in ((1, 0.0), (2, 1 / math.sqrt(math.pi)), (10, 1.5388), (100, 2.5076), (1000, 3.2414)):
        assert abs(expected_max_normal(n) - exact) < 0.03, n
    with pytest.raises(ValueError):
        expected_max_normal(0)


def test_noise_gate_by_hand():
    # 0 0 0 4: mean 1, std sqrt(3), best z = 3 / sqrt(3) = sqrt(3);
    # m_4 = Phi^-1((4 - 0.375) / 4.25) = 1.0491
    m4 = NormalDist().inv_cdf(3.625 / 4.25)
    assert abs(m4 - 1.0491) < 1e-4
    want = math.sqrt(3) - m4 - 0.5  # 0.183
    x = np.array([0.0, 0, 0, 4])
    assert noise_gate(x, 0.5, 1.0, min_candidates=2) == pytest.approx(want)
    assert noise_gate(x, 0.5, 2.0, min_candidates=2) == pytest.approx(want / 2)
    # missing entries are floored first: nan nan 2 6 is 2 2 2 6, the same shape
    assert noise_gate(np.array([nan, nan, 2.0, 6.0]), 0.5, 1.0, min_candidates=2) == pytest.approx(want)
    assert noise_gate(x, 0.0, 0.1, min_candidates=2) == 1.0  # clipped at 1
    assert noise_gate(x, 1.0, 1.0, min_candidates=2) == 0.0  # clipped at 0
    assert noise_gate(np.array([3.0, 3.0, 3.0]), 0.0, 1.0, min_candidates=2) == 0.0  # constant: no evidence
    assert noise_gate(np.array([nan, nan]), 0.0, 1.0, min_candidates=2) == 0.0  # saw nothing
    assert noise_gate(np.array([0.3]), 0.0, 1.0, min_candidates=1) == 1.0  # one candidate: nothing to judge
    # too few candidates to tell noise from evidence: the gate stays open
    assert GATE_MIN_CANDIDATES == 50
    assert noise_gate(x, 1.0, 1.0) == 1.0
    assert noise_gate(np.full(49, 3.0), 0.0, 1.0) == 1.0
    assert noise_gate(np.full(50, 3.0), 0.0, 1.0) == 0.0
    s = {"dense": np.array([0.9, 0.1, 0.5, 0.4]), "bm25": np.array([nan, 2.0, nan, nan])}
    np.testing.assert_allclose(weighted_sum(s, {"dense": 1.0, "bm25": 0.15}),
                               weighted_sum(s, {"dense": 1.0, "bm25": 0.15}, gate=None))


def _normal_quantiles(n):
    """n evenly spread standard-normal quantiles: a deterministic stand-in for a channel of noise."""
    nd = NormalDist()
    return np.array([nd.inv_cdf((i + 0.5) / n) for i in range(n)])


def test_gate_switches_off_a_channel_that_scores_like_noise():
    n = 1000
    rng = np.random.default_rng(0)
    noise = rng.permutation(_normal_quantiles(n))  # best z 3.29 ~ m_1000 = 3.2: no evidence
    strong = rng.permutation(_normal_quantiles(n))
    strong[17] = 9.0  # one candidate far above the rest
    bm25 = np.where(rng.random(n) < 0.5, np.nan, rng.exponential(size=n))
    bm25[42] = 40.0
    assert noise_gate(noise, *DEFAULT_GATE) == 0.0
    assert noise_gate(strong, *DEFAULT_GATE) == 1.0
    assert noise_gate(bm25, *DEFAULT_GATE) == 1.0
    w = {"dense": 1.0, "bm25": 0.15}
    # noise dense: BM25 decides, the dense channel (weight GATE_FLOOR) only breaks BM25's ties
    got = weighted_sum({"dense": noise, "bm25": bm25}, w)
    np.testing.assert_allclose(got, GATE_FLOOR * normalized(noise) + 0.15 * normalized(bm25))
    assert int(np.argmax(got)) == 42
    order = np.argsort(-got, kind="stable")
    unseen = order[np.isnan(bm25[order])]  # the documents BM25 never saw, tied there, in dense order
    assert len(unseen) > 400 and np.all(np.diff(noise[unseen]) < 0)
    # the top 10 is BM25's own; without the gate the noise (weight 1 against 0.15) reshuffles it
    bm_top = np.argsort(-normalized(bm25), kind="stable")[:10].tolist()
    assert order[:10].tolist() == bm_top
    ungated = np.argsort(-weighted_sum({"dense": noise, "bm25": bm25}, w, gate=None), kind="stable")[:10]
    assert len(set(ungated.tolist()) & set(bm_top)) <= 5
    # a dense channel with evidence keeps its full weight
    np.testing.assert_allclose(weighted_sum({"dense": strong, "bm25": bm25}, w),
                               normalized(strong) + 0.15 * normalized(bm25))


@pytest.mark.parametrize("seed", range(5))
def test_default_is_invariant_to_affine_rescaling_of_a_channel(seed):
    """a * s + b (a > 0) on any channel leaves the default fused ranking unchanged (and the fused
    scores too); BGE-M3's raw formula does change, which is why it is not the default."""
    rng = np.random.default_rng(seed)
    n = 300
    s = {"dense": rng.normal(0.8, 0.02, n), "sparse": np.where(rng.random(n) < 0.4, nan, rng.gamma(2.0, 0.1, n)),
         "colbert": rng.normal(0.6, 0.05, n), "bm25": np.where(rng.random(n) < 0.5, nan, rng.gamma(2.0, 3.0, n))}
    s["dense"][:5] += [0.2, 0.15, 0.1, 0.1, 0.08]  # some evidence, so the dense gate is open
    cfg = FusionConfig({"dense": 0.4, "sparse": 0.2, "colbert": 0.4, "bm25": 0.3})
    assert cfg.scale == "zscore" and cfg.gate == DEFAULT_GATE and cfg.normalize == CHANNELS
    base = fuse(s, cfg)
    for c in s:
        for a, b in ((1000.0, -7.0), (0.001, 3.0), (2.5, 0.0)):
            t = dict(s, **{c: a * s[c] + b})
            got = fuse(t, cfg)
            np.testing.assert_allclose(got, base, rtol=1e-7, atol=1e-9)
            assert np.argsort(-got, kind="stable").tolist() == np.argsort(-base, kind="stable").tolist()
    raw = FusionConfig.m3_raw()
    t = dict(s, dense=100 * s["dense"])
    assert np.argsort(-fuse(t, raw))[:10].tolist() != np.argsort(-fuse(s, raw))[:10].tolist()


def test_m3_raw_is_compute_score():
    s = {"dense": np.array([0.5, 0.2]), "sparse": np.array([0.1, nan]), "colbert": np.array([0.6, 0.4]),
         "bm25": np.array([12.0, 3.0])}
    cfg = FusionConfig.m3_raw()
    assert cfg.normalize == () and cfg.gate is None and cfg.method == "weighted"
    assert cfg.weights == {"dense": 0.4, "sparse": 0.2, "colbert": 0.4}
    np.testing.assert_allclose(fuse(s, cfg), [0.4 * 0.5 + 0.2 * 0.1 + 0.4 * 0.6, 0.4 * 0.2 + 0.4 * 0.4])
    np.testing.assert_allclose(fuse(s, FusionConfig.m3_raw({"dense": 1.0, "bm25": 0.01})), [0.62, 0.23])


def _index_default(has_heads):
    from hybridsearch.index.hybrid import HybridIndex

    spec = SimpleNamespace(has_sparse=has_heads, has_colbert=has_heads)
    return HybridIndex.default_fusion(SimpleNamespace(encoder=SimpleNamespace(spec=spec)))


def test_index_defaults():
    from hybridsearch.index.hybrid import DENSE_BM25_WEIGHTS, M3_WEIGHTS

    dense_only = _index_default(False)  # scale-free: every channel z-scored and gated
    assert dense_only.weights == DENSE_BM25_WEIGHTS == {"dense": 1.0, "bm25": 0.15}
    assert dense_only.method == "weighted" and dense_only.scale == "zscore" and dense_only.gate == DEFAULT_GATE
    assert set(dense_only.normalize) == set(CHANNELS)
    # search() rebuilds the config from weights, method and normalize: the defaults of
    # FusionConfig must carry the rest
    assert FusionConfig(weights=dense_only.weights, normalize=dense_only.normalize) == dense_only
    m3 = _index_default(True)  # BGE-M3's own formula on its channels, BM25 (weight 0) scale-free
    assert m3.weights == M3_WEIGHTS and m3.normalize == ("bm25",)
    s = {"dense": np.array([0.5, 0.2]), "sparse": np.array([0.1, nan]), "colbert": np.array([0.6, 0.4]),
         "bm25": np.array([12.0, 3.0])}
    np.testing.assert_allclose(fuse(s, m3), fuse(s, FusionConfig.m3_raw()))


def test_default_search_config_is_invariant_to_rescaling_the_dense_model():
    """The issue's case: a model whose cosines sit in a narrow band (E5, BGE) fuses exactly like
    one that spreads them, under the default dense-only configuration."""
    rng = np.random.default_rng(7)
    n = 500
    dense = rng.normal(0.0, 1.0, n)
    dense[:3] += 6.0
    bm25 = np.where(rng.random(n) < 0.4, nan, rng.gamma(2.0, 3.0, n))
    cfg = _index_default(False)
    wide = fuse({"dense": dense, "bm25": bm25}, cfg)
    narrow = fuse({"dense": 0.82 + 0.01 * dense, "bm25": bm25}, cfg)  # E5-like: 0.78 .. 0.90
    np.testing.assert_allclose(narrow, wide, rtol=1e-7, atol=1e-9)


def _random_channels(rng, n):
    """One query's channel scores over a union of n: random scales and offsets, about a third NaN
    (unseen), and now and then a channel that saw nothing or scored everything alike."""
    out = {}
    for c in CHANNELS:
        kind = rng.integers(0, 8)
        s = rng.normal(rng.uniform(-5, 5), rng.uniform(0.01, 10), n)
        if kind == 0:
            s[:] = nan
        elif kind == 1:
            s[:] = 0.5
        if kind != 0:
            s[rng.random(n) < 0.33] = nan
        if kind == 2 and n >= 60:
            s[0] = s[np.isfinite(s)].max() + 40  # one clear outlier: the gate opens
        out[c] = s.astype(np.float32)
    return out


@pytest.mark.parametrize("seed", range(40))
def test_terms_add_up_to_the_fused_score(seed):
    """fuse_terms' terms sum to fuse's scores for every method, scale, normalize choice and gate,
    and each term is exactly the channel's piece (weight x gate x normalised score / w/(k+rank))."""
    rng = np.random.default_rng(seed)
    n = int(rng.choice([1, 2, 7, 49, 50, 200]))
    scores = _random_channels(rng, n)
    weights = {c: float(rng.choice([0.0, rng.uniform(0, 2)])) for c in CHANNELS if rng.random() < 0.9}
    normalize = tuple(c for c in CHANNELS if rng.random() < 0.5)
    for method in ("weighted", "rrf"):
        for scale in SCALES_ALL:
            for gate in (None, DEFAULT_GATE, (0.0, 0.5)):
                cfg = FusionConfig(weights, method=method, normalize=normalize, scale=scale, gate=gate,
                                   rrf_k=int(rng.integers(0, 80)))
                fused, terms = fuse_terms(scores, cfg)
                np.testing.assert_array_equal(fused, fuse(scores, cfg))
                assert list(terms) == list(scores)
                assert all(t.dtype == np.float64 and t.shape == (n,) and np.isfinite(t).all() for t in terms.values())
                total = np.sum(list(terms.values()), axis=0)
                if method == "weighted":
                    np.testing.assert_allclose(total, fused, rtol=1e-12, atol=1e-12)
                    for c, t in terms.items():
                        w = weights.get(c, 0.0)
                        if w == 0.0:
                            assert not t.any()
                        elif c in normalize:
                            g = 1.0 if gate is None else noise_gate(scores[c], *gate)
                            want = w * max(g, GATE_FLOOR) * normalized(scores[c], scale)
                            np.testing.assert_allclose(t, want, rtol=1e-12, atol=1e-15)
                        else:
                            np.testing.assert_allclose(t, w * np.nan_to_num(scores[c].astype(np.float64)), rtol=1e-12)
                else:
                    np.testing.assert_allclose(total, fused, rtol=1e-6, atol=1e-9)  # fused is float32
                    for c, t in terms.items():
                        w = weights.get(c, 0.0)
                        want = w / (cfg.rrf_k + ranks(scores[c])) if w else np.zeros(n)
                        np.testing.assert_allclose(t, want, rtol=1e-15)
                        assert (t[~np.isfinite(scores[c])] == 0).all()  # unseen: nothing added


SCALES_ALL = ("zscore", "minmax")


def test_terms_functions_match_their_sums():
    s = {"dense": np.array([0.2, 0.4, 0.3]), "bm25": np.array([1.0, 3.0, nan])}
    w = {"dense": 0.5, "bm25": 2.0}
    t = weighted_terms(s, w)
    np.testing.assert_array_equal(t["dense"] + t["bm25"], weighted_sum(s, w))
    r = rrf_terms(s, w, k=1)
    np.testing.assert_allclose(r["dense"], [0.5 / 4, 0.5 / 2, 0.5 / 3])
    np.testing.assert_allclose(r["bm25"], [2.0 / 3, 2.0 / 2, 0.0])
    np.testing.assert_allclose(r["dense"] + r["bm25"], rrf(s, w, k=1), rtol=1e-6)
