"""Fusion arithmetic on hand-computed values."""

import numpy as np
import pytest

from hybridsearch.fusion import FusionConfig, fuse, minmax, ranks, rrf, weighted_sum

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
    np.testing.assert_allclose(weighted_sum(s, w), want, rtol=1e-6)
    both = weighted_sum({"dense": np.array([0.2, 0.4, 0.3]), "bm25": np.array([1.0, 3.0, nan])},
                        {"dense": 1.0, "bm25": 0.5}, normalize=("dense", "bm25"))
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
