"""Dense channel: FAISS factories, selectors for deleted/filtered rows, against brute force;
builds from a DenseStore, memory-mapped loading, hostile dense.faiss files."""

import os

import faiss
import numpy as np
import pytest

from hybridsearch.errors import IndexFormatError
from hybridsearch.retrievers.dense import DenseIndex, check_factory, exact_topk
from hybridsearch.retrievers.dense_store import DenseStore


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


@pytest.mark.parametrize("held", ["array", "store"])
def test_overfetch_stays_within_the_gpu_k_limit(held):
    n, k = 10_000, 10
    x, q = unit(n, 16, 20), unit(3, 16, 21)
    cpu = DenseIndex.build(x, "Flat")
    vectors = x if held == "array" else DenseStore.from_array(x, "fp32")
    gpu_like = DenseIndex(_GpuLikeFlat(cpu.index), n, "Flat", vectors=vectors)
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
    rows = np.flatnonzero(allowed)
    s1, i1 = exact_topk(x, q, 50, rows)
    s2, i2 = exact_topk(x, q, 50, rows, block=97)
    np.testing.assert_allclose(s1, s2, atol=1e-6)
    np.testing.assert_array_equal(np.sort(i1, 1), np.sort(i2, 1))


def test_bad_factory():
    with pytest.raises(ValueError, match="factory"):
        DenseIndex.build(unit(10, 8, 0), "NotAnIndex")


def _mapped(index) -> bool:
    """Whether FAISS left the bulk of ``index`` in its file mapping."""
    base = faiss.downcast_index(index)
    while isinstance(base, faiss.IndexPreTransform):
        base = faiss.downcast_index(base.index)
    if isinstance(base, faiss.IndexIVF):
        return isinstance(faiss.downcast_InvertedLists(base.invlists), faiss.OnDiskInvertedLists)
    if isinstance(base, faiss.IndexHNSW):
        return not base.hnsw.neighbors.is_owned and not faiss.downcast_index(base.storage).codes.is_owned
    return not base.codes.is_owned


@pytest.mark.parametrize("kind", ["fp32", "sq8"])
@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "HNSW32,SQ8", "IVF4,Flat", "PCA16,IVF4,Flat"])
def test_build_from_store_and_mapped_load(tmp_path, factory, kind):
    x, q = unit(400, 16, 0), unit(5, 16, 1)
    store = DenseStore.from_array(x, kind)
    xs = store.rows(np.arange(400))  # what the index sees
    di = DenseIndex.build_from(store, factory, train_size=300, chunk_rows=37)
    assert di.factory == factory and di.index.ntotal == 400
    di.save(tmp_path)
    allowed = np.random.default_rng(2).random(400) < 0.5
    for mmap in (True, False):
        if factory == "Flat":
            d2 = DenseIndex.load(tmp_path, store, factory, use_gpu=False, mmap=mmap)
        else:  # the shape is enough
            d2 = DenseIndex.load(tmp_path, None, factory, use_gpu=False, n=400, dim=16, mmap=mmap)
        if factory != "Flat":
            assert _mapped(d2.index) == (mmap or "IVF" in factory)  # IVF lists are always mapped
        for mask in (None, allowed):
            s, i = d2.search(q, 10, mask, nprobe=4, ef_search=200)
            ref = q @ xs.T if mask is None else np.where(mask, q @ xs.T, -np.inf)
            assert (i >= 0).all() and (mask is None or mask[i].all())
            if factory == "Flat":
                want_s, want_i = store.search(q, 10, mask)
                np.testing.assert_allclose(s, want_s, atol=1e-5)
                assert (i == want_i).mean() > 0.95
            else:
                got = np.mean([len(set(i[r]) & set(np.argsort(-ref[r])[:10])) / 10 for r in range(5)])
                assert got >= 0.8
                if factory in ("HNSW32", "IVF4,Flat"):  # flat storage: true scores
                    np.testing.assert_allclose(s, np.take_along_axis(q @ xs.T, i, 1), atol=1e-5)


def test_ondisk_lists_naming_another_file_are_refused_unopened(tmp_path):
    x = unit(400, 16, 3)
    ivf = faiss.index_factory(16, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    outside = tmp_path / "outside.ivfdata"
    lists = faiss.OnDiskInvertedLists(4, ivf.code_size, str(outside))
    ivf.replace_invlists(lists, False)  # ``lists`` owns itself: keep it alive while ivf is used
    ivf.add(x)
    seg = tmp_path / "seg"
    seg.mkdir()
    faiss.write_index(ivf, str(seg / "dense.faiss"))
    del ivf, lists
    for present in (True, False):  # gone: opening it would fail with a different message
        if not present:
            outside.unlink()
        for mmap in (True, False):
            with pytest.raises(IndexFormatError, match="file of their own") as e:
                DenseIndex.load(seg, x, "IVF4,Flat", use_gpu=False, mmap=mmap)
            assert "dense.faiss" in str(e.value)


@pytest.mark.parametrize("factory", ["HNSW32", "HNSW32,SQ8", "IVF4,Flat", "IVF4,PQ4x4", "SQ8"])
def test_truncated_faiss_files_are_refused(tmp_path, factory):
    x = unit(300, 16, 4)
    di = DenseIndex.build(x, factory)
    di.save(tmp_path)
    p = tmp_path / "dense.faiss"
    raw = p.read_bytes()
    for cut in sorted({1, 4, 7, 8, 100, len(raw) // 3, len(raw) // 2, len(raw) - 100}):
        p.write_bytes(raw[:len(raw) - cut])
        for mmap in (True, False):
            with pytest.raises(IndexFormatError, match="dense.faiss"):
                DenseIndex.load(tmp_path, x, factory, use_gpu=False, mmap=mmap)
    p.write_bytes(raw + b"\0" * 8)  # trailing bytes are harmless
    DenseIndex.load(tmp_path, x, factory, use_gpu=False)


def test_index_types_we_cannot_check_are_refused(tmp_path):
    x = unit(300, 16, 5)
    for factory in ("IVF4,Flat,RFlat", "IDMap,Flat"):
        index = faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        if "IDMap" in factory:
            index.add_with_ids(x, np.arange(300))
        else:
            index.add(x)
        faiss.write_index(index, str(tmp_path / "dense.faiss"))
        with pytest.raises(IndexFormatError, match="never writes"):
            DenseIndex.load(tmp_path, x, "HNSW32", use_gpu=False)
    assert os.path.exists(tmp_path / "dense.faiss")


def test_check_factory_matches_what_load_accepts():
    for ok in ("Flat", "HNSW32", "HNSW32,SQ8", "IVF16,Flat", "IVF16,PQ4x4", "IVF16_HNSW32,Flat",
               "PCA8,IVF16,Flat", "OPQ4,IVF16,PQ4", "SQ8", "PQ4x4"):
        check_factory(ok, 16)
    for bad in ("IVF4,Flat,RFlat", "IDMap,Flat", "NSG32,Flat"):
        with pytest.raises(ValueError, match="supports"):
            check_factory(bad, 16)
    with pytest.raises(ValueError, match="invalid"):
        check_factory("Nonsense", 16)
