"""The documents of one segment (ids, texts, metadata), addressable by row and found by id.

Files written into a segment folder by :class:`DocstoreWriter` (``.npy`` never pickled; every
file is memory-mapped on open, nothing is read whole):

* ``docs.bin``          -- one msgpack record ``[text, metadata]`` per row, concatenated;
* ``docs_offsets.npy``  -- (n+1,) int64 byte offsets: row r is ``docs.bin[off[r]:off[r+1]]``;
* ``ids.bin``           -- the UTF-8 ids, concatenated;
* ``ids_offsets.npy``   -- (n+1,) int64 byte offsets into ``ids.bin``;
* ``ids_hash.npy``      -- (n,) uint64 id hashes (:func:`hash_ids`), ascending;
* ``ids_order.npy``     -- (n,) int64 the row of each sorted hash (ties in row order).

The id hash is part of the format: FNV-1a 64 over the id's UTF-8 bytes, then MurmurHash3's
64-bit finaliser (so that nearby ids spread over the whole range). :meth:`Docstore.find`
searches it and then compares the stored id, so collisions cost time, never correctness.

Segments written before this store hold ``docs.msgpack`` (``{"ids", "texts", "metadata"}``,
read whole); :class:`LegacyDocstore` gives them the same API.

Every file is untrusted: :meth:`Docstore.open` checks headers, shapes and sizes every time and,
with ``deep``, the O(n) invariants (offsets ascending within the files, hashes sorted, order a
permutation); every access re-checks the offsets it uses, so even a shallow open never reads
outside a file. Problems are :class:`~hybridsearch.errors.IndexFormatError` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import msgpack
import numpy as np
from numba import njit

from ..errors import IndexFormatError
from .storage import _open_nofollow, load_npy, npy_chunks, read_npy_header

DOCS_BIN = "docs.bin"
DOCS_OFFSETS = "docs_offsets.npy"
IDS_BIN = "ids.bin"
IDS_OFFSETS = "ids_offsets.npy"
IDS_HASH = "ids_hash.npy"
IDS_ORDER = "ids_order.npy"
# Every file a docstore writes, in a fixed order (what ``DocstoreWriter.finish`` returns).
DOCSTORE_FILES = (DOCS_BIN, DOCS_OFFSETS, IDS_BIN, IDS_OFFSETS, IDS_HASH, IDS_ORDER)
LEGACY_FILE = "docs.msgpack"
# The smallest record: fixarray(2) + fixstr("") + fixmap({}).
MIN_RECORD_BYTES = 3

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_MIX1 = np.uint64(0xFF51AFD7ED558CCD)
_MIX2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)


# ---------------------------------------------------------------- id hash


@njit(cache=True)
def _hash_spans(data, offsets, out):
    for i in range(out.shape[0]):
        h = _FNV_OFFSET
        for j in range(offsets[i], offsets[i + 1]):
            h ^= np.uint64(data[j])
            h *= _FNV_PRIME
        h ^= h >> _S33
        h *= _MIX1
        h ^= h >> _S33
        h *= _MIX2
        h ^= h >> _S33
        out[i] = h


def hash_spans(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(n,) uint64 hashes of the byte spans ``data[offsets[i]:offsets[i+1]]`` (Numba).

    ``data`` (T,) uint8, ``offsets`` (n+1,) int64 ascending within ``[0, T]``.
    """
    data = np.ascontiguousarray(data, dtype=np.uint8)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    out = np.empty(len(offsets) - 1, dtype=np.uint64)
    if len(out):
        _hash_spans(data, offsets, out)
    return out


