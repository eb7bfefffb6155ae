"""Residual ColBERT codec (train / encode / decode / files) and token pooling against references."""

import json

import numpy as np
import pytest

from hybridsearch.errors import IndexFormatError
from hybridsearch.retrievers import colbert_codec
from hybridsearch.retrievers.colbert_codec import (
    ColbertCodec, default_k, parse_codec, pool_tokens, pool_tokens_reference, unpack_buckets)


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
    return ColbertCodec.train(data128[:4000], nbits=1, k=64, seed=0)


def test_parse_codec():
    assert parse_codec("res1") == {"name": "res1", "kind": "residual", "nbits": 1, "pool": 1}
    assert parse_codec("res2")["nbits"] == 2
    assert parse_codec("res1-pool2")["pool"] == 2
    assert parse_codec("fp16")["kind"] == "fp16"
    with pytest.raises(ValueError, match="fp16, res1, res2, res1-pool2"):
        parse_codec("res4")


def test_default_k():
    assert default_k(10_000) == 1024  # 16 * 100 = 1600 -> 1024
    assert default_k(1_000) == 256  # 16 * 31.6 = 506 -> 256
    assert default_k(10**8) == colbert_codec.K_MAX


@pytest.mark.parametrize("nbits, min_cos", [(1, 0.88), (2, 0.95)])
@pytest.mark.parametrize("dim", [128, 1024])
def test_round_trip(dim, nbits, min_cos):
    # Measured mean cosine (seed 0): d=128 0.91 / 0.96, d=1024 0.90 / 0.96 for 1 / 2 bits.
    rng = np.random.default_rng(dim + nbits)
    x = clustered(rng, 3000, dim)
    codec = ColbertCodec.train(x[:2000], nbits=nbits, k=64)
    assert codec.k == 64 and codec.dim == dim and codec.bytes_per_token == 2 + dim * nbits // 8
    ids, res = codec.encode(x[2000:].astype(np.float16))
    assert ids.dtype == np.uint16 and ids.shape == (1000,)
    assert res.dtype == np.uint8 and res.shape == (1000, dim * nbits // 8)
    dec = codec.decode(ids, res)
    assert dec.dtype == np.float32 and dec.shape == (1000, dim)
    np.testing.assert_allclose(dec, codec.decode_reference(ids, res), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(dec, axis=1), 1, atol=1e-5)
    cos = (dec * x[2000:]).sum(axis=1)
    assert cos.mean() > min_cos, cos.mean()
    # The id is the nearest centroid, and every bucket is used.
    np.testing.assert_array_equal(ids, np.argmax(x[2000:] @ codec.centroids.T, axis=1))
    counts = np.bincount(unpack_buckets(res, nbits).ravel(), minlength=1 << nbits)
    assert (counts > 0.1 * counts.sum() / (1 << nbits)).all()


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
    codec = ColbertCodec.train(data128[:300], nbits=1, total_tokens=10**6)
    assert codec.k == 256  # capped to the k-means rows (285), rounded down to a power of two
    assert codec.trained_on == 300


def test_save_load(codec128, data128, tmp_path):
    names = codec128.save(tmp_path)
    assert sorted(names) == sorted(p.name for p in tmp_path.iterdir())
    meta = json.loads((tmp_path / "codec.json").read_text())
    assert meta == {"format_version": 1, "kind": "residual", "nbits": 1, "pool": 1, "dim": 128,
                    "k": 64, "renorm": True, "trained_on": 4000}
    back = ColbertCodec.load(tmp_path, dim=128)
    assert back.identity == codec128.identity and back.name == "res1"
    ids, res = codec128.encode(data128[4000:4100])
    np.testing.assert_array_equal(back.decode(ids, res), codec128.decode(ids, res))
    with pytest.raises(IndexFormatError, match="dim"):
        ColbertCodec.load(tmp_path, dim=256)


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
