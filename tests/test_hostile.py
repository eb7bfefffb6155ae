"""Index folders are untrusted data: every crafted folder is refused with IndexFormatError, and
nothing outside it is read, written or deleted."""

import hashlib
import json
import os
import shutil
import time
import tracemalloc
from pathlib import Path

import msgpack
import numpy as np
import pytest

from hybridsearch.errors import IndexFormatError
from hybridsearch.index import storage as st
from hybridsearch.index.hybrid import HybridIndex
from hybridsearch.testing import legacy_bm25_index

WORDS = "fox dog dense sparse vector token ranking hybrid search water light river cloud".split()


def make_docs(n, seed=0, prefix="d"):
    rng = np.random.default_rng(seed)
    return [{"id": f"{prefix}{i}", "text": " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))),
             "metadata": {"i": i}} for i in range(n)]


@pytest.fixture
def folders(tmp_path, m3_encoder):
    """(index, victim): two real indexes side by side; the victim also holds ``keep.npy``."""
    idx = HybridIndex.create(tmp_path / "idx", m3_encoder)
    idx.add(make_docs(12))
    idx.add(make_docs(8, seed=1, prefix="e"))
    idx.close()
    victim = HybridIndex.create(tmp_path / "victim", m3_encoder)
    victim.add(make_docs(10, seed=2, prefix="v"))
    victim.close()
    np.save(tmp_path / "victim" / "keep.npy", np.arange(3, dtype=np.int64))
    return tmp_path / "idx", tmp_path / "victim"


@pytest.fixture
def legacy_folders(tmp_path, m3_encoder):
    """:func:`folders`, both indexes keeping BM25 in a tantivy folder (written before format 3)."""
    out = []
    for name, docs in (("idx", [make_docs(12), make_docs(8, seed=1, prefix="e")]),
                       ("victim", [make_docs(10, seed=2, prefix="v")])):
        HybridIndex.create(tmp_path / name, m3_encoder).close()
        legacy_bm25_index(tmp_path / name)
        with HybridIndex.open(tmp_path / name, m3_encoder) as idx:
            for d in docs:
                idx.add(d)
        out.append(tmp_path / name)
    np.save(tmp_path / "victim" / "keep.npy", np.arange(3, dtype=np.int64))
    return tuple(out)