def hash_spans_reference(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Plain-numpy :func:`hash_spans` (one vectorised step per byte position)."""
    data = np.asarray(data, dtype=np.uint8)
    offsets = np.asarray(offsets, dtype=np.int64)
    starts, lens = offsets[:-1], np.diff(offsets)
    h = np.full(len(lens), _FNV_OFFSET, dtype=np.uint64)
    for j in range(int(lens.max()) if len(lens) else 0):
        act = lens > j
        h[act] = (h[act] ^ data[starts[act] + j].astype(np.uint64)) * _FNV_PRIME
    for mult in (_MIX1, _MIX2):
        h ^= h >> _S33
        h *= mult
    h ^= h >> _S33
    return h


def _concat(blobs: Sequence[bytes]) -> tuple[bytes, np.ndarray]:
    """(joined bytes, (n+1,) int64 offsets)."""
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    if blobs:
        np.cumsum(np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs)), out=offsets[1:])
    return b"".join(blobs), offsets


def hash_ids(ids: Sequence[str]) -> np.ndarray:
    """(n,) uint64 stable hashes of ``ids`` (their UTF-8 bytes), as stored in ``ids_hash.npy``."""
    data, offsets = _concat([_utf8(i, "id") for i in ids])
    return hash_spans(np.frombuffer(data, dtype=np.uint8), offsets)


def _utf8(s, what: str) -> bytes:
    if type(s) is not str:
        raise TypeError(f"{what} must be a str, got {type(s).__name__}")
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} {s[:50]!r} is not valid Unicode (lone surrogate)") from e


# ---------------------------------------------------------------- writing


def _check_keys(md, doc_id: str) -> None:
    """Every map key in a metadata value must be a string: msgpack would store other keys, and
    the reader (strict_map_key) would then refuse the whole segment."""
    stack = [md]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            for k, x in v.items():
                if type(k) is not str:
                    raise ValueError(f"document {doc_id!r}: metadata key {k!r} is not a string")
                if isinstance(x, (dict, list, tuple)):
                    stack.append(x)
        elif isinstance(v, (list, tuple)):
            stack.extend(x for x in v if isinstance(x, (dict, list, tuple)))


def _create(path: Path):
    # "x": O_CREAT|O_EXCL, which also refuses (never follows) a link planted at the name.
    return open(path, "xb")


class DocstoreWriter:
    """Streams documents into the docstore files of ``folder`` (an existing, new folder).

    Memory is bounded by one :meth:`append` chunk plus 24 bytes per document (the two offsets
    and the hash); the records go to disk as they come. Call :meth:`finish` once at the end
    (files are flushed, not fsynced: the segment writer fsyncs the folder), or :meth:`abort`.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.count = 0
        self._docs = _create(self.folder / DOCS_BIN)
        try:
            self._ids = _create(self.folder / IDS_BIN)
        except BaseException:
            self._docs.close()
            raise
        self._doc_ends: list[np.ndarray] = []
        self._id_ends: list[np.ndarray] = []
        self._hashes: list[np.ndarray] = []
        self._doc_pos = 0
        self._id_pos = 0
        self._packer = msgpack.Packer(use_bin_type=True)

    def append(self, ids: Sequence[str], texts: Sequence[str], metadata: Sequence[dict]) -> None:
        """Add rows ``count .. count + len(ids) - 1``. ``ids`` and ``texts`` are str, every
        metadata a dict with string keys (at any depth); TypeError / ValueError otherwise,
        before anything of this chunk is written."""
        if not len(ids) == len(texts) == len(metadata):
            raise ValueError(f"ids, texts and metadata differ in length "
                             f"({len(ids)}, {len(texts)}, {len(metadata)})")
        id_bytes = [_utf8(i, "id") for i in ids]
        records = []
        for i, t, md in zip(ids, texts, metadata):
            _utf8(t, f"document {i!r}: text")
            if not isinstance(md, dict):
                raise TypeError(f"document {i!r}: metadata must be a dict, got {type(md).__name__}")
            _check_keys(md, i)
            try:
                records.append(self._packer.pack([t, md]))
            except (TypeError, ValueError, OverflowError) as e:
                raise ValueError(f"document {i!r}: metadata cannot be stored ({e})") from e
        docs, doc_off = _concat(records)
        idb, id_off = _concat(id_bytes)
        self._hashes.append(hash_spans(np.frombuffer(idb, dtype=np.uint8), id_off))
        self._docs.write(docs)
        self._ids.write(idb)
        self._doc_ends.append(doc_off[1:] + self._doc_pos)
        self._id_ends.append(id_off[1:] + self._id_pos)
        self._doc_pos += len(docs)
        self._id_pos += len(idb)
        self.count += len(ids)

    def abort(self) -> None:
        """Close the files (the caller removes the folder)."""
        self._docs.close()
        self._ids.close()

    def finish(self) -> list[str]:
        """Write the offsets, hashes and order; return the names of every file written
        (:data:`DOCSTORE_FILES`). ValueError if an id occurs twice."""
        self._docs.close()
        self._ids.close()
        doc_off = np.concatenate([np.zeros(1, np.int64), *self._doc_ends])
        id_off = np.concatenate([np.zeros(1, np.int64), *self._id_ends])
        hashes = np.concatenate([np.zeros(0, np.uint64), *self._hashes])
        self._doc_ends = self._id_ends = self._hashes = []
        order = np.argsort(hashes, kind="stable").astype(np.int64)
        hashes = hashes[order]
        same = np.flatnonzero(hashes[1:] == hashes[:-1])
        if len(same):
            self._check_unique(order, same, id_off)
        for name, arr in ((DOCS_OFFSETS, doc_off), (IDS_OFFSETS, id_off), (IDS_HASH, hashes),
                          (IDS_ORDER, order)):
            with _create(self.folder / name) as f:
                np.save(f, arr, allow_pickle=False)
        return list(DOCSTORE_FILES)

    def _check_unique(self, order: np.ndarray, same: np.ndarray, id_off: np.ndarray) -> None:
        # Only rows whose hashes collide are compared; that is almost never more than a few.
        with open(self.folder / IDS_BIN, "rb") as f:
            def read(row: int) -> bytes:
                f.seek(int(id_off[row]))
                return f.read(int(id_off[row + 1] - id_off[row]))

            # Runs of equal hashes: positions p..q where every neighbour pair is in ``same``.
            starts = same[np.r_[True, same[1:] != same[:-1] + 1]]
            ends = same[np.r_[same[1:] != same[:-1] + 1, True]] + 1
            for p, q in zip(starts, ends):
                seen: dict[bytes, int] = {}
                for row in order[p:q + 1]:
                    b = read(int(row))
                    if b in seen:
                        raise ValueError(f"duplicate id {b.decode()!r} (rows {seen[b]} and {int(row)})")
                    seen[b] = int(row)


def write_docstore(folder: str | os.PathLike, ids: Sequence[str], texts: Sequence[str],
                   metadata: Sequence[dict]) -> list[str]:
    """Write a whole docstore into ``folder``; returns the file names (not fsynced)."""
    w = DocstoreWriter(folder)
    try:
        w.append(ids, texts, metadata)
    except BaseException:
        w.abort()
        raise
    return w.finish()


# ---------------------------------------------------------------- reading


def _ext_hook(code, data):
    raise ValueError(f"msgpack extension type {code} is not allowed")


def _unpack(raw: bytes):
    # Every declared length is bounded by the buffer (a list or string cannot hold more items
    # than bytes); no extension types; map keys must be strings.
    n = len(raw)
    return msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=_ext_hook,
                           max_str_len=n, max_bin_len=n, max_array_len=n, max_map_len=n,
                           max_ext_len=0)


