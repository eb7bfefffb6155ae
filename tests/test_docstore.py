"""The row-addressable document store (index/docstore.py): round trips, lookup by id (with
collisions), the legacy docs.msgpack reader, and hostile files."""

import os
import random

import msgpack
import numpy as np
import pytest

from hybridsearch.errors import IndexFormatError
from hybridsearch.index import docstore as ds
from hybridsearch.index.docstore import (
    DOCSTORE_FILES,
    Docstore,
    DocstoreWriter,
    LegacyDocstore,
    hash_ids,
    hash_spans,
    hash_spans_reference,
    write_docstore,
)

UNICODE = ["a", "é", "日本語", "😀", "\x00", "Ωmega", "ß", "\u200b", "x" * 300]


def _random_id(r: random.Random) -> str:
    return "".join(r.choice(UNICODE) for _ in range(r.randint(0, 4)))


def _fnv_fmix_py(b: bytes) -> int:
    """The documented hash, in plain Python ints (pins the on-disk format)."""
    mask = (1 << 64) - 1
    h = 0xCBF29CE484222325
    for x in b:
        h = ((h ^ x) * 0x100000001B3) & mask
    for m in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
        h ^= h >> 33
        h = (h * m) & mask
    return h ^ (h >> 33)


def _docs(n: int, seed: int = 0):
    r = random.Random(seed)
    ids = [f"{i}-{_random_id(r)}" for i in range(n)]
    texts = [_random_id(r) * r.randint(0, 3) for _ in range(n)]
    metas = []
    for i in range(n):
        md = {}
        if i % 3:
            md["n"] = r.choice([1, 2.5, -(2**63), 2**63 - 1, True, None, "s", [1, {"k": "v"}]])
        if i % 5 == 0:
            md["日本"] = {"nested": [None, 1.5, "x"]}
        metas.append(md)
    return ids, texts, metas


# ---------------------------------------------------------------- hash


def test_hash_kernel_matches_numpy_reference_and_plain_python():
    r = random.Random(1)
    ids = [_random_id(r) for _ in range(500)] + ["", "a" * 5000]
    blobs = [i.encode() for i in ids]
    data = np.frombuffer(b"".join(blobs), np.uint8)
    off = np.zeros(len(blobs) + 1, np.int64)
    np.cumsum([len(b) for b in blobs], out=off[1:])
    got = hash_spans(data, off)
    assert got.dtype == np.uint64 and got.shape == (len(ids),)
    assert np.array_equal(got, hash_spans_reference(data, off))  # integer hash: exact
    assert np.array_equal(hash_ids(ids), got)
    assert [int(x) for x in got[:50]] == [_fnv_fmix_py(b) for b in blobs[:50]]
    assert len(set(got.tolist())) == len(set(ids))


# ---------------------------------------------------------------- round trips


def test_round_trip_unicode_empty_metadata(tmp_path):
    ids, texts, metas = _docs(300)
    names = write_docstore(tmp_path, ids, texts, metas)
    assert names == list(DOCSTORE_FILES)
    assert sorted(os.listdir(tmp_path)) == sorted(DOCSTORE_FILES)
    s = Docstore.open(tmp_path, 300, deep=True)
    assert len(s) == 300
    assert s.all_ids() == ids
    assert s.id(7) == ids[7] and s.ids([5, 0, 5]) == [ids[5], ids[0], ids[5]]
    assert s.doc(3) == (ids[3], texts[3], metas[3])
    assert s.docs(np.array([299, 0])) == [(ids[299], texts[299], metas[299]), (ids[0], texts[0], metas[0])]
    assert s.chunk([1, 2]) == (ids[1:3], texts[1:3], metas[1:3])
    got = [c for c in s.iter_chunks(chunk=64)]
    assert [len(c[0]) for c in got] == [64, 64, 64, 64, 44]
    assert sum((c[2] for c in got), []) == metas
    assert s.metadata() == metas
    assert np.array_equal(s.find(ids[::-1]), np.arange(299, -1, -1))
    with pytest.raises(IndexError):
        s.doc(300)
    with pytest.raises(IndexError):
        s.id(-1)


def test_empty_store(tmp_path):
    assert write_docstore(tmp_path, [], [], []) == list(DOCSTORE_FILES)
    s = Docstore.open(tmp_path, 0, deep=True)
    assert s.all_ids() == [] and list(s.iter_chunks()) == []
    assert s.find(["a"]).tolist() == [-1]


