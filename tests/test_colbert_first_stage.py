"""ColBERT first stage from the codebook's centroids (centroid_stage) and the coded store's
search through it: kernels against plain numpy, search against the exhaustive MaxSim."""

import numba
import numpy as np
import pytest

from hybridsearch.errors import IndexFormatError
from hybridsearch.retrievers import centroid_stage as cst
from hybridsearch.retrievers import multivector
from hybridsearch.retrievers.colbert_codec import ColbertCodec
from hybridsearch.retrievers.multivector import CodedColbertStore, ColbertStore

DIM = 32


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _corpus(seed, n_docs, topics=40, dirs=400, per_topic=12):
    """Documents of 0..30 tokens around topic directions (a structure the centroids can see)."""
    rng = np.random.default_rng(seed)
    pool = _unit(rng.standard_normal((dirs, DIM)))
    own = rng.integers(0, dirs, (topics, per_topic))
    lengths = rng.integers(0, 31, n_docs)
    lengths[[3, 50]] = 0
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    topic = np.repeat(rng.integers(0, topics, n_docs), lengths)
    a = np.where(rng.random(len(topic)) < 0.7, own[topic, rng.integers(0, per_topic, len(topic))],
                 rng.integers(0, dirs, len(topic)))
    vecs = _unit(pool[a] + 0.4 * pool[rng.integers(0, dirs, len(topic))])
    return vecs, offsets, pool, own, rng


def _queries(vecs, offsets, pool, rng, nq=12):
    out = []
    for _ in range(nq):
        d = int(rng.integers(0, len(offsets) - 1))
        toks = vecs[offsets[d]:offsets[d + 1]]
        mine = toks[rng.choice(len(toks), min(6, len(toks)), replace=False)] if len(toks) else toks
        other = pool[rng.integers(0, len(pool), int(rng.integers(2, 9)))]
        out.append(_unit(np.concatenate([mine, other]) + 0.1 * rng.standard_normal((len(mine) + len(other), DIM))))
    return out


@pytest.fixture(scope="module")
def coded():
    vecs, offsets, pool, own, rng = _corpus(0, 3000)
    codec = ColbertCodec.train(vecs[:20000], nbits=2, k=64)
    store = CodedColbertStore.from_arrays(vecs, offsets, codec)
    return store, _queries(vecs, offsets, pool, rng)


# ------------------------------------------------------------------ kernels vs numpy


