"""DenseStore (fp32 / fp16 / sq8 on disk): codecs, exact search kernels against the numpy
reference, streaming writer and merges, hostile files."""

import io
import mmap
import os

import numpy as np
import pytest

from hybridsearch.errors import IndexFormatError
from hybridsearch.retrievers import dense_store
from hybridsearch.retrievers.dense_store import (
    KINDS,
    DenseStore,
    DenseWriter,
    bytes_per_doc,
    file_bytes,
    files_for,
    search_reference,
    sq8_decode,
    sq8_encode,
    sq8_params,
    sq8_train,
    write_dense,
    write_dense_array,
)


def unit(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def assert_topk(store, q, k, allowed, s, i, decoded=None, atol=2e-5):
    """Kernel result (s, i) against the numpy reference, tolerating near-ties: every returned
    row is allowed, distinct and carries its true score; the score lists agree; almost every
    id agrees."""
    x = store.rows(np.arange(store.n)) if decoded is None else decoded
    rs, ri = search_reference(x, q, k, allowed)
    n_ok = store.n if allowed is None else int(allowed.sum())
    want = min(k, n_ok)
    assert s.shape == i.shape == (len(q), k) and s.dtype == np.float32 and i.dtype == np.int64
    assert (i[:, want:] == -1).all() and (s[:, want:] == 0).all()
    assert (i[:, :want] >= 0).all()
    np.testing.assert_allclose(s, rs, atol=atol)
    if want:
        hit = i[:, :want]
        assert all(len(set(r)) == want for r in hit.tolist())
        if allowed is not None:
            assert allowed[hit].all()
        true = np.einsum("qd,qkd->qk", q, x[hit])
        np.testing.assert_allclose(s[:, :want], true, atol=atol)
        assert (np.diff(s[:, :want], axis=1) <= 1e-6).all()  # best first
        assert (hit == ri[:, :want]).mean() >= 0.98


def _mapped(a):
    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False


@pytest.fixture(scope="module")
def big():
    """50k unit vectors of 1024 dims and 64 queries, as the three kinds of store (in memory)."""
    x = unit(50_000, 1024, 0)
    q = unit(64, 1024, 1)
    stores = {kind: DenseStore.from_array(x, kind) for kind in KINDS}
    decoded = {kind: s.rows(np.arange(s.n)) for kind, s in stores.items()}
    return x, q, stores, decoded


# ---------------------------------------------------------------- codecs and sizes


def test_bytes_and_files():
    assert [bytes_per_doc(k, 1024) for k in KINDS] == [4096, 2048, 1024]
    assert files_for("fp32") == files_for("fp16") == ("dense.npy",)
    assert files_for("sq8") == ("dense_sq8.npy", "dense_sq8_params.npy")
    with pytest.raises(ValueError, match="kind"):
        bytes_per_doc("int4", 8)


def test_sq8_codec_error_bound():
    x = unit(3000, 64, 2) * np.linspace(0.1, 4, 64, dtype=np.float32)  # per-dim ranges differ
    x[:, 7] = 0.25  # a constant dimension: step 0, decodes exactly
    p = sq8_train(x)
    assert p.dtype == np.float32 and p.shape == (2, 64) and p[1, 7] == 0
    codes = sq8_encode(x, p)
    assert codes.dtype == np.uint8
    back = sq8_decode(codes, p)
    err = np.abs(back - x)
    assert (err <= p[1] / 2 + 1e-6).all()
    assert (back[:, 7] == 0.25).all()
    # vmin and vmax decode (almost) exactly; values outside the range clip
    assert codes.min(axis=0).tolist() == [0] * 7 + [0] + [0] * 56
    assert (codes.max(axis=0)[np.arange(64) != 7] == 255).all()
    np.testing.assert_allclose(back.min(axis=0), x.min(axis=0), atol=1e-6)
    np.testing.assert_allclose(back.max(axis=0), x.max(axis=0), atol=1e-5)
    far = sq8_encode(np.full((1, 64), 1e6, np.float32), p)
    assert (far[0, np.arange(64) != 7] == 255).all()
    with pytest.raises(ValueError, match="finite"):
        sq8_params(np.zeros(4, np.float32), np.array([1, 2, np.inf, 3], np.float32))


# ---------------------------------------------------------------- kernels against the reference


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("nq", [1, 3, 4, 64])
def test_kernels_match_reference(big, kind, nq):
    x, q, stores, decoded = big
    store = stores[kind]
    rng = np.random.default_rng(nq)
    qq = q[:nq]
    for parallel in (False, True):
        for k in (1, 100):
            s, i = store._search(qq, k, None, parallel=parallel)
            assert_topk(store, qq, k, None, s, i, decoded[kind])
    wide = rng.random(store.n) < 0.9
    narrow = rng.random(store.n) < 0.002
    for mask in (wide, narrow):
        s, i = store.search(qq, 50, mask)
        assert_topk(store, qq, 50, mask, s, i, decoded[kind])
        rows = np.flatnonzero(mask)
        s2, i2 = store._search(qq, 50, rows, parallel=True)
        assert_topk(store, qq, 50, mask, s2, i2, decoded[kind])


def test_quantised_scores_close_to_float32(big):
    x, q, stores, decoded = big
    exact = q @ x[:5000].T
    for kind, tol in (("fp16", 2e-3), ("sq8", 2e-2)):
        approx = q @ decoded[kind][:5000].T
        assert np.abs(approx - exact).max() < tol
    s32, i32 = stores["fp32"].search(q, 10)
    s8, i8 = stores["sq8"].search(q, 10)
    # the quantised ranking keeps most of the float32 top 10
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i32.tolist(), i8.tolist())]) >= 0.8


