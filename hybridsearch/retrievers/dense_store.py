"""Dense vectors of ONE immutable segment on disk, memory-mapped, with exact top-k search.

Three storage kinds, chosen per index (bytes per document at ``d`` dimensions):

=======  ==============================================  =========  ==========================
kind     files                                           bytes/doc  error vs float32
=======  ==============================================  =========  ==========================
fp32     ``dense.npy`` ``(n, d)`` float32                 ``4 d``    none (the historic file)
fp16     ``dense.npy`` ``(n, d)`` float16                 ``2 d``    float16 rounding
sq8      ``dense_sq8.npy`` ``(n, d)`` uint8 codes +       ``d``      ``step / 2`` per component
         ``dense_sq8_params.npy`` ``(2, d)`` float32
=======  ==============================================  =========  ==========================

**SQ8** is per-dimension scalar quantisation trained on the segment's own vectors: row 0 of the
params is ``vmin`` (the minimum of each dimension), row 1 is ``step = (vmax - vmin) / 255``.
A value encodes as ``code = clip(rint((x - vmin) / step), 0, 255)`` (0 where ``step == 0``) and
decodes as ``vmin + code * step``: round to nearest, so each component is off by at most
``step / 2`` (plus float32 rounding; measured on 100k random unit vectors of 1024 dims: at most
6.4e-4 per component, 1.8e-3 per inner product, recall@10 against float32 0.97; fp16: 3.7e-5,
recall 1.0). Values outside a given ``[vmin, vmax]`` clip to it (only :class:`DenseWriter`
with caller-given params can meet one; params trained here, or merged by :func:`write_dense`,
cover every value they encode).

**Search** is exhaustive and exact over the stored values: the scores are those of
``q @ store.rows(ids).T`` up to float32 summation order. The store is scanned in blocks of rows,
and a whole batch of queries is scored against a block before the next one is read, so the
data is read once per batch. fp32 blocks go to BLAS; fp16 and sq8 go to a Numba kernel that
widens the stored values to float32 (for sq8 the codes themselves: ``q . x = q . vmin + sum_d
(q_d step_d) code_d``, with ``q * step`` and ``q . vmin`` computed once per query). From 4
queries on, a block is widened once into an L2-sized buffer and scored in 4-query x 2-row
register tiles; fewer queries widen each row as they read it, in one sequential stream. Each
query keeps a heap of its best ``k`` (ties to the lower row); big scans split into chunks over
the pool's threads, one heap set per thread, merged at the end. :func:`search_reference` is the
plain numpy definition the kernels are tested against.

**Writing** streams: :class:`DenseWriter` appends chunks to the final file and writes the
``.npy`` header (whose length numpy keeps independent of the row count) when it finishes.
:func:`write_dense` merges row subsets of several stores with bounded memory, reading the
sources with plain reads (no mapped pages left behind), and copies sq8 codes verbatim when a
source already has the target's params.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ..errors import IndexFormatError
from ..index.storage import load_npy, read_npy_header, remove_entry, save_npy
from ._tiles import tile_4x2

KINDS = ("fp32", "fp16", "sq8")
DENSE_FILE = "dense.npy"
SQ8_CODES_FILE = "dense_sq8.npy"
SQ8_PARAMS_FILE = "dense_sq8_params.npy"
_FILES = {"fp32": (DENSE_FILE,), "fp16": (DENSE_FILE,), "sq8": (SQ8_CODES_FILE, SQ8_PARAMS_FILE)}
_DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "sq8": np.dtype(np.uint8)}
SQ8_LEVELS = 255  # codes 0..255: 255 steps between vmin and vmax

# Reassociation lets LLVM vectorise the dot products; no "nnan"/"ninf" (the heaps compare).
_FASTMATH = {"reassoc", "contract", "nsz"}
# Below this many multiply-adds (about a millisecond) a batch runs on the calling thread: waking
# the pool costs microseconds on an idle machine but milliseconds on a busy one.
PARALLEL_MIN_FLOPS = 1 << 24
# Parallel scans keep one (nq, k) heap set per thread; past this many entries (~200 MB) they don't.
PARALLEL_MAX_HEAP = 1 << 24
# Rows widened per block by the Numba kernels: 256 KiB of float32, so a block stays in L2 while
# every query of the batch is scored against it.
KERNEL_BLOCK_BYTES = 1 << 18
# Rows per BLAS call on the fp32 path (16 MiB of float32).
BLAS_BLOCK_BYTES = 1 << 24
# Rows per chunk when streaming (merges, deep checks, FAISS builds): 8 MiB of float32.
STREAM_CHUNK_BYTES = 1 << 23


def files_for(kind: str) -> tuple[str, ...]:
    """The file names a store of ``kind`` consists of (codes first)."""
    return _FILES[_check_kind(kind)]


def bytes_per_doc(kind: str, dim: int) -> int:
    """Bytes of vector data per document (the sq8 params add ``8 * dim`` per segment)."""
    return _DTYPES[_check_kind(kind)].itemsize * int(dim)


def _check_kind(kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"dense storage kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return kind


# ---------------------------------------------------------------- SQ8 codec (plain numpy)


def sq8_params(vmin: np.ndarray, vmax: np.ndarray) -> np.ndarray:
    """``(2, d)`` float32 params ``[vmin; step]`` covering ``[vmin, vmax]`` per dimension."""
    vmin = np.asarray(vmin, np.float32)
    vmax = np.maximum(np.asarray(vmax, np.float32), vmin)
    step = (vmax - vmin) / np.float32(SQ8_LEVELS)
    params = np.stack([vmin, step]).astype(np.float32)
    _check_params(params, vmin.shape[0], ValueError, "sq8 params")
    return params


def sq8_train(vectors: np.ndarray) -> np.ndarray:
    """Params ``(2, d)`` float32 from the per-dimension min and max of ``vectors`` ``(n, d)``
    (zeros for ``n == 0``)."""
    x = np.asarray(vectors, np.float32)
    if x.shape[0] == 0:
        return np.zeros((2, x.shape[1]), np.float32)
    return sq8_params(x.min(axis=0), x.max(axis=0))


def sq8_encode(vectors: np.ndarray, params: np.ndarray) -> np.ndarray:
    """``(m, d)`` float -> ``(m, d)`` uint8 codes, round to nearest, clipped to ``[0, 255]``."""
    vmin, step = params[0], params[1]
    t = np.subtract(vectors, vmin, dtype=np.float32)
    live = step > 0
    np.divide(t, step, out=t, where=live)
    t[:, ~live] = 0
    np.rint(t, out=t)
    np.clip(t, 0, SQ8_LEVELS, out=t)
    return t.astype(np.uint8)


def sq8_decode(codes: np.ndarray, params: np.ndarray) -> np.ndarray:
    """``(m, d)`` uint8 codes -> ``(m, d)`` float32 values ``vmin + code * step``."""
    return params[0] + np.asarray(codes).astype(np.float32) * params[1]


def _check_params(params: np.ndarray, dim: int, err, where) -> None:
    if params.dtype != np.float32 or params.shape != (2, dim):
        raise err(f"{where}: sq8 params must be (2, {dim}) float32, got {params.dtype} {params.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        top = params[0] + np.float32(SQ8_LEVELS) * params[1]
    if not (np.isfinite(params).all() and np.isfinite(top).all()):
        raise err(f"{where}: sq8 params must be finite (vmin + 255 * step too)")
    if (params[1] < 0).any():
        raise err(f"{where}: sq8 step must be >= 0")


# ---------------------------------------------------------------- Numba kernels


@intrinsic
def _widen(typingctx, x):
    """uint8 code -> float32, or float16 bit pattern (uint16) -> float32; numba has no CPU
    float16, LLVM has (F16C)."""
    if x == types.uint16:
        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    elif x == types.uint8:
        def codegen(context, builder, signature, args):
            return builder.uitofp(args[0], ir.FloatType())
    else:
        return None
    return types.float32(x), codegen


@njit(cache=True, inline="always")
def _worse(s_a, i_a, s_b, i_b):
    return s_a < s_b or (s_a == s_b and i_a > i_b)


@njit(cache=True)
def _push(hs, hi, hn, q, s, r):
    """Offer hit ``(s, r)`` to query ``q``'s heap (``hs``/``hi`` ``(nq, k)``, size ``hn[q]``).

    A min-heap on "worse first" (lower score, then higher row), so its root is the hit the next
    better one evicts; ties therefore keep the lower row.
    """
    k = hs.shape[1]
    size = hn[q]
    if size < k:
        pos = size
        hn[q] = size + 1
        while pos > 0:
            parent = (pos - 1) >> 1
            if not _worse(s, r, hs[q, parent], hi[q, parent]):
                break
            hs[q, pos] = hs[q, parent]
            hi[q, pos] = hi[q, parent]
            pos = parent
        hs[q, pos] = s
        hi[q, pos] = r
        return
    if not _worse(hs[q, 0], hi[q, 0], s, r):
        return
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= k:
            break
        if child + 1 < k and _worse(hs[q, child + 1], hi[q, child + 1], hs[q, child], hi[q, child]):
            child += 1
        if not _worse(hs[q, child], hi[q, child], s, r):
            break
        hs[q, pos] = hs[q, child]
        hi[q, pos] = hi[q, child]
        pos = child
    hs[q, pos] = s
    hi[q, pos] = r


@njit(cache=True, fastmath=_FASTMATH)
def _scan_range(w, base, codes, rows, use_rows, p_lo, p_hi, block, hs, hi, hn):
    """Score candidate positions ``[p_lo, p_hi)`` for every query into the heaps.

    ``w`` ``(nq, d)`` float32 per-query weights and ``base`` ``(nq,)`` float32 offsets: the
    score of row ``r`` is ``base[i] + sum_e w[i, e] * widen(codes[r, e])``. ``codes`` ``(n, d)``
    uint8 (sq8) or uint16 (float16 bits). Position ``p`` is row ``rows[p]`` when ``use_rows``,
    else row ``p``. Positions go ``block`` at a time; with 4+ queries a block is widened once
    into a float32 buffer that every query then reads. ``hs``/``hi``/``hn``: see :func:`_push`.
    """
    nq, d = w.shape
    buf = np.zeros((block + 4, d), np.float32)
    ids = np.zeros(block + 4, np.int64)
    for b_lo in range(p_lo, p_hi, block):
        m = min(block, p_hi - b_lo)
        for t in range(m):
            ids[t] = rows[b_lo + t] if use_rows else b_lo + t
        if nq < 4:
            # A few queries: widen each row as it is read, one row at a time, so the codes are
            # read as one sequential stream (interleaving rows defeats the prefetcher here) and
            # a widened copy (a store and a load per value) is not worth it for <= 3 reads.
            for t in range(m):
                c = codes[ids[t]]
                for i in range(nq):
                    s0 = np.float32(0.0)
                    for e in range(d):
                        s0 += w[i, e] * _widen(c[e])
                    _push(hs, hi, hn, i, s0 + base[i], ids[t])
            continue
        for t in range(m):
            src = codes[ids[t]]
            dst = buf[t]
            for e in range(d):
                dst[e] = _widen(src[e])
        i = 0
        # 4 query x 2 row register tile: 8 independent vector accumulators, 6 loads per 8 FMAs.
        while i + 4 <= nq:
            for j in range(0, m, 2):
                s00, s01, s10, s11, s20, s21, s30, s31 = tile_4x2(w, i, buf, j, d)
                _push(hs, hi, hn, i, s00 + base[i], ids[j])
                _push(hs, hi, hn, i + 1, s10 + base[i + 1], ids[j])
                _push(hs, hi, hn, i + 2, s20 + base[i + 2], ids[j])
                _push(hs, hi, hn, i + 3, s30 + base[i + 3], ids[j])
                if j + 1 < m:
                    _push(hs, hi, hn, i, s01 + base[i], ids[j + 1])
                    _push(hs, hi, hn, i + 1, s11 + base[i + 1], ids[j + 1])
                    _push(hs, hi, hn, i + 2, s21 + base[i + 2], ids[j + 1])
                    _push(hs, hi, hn, i + 3, s31 + base[i + 3], ids[j + 1])
            i += 4
        # The last 1-3 queries: 1 query x 4 row tile.
        while i < nq:
            for j in range(0, m, 4):
                s0 = s1 = s2 = s3 = np.float32(0.0)
                for e in range(d):
                    qe = w[i, e]
                    s0 += qe * buf[j, e]
                    s1 += qe * buf[j + 1, e]
                    s2 += qe * buf[j + 2, e]
                    s3 += qe * buf[j + 3, e]
                _push(hs, hi, hn, i, s0 + base[i], ids[j])
                if j + 1 < m:
                    _push(hs, hi, hn, i, s1 + base[i], ids[j + 1])
                if j + 2 < m:
                    _push(hs, hi, hn, i, s2 + base[i], ids[j + 2])
                if j + 3 < m:
                    _push(hs, hi, hn, i, s3 + base[i], ids[j + 3])
            i += 1


@njit(cache=True, parallel=True)
def _scan_parallel(w, base, codes, rows, use_rows, m, block, n_chunks, hs, hi, hn):
    # Chunks of whole blocks, handed out one at a time; each thread fills its own heap set.
    n_blocks = (m + block - 1) // block
    for c in prange(n_chunks):
        t = numba.get_thread_id()
        lo = (c * n_blocks // n_chunks) * block
        hi_ = min(m, ((c + 1) * n_blocks // n_chunks) * block)
        _scan_range(w, base, codes, rows, use_rows, lo, hi_, block, hs[t], hi[t], hn[t])


@njit(cache=True)
def _push_block(sc, ids, id0, use_ids, hs, hi, hn):
    """Offer a ``(nq, m)`` score block to the heaps: column ``t`` is row ``ids[t]`` when
    ``use_ids``, else row ``id0 + t``."""
    nq, m = sc.shape
    for q in range(nq):
        for t in range(m):
            _push(hs, hi, hn, q, sc[q, t], ids[t] if use_ids else id0 + t)


def _readonly(a: np.ndarray) -> np.ndarray:
    # Kernels always see read-only base-class arrays (as loaded memmaps are), so each compiles once.
    v = np.asarray(a).view()
    v.flags.writeable = False
    return v


def _merge_heaps(hs, hi, hn, k):
    """``(T, nq, kk)`` heap sets -> best ``k`` per query: scores ``(nq, k)`` float32, ids
    ``(nq, k)`` int64, best first, ties to the lower row, padded with 0 / -1."""
    t_, nq, kk = hs.shape
    s = hs.transpose(1, 0, 2).reshape(nq, t_ * kk)
    i = hi.transpose(1, 0, 2).reshape(nq, t_ * kk)
    valid = (np.arange(kk)[None, None, :] < hn[:, :, None]).transpose(1, 0, 2).reshape(nq, t_ * kk)
    order = np.lexsort((i, -s, ~valid), axis=-1)[:, :k]
    out_s = np.zeros((nq, k), np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    took = np.take_along_axis(valid, order, 1)
    out_s[:, :order.shape[1]] = np.where(took, np.take_along_axis(s, order, 1), 0)
    out_i[:, :order.shape[1]] = np.where(took, np.take_along_axis(i, order, 1), -1)
    return out_s, out_i


# ---------------------------------------------------------------- the store


def _check_rows(rows, n: int) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
        raise ValueError(f"rows must be a 1-d integer array, got {rows.dtype} {rows.shape}")
    rows = rows.astype(np.int64, copy=False)
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"rows must lie in [0, {n})")
    return rows


def _check_count(v, what: str, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{what} must be an integer >= {lo}, got {v!r}")
    return int(v)


class DenseStore:
    """Dense vectors of one segment in one storage kind (see the module docstring).

    Attributes:
        kind: ``"fp32"``, ``"fp16"`` or ``"sq8"``.
        codes: ``(n, d)`` float32 / float16 / uint8, read-only, memory-mapped when opened.
        params: ``(2, d)`` float32 ``[vmin; step]`` for sq8, else None.
    """

    def __init__(self, codes: np.ndarray, kind: str, params: np.ndarray | None = None,
                 path: Path | None = None, offset: int = 0):
        self.kind = _check_kind(kind)
        self.codes = _readonly(codes)
        self.params = None if params is None else _readonly(params)
        # Where the codes live on disk (opened stores): streamed reads bypass the mapping.
        self._path = path
        self._offset = offset
        if self.codes.dtype != _DTYPES[kind] or self.codes.ndim != 2 or self.codes.shape[1] < 1:
            raise ValueError(f"{kind} codes must be 2-d {_DTYPES[kind]}, got {self.codes.dtype} {self.codes.shape}")
        if (kind == "sq8") != (params is not None):
            raise ValueError("sq8 stores need params (and only they have them)")
        if params is not None:
            _check_params(self.params, self.dim, ValueError, "sq8 store")
        # uint16 view of float16 data: the kernel widens the bit patterns itself.
        self._kernel_codes = _readonly(self.codes.view(np.uint16)) if kind == "fp16" else self.codes

    @property
    def n(self) -> int:
        return int(self.codes.shape[0])

    @property
    def dim(self) -> int:
        return int(self.codes.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.dim)

    @property
    def files(self) -> tuple[str, ...]:
        return _FILES[self.kind]

    @property
    def bytes_per_doc(self) -> int:
        return bytes_per_doc(self.kind, self.dim)

    @property
    def vmax(self) -> np.ndarray | None:
        """``(d,)`` float32 top of the sq8 range (``vmin + 255 * step``), else None."""
        return None if self.params is None else self.params[0] + np.float32(SQ8_LEVELS) * self.params[1]

    @classmethod
    def from_array(cls, vectors: np.ndarray, kind: str, params: np.ndarray | None = None) -> DenseStore:
        """An in-memory store of ``vectors`` ``(n, d)`` float (sq8: trained on them unless
        ``params`` are given)."""
        x = _check_vectors(vectors, None, "vectors")
        if _check_kind(kind) == "sq8" and params is None:
            params = sq8_train(x)
        elif kind != "sq8" and params is not None:
            raise ValueError(f"{kind} storage takes no params")
        return cls(*_encode(x, kind, params))

    @classmethod
    def open(cls, folder: str | os.PathLike, n: int, dim: int, kind: str, *, deep: bool = False) -> DenseStore:
        """Memory-map the store of ``kind`` in ``folder``, treating the files as untrusted.

        Every time (headers only): regular files opened without following links, exact dtype,
        shape ``(n, dim)`` (params ``(2, dim)`` float32), file size = header + data; sq8 params
        are read and must be finite with ``step >= 0`` and a finite ``vmin + 255 * step``. With
        ``deep`` (O(file size), plain reads that leave no mapped pages behind): fp32 / fp16
        values must be finite (every uint8 code is valid). IndexFormatError names the file.
        """
        kind = _check_kind(kind)
        n, dim = _check_count(n, "n"), _check_count(dim, "dim", 1)
        folder = Path(folder)
        path = _regular_file(folder / _FILES[kind][0])
        _, _, offset = read_npy_header(path, _DTYPES[kind], (n, dim))
        codes = load_npy(path, mmap=True, dtype=_DTYPES[kind], shape=(n, dim))
        params = None
        if kind == "sq8":
            ppath = _regular_file(folder / SQ8_PARAMS_FILE)
            params = load_npy(ppath, mmap=False, dtype=np.float32, shape=(2, dim))
            _check_params(params, dim, IndexFormatError, f"index file corrupted: {ppath}")
        store = cls(codes, kind, params, path, offset)
        if deep and kind != "sq8":
            for lo, chunk in store.iter_rows(np.arange(n, dtype=np.int64)):
                if not np.isfinite(chunk).all():
                    bad = lo + int(np.flatnonzero(~np.isfinite(chunk).all(axis=1))[0])
                    raise IndexFormatError(f"index file corrupted: {path} holds a non-finite value in row {bad}")
        return store

    # ------------------------------------------------------------ reading

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """Decoded vectors of ``rows`` ``(m,)`` int: ``(m, d)`` float32."""
        rows = _check_rows(rows, self.n)
        return self._decode(self.codes[rows])

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        if self.kind == "sq8":
            return sq8_decode(codes, self.params)
        return np.asarray(codes, dtype=np.float32)

    def iter_rows(self, rows: np.ndarray, chunk_rows: int | None = None, raw: bool = False):
        """Yield ``(position, values)`` for ascending ``rows`` ``(m,)`` int64, at most
        ``chunk_rows`` (default ~8 MiB of float32) at a time, ``position`` being the index into
        ``rows`` of the chunk's first row: values ``(len, d)`` decoded float32 (``raw``: the
        stored codes). Opened stores are read with plain reads of row windows, so a pass over a
        large store leaves no mapped pages (and no RSS) behind."""
        rows = _check_rows(rows, self.n)
        chunk = chunk_rows or max(1, STREAM_CHUNK_BYTES // (4 * self.dim))
        if rows.size and (np.diff(rows) < 0).any():
            raise ValueError("rows must be ascending")
        if self._path is None or self.n == 0 or self.dim == 0:
            for lo in range(0, rows.size, chunk):
                c = np.array(self.codes[rows[lo:lo + chunk]])
                yield lo, (c if raw else self._decode(c))
            return
        itemsize = self.codes.dtype.itemsize
        row_bytes = self.dim * itemsize
        fd = os.open(self._path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st_ = os.fstat(fd)
            if not stat.S_ISREG(st_.st_mode) or st_.st_size != self._offset + self.n * row_bytes:
                raise IndexFormatError(f"index file corrupted: {self._path} changed since it was opened")
            p = 0
            while p < rows.size:
                first = int(rows[p])
                end = int(np.searchsorted(rows, first + chunk, "left"))  # rows[p:end] in the window
                last = int(rows[end - 1])
                buf = np.empty((last + 1 - first, self.dim), self.codes.dtype)
                view = memoryview(buf).cast("B")
                got = 0
                while got < view.nbytes:
                    k = os.preadv(fd, [view[got:]], self._offset + first * row_bytes + got)
                    if k <= 0:
                        raise IndexFormatError(f"index file corrupted: {self._path} is shorter than its header says")
                    got += k
                c = buf[rows[p:end] - first]
                yield p, (c if raw else self._decode(c))
                p = end
        finally:
            os.close(fd)

    # ------------------------------------------------------------ search

    def search(self, q: np.ndarray, k: int, allowed: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` inner products of queries ``q`` ``(nq, d)`` over the stored vectors.

        ``allowed`` is ``(n,)`` bool or None (every row). Returns scores ``(nq, k)`` float32 and
        rows ``(nq, k)`` int64, best first, ties to the lower row, padded with 0 / -1 past the
        allowed rows.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        q = _check_vectors(q, self.dim, "q")
        rows = None
        if allowed is not None:
            allowed = np.asarray(allowed)
            if allowed.dtype != np.bool_ or allowed.shape != (self.n,):
                raise ValueError(f"allowed must be a ({self.n},) bool mask, got {allowed.dtype} {allowed.shape}")
            rows = np.flatnonzero(allowed).astype(np.int64)
            if rows.size == self.n:
                rows = None
        return self._search(q, int(k), rows)

    def _search(self, q, k, rows, parallel: bool | None = None):
        """Top-k over ``rows`` (ascending int64, None = all). ``parallel`` forces the choice."""
        nq = q.shape[0]
        m = self.n if rows is None else rows.size
        kk = min(k, m)
        if nq == 0 or kk == 0:
            return np.zeros((nq, k), np.float32), np.full((nq, k), -1, np.int64)
        if self.kind == "fp32":
            hs, hi, hn = _heaps(1, nq, kk)
            self._scan_blas(q, rows, hs[0], hi[0], hn[0])
            return _merge_heaps(hs, hi, hn, k)
        if self.kind == "sq8":
            w = q * self.params[1]
            base = (q @ self.params[0]).astype(np.float32)
        else:
            w, base = q, np.zeros(nq, np.float32)
        w = np.ascontiguousarray(w, np.float32)
        block = max(4, KERNEL_BLOCK_BYTES // (4 * self.dim))
        use_rows = rows is not None
        rows_ = _readonly(rows if use_rows else np.zeros(0, np.int64))
        threads = numba.get_num_threads()
        n_chunks = min(8 * threads, -(-m // block))
        if parallel is None:
            # (one heap set per thread: not when k is huge)
            parallel = (threads > 1 and n_chunks > 1 and nq * m * self.dim >= PARALLEL_MIN_FLOPS
                        and threads * nq * kk <= PARALLEL_MAX_HEAP)
        if not parallel:
            hs, hi, hn = _heaps(1, nq, kk)
            _scan_range(w, base, self._kernel_codes, rows_, use_rows, 0, m, block, hs[0], hi[0], hn[0])
            return _merge_heaps(hs, hi, hn, k)
        hs, hi, hn = _heaps(threads, nq, kk)
        old = numba.set_parallel_chunksize(1)
        try:
            _scan_parallel(w, base, self._kernel_codes, rows_, use_rows, m, block, max(1, n_chunks), hs, hi, hn)
        finally:
            numba.set_parallel_chunksize(old)
        return _merge_heaps(hs, hi, hn, k)

    def _scan_blas(self, q, rows, hs, hi, hn):
        block = max(64, BLAS_BLOCK_BYTES // (4 * self.dim))
        x = self.codes
        none = _readonly(np.zeros(0, np.int64))
        if rows is None:
            for lo in range(0, self.n, block):
                _push_block(q @ x[lo:lo + block].T, none, lo, False, hs, hi, hn)
            return
        # Wide masks: score the contiguous span and keep the allowed columns (at most twice the
        # work); narrow ones: gather the allowed rows.
        wide = rows.size * 2 >= (int(rows[-1]) - int(rows[0]) + 1)
        for lo in range(0, rows.size, block):
            r = rows[lo:lo + block]
            if wide:
                sc = (q @ x[r[0]:r[-1] + 1].T)[:, r - r[0]]
            else:
                sc = q @ x[r].T
            _push_block(np.ascontiguousarray(sc), _readonly(r), 0, True, hs, hi, hn)


def _regular_file(path: Path) -> Path:
    # storage's readers refuse links via O_NOFOLLOW; a folder at the name must fail cleanly too.
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise IndexFormatError(f"index file missing: {path}") from None
    except OSError as e:
        raise IndexFormatError(f"cannot inspect {path}: {e}") from e
    if stat.S_ISLNK(mode):
        raise IndexFormatError(f"{path} is a symbolic link; an index folder may not contain links")
    if not stat.S_ISREG(mode):
        raise IndexFormatError(f"index file corrupted: {path} is not a regular file")
    return path


def _heaps(t: int, nq: int, k: int):
    return (np.zeros((t, nq, k), np.float32), np.full((t, nq, k), -1, np.int64),
            np.zeros((t, nq), np.int64))


def _check_vectors(x, dim: int | None, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise ValueError(f"{what} must be (m, {dim if dim is not None else 'd'}), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{what} must be floating point, got {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{what} must be finite (within float32 range)")
    return x


def _encode(x: np.ndarray, kind: str, params: np.ndarray | None):
    """float32 ``(m, d)`` -> (codes, kind, params) of ``kind``; ValueError when fp16 overflows."""
    if kind == "fp32":
        return x, kind, None
    if kind == "fp16":
        with np.errstate(over="ignore"):
            c = x.astype(np.float16)
        if not np.isfinite(c).all():
            raise ValueError("vectors must lie within float16 range (|x| <= 65504) for fp16 storage")
        return c, kind, None
    params = np.asarray(params)
    _check_params(params, x.shape[1], ValueError, "sq8 params")
    return sq8_encode(x, params), kind, params


def search_reference(vectors: np.ndarray, q: np.ndarray, k: int, allowed: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Plain numpy exact top-k: ``vectors`` ``(n, d)`` decoded float32 (``store.rows(arange(n))``),
    ``q`` ``(nq, d)``. Same conventions as :meth:`DenseStore.search`."""
    x = np.asarray(vectors, np.float32)
    q = np.asarray(q, np.float32)
    nq, n = q.shape[0], x.shape[0]
    rows = np.arange(n) if allowed is None else np.flatnonzero(allowed)
    sc = q @ x[rows].T
    order = np.lexsort((np.broadcast_to(rows, sc.shape), -sc), axis=-1)[:, :k]
    out_s = np.zeros((nq, k), np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    out_s[:, :order.shape[1]] = np.take_along_axis(sc, order, 1)
    out_i[:, :order.shape[1]] = rows[order]
    return out_s, out_i


# ---------------------------------------------------------------- writing


class DenseWriter:
    """Stream a store of ``kind`` into ``folder``: :meth:`append` chunks, then :meth:`finish`.

    The codes file is created at once (unlinking whatever held its name, never following a
    link) with a header for 0 rows; :meth:`finish` rewrites the header with the final count
    (numpy pads headers so their length does not depend on it), writes the sq8 params and
    fsyncs. sq8 needs its ``params`` ``(2, dim)`` float32 up front (:func:`sq8_train`,
    :func:`sq8_params`); values outside their range clip. Used as a context manager, an
    exception removes the partial files.
    """

    def __init__(self, folder: str | os.PathLike, dim: int, kind: str, *, params: np.ndarray | None = None):
        self.folder = Path(folder)
        self.kind = _check_kind(kind)
        self.dim = _check_count(dim, "dim", 1)
        self.n = 0
        self.params = None
        if kind == "sq8":
            if params is None:
                raise ValueError("an sq8 DenseWriter needs params (sq8_train / sq8_params)")
            self.params = np.array(params, dtype=np.float32)
            _check_params(self.params, self.dim, ValueError, "sq8 params")
        elif params is not None:
            raise ValueError(f"{kind} storage takes no params")
        self._name = _FILES[kind][0]
        self._dtype = _DTYPES[kind]
        remove_entry(self.folder, self._name)
        fd = os.open(self.folder / self._name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        self._f = os.fdopen(fd, "wb")
        self._header_len = self._write_header()

    def _write_header(self) -> int:
        self._f.seek(0)
        np.lib.format.write_array_header_1_0(
            self._f, {"descr": np.lib.format.dtype_to_descr(self._dtype), "fortran_order": False,
                      "shape": (self.n, self.dim)})
        return self._f.tell()

    def append(self, vectors: np.ndarray) -> None:
        """Append ``(m, dim)`` float vectors (finite; within float16 range for fp16)."""
        x = _check_vectors(vectors, self.dim, "vectors")
        codes, _, _ = _encode(x, self.kind, self.params)
        self._write(codes)

    def append_codes(self, codes: np.ndarray) -> None:
        """Append ``(m, dim)`` codes already in this store's dtype and params (verbatim copy)."""
        codes = np.asarray(codes)
        if codes.dtype != self._dtype or codes.ndim != 2 or codes.shape[1] != self.dim:
            raise ValueError(f"codes must be (m, {self.dim}) {self._dtype}, got {codes.dtype} {codes.shape}")
        self._write(codes)

    def _write(self, codes: np.ndarray) -> None:
        if self._f is None:
            raise ValueError("DenseWriter is finished")
        if codes.size:
            self._f.write(memoryview(np.ascontiguousarray(codes).reshape(-1).view(np.uint8)))
        self.n += codes.shape[0]

    def finish(self) -> list[str]:
        """Write the final header (and sq8 params), fsync, close; returns the file names."""
        if self._f is None:
            raise ValueError("DenseWriter is finished")
        end = self._f.tell()
        if self._write_header() != self._header_len:  # numpy pads for growth; never expected
            raise RuntimeError(f"npy header length changed for {self.n} rows")
        self._f.seek(end)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        if self.kind == "sq8":
            save_npy(self.folder / SQ8_PARAMS_FILE, self.params)
        return list(_FILES[self.kind])

    def abort(self) -> None:
        """Close and remove what was written."""
        if self._f is not None:
            self._f.close()
            self._f = None
        for name in _FILES[self.kind]:
            remove_entry(self.folder, name)

    def __enter__(self) -> DenseWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._f is not None:
            self.finish()


def write_dense_array(folder: str | os.PathLike, vectors: np.ndarray, kind: str) -> list[str]:
    """Write ``vectors`` ``(n, d)`` float as a store of ``kind`` (sq8: params trained on them);
    returns the file names."""
    x = _check_vectors(vectors, None, "vectors")
    params = sq8_train(x) if kind == "sq8" else None
    with DenseWriter(folder, x.shape[1], kind, params=params) as w:
        chunk = max(1, STREAM_CHUNK_BYTES // (4 * max(x.shape[1], 1)))
        for lo in range(0, x.shape[0], chunk):
            w.append(x[lo:lo + chunk])
        return w.finish()


def merged_sq8_params(sources: list[tuple[DenseStore, np.ndarray]], dim: int) -> np.ndarray:
    """Params covering every selected row of ``sources``: the elementwise min of the vmins and
    max of the vmaxes (sq8 sources: their own range, without reading codes; fp sources: their
    selected rows' min and max, one streamed pass). When one sq8 source's range already covers
    the union, its params are returned unchanged, so its codes copy verbatim."""
    lo = np.full(dim, np.inf, np.float32)
    hi = np.full(dim, -np.inf, np.float32)
    sq8 = []
    for store, rows in sources:
        if rows.size == 0:
            continue
        if store.kind == "sq8":
            sq8.append(store)
            np.minimum(lo, store.params[0], out=lo)
            np.maximum(hi, store.vmax, out=hi)
        else:
            for _, x in store.iter_rows(rows):
                np.minimum(lo, x.min(axis=0), out=lo)
                np.maximum(hi, x.max(axis=0), out=hi)
    if not np.isfinite(lo).all():  # nothing selected
        return np.zeros((2, dim), np.float32)
    for store in sq8:
        if (store.params[0] <= lo).all() and (store.vmax >= hi).all():
            return np.array(store.params)
    return sq8_params(lo, hi)


def write_dense(folder: str | os.PathLike, sources: list[tuple[DenseStore, np.ndarray]], kind: str,
                *, dim: int | None = None) -> list[str]:
    """Merge: write rows ``rows`` (ascending int) of each ``(store, rows)`` source, in order, as
    one store of ``kind``; returns the file names.

    Bounded memory: sources are streamed in chunks of ~8 MiB of float32. For sq8 the params
    are :func:`merged_sq8_params` (a first pass over fp sources only); an sq8 source whose
    params equal them is copied code for code, any other is decoded and re-encoded (error at
    most ``step_source / 2 + step_target / 2`` per component). ``dim`` is needed only when
    there are no sources.
    """
    kind = _check_kind(kind)
    checked = []
    for store, rows in sources:
        checked.append((store, _check_rows(rows, store.n)))
    dims = {s.dim for s, _ in checked}
    if dim is not None:
        dims.add(_check_count(dim, "dim", 1))
    if len(dims) != 1:
        raise ValueError(f"sources (and dim) disagree on the dimension: {sorted(dims)}")
    d = dims.pop()
    params = merged_sq8_params(checked, d) if kind == "sq8" else None
    with DenseWriter(folder, d, kind, params=params) as w:
        for store, rows in checked:
            verbatim = store.kind == kind and (kind != "sq8" or np.array_equal(store.params, params))
            for _, c in store.iter_rows(rows, raw=verbatim):
                if verbatim:
                    w.append_codes(c)
                else:
                    w.append(c)
        return w.finish()


def file_bytes(n: int, dim: int, kind: str) -> int:
    """Bytes the store files of ``kind`` take for ``n`` rows of ``dim`` (npy headers included)."""
    data = bytes_per_doc(kind, dim) * int(n)
    header = len(_npy_header(_DTYPES[kind], (int(n), int(dim))))
    if kind == "sq8":
        return data + header + len(_npy_header(np.dtype(np.float32), (2, int(dim)))) + 8 * int(dim)
    return data + header


def _npy_header(dtype: np.dtype, shape: tuple) -> bytes:
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    return f.getvalue()


__all__ = ["KINDS", "DenseStore", "DenseWriter", "bytes_per_doc", "file_bytes", "files_for", "merged_sq8_params",
           "search_reference", "sq8_decode", "sq8_encode", "sq8_params", "sq8_train", "write_dense",
           "write_dense_array"]
