"""Nibble tables of the coded ColBERT kernel: layout, table building and the LLVM look-up sum
against plain numpy, then whole MaxSim batches (many query lengths, several table groups,
threads) against the decode-and-multiply reference."""

import numpy as np
import pytest
from numba import njit

from hybridsearch.retrievers import _nibbles, multivector
from hybridsearch.retrievers.colbert_codec import ColbertCodec
from hybridsearch.retrievers.multivector import CodedColbertStore, coded_maxsim_reference


@njit
def _sums(table, res, nbytes, rows, out):
    acc = np.empty(_nibbles.BLOCK_ROWS, np.float32)
    for t in range(res.shape[0]):
        _nibbles.nibble_sum(table, res, t, nbytes, rows, acc)
        out[t, :rows] = acc[:rows]


def test_layout_covers_every_dimension_once():
    rng = np.random.default_rng(0)
    w4 = np.sort(rng.standard_normal((8, 16)), axis=1)
    w2 = np.sort(rng.standard_normal((12, 4)), axis=1)
    weights, first, count = _nibbles.layout((8, 12, 16), w4, w2)
    assert weights.shape == (8 + 6 + 4, 16, 4)
    covered = np.concatenate([np.arange(f, f + c) for f, c in zip(first, count)])
    np.testing.assert_array_equal(covered, np.arange(36))
    # a 2-bit nibble v: low 2 bits are its first dimension's level, high 2 bits the second's
    np.testing.assert_allclose(weights[8, 0b1110, :2], [w2[0, 2], w2[1, 3]], rtol=1e-6)
    # a 1-bit nibble is worth its bits; slots past count stay 0
    np.testing.assert_array_equal(weights[14, 0b0101], [1, 0, 1, 0])
    assert not weights[0, :, 1:].any() and not weights[8, :, 2:].any()


@pytest.mark.parametrize("parallel", [False, True])
def test_build_tables_matches_reference(parallel):
    rng = np.random.default_rng(1)
    weights, first, count = _nibbles.layout((4, 8, 32), rng.standard_normal((4, 16)),
                                            rng.standard_normal((8, 4)))
    lengths = np.array([8, 40, 0, 72, 16])  # blocks of 32 rows, then 8, 16 or 24
    q_off8 = np.concatenate([[0], np.cumsum(lengths)])
    coded = rng.standard_normal((q_off8[-1], 44)).astype(np.float32)
    ne = 16 * weights.shape[0]
    out = np.full(q_off8[-1] * ne, np.nan, np.float32)
    build = _nibbles.build_tables_parallel if parallel else _nibbles.build_tables
    build(np.ascontiguousarray(coded.T), q_off8, weights, first, count, out)
    assert not np.isnan(out).any()
    for b in range(len(lengths)):
        r0, r1 = q_off8[b], q_off8[b + 1]
        ref = _nibbles.tables_reference(coded[r0:r1], weights, first, count).reshape(ne, -1)
        for j in range(0, r1 - r0, 32):
            rows = min(32, r1 - r0 - j)
            got = out[ne * (r0 + j):ne * (r0 + j + rows)].reshape(ne, rows)
            np.testing.assert_allclose(got, ref[:, j:j + rows], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [8, 16, 24, 32])
def test_nibble_sum_matches_reference(rows):
    rng = np.random.default_rng(rows)
    nb = 48
    table = rng.standard_normal(32 * nb * rows).astype(np.float32)
    res = rng.integers(0, 256, (3000, nb), dtype=np.uint8)
    res[0] = 0
    res[1] = 255  # the first and last entries of every position
    for nbytes in (0, 1, 17, nb):
        got = np.zeros((res.shape[0], 32), np.float32)
        _sums(table, res, nbytes, rows, got)
        want = np.array([_nibbles.nibble_sum_reference(table, r, nbytes, rows) for r in res])
        np.testing.assert_allclose(got[:, :rows], want, rtol=1e-5, atol=1e-5)