def test_streamed_200k_rows_match_input(tmp_path):
    n, chunk = 200_000, 7_919
    ids = [f"doc-{i * 7919 % n}-é" for i in range(n)]
    texts = [f"text {i} 日本" for i in range(n)]
    metas = [{"i": i, "odd": bool(i & 1)} if i % 4 else {} for i in range(n)]
    w = DocstoreWriter(tmp_path)
    for lo in range(0, n, chunk):
        w.append(ids[lo:lo + chunk], texts[lo:lo + chunk], metas[lo:lo + chunk])
    w.finish()
    s = Docstore.open(tmp_path, n, deep=True)
    assert s.all_ids() == ids
    rows = np.random.default_rng(0).integers(0, n, 2000)
    assert s.docs(rows) == [(ids[r], texts[r], metas[r]) for r in rows]
    chunks = list(s.iter_chunks(chunk=50_000))
    assert sum((c[1] for c in chunks), []) == texts and sum((c[2] for c in chunks), []) == metas
    assert np.array_equal(s.find(ids), np.arange(n))
    assert s.find(["doc-1-e", "doc-1-", "", "doc-200000-é"]).tolist() == [-1] * 4


def test_find_absent_and_types(tmp_path):
    write_docstore(tmp_path, ["a", "b", "日本"], ["x", "y", "z"], [{}, {}, {}])
    s = Docstore.open(tmp_path, 3, deep=False)
    assert s.find([]).dtype == np.int64 and s.find([]).shape == (0,)
    assert s.find(["日本", "c", "a", "A", "a "]).tolist() == [2, -1, 0, -1, -1]
    with pytest.raises(TypeError):
        s.find([b"a"])


def test_find_is_correct_when_every_hash_collides(tmp_path, monkeypatch):
    def constant(data, offsets):
        return np.full(len(offsets) - 1, 12345, dtype=np.uint64)

    monkeypatch.setattr(ds, "hash_spans", constant)
    ids = [f"id{i}" for i in range(200)]
    write_docstore(tmp_path, ids, ["t"] * 200, [{}] * 200)
    s = Docstore.open(tmp_path, 200, deep=True)
    assert np.asarray(s._hash).tolist() == [12345] * 200
    q = ids[::7] + ["nope", "id200", ""]
    assert s.find(q).tolist() == list(range(0, 200, 7)) + [-1, -1, -1]
    (tmp_path / "dup").mkdir()
    with pytest.raises(ValueError, match="duplicate id 'id3'"):  # found among colliding hashes
        write_docstore(tmp_path / "dup", *_mk(["id1", "id3", "id2", "id3"]))


def _mk(ids):
    return ids, ["t"] * len(ids), [{}] * len(ids)


def test_writer_refuses_duplicates_and_bad_input(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="duplicate id 'x'"):
        write_docstore(tmp_path / "a", *_mk(["x", "y", "x"]))
    for i, (ids, texts, metas, err) in enumerate([
        (["a"], ["t"], [{1: "int key"}], ValueError),
        (["a"], ["t"], [{"ok": [{"deep": {2: 3}}]}], ValueError),
        (["a"], ["t"], ["not a dict"], TypeError),
        ([1], ["t"], [{}], TypeError),
        (["\ud800"], ["t"], [{}], ValueError),
        (["a"], ["t\udfff"], [{}], ValueError),
        (["a", "b"], ["t"], [{}], ValueError),
    ]):
        d = tmp_path / f"bad{i}"
        d.mkdir()
        w = DocstoreWriter(d)
        with pytest.raises(err):
            w.append(ids, texts, metas)
        assert w.count == 0 and os.path.getsize(d / "docs.bin") == 0
        w.abort()