@pytest.mark.parametrize("k", [1, 64, 200, 300])
def test_centroid_bits_match_reference(k):
    rng = np.random.default_rng(k)
    lengths = rng.integers(0, 50, 5000)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    codes = rng.integers(0, k, int(offsets[-1])).astype(np.uint16)
    got = cst.centroid_bits(codes, offsets, k)
    assert got.dtype == np.uint64 and got.shape == (5000, -(-k // 64))
    np.testing.assert_array_equal(got, cst.centroid_bits_reference(codes, offsets, k))


def test_centroid_bits_refuse_codes_past_k():
    offsets = np.array([0, 2, 3], np.int64)
    with pytest.raises(IndexFormatError, match="k=5"):
        cst.centroid_bits(np.array([1, 5, 0], np.uint16), offsets, 5)


@pytest.mark.parametrize("m", [0, 1, 7, 32, 45])
def test_integer_scores_and_dequantised_scores(m):
    rng = np.random.default_rng(m)
    k, n = 150, 4000
    lengths = rng.integers(0, 25, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    codes = rng.integers(0, k, int(offsets[-1])).astype(np.uint16)
    cs = (rng.standard_normal((m, k)) * 0.3 + rng.standard_normal((m, 1)) * 0.2).astype(np.float32)
    quant = cst.Quantised(cs)
    bits = cst.centroid_bits(codes, offsets, k)
    rows, ints = cst.top_candidates(bits, lengths == 0, quant, n)  # every doc
    np.testing.assert_array_equal(rows, np.arange(n))
    want = cst.integer_scores_reference(quant.table, m, quant.empty, codes, offsets)
    np.testing.assert_array_equal(ints, want)
    exact = cst.centroid_scores_reference(cs, codes, offsets)
    # per query vector the rounding is at most scale / 2; the empty docs' integer is the nearest to 0
    np.testing.assert_allclose(quant.dequantise(ints), exact, atol=quant.scale / 2 + 1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_top_candidates_are_the_best_allowed(threads, monkeypatch):
    monkeypatch.setattr(cst, "CHUNK_DOCS", 256)  # several parallel chunks at this size
    rng = np.random.default_rng(5)
    k, n = 256, 6000
    lengths = rng.integers(0, 40, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    codes = rng.integers(0, k, int(offsets[-1])).astype(np.uint16)
    quant = cst.Quantised(rng.standard_normal((20, k)).astype(np.float32))
    bits = cst.centroid_bits(codes, offsets, k)
    full = cst.integer_scores_reference(quant.table, 20, quant.empty, codes, offsets)
    old = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        for allowed in (None, rng.random(n) < 0.3, np.zeros(n, bool), np.eye(1, n, 17, dtype=bool)[0]):
            ok = np.ones(n, bool) if allowed is None else allowed
            for want in (1, 100, 1000, n):
                rows, ints = cst.top_candidates(bits, lengths == 0, quant, want, allowed, threads)
                assert len(rows) == min(want, int(ok.sum()))
                assert ok[rows].all() and len(np.unique(rows)) == len(rows)
                np.testing.assert_array_equal(ints, full[rows])
                rest = np.setdiff1d(np.flatnonzero(ok), rows)
                if len(rows) and len(rest):
                    assert ints.min() >= full[rest].max()  # ties may fall either way
    finally:
        numba.set_num_threads(old)


# ------------------------------------------------------------------ store search vs exhaustive


def _recall(a, b):
    a, b = set(a[a >= 0].tolist()), set(b[b >= 0].tolist())
    return len(a & b) / max(1, len(b))


def test_first_stage_search_vs_exhaustive(coded):
    store, queries = coded
    recalls = []
    for q in queries:
        s_ex, i_ex = store.search(q, 10, exhaustive=True)
        s, i = store.search(q, 10, candidates=300)
        # exact scores for what it returns
        np.testing.assert_allclose(s, store.maxsim(q, i), rtol=1e-5, atol=1e-6)
        assert np.all(np.diff(s) <= 0)
        recalls.append(_recall(i, i_ex))
        # candidates >= docs: the exhaustive search itself
        s_all, i_all = store.search(q, 10, candidates=store.n_docs)
        np.testing.assert_array_equal(i_all, i_ex)
    assert np.mean(recalls) >= 0.85, recalls  # k=64 centroids for 400 directions: coarse on purpose


def test_first_stage_rows_scores_and_order(coded):
    store, queries = coded
    q = queries[0]
    rows, approx = store.first_stage(q, 200)
    assert rows.dtype == np.int64 and approx.dtype == np.float32 and len(rows) == 200
    assert np.all(np.diff(approx) <= 0)
    vecs_ref = cst.centroid_scores_reference(q @ store.codec.centroids.T, store.codes, store.offsets)
    table = store.centroid_table(q)
    np.testing.assert_allclose(approx, vecs_ref[rows], atol=table.scale / 2 + 1e-5)
    assert approx.min() >= vecs_ref[np.setdiff1d(np.arange(store.n_docs), rows)].max() - table.scale
    # a table computed once serves the same codec
    r2, a2 = store.first_stage(q, 200, table=table)
    np.testing.assert_array_equal(r2, rows)


def test_masks_never_leak_and_fill_k(coded):
    store, queries = coded
    rng = np.random.default_rng(1)
    n = store.n_docs
    for density in (0.5, 0.02, 0.0):
        allowed = rng.random(n) < density
        allowed[[5, 9, 3]] = density > 0  # docs 3 is empty
        for q in queries[:4]:
            for k in (1, 10, 80):
                s, i = store.search(q, k, allowed, candidates=40)
                got = i[i >= 0]
                assert allowed[got].all()
                assert len(got) == min(k, int(allowed.sum()))
                s_ex, i_ex = store.search(q, k, allowed, exhaustive=True)
                if allowed.sum() <= 40:  # everything allowed fits the candidates
                    np.testing.assert_array_equal(i, i_ex)


def test_empty_query_and_threads(coded):
    store, queries = coded
    s, i = store.search(np.zeros((0, DIM), np.float32), 5)
    np.testing.assert_array_equal(s, 0)
    np.testing.assert_array_equal(i, np.arange(5))  # every score 0: lower rows first, as exhaustive
    old = numba.get_num_threads()
    try:
        res = []
        for t in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(t)
            res.append([store.search(q, 10, candidates=200) for q in queries])
    finally:
        numba.set_num_threads(old)
    for (s1, i1), (s2, i2) in zip(*res):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-6)


def test_centroid_sets_built_once_across_threads(coded):
    from concurrent.futures import ThreadPoolExecutor

    store, _ = coded
    fresh = CodedColbertStore(store.codes, store.residuals, store.offsets, store.codec)
    with ThreadPoolExecutor(4) as ex:
        sets = list(ex.map(lambda _: fresh.centroid_sets(), range(8)))
    assert all(s is sets[0] for s in sets)
    np.testing.assert_array_equal(sets[0][0], cst.centroid_bits_reference(store.codes, store.offsets, store.codec.k))


def test_uniform_codec_and_float16_store():
    vecs, offsets, pool, own, rng = _corpus(2, 1500)
    codec = ColbertCodec.train(vecs[:15000], nbits=1, k=128, transform=False)  # format 1 layout
    store = CodedColbertStore.from_arrays(vecs, offsets, codec)
    fp16 = ColbertStore.from_arrays(vecs, offsets)
    rec = []
    for q in _queries(vecs, offsets, pool, rng, 8):
        s, i = store.search(q, 10, candidates=200)
        np.testing.assert_allclose(s, store.maxsim(q, i), rtol=1e-5, atol=1e-6)
        rec.append(_recall(i, store.search(q, 10, exhaustive=True)[1]))
        # float16 stores: always exhaustive; their first stage is the exact top n
        np.testing.assert_array_equal(fp16.search(q, 10)[1], fp16.search(q, 10, exhaustive=True)[1])
        r, a = fp16.first_stage(q, 25)
        np.testing.assert_array_equal(r, fp16.search(q, 25)[1])
        np.testing.assert_allclose(a, fp16.maxsim(q, r), rtol=1e-5, atol=1e-6)
    assert np.mean(rec) >= 0.9, rec


def test_bad_codes_in_an_unchecked_store_raise(tmp_path, coded):
    store, queries = coded
    store.save(tmp_path)
    codes = np.load(tmp_path / "colbert_codes.npy")
    codes[7] = store.codec.k + 3
    np.save(tmp_path / "colbert_codes.npy", codes)
    with pytest.raises(IndexFormatError):
        CodedColbertStore.load(tmp_path, codec=store.codec)
    unchecked = CodedColbertStore.load(tmp_path, codec=store.codec, check=False)
    with pytest.raises(IndexFormatError, match="centroid id"):
        unchecked.search(queries[0], 5, candidates=20)  # few enough for the first stage to run


def test_argument_checks(coded):
    store, queries = coded
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="candidates"):
            store.search(queries[0], 5, candidates=bad)
    with pytest.raises(ValueError, match="allowed"):
        store.first_stage(queries[0], 5, np.ones(3, bool))
    other = CodedColbertStore.from_arrays(np.eye(DIM, dtype=np.float32)[:8], np.array([0, 4, 8]),
                                          ColbertCodec.train(np.eye(DIM, dtype=np.float32), nbits=1, k=4))
    with pytest.raises(ValueError, match="centroids"):
        store.first_stage(queries[0], 5, table=other.centroid_table(queries[0]))
    assert multivector.FIRST_STAGE_CANDIDATES >= 10


# ------------------------------------------------------------------ through HybridIndex


def _index_batch(rng, n, spec, pool, own):
    import scipy.sparse as sp

    from hybridsearch.representations import Encoded

    dense = _unit(rng.standard_normal((n, spec.dim)))
    indptr = np.arange(n + 1, dtype=np.int64)
    sparse = sp.csr_matrix((np.ones(n, np.float32), rng.integers(5, spec.vocab_size, n), indptr), shape=(n, spec.vocab_size))
    lengths = rng.integers(1, 16, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    topic = np.repeat(rng.integers(0, len(own), n), lengths)
    a = np.where(rng.random(len(topic)) < 0.7, own[topic, rng.integers(0, own.shape[1], len(topic))],
                 rng.integers(0, len(pool), len(topic)))
    colbert = _unit(pool[a] + 0.3 * pool[rng.integers(0, len(pool), len(topic))])
    colbert = colbert.astype(np.float16).astype(np.float32)
    return Encoded(dense, sparse, colbert, offsets, lengths + 1)


@pytest.fixture(scope="module")
def grown(tmp_path_factory, m3_encoder):
    """An index of 4 commits of 150 (the first float16, before the codebook; the rest coded),
    no merging, some documents deleted; plus its ColBERT query pool."""
    from hybridsearch import HybridIndex

    spec = m3_encoder.spec
    rng = np.random.default_rng(21)
    pool = _unit(rng.standard_normal((120, spec.colbert_dim)))
    own = rng.integers(0, 120, (15, 6))
    idx = HybridIndex.create(tmp_path_factory.mktemp("fs") / "ix", m3_encoder, colbert_codec="res2",
                             codec_train_tokens=1500, merge_policy=None)
    for c in range(4):
        docs = [{"id": f"c{c}-{j}", "text": f"w{j % 7} w{c}", "metadata": {"g": int(j % 3)}} for j in range(150)]
        idx.add(docs, encoded=_index_batch(rng, 150, spec, pool, own))
    idx.delete([f"c{c}-{j}" for c in range(4) for j in range(0, 150, 11)])
    return idx, pool, own


def test_index_colbert_mode_first_stage_vs_exhaustive(grown, m3_encoder):
    idx, pool, own = grown
    kinds = [s.colbert_kind for s in idx._current().segments]
    assert kinds[0] == "fp16" and kinds.count("codes") == 3  # an old-style segment beside coded ones
    rng = np.random.default_rng(4)
    q = _index_batch(rng, 8, m3_encoder.spec, pool, own)
    queries = [f"q{j}" for j in range(8)]
    deleted = {f"c{c}-{j}" for c in range(4) for j in range(0, 150, 11)}
    for flt in (None, {"g": 1}):
        kw = dict(k=10, mode="colbert", filter=flt, query_encoded=q)
        ex = idx.search_batch(queries, exhaustive=True, **kw)
        same = idx.search_batch(queries, candidates=10_000, **kw)  # every document rescored: exhaustive
        fs = idx.search_batch(queries, candidates=40, **kw)
        recalls = []
        for e, s, f in zip(ex, same, fs):
            assert [h.id for h in s] == [h.id for h in e]
            np.testing.assert_allclose([h.score for h in s], [h.score for h in e], atol=1e-5)
            assert len(f) == 10
            for h in f:
                assert h.id not in deleted
                assert flt is None or idx.get(h.id)["metadata"]["g"] == 1
            exact = {h.id: h.score for h in e}
            for h in f:  # exact scores for what the first stage kept
                if h.id in exact:
                    assert h.score == pytest.approx(exact[h.id], abs=1e-5)
            assert all(a.score >= b.score for a, b in zip(f, f[1:]))
            recalls.append(len(exact.keys() & {h.id for h in f}) / 10)
        assert np.mean(recalls) >= 0.8, recalls


def test_index_colbert_mode_arguments(grown, m3_encoder):
    idx, pool, own = grown
    q = _index_batch(np.random.default_rng(5), 1, m3_encoder.spec, pool, own)
    hits = idx.search("q", k=3, mode="colbert", query_encoded=q)  # default candidates
    assert len(hits) == 3
    with pytest.raises(ValueError, match="candidates"):
        idx.search("q", k=3, mode="colbert", query_encoded=q, candidates=0)


def test_partial_maxsim_matches_reference(coded):
    store, queries = coded
    codec = store.codec
    assert codec.transform and not codec.renorm
    base = codec.kernel_tables()[0]
    n4, n2, n1 = codec.sections
    nc = codec.n_coded
    cand = np.array([0, 3, 7, 50, 2999, 11, 7], np.int64)  # empty docs and repeats
    for dims in (0, 1, n4, n4 + 5, n4 + n2, n4 + n2 + 9, nc, nc + 100):
        nbytes = store._leading_bytes(dims)
        b4, b2 = n4 // 2, n2 // 4
        kept = 2 * min(nbytes, b4) + 4 * min(max(nbytes - b4, 0), b2) + 8 * max(nbytes - b4 - b2, 0)
        assert kept <= max(dims, 0) and (dims < nc or kept == nc)
        for q in queries[:3]:
            docs = []
            for c in cand:
                lo, hi = int(store.offsets[c]), int(store.offsets[c + 1])
                x = codec.decode_native(store.codes[lo:hi], store.residuals[lo:hi])
                x[:, kept:nc] = base[store.codes[lo:hi].astype(np.int64), kept:nc]  # bucket 0
                docs.append(x)
            want = multivector.maxsim_reference(codec.rotate(q), docs)
            np.testing.assert_allclose(store.partial_maxsim(q, cand, dims), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(store.partial_maxsim(queries[0], cand, nc), store.maxsim(queries[0], cand),
                               rtol=1e-5, atol=1e-6)


def test_refinement_depth_is_used(coded, monkeypatch):
    store, queries = coded
    seen = []
    real = CodedColbertStore.first_stage
    monkeypatch.setattr(CodedColbertStore, "first_stage",
                        lambda self, q, n, allowed=None, **kw: seen.append(n) or real(self, q, n, allowed, **kw))
    store.search(queries[0], 5, candidates=20)
    store.search(queries[0], 5, candidates=5)  # at least 1/16 of the allowed documents
    allowed = np.zeros(store.n_docs, bool)
    allowed[:1000] = True
    store.search(queries[0], 5, allowed, candidates=5)
    assert seen == [20 * multivector.REFINE_DEPTH, -(-store.n_docs // multivector.REFINE_SHARE),
                    5 * multivector.REFINE_DEPTH]


def test_index_with_a_format_1_codebook(tmp_path, m3_encoder, monkeypatch):
    """Indexes whose codebook predates the transform layout (codec format 1) answer through the
    first stage too (two stages: no leading dimensions to refine on)."""
    import json

    from hybridsearch import HybridIndex
    from hybridsearch.retrievers import colbert_codec

    monkeypatch.setitem(colbert_codec.INDEX_TRAINING, "res2",
                        dict(colbert_codec.INDEX_TRAINING["res2"], transform=False))
    spec = m3_encoder.spec
    rng = np.random.default_rng(8)
    pool = _unit(rng.standard_normal((120, spec.colbert_dim)))
    own = rng.integers(0, 120, (15, 6))
    idx = HybridIndex.create(tmp_path / "ix", m3_encoder, colbert_codec="res2", codec_train_tokens=500,
                             merge_policy=None)
    for c in range(2):
        idx.add([{"id": f"c{c}-{j}", "text": "w"} for j in range(200)], encoded=_index_batch(rng, 200, spec, pool, own))
    m = json.loads((idx.path / "manifest.json").read_text())
    codec_json = json.loads((idx.path / m["channels"]["colbert_codec"]["codebook"] / "codec.json").read_text())
    assert codec_json["format_version"] == 1
    assert [s.colbert_kind for s in idx._current().segments] == ["codes", "codes"]
    monkeypatch.undo()
    idx = HybridIndex.open(idx.path, m3_encoder)
    assert all(not s.colbert._refines() and s.colbert._has_first_stage() for s in idx._current().segments)
    q = _index_batch(rng, 6, spec, pool, own)
    queries = [f"q{j}" for j in range(6)]
    ex = idx.search_batch(queries, k=10, mode="colbert", query_encoded=q, exhaustive=True)
    fs = idx.search_batch(queries, k=10, mode="colbert", query_encoded=q, candidates=60)
    rec = []
    for e, f in zip(ex, fs):
        exact = {h.id: h.score for h in e}
        assert len(f) == 10
        for h in f:
            if h.id in exact:
                assert h.score == pytest.approx(exact[h.id], abs=1e-5)
        rec.append(len(exact.keys() & {h.id for h in f}) / 10)
    assert np.mean(rec) >= 0.8, rec