def snapshot(folder: Path) -> dict:
    """Every entry under ``folder`` with its content hash (files) and mtime."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st_ = os.lstat(p)
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
        out[str(p.relative_to(folder))] = (digest, st_.st_mtime_ns if digest else None)
    return out


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def save_manifest(path: Path, m: dict) -> None:
    (path / "manifest.json").write_text(json.dumps(m, indent=2))


def rewrite(path: Path, seg: str, fname: str, arr_or_bytes) -> None:
    """Replace a segment file and record its new size and sha256, as a forger would."""
    p = path / seg / fname
    if isinstance(arr_or_bytes, bytes):
        p.write_bytes(arr_or_bytes)
    else:
        np.save(p, arr_or_bytes, allow_pickle=False)
    m = manifest(path)
    for e in m["segments"]:
        if e["name"] == seg:
            e["files"][fname] = {"bytes": p.stat().st_size, "sha256": st.sha256_file(p)}
    save_manifest(path, m)


def refused(path, encoder, match=None, victim=None):
    before = snapshot(victim) if victim is not None else None
    with pytest.raises(IndexFormatError, match=match):
        idx = HybridIndex.open(path, encoder)
        try:  # if it opened, the attack must not get further either
            idx.search("fox dense", k=5)
            idx.add([{"id": "new", "text": "fox"}])
            idx.delete(["d0"])
        finally:
            idx.close()
    if victim is not None:
        assert snapshot(victim) == before


# ---------------------------------------------------------------- names that leave the folder


def test_segment_name_with_dotdot(folders, m3_encoder):
    path, victim = folders
    m = manifest(path)
    vm = manifest(victim)
    # A perfect copy of the victim's entry, so only the name can give it away.
    m["segments"] = [dict(vm["segments"][0], name="../victim/" + vm["segments"][0]["name"])]
    m["next_docno"] = vm["next_docno"]
    m["counts"] = dict(vm["counts"])
    m["deleted"] = None
    save_manifest(path, m)
    refused(path, m3_encoder, "invalid segment name", victim)


def test_absolute_segment_name(folders, m3_encoder):
    path, victim = folders
    m = manifest(path)
    m["segments"][0]["name"] = str(victim / manifest(victim)["segments"][0]["name"])
    save_manifest(path, m)
    refused(path, m3_encoder, "invalid segment name", victim)


def test_deleted_outside_folder(folders, m3_encoder):
    path, victim = folders
    m = manifest(path)
    m["deleted"] = "../victim/keep.npy"
    m["counts"]["deleted"] = 3
    m["counts"]["documents"] = m["next_docno"] - 3
    save_manifest(path, m)
    refused(path, m3_encoder, "invalid deleted name", victim)
    assert (victim / "keep.npy").exists()


def test_bm25_outside_folder(legacy_folders, m3_encoder):
    path, victim = legacy_folders
    m = manifest(path)
    m["bm25"] = "../victim/" + manifest(victim)["bm25"]
    save_manifest(path, m)
    refused(path, m3_encoder, "invalid bm25 name", victim)


@pytest.mark.parametrize("field,value", [
    ("generation", -1), ("generation", "1"), ("next_docno", 1.5), ("segments", {}),
    ("deleted", 7), ("counts", None), ("channels", []), ("model", "m"),
])
def test_mistyped_fields(folders, m3_encoder, field, value):
    path, _ = folders
    m = manifest(path)
    m[field] = value
    save_manifest(path, m)
    refused(path, m3_encoder)


def test_unknown_segment_file_name(folders, m3_encoder):
    path, victim = folders
    m = manifest(path)
    files = m["segments"][0]["files"]
    files["../../victim/keep.npy"] = files.pop("n_tokens.npy")
    save_manifest(path, m)
    refused(path, m3_encoder, "invalid segment file name", victim)


# ---------------------------------------------------------------- links inside the folder


def test_segment_folder_is_a_link(folders, m3_encoder, tmp_path):
    path, _ = folders
    other = tmp_path / "other"
    shutil.copytree(path, other)  # an identical index: sizes and checksums all match
    seg = manifest(path)["segments"][0]["name"]
    shutil.rmtree(path / seg)
    os.symlink(other / seg, path / seg)
    refused(path, m3_encoder, "symbolic link", other)


def test_segment_file_is_a_link(folders, m3_encoder, tmp_path):
    path, _ = folders
    other = tmp_path / "other"
    shutil.copytree(path, other)
    seg = manifest(path)["segments"][0]["name"]
    (path / seg / "docs.bin").unlink()
    os.symlink(other / seg / "docs.bin", path / seg / "docs.bin")
    refused(path, m3_encoder, "link", other)


def test_bm25_folder_is_a_link(legacy_folders, m3_encoder, tmp_path):
    path, _ = legacy_folders
    other = tmp_path / "other"
    shutil.copytree(path, other)
    name = manifest(path)["bm25"]
    shutil.rmtree(path / name)
    os.symlink(other / name, path / name)
    refused(path, m3_encoder, "symbolic link", other)


@pytest.mark.parametrize("entry", ["LOCK", "manifest.json.tmp", "seg-999999.tmp"])
def test_planted_links_at_top_level(folders, m3_encoder, entry):
    path, victim = folders
    (path / entry).unlink(missing_ok=True)
    os.symlink(victim / "keep.npy", path / entry)
    refused(path, m3_encoder, "symbolic link", victim)


def test_manifest_is_a_link(folders, m3_encoder):
    path, victim = folders
    (path / "manifest.json").unlink()
    os.symlink(victim / "manifest.json", path / "manifest.json")
    refused(path, m3_encoder, None, victim)


# ---------------------------------------------------------------- crafted data


def test_sparse_doc_id_out_of_range(folders, m3_encoder):
    path, _ = folders
    seg = manifest(path)["segments"][0]["name"]
    docs = np.load(path / seg / "sparse_docs.npy")
    size = (path / seg / "sparse_docs.npy").stat().st_size
    docs[len(docs) // 2] = 1 << 20  # far past the segment's 12 rows: the kernel would write there
    rewrite(path, seg, "sparse_docs.npy", docs)
    assert (path / seg / "sparse_docs.npy").stat().st_size == size
    refused(path, m3_encoder, "document ids")


def test_sparse_doc_ids_unsorted(folders, m3_encoder):
    path, _ = folders
    seg = manifest(path)["segments"][0]["name"]
    indptr = np.load(path / seg / "sparse_indptr.npy")
    docs = np.load(path / seg / "sparse_docs.npy")
    t = int(np.flatnonzero(np.diff(indptr) >= 2)[0])
    lo = indptr[t]
    docs[lo], docs[lo + 1] = docs[lo + 1], docs[lo]
    rewrite(path, seg, "sparse_docs.npy", docs)
    refused(path, m3_encoder, "ascend")


def test_sparse_negative_weight(folders, m3_encoder):
    path, _ = folders
    seg = manifest(path)["segments"][0]["name"]
    w = np.load(path / seg / "sparse_weights.npy")
    w[0] = -1.0
    rewrite(path, seg, "sparse_weights.npy", w)
    refused(path, m3_encoder, "weights")


def test_sparse_indptr_not_monotonic(folders, m3_encoder):
    path, _ = folders
    seg = manifest(path)["segments"][0]["name"]
    indptr = np.load(path / seg / "sparse_indptr.npy")
    indptr[len(indptr) // 2] = indptr[-1] + 1000
    rewrite(path, seg, "sparse_indptr.npy", indptr)
    refused(path, m3_encoder, "never decrease")


@pytest.mark.parametrize("how", ["past_end", "decreasing"])
def test_colbert_offsets_out_of_range(folders, m3_encoder, how):
    path, _ = folders
    seg = manifest(path)["segments"][0]["name"]
    off = np.load(path / seg / "colbert_offsets.npy")
    if how == "past_end":
        off[-1] += 10**6
    else:
        off[3] = off[-1] + 10**6
    rewrite(path, seg, "colbert_offsets.npy", off)
    refused(path, m3_encoder, "colbert_offsets")


def test_dense_wrong_shape(folders, m3_encoder):
    path, _ = folders
    seg = manifest(path)["segments"][0]["name"]
    dense = np.load(path / seg / "dense.npy")
    rewrite(path, seg, "dense.npy", np.zeros((dense.shape[0] + 5, dense.shape[1]), np.float32))
    refused(path, m3_encoder, "shape")
    rewrite(path, seg, "dense.npy", np.zeros((dense.shape[0], dense.shape[1] + 1), np.float32))
    refused(path, m3_encoder, "shape")
    rewrite(path, seg, "dense.npy", dense.astype(np.float64))
    refused(path, m3_encoder, "dtype")


@pytest.mark.parametrize("rows", [10**9, 6])
def test_npy_header_disagrees_with_file_size(folders, m3_encoder, tmp_path, rows):
    """A header declaring more data than the file holds is refused before anything is read."""
    path, _ = folders
    seg = manifest(path)["segments"][0]["name"]
    n_tokens = np.load(path / seg / "n_tokens.npy")
    forged = tmp_path / "forged.npy"
    with open(forged, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (rows,)})
        f.write(n_tokens[: min(rows, len(n_tokens)) - 1].tobytes())
    rewrite(path, seg, "n_tokens.npy", forged.read_bytes())
    refused(path, m3_encoder, "n_tokens.npy")


@pytest.mark.parametrize("how", ["next_docno_only", "counts_agree"])
def test_huge_next_docno_fails_fast(folders, m3_encoder, how):
    path, _ = folders
    m = manifest(path)
    huge = 2_000_000_000
    if how == "counts_agree":
        m["segments"][-1]["count"] += huge - m["next_docno"]
    m["counts"]["documents"] += huge - m["next_docno"]
    m["next_docno"] = huge
    save_manifest(path, m)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        refused(path, m3_encoder)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 10
    assert peak < 100 << 20  # np.ones(2e9) alone would be 2 GB


@pytest.mark.parametrize("record", [
    ["x" * 100, 1, 2],  # not [text, metadata]
    [5, {}],  # the text is not a string
    ["text", ["not", "a", "dict"]],  # the metadata is not a dict
    {"a": 1},  # not a list
    b"\xc1\xc1\xc1",  # not msgpack
    ["t", {1: "non-string key"}],
])
def test_docs_bin_malformed(folders, m3_encoder, record):
    """Every record of a segment's docs.bin replaced: whatever a search reads is refused."""
    path, _ = folders
    entry = manifest(path)["segments"][0]
    raw = record if isinstance(record, bytes) else msgpack.packb(record, use_bin_type=True)
    n = entry["count"]
    rewrite(path, entry["name"], "docs.bin", raw * n)
    rewrite(path, entry["name"], "docs_offsets.npy", np.arange(n + 1, dtype=np.int64) * len(raw))
    with pytest.raises(IndexFormatError, match="docs.bin"):
        idx = HybridIndex.open(path, m3_encoder)
        try:
            [idx.get(f"d{i}") for i in range(12)]
        finally:
            idx.close()