@pytest.mark.parametrize("kind", KINDS)
def test_masks_and_k_beyond_n(kind):
    x, q = unit(203, 32, 3), unit(6, 32, 4)
    store = DenseStore.from_array(x, kind)
    rng = np.random.default_rng(5)
    one = np.zeros(203, bool)
    one[77] = True
    masks = [None, np.ones(203, bool), np.zeros(203, bool), one, rng.random(203) < 0.5,
             rng.random(203) < 0.03]
    for mask in masks:
        for k in (1, 7, 203, 500):
            s, i = store.search(q, k, mask)
            assert_topk(store, q, k, mask, s, i)
            rows = None if mask is None else np.flatnonzero(mask)
            s, i = store._search(q, k, rows, parallel=True)
            assert_topk(store, q, k, mask, s, i)
    s, i = store.search(q, 5, np.zeros(203, bool))
    assert (i == -1).all() and (s == 0).all()
    s, i = store.search(q[:0], 5)
    assert s.shape == (0, 5)


def test_ties_go_to_the_lower_row():
    x = np.tile(unit(1, 16, 6), (40, 1))  # 40 identical rows
    for kind in KINDS:
        store = DenseStore.from_array(x, kind)
        for parallel in (False, True):
            _, i = store._search(unit(5, 16, 7), 10, None, parallel=parallel)
            assert (i == np.arange(10)).all()


def test_parallel_chunks_with_many_threads_of_heaps(monkeypatch):
    # The parallel kernel keeps one heap set per pool thread and merges them; with small blocks
    # many chunks land on each thread.
    monkeypatch.setattr(dense_store, "KERNEL_BLOCK_BYTES", 4 * 64 * 8)
    x, q = unit(3001, 64, 8), unit(9, 64, 9)
    for kind in ("fp16", "sq8"):
        store = DenseStore.from_array(x, kind)
        s, i = store._search(q, 20, None, parallel=True)
        assert_topk(store, q, 20, None, s, i)


def test_search_checks_its_inputs():
    store = DenseStore.from_array(unit(10, 8, 0), "sq8")
    q = unit(2, 8, 1)
    for bad_k in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="k"):
            store.search(q, bad_k)
    with pytest.raises(ValueError, match=r"\(m, 8\)"):
        store.search(unit(2, 9, 1), 3)
    with pytest.raises(ValueError, match="finite"):
        store.search(np.full((1, 8), np.nan, np.float32), 3)
    with pytest.raises(ValueError, match="bool mask"):
        store.search(q, 3, np.ones(10, np.uint8))
    with pytest.raises(ValueError, match="rows"):
        store.rows(np.array([10]))


# ---------------------------------------------------------------- files


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_on_disk(tmp_path, kind):
    x, q = unit(500, 48, 10), unit(4, 48, 11)
    names = write_dense_array(tmp_path, x, kind)
    assert names == list(files_for(kind))
    assert sum(os.path.getsize(tmp_path / nm) for nm in names) == file_bytes(500, 48, kind)
    store = DenseStore.open(tmp_path, 500, 48, kind, deep=True)
    assert _mapped(store.codes) and not _mapped(DenseStore.from_array(x, kind).codes)
    assert not store.codes.flags.writeable
    mem = DenseStore.from_array(x, kind)
    np.testing.assert_array_equal(store.codes, mem.codes)
    got = store.rows(np.array([3, 0, 499, 3]))
    if kind == "fp32":
        np.testing.assert_array_equal(got, x[[3, 0, 499, 3]])
    elif kind == "fp16":
        np.testing.assert_array_equal(got, x[[3, 0, 499, 3]].astype(np.float16).astype(np.float32))
    else:
        np.testing.assert_array_equal(np.load(tmp_path / "dense_sq8_params.npy"), sq8_train(x))
        assert (np.abs(got - x[[3, 0, 499, 3]]) <= store.params[1] / 2 + 1e-6).all()
    s, i = store.search(q, 10)
    s2, i2 = mem.search(q, 10)
    np.testing.assert_array_equal(i, i2)
    np.testing.assert_allclose(s, s2, atol=1e-6)