def test_writer_never_writes_through_a_planted_link(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    d = tmp_path / "seg"
    d.mkdir()
    os.symlink(target, d / "docs.bin")
    with pytest.raises(FileExistsError):
        DocstoreWriter(d)
    assert target.read_bytes() == b"keep"


# ---------------------------------------------------------------- legacy


def test_legacy_docstore_same_api(tmp_path):
    ids, texts, metas = _docs(50, seed=3)
    (tmp_path / "docs.msgpack").write_bytes(
        msgpack.packb({"ids": ids, "texts": texts, "metadata": metas}, use_bin_type=True))
    s = LegacyDocstore.open(tmp_path, 50, deep=False)
    assert s.all_ids() == ids and s.doc(4) == (ids[4], texts[4], metas[4])
    assert s.chunk([0, 49]) == ([ids[0], ids[49]], [texts[0], texts[49]], [metas[0], metas[49]])
    assert sum((c[2] for c in s.iter_chunks(chunk=7)), []) == metas
    assert s.find([ids[9], "absent"]).tolist() == [9, -1]
    assert s.metadata() == metas
    with pytest.raises(IndexFormatError, match="must be a list of 51"):
        LegacyDocstore.open(tmp_path, 51, deep=True)
    lazy = LegacyDocstore.open(tmp_path, 51)  # checked on first use
    with pytest.raises(IndexFormatError):
        lazy.id(0)


@pytest.mark.parametrize("payload", [
    b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"ids": ["a"], "texts": ["t"], "metadata": [[]]}),
    msgpack.packb({"ids": [1], "texts": ["t"], "metadata": [{}]}),
    b"\xdb\x7f\xff\xff\xff",  # a str declaring 2 GiB
    msgpack.packb({"ids": ["a"], "texts": ["t"], "metadata": [{1: 2}]}),
])
def test_legacy_hostile(tmp_path, payload):
    (tmp_path / "docs.msgpack").write_bytes(payload + b"\x00" * 3)
    with pytest.raises(IndexFormatError, match="docs.msgpack"):
        LegacyDocstore.open(tmp_path, 1, deep=True)


# ---------------------------------------------------------------- hostile files


@pytest.fixture
def store(tmp_path):
    ids = [f"id-{i}" for i in range(40)]
    write_docstore(tmp_path, ids, [f"text {i}" for i in range(40)], [{"i": i} for i in range(40)])
    return tmp_path


def _npy(folder, name):
    return np.load(folder / name)


def _put(folder, name, arr):
    os.unlink(folder / name)
    np.save(folder / name, arr, allow_pickle=False)


def _record_at(folder, row, raw: bytes):
    """Replace record ``row`` of docs.bin by ``raw``, fixing every offset."""
    off = _npy(folder, "docs_offsets.npy")
    data = (folder / "docs.bin").read_bytes()
    recs = [data[off[i]:off[i + 1]] for i in range(len(off) - 1)]
    recs[row] = raw
    (folder / "docs.bin").write_bytes(b"".join(recs))
    new = np.zeros(len(recs) + 1, np.int64)
    np.cumsum([len(r) for r in recs], out=new[1:])
    _put(folder, "docs_offsets.npy", new)


@pytest.mark.parametrize("deep", [False, True])
def test_truncated_and_resized_data_files(store, deep):
    data = (store / "docs.bin").read_bytes()
    (store / "docs.bin").write_bytes(data[:-5])
    with pytest.raises(IndexFormatError, match="docs_offsets.npy"):
        Docstore.open(store, 40, deep=deep)
    (store / "docs.bin").write_bytes(data)
    (store / "ids.bin").write_bytes((store / "ids.bin").read_bytes() + b"x")
    with pytest.raises(IndexFormatError, match="ids_offsets.npy"):
        Docstore.open(store, 40, deep=deep)


def test_wrong_counts_dtypes_missing_and_linked_files(store):
    with pytest.raises(IndexFormatError):
        Docstore.open(store, 41, deep=False)
    with pytest.raises(IndexFormatError, match="too few"):
        Docstore.open(store, 10**9, deep=False)
    _put(store, "ids_hash.npy", _npy(store, "ids_hash.npy").astype(np.int64))
    with pytest.raises(IndexFormatError, match="ids_hash.npy"):
        Docstore.open(store, 40, deep=False)
    os.unlink(store / "ids_hash.npy")
    with pytest.raises(IndexFormatError, match="missing"):
        Docstore.open(store, 40, deep=False)
    os.symlink(store / "ids_order.npy", store / "ids_hash.npy")
    with pytest.raises(IndexFormatError, match="ids_hash.npy"):
        Docstore.open(store, 40, deep=False)


def test_offsets_past_the_end_or_decreasing(store):
    off = _npy(store, "docs_offsets.npy")
    bad = off.copy()
    bad[10] = off[-1] + 1000  # past the end, then back
    _put(store, "docs_offsets.npy", bad)
    with pytest.raises(IndexFormatError, match="ascend"):
        Docstore.open(store, 40, deep=True)
    s = Docstore.open(store, 40, deep=False)  # shallow: every access checks its offsets
    with pytest.raises(IndexFormatError, match="docs_offsets.npy"):
        s.doc(9)
    with pytest.raises(IndexFormatError, match="docs_offsets.npy"):
        list(s.iter_chunks())
    bad = off.copy()
    bad[10], bad[11] = off[11], off[10]  # decreasing
    _put(store, "docs_offsets.npy", bad)
    with pytest.raises(IndexFormatError, match="ascend"):
        Docstore.open(store, 40, deep=True)
    with pytest.raises(IndexFormatError):
        Docstore.open(store, 40, deep=False).doc(10)
    _put(store, "docs_offsets.npy", off)
    ioff = _npy(store, "ids_offsets.npy")
    ioff[5] = -3
    _put(store, "ids_offsets.npy", ioff)
    with pytest.raises(IndexFormatError, match="ids_offsets.npy"):
        Docstore.open(store, 40, deep=True)
    with pytest.raises(IndexFormatError, match="ids_offsets.npy"):
        Docstore.open(store, 40, deep=False).id(4)