@pytest.mark.parametrize("how", ["past-end", "decreasing", "hash-unsorted", "order-out-of-range"])
def test_docstore_offsets_and_hashes(folders, m3_encoder, how):
    path, _ = folders
    entry = manifest(path)["segments"][0]
    seg, n = entry["name"], entry["count"]
    if how == "past-end":
        off = np.load(path / seg / "docs_offsets.npy")
        off[-1] += 1 << 30
        rewrite(path, seg, "docs_offsets.npy", off)
    elif how == "decreasing":
        off = np.load(path / seg / "docs_offsets.npy")
        off[3], off[4] = off[4], off[3]
        rewrite(path, seg, "docs_offsets.npy", off)
    elif how == "hash-unsorted":
        h = np.load(path / seg / "ids_hash.npy")
        rewrite(path, seg, "ids_hash.npy", h[::-1].copy())
    else:
        o = np.load(path / seg / "ids_order.npy")
        o[0] = n + 1000
        rewrite(path, seg, "ids_order.npy", o)
    refused(path, m3_encoder)


def test_column_files_checked(folders, m3_encoder):
    path, _ = folders
    entry = manifest(path)["segments"][0]
    cols = sorted(f for f in entry["files"] if f.startswith("col-") and f.endswith(".npy"))
    assert cols
    a = np.load(path / entry["name"] / cols[0])
    rewrite(path, entry["name"], cols[0], np.zeros(len(a) + 7, a.dtype))
    refused(path, m3_encoder)


