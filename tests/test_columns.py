"""Typed metadata columns (index/columns.py): every mask equals the plain-Python reference
(filters.mask_reference) on random metadata and filters; kinds, layouts, the 1M-row vectorised
path, the mask cache, and hostile column files."""

import json
import os
import random
import re
from fractions import Fraction

import numpy as np
import pytest

from hybridsearch.errors import IndexFormatError
from hybridsearch.index import columns as C
from hybridsearch.index.columns import ColumnsWriter, SegmentColumns, write_columns
from hybridsearch.index.filters import check_filter, mask_reference

BIG = 2**53


def _no_fallback():
    raise AssertionError("the reference path was used for typed columns")


def _open(folder, metas, deep=True):
    os.makedirs(folder, exist_ok=True)
    write_columns(folder, metas)
    return SegmentColumns.open(folder, len(metas), deep=deep)


# ---------------------------------------------------------------- random metadata and filters

VALUES = {
    "int": [0, 1, -1, 2, 3, 7, BIG, BIG + 1, -BIG - 1, 2**63 - 1, -(2**63)],
    "float": [0.0, -0.0, 1.0, 2.5, 3.0, -7.25, float(BIG), 2.0**63, 1e300, 9.2e18],
    "bool": [True, False],
    "str": ["a", "b", "", "é", "日本", "a\x00", "ab", "😀", "A", "b "],
    "none": [None],
    "list": [[1], ["a"], [], [1, 2], [True], [1.0]],
    "dict": [{}, {"a": 1}, {"a": 1.0}],
}
KINDS = list(VALUES)
# field -> the kinds of value it takes, and how often a document holds it
FIELDS = {
    "n": (["int", "float", "none"], 0.8), "f": (["float"], 0.9), "i": (["int"], 0.7),
    "b": (["bool", "none"], 0.8), "s": (["str"], 0.9), "sn": (["str", "none"], 0.6),
    "mix": (KINDS, 0.7), "rare_s": (["str"], 0.03), "rare_n": (["int", "float"], 0.05),
    "nul": (["none"], 0.5), "lst": (["list", "str"], 0.5), "sb": (["str", "bool"], 0.5),
    "weird/../name": (["int"], 0.5), "": (["str"], 0.3),
}


def _value(r, kinds):
    return r.choice(VALUES[r.choice(kinds)])


def _metadata(r, n):
    out = []
    for _ in range(n):
        md = {f: _value(r, kinds) for f, (kinds, p) in FIELDS.items() if r.random() < p}
        out.append(md)
    return out


def _filter_value(r):
    return _value(r, KINDS)


def _filter(r, exotic=False):
    flt = {}
    for _ in range(r.randint(1, 3)):
        field = r.choice(list(FIELDS) + ["absent"])
        if r.random() < 0.25:
            v = _filter_value(r)
            flt[field] = {"eq": v} if isinstance(v, dict) else v
            continue
        cond = {}
        for _ in range(r.randint(1, 2)):
            op = r.choice(["eq", "ne", "in", "in", "gt", "gte", "lt", "lte"])
            if op == "in":
                vals = [_filter_value(r) for _ in range(r.choice([0, 1, 2, 4, 20, 40]))]
                if r.random() < 0.2:
                    vals = tuple(vals)
                elif r.random() < 0.2 and all(isinstance(v, (str, int, float, type(None))) for v in vals):
                    vals = set(vals)
                cond[op] = vals
            elif op in ("eq", "ne"):
                cond[op] = _filter_value(r)
            else:
                cond[op] = _value(r, ["int", "float"])
            if exotic and r.random() < 0.5:
                cond[op] = r.choice([np.float32(2.5), np.int64(BIG + 1), np.float64(3.0), Fraction(5, 2),
                                     np.int64(7), np.bool_(True)])
        flt[field] = cond
    try:
        check_filter(flt)
    except (TypeError, ValueError):
        return _filter(r, exotic)
    return flt