def test_fp32_file_is_the_historic_dense_npy(tmp_path):
    x = unit(37, 24, 12)
    write_dense_array(tmp_path, x, "fp32")
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    assert (tmp_path / "dense.npy").read_bytes() == buf.getvalue()
    old = tmp_path / "old"
    old.mkdir()
    np.save(old / "dense.npy", x)  # as segments were always written
    np.testing.assert_array_equal(DenseStore.open(old, 37, 24, "fp32").rows(np.arange(37)), x)


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_writer_equals_one_shot(tmp_path, kind):
    x = unit(1000, 40, 13)
    one, many = tmp_path / "one", tmp_path / "many"
    one.mkdir()
    many.mkdir()
    write_dense_array(one, x, kind)
    params = sq8_train(x) if kind == "sq8" else None
    rng = np.random.default_rng(14)
    cuts = np.sort(rng.integers(0, 1000, 60))
    with DenseWriter(many, 40, kind, params=params) as w:
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, 1000]):  # includes empty chunks
            w.append(x[a:b].astype(np.float64))
        assert w.finish() == list(files_for(kind))
    for name in files_for(kind):
        assert (one / name).read_bytes() == (many / name).read_bytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    write_dense_array(empty, np.zeros((0, 40), np.float32), kind)
    assert DenseStore.open(empty, 0, 40, kind).search(unit(2, 40, 0), 3)[1].tolist() == [[-1] * 3] * 2


def test_writer_refuses_bad_input_and_cleans_up(tmp_path):
    with pytest.raises(ValueError, match="params"):
        DenseWriter(tmp_path, 8, "sq8")
    with pytest.raises(ValueError, match="params"):
        DenseWriter(tmp_path, 8, "fp16", params=np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="float16 range"):
        with DenseWriter(tmp_path, 8, "fp16") as w:
            w.append(np.full((2, 8), 1e6, np.float32))
    assert not (tmp_path / "dense.npy").exists()  # removed on the exception
    with DenseWriter(tmp_path, 8, "fp32") as w:
        with pytest.raises(ValueError, match="finite"):
            w.append(np.full((1, 8), np.nan))
        with pytest.raises(ValueError, match=r"\(m, 8\)"):
            w.append(np.zeros((1, 9)))
        with pytest.raises(TypeError):
            w.append(np.zeros((1, 8), np.int32))
    assert DenseStore.open(tmp_path, 0, 8, "fp32").n == 0
    # a link planted at the file name is replaced, not written through
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    (tmp_path / "dense.npy").unlink()
    (tmp_path / "dense.npy").symlink_to(target)
    write_dense_array(tmp_path, unit(3, 8, 0), "fp32")
    assert target.read_bytes() == b"keep" and not (tmp_path / "dense.npy").is_symlink()


def test_iter_rows_reads_windows_of_the_file(tmp_path):
    x = unit(100, 8, 15)
    write_dense_array(tmp_path, x, "sq8")
    store = DenseStore.open(tmp_path, 100, 8, "sq8")
    rows = np.array([0, 1, 2, 9, 10, 50, 51, 99, 99])
    got = list(store.iter_rows(rows, chunk_rows=3))
    assert [p for p, _ in got] == [0, 3, 5, 7]  # windows of 3 rows from a wanted row: 0-2, 9-11, 50-52, 99
    np.testing.assert_array_equal(np.concatenate([c for _, c in got]), store.rows(rows))
    raw = np.concatenate([c for _, c in store.iter_rows(rows, raw=True)])
    np.testing.assert_array_equal(raw, store.codes[rows])
    with pytest.raises(ValueError, match="ascending"):
        next(store.iter_rows(np.array([3, 1])))
    with open(tmp_path / "dense_sq8.npy", "r+b") as f:  # truncated under an open store
        f.truncate(500)
    with pytest.raises(IndexFormatError, match="changed since it was opened"):
        next(store.iter_rows(rows))


# ---------------------------------------------------------------- merges