def test_vocab_size_mismatch(folders, m3_encoder):
    path, _ = folders
    seg = manifest(path)["segments"][0]["name"]
    # Consistent sparse files for a smaller vocabulary: a query token id past it would be read
    # out of bounds by the kernel.
    indptr = np.load(path / seg / "sparse_indptr.npy")
    docs = np.load(path / seg / "sparse_docs.npy")
    v = len(indptr) // 2
    nnz = int(indptr[v])
    rewrite(path, seg, "sparse_indptr.npy", indptr[: v + 1].copy())
    rewrite(path, seg, "sparse_term_max.npy", np.load(path / seg / "sparse_term_max.npy")[:v].copy())
    rewrite(path, seg, "sparse_docs.npy", docs[:nnz].copy())
    rewrite(path, seg, "sparse_weights.npy", np.load(path / seg / "sparse_weights.npy")[:nnz].copy())
    refused(path, m3_encoder, "shape")


def test_manifest_vocab_size_disagrees_with_files(folders, m3_encoder):
    path, _ = folders
    m = manifest(path)
    m["model"]["vocab_size"] += 7
    save_manifest(path, m)
    refused(path, m3_encoder, "sparse_indptr")


def test_sparse_n_docs_disagrees(folders, m3_encoder):
    path, _ = folders
    seg = manifest(path)["segments"][0]["name"]
    rewrite(path, seg, "sparse_n_docs.npy", np.array(10**6, np.int64))
    refused(path, m3_encoder, "sparse_n_docs")


def test_checked_segments_still_search(folders, m3_encoder):
    path, _ = folders
    idx = HybridIndex.open(path, m3_encoder)
    assert len(idx.search("fox dense", k=5)) == 5
    idx.add(make_docs(3, seed=5, prefix="f"))  # reopened segments: header checks only (cached)
    idx.delete(["d0"])
    assert len(idx) == 22
    idx.close()
    again = HybridIndex.open(path, m3_encoder)
    again.verify()
    assert len(again) == 22
    again.close()


def test_faiss_file_checked(tmp_path, m3_encoder):
    path = tmp_path / "hnsw"
    idx = HybridIndex.create(path, m3_encoder, dense_factory="HNSW32")
    idx.add(make_docs(12))
    idx.close()
    m = manifest(path)
    seg = m["segments"][0]["name"]
    assert "dense.faiss" in m["segments"][0]["files"]
    import faiss

    other = faiss.index_factory(m["model"]["dim"], "HNSW32", faiss.METRIC_INNER_PRODUCT)
    other.add(np.random.default_rng(0).standard_normal((30, m["model"]["dim"])).astype(np.float32))
    faiss.write_index(other, str(tmp_path / "other.faiss"))
    rewrite(path, seg, "dense.faiss", (tmp_path / "other.faiss").read_bytes())
    refused(path, m3_encoder, "dense.faiss")
    rewrite(path, seg, "dense.faiss", b"\x00" * 200)
    refused(path, m3_encoder, "dense.faiss")


# ---------------------------------------------------------------- helpers, directly