def _typed_only(cols, flt) -> bool:
    for field, cond in flt.items():
        if cols.fields.get(field) == "object":
            return False
        for op, v in (cond.items() if isinstance(cond, dict) else [("eq", cond)]):
            vals = v if op == "in" else [v]
            if any(type(x) not in (int, float, str, bool, type(None), list, dict, tuple) for x in vals):
                return False
    return True


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy scalars
@pytest.mark.parametrize("seed, n", [(0, 2000), (1, 1500), (2, 40), (3, 1)])
def test_mask_equals_reference_on_random_metadata_and_filters(tmp_path, seed, n):
    r = random.Random(seed)
    metas = _metadata(r, n)
    cols = _open(tmp_path, metas)
    if n > 1000:
        assert cols.fields["mix"] == "object"
        assert {k: cols.fields[k] for k in ("n", "f", "b", "s", "rare_s", "nul", "lst", "sb")} == {
            "n": "numeric", "f": "numeric", "b": "bool", "s": "string", "rare_s": "string",
            "nul": "bool", "lst": "object", "sb": "object"}
    calls = []

    def fallback():
        calls.append(1)
        return metas

    typed = 0
    for k in range(250):
        flt = _filter(r, exotic=k % 10 == 0)
        del calls[:]
        got = cols.mask(flt, fallback)
        want = mask_reference(metas, flt, n)
        assert got.dtype == bool and got.shape == (n,)
        assert np.array_equal(got, want), (flt, np.flatnonzero(got != want)[:5])
        if _typed_only(cols, flt):
            typed += 1
            assert not calls, flt
        assert np.array_equal(cols.mask(flt, fallback), want)  # cached or not, the same
    assert typed > 100


def test_exact_number_semantics(tmp_path):
    metas = [{"x": BIG}, {"x": BIG + 1}, {"x": float(BIG)}, {"x": 1}, {"x": 1.0}, {"x": True},
             {"x": None}, {}, {"x": 2**63 - 1}, {"x": 0.5}]
    cols = _open(tmp_path, metas)
    assert cols.fields == {"x": "object"}  # True makes it mixed
    metas = [m for m in metas if m.get("x") is not True]
    cols = _open(tmp_path / "n", metas)
    assert cols.fields == {"x": "numeric"}
    assert (tmp_path / "n" / "col-0000-i64.npy").exists()

    def rows(flt):
        got = np.flatnonzero(cols.mask(flt, _no_fallback)).tolist()
        assert got == np.flatnonzero(mask_reference(metas, flt, len(metas))).tolist()
        return got

    assert rows({"x": BIG}) == [0, 2]
    assert rows({"x": BIG + 1}) == [1]
    assert rows({"x": float(BIG)}) == [0, 2]
    assert rows({"x": 1}) == [3, 4] and rows({"x": 1.0}) == [3, 4]
    assert rows({"x": True}) == []
    assert rows({"x": None}) == [5]
    assert rows({"x": {"ne": 1}}) == [0, 1, 2, 5, 6, 7, 8]  # missing passes ne
    assert rows({"x": {"in": [BIG + 1, 0.5, "1"]}}) == [1, 8]
    assert rows({"x": 2**63 - 1}) == [7]
    assert rows({"x": {"gt": BIG}}) == [7]  # ranges compare as float64, like the reference
    assert rows({"x": {"gte": 0.5, "lt": 2}}) == [3, 4, 8]


def test_strings_bools_and_missing(tmp_path):
    metas = [{"s": "b", "t": True}, {"s": "a"}, {"s": "é", "t": False}, {}, {"s": None, "t": None}, {"s": ""}]
    cols = _open(tmp_path, metas)
    assert cols.fields == {"s": "string", "t": "bool"}
    assert (tmp_path / "col-0000-dict.bin").read_bytes() == "abé".encode()  # "", "a", "b", "é"

    def rows(flt):
        got = np.flatnonzero(cols.mask(flt, _no_fallback)).tolist()
        assert got == np.flatnonzero(mask_reference(metas, flt, len(metas))).tolist()
        return got

    assert rows({"s": "a"}) == [1] and rows({"s": ""}) == [5] and rows({"s": "zz"}) == []
    assert rows({"s": {"in": ["é", "b", None]}}) == [0, 2, 4]
    assert rows({"s": {"ne": "a"}}) == [0, 2, 3, 4, 5]
    assert rows({"s": {"gt": 0}}) == []  # ranges only match numbers
    assert rows({"t": True}) == [0] and rows({"t": 1}) == [] and rows({"t": {"ne": False}}) == [0, 1, 3, 4, 5]
    assert rows({"absent": {"ne": 3}}) == list(range(6)) and rows({"absent": {"in": []}}) == []
    assert rows({"s": {"in": []}}) == []
    assert rows({"s": "\ud800"}) == []  # a lone surrogate equals nothing stored


