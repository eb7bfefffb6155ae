"""ColBERT multi-vector store of one immutable segment, with a Numba MaxSim kernel.

Token vectors are kept as float16 (half the disk and page cache of float32) and widened to
float32 per document inside the kernel; all arithmetic is float32. The score is BGE-M3's
``colbert_score``: the mean over query vectors of the best dot product with the document's
vectors. A document without vectors, or a query without vectors, scores 0.

Files written by :meth:`ColbertStore.save` (plain ``.npy``, never pickled):
``{prefix}_vectors.npy`` ``(T, d)`` float16 and ``{prefix}_offsets.npy`` ``(n_docs + 1,)`` int64.
"""

from __future__ import annotations

import os
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from hybridsearch.errors import IndexFormatError

# Reassociation lets LLVM vectorise the dot products; no "ninf", since -inf seeds the maxima.
_FASTMATH = {"reassoc", "contract", "nsz"}
# Below this many multiply-adds (about a millisecond) a batch runs on the calling thread: waking
# the pool costs microseconds on an idle machine but milliseconds on a busy one.
PARALLEL_MIN_FLOPS = 1 << 24


@intrinsic
def _half_to_float(typingctx, bits):
    """float16 bit pattern (uint16) -> float32; numba has no CPU float16, LLVM has (F16C)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@njit(cache=True, fastmath=_FASTMATH)
def _maxsim_range(q4, q_off4, q_len, owner, vec16, d, offsets, cand, lo, hi, out):
    """MaxSim of pairs ``[lo, hi)``: pair ``t`` is query ``owner[t]`` against doc ``cand[t]``.

    ``q4`` holds the queries with rows padded to a multiple of 4 (``q_off4`` ``(B + 1,)`` int64)
    by repeating their last row, which leaves every maximum unchanged; ``q_len`` ``(B,)`` are the
    real lengths. ``vec16`` is the flat ``(T * d,)`` uint16 view of the float16 vectors.
    """
    max_n = 0
    max_m = 0
    for t in range(lo, hi):
        max_n = max(max_n, offsets[cand[t] + 1] - offsets[cand[t]])
        max_m = max(max_m, q_off4[owner[t] + 1] - q_off4[owner[t]])
    buf = np.empty((max_n + 1) * d, np.float32)
    best = np.empty(max_m, np.float32)
    for t in range(lo, hi):
        b = owner[t]
        m = q_len[b]
        start = offsets[cand[t]]
        n = offsets[cand[t] + 1] - start
        if m == 0 or n == 0:
            out[t] = 0.0
            continue
        src = vec16[start * d:(start + n) * d]
        for x in range(n * d):
            buf[x] = _half_to_float(src[x])
        if n % 2 == 1:
            # Repeat the last vector so the 2-wide tile below needs no remainder loop.
            buf[n * d:(n + 1) * d] = buf[(n - 1) * d:n * d]
            n += 1
        p = buf[:n * d].reshape((n, d))
        q = q4[q_off4[b]:q_off4[b + 1]]
        m4 = q.shape[0]
        best[:m4] = -np.inf
        # 4 query x 2 doc register tile: 8 independent vector accumulators, 6 loads per 8 FMAs.
        for j in range(0, n, 2):
            for i in range(0, m4, 4):
                s00 = s01 = s10 = s11 = np.float32(0.0)
                s20 = s21 = s30 = s31 = np.float32(0.0)
                for e in range(d):
                    p0 = p[j, e]
                    p1 = p[j + 1, e]
                    q0 = q[i, e]
                    q1 = q[i + 1, e]
                    q2 = q[i + 2, e]
                    q3 = q[i + 3, e]
                    s00 += q0 * p0
                    s01 += q0 * p1
                    s10 += q1 * p0
                    s11 += q1 * p1
                    s20 += q2 * p0
                    s21 += q2 * p1
                    s30 += q3 * p0
                    s31 += q3 * p1
                best[i] = max(best[i], max(s00, s01))
                best[i + 1] = max(best[i + 1], max(s10, s11))
                best[i + 2] = max(best[i + 2], max(s20, s21))
                best[i + 3] = max(best[i + 3], max(s30, s31))
        total = np.float32(0.0)
        for i in range(m):
            total += best[i]
        out[t] = total / np.float32(m)


@njit(cache=True, parallel=True)
def _maxsim_parallel(q4, q_off4, q_len, owner, vec16, d, offsets, cand, n_chunks, out):
    c = cand.shape[0]
    for k in prange(n_chunks):
        _maxsim_range(q4, q_off4, q_len, owner, vec16, d, offsets, cand,
                      k * c // n_chunks, (k + 1) * c // n_chunks, out)


def _readonly(a: np.ndarray) -> np.ndarray:
    # Kernels always see read-only arrays (as loaded memmaps are), so each compiles once.
    v = np.asarray(a).view()
    v.flags.writeable = False
    return v


def _check_offsets(offsets, total: int, what: str) -> np.ndarray:
    offsets = np.asarray(offsets)
    if offsets.ndim != 1 or offsets.size == 0 or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"{what} must be a non-empty 1-d integer array")
    if offsets[0] != 0 or offsets[-1] != total or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{what} must start at 0, never decrease and end at {total}")
    return offsets.astype(np.int64)


def _check_vectors(q, d: int, what: str) -> np.ndarray:
    q = np.asarray(q)
    if q.ndim != 2 or q.shape[1] != d:
        raise ValueError(f"{what} must be (m, {d}), got shape {q.shape}")
    if not np.issubdtype(q.dtype, np.floating):
        raise TypeError(f"{what} must be floating point, got {q.dtype}")
    return np.ascontiguousarray(q, dtype=np.float32)


def _pad_queries(q: np.ndarray, q_offsets: np.ndarray):
    """Repeat each query's last row up to a multiple of 4 rows; returns (q4, q_off4, q_len)."""
    q_len = np.diff(q_offsets)
    pad = (-q_len) % 4
    pad[q_len == 0] = 0
    q_off4 = np.zeros_like(q_offsets)
    np.cumsum(q_len + pad, out=q_off4[1:])
    rows = np.arange(q_off4[-1]) - np.repeat(q_off4[:-1] - q_offsets[:-1], q_len + pad)
    # Padding rows index past their query's end; clamp them to its last row.
    rows = np.minimum(rows, np.repeat(q_offsets[1:] - 1, q_len + pad))
    return q[rows], q_off4, q_len


