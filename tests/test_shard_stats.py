"""BM25 with statistics given from outside (what the shards of a sharded index do): a collection
split in two scores exactly as the whole when each part gets the summed N, df and length."""

import random

import numpy as np
import pytest

from hybridsearch.retrievers import bm25_postings as bp


def _texts(n, seed):
    rng = random.Random(seed)
    words = [f"t{i}" for i in range(60)] + ["common"] * 20
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def test_parts_with_summed_stats_score_as_the_whole():
    a, b = bp.Bm25Postings.from_texts(_texts(300, 1)), bp.Bm25Postings.from_texts(_texts(200, 2))
    queries = ["common t1 t2", "t3 t3 t59", "nothing-here", "t7 common common"]
    whole = bp.search([a, b], queries, 10)
    terms = bp.query_terms(queries)
    sa, sb = bp.collection_stats([a], terms), bp.collection_stats([b], terms)
    summed = (sa[0] + sb[0], sa[1] + sb[1], sa[2] + sb[2])
    assert summed[0] == 500
    (pa,), (pb,) = bp.search([a], queries, 10, stats=summed), bp.search([b], queries, 10, stats=summed)
    for got, want in ((pa, whole[0]), (pb, whole[1])):
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    # without the global statistics a part scores differently (its own N and df)
    (alone,) = bp.search([a], queries, 10)
    assert not np.allclose(alone[0], whole[0][0])


def test_bad_stats_are_refused():
    a = bp.Bm25Postings.from_texts(_texts(20, 3))
    terms = bp.query_terms(["t1 t2"])
    with pytest.raises(ValueError, match="stats"):
        bp.search([a], ["t1 t2"], 5, stats=(10, 100, np.array([1])))  # df of the wrong length
    with pytest.raises(ValueError, match="stats"):
        bp.search([a], ["t1 t2"], 5, stats=(1, 100, np.array([5, 0])))  # df > N
    assert len(terms) == 2
