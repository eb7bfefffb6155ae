"""SparsePostings (Numba inverted index) against the scipy brute-force reference."""

import mmap as _mmap

import numpy as np
import pytest
import scipy.sparse as sp

from hybridsearch.errors import IndexFormatError
from hybridsearch.retrievers import sparse
from hybridsearch.retrievers.sparse import SparsePostings, brute_force_topk

VOCAB = 40


def random_weights(rng, n_rows, density, empty_rows=()):
    """Dense (n_rows, VOCAB) float32 whose weights come from a few values, so scores often tie."""
    dense = rng.random((n_rows, VOCAB)) < density
    values = rng.choice(np.array([0.25, 0.5, 0.75, 1.0], np.float32), size=dense.shape)
    m = np.where(dense, values, 0).astype(np.float32)
    m[list(empty_rows)] = 0
    m[:, VOCAB - 3:] = 0  # a few terms no document uses
    return m


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(7)
    docs = sp.csr_matrix(random_weights(rng, 120, 0.12, empty_rows=(0, 5, 119)))  # trailing too
    queries = random_weights(rng, 9, 0.15, empty_rows=(2,))
    queries[3, VOCAB - 1] = 1.0  # a term absent from every doc
    queries = sp.csr_matrix(queries)
    allowed = rng.random(120) < 0.6
    return docs, queries, allowed


def assert_same_topk(scores, ids, ref_scores, ref_ids):
    """Scores agree; ids agree at every slot whose score no other slot shares, and as sets above
    the cut (a tie at the k-th score may legitimately keep either doc)."""
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-6, atol=0)
    for i, ri, rs in zip(ids, ref_ids, ref_scores):
        np.testing.assert_array_equal(i < 0, ri < 0)
        distinct = np.array([np.isclose(rs, v, rtol=1e-6).sum() == 1 for v in rs])
        np.testing.assert_array_equal(i[distinct], ri[distinct])
        above = rs > rs[-1] * (1 + 1e-6)
        assert set(i[above]) == set(ri[above])


def file_backed(a):
    while a is not None:
        if isinstance(a, (np.memmap, _mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False


def test_from_csr_layout(corpus):
    docs, _, _ = corpus
    ix = SparsePostings.from_csr(docs)
    assert (ix.indptr.dtype, ix.docs.dtype, ix.weights.dtype, ix.term_max.dtype) == (
        np.int64, np.int32, np.float32, np.float32)
    assert ix.n_docs == 120 and ix.vocab_size == VOCAB and ix.indptr.shape == (VOCAB + 1,)
    dense = docs.toarray()
    for t in range(VOCAB):
        rows = ix.docs[ix.indptr[t]:ix.indptr[t + 1]]
        assert np.all(np.diff(rows) > 0)  # ascending, no duplicates
        np.testing.assert_array_equal(rows, np.flatnonzero(dense[:, t]))
        np.testing.assert_array_equal(ix.weights[ix.indptr[t]:ix.indptr[t + 1]], dense[rows, t])
    np.testing.assert_array_equal(ix.term_max, dense.max(axis=0))


@pytest.mark.parametrize("n_parts", [1, 3])
def test_transpose_matches_scipy(corpus, n_parts):
    """The counting-sort transpose equals scipy's CSC, whatever the number of doc ranges."""
    docs = corpus[0].copy()
    docs.data[::7] = 0  # explicit zeros are dropped
    indptr, rows, weights, term_max = sparse._transpose(docs, n_parts)
    csc = docs.tocsc()
    csc.eliminate_zeros()
    np.testing.assert_array_equal(indptr, csc.indptr)
    np.testing.assert_array_equal(rows, csc.indices)
    np.testing.assert_array_equal(weights, csc.data)
    np.testing.assert_array_equal(term_max, docs.toarray().max(axis=0))


@pytest.mark.parametrize("k", [1, 4, 200])
@pytest.mark.parametrize("masked", [False, True])
def test_search_matches_brute_force(corpus, k, masked):
    docs, queries, allowed = corpus
    mask = allowed if masked else None
    scores, ids = SparsePostings.from_csr(docs).search(queries, k, allowed=mask)
    ref_scores, ref_ids = brute_force_topk(docs, queries, k, allowed=mask)
    assert scores.shape == ids.shape == (queries.shape[0], k)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert_same_topk(scores, ids, ref_scores, ref_ids)
    if masked:
        assert allowed[ids[ids >= 0]].all()


def test_blocked_parallel_path_matches(corpus, monkeypatch):
    """Small blocks and no parallel threshold exercise the per-block heaps and their merge."""
    docs, queries, allowed = corpus
    monkeypatch.setattr(sparse, "BLOCK_DOCS", 16)
    monkeypatch.setattr(sparse, "PARALLEL_MIN_POSTINGS", 0)
    ix = SparsePostings.from_csr(docs)
    for k in (3, 200):
        got = ix.search(queries, k, allowed=allowed)
        assert_same_topk(*got, *brute_force_topk(docs, queries, k, allowed=allowed))


def test_padding_and_non_hits(corpus):
    docs, queries, _ = corpus
    scores, ids = SparsePostings.from_csr(docs).search(queries, 200)
    dense = (queries @ docs.T).toarray()
    for r in range(queries.shape[0]):
        n_hits = int((dense[r] > 0).sum())
        assert (ids[r, :n_hits] >= 0).all() and (scores[r, :n_hits] > 0).all()
        assert (ids[r, n_hits:] == -1).all() and (scores[r, n_hits:] == 0).all()
    assert (ids[2] == -1).all()  # empty query: nothing shares a token with it


def test_brute_force_reference_on_hand_example():
    docs = sp.csr_matrix(np.array([[1, 0, 0], [0, 2, 0], [1, 1, 0], [0, 0, 0]], np.float32))
    q = sp.csr_matrix(np.array([[1, 1, 0]], np.float32))
    scores, ids = brute_force_topk(docs, q, 4)
    np.testing.assert_array_equal(ids, [[1, 2, 0, -1]])  # 2 == 2: lower row first
    np.testing.assert_array_equal(scores, [[2, 2, 1, 0]])


def test_score_candidates_equals_search(corpus):
    docs, queries, _ = corpus
    ix = SparsePostings.from_csr(docs)
    scores, ids = ix.search(queries, 200)
    dense = (queries @ docs.T).toarray()
    cand = np.array([119, 3, 0, 50, 3, 77, 1], np.int64)  # unsorted, repeated, empty docs
    for r in range(queries.shape[0]):
        row = queries[r]
        got = ix.score(row.indices, row.data, cand)
        assert got.dtype == np.float32 and got.shape == cand.shape
        np.testing.assert_allclose(got, dense[r, cand], rtol=1e-6)
        hits = ids[r] >= 0
        again = ix.score(row.indices, row.data, ids[r][hits])
        np.testing.assert_array_equal(again, scores[r][hits])
    assert ix.score(queries[0].indices, queries[0].data, np.zeros(0, np.int64)).shape == (0,)


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(corpus, tmp_path, mmap):
    docs, queries, allowed = corpus
    ix = SparsePostings.from_csr(docs)
    ix.save(tmp_path, prefix="seg0")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "seg0_docs.npy", "seg0_indptr.npy", "seg0_n_docs.npy", "seg0_term_max.npy",
        "seg0_weights.npy"]
    back = SparsePostings.load(tmp_path, prefix="seg0", mmap=mmap)
    assert back.n_docs == ix.n_docs
    assert file_backed(back.docs) == mmap
    for name in ("indptr", "docs", "weights", "term_max"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ix, name))
    for a, b in zip(back.search(queries, 5, allowed), ix.search(queries, 5, allowed)):
        np.testing.assert_array_equal(a, b)