def test_safe_child_and_load_deleted(tmp_path):
    (tmp_path / "seg-000001").mkdir()
    assert st.safe_child(tmp_path, "seg-000001", "segment", want="dir") == tmp_path / "seg-000001"
    for bad in ("../seg-000001", "/seg-000001", "seg-1", "seg-000001/..", "", None, 3):
        with pytest.raises(IndexFormatError):
            st.safe_child(tmp_path, bad, "segment")
    os.symlink(tmp_path / "seg-000001", tmp_path / "seg-000002")
    with pytest.raises(IndexFormatError, match="symbolic link"):
        st.safe_child(tmp_path, "seg-000002", "segment")
    np.save(tmp_path / "deleted-000003.npy", np.array([1, 4, 7], np.int64))
    np.testing.assert_array_equal(st.load_deleted(tmp_path, "deleted-000003.npy", 8, 3), [1, 4, 7])
    for arr, n in [(np.array([1, 4, 9], np.int64), 8), (np.array([4, 1], np.int64), 8),
                   (np.array([1, 1], np.int64), 8), (np.array([-1], np.int64), 8),
                   (np.array([1, 2], np.int32), 8), (np.arange(9, dtype=np.int64), 8)]:
        np.save(tmp_path / "deleted-000004.npy", arr)
        with pytest.raises(IndexFormatError):
            st.load_deleted(tmp_path, "deleted-000004.npy", n)
    with pytest.raises(IndexFormatError):
        st.load_deleted(tmp_path, "../deleted-000003.npy", 8)


def test_durable_writes_replace_planted_links(tmp_path):
    (tmp_path / "victim.txt").write_text("keep")
    os.symlink(tmp_path / "victim.txt", tmp_path / "manifest.json.tmp")
    st.write_json_durable(tmp_path / "manifest.json", {"a": 1})
    os.symlink(tmp_path / "victim.txt", tmp_path / "x.npy")
    st.save_npy(tmp_path / "x.npy", np.zeros(3))
    assert (tmp_path / "victim.txt").read_text() == "keep"
    assert json.loads((tmp_path / "manifest.json").read_text()) == {"a": 1}
    assert not (tmp_path / "x.npy").is_symlink()


# ---------------------------------------------------------------- model fingerprint


def old_fingerprint(d: Path) -> str:
    """The fingerprint before sharded weights were covered (must not change for one file)."""
    h = hashlib.sha256()
    for name in ("config.json", "sparse_linear.pt", "colbert_linear.pt", "tokenizer.json",
                 "1_Pooling/config.json"):
        p = d / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes())
    for name in ("model.safetensors", "pytorch_model.bin"):
        p = d / name
        if p.is_file():
            size = p.stat().st_size
            with open(p, "rb") as f:
                h.update(name.encode() + str(size).encode() + f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                h.update(f.read())
            break
    return h.hexdigest()[:32]


def test_fingerprint_unchanged_for_single_file_models(tiny_m3, tiny_dense):
    for d in (Path(tiny_m3), Path(tiny_dense)):
        assert any((d / w).is_file() for w in ("model.safetensors", "pytorch_model.bin"))
        assert st.model_fingerprint(d) == old_fingerprint(d)


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_fingerprint_covers_every_shard(tiny_m3, tmp_path, kind):
    def sharded(name, shard2: bytes):
        d = tmp_path / name
        shutil.copytree(tiny_m3, d)
        for w in ("model.safetensors", "pytorch_model.bin"):
            (d / w).unlink(missing_ok=True)
        if kind == "safetensors":
            s1, s2, ix = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", \
                "model.safetensors.index.json"
        else:
            s1, s2, ix = "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", \
                "pytorch_model.bin.index.json"
        (d / s1).write_bytes(b"A" * 3000)
        (d / s2).write_bytes(shard2)
        (d / ix).write_text(json.dumps({"weight_map": {"a": s1, "b": s2}}))
        return d

    a = sharded("a", b"B" * 3000)
    b = sharded("b", b"B" * 1500 + b"C" + b"B" * 1499)  # same size, one byte differs
    c = sharded("c", b"B" * 3000)
    assert st.model_fingerprint(a) != st.model_fingerprint(b)
    assert st.model_fingerprint(a) == st.model_fingerprint(c)
    # the second shard alone matters too: dropping it changes the fingerprint
    (c / next(p.name for p in c.iterdir() if "00002-of" in p.name)).unlink()
    assert st.model_fingerprint(a) != st.model_fingerprint(c)