def test_kinds_layouts_and_file_names(tmp_path):
    n = 1000
    metas = [{"num": i, "rare": "x" if i % 100 == 0 else None, "../evil": "v", "tags": ["a"]}
             if i % 100 == 0 else {"num": i * 0.5} for i in range(n)]
    names = write_columns(tmp_path, metas)
    assert sorted(names) == sorted(os.listdir(tmp_path))
    assert all(re.fullmatch(r"col-[0-9]{4}-[a-z0-9_]{1,16}\.(npy|bin)", x) for x in names if x != "columns.json")
    schema = {f["name"]: f for f in json.loads((tmp_path / "columns.json").read_text())["fields"]}
    assert schema["num"]["layout"] == "dense" and schema["num"]["exact_ints"] is False
    assert schema["rare"]["layout"] == "sparse" and schema["rare"]["present"] == 10
    assert schema["tags"]["kind"] == "object" and "id" not in schema["tags"]
    cols = SegmentColumns.open(tmp_path, n, deep=True)
    assert cols.files == names
    assert cols.fields == {"num": "numeric", "rare": "string", "../evil": "string", "tags": "object"}
    assert np.flatnonzero(cols.mask({"rare": "x", "num": {"lt": 500}}, _no_fallback)).tolist() == [0, 100, 200, 300, 400]
    assert cols.mask({"rare": {"ne": "x"}}, _no_fallback).sum() == n - 10


def test_too_many_fields_become_object(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "MAX_TYPED_FIELDS", 3)
    metas = [{f"f{j}": i for j in range(6) if i % (j + 1) == 0} for i in range(60)]
    cols = _open(tmp_path, metas)
    assert cols.fields == {"f0": "numeric", "f1": "numeric", "f2": "numeric",
                           "f3": "object", "f4": "object", "f5": "object"}
    for f in cols.fields:
        flt = {f: {"gte": 12}}
        assert np.array_equal(cols.mask(flt, lambda: metas), mask_reference(metas, flt, 60))


def test_empty_segments(tmp_path):
    cols = _open(tmp_path, [])
    assert cols.mask({"a": 1}, _no_fallback).shape == (0,)
    cols = _open(tmp_path / "e", [{}, {}])
    assert cols.fields == {} and cols.mask({"a": {"ne": 1}}, _no_fallback).tolist() == [True, True]
    assert cols.mask({}, _no_fallback).tolist() == [True, True]


def test_mask_cache_is_read_only_and_keyed_by_type(tmp_path):
    metas = [{"x": 1}, {"x": 1.5}, {"y": True}, {"y": 1}]
    cols = _open(tmp_path, metas)
    a = cols.mask({"x": 1}, _no_fallback)
    assert a is cols.mask({"x": 1}, _no_fallback)
    with pytest.raises(ValueError):
        a[0] = False
    flt = {"y": True}
    assert cols.mask(flt, lambda: metas).tolist() == [False, False, True, False]
    assert cols.mask({"y": 1}, lambda: metas).tolist() == [False, False, False, True]