class ColbertStore:
    """Token vectors of one segment: doc ``i`` owns ``vectors[offsets[i]:offsets[i + 1]]``.

    Attributes:
        vectors: ``(T, d)`` float16, memory-mapped when loaded.
        offsets: ``(n_docs + 1,)`` int64, non-decreasing, from 0 to T.
    """

    def __init__(self, vectors: np.ndarray, offsets: np.ndarray):
        self.vectors = _readonly(vectors)
        self.offsets = _readonly(offsets)
        self._flat = _readonly(self.vectors.view(np.uint16).reshape(-1))

    @property
    def n_docs(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @classmethod
    def from_arrays(cls, vectors: np.ndarray, offsets: np.ndarray) -> ColbertStore:
        """``vectors`` ``(T, d)`` float32/16 (stored as float16); ``offsets`` ``(n_docs + 1,)``."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
            raise TypeError(f"vectors must be a 2-d float array, "
                            f"got {vectors.dtype} {vectors.shape}")
        with np.errstate(over="ignore"):  # overflow is reported below, as an error
            v16 = np.ascontiguousarray(vectors, dtype=np.float16)
        if not np.isfinite(v16).all():
            raise ValueError("vectors must be finite and within float16 range (|x| <= 65504)")
        return cls(v16, _check_offsets(offsets, v16.shape[0], "offsets"))

    def save(self, folder: str | Path, prefix: str = "colbert") -> None:
        """Write ``{prefix}_vectors.npy`` and ``{prefix}_offsets.npy`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{prefix}_vectors.npy", self.vectors, allow_pickle=False)
        np.save(folder / f"{prefix}_offsets.npy", self.offsets, allow_pickle=False)

    @classmethod
    def load(cls, folder: str | Path, prefix: str = "colbert", mmap: bool = True, *,
             dim: int | None = None, n_docs: int | None = None) -> ColbertStore:
        """Open files written by :meth:`save`, treating them as untrusted; with ``mmap`` the
        vectors stay on disk until read.

        Before anything is allocated from them: no links, dtypes, shapes and file sizes
        (vectors ``(T, d)`` float16 with ``d == dim`` when given, offsets ``(n + 1,)`` int64
        with ``n == n_docs`` when given). Then offsets start at 0, never decrease and end at T
        (O(n)): the MaxSim kernel reads ``vectors[offsets[i]:offsets[i + 1]]`` unchecked.
        """
        from hybridsearch.index.storage import load_npy, read_npy_header

        folder = Path(folder)
        paths = {name: folder / f"{prefix}_{name}.npy" for name in ("vectors", "offsets")}
        for path in paths.values():
            if not os.path.lexists(path):
                raise IndexFormatError(f"missing {path}; was this segment saved with "
                                       f"prefix {prefix!r}?")
        v_shape, _, _ = read_npy_header(paths["vectors"], np.float16, (None, dim))
        read_npy_header(paths["offsets"], np.int64, (None if n_docs is None else n_docs + 1,))
        if v_shape[1] < 1:
            raise IndexFormatError(f"{paths['vectors']} has no columns: shape {v_shape}")
        vectors = load_npy(paths["vectors"], mmap=mmap)
        offsets = load_npy(paths["offsets"], mmap=mmap)
        try:
            _check_offsets(offsets, v_shape[0], str(paths["offsets"]))
        except ValueError as e:
            raise IndexFormatError(str(e)) from None
        return cls(vectors, offsets)

    def _check_cand(self, cand) -> np.ndarray:
        cand = np.asarray(cand)
        if cand.ndim != 1 or (cand.size and not np.issubdtype(cand.dtype, np.integer)):
            raise ValueError(f"cand must be a 1-d integer array, got {cand.dtype} {cand.shape}")
        if cand.size and (cand.min() < 0 or cand.max() >= self.n_docs):
            raise ValueError(f"cand rows must lie in [0, {self.n_docs})")
        return cand.astype(np.int64)

    def maxsim(self, q: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """Scores of one query ``q`` ``(m, d)`` against rows ``cand`` ``(c,)``: ``(c,)`` float32."""
        q = _check_vectors(q, self.dim, "q")
        return self.maxsim_batch(q, np.array([0, q.shape[0]]), cand, np.array([0, len(cand)]))

    def maxsim_batch(self, Q: np.ndarray, q_offsets: np.ndarray, cand: np.ndarray,
                     cand_offsets: np.ndarray) -> np.ndarray:
        """MaxSim of B queries, each against its own candidates, as flat arrays plus offsets.

        Args:
            Q: ``(M, d)`` float query vectors; query ``b`` is ``Q[q_offsets[b]:q_offsets[b + 1]]``.
            q_offsets: ``(B + 1,)`` integers from 0 to M.
            cand: ``(C,)`` integer local rows; query ``b`` scores
                ``cand[cand_offsets[b]:cand_offsets[b + 1]]``.
            cand_offsets: ``(B + 1,)`` integers from 0 to C.

        Returns:
            ``(C,)`` float32 scores aligned with ``cand``.
        """
        Q = _check_vectors(Q, self.dim, "Q")
        q_offsets = _check_offsets(q_offsets, Q.shape[0], "q_offsets")
        cand = self._check_cand(cand)
        cand_offsets = _check_offsets(cand_offsets, cand.shape[0], "cand_offsets")
        if q_offsets.shape != cand_offsets.shape:
            raise ValueError(f"q_offsets {q_offsets.shape} and cand_offsets {cand_offsets.shape} "
                             "must describe the same number of queries")
        out = np.zeros(cand.shape[0], np.float32)
        if cand.size == 0:
            return out
        q4, q_off4, q_len = _pad_queries(Q, q_offsets)
        owner = np.repeat(np.arange(q_len.shape[0], dtype=np.int64), np.diff(cand_offsets))
        doc_len = self.offsets[cand + 1] - self.offsets[cand]
        flops = int((doc_len * q_len[owner]).sum()) * self.dim
        args = (_readonly(q4), _readonly(q_off4), _readonly(q_len), _readonly(owner), self._flat,
                self.dim, self.offsets, _readonly(cand))
        threads = numba.get_num_threads()
        if threads == 1 or cand.shape[0] == 1 or flops < PARALLEL_MIN_FLOPS:
            _maxsim_range(*args, 0, cand.shape[0], out)
        else:
            # Chunks are handed out one at a time, so a thread slowed by other load takes fewer.
            old = numba.set_parallel_chunksize(1)
            try:
                _maxsim_parallel(*args, min(8 * threads, cand.shape[0]), out)
            finally:
                numba.set_parallel_chunksize(old)
        return out

    def search(self, q: np.ndarray, k: int, allowed: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Exhaustive exact top-k of one query ``(m, d)`` over every allowed doc.

        For small segments and tests. ``allowed`` is ``(n_docs,)`` bool or None. Returns scores
        ``(k,)`` float32 and ids ``(k,)`` int64, best first, ties to the lower row; slots beyond
        the allowed docs hold score 0 and id -1 (as in the sparse retriever).
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if allowed is None:
            cand = np.arange(self.n_docs, dtype=np.int64)
        else:
            allowed = np.asarray(allowed)
            if allowed.dtype != np.bool_ or allowed.shape != (self.n_docs,):
                raise ValueError(f"allowed must be a ({self.n_docs},) bool mask, "
                                 f"got {allowed.dtype} {allowed.shape}")
            cand = np.flatnonzero(allowed).astype(np.int64)
        scores = self.maxsim(q, cand)
        order = np.lexsort((cand, -scores))[:k]
        out_s = np.zeros(k, np.float32)
        out_i = np.full(k, -1, np.int64)
        out_s[: order.size] = scores[order]
        out_i[: order.size] = cand[order]
        return out_s, out_i


def maxsim_reference(q: np.ndarray, doc_vectors_list: list[np.ndarray]) -> np.ndarray:
    """Plain numpy MaxSim of ``q`` ``(m, d)`` against each ``(n_i, d)`` doc: ``(len,)`` float32.

    Inputs are upcast to float32 first, so float16 docs give the store's exact arithmetic up to
    summation order.
    """
    q = np.asarray(q, dtype=np.float32)
    out = np.zeros(len(doc_vectors_list), np.float32)
    for i, p in enumerate(doc_vectors_list):
        p = np.asarray(p, dtype=np.float32)
        if q.shape[0] and p.shape[0]:
            out[i] = np.einsum("id,jd->ij", q, p).max(axis=1).sum() / np.float32(q.shape[0])
    return out