def test_unsorted_hashes_and_bad_order(store):
    h, order = _npy(store, "ids_hash.npy"), _npy(store, "ids_order.npy")
    _put(store, "ids_hash.npy", h[::-1].copy())
    with pytest.raises(IndexFormatError, match="not sorted"):
        Docstore.open(store, 40, deep=True)
    assert Docstore.open(store, 40, deep=False).find(["id-3", "zz"]).shape == (2,)  # wrong, never a crash
    _put(store, "ids_hash.npy", h)
    for bad, msg in ((np.r_[order[:-1], order[0]], "permutation"), (np.r_[order[:-1], 40], "outside"),
                     (np.r_[order[:-1], -1], "outside")):
        _put(store, "ids_order.npy", bad.astype(np.int64))
        with pytest.raises(IndexFormatError, match=msg):
            Docstore.open(store, 40, deep=True)
    _put(store, "ids_order.npy", np.full(40, 10**12, np.int64))
    with pytest.raises(IndexFormatError, match="ids_order.npy"):
        Docstore.open(store, 40, deep=False).find(["id-3"])


@pytest.mark.parametrize("raw, msg", [
    (b"\xc1\xc1\xc1", "record 7"),                                   # not msgpack
    (msgpack.packb([1, {}]), "not \\[text, metadata\\]"),            # text not a str
    (msgpack.packb(["t", []]), "not \\[text, metadata\\]"),          # metadata not a dict
    (msgpack.packb({"t": 1}), "not \\[text, metadata\\]"),
    (msgpack.packb(["t", {}, 3]), "not \\[text, metadata\\]"),
    (msgpack.packb(["t", {}]) + b"\x01", "record 7"),                # trailing bytes
    (b"\x92\xdb\x7f\xff\xff\xff", "record 7"),                       # a 2 GiB string declared
    (b"\x92\xa1t\xdf\x7f\xff\xff\xff", "record 7"),                  # a 2**31-entry map declared
    (b"\xdd\x7f\xff\xff\xff", "record 7"),                           # a 2**31-entry array declared
    (msgpack.packb(["t", {"k": msgpack.ExtType(5, b"xx")}]), "record 7"),
    (msgpack.packb(["t", {1: 2}]), "record 7"),                     # non-string map key
])
def test_hostile_records(store, raw, msg):
    _record_at(store, 7, raw)
    s = Docstore.open(store, 40, deep=True)
    assert s.doc(6)[0] == "id-6"
    with pytest.raises(IndexFormatError, match=msg):
        s.doc(7)
    with pytest.raises(IndexFormatError, match="docs.bin"):
        s.docs([6, 7])


def test_ids_not_utf8(store):
    ioff = _npy(store, "ids_offsets.npy")
    data = bytearray((store / "ids.bin").read_bytes())
    data[ioff[2]] = 0xFF
    (store / "ids.bin").write_bytes(bytes(data))
    s = Docstore.open(store, 40, deep=True)
    with pytest.raises(IndexFormatError, match="not UTF-8"):
        s.id(2)
    assert s.find(["id-3"]).tolist() == [3]


def test_random_byte_flips_never_crash(store):
    """Whatever bytes a file holds, opening and reading raise IndexFormatError or work."""
    r = random.Random(5)
    originals = {n: (store / n).read_bytes() for n in DOCSTORE_FILES}
    for trial in range(60):
        name = r.choice(DOCSTORE_FILES)
        data = bytearray(originals[name])
        for _ in range(r.randint(1, 4)):
            if data:
                data[r.randrange(len(data))] = r.randrange(256)
        (store / name).write_bytes(bytes(data))
        try:
            s = Docstore.open(store, 40, deep=trial % 2 == 0)
            s.docs(range(40))
            s.find([f"id-{i}" for i in range(40)])
        except IndexFormatError:
            pass
        (store / name).write_bytes(originals[name])