def test_streaming_writer_matches_one_shot(tmp_path):
    r = random.Random(9)
    metas = _metadata(r, 1200)
    w = ColumnsWriter(tmp_path / "a")
    (tmp_path / "a").mkdir()
    for lo in range(0, 1200, 97):
        w.append(metas[lo:lo + 97])
    names = w.finish()
    (tmp_path / "b").mkdir()
    assert write_columns(tmp_path / "b", metas) == names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_one_million_rows_vectorised(tmp_path):
    """1M rows of a numeric and a string field: masks from the arrays alone (the fallback
    raises), equal to numpy's."""
    n, step = 1_000_000, 100_000
    rng = np.random.default_rng(0)
    year = rng.integers(1900, 2030, n)
    score = np.round(rng.random(n) * 100, 2)
    words = np.array(["en", "de", "fr", "日本", "es"])
    lang = rng.integers(0, len(words), n)
    w = ColumnsWriter(tmp_path)
    yl, sl, ll = year.tolist(), score.tolist(), words[lang].tolist()
    for lo in range(0, n, step):
        w.append([{"year": yl[i], "score": sl[i], "lang": ll[i]} if i % 10 else {"year": yl[i]}
                  for i in range(lo, min(n, lo + step))])
    w.finish()
    cols = SegmentColumns.open(tmp_path, n, deep=True)
    assert cols.fields == {"year": "numeric", "score": "numeric", "lang": "string"}
    has = np.arange(n) % 10 != 0
    m = cols.mask({"year": {"gte": 2000, "lt": 2010}, "lang": {"in": ["de", "日本", "xx"]}}, _no_fallback)
    assert np.array_equal(m, (year >= 2000) & (year < 2010) & has & ((lang == 1) | (lang == 3)))
    assert np.array_equal(cols.mask({"year": 1999}, _no_fallback), year == 1999)
    assert np.array_equal(cols.mask({"score": {"lte": 50.0}}, _no_fallback), has & (score <= 50.0))
    assert np.array_equal(cols.mask({"lang": {"ne": "fr"}}, _no_fallback), ~(has & (lang == 2)))


# ---------------------------------------------------------------- hostile files


@pytest.fixture
def built(tmp_path):
    metas = [{"n": i, "s": f"v{i % 7}", "b": i % 2 == 0, "r": "x"} if i % 10 == 0 else
             {"n": i * 0.5, "s": f"v{i % 7}", "b": None} for i in range(100)]
    write_columns(tmp_path, metas)
    return tmp_path


def _schema(folder):
    return json.loads((folder / "columns.json").read_text())


def _set_schema(folder, doc):
    (folder / "columns.json").write_text(json.dumps(doc) if not isinstance(doc, str) else doc)


def _field_id(folder, name):
    return next(f["id"] for f in _schema(folder)["fields"] if f["name"] == name)


def _put(folder, name, arr):
    os.unlink(folder / name)
    np.save(folder / name, arr, allow_pickle=False)


def test_opens_when_intact(built):
    cols = SegmentColumns.open(built, 100, deep=True)
    assert cols.fields == {"n": "numeric", "s": "string", "b": "bool", "r": "string"}


@pytest.mark.parametrize("edit", [
    lambda d: "not json",
    lambda d: [],
    lambda d: {**d, "format": "other"},
    lambda d: {**d, "version": 2},
    lambda d: {**d, "version": True},
    lambda d: {**d, "count": 99},
    lambda d: {**d, "fields": {}},
    lambda d: {**d, "fields": d["fields"] + [d["fields"][0]]},
    lambda d: {**d, "fields": [{**f, "kind": "float"} for f in d["fields"]]},
    lambda d: {**d, "fields": [{**f, "name": 3} for f in d["fields"]]},
    lambda d: {**d, "fields": [{**f, "id": 10000} for f in d["fields"]]},
    lambda d: {**d, "fields": [{**f, "id": 0} for f in d["fields"]]},
    lambda d: {**d, "fields": [{**f, "id": "0"} for f in d["fields"]]},
    lambda d: {**d, "fields": [{**f, "layout": "packed"} for f in d["fields"]]},
    lambda d: {**d, "fields": [{**f, "present": 101} for f in d["fields"]]},
    lambda d: {**d, "fields": [{**f, "present": 5} for f in d["fields"]]},  # sparse lengths
    lambda d: {**d, "fields": [{**f, "exact_ints": True} for f in d["fields"]]},
    lambda d: {**d, "fields": [{**f, "dict_size": 10**12} if "dict_size" in f else f for f in d["fields"]]},
    lambda d: {**d, "fields": [{**f, "dict_size": 3} if "dict_size" in f else f for f in d["fields"]]},
    lambda d: {**d, "fields": [{**f, "kind": "string"} if f["kind"] == "bool" else f for f in d["fields"]]},
])
def test_hostile_schema(built, edit):
    doc = edit(_schema(built))
    _set_schema(built, doc)
    with pytest.raises(IndexFormatError, match="col"):
        SegmentColumns.open(built, 100, deep=True)