def _stores_on_disk(tmp_path, parts, kinds):
    stores = []
    for j, (x, kind) in enumerate(zip(parts, kinds)):
        f = tmp_path / f"src{j}"
        f.mkdir()
        write_dense_array(f, x, kind)
        stores.append(DenseStore.open(f, len(x), x.shape[1], kind))
    return stores


def test_merge_sq8_different_params_error_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(dense_store, "STREAM_CHUNK_BYTES", 4 * 32 * 50)  # windows of 50 rows
    scale = np.linspace(0.5, 2, 32, dtype=np.float32)
    parts = [unit(700, 32, 20), unit(500, 32, 21) * scale, unit(300, 32, 22) * 3]
    stores = _stores_on_disk(tmp_path, parts, ["sq8"] * 3)
    rng = np.random.default_rng(23)
    picks = [np.flatnonzero(rng.random(len(p)) < f) for p, f in zip(parts, (0.9, 0.05, 0.5))]
    out = tmp_path / "out"
    out.mkdir()
    assert write_dense(out, list(zip(stores, picks)), "sq8") == list(files_for("sq8"))
    merged = DenseStore.open(out, sum(map(len, picks)), 32, "sq8", deep=True)
    want_lo = np.minimum.reduce([s.params[0] for s in stores])
    want_hi = np.maximum.reduce([s.vmax for s in stores])
    np.testing.assert_allclose(merged.params[0], want_lo)
    np.testing.assert_allclose(merged.vmax, want_hi, rtol=1e-6, atol=1e-6)
    got = merged.rows(np.arange(merged.n))
    orig = np.concatenate([p[r] for p, r in zip(parts, picks)])
    bound = np.concatenate([np.broadcast_to(s.params[1] / 2, (len(r), 32)) for s, r in zip(stores, picks)])
    bound = bound + merged.params[1] / 2 + 1e-6
    assert (np.abs(got - orig) <= bound).all()
    assert np.abs(got - orig).max() > 0


def test_merge_same_params_copies_codes_verbatim(tmp_path, monkeypatch):
    monkeypatch.setattr(dense_store, "STREAM_CHUNK_BYTES", 4 * 16 * 7)
    x = unit(900, 16, 30)
    params = sq8_train(x)
    stores = []
    for j, part in enumerate((x[:400], x[400:])):
        f = tmp_path / f"s{j}"
        f.mkdir()
        with DenseWriter(f, 16, "sq8", params=params) as w:
            w.append(part)
        stores.append(DenseStore.open(f, len(part), 16, "sq8"))
    picks = [np.array([0, 1, 5, 399]), np.arange(0, 500, 3)]
    out = tmp_path / "out"
    out.mkdir()
    write_dense(out, list(zip(stores, picks)), "sq8")
    merged = DenseStore.open(out, 4 + len(picks[1]), 16, "sq8")
    np.testing.assert_array_equal(merged.params, params)
    np.testing.assert_array_equal(merged.codes, np.concatenate([s.codes[r] for s, r in zip(stores, picks)]))
    # a source whose range covers the union lends its params, so its codes stay verbatim
    narrow = stores[0]
    f = tmp_path / "wide"
    f.mkdir()
    write_dense_array(f, x * 2, "sq8")
    wide = DenseStore.open(f, 900, 16, "sq8")
    out2 = tmp_path / "out2"
    out2.mkdir()
    write_dense(out2, [(narrow, np.arange(400)), (wide, np.arange(900))], "sq8")
    m2 = DenseStore.open(out2, 1300, 16, "sq8")
    np.testing.assert_array_equal(m2.params, wide.params)
    np.testing.assert_array_equal(m2.codes[400:], wide.codes)


@pytest.mark.parametrize("target", KINDS)
def test_merge_mixed_kinds(tmp_path, target):
    parts = [unit(300, 24, 40), unit(200, 24, 41), unit(100, 24, 42) * 1.5]
    stores = _stores_on_disk(tmp_path, parts, ["fp32", "sq8", "fp16"])
    picks = [np.arange(0, 300, 2), np.array([], np.int64), np.arange(100)]
    out = tmp_path / "out"
    out.mkdir()
    write_dense(out, list(zip(stores, picks)), target)
    n = 150 + 100
    merged = DenseStore.open(out, n, 24, target, deep=True)
    src = np.concatenate([s.rows(r) for s, r in zip(stores, picks)])
    got = merged.rows(np.arange(n))
    if target == "fp32":
        np.testing.assert_array_equal(got, src)
    elif target == "fp16":
        np.testing.assert_array_equal(got, src.astype(np.float16).astype(np.float32))
    else:
        # params from the fp sources' selected rows (the empty sq8 source adds nothing)
        np.testing.assert_allclose(merged.params[0], src.min(axis=0))
        np.testing.assert_allclose(merged.vmax, src.max(axis=0), atol=1e-6)
        assert (np.abs(got - src) <= merged.params[1] / 2 + 1e-6).all()
    with pytest.raises(ValueError, match="ascending"):
        write_dense(tmp_path / "out", [(stores[0], np.array([5, 2]))], target)
    with pytest.raises(ValueError, match="dimension"):
        write_dense(tmp_path / "out", [(stores[0], np.arange(2)), (DenseStore.from_array(unit(2, 8, 0), "fp32"), np.arange(2))], target)
    empty = tmp_path / "empty"
    empty.mkdir()
    write_dense(empty, [], target, dim=24)
    assert DenseStore.open(empty, 0, 24, target).n == 0


