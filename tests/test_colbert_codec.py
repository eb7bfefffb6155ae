"""Residual ColBERT codec (train / encode / decode / files) and token pooling against references."""

import json
import mmap as _mmap

import numpy as np
import pytest

from hybridsearch.errors import IndexFormatError
from hybridsearch.retrievers import _nibbles, colbert_codec, multivector
from hybridsearch.retrievers.colbert_codec import (
    ColbertCodec,
    default_k,
    parse_codec,
    pool_tokens,
    pool_tokens_reference,
    unpack_buckets,
)
from hybridsearch.retrievers.multivector import (
    CodedColbertStore,
    ColbertStore,
    coded_maxsim_reference,
    maxsim_reference,
    write_colbert,
)


def clustered(rng, n, d, topics=64, noise=0.6):
    """Unit token vectors near a few topic directions (closer to real ColBERT vectors than noise)."""
    centers = rng.standard_normal((topics, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    v = centers[rng.integers(0, topics, n)] + noise * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data128():
    rng = np.random.default_rng(0)
    return clustered(rng, 6000, 128)


@pytest.fixture(scope="module")
def codec128(data128):
    """A uniform-layout (codec format 1) 1-bit codec."""
    return ColbertCodec.train(data128[:4000], nbits=1, k=64, seed=0, transform=False)


@pytest.fixture(scope="module")
def codec128t(data128):
    """A transform-layout (codec format 2) 1-bit codec."""
    return ColbertCodec.train(data128[:4000], nbits=1, k=64, seed=0)


def test_parse_codec():
    assert parse_codec("res1") == {"name": "res1", "kind": "residual", "nbits": 1, "pool": 1}
    assert parse_codec("res2")["nbits"] == 2
    assert parse_codec("res1-pool2")["pool"] == 2
    assert parse_codec("fp16")["kind"] == "fp16"
    with pytest.raises(ValueError, match="fp16, res1, res2, res1-pool2"):
        parse_codec("res4")


def test_default_k():
    assert default_k(10_000) == min(1024, colbert_codec.K_MAX)  # 16 * 100 = 1600 -> 1024, capped
    assert default_k(1_000) == 256  # 16 * 31.6 = 506 -> 256
    assert default_k(10**8) == colbert_codec.K_MAX


@pytest.mark.parametrize("transform", [False, True])
@pytest.mark.parametrize("nbits, min_cos", [(1, 0.88), (2, 0.94)])
@pytest.mark.parametrize("dim", [128, 1024])
def test_round_trip(dim, nbits, min_cos, transform):
    # Measured mean cosine, 1 / 2 bits: d=128 0.915 / 0.968, d=1024 0.919 / 0.962 (the centroid
    # alone: about 0.79); the transform layout on this isotropic noise (nothing to gain from a
    # rotation): 0.916 / 0.966 and 0.923 / 0.953.
    rng = np.random.default_rng(dim + nbits)
    x = clustered(rng, 3000, dim)
    codec = ColbertCodec.train(x[:2000], nbits=nbits, k=64, transform=transform)
    assert codec.transform == transform
    assert codec.k == 64 and codec.dim == dim and codec.bytes_per_token == 2 + dim * nbits // 8
    ids, res = codec.encode(x[2000:].astype(np.float16))
    assert ids.dtype == np.uint16 and ids.shape == (1000,)
    assert res.dtype == np.uint8 and res.shape == (1000, dim * nbits // 8)
    dec = codec.decode(ids, res)
    assert dec.dtype == np.float32 and dec.shape == (1000, dim)
    np.testing.assert_allclose(dec, codec.decode_reference(ids, res), atol=1e-5)
    cos = (dec * x[2000:]).sum(axis=1) / np.linalg.norm(dec, axis=1)
    assert cos.mean() > min_cos, cos.mean()
    # Renormalised decoding: unit rows in the same directions.
    unit = codec.with_options(renorm=True)
    assert unit.identity != codec.identity
    got = unit.decode(ids, res)
    np.testing.assert_allclose(got, unit.decode_reference(ids, res), atol=1e-5)
    np.testing.assert_allclose(got, dec / np.linalg.norm(dec, axis=1, keepdims=True), atol=1e-5)
    # The Numba residual kernel against numpy (a value on a cutoff may round either way).
    ref_ids, ref_res = codec.encode_reference(x[2000:].astype(np.float16))
    assert (ids == ref_ids).mean() > 0.999 and (res == ref_res).mean() > 0.999
    # The id is the nearest centroid, and every bucket is used.
    np.testing.assert_array_equal(ids, np.argmax(x[2000:] @ codec.centroids.T, axis=1))
    byte = 0
    for width, count in zip(colbert_codec.WIDTHS, codec.sections):
        if count:
            nb = count * width // 8
            counts = np.bincount(unpack_buckets(res[:, byte:byte + nb], width).ravel(),
                                 minlength=1 << width)
            assert (counts > 0.1 * counts.sum() / (1 << width)).all(), (width, counts)
            byte += nb
    assert byte == res.shape[1]


def test_encode_in_chunks_equals_one_chunk(codec128, data128, monkeypatch):
    ids, res = codec128.encode(data128[4000:])
    monkeypatch.setattr(colbert_codec, "ENCODE_CHUNK_BYTES", 1)  # 256-token chunks
    ids2, res2 = codec128.encode(data128[4000:])
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_array_equal(res, res2)
    e_ids, e_res = codec128.encode(np.zeros((0, 128), np.float32))
    assert e_ids.shape == (0,) and e_res.shape == (0, 16) and codec128.decode(e_ids, e_res).shape == (0, 128)


def test_bad_inputs(codec128, data128):
    with pytest.raises(ValueError, match="multiple of 8"):
        ColbertCodec.train(data128[:100, :12])
    with pytest.raises(ValueError, match="nbits"):
        ColbertCodec.train(data128[:100], nbits=3)
    with pytest.raises(ValueError, match="finite"):
        ColbertCodec.train(np.where(np.arange(128) == 5, np.nan, data128[:100]), k=4)
    with pytest.raises(ValueError, match="training rows"):
        ColbertCodec.train(data128[:20], k=64)
    with pytest.raises(ValueError, match=r"\(T, 128\)"):
        codec128.encode(data128[:5, :64])
    ids, res = codec128.encode(data128[:5])
    with pytest.raises(ValueError, match="< k"):
        codec128.decode(np.full(5, 64, np.uint16), res)
    with pytest.raises(ValueError, match="uint8"):
        codec128.decode(ids, res[:, :8])


def test_k_defaults_and_caps(data128):
    codec = ColbertCodec.train(data128[:300], nbits=1, total_tokens=10**6, transform=False)
    assert codec.k == 256  # capped to the k-means rows (285), rounded down to a power of two
    assert codec.trained_on == 300
    # A transform codec holds out half of a small sample for its per-dimension statistics.
    assert ColbertCodec.train(data128[:300], nbits=1, total_tokens=10**6).k == 128


def test_save_load(codec128, data128, tmp_path):
    names = codec128.save(tmp_path)
    assert sorted(names) == sorted(p.name for p in tmp_path.iterdir())
    meta = json.loads((tmp_path / "codec.json").read_text())
    assert meta == {"format_version": 1, "kind": "residual", "nbits": 1, "pool": 1, "dim": 128,
                    "k": 64, "renorm": False, "trained_on": 4000}
    back = ColbertCodec.load(tmp_path, dim=128)
    assert back.identity == codec128.identity and back.name == "res1"
    ids, res = codec128.encode(data128[4000:4100])
    np.testing.assert_array_equal(back.decode(ids, res), codec128.decode(ids, res))
    with pytest.raises(IndexFormatError, match="dim"):
        ColbertCodec.load(tmp_path, dim=256)


def test_transform_save_load(codec128t, data128, tmp_path):
    names = codec128t.save(tmp_path)
    assert sorted(names) == sorted(p.name for p in tmp_path.iterdir())
    assert "rotation.npy" in names and "fill.npy" in names
    meta = json.loads((tmp_path / "codec.json").read_text())
    assert meta == {"format_version": 2, "kind": "residual", "nbits": 1, "pool": 1, "dim": 128,
                    "k": 64, "renorm": False, "trained_on": 4000, "transform": True,
                    "sections": list(codec128t.sections)}
    back = ColbertCodec.load(tmp_path, dim=128)
    assert back.transform and back.identity == codec128t.identity
    ids, res = codec128t.encode(data128[4000:4100])
    np.testing.assert_array_equal(back.decode(ids, res), codec128t.decode(ids, res))
    np.testing.assert_array_equal(back.encode(data128[4000:4100])[1], res)


def test_transform_wins_on_anisotropic_vectors():
    """Token vectors that live in a low-dimensional subspace (as learned ColBERT vectors largely
    do; those of a 384-d trunk under a 1024-d head exactly) waste most of a uniform code's bits.
    The transform layout spends them where the residual varies. Measured at seed 0 (256-d
    vectors, 48-d subspace): mean cosine uniform 0.948, transform 0.997."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((256, 48)))[0].T.astype(np.float32)
    x = clustered(rng, 12000, 48, topics=32) @ basis
    codecs = {t: ColbertCodec.train(x[:10000], nbits=1, k=64, transform=t) for t in (False, True)}
    assert codecs[True].n_coded < 256 and codecs[False].n_coded == 256
    cos = {}
    for t, codec in codecs.items():
        dec = codec.decode(*codec.encode(x[10000:]))
        cos[t] = ((dec * x[10000:]).sum(axis=1) / np.linalg.norm(dec, axis=1)).mean()
    assert 1 - cos[True] < (1 - cos[False]) / 4, cos


def test_rotated_queries_keep_dot_products(codec128t, data128):
    ids, res = codec128t.encode(data128[:50])
    q = data128[100:108]
    native = codec128t.decode_native(ids, res)
    np.testing.assert_allclose(codec128t.rotate(q) @ native.T, q @ codec128t.decode(ids, res).T,
                               atol=1e-5)


def _write(folder, name, value):
    p = folder / name
    p.unlink()
    if name.endswith(".json"):
        p.write_text(value if isinstance(value, str) else json.dumps(value))
    else:
        np.save(p, value)


@pytest.mark.parametrize("name, value, match", [
    ("codec.json", "{not json", "codec.json"),
    ("codec.json", [1, 2], "codec.json"),
    ("codec.json", {"format_version": 1, "kind": "residual", "nbits": 3, "pool": 1, "dim": 128,
                    "k": 64, "renorm": True, "trained_on": 1}, "nbits"),
    ("codec.json", {"format_version": 1, "kind": "residual", "nbits": 1, "pool": 1, "dim": 128,
                    "k": 70000, "renorm": True, "trained_on": 1}, "'k'"),
    ("codec.json", {"format_version": 1, "kind": "residual", "nbits": 1, "pool": 1, "dim": 128,
                    "k": 64, "renorm": 1, "trained_on": 1}, "renorm"),
    ("codec.json", {"format_version": 9, "kind": "residual", "nbits": 1, "pool": 1, "dim": 128,
                    "k": 64, "renorm": True, "trained_on": 1}, "Upgrade"),
    ("centroids.npy", np.zeros((64, 128), np.float16), "centroids.npy.*dtype"),
    ("centroids.npy", np.zeros((63, 128), np.float32), "centroids.npy.*shape"),
    ("centroids.npy", np.full((64, 128), np.nan, np.float32), "centroids.npy.*non-finite"),
    ("cutoffs.npy", np.array([np.inf], np.float32), "cutoffs.npy.*non-finite"),
    ("weights.npy", np.array([0.1, -0.1], np.float32), "weights.npy.*ascending"),
    ("weights.npy", np.zeros(3, np.float32), "weights.npy.*shape"),
])
def test_hostile_codec_files(codec128, tmp_path, name, value, match):
    codec128.save(tmp_path)
    _write(tmp_path, name, value)
    with pytest.raises(IndexFormatError, match=match):
        ColbertCodec.load(tmp_path)


def _transform_meta(codec, **change):
    meta = {"format_version": 2, "kind": "residual", "nbits": 1, "pool": 1, "dim": 128,
            "k": 64, "renorm": False, "trained_on": 1, "transform": True,
            "sections": list(codec.sections)}
    meta.update(change)
    return meta


@pytest.mark.parametrize("name, value, match", [
    ("codec.json", dict(sections=[8, 8]), "sections"),
    ("codec.json", dict(sections=[4, 8, 8]), "multiples of 8"),
    ("codec.json", dict(sections=[0, 0, 64]), "128 bits"),
    ("codec.json", dict(sections=[0, True, 0]), "sections"),
    ("codec.json", dict(transform="yes"), "transform"),
    ("rotation.npy", "not orthogonal", "orthogonal"),
    ("rotation.npy", np.zeros((128, 64), np.float32), "rotation.npy.*shape"),
    ("fill.npy", np.full(128, np.inf, np.float32), "fill.npy.*non-finite"),
    ("cutoffs.npy", "descending row", "cutoffs.npy.*ascending"),
    ("weights.npy", np.zeros((8, 16), np.float32), "weights.npy.*shape"),
])
def test_hostile_transform_files(codec128t, tmp_path, name, value, match):
    codec128t.save(tmp_path)
    if isinstance(value, dict):
        value = _transform_meta(codec128t, **value)
    elif isinstance(value, str) and value == "not orthogonal":
        value = codec128t.rotation * np.float32(1.5)
    elif isinstance(value, str) and value == "descending row":
        value = codec128t.cutoffs.copy()
        value[0] = value[0][::-1].copy()
        value[0, 0] += 1.0
    _write(tmp_path, name, value)
    with pytest.raises(IndexFormatError, match=match):
        ColbertCodec.load(tmp_path)


def test_transform_file_missing(codec128t, tmp_path):
    codec128t.save(tmp_path)
    (tmp_path / "rotation.npy").unlink()
    with pytest.raises(IndexFormatError, match="rotation.npy"):
        ColbertCodec.load(tmp_path)


def test_codec_links_and_missing(codec128, tmp_path):
    codec128.save(tmp_path / "a")
    (tmp_path / "a" / "weights.npy").unlink()
    with pytest.raises(IndexFormatError, match="weights.npy"):
        ColbertCodec.load(tmp_path / "a")
    codec128.save(tmp_path / "b")
    (tmp_path / "b" / "codec.json").rename(tmp_path / "elsewhere.json")
    (tmp_path / "b" / "codec.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(IndexFormatError, match="codec.json"):
        ColbertCodec.load(tmp_path / "b")


# ---------------------------------------------------------------- pooling


@pytest.mark.parametrize("factor", [2, 3])
def test_pool_tokens_matches_reference(factor):
    rng = np.random.default_rng(factor)
    lengths = np.array([0, 1, 2, 3, 5, 8, 0, 17, 40, 1])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    x = clustered(rng, int(offsets[-1]), 32, topics=6)
    got, got_off = pool_tokens(x, offsets, factor)
    want, want_off = pool_tokens_reference(x, offsets, factor)
    np.testing.assert_array_equal(got_off, want_off)
    np.testing.assert_array_equal(np.diff(got_off), -(-lengths // factor))
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    # A single token passes through (normalised); a two-token doc pooled by 2 is their mean.
    one = offsets[1]
    np.testing.assert_allclose(got[got_off[1]], x[one], atol=1e-6)
    if factor == 2:
        pair = x[offsets[2]:offsets[3]].sum(axis=0)
        np.testing.assert_allclose(got[got_off[2]], pair / np.linalg.norm(pair), atol=1e-6)


def test_pool_tokens_merges_similar_tokens():
    # Tokens 0/2 and 1/3 are near-duplicates: pooling by 2 must pair them, not neighbours.
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((2, 16)).astype(np.float32)
    x = np.stack([a, b, a + 0.01, b + 0.01])
    got, off = pool_tokens(x, np.array([0, 4]), 2)
    assert off.tolist() == [0, 2]
    assert got[0] @ (a / np.linalg.norm(a)) > 0.999 and got[1] @ (b / np.linalg.norm(b)) > 0.999


def test_pool_tokens_long_docs_use_windows(monkeypatch):
    monkeypatch.setattr(colbert_codec, "POOL_WINDOW", 8)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((21, 16)).astype(np.float32)
    offsets = np.array([0, 21])
    got, off = pool_tokens(x, offsets, 2)
    want, _ = pool_tokens_reference(x, offsets, 2)
    assert off.tolist() == [0, 11]
    np.testing.assert_allclose(got, want, atol=1e-6)
    # Windows of 8, 8 and 5 tokens pool separately.
    first, _ = pool_tokens_reference(x[:8], np.array([0, 8]), 2)
    np.testing.assert_allclose(got[:4], first, atol=1e-6)


def test_pool_tokens_bad_input():
    with pytest.raises(ValueError, match="offsets"):
        pool_tokens(np.zeros((3, 8), np.float32), np.array([0, 4]), 2)
    with pytest.raises(ValueError, match="factor"):
        pool_tokens(np.zeros((3, 8), np.float32), np.array([0, 3]), 0)
    got, off = pool_tokens(np.zeros((0, 8), np.float32), np.array([0, 0, 0]), 2)
    assert got.shape == (0, 8) and off.tolist() == [0, 0, 0]


# ---------------------------------------------------------------- the coded store


def topic_corpus(rng, n_docs, d, topics=100, per_doc=4, lengths=(0, 40), noise=1.0, n_queries=20):
    """Docs whose tokens lie near a few of ``topics`` directions (plus a shared direction, as
    real ColBERT vectors have), queries near two topics of a random doc."""
    centers = rng.standard_normal((topics, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    common = rng.standard_normal(d).astype(np.float32)
    common /= np.linalg.norm(common)

    def tokens(topic_ids):
        v = 0.5 * common + centers[topic_ids] + noise * rng.standard_normal(
            (len(topic_ids), d)).astype(np.float32) / np.sqrt(d)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    own = np.stack([rng.choice(topics, per_doc, replace=False) for _ in range(n_docs)])
    lens = rng.integers(lengths[0], lengths[1], n_docs)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    vectors = tokens(np.concatenate([rng.choice(own[i], lens[i]) for i in range(n_docs)]).astype(int))
    queries = [tokens(rng.choice(own[i][:2], 16)) for i in rng.integers(0, n_docs, n_queries)]
    return vectors, offsets, queries


@pytest.fixture(scope="module", params=["transform", "uniform"])
def small(request):
    """d=64 corpus (empty docs included) and a 1-bit codec trained on it, in either layout."""
    rng = np.random.default_rng(7)
    vectors, offsets, queries = topic_corpus(rng, 60, 64, topics=12, lengths=(0, 12))
    codec = ColbertCodec.train(vectors, nbits=1, k=16, transform=request.param == "transform")
    return vectors, offsets, queries, codec


def test_coded_store_maxsim_matches_reference(small, monkeypatch):
    vectors, offsets, queries, codec = small
    store = CodedColbertStore.from_arrays(vectors, offsets, codec)
    assert store.n_docs == 60 and store.dim == 64 and store.bytes_per_token == 2 + 8
    assert store.codes.dtype == np.uint16 and store.residuals.shape == (offsets[-1], 8)
    cand = np.array([5, 0, 59, 1, 5, 22, 17, 3, 40], np.int64)
    for q in queries[:5] + [queries[0][:1], queries[1][:7]]:
        want = coded_maxsim_reference(q, store, cand)
        np.testing.assert_allclose(store.maxsim(q, cand), want, rtol=1e-5, atol=1e-5)
    empty = np.flatnonzero(np.diff(offsets) == 0)
    assert empty.size and (store.maxsim(queries[0], empty) == 0).all()
    # Batched, on the pool too.
    monkeypatch.setattr(multivector, "PARALLEL_MIN_FLOPS", 0)
    rng = np.random.default_rng(1)
    cands = [rng.integers(0, 60, n) for n in (6, 0, 60, 3)]
    qs = queries[:4]
    got = store.maxsim_batch(np.concatenate(qs), np.concatenate([[0], np.cumsum([len(q) for q in qs])]),
                             np.concatenate(cands), np.concatenate([[0], np.cumsum([len(c) for c in cands])]))
    want = np.concatenate([coded_maxsim_reference(q, store, c) for q, c in zip(qs, cands)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _check_topk(scores, ids, full, k):
    """``(scores, ids)`` is a correct top-k of ``full`` (ties at the cut tolerated)."""
    want = np.sort(full)[::-1][:k]
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(full[ids], scores, rtol=1e-5, atol=1e-5)
    assert len(set(ids.tolist())) == k


@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("blocked", [False, True])
def test_coded_search_equals_brute_force(small, monkeypatch, blocked, renorm):
    vectors, offsets, queries, codec = small
    if renorm:
        codec = codec.with_options(renorm=True)
    if blocked:
        monkeypatch.setattr(multivector, "SEARCH_BLOCKED_MIN_QUERY", 1)
        monkeypatch.setattr(multivector, "SEARCH_BLOCK_TOKENS", 16)  # many blocks, some one doc
    store = CodedColbertStore.from_arrays(vectors, offsets, codec)
    # long queries take the blocked path only where it pays: a renormalising codec
    assert store._blocked_pays() == codec.renorm
    calls = []
    real = CodedColbertStore.scores_blocked
    monkeypatch.setattr(CodedColbertStore, "scores_blocked", lambda *a, **k: calls.append(1) or real(*a, **k))
    decoded = codec.decode_reference(store.codes, store.residuals)
    docs = [decoded[offsets[i]:offsets[i + 1]] for i in range(60)]
    for q in queries[:4]:
        full = maxsim_reference(q, docs)
        calls.clear()
        scores, ids = store.search(q, 7)
        assert bool(calls) == (blocked and codec.renorm)
        _check_topk(scores, ids, full, 7)
        np.testing.assert_allclose(store.scores_blocked(q, block_tokens=5), full, rtol=1e-5, atol=1e-5)
    allowed = np.random.default_rng(2).random(60) < 0.6
    scores, ids = store.search(queries[0], 100, allowed=allowed)
    n = int(allowed.sum())
    assert sorted(ids[:n]) == list(np.flatnonzero(allowed))
    assert (ids[n:] == -1).all() and (scores[n:] == 0).all()
    full = maxsim_reference(queries[0], docs)
    np.testing.assert_allclose(scores[:n], full[ids[:n]], rtol=1e-5, atol=1e-5)


def test_pooled_store(small):
    vectors, offsets, queries, codec = small
    pooled = codec.with_options(pool=2)
    store = CodedColbertStore.from_arrays(vectors, offsets, pooled)
    np.testing.assert_array_equal(np.diff(store.offsets), -(-np.diff(offsets) // 2))
    pv, po = pool_tokens(vectors, offsets, 2)
    ids, res = pooled.encode(pv)
    np.testing.assert_array_equal(store.codes, ids)
    np.testing.assert_array_equal(store.residuals, res)
    assert store.bytes_per_token == 10


def test_quality_at_1024_against_float16():
    """Coded MaxSim search must mostly agree with float16 search on clustered 1024-d tokens.

    Measured (400 docs of 10-40 tokens, 20 queries of 16 tokens, k=64): top-10 / top-1
    agreement at seed 0 res1 0.85 / 0.95, res2 0.925 / 0.95, res1-pool2 0.855 / 0.85; lowest over
    seeds 0-4: 0.76 / 0.85, 0.85 / 0.85, 0.775 / 0.85. A wrong bit order or bucket scores ~0.1.
    """
    rng = np.random.default_rng(0)
    vectors, offsets, queries = topic_corpus(rng, 400, 1024, topics=150, lengths=(10, 40))
    fp16 = ColbertStore.from_arrays(vectors, offsets)
    want = [fp16.search(q, 10)[1] for q in queries]
    for spec, bound in (("res1", 0.7), ("res2", 0.8), ("res1-pool2", 0.7)):
        p = parse_codec(spec)
        codec = ColbertCodec.train(vectors, nbits=p["nbits"], pool=p["pool"], k=64)
        store = CodedColbertStore.from_arrays(vectors, offsets, codec)
        got = [store.search(q, 10)[1] for q in queries]
        agree = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want, got)])
        top1 = np.mean([a[0] == b[0] for a, b in zip(want, got)])
        assert agree >= bound and top1 >= 0.75, (spec, agree, top1)


# ---------------------------------------------------------------- merges: write_colbert


def _tokens(store, rows):
    return np.concatenate([np.arange(store.offsets[r], store.offsets[r + 1]) for r in rows]
                          + [np.zeros(0, np.int64)]).astype(np.int64)


def _local_offsets(store, rows):
    return np.concatenate([[0], np.cumsum(store.offsets[np.asarray(rows) + 1]
                                          - store.offsets[np.asarray(rows)])]).astype(np.int64)


@pytest.fixture(scope="module")
def merge_inputs(small):
    vectors, offsets, _, codec = small
    other = ColbertCodec.train(vectors, nbits=2, k=8, seed=3)
    fp16 = ColbertStore.from_arrays(vectors, offsets)
    same = CodedColbertStore.from_arrays(vectors[::-1].copy(), offsets[-1] - offsets[::-1], codec)
    diff = CodedColbertStore.from_arrays(vectors, offsets, other)
    rows = (np.array([0, 2, 3, 10, 11]), np.array([1, 4, 59]), np.array([0, 5, 6, 30]))
    return codec, (fp16, same, diff), rows


@pytest.mark.parametrize("chunk_tokens", [1 << 18, 7])
def test_write_colbert_codes(merge_inputs, tmp_path, chunk_tokens):
    codec, stores, rows = merge_inputs
    files = write_colbert(tmp_path, "m", zip(stores, rows), codec, chunk_tokens=chunk_tokens)
    assert sorted(files) == ["m_codes.npy", "m_offsets.npy", "m_residuals.npy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)
    out = CodedColbertStore.load(tmp_path, "m", codec=codec, n_docs=12, dim=64)
    fp16, same, diff = stores
    want_ids, want_res = [], []
    i, r = codec.encode(fp16.vectors[_tokens(fp16, rows[0])])
    want_ids.append(i), want_res.append(r)
    t = _tokens(same, rows[1])
    want_ids.append(same.codes[t]), want_res.append(same.residuals[t])
    t = _tokens(diff, rows[2])
    i, r = codec.encode(diff.codec.decode(diff.codes[t], diff.residuals[t]))
    want_ids.append(i), want_res.append(r)
    want_off = np.concatenate([[0], np.cumsum(np.concatenate(
        [np.diff(s.offsets)[r] for s, r in zip(stores, rows)]))])
    np.testing.assert_array_equal(out.offsets, want_off)
    ids, res = np.concatenate(want_ids), np.concatenate(want_res)
    if chunk_tokens > 1000:  # one encode call per source, as above
        np.testing.assert_array_equal(out.codes, ids)
        np.testing.assert_array_equal(out.residuals, res)
    else:  # other batch positions: allow a rare near-tie to code differently
        assert (out.codes == ids).mean() > 0.98 and (out.residuals == res).mean() > 0.98
    np.testing.assert_array_equal(out.codes[want_off[5]:want_off[8]], same.codes[_tokens(same, rows[1])])


def test_write_colbert_float16_and_pooling(merge_inputs, tmp_path):
    codec, stores, rows = merge_inputs
    fp16, same, diff = stores
    (tmp_path / "a").mkdir()
    files = write_colbert(tmp_path / "a", "m", zip(stores, rows), None, chunk_tokens=5)
    assert sorted(files) == ["m_offsets.npy", "m_vectors.npy"]
    out = ColbertStore.load(tmp_path / "a", "m", n_docs=12)
    parts = [fp16.vectors[_tokens(fp16, rows[0])]]
    for s, r in ((same, rows[1]), (diff, rows[2])):
        t = _tokens(s, r)
        parts.append(s.codec.decode(s.codes[t], s.residuals[t]).astype(np.float16))
    # Decoding a transform codec rotates back by BLAS, whose rounding depends on the chunk.
    np.testing.assert_allclose(out.vectors.astype(np.float32), np.concatenate(parts).astype(np.float32),
                               rtol=0, atol=1e-3)
    # A pooling codec pools what was not pooled and copies its own codes.
    pooled = codec.with_options(pool=2)
    mine = CodedColbertStore.from_arrays(fp16.vectors, fp16.offsets, pooled)
    srcs = [(fp16, rows[0]), (mine, rows[1]), (diff, rows[2])]
    (tmp_path / "b").mkdir()
    write_colbert(tmp_path / "b", "m", srcs, pooled)
    out = CodedColbertStore.load(tmp_path / "b", "m", codec=pooled, n_docs=12)
    t = _tokens(fp16, rows[0])
    v, o1 = pool_tokens(fp16.vectors[t], _local_offsets(fp16, rows[0]), 2)
    i1, r1 = pooled.encode(v)
    t = _tokens(mine, rows[1])
    i2, r2 = mine.codes[t], mine.residuals[t]
    t = _tokens(diff, rows[2])
    v, o3 = pool_tokens(diff.codec.decode(diff.codes[t], diff.residuals[t]), _local_offsets(diff, rows[2]), 2)
    i3, r3 = pooled.encode(v)
    np.testing.assert_array_equal(out.codes, np.concatenate([i1, i2, i3]))
    np.testing.assert_array_equal(out.residuals, np.concatenate([r1, r2, r3]))
    lens = np.concatenate([np.diff(o1), np.diff(mine.offsets)[rows[1]], np.diff(o3)])
    np.testing.assert_array_equal(np.diff(out.offsets), lens)


def test_write_colbert_empty_and_bad(merge_inputs, tmp_path):
    codec, stores, rows = merge_inputs
    files = write_colbert(tmp_path, "e", [], codec)
    out = CodedColbertStore.load(tmp_path, "e", codec=codec, n_docs=0)
    assert out.n_docs == 0 and out.codes.shape == (0,) and sorted(files) == [
        "e_codes.npy", "e_offsets.npy", "e_residuals.npy"]
    write_colbert(tmp_path, "z", [(stores[0], np.zeros(0, np.int64))], None)
    assert ColbertStore.load(tmp_path, "z", n_docs=0).vectors.shape == (0, 64)
    with pytest.raises(ValueError, match="cand"):
        write_colbert(tmp_path, "x", [(stores[0], np.array([60]))], codec)
    with pytest.raises(ValueError, match="dim"):
        write_colbert(tmp_path, "x", [], None)


# ---------------------------------------------------------------- hostile store files


def file_backed(a):
    while a is not None:
        if isinstance(a, (np.memmap, _mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False


def _saved(small, folder):
    vectors, offsets, _, codec = small
    store = CodedColbertStore.from_arrays(vectors, offsets, codec)
    assert sorted(store.save(folder, "c")) == ["c_codes.npy", "c_offsets.npy", "c_residuals.npy"]
    return store


def test_coded_store_round_trip(small, tmp_path):
    store = _saved(small, tmp_path)
    codec, q = small[3], small[2][0]
    for mmap in (True, False):
        back = CodedColbertStore.load(tmp_path, "c", mmap=mmap, dim=64, n_docs=60, codec=codec)
        assert file_backed(back.codes) == file_backed(back.residuals) == mmap
        np.testing.assert_array_equal(back.codes, store.codes)
        np.testing.assert_array_equal(back.residuals, store.residuals)
        np.testing.assert_array_equal(back.maxsim(q, np.arange(60)), store.maxsim(q, np.arange(60)))


@pytest.mark.parametrize("name, bad, match", [
    ("codes", lambda s: np.where(np.arange(s.codes.size) == 7, 16, s.codes).astype(np.uint16),
     "c_codes.npy.*>= k=16"),
    ("codes", lambda s: s.codes.astype(np.int32), "c_codes.npy.*dtype"),
    ("codes", lambda s: s.codes[:-1], "c_residuals.npy.*shape"),
    ("residuals", lambda s: s.residuals[:, :4], "c_residuals.npy.*shape"),
    ("residuals", lambda s: s.residuals.astype(np.int8), "c_residuals.npy.*dtype"),
    ("offsets", lambda s: s.offsets[:-1], "c_offsets.npy.*shape"),
    ("offsets", lambda s: np.append(s.offsets[:-1], s.offsets[-1] + 1), "c_offsets.npy.*end at"),
    ("offsets", lambda s: s.offsets[::-1].copy(), "c_offsets.npy"),
])
def test_hostile_store_files(small, tmp_path, name, bad, match):
    store = _saved(small, tmp_path)
    np.save(tmp_path / f"c_{name}.npy", bad(store))
    with pytest.raises(IndexFormatError, match=match):
        CodedColbertStore.load(tmp_path, "c", dim=64, n_docs=60, codec=small[3], check=True)


def test_hostile_store_misc(small, tmp_path):
    store = _saved(small, tmp_path)
    codec = small[3]
    with pytest.raises(IndexFormatError, match="missing.*nope_codes.npy"):
        CodedColbertStore.load(tmp_path, "nope", codec=codec)
    with pytest.raises(IndexFormatError, match="dim"):
        CodedColbertStore.load(tmp_path, "c", dim=128, codec=codec)
    # Out-of-range codes are only found by the O(T) check.
    np.save(tmp_path / "c_codes.npy", np.full_like(store.codes, 65535))
    CodedColbertStore.load(tmp_path, "c", codec=codec, check=False)
    with pytest.raises(IndexFormatError, match="65535"):
        CodedColbertStore.load(tmp_path, "c", codec=codec, check=True)
    (tmp_path / "c_codes.npy").unlink()
    (tmp_path / "c_codes.npy").symlink_to(tmp_path / "c_offsets.npy")
    with pytest.raises(IndexFormatError, match="c_codes.npy"):
        CodedColbertStore.load(tmp_path, "c", codec=codec)


def test_renormalised_store_uses_the_full_decode(small, monkeypatch):
    """Without renormalisation the kernel scores base + coded dimensions apart; a renormalising
    codec decodes whole tokens. Both agree with the numpy reference, serial and parallel."""
    vectors, offsets, queries, codec = small
    for c in (codec, codec.with_options(renorm=True)):
        store = CodedColbertStore.from_arrays(vectors, offsets, c)
        args = store._query_args(queries[0], np.array([0, len(queries[0])]))
        assert (args[3] is None) == c.renorm
        cand = np.arange(60)
        for q in queries[:3]:
            np.testing.assert_allclose(store.maxsim(q, cand), coded_maxsim_reference(q, store, cand),
                                       rtol=1e-5, atol=1e-5)
        monkeypatch.setattr(multivector, "PARALLEL_MIN_FLOPS", 0)
        np.testing.assert_allclose(store.maxsim(queries[1], cand),
                                   coded_maxsim_reference(queries[1], store, cand), rtol=1e-5, atol=1e-5)
        monkeypatch.undo()


@pytest.mark.parametrize("nbits", [1, 2])
@pytest.mark.parametrize("transform", [False, True])
def test_nibble_tables_match_relative_decode(data128, nbits, transform):
    """The split kernel's scores past the base (nibble tables of the folded query rows, summed
    over each token's residual nibbles) against the plain per-dimension decode times the
    rotated rows."""
    codec = ColbertCodec.train(data128[:3000], nbits=nbits, k=32, seed=1, transform=transform)
    n4, n2, n1 = codec.sections
    if transform:
        assert n4 + n2 > 0 and n1 > 0  # the test covers mixed sections
    ids, res = codec.encode(data128[3000:3400])
    nc = codec.n_coded
    _, w4, w2, d1, _ = codec.kernel_tables()
    want = np.zeros(400 * nc, np.float32)
    colbert_codec._decode_relative(res, 0, 400, w4, w2, d1, nc, want)
    q = data128[5000:5016]
    coded, cs = codec.split_query(q)
    weights, first, count = codec.nibble_layout()
    assert weights.shape[0] == 2 * res.shape[1] and int(count.sum()) == nc
    table = _nibbles.tables_reference(coded, weights, first, count).reshape(-1, q.shape[0])
    x = res.astype(np.int64)
    entries = np.concatenate([32 * np.arange(res.shape[1]) + (x & 15),
                              32 * np.arange(res.shape[1]) + 16 + (x >> 4)], axis=1)
    got = table[entries].sum(axis=1).T  # (16 rows, 400 tokens)
    rq = codec.rotate(q)[:, :nc].astype(np.float64)
    np.testing.assert_allclose(got, rq @ want.reshape(400, nc).T, rtol=1e-4, atol=2e-5)
    # split_query: the coded columns of the rotated rows, the 1-bit ones times d1; rows x bases.
    q = data128[5000:5010]
    coded, cs = codec.split_query(q)
    rq = codec.rotate(q)
    np.testing.assert_allclose(coded[:, :n4 + n2], rq[:, :n4 + n2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(coded[:, n4 + n2:], rq[:, n4 + n2:nc] * d1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cs, rq @ codec.kernel_tables()[0].T, rtol=1e-5, atol=1e-5)