def test_schema_too_large_or_linked(built, tmp_path_factory):
    with open(built / "columns.json", "r+b") as f:
        f.truncate(C.MAX_SCHEMA_BYTES + 1)
    with pytest.raises(IndexFormatError, match="larger"):
        SegmentColumns.open(built, 100, deep=False)
    os.unlink(built / "columns.json")
    with pytest.raises(IndexFormatError, match="missing"):
        SegmentColumns.open(built, 100, deep=False)
    elsewhere = tmp_path_factory.mktemp("x") / "columns.json"
    elsewhere.write_text("{}")
    os.symlink(elsewhere, built / "columns.json")
    with pytest.raises(IndexFormatError, match="columns.json"):
        SegmentColumns.open(built, 100, deep=False)


@pytest.mark.parametrize("deep", [False, True])
def test_missing_wrong_dtype_or_length(built, deep):
    n = _field_id(built, "n")
    f64 = f"col-{n:04d}-f64.npy"
    a = np.load(built / f64)
    _put(built, f64, a.astype(np.float32))
    with pytest.raises(IndexFormatError, match=f64):
        SegmentColumns.open(built, 100, deep=deep)
    _put(built, f64, a[:-1])
    with pytest.raises(IndexFormatError, match=f64):
        SegmentColumns.open(built, 100, deep=deep)
    os.unlink(built / f64)
    with pytest.raises(IndexFormatError, match="missing"):
        SegmentColumns.open(built, 100, deep=deep)


def test_hostile_column_data_deep(built):
    s, b, r, n = (_field_id(built, k) for k in ("s", "b", "r", "n"))
    cases = [
        (f"col-{s:04d}-codes.npy", lambda a: np.where(np.arange(len(a)) == 3, 7, a).astype(np.int32), "codes"),
        (f"col-{s:04d}-codes.npy", lambda a: np.where(np.arange(len(a)) == 3, -3, a).astype(np.int32), "codes"),
        (f"col-{b:04d}-tags.npy", lambda a: np.where(np.arange(len(a)) == 3, 4, a).astype(np.uint8), "tag"),
        (f"col-{n:04d}-tags.npy", lambda a: np.where(np.arange(len(a)) == 3, 2, a).astype(np.uint8), "tag"),
        (f"col-{n:04d}-tags.npy", lambda a: np.where(np.arange(len(a)) == 3, 0, a).astype(np.uint8), "values"),
        (f"col-{n:04d}-tags.npy", lambda a: np.where(np.arange(len(a)) == 3, 1, a).astype(np.uint8), "number"),
        (f"col-{r:04d}-rows.npy", lambda a: a[::-1].copy(), "ascending"),
        (f"col-{r:04d}-rows.npy", lambda a: (a + 1000).astype(np.int32), "ascending"),
        (f"col-{r:04d}-codes.npy", lambda a: np.full_like(a, -1), "codes"),
        (f"col-{s:04d}-dictoff.npy", lambda a: np.r_[0, a[2], a[1], a[3:]].astype(np.int64), "ascend"),
    ]
    for name, edit, msg in cases:
        orig = np.load(built / name)
        _put(built, name, edit(orig))
        with pytest.raises(IndexFormatError, match=msg):
            SegmentColumns.open(built, 100, deep=True)
        _put(built, name, orig)
    SegmentColumns.open(built, 100, deep=True)


def test_hostile_dictionary(built):
    s = _field_id(built, "s")
    path = built / f"col-{s:04d}-dict.bin"
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(IndexFormatError, match="dictoff"):
        SegmentColumns.open(built, 100, deep=False)
    path.write_bytes(data[::-1])  # same size, unsorted
    with pytest.raises(IndexFormatError, match="sorted"):
        SegmentColumns.open(built, 100, deep=True)
    path.write_bytes(b"\xff" + data[1:])
    with pytest.raises(IndexFormatError, match="UTF-8"):
        SegmentColumns.open(built, 100, deep=True)


def test_shallow_open_never_crashes_on_bad_rows(built):
    r = _field_id(built, "r")
    _put(built, f"col-{r:04d}-rows.npy", np.array([0, 10, 20, 30, 40, 50, 60, 70, 80, 10**6], np.int32))
    cols = SegmentColumns.open(built, 100, deep=False)
    with pytest.raises(IndexFormatError, match="outside"):
        cols.mask({"r": "x"}, _no_fallback)