# ---------------------------------------------------------------- hostile files


def _good(tmp_path, kind, n=20, d=8):
    f = tmp_path / kind
    f.mkdir(exist_ok=True)
    write_dense_array(f, unit(n, d, 50), kind)
    return f


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_codes_file(tmp_path, kind):
    f = _good(tmp_path, kind)
    name = files_for(kind)[0]
    p = f / name
    good = p.read_bytes()

    def expect(match, **kw):
        with pytest.raises(IndexFormatError, match=match) as e:
            DenseStore.open(f, kw.get("n", 20), kw.get("d", 8), kind, deep=True)
        assert name in str(e.value)

    expect(r"shape", n=21)
    expect(r"shape", d=9)
    other = {"fp32": np.float64, "fp16": np.float32, "sq8": np.int8}[kind]
    np.save(p, np.zeros((20, 8), other))
    expect("dtype")
    np.save(p, np.zeros((20, 8), np.float32).astype(">f4" if kind == "fp32" else np.float32))
    expect("dtype")
    np.save(p, np.array([{"a": 1}] * 20, dtype=object), allow_pickle=True)
    expect("dtype|corrupted")
    p.write_bytes(good[:-5])
    expect("bytes")
    p.write_bytes(b"not an npy file at all")
    expect("corrupted")
    p.unlink()
    expect("missing")
    (f / "elsewhere.npy").write_bytes(good)
    p.symlink_to(f / "elsewhere.npy")
    expect("link")
    p.unlink()
    p.mkdir()
    expect("regular file")


@pytest.mark.parametrize("kind", ["fp32", "fp16"])
def test_non_finite_values_fail_the_deep_check(tmp_path, kind):
    f = _good(tmp_path, kind)
    a = np.load(f / "dense.npy")
    a[13, 2] = np.nan if kind == "fp32" else np.inf
    np.save(f / "dense.npy", a)
    with pytest.raises(IndexFormatError, match="row 13") as e:
        DenseStore.open(f, 20, 8, kind, deep=True)
    assert "dense.npy" in str(e.value)
    store = DenseStore.open(f, 20, 8, kind)  # without deep: opens, and searching cannot crash
    s, i = store.search(unit(2, 8, 0), 25)
    assert i.shape == (2, 25)


@pytest.mark.parametrize("bad", ["nan", "inf_step", "negative", "overflow", "shape", "dtype", "missing", "link"])
def test_hostile_sq8_params(tmp_path, bad):
    f = _good(tmp_path, "sq8")
    p = f / "dense_sq8_params.npy"
    params = np.load(p)
    if bad == "nan":
        params[0, 3] = np.nan
    elif bad == "inf_step":
        params[1, 3] = np.inf
    elif bad == "negative":
        params[1, 3] = -0.01
    elif bad == "overflow":  # finite params whose top (vmin + 255 step) is not
        params[0, 3], params[1, 3] = 3e38, 1e37
    if bad == "shape":
        np.save(p, np.zeros((3, 8), np.float32))
    elif bad == "dtype":
        np.save(p, np.zeros((2, 8), np.float64))
    elif bad == "missing":
        p.unlink()
    elif bad == "link":
        p.rename(f / "x.npy")
        p.symlink_to(f / "x.npy")
    else:
        np.save(p, params)
    with pytest.raises(IndexFormatError) as e:
        DenseStore.open(f, 20, 8, "sq8")
    assert "dense_sq8_params.npy" in str(e.value)


def test_open_checks_its_arguments(tmp_path):
    f = _good(tmp_path, "fp32")
    with pytest.raises(ValueError, match="kind"):
        DenseStore.open(f, 20, 8, "FP32")
    with pytest.raises(ValueError, match="dim"):
        DenseStore.open(f, 20, 0, "fp32")
    with pytest.raises(ValueError, match="n"):
        DenseStore.open(f, -1, 8, "fp32")