def test_load_errors(corpus, tmp_path):
    SparsePostings.from_csr(corpus[0]).save(tmp_path)
    with pytest.raises(IndexFormatError, match="missing"):
        SparsePostings.load(tmp_path, prefix="other")
    np.save(tmp_path / "sparse_docs.npy", np.zeros(3, np.int64))
    with pytest.raises(IndexFormatError, match="dtype"):
        SparsePostings.load(tmp_path)
    np.save(tmp_path / "sparse_docs.npy", np.zeros(3, np.int32))
    with pytest.raises(IndexFormatError, match="inconsistent"):
        SparsePostings.load(tmp_path)


def test_bad_inputs(corpus):
    docs, queries, allowed = corpus
    ix = SparsePostings.from_csr(docs)
    with pytest.raises(ValueError, match="vocabulary"):
        ix.search(sp.csr_matrix((1, VOCAB + 1), dtype=np.float32), 3)
    with pytest.raises(TypeError, match="scipy.sparse"):
        ix.search(queries.toarray(), 3)
    with pytest.raises(TypeError, match="floating"):
        ix.search(queries.astype(np.int32), 3)
    with pytest.raises(ValueError, match=">= 0"):
        ix.search(-queries, 3)
    nan_query = queries.copy()
    nan_query.data[0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ix.search(nan_query, 3)
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must"):
            ix.search(queries, k)
    with pytest.raises(ValueError, match="shape"):
        ix.search(queries, 3, allowed=allowed[:-1])
    with pytest.raises(TypeError, match="bool"):
        ix.search(queries, 3, allowed=allowed.astype(np.int64))
    with pytest.raises(ValueError, match="cand"):
        ix.score(queries[0].indices, queries[0].data, np.array([120]))
    with pytest.raises(ValueError, match="q_indices"):
        ix.score(np.array([VOCAB]), np.array([1.0], np.float32), np.array([0]))
    with pytest.raises(ValueError, match=">= 0"):
        SparsePostings.from_csr(-docs)
    with pytest.raises(TypeError):
        SparsePostings.from_csr(docs.toarray())
