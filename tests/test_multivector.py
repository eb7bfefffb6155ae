"""ColbertStore MaxSim (Numba, float16 storage) against the numpy einsum reference."""

import mmap as _mmap

import numpy as np
import pytest
from numba import njit

from hybridsearch.errors import IndexFormatError
from hybridsearch.representations import colbert_score
from hybridsearch.retrievers import multivector
from hybridsearch.retrievers.multivector import ColbertStore, maxsim_reference

DIM = 16


def unit_rows(rng, n, d=DIM):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def corpus():
    """40 docs of 0..9 vectors (several empty, odd and even lengths), float32 originals."""
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 10, 40)
    lengths[[0, 17, 39]] = 0
    lengths[1] = 1
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    vectors = unit_rows(rng, int(offsets[-1]))
    queries = [unit_rows(rng, m) for m in (1, 3, 4, 5, 9)]
    return vectors, offsets, queries


def docs_of(store, vectors, offsets, cand, upcast):
    src = store.vectors if upcast else vectors
    return [src[offsets[c]:offsets[c + 1]] for c in cand]


def test_maxsim_matches_references(corpus):
    vectors, offsets, queries = corpus
    store = ColbertStore.from_arrays(vectors, offsets)
    assert store.vectors.dtype == np.float16 and store.offsets.dtype == np.int64
    cand = np.array([5, 0, 39, 1, 5, 22, 17, 3], np.int64)  # unsorted, repeated, empty docs
    for q in queries:
        got = store.maxsim(q, cand)
        assert got.dtype == np.float32 and got.shape == cand.shape
        exact = maxsim_reference(q, docs_of(store, vectors, offsets, cand, upcast=True))
        np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-6)
        loose = maxsim_reference(q, docs_of(store, vectors, offsets, cand, upcast=False))
        np.testing.assert_allclose(got, loose, rtol=1e-3, atol=1e-3)
        assert got[1] == got[2] == got[6] == 0  # docs without vectors
        one = colbert_score(q, store.vectors[offsets[1]:offsets[2]])
        assert got[3] == pytest.approx(one, rel=1e-5)


def test_empty_query_and_candidates(corpus):
    vectors, offsets, _ = corpus
    store = ColbertStore.from_arrays(vectors, offsets)
    np.testing.assert_array_equal(store.maxsim(np.zeros((0, DIM), np.float32), np.arange(4)), 0)
    assert store.maxsim(vectors[:2], np.zeros(0, np.int64)).shape == (0,)
    assert maxsim_reference(np.zeros((0, DIM)), [vectors[:3]])[0] == 0


