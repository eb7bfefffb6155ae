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


def test_config_validation():
    with pytest.raises(ValueError, match="unknown channel"):
        FusionConfig({"splade": 1.0})
    with pytest.raises(ValueError, match="non-negative"):
        FusionConfig({"dense": -1.0})
    with pytest.raises(ValueError, match="rrf"):
        FusionConfig({"dense": 1.0}, method="borda")
