"""Typed metadata columns of one segment: a metadata filter as a few vectorised array passes.

Written at commit by :class:`ColumnsWriter` (streaming), memory-mapped by
:class:`SegmentColumns`, whose :meth:`~SegmentColumns.mask` gives exactly the mask of
:func:`hybridsearch.index.filters.mask_reference` (the plain-Python semantics) without a Python
loop over documents.

Each metadata field of the segment gets a kind, from the types of its values (``None`` fits
every kind):

* ``numeric`` -- ints (within int64) and floats, never bools;
* ``bool``    -- bools (also a field whose every value is ``None``);
* ``string``  -- strings, dictionary-encoded;
* ``object``  -- anything else (mixed kinds, lists, dicts): no arrays; a filter on it is
  evaluated by the reference over the segment's metadata (correct, slow, rare). So is every
  field past the :data:`MAX_TYPED_FIELDS` most frequent ones.

Files (field names never appear in file names; ``N`` is a field's 4-digit id, ``L`` its length:
``count`` when ``dense``, the number of documents holding the field when ``sparse``):

* ``columns.json``        -- ``{"format": "hybridsearch-columns", "version": 1, "count": n,
  "fields": [{"name", "kind", "id", "layout", "present", "exact_ints", "dict_size"}]}``
  (``id``/``layout``... only for typed kinds);
* ``col-N-rows.npy``      -- (L,) int32 rows holding the field, strictly ascending (sparse only);
* ``col-N-tags.npy``      -- (L,) uint8 numeric and bool: 0 missing, 1 None, 2 False, 3 True,
  4 float, 5 int (never 0 when sparse);
* ``col-N-f64.npy``       -- (L,) float64 numeric: the value as a float (ints rounded), NaN
  unless a number;
* ``col-N-i64.npy``       -- (L,) int64 numeric, only when an int is not exactly a float64
  (|x| > 2**53): the exact ints (0 elsewhere), so equality stays exact;
* ``col-N-codes.npy``     -- (L,) int32 string: index into the field's dictionary, -1 missing
  (never when sparse), -2 None;
* ``col-N-dict.bin``      -- string: the distinct values, UTF-8, sorted by their bytes (= code
  point order) and unique, concatenated;
* ``col-N-dictoff.npy``   -- (k+1,) int64 byte offsets into ``col-N-dict.bin``.

A field stored ``sparse`` when fewer than one document in :data:`SPARSE_BELOW` holds it keeps
the files proportional to the metadata actually stored.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import IndexFormatError
from .filters import MetadataColumns, _is_number, check_filter
from .storage import _open_nofollow, load_npy

COLUMNS_FILE = "columns.json"
SCHEMA_FORMAT = "hybridsearch-columns"
SCHEMA_VERSION = 1
MAX_SCHEMA_BYTES = 64 << 20
# Typed columns per segment (each is 1-4 files); fields beyond the most frequent ones are "object".
MAX_TYPED_FIELDS = 256
# A field held by fewer than count / SPARSE_BELOW documents is stored by row.
SPARSE_BELOW = 8
# Masks kept per segment (LRU), bounded by bytes too.
MASK_CACHE_ENTRIES = 64
MASK_CACHE_BYTES = 8 << 20
# Reference columns (object fields) kept per segment.
REFERENCE_FIELDS = 8

KINDS = ("numeric", "bool", "string", "object")
MISSING, NONE, FALSE, TRUE, FLOAT, INT, STR = range(7)
_TAGS_OK = {"numeric": (MISSING, NONE, FLOAT, INT), "bool": (MISSING, NONE, FALSE, TRUE)}
CODE_MISSING, CODE_NONE = -1, -2
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_EXACT = 2**53
_RANGES = ("gt", "gte", "lt", "lte")


def _name(fid: int, part: str) -> str:
    return f"col-{fid:04d}-{part}"


def field_files(kind: str, fid: int, layout: str, exact_ints: bool = False) -> list[str]:
    """The files of typed field ``fid`` (see the module docstring)."""
    parts = ["rows.npy"] if layout == "sparse" else []
    if kind == "numeric":
        parts += ["tags.npy", "f64.npy"] + (["i64.npy"] if exact_ints else [])
    elif kind == "bool":
        parts += ["tags.npy"]
    elif kind == "string":
        parts += ["codes.npy", "dict.bin", "dictoff.npy"]
    return [_name(fid, p) for p in parts]


# ---------------------------------------------------------------- writing


class _Field:
    """What the writer keeps of one field: per chunk, the rows holding it and their values."""

    __slots__ = ("name", "kind", "object", "exact", "chunks", "strings", "present")

    def __init__(self, name: str):
        self.name = name
        self.kind: str | None = None  # set by the first value that is not None
        self.object = False
        self.exact = False
        self.chunks: list[tuple] = []  # (rows int32, tags uint8, payload or None)
        self.strings: dict[str, int] = {}  # value -> provisional code (first seen)
        self.present = 0

    def to_object(self) -> None:
        self.object, self.kind, self.chunks, self.strings = True, "object", [], {}

    def add(self, rows: list[int], values: list) -> None:
        if self.object:
            return
        tags = np.empty(len(values), np.uint8)
        f64 = i64 = codes = None
        big = False  # this chunk holds an int that is not exact as a float64
        kind = self.kind
        for j, v in enumerate(values):
            if v is None:
                tags[j] = NONE
                continue
            if isinstance(v, bool):
                k, t = "bool", TRUE if v else FALSE
            elif isinstance(v, int):
                k, t = "numeric", INT
            elif isinstance(v, float):
                k, t = "numeric", FLOAT
            elif isinstance(v, str):
                k, t = "string", STR
            else:
                return self.to_object()
            if kind is None:
                kind = k
            elif k != kind:
                return self.to_object()
            tags[j] = t
            if k == "numeric":
                if f64 is None:
                    f64 = np.full(len(values), np.nan)
                    i64 = np.zeros(len(values), np.int64)
                if t == INT:
                    x = int.__int__(v)  # the stored value, whatever a subclass says
                    if not INT64_MIN <= x <= INT64_MAX:
                        return self.to_object()
                    i64[j] = x
                    f64[j] = float(x)
                    if abs(x) > _EXACT:
                        big = self.exact = True
                else:
                    f64[j] = float.__float__(v)
            elif k == "string":
                if codes is None:
                    codes = np.full(len(values), CODE_NONE, np.int32)
                s = str.__str__(v)
                c = self.strings.get(s)
                if c is None:
                    c = self.strings[s] = len(self.strings)
                codes[j] = c
        self.kind = kind
        # ints exact as floats are rebuilt from f64 at the end: keep i64 only where needed
        payload = (f64, i64 if big else None) if f64 is not None else codes
        self.chunks.append((np.asarray(rows, np.int32), tags, payload))
        self.present += len(values)


class ColumnsWriter:
    """Streams metadata into the column files of ``folder`` (an existing, new folder).

    Memory: per field, the rows holding it and their values as arrays (13 bytes a number, 9
    a string, 5 a bool; 8 more for ints beyond 2**53) and the distinct strings of string
    fields; never the metadata dicts.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.count = 0
        self._fields: dict[str, _Field] = {}

    def append(self, metadata: list[dict]) -> None:
        """Add the metadata of rows ``count .. count + len(metadata) - 1`` (dicts; keys that
        are not strings cannot be filtered on and are ignored)."""
        per: dict = {}
        for j, md in enumerate(metadata):
            if not isinstance(md, dict):
                raise TypeError(f"metadata must be dicts, got {type(md).__name__}")
            for k, v in md.items():
                got = per.get(k)
                if got is None:
                    per[k] = got = ([], [])
                got[0].append(j)
                got[1].append(v)
        for k, (rows, values) in per.items():
            if type(k) is not str:
                continue
            f = self._fields.get(k)
            if f is None:
                f = self._fields[k] = _Field(k)
            f.add([r + self.count for r in rows], values)
        self.count += len(metadata)

    def finish(self) -> list[str]:
        """Write ``columns.json`` and every column file; returns their names (not fsynced)."""
        n = self.count
        fields = list(self._fields.values())
        typed = [f for f in fields if not f.object]
        if len(typed) > MAX_TYPED_FIELDS:
            keep = sorted(range(len(typed)), key=lambda i: -typed[i].present)[:MAX_TYPED_FIELDS]
            keep_set = {id(typed[i]) for i in keep}
            for f in typed:
                if id(f) not in keep_set:
                    f.to_object()
        schema, names, fid = [], [COLUMNS_FILE], 0
        for f in fields:
            if f.object:
                schema.append({"name": f.name, "kind": "object"})
                continue
            entry, files = self._write_field(f, fid, n)
            schema.append(entry)
            names += files
            fid += 1
            f.chunks, f.strings = [], {}
        doc = {"format": SCHEMA_FORMAT, "version": SCHEMA_VERSION, "count": n, "fields": schema}
        with open(self.folder / COLUMNS_FILE, "xb") as fh:
            fh.write(json.dumps(doc, ensure_ascii=False).encode("utf-8"))
        self._fields = {}
        return names

    def _write_field(self, f: _Field, fid: int, n: int) -> tuple[dict, list[str]]:
        kind = f.kind or "bool"  # only None values: the smallest column
        m = f.present
        sparse = m * SPARSE_BELOW < n
        rows = np.concatenate([c[0] for c in f.chunks])
        tags = np.concatenate([c[1] for c in f.chunks])
        length = m if sparse else n

        def spread(values, fill, dtype):
            if sparse:
                return np.asarray(values, dtype)
            out = np.full(n, fill, dtype)
            out[rows] = values
            return out

        arrays = {}
        if sparse:
            arrays["rows.npy"] = rows.astype(np.int32)
        entry = {"name": f.name, "kind": kind, "id": fid, "layout": "sparse" if sparse else "dense",
                 "present": m}
        if kind in ("numeric", "bool"):
            arrays["tags.npy"] = spread(tags, MISSING, np.uint8)
        if kind == "numeric":
            f64 = np.concatenate([c[2][0] if c[2] is not None else np.full(len(c[0]), np.nan)
                                  for c in f.chunks])
            arrays["f64.npy"] = spread(f64, np.nan, np.float64)
            entry["exact_ints"] = f.exact
            if f.exact:
                i64 = np.zeros(m, np.int64)
                ints = tags == INT
                with np.errstate(invalid="ignore"):  # bigger ints: their chunk's i64 below
                    i64[ints] = f64[ints].astype(np.int64)  # exact up to 2**53
                at = 0
                for c in f.chunks:
                    if c[2] is not None and c[2][1] is not None:
                        i64[at:at + len(c[0])] = c[2][1]
                    at += len(c[0])
                arrays["i64.npy"] = spread(i64, 0, np.int64)
        elif kind == "string":
            strings = list(f.strings)
            blobs = [s.encode("utf-8") for s in strings]
            order = sorted(range(len(blobs)), key=blobs.__getitem__)
            remap = np.empty(len(blobs) + 2, np.int32)  # slots -2, -1 map to themselves
            remap[np.asarray(order, np.int64)] = np.arange(len(blobs), dtype=np.int32)
            remap[-2], remap[-1] = CODE_NONE, CODE_MISSING
            prov = np.concatenate([c[2] if c[2] is not None else np.full(len(c[0]), CODE_NONE, np.int32)
                                   for c in f.chunks])
            arrays["codes.npy"] = spread(remap[prov], CODE_MISSING, np.int32)
            sorted_blobs = [blobs[i] for i in order]
            off = np.zeros(len(blobs) + 1, np.int64)
            np.cumsum([len(b) for b in sorted_blobs], out=off[1:])
            arrays["dict.bin"] = b"".join(sorted_blobs)
            arrays["dictoff.npy"] = off
            entry["dict_size"] = len(blobs)
        assert all(len(a) == length for k, a in arrays.items() if k in ("tags.npy", "f64.npy",
                                                                       "i64.npy", "codes.npy"))
        files = []
        for part, a in arrays.items():
            name = _name(fid, part)
            with open(self.folder / name, "xb") as fh:
                if isinstance(a, bytes):
                    fh.write(a)
                else:
                    np.save(fh, a, allow_pickle=False)
            files.append(name)
        assert files == field_files(kind, fid, entry["layout"], f.exact)
        return entry, files


