"""Dense channel: FAISS factories, selectors for deleted/filtered rows, against brute force."""

import numpy as np
import pytest

from hybridsearch.retrievers.dense import DenseIndex


def unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF4,Flat"])
def test_factories_and_masks(tmp_path, factory):
    x, q = unit(400, 16, 0), unit(5, 16, 1)
    di = DenseIndex.build(x, factory)
    assert di.factory == factory
    di.save(tmp_path)
    di = DenseIndex.load(tmp_path, x, factory, use_gpu=False)
    allowed = np.random.default_rng(2).random(400) < 0.3
    for mask in (None, allowed):
        s, i = di.search(q, 10, mask, nprobe=4, ef_search=200)
        ref = q @ x.T
        if mask is not None:
            ref[:, ~mask] = -np.inf
        want = np.sort(ref, axis=1)[:, ::-1][:, :10]
        assert (i >= 0).all()
        if mask is not None:
            assert mask[i].all()  # never a deleted/filtered row
        np.testing.assert_allclose(s, np.take_along_axis(q @ x.T, i, 1), atol=1e-5)  # true scores
        if factory == "Flat":
            np.testing.assert_allclose(s, want, atol=1e-5)
        else:  # approximate indexes: high recall on this easy set
            assert np.mean([len(set(i[r]) & set(np.argsort(-ref[r])[:10])) / 10 for r in range(5)]) >= 0.8


def test_small_segment_falls_back_to_flat_and_pads():
    x = unit(20, 8, 3)
    di = DenseIndex.build(x, "IVF64,Flat")  # needs 39*64 training points
    assert di.factory == "Flat"
    s, i = di.search(unit(2, 8, 4), 30, None)
    assert (i[:, 20:] == -1).all() and (s[:, 20:] == 0).all()
    none = np.zeros(20, bool)
    s, i = di.search(unit(1, 8, 5), 5, none)
    assert (i == -1).all()


@pytest.mark.parametrize("density", [0.0005, 0.01, 0.1, 0.5, 0.9, 0.999])
def test_overfetch_path_equals_brute_force(density, monkeypatch):
    # On a GPU, Flat indexes cannot take a selector and _search over-fetches then filters
    # (_overfetch). Exercise that path on CPU: flag a CPU Flat index as on_gpu.
    n, k = 2000, 25
    x, q = unit(n, 16, 10), unit(7, 16, 11)
    rng = np.random.default_rng(int(density * 10_000))
    masks = [rng.random(n) < density]
    full = q @ x.T
    # adversarial: only the rows that query 0 ranks lowest are allowed, so the allowed top-k sits
    # at the very end of the unfiltered ranking
    worst = np.zeros(n, bool)
    worst[np.argsort(full[0])[: max(1, int(density * n))]] = True
    masks.append(worst)
    gpu_like = DenseIndex.build(x, "Flat")
    gpu_like.on_gpu = True
    calls = []
    real = DenseIndex._overfetch
    monkeypatch.setattr(DenseIndex, "_overfetch", lambda self, *a: calls.append(self) or real(self, *a))
    cpu = DenseIndex.build(x, "Flat")
    for mask in masks:
        n_ok = int(mask.sum())
        for kq in (k, n_ok + 3):  # k above the number of allowed rows pads with -1
            s, i = gpu_like.search(q, kq, mask)
            kk = min(kq, n)
            want_n = min(kk, n_ok)
            ref = np.where(mask, full, -np.inf)
            order = np.argsort(-ref, axis=1, kind="stable")[:, :want_n]
            np.testing.assert_array_equal(i[:, :want_n], order)
            np.testing.assert_allclose(s[:, :want_n], np.take_along_axis(full, order, 1), atol=1e-5)
            assert (i[:, want_n:] == -1).all() and (s[:, want_n:] == 0).all()
            if want_n:
                assert mask[i[:, :want_n]].all()
            s2, i2 = cpu.search(q, kq, mask)  # the selector path agrees
            np.testing.assert_array_equal(i2, i)
            np.testing.assert_allclose(s2, s, atol=1e-5)
    assert calls and all(c is gpu_like for c in calls)  # the over-fetch path ran, and only there


GPU_MAX_K = 2048  # faiss-gpu's largest k (faiss/gpu/impl/IndexUtils: getMaxKSelection, no cuVS)


class _GpuLikeFlat:
    """A CPU Flat index that refuses what a faiss-gpu Flat index refuses: k above the GPU's
    k-selection limit, and search parameters (selectors)."""

    def __init__(self, index):
        self.index = index

    def search(self, x, k, params=None):
        if params is not None:
            raise RuntimeError("GPU Flat indexes take no search parameters")
        if not 0 < k <= GPU_MAX_K:
            raise RuntimeError(f"GPU index only supports min/max-K selection up to {GPU_MAX_K} (requested {k})")
        return self.index.search(x, k)


def test_overfetch_stays_within_the_gpu_k_limit():
    n, k = 10_000, 10
    x, q = unit(n, 16, 20), unit(3, 16, 21)
    cpu = DenseIndex.build(x, "Flat")
    gpu_like = DenseIndex(_GpuLikeFlat(cpu.index), n, "Flat", vectors=x)
    gpu_like.on_gpu = True
    allowed = np.random.default_rng(22).random(n) >= 0.3  # 30% deleted
    for kk in (k, 3000):  # past the limit: filtered, and unfiltered with k > 2048
        for mask in (allowed, None):
            s, i = gpu_like.search(q, kk, mask)
            ref = q @ x.T if mask is None else np.where(mask, q @ x.T, -np.inf)
            order = np.argsort(-ref, axis=1, kind="stable")[:, :kk]
            np.testing.assert_allclose(s, np.take_along_axis(ref, order, 1), atol=1e-5)
            np.testing.assert_allclose(np.take_along_axis(ref, i, 1), s, atol=1e-5)
            assert (mask is None or mask[i].all()) and all(len(set(r)) == kk for r in i.tolist())
    # a small block size exercises the block merge of the exact path
    from hybridsearch.retrievers.dense import exact_topk

    rows = np.flatnonzero(allowed)
    s1, i1 = exact_topk(x, q, 50, rows)
    s2, i2 = exact_topk(x, q, 50, rows, block=97)
    np.testing.assert_allclose(s1, s2, atol=1e-6)
    np.testing.assert_array_equal(np.sort(i1, 1), np.sort(i2, 1))


def test_bad_factory():
    with pytest.raises(ValueError, match="factory"):
        DenseIndex.build(unit(10, 8, 0), "NotAnIndex")