def test_nibble_sum_rejects_non_contiguous_rows():
    table = np.zeros(32 * 8 * 8, np.float32)
    res = np.zeros((4, 16), np.uint8)[:, ::2]
    with pytest.raises(Exception, match="C-contiguous"):
        _sums(table, res, 8, 8, np.zeros((4, 32), np.float32))


@pytest.fixture(scope="module")
def store():
    rng = np.random.default_rng(7)
    lengths = rng.integers(0, 60, 4000)
    lengths[[5, 17]] = 0
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    x = rng.standard_normal((offsets[-1], 128)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    codec = ColbertCodec.train(x[:20000], nbits=1, k=64, seed=3, transform=True)
    assert codec.transform and not codec.renorm
    return CodedColbertStore.from_arrays(x, offsets, codec), rng


@pytest.mark.parametrize("threads", [1, 2])
def test_maxsim_batch_matches_reference_across_lengths_and_groups(store, threads, monkeypatch):
    import numba

    st, rng = store
    lengths = [0, 1, 7, 8, 9, 31, 32, 33, 64, 70, 5, 3]
    q_offsets = np.concatenate([[0], np.cumsum(lengths)])
    Q = rng.standard_normal((q_offsets[-1], 128)).astype(np.float32)
    per = [rng.choice(st.n_docs, 150) for _ in lengths]
    cand = np.concatenate(per)
    cand_offsets = np.concatenate([[0], np.cumsum([len(p) for p in per])])
    old = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        whole = st.maxsim_batch(Q, q_offsets, cand, cand_offsets)
        # tables for a few queries at a time (several groups, each its own kernel call)
        monkeypatch.setattr(multivector, "LUT_BATCH_BYTES", 40 * 16 * 4 * 32)
        monkeypatch.setattr(multivector, "PARALLEL_MIN_QUERIES", 2)
        monkeypatch.setattr(multivector, "PARALLEL_MIN_FLOPS", 0)
        assert len(st._query_groups(q_offsets)) > 3
        grouped = st.maxsim_batch(Q, q_offsets, cand, cand_offsets)
    finally:
        numba.set_num_threads(old)
    for b, rows in enumerate(per):
        q = Q[q_offsets[b]:q_offsets[b + 1]]
        want = coded_maxsim_reference(q, st, rows) if len(q) else np.zeros(len(rows), np.float32)
        sl = slice(cand_offsets[b], cand_offsets[b + 1])
        np.testing.assert_allclose(whole[sl], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(grouped[sl], want, rtol=1e-5, atol=1e-5)
    assert np.all(whole[cand_offsets[0]:cand_offsets[1]] == 0)  # a query without vectors


def test_search_equals_brute_force_at_size(store):
    """Exhaustive search over 4,000 documents (every one scored by the nibble kernel) against
    the reference's own top 10, for queries of several lengths."""
    st, rng = store
    for m in (3, 16, 40):
        q = rng.standard_normal((m, 128)).astype(np.float32)
        s, i = st.search(q, 10, exhaustive=True)
        ref = coded_maxsim_reference(q, st, np.arange(st.n_docs))
        top = np.lexsort((np.arange(st.n_docs), -ref))[:10]
        np.testing.assert_allclose(s, ref[i], rtol=1e-5, atol=1e-5)
        assert len(set(i.tolist()) & set(top.tolist())) >= 9  # near-ties may swap at the edge
        np.testing.assert_allclose(np.sort(s), np.sort(ref[top]), rtol=1e-5, atol=1e-5)


def test_store_refuses_residuals_of_another_width(store):
    st, _ = store
    with pytest.raises(ValueError, match="residuals"):
        CodedColbertStore(st.codes, st.residuals[:, :-1], st.offsets, st.codec)
    with pytest.raises(ValueError, match="residuals"):
        CodedColbertStore(st.codes[:-1], st.residuals, st.offsets, st.codec)