def write_columns(folder: str | os.PathLike, metadata: list[dict]) -> list[str]:
    """Write the columns of ``metadata`` (row order) into ``folder``; returns the file names."""
    w = ColumnsWriter(folder)
    w.append(metadata)
    return w.finish()


# ---------------------------------------------------------------- reading


class _Column:
    """One typed field, memory-mapped: value-level matches, then spread over the rows."""

    def __init__(self, kind, count, rows, tags, f64, i64, codes, dict_bin, dict_off):
        def view(a):  # plain ndarray views of the maps: ufuncs then return plain arrays
            return None if a is None else np.asarray(a)

        self.kind, self.count = kind, count
        self.rows, self.tags, self.f64, self.i64 = view(rows), view(tags), view(f64), view(i64)
        self.codes, self.dict_bin, self.dict_off = view(codes), view(dict_bin), view(dict_off)

    def _entry(self, i: int) -> bytes:
        return self.dict_bin[int(self.dict_off[i]):int(self.dict_off[i + 1])].tobytes()

    def code(self, s: str) -> int | None:
        """The code of string ``s`` (binary search of the sorted dictionary), None if absent."""
        try:
            b = s.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: no stored string equals it
            return None
        lo, hi = 0, len(self.dict_off) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if self._entry(mid) < b:
                lo = mid + 1
            else:
                hi = mid
        return lo if lo < len(self.dict_off) - 1 and self._entry(lo) == b else None

    def matches(self, values) -> np.ndarray:
        """(L,) bool: the stored values equal to one of ``values`` under the reference's ``==``
        (type(x) is type(v), or both numbers; True != 1; 1 == 1.0). ``values`` hold only
        str / int / float / bool / None (exact types) and other objects, which equal nothing
        stored here."""
        none = any(v is None for v in values)
        if self.kind == "string":
            want = [CODE_NONE] if none else []
            for v in values:
                if type(v) is str:
                    c = self.code(v)
                    if c is not None:
                        want.append(c)
            return _isin(self.codes, want, len(self.dict_off) - 1)
        if self.kind == "bool":
            want = ([NONE] if none else []) + [TRUE if v else FALSE for v in values if type(v) is bool]
            return _isin(self.tags, want, 256)
        ints = [v for v in values if type(v) is int]
        floats = [v for v in values if type(v) is float]
        as_float = floats + [float(v) for v in ints if float(v) == v]  # exact comparisons
        if self.i64 is None:  # every stored int is exact as a float64
            m = _isin(self.f64, as_float)
        else:
            as_int = ints + [int(v) for v in floats if v.is_integer() and INT64_MIN <= v < 2.0**63]
            m = (self.tags == FLOAT) & _isin(self.f64, as_float)
            if as_int:
                m |= (self.tags == INT) & _isin(self.i64, as_int)
        if none:
            m |= self.tags == NONE
        return m

    def compare(self, op: str, v) -> np.ndarray:
        """(L,) bool of a range operator: the reference's float64 comparison (NaN fails)."""
        f = self.f64
        with np.errstate(invalid="ignore"):
            return {"gt": f > v, "gte": f >= v, "lt": f < v, "lte": f <= v}[op]

    def apply(self, op: str, v, out: np.ndarray) -> None:
        """``out &= mask of {op: v}`` (n,)."""
        if op in _RANGES:
            if self.kind != "numeric":
                out[:] = False
                return
            m = self.compare(op, v)
        else:
            m = self.matches(list(v) if op == "in" else [v])
        if self.rows is None:
            if op == "ne":
                out &= ~m
            else:
                out &= m
        elif op == "ne":
            out[self.rows[m]] = False
        else:
            sel = np.zeros(self.count, bool)
            sel[self.rows[m]] = True
            out &= sel