def _map_bytes(path: Path) -> np.ndarray:
    """A whole file memory-mapped read-only as (size,) uint8 (opened without following links)."""
    with _open_nofollow(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return np.zeros(0, dtype=np.uint8)
        try:
            return np.memmap(f, dtype=np.uint8, mode="r", shape=(size,))
        except Exception as e:
            raise IndexFormatError(f"index file {path} cannot be mapped ({type(e).__name__}: {e})") from e


def _check_ascending(path: Path, end: int, count: int, deep: bool, min_step: int = 0) -> None:
    """Offsets file ``path``: starts at 0 and ends at ``end`` (always); with ``deep``, every
    step is at least ``min_step`` (read in chunks, no mapped pages left behind)."""
    off = load_npy(path, dtype=np.int64, shape=(count + 1,))
    if int(off[0]) != 0 or int(off[-1]) != end:
        raise IndexFormatError(f"index file corrupted: {path} must run from 0 to {end} "
                               f"(the size of its data file), got {int(off[0])} .. {int(off[-1])}")
    if deep:
        prev = None
        for c in npy_chunks(path, np.int64):
            if (prev is not None and int(c[0]) - prev < min_step) or (
                    len(c) > 1 and int(np.diff(c).min()) < min_step):
                raise IndexFormatError(f"index file corrupted: {path} must ascend"
                                       + (f" by at least {min_step}" if min_step else ""))
            prev = int(c[-1])


class Docstore:
    """An opened docstore of ``count`` rows (see the module docstring for the files).

    ``id(row)`` / ``ids(rows)`` / ``all_ids()``: the ids; ``doc(row)`` / ``docs(rows)``:
    ``(id, text, metadata)`` tuples; ``find(ids)``: rows by id; ``iter_chunks``: everything in
    chunks, for merges. Rows are ints in ``[0, count)`` (IndexError otherwise).
    """

    def __init__(self, folder: Path, count: int, docs: np.ndarray, doc_off: np.ndarray,
                 ids: np.ndarray, id_off: np.ndarray, hashes: np.ndarray, order: np.ndarray):
        self.folder, self.count = folder, count
        # Plain views of the maps: numpy's memmap subclass costs microseconds per slice.
        self._docs, self._doc_off = memoryview(np.asarray(docs)), np.asarray(doc_off)
        self._ids, self._id_off = memoryview(np.asarray(ids)), np.asarray(id_off)
        self._hash, self._order = np.asarray(hashes), np.asarray(order)

    @classmethod
    def open(cls, folder: str | os.PathLike, count: int, *, deep: bool) -> Docstore:
        """Open the docstore files of ``folder`` (a checked segment folder) for ``count`` rows.

        Always: regular files (no links), ``.npy`` dtypes and shapes against ``count``, offsets
        from 0 to the data files' sizes, ``docs.bin`` big enough for ``count`` records. With
        ``deep`` (O(n), read in chunks): offsets ascending, hashes sorted, order a permutation.
        """
        folder = Path(folder)
        count = int(count)
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        docs = _map_bytes(folder / DOCS_BIN)
        ids = _map_bytes(folder / IDS_BIN)
        if len(docs) < MIN_RECORD_BYTES * count:
            raise IndexFormatError(f"index file corrupted: {folder / DOCS_BIN} has {len(docs)} bytes, "
                                   f"too few for {count} documents")
        _check_ascending(folder / DOCS_OFFSETS, len(docs), count, deep, MIN_RECORD_BYTES)
        _check_ascending(folder / IDS_OFFSETS, len(ids), count, deep)
        doc_off = load_npy(folder / DOCS_OFFSETS, dtype=np.int64, shape=(count + 1,))
        id_off = load_npy(folder / IDS_OFFSETS, dtype=np.int64, shape=(count + 1,))
        read_npy_header(folder / IDS_HASH, np.uint64, (count,))
        read_npy_header(folder / IDS_ORDER, np.int64, (count,))
        if deep:
            prev = None
            for c in npy_chunks(folder / IDS_HASH, np.uint64):
                if (prev is not None and c[0] < prev) or bool((c[1:] < c[:-1]).any()):
                    raise IndexFormatError(f"index file corrupted: {folder / IDS_HASH} is not sorted")
                prev = c[-1]
            seen = np.zeros(count, dtype=bool)
            for c in npy_chunks(folder / IDS_ORDER, np.int64):
                if int(c.min()) < 0 or int(c.max()) >= count:
                    raise IndexFormatError(f"index file corrupted: {folder / IDS_ORDER} holds a row "
                                           f"outside [0, {count})")
                seen[c] = True
            if not seen.all():
                raise IndexFormatError(f"index file corrupted: {folder / IDS_ORDER} is not a "
                                       f"permutation of the rows")
        hashes = load_npy(folder / IDS_HASH, dtype=np.uint64, shape=(count,))
        order = load_npy(folder / IDS_ORDER, dtype=np.int64, shape=(count,))
        return cls(folder, count, docs, doc_off, ids, id_off, hashes, order)

    def __len__(self) -> int:
        return self.count

    # -- rows and spans

    def _rows(self, rows) -> np.ndarray:
        r = np.asarray(rows, dtype=np.int64).ravel()
        if len(r) and (int(r.min()) < 0 or int(r.max()) >= self.count):
            bad = int(r[(r < 0) | (r >= self.count)][0])
            raise IndexError(f"row {bad} out of range [0, {self.count})")
        return r

    def _spans(self, off: np.ndarray, size: int, rows: np.ndarray, name: str) -> tuple[list, list]:
        """Byte ranges of ``rows`` in a data file of ``size`` bytes, checked (the offsets are
        only checked whole by a deep open)."""
        if len(rows) <= 32:  # a page of hits: plain Python beats a dozen tiny numpy calls
            a = [int(off[r]) for r in rows.tolist()]
            b = [int(off[r + 1]) for r in rows.tolist()]
            for r, x, y in zip(rows.tolist(), a, b):
                if x < 0 or x > y or y > size:
                    raise IndexFormatError(f"index file corrupted: {self.folder / name} gives row {r} "
                                           f"the bytes {x}..{y} of a {size}-byte file")
            return a, b
        a, b = off[rows], off[rows + 1]
        bad = (a < 0) | (a > b) | (b > size)
        if bad.any():
            i = int(np.argmax(bad))
            raise IndexFormatError(f"index file corrupted: {self.folder / name} gives row {int(rows[i])} "
                                   f"the bytes {int(a[i])}..{int(b[i])} of a {size}-byte file")
        return a.tolist(), b.tolist()

    def _decode_ids(self, rows: np.ndarray) -> list[str]:
        a, b = self._spans(self._id_off, len(self._ids), rows, IDS_OFFSETS)
        mv = self._ids
        try:
            return [str(mv[x:y], "utf-8") for x, y in zip(a, b)]
        except UnicodeDecodeError:
            for r, x, y in zip(rows.tolist(), a, b):
                try:
                    str(mv[x:y], "utf-8")
                except UnicodeDecodeError as e:
                    raise IndexFormatError(f"index file corrupted: {self.folder / IDS_BIN}: id of "
                                           f"row {r} is not UTF-8") from e
            raise

    def _records(self, rows: np.ndarray) -> list:
        a, b = self._spans(self._doc_off, len(self._docs), rows, DOCS_OFFSETS)
        mv, out = self._docs, []
        for r, x, y in zip(rows.tolist(), a, b):
            try:
                rec = _unpack(mv[x:y])
            except Exception as e:
                raise IndexFormatError(f"index file corrupted: {self.folder / DOCS_BIN}: record {r} "
                                       f"({type(e).__name__}: {e})"[:500]) from e
            if (type(rec) is not list or len(rec) != 2 or type(rec[0]) is not str
                    or type(rec[1]) is not dict):
                raise IndexFormatError(f"index file corrupted: {self.folder / DOCS_BIN}: record {r} "
                                       f"is not [text, metadata]")
            out.append(rec)
        return out

    # -- ids

    def id(self, row: int) -> str:
        return self._decode_ids(self._rows([row]))[0]

    def ids(self, rows) -> list[str]:
        return self._decode_ids(self._rows(rows))

    def all_ids(self) -> list[str]:
        return self._decode_ids(np.arange(self.count))

    # -- documents

    def doc(self, row: int) -> tuple[str, str, dict]:
        """``(id, text, metadata)`` of ``row``."""
        return self.docs([row])[0]

    def docs(self, rows) -> list[tuple[str, str, dict]]:
        """``(id, text, metadata)`` of each of ``rows``."""
        rows = self._rows(rows)
        return [(i, t, m) for i, (t, m) in zip(self._decode_ids(rows), self._records(rows))]

    def chunk(self, rows) -> tuple[list[str], list[str], list[dict]]:
        """``(ids, texts, metadata)`` lists of ``rows``."""
        rows = self._rows(rows)
        recs = self._records(rows)
        return self._decode_ids(rows), [r[0] for r in recs], [r[1] for r in recs]

    def iter_chunks(self, rows=None, chunk: int = 4096) -> Iterator[tuple[list[str], list[str], list[dict]]]:
        """:meth:`chunk` of up to ``chunk`` rows at a time, for ``rows`` (default: every row,
        in order)."""
        rows = np.arange(self.count) if rows is None else np.asarray(rows, dtype=np.int64).ravel()
        step = max(1, int(chunk))
        for s in range(0, len(rows), step):
            yield self.chunk(rows[s:s + step])

    def metadata(self) -> list[dict]:
        """Every row's metadata, in row order (decodes every record)."""
        out: list[dict] = []
        for lo in range(0, self.count, 1 << 16):
            out += [r[1] for r in self._records(np.arange(lo, min(self.count, lo + (1 << 16))))]
        return out

    # -- lookup

    def find(self, ids: Sequence[str]) -> np.ndarray:
        """(len(ids),) int64: the row holding each id, -1 where absent.

        A binary search of the sorted hashes, then the stored id is compared (so collisions
        are harmless); when a (hostile) store holds an id twice, one of its rows is returned.
        """
        blobs = [_utf8(i, "id") for i in ids]
        out = np.full(len(blobs), -1, dtype=np.int64)
        if not blobs or not self.count:
            return out
        data, offsets = _concat(blobs)
        qh = hash_spans(np.frombuffer(data, dtype=np.uint8), offsets)
        lo = np.searchsorted(self._hash, qh, side="left")
        hi = np.searchsorted(self._hash, qh, side="right")
        size = len(self._ids)
        # One candidate (almost every query): checked and compared in bulk.
        one = np.flatnonzero(hi - lo == 1)
        cand = self._order[lo[one]]
        if len(cand) and (int(cand.min()) < 0 or int(cand.max()) >= self.count):
            raise IndexFormatError(f"index file corrupted: {self.folder / IDS_ORDER} holds a row "
                                   f"outside [0, {self.count})")
        a, b = self._spans(self._id_off, size, cand, IDS_OFFSETS)
        mv = self._ids
        for q, r, x, y in zip(one.tolist(), cand.tolist(), a, b):
            if mv[x:y] == blobs[q]:
                out[q] = r
        # Colliding hashes: every candidate in turn.
        for q in np.flatnonzero(hi - lo > 1).tolist():
            cand = self._order[int(lo[q]):int(hi[q])]
            if int(cand.min()) < 0 or int(cand.max()) >= self.count:
                raise IndexFormatError(f"index file corrupted: {self.folder / IDS_ORDER} holds a row "
                                       f"outside [0, {self.count})")
            a, b = self._spans(self._id_off, size, cand, IDS_OFFSETS)
            for r, x, y in zip(cand.tolist(), a, b):
                if self._ids[x:y] == blobs[q]:
                    out[q] = r
                    break
        return out


class LegacyDocstore:
    """The :class:`Docstore` API over an old segment's ``docs.msgpack`` (read whole, on first
    use, and checked as before: a dict of ``ids``/``texts`` (str) and ``metadata`` (dict) lists
    of ``count`` entries)."""

    def __init__(self, folder: Path, count: int):
        self.folder, self.count = folder, count
        self._d: dict | None = None
        self._where: dict | None = None

    @classmethod
    def open(cls, folder: str | os.PathLike, count: int, *, deep: bool = False) -> LegacyDocstore:
        """Check that ``docs.msgpack`` is a regular file that can hold ``count`` documents;
        with ``deep``, read and check it now rather than on first use."""
        folder = Path(folder)
        with _open_nofollow(folder / LEGACY_FILE) as f:
            size = os.fstat(f.fileno()).st_size
        if size < MIN_RECORD_BYTES * int(count):
            raise IndexFormatError(f"index file corrupted: {folder / LEGACY_FILE} is too small "
                                   f"for {count} documents")
        store = cls(folder, int(count))
        if deep:
            store._data()
        return store

    def __len__(self) -> int:
        return self.count

    def _data(self) -> dict:
        if self._d is not None:
            return self._d
        p = self.folder / LEGACY_FILE
        with _open_nofollow(p) as f:
            raw = f.read()
        try:
            d = _unpack(raw)
        except Exception as e:
            raise IndexFormatError(f"index file corrupted: {p} ({type(e).__name__}: {e})"[:500]) from e
        if not isinstance(d, dict) or set(d) != {"ids", "texts", "metadata"}:
            raise IndexFormatError(f"index file corrupted: {p} is not a dict of ids, texts and metadata")
        for key, typ in (("ids", str), ("texts", str), ("metadata", dict)):
            col = d[key]
            if not isinstance(col, list) or len(col) != self.count:
                got = len(col) if isinstance(col, list) else type(col).__name__
                raise IndexFormatError(f"index file corrupted: {p}: {key} must be a list of "
                                       f"{self.count} entries, got {got}")
            if not all(type(x) is typ for x in col):
                raise IndexFormatError(f"index file corrupted: {p}: every entry of {key} must be "
                                       f"a {typ.__name__}")
        self._d = d
        return d

    def _row(self, row) -> int:
        r = int(row)
        if not 0 <= r < self.count:
            raise IndexError(f"row {r} out of range [0, {self.count})")
        return r

    def id(self, row: int) -> str:
        return self._data()["ids"][self._row(row)]

    def ids(self, rows) -> list[str]:
        d = self._data()["ids"]
        return [d[self._row(r)] for r in np.asarray(rows, dtype=np.int64).ravel()]

    def all_ids(self) -> list[str]:
        return list(self._data()["ids"])

    def doc(self, row: int) -> tuple[str, str, dict]:
        d, r = self._data(), self._row(row)
        return d["ids"][r], d["texts"][r], d["metadata"][r]

    def docs(self, rows) -> list[tuple[str, str, dict]]:
        return [self.doc(r) for r in np.asarray(rows, dtype=np.int64).ravel()]

    def chunk(self, rows) -> tuple[list[str], list[str], list[dict]]:
        d = self._data()
        rows = [self._row(r) for r in np.asarray(rows, dtype=np.int64).ravel()]
        return [d["ids"][r] for r in rows], [d["texts"][r] for r in rows], [d["metadata"][r] for r in rows]

    iter_chunks = Docstore.iter_chunks

    def metadata(self) -> list[dict]:
        return list(self._data()["metadata"])

    def find(self, ids: Sequence[str]) -> np.ndarray:
        if self._where is None:
            self._where = {i: r for r, i in enumerate(self._data()["ids"])}
        for i in ids:
            if type(i) is not str:
                raise TypeError(f"id must be a str, got {type(i).__name__}")
        return np.fromiter((self._where.get(i, -1) for i in ids), dtype=np.int64, count=len(ids))


def open_docstore(folder: str | os.PathLike, count: int, *, deep: bool,
                  legacy: bool) -> Docstore | LegacyDocstore:
    """:class:`LegacyDocstore` when the segment holds ``docs.msgpack`` (``legacy``), else
    :class:`Docstore`."""
    return (LegacyDocstore if legacy else Docstore).open(folder, count, deep=deep)