@pytest.mark.parametrize("parallel", [False, True])
def test_maxsim_batch_equals_single_queries(corpus, monkeypatch, parallel):
    vectors, offsets, queries = corpus
    if parallel:
        monkeypatch.setattr(multivector, "PARALLEL_MIN_FLOPS", 0)
    store = ColbertStore.from_arrays(vectors, offsets)
    rng = np.random.default_rng(1)
    qs = queries + [np.zeros((0, DIM), np.float32)]
    cands = [rng.integers(0, 40, n) for n in (6, 0, 40, 3, 11, 5)]  # a query with no candidates
    Q = np.concatenate(qs)
    q_offsets = np.concatenate([[0], np.cumsum([len(q) for q in qs])])
    cand_offsets = np.concatenate([[0], np.cumsum([len(c) for c in cands])])
    got = store.maxsim_batch(Q, q_offsets, np.concatenate(cands), cand_offsets)
    want = np.concatenate([maxsim_reference(q, docs_of(store, vectors, offsets, c, True))
                           for q, c in zip(qs, cands)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_search_exhaustive(corpus):
    vectors, offsets, queries = corpus
    store = ColbertStore.from_arrays(vectors, offsets)
    allowed = np.random.default_rng(2).random(40) < 0.5
    q = queries[2]
    full = maxsim_reference(q, docs_of(store, vectors, offsets, range(40), True))
    scores, ids = store.search(q, 5)
    np.testing.assert_allclose(scores, np.sort(full)[::-1][:5], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(full[ids], scores, rtol=1e-5, atol=1e-6)
    scores, ids = store.search(q, 60, allowed=allowed)
    n = int(allowed.sum())
    assert sorted(ids[:n]) == list(np.flatnonzero(allowed))
    assert (ids[n:] == -1).all() and (scores[n:] == 0).all()
    assert np.all(np.diff(scores[:n]) <= 0)


def file_backed(a):
    while a is not None:
        if isinstance(a, (np.memmap, _mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(corpus, tmp_path, mmap):
    vectors, offsets, queries = corpus
    store = ColbertStore.from_arrays(vectors, offsets)
    store.save(tmp_path, prefix="seg1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg1_offsets.npy", "seg1_vectors.npy"]
    back = ColbertStore.load(tmp_path, prefix="seg1", mmap=mmap)
    assert file_backed(back.vectors) == mmap and back.vectors.dtype == np.float16
    np.testing.assert_array_equal(back.vectors, store.vectors)
    np.testing.assert_array_equal(back.offsets, store.offsets)
    cand = np.arange(40)
    np.testing.assert_array_equal(back.maxsim(queries[4], cand), store.maxsim(queries[4], cand))


def test_load_errors(corpus, tmp_path):
    vectors, offsets, _ = corpus
    ColbertStore.from_arrays(vectors, offsets).save(tmp_path)
    with pytest.raises(IndexFormatError, match="missing"):
        ColbertStore.load(tmp_path, prefix="nope")
    np.save(tmp_path / "colbert_offsets.npy", np.append(offsets[:-1], offsets[-1] + 1))
    with pytest.raises(IndexFormatError, match="end at"):
        ColbertStore.load(tmp_path)
    np.save(tmp_path / "colbert_vectors.npy", vectors)
    with pytest.raises(IndexFormatError, match="dtype"):
        ColbertStore.load(tmp_path)


def test_bad_inputs(corpus):
    vectors, offsets, queries = corpus
    store = ColbertStore.from_arrays(vectors, offsets)
    with pytest.raises(ValueError, match="end at"):
        ColbertStore.from_arrays(vectors, np.append(offsets[:-1], offsets[-1] + 1))
    with pytest.raises(ValueError, match="never decrease"):
        ColbertStore.from_arrays(vectors, offsets[::-1])
    with pytest.raises(ValueError, match="float16"):
        ColbertStore.from_arrays(vectors * 1e6, offsets)
    with pytest.raises(TypeError):
        ColbertStore.from_arrays(vectors.astype(np.int32), offsets)
    with pytest.raises(ValueError, match=r"\(m, 16\)"):
        store.maxsim(queries[0][:, :8], np.arange(3))
    with pytest.raises(ValueError, match="cand"):
        store.maxsim(queries[0], np.array([40]))
    with pytest.raises(ValueError, match="k must"):
        store.search(queries[0], 0)
    with pytest.raises(ValueError, match="bool"):
        store.search(queries[0], 3, allowed=np.ones(40, np.int8))
    with pytest.raises(ValueError, match="same number"):
        store.maxsim_batch(queries[1], [0, 1, 3], np.arange(3), [0, 3])


@njit
def _widen_all(bits):
    out = np.empty(bits.shape[0], np.float32)
    for i in range(bits.shape[0]):
        out[i] = multivector._half_to_float(bits[i])
    return out


def test_half_to_float_is_exact():
    bits = np.arange(2**16, dtype=np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    got = _widen_all(bits)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))
    assert np.array_equal(got[np.isinf(want)], want[np.isinf(want)])
    assert np.isnan(got[np.isnan(want)]).all()


@pytest.mark.parametrize("block_tokens", [1, 7, 1 << 13])
def test_blocked_scores_and_search(corpus, monkeypatch, block_tokens):
    vectors, offsets, queries = corpus
    store = ColbertStore.from_arrays(vectors, offsets)
    docs = docs_of(store, vectors, offsets, range(40), True)
    for q in queries:
        full = maxsim_reference(q, docs)
        np.testing.assert_allclose(store.scores_blocked(q, block_tokens=block_tokens), full,
                                   rtol=1e-5, atol=1e-6)
    # search() takes the blocked path for long queries.
    monkeypatch.setattr(multivector, "SEARCH_BLOCKED_MIN_QUERY", 1)
    monkeypatch.setattr(multivector, "SEARCH_BLOCK_TOKENS", block_tokens)
    calls = []
    real = ColbertStore.scores_blocked
    monkeypatch.setattr(ColbertStore, "scores_blocked", lambda *a, **k: calls.append(1) or real(*a, **k))
    q = queries[4]
    full = maxsim_reference(q, docs)
    scores, ids = store.search(q, 5)
    assert calls
    np.testing.assert_allclose(scores, np.sort(full)[::-1][:5], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(full[ids], scores, rtol=1e-5, atol=1e-6)
    allowed = np.zeros(40, bool)
    allowed[[3, 17, 20]] = True
    scores, ids = store.search(q, 5, allowed=allowed)  # few allowed: the kernel on those rows
    assert sorted(ids[:3]) == [3, 17, 20] and (ids[3:] == -1).all()
    np.testing.assert_allclose(full[ids[:3]], scores[:3], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- many stores in one pass


@pytest.fixture(scope="module")
def segment_stores():
    """Six stores like an index's segments: float16 ones and ones coded by a transform and a
    uniform codebook (64-d, 1 bit), documents of 0-30 tokens."""
    from hybridsearch.retrievers.colbert_codec import ColbertCodec
    from hybridsearch.retrievers.multivector import CodedColbertStore

    rng = np.random.default_rng(11)
    d = 64
    train = unit_rows(rng, 4000, d)
    codecs = [ColbertCodec.train(train, nbits=1, k=16, transform=t) for t in (True, False)]
    stores = []
    for i in range(6):
        lengths = rng.integers(0, 30, 150 + 40 * i)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        v = unit_rows(rng, int(offsets[-1]), d)
        if i % 3 == 0:
            stores.append(ColbertStore.from_arrays(v, offsets))
        else:
            stores.append(CodedColbertStore.from_arrays(v, offsets, codecs[i % 3 - 1]))
    return stores, [unit_rows(rng, m, d) for m in (1, 7, 32)]


@pytest.mark.parametrize("parallel", [False, True])
def test_maxsim_many_equals_one_store_at_a_time(segment_stores, monkeypatch, parallel):
    if parallel:  # every batch through the thread pool, in many small items
        monkeypatch.setattr(multivector, "PARALLEL_MIN_FLOPS", 0)
        monkeypatch.setattr(multivector, "MANY_ITEMS_PER_THREAD", 50)
    stores, queries = segment_stores
    rng = np.random.default_rng(5)
    for q in queries:
        parts = [(s, rng.choice(s.n_docs, size=int(rng.integers(0, 60)), replace=True)) for s in stores]
        parts[2] = (stores[2], np.zeros(0, np.int64))  # a segment with no candidate
        got = multivector.maxsim_many(q, parts)
        assert [g.shape for g in got] == [(len(r),) for _, r in parts]
        for (s, rows), g in zip(parts, got):
            np.testing.assert_allclose(g, s.maxsim(q, rows), rtol=1e-5, atol=1e-6)
            if isinstance(s, ColbertStore):
                want = maxsim_reference(q, [s.vectors[s.offsets[r]:s.offsets[r + 1]] for r in rows])
            else:
                want = multivector.coded_maxsim_reference(q, s, rows)
            np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5)
    assert multivector.maxsim_many(queries[0], []) == []
    with pytest.raises(ValueError, match="cand rows"):
        multivector.maxsim_many(queries[0], [(stores[0], [stores[0].n_docs])])
    with pytest.raises(ValueError, match=r"q must be \(m, 64\)"):
        multivector.maxsim_many(queries[0][:, :8], [(stores[0], [0])])


def test_maxsim_many_from_many_threads(segment_stores, monkeypatch):
    """Callers on several threads share the pool; each gets its own scores."""
    import concurrent.futures

    monkeypatch.setattr(multivector, "PARALLEL_MIN_FLOPS", 0)
    stores, queries = segment_stores
    rng = np.random.default_rng(8)
    cases = []
    for i in range(24):
        q = queries[i % 3]
        parts = [(s, rng.integers(0, s.n_docs, 40)) for s in stores]
        cases.append((q, parts, [s.maxsim(q, r) for s, r in parts]))
    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        results = list(ex.map(lambda c: multivector.maxsim_many(c[0], c[1]), cases))
    for (_, _, want), got in zip(cases, results):
        for w, g in zip(want, got):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_maxsim_many_after_fork(segment_stores, monkeypatch):
    """A child forked after the pool started gets its own pool (the parent's threads do not
    exist in it; submitting to the inherited pool would wait forever)."""
    import multiprocessing as mp

    monkeypatch.setattr(multivector, "PARALLEL_MIN_FLOPS", 0)
    stores, queries = segment_stores
    parts = [(s, np.arange(min(20, s.n_docs))) for s in stores]
    want = [w.tolist() for w in multivector.maxsim_many(queries[2], parts)]  # starts the pool here
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_many_in_child, (queries[2], parts)).get(timeout=120)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def _many_in_child(q, parts):
    multivector.PARALLEL_MIN_FLOPS = 0
    return [r.tolist() for r in multivector.maxsim_many(q, parts)]