def _isin(a: np.ndarray, want: list, table: int = 0) -> np.ndarray:
    """(len(a),) bool: a[i] in want. A few values: one comparison pass each; more: a lookup
    table over ``[-2, table)`` when ``table`` (codes and tags), else numpy's sorting isin."""
    if not want:
        return np.zeros(len(a), bool)
    if len(want) <= 16:
        m = a == want[0]
        for w in want[1:]:
            m |= a == w
        return m
    if table:
        t = np.zeros(table + 2, bool)
        t[np.asarray(want, np.int64) + 2] = True
        return t[a.astype(np.int64) + 2]
    return np.isin(a, np.asarray(want, dtype=a.dtype), kind="sort")


def _fast(op: str, v) -> bool:
    """Whether the typed columns decide ``{op: v}`` exactly: numbers of builtin types only
    (numpy scalars, Fractions... compare with their own rules: the reference decides)."""
    if op in _RANGES:
        return type(v) in (int, float)
    vals = v if op == "in" else (v,)
    return not any(_is_number(x) and type(x) not in (int, float) for x in vals)


class _Uncacheable(Exception):
    pass


def _freeze(v):
    """A hashable canonical form of a filter value (types included: 1, 1.0 and True differ),
    or _Uncacheable for anything but JSON-like builtins."""
    t = type(v)
    if v is None or t in (str, int, float, bool):
        return (t.__name__, v)
    if t in (list, tuple):
        return (t.__name__, tuple(_freeze(x) for x in v))
    if t in (set, frozenset):
        return ("set", frozenset(_freeze(x) for x in v))
    if t is dict:
        return ("dict", frozenset((_freeze(k), _freeze(x)) for k, x in v.items()))
    raise _Uncacheable


class SegmentColumns:
    """The typed metadata columns of one segment of ``count`` rows, memory-mapped.

    :meth:`mask` turns a filter into a (count,) bool mask; ``fields`` maps each field name to
    its kind.
    """

    def __init__(self, folder: Path, count: int, fields: dict[str, str], columns: dict[str, _Column],
                 files: list[str]):
        self.folder, self.count = folder, count
        self.fields = fields
        self.files = files
        self._columns = columns
        n = max(count, 1)
        self._cache_size = max(1, min(MASK_CACHE_ENTRIES, MASK_CACHE_BYTES // n))
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._ref_lock = threading.Lock()
        self._ref: MetadataColumns | None = None
        self._ref_source: Callable[[], list[dict]] | None = None

    # -- opening

    @classmethod
    def open(cls, folder: str | os.PathLike, count: int, *, deep: bool) -> SegmentColumns:
        """Open ``folder/columns.json`` and its column files as untrusted data.

        Always: the schema (size, JSON, format, ``count``, every field's name, kind, id,
        layout and counts), then every file's ``.npy`` header against the length the schema
        implies, dictionary offsets from 0 to their file's size. With ``deep`` (O(data)):
        tags and codes within their kind's values, rows strictly ascending in ``[0, count)``,
        dictionaries sorted, unique and UTF-8, present counts matching the data.
        """
        folder = Path(folder)
        count = int(count)
        path = folder / COLUMNS_FILE
        with _open_nofollow(path) as f:
            if os.fstat(f.fileno()).st_size > MAX_SCHEMA_BYTES:
                raise IndexFormatError(f"index file corrupted: {path} is larger than {MAX_SCHEMA_BYTES} bytes")
            raw = f.read()
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise IndexFormatError(f"index file corrupted: {path} ({type(e).__name__}: {e})"[:500]) from e

        def bad(what: str):
            return IndexFormatError(f"index file corrupted: {path}: {what}"[:500])

        if (not isinstance(doc, dict) or doc.get("format") != SCHEMA_FORMAT
                or doc.get("version") != SCHEMA_VERSION or type(doc.get("version")) is not int):
            raise bad(f"not a {SCHEMA_FORMAT} schema of version {SCHEMA_VERSION}")
        if type(doc.get("count")) is not int or doc["count"] != count:
            raise bad(f"count {doc.get('count')!r}, expected {count}")
        if not isinstance(doc.get("fields"), list):
            raise bad("fields must be a list")
        fields: dict[str, str] = {}
        columns: dict[str, _Column] = {}
        files = [COLUMNS_FILE]
        ids = set()
        for e in doc["fields"]:
            if not isinstance(e, dict) or type(e.get("name")) is not str or e.get("kind") not in KINDS:
                raise bad("every field needs a string name and a kind among " + ", ".join(KINDS))
            name, kind = e["name"], e["kind"]
            if name in fields:
                raise bad(f"field {name[:100]!r} is listed twice")
            fields[name] = kind
            if kind == "object":
                continue
            fid, layout, present = e.get("id"), e.get("layout"), e.get("present")
            exact = e.get("exact_ints", False)
            if type(fid) is not int or not 0 <= fid <= 9999 or fid in ids:
                raise bad(f"field {name[:100]!r}: id {fid!r} must be a unique integer in [0, 9999]")
            ids.add(fid)
            if layout not in ("dense", "sparse") or type(present) is not int or not 0 <= present <= count:
                raise bad(f"field {name[:100]!r}: bad layout {layout!r} or present count {present!r}")
            if type(exact) is not bool or (exact and kind != "numeric"):
                raise bad(f"field {name[:100]!r}: bad exact_ints {exact!r}")
            col = _open_column(folder, kind, fid, layout, present, exact, e.get("dict_size"), count,
                               deep, bad, name)
            columns[name] = col
            files += field_files(kind, fid, layout, exact)
        return cls(folder, count, fields, columns, files)

    # -- filtering

    def mask(self, flt: dict, fallback_metadata: Callable[[], list[dict]]) -> np.ndarray:
        """(count,) bool, read-only: the rows whose metadata passes ``flt`` (the filter language
        of :mod:`hybridsearch.index.filters`), equal to ``mask_reference``'s.

        Typed fields are a few array passes each (strings by dictionary code); a field of kind
        ``object`` (or a number of a type other than int/float in the filter) is evaluated by
        the reference over ``fallback_metadata()`` (this segment's metadata, row order), whose
        columns for such fields are kept. Recent masks are cached by the filter's canonical form.
        """
        flt = check_filter(flt)
        try:
            key = _freeze(flt)
        except (_Uncacheable, RecursionError, TypeError):
            key = None
        if key is not None:
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    return hit
        out = self._compute(flt, fallback_metadata)
        out.flags.writeable = False
        if key is not None:
            with self._lock:
                self._cache[key] = out
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return out

    def _compute(self, flt: dict, fallback_metadata) -> np.ndarray:
        out = np.ones(self.count, dtype=bool)
        slow = {}
        for field, cond in flt.items():
            conds = cond if isinstance(cond, dict) else {"eq": cond}
            kind = self.fields.get(field)
            if kind is None:  # no document of this segment has the field
                if any(op != "ne" for op in conds):
                    out[:] = False
                continue
            if kind == "object" or not all(_fast(op, v) for op, v in conds.items()):
                slow[field] = cond
                continue
            col = self._columns[field]
            try:
                for op, v in conds.items():
                    col.apply(op, v, out)
            except IndexError as e:  # rows out of range: files not deep-checked
                raise IndexFormatError(f"index file corrupted: {self.folder}: the columns of "
                                       f"{field[:100]!r} point outside the segment") from e
        if slow:
            out &= self._reference(slow, fallback_metadata)
        return out

    def _reference(self, flt: dict, fallback_metadata) -> np.ndarray:
        def metadata():
            metas = self._ref_source()
            if len(metas) != self.count:
                raise ValueError(f"fallback_metadata gave {len(metas)} dicts for {self.count} rows")
            return metas

        with self._ref_lock:
            if self._ref is None:
                self._ref = MetadataColumns(metadata, max_fields=REFERENCE_FIELDS)
            self._ref_source = fallback_metadata
            return self._ref.mask(flt, self.count)


def _open_column(folder: Path, kind, fid, layout, present, exact, dict_size, count, deep, bad, name):
    length = present if layout == "sparse" else count
    shown = repr(name[:100])

    def load(part, dtype, n):
        return load_npy(folder / _name(fid, part), dtype=dtype, shape=(n,))

    rows = tags = f64 = i64 = codes = dict_bin = dict_off = None
    if layout == "sparse":
        rows = load("rows.npy", np.int32, length)
    if kind in ("numeric", "bool"):
        tags = load("tags.npy", np.uint8, length)
    if kind == "numeric":
        f64 = load("f64.npy", np.float64, length)
        if exact:
            i64 = load("i64.npy", np.int64, length)
    if kind == "string":
        if type(dict_size) is not int or not 0 <= dict_size <= max(present, 0):
            raise bad(f"field {shown}: dict_size {dict_size!r} must be an integer in [0, {present}]")
        codes = load("codes.npy", np.int32, length)
        bin_path = folder / _name(fid, "dict.bin")
        with _open_nofollow(bin_path) as fh:
            size = os.fstat(fh.fileno()).st_size
            try:
                dict_bin = (np.memmap(fh, dtype=np.uint8, mode="r", shape=(size,)) if size
                            else np.zeros(0, np.uint8))
            except Exception as e:
                raise IndexFormatError(f"index file {bin_path} cannot be mapped ({e})") from e
        dict_off = load("dictoff.npy", np.int64, dict_size + 1)
        if int(dict_off[0]) != 0 or int(dict_off[-1]) != size:
            raise IndexFormatError(f"index file corrupted: {folder / _name(fid, 'dictoff.npy')} "
                                   f"must run from 0 to {size}")
    if deep:
        _deep_check(folder, fid, kind, layout, present, count, rows, tags, f64, i64, codes,
                    dict_bin, dict_off)
    return _Column(kind, count, rows, tags, f64, i64, codes, dict_bin, dict_off)


def _deep_check(folder, fid, kind, layout, present, count, rows, tags, f64, i64, codes,
                dict_bin, dict_off) -> None:
    def fail(part: str, what: str):
        raise IndexFormatError(f"index file corrupted: {folder / _name(fid, part)} {what}")

    sparse = layout == "sparse"
    if rows is not None and len(rows):
        r = np.asarray(rows)
        if int(r[0]) < 0 or int(r[-1]) >= count or (len(r) > 1 and int(np.diff(r).min()) <= 0):
            fail("rows.npy", f"must hold strictly ascending rows in [0, {count})")
    if tags is not None:
        ok = np.zeros(256, bool)
        ok[list(_TAGS_OK[kind])] = True
        if sparse:
            ok[MISSING] = False
        t = np.asarray(tags)
        if not ok[t].all():
            fail("tags.npy", f"holds a tag outside {sorted(np.flatnonzero(ok).tolist())}")
        if int(np.count_nonzero(t)) != present:
            fail("tags.npy", f"holds {int(np.count_nonzero(t))} values, the schema says {present}")
        if f64 is not None:
            num = (t == FLOAT) | (t == INT)
            if not np.isnan(np.asarray(f64)[~num]).all():
                fail("f64.npy", "holds a number where the tags say there is none")
            if i64 is not None and np.asarray(i64)[t != INT].any():
                fail("i64.npy", "holds an integer where the tags say there is none")
    if codes is not None:
        c = np.asarray(codes)
        k = len(dict_off) - 1
        if len(c) and (int(c.min()) < CODE_NONE or int(c.max()) >= k
                       or (sparse and bool((c == CODE_MISSING).any()))):
            fail("codes.npy", f"holds a code outside [-2, {k})" + (" or -1 (sparse)" if sparse else ""))
        if int(np.count_nonzero(c != CODE_MISSING)) != present:
            fail("codes.npy", f"holds a number of values other than the schema's {present}")
        off = np.asarray(dict_off)
        if k and int(np.diff(off).min()) < 0:
            fail("dictoff.npy", "must ascend")
        data = np.asarray(dict_bin).tobytes()
        prev = None
        for i in range(k):
            b = data[int(off[i]):int(off[i + 1])]
            if prev is not None and not prev < b:
                fail("dict.bin", "must hold sorted, unique strings")
            try:
                b.decode("utf-8")
            except UnicodeDecodeError:
                fail("dict.bin", f"entry {i} is not UTF-8")
            prev = b

