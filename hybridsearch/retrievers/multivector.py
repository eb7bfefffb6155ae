"""ColBERT multi-vector stores of one immutable segment, with Numba MaxSim kernels.

Two stores share one reading API (``n_docs``, ``dim``, ``offsets``, ``maxsim``, ``maxsim_batch``,
``search``, ``bytes_per_token``):

* :class:`ColbertStore` keeps float16 vectors (half the disk and page cache of float32), widened
  to float32 per document inside the kernel.
* :class:`CodedColbertStore` keeps residual codes (:mod:`colbert_codec`: a uint16 centroid id and
  ``dim * nbits / 8`` bytes per token, 130 B at d=1024 and 1 bit against 2,048 B). Without
  renormalisation a score splits into the query row against the token's base (centroid +
  bucket-0 weights + fill, one product per centroid and query row, by BLAS) plus the coded
  dimensions, and those come from per-query nibble tables (:mod:`_nibbles`): one vector load
  and add per residual nibble and 8 query rows, no decode and no multiply (1.9x faster than
  decoding the coded dimensions and multiplying, on the 1M hybrid's union;
  bench/results/query_speed_1m.md). A renormalising codec decodes one candidate document at a
  time into a per-thread buffer.

``search`` on a coded store is approximate by default: documents ranked by their centroids
alone (:mod:`centroid_stage`), ``refine_depth(candidates, allowed)`` of them by MaxSim on the leading
coded dimensions (:meth:`CodedColbertStore.partial_maxsim`), the best ``candidates`` by the exact
MaxSim; ``exhaustive=True`` scores every allowed document.

All arithmetic is float32. The score is BGE-M3's ``colbert_score``: the mean over query vectors
of the best dot product with the document's vectors. A document without vectors, or a query
without vectors, scores 0. :func:`write_colbert` streams documents of several stores into new
files (segment merges), converting between codecs with bounded memory.

Files (plain ``.npy``, never pickled), ``T`` tokens and ``n`` documents:

* float16 (:meth:`ColbertStore.save`): ``{prefix}_vectors.npy`` ``(T, d)`` float16 and
  ``{prefix}_offsets.npy`` ``(n + 1,)`` int64.
* coded (:meth:`CodedColbertStore.save`): ``{prefix}_codes.npy`` ``(T,)`` uint16,
  ``{prefix}_residuals.npy`` ``(T, d * nbits / 8)`` uint8 and ``{prefix}_offsets.npy``
  ``(n + 1,)`` int64 (of the pooled tokens for a pooling codec); the codec's own files are
  listed in :mod:`colbert_codec`.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange

from hybridsearch.errors import IndexFormatError
from hybridsearch.retrievers import _nibbles, centroid_stage
from hybridsearch.retrievers._tiles import tile_4x2
from hybridsearch.retrievers.colbert_codec import (
    ColbertCodec,
    _decode_tokens,
    _float32,
    _half_to_float,
    _widen,
    pool_tokens,
)

# Reassociation lets LLVM vectorise the dot products; no "ninf", since -inf seeds the maxima.
_FASTMATH = {"reassoc", "contract", "nsz"}
# Below this many multiply-adds (about a millisecond) a batch runs on the calling thread: waking
# the pool costs microseconds on an idle machine but milliseconds on a busy one.
PARALLEL_MIN_FLOPS = 1 << 24
# maxsim_batch on a coded store builds the nibble tables of queries holding up to this many
# bytes of them at once (16 KiB a query row at d=1024, res1: about 128 queries of 32 rows).
LUT_BATCH_BYTES = 64 << 20
# ... and builds them on Numba's threads from this many queries (about 30 us a query of 32 rows).
PARALLEL_MIN_QUERIES = 16
# search() with a query of at least SEARCH_BLOCKED_MIN_QUERY vectors scores whole blocks of
# SEARCH_BLOCK_TOKENS tokens (decoded to float32: 32 MiB at d=1024) by BLAS, when the allowed docs
# hold at least 1/SEARCH_BLOCKED_MIN_SHARE of the tokens. Measured at d=1024, 100-token docs, one
# thread: the kernel wins up to 32 query vectors (fp16 95 vs 128 ms, codes 118 vs 154 ms per 500
# docs), BLAS from 128 (fp16 381 vs 337, codes 405 vs 360). Codes without renormalisation never
# take it since the nibble tables: their kernel won at every length measured, 32 to 1,024 vectors
# (17 vs 97 ms, 66 vs 156 at 128, 519 vs 1,054 at 1,024; bench/results/coded_long_queries.md).
SEARCH_BLOCKED_MIN_QUERY = 64
SEARCH_BLOCK_TOKENS = 1 << 13
SEARCH_BLOCKED_MIN_SHARE = 4
# search() on a coded store ranks the documents by their centroids alone (centroid_stage) and
# runs the exact MaxSim on the best FIRST_STAGE_CANDIDATES of them only; recall@10 against the
# exhaustive search measured in bench/results/colbert_first_stage.md.
FIRST_STAGE_CANDIDATES = 1024
# Between the two, for a transform codec: the first stage keeps refine_depth() documents (16 x
# candidates, and at least 1/16 of the allowed ones), scored by MaxSim on the centroid part plus
# the REFINE_DIMS leading coded dimensions only (those of most residual variance: ~1/5 of the
# exact kernel's work at d=1024, res1), and the best `candidates` of them get the exact MaxSim.
# Measured (bench/results/colbert_first_stage.md, BGE-M3-shaped synthetic tokens): the refined
# top 256 kept every exact top-10 document the first stage held; the first stage's top 16,384
# held 100% of the exact top-10 at 100k documents, 94% at 1M, its top 65,536 100% at 1M.
REFINE_DEPTH = 16
REFINE_SHARE = 16
REFINE_DIMS = 104


def refine_depth(candidates: int, allowed: int) -> int:
    """Documents the centroid stage keeps for the refinement, out of ``allowed``."""
    return max(candidates * REFINE_DEPTH, -(-allowed // REFINE_SHARE))
# Codebooks up to this many centroids get the first stage (bitsets of k / 8 bytes a document;
# an index's codebook has at most 256).
FIRST_STAGE_MAX_K = 4096
# Float32 tokens decoded per step by write_colbert (bounded memory for any merge size).
WRITE_FLOAT_CHUNK_BYTES = 64 << 20
# Codes read per chunk by the load-time range check.
CHECK_CHUNK = 1 << 22


@njit(cache=True, fastmath=_FASTMATH)
def _tile_maxsim(q, m, buf, n, d, best):
    """MaxSim of ``q`` ``(m4, d)`` (rows padded to a multiple of 4, ``m`` real) against the
    ``n`` float32 vectors at the start of the flat ``buf`` (which has room for ``n + 1``)."""
    if n % 2 == 1:
        # Repeat the last vector so the 2-wide tile below needs no remainder loop.
        buf[n * d:(n + 1) * d] = buf[(n - 1) * d:n * d]
        n += 1
    p = buf[:n * d].reshape((n, d))
    m4 = q.shape[0]
    best[:m4] = -np.inf
    # 4 query x 2 doc register tile: 8 independent vector accumulators, 6 loads per 8 FMAs.
    for j in range(0, n, 2):
        for i in range(0, m4, 4):
            s00, s01, s10, s11, s20, s21, s30, s31 = tile_4x2(q, i, p, j, d)
            best[i] = max(best[i], max(s00, s01))
            best[i + 1] = max(best[i + 1], max(s10, s11))
            best[i + 2] = max(best[i + 2], max(s20, s21))
            best[i + 3] = max(best[i + 3], max(s30, s31))
    total = np.float32(0.0)
    for i in range(m):
        total += best[i]
    return total / np.float32(m)


@njit(cache=True)
def _buffers(q_off4, owner, offsets, cand, lo, hi, d):
    max_n = 0
    max_m = 0
    for t in range(lo, hi):
        max_n = max(max_n, offsets[cand[t] + 1] - offsets[cand[t]])
        max_m = max(max_m, q_off4[owner[t] + 1] - q_off4[owner[t]])
    return np.empty((max_n + 1) * d, np.float32), np.empty(max_m, np.float32)


@njit(cache=True, fastmath=_FASTMATH, nogil=True)
def _maxsim_range(q4, q_off4, q_len, owner, vec16, d, offsets, cand, lo, hi, out):
    """MaxSim of pairs ``[lo, hi)``: pair ``t`` is query ``owner[t]`` against doc ``cand[t]``.

    ``q4`` holds the queries with rows padded to a multiple of 4 (``q_off4`` ``(B + 1,)`` int64)
    by repeating their last row, which leaves every maximum unchanged; ``q_len`` ``(B,)`` are the
    real lengths. ``vec16`` is the flat ``(T * d,)`` uint16 view of the float16 vectors.
    """
    buf, best = _buffers(q_off4, owner, offsets, cand, lo, hi, d)
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
        out[t] = _tile_maxsim(q4[q_off4[b]:q_off4[b + 1]], m, buf, n, d, best)


@njit(cache=True, fastmath=_FASTMATH, nogil=True)
def _coded_range(q4, q_off4, q_len, owner, ids, res, base, w4, w2, d1, renorm, offsets, cand,
                 lo, hi, out):
    """:func:`_maxsim_range` on residual codes: each candidate is decoded into a per-call
    buffer (one document at a time, never the store), in the codec's coding space (the
    queries ``q4`` are already rotated into it)."""
    d = base.shape[1]
    buf, best = _buffers(q_off4, owner, offsets, cand, lo, hi, d)
    for t in range(lo, hi):
        b = owner[t]
        m = q_len[b]
        start = offsets[cand[t]]
        n = offsets[cand[t] + 1] - start
        if m == 0 or n == 0:
            out[t] = 0.0
            continue
        _decode_tokens(ids, res, start, n, base, w4, w2, d1, renorm, buf)
        out[t] = _tile_maxsim(q4[q_off4[b]:q_off4[b + 1]], m, buf, n, d, best)


@njit(cache=True, fastmath=_FASTMATH, nogil=True)
def _lut_range(tab, q_off8, q_len, owner, cs, k, ids, res, nbytes, offsets, cand, lo, hi, out):
    """:func:`_coded_range` for a codec without renormalisation, by nibble tables
    (:mod:`_nibbles`): the score of query row ``i`` and token ``u`` is the row against the
    token's base, ``cs`` (query ``b``'s ``(k, m8)`` row-major at ``k * q_off8[b]``), plus the
    sum of the row's table entries for the token's first ``nbytes`` residual bytes (all of them
    for the exact score). ``tab`` holds each query's tables (:func:`_nibbles.build_tables`),
    rows padded to a multiple of 8 by repeating the last one (``q_off8``; ``q_len`` real rows).

    A MaxSim is a sum over query rows, so the pairs are scored one block of rows at a time
    (outer loop): each block's tables (512 KiB at res1, d=1024) stay in cache across all the
    pairs, where a long query's tables taken document by document would not."""
    ne = 32 * res.shape[1]
    acc = np.empty(_nibbles.BLOCK_ROWS, np.float32)
    best = np.empty(_nibbles.BLOCK_ROWS, np.float32)
    top = 0
    for t in range(lo, hi):
        out[t] = 0.0
        b = owner[t]
        top = max(top, q_off8[b + 1] - q_off8[b])
    for j in range(0, top, _nibbles.BLOCK_ROWS):
        for t in range(lo, hi):
            b = owner[t]
            m = q_len[b]
            r0 = q_off8[b]
            m8 = q_off8[b + 1] - r0
            start = offsets[cand[t]]
            n = offsets[cand[t] + 1] - start
            if j >= m or n == 0:
                continue
            rows = min(_nibbles.BLOCK_ROWS, m8 - j)
            block = tab[ne * (r0 + j):ne * (r0 + j + rows)]
            csb = cs[k * r0:k * (r0 + m8)]
            best[:rows] = -np.inf
            for u in range(start, start + n):
                _nibbles.nibble_sum(block, res, u, nbytes, rows, acc)
                c = csb[ids[u] * m8 + j:]
                for i in range(rows):
                    best[i] = max(best[i], acc[i] + c[i])
            total = np.float32(0.0)
            for i in range(min(rows, m - j)):  # padding rows repeat the last real one
                total += best[i]
            out[t] += total
    for t in range(lo, hi):
        m = q_len[owner[t]]
        if m:
            out[t] /= np.float32(m)


@njit(cache=True, parallel=True)
def _lut_parallel(tab, q_off8, q_len, owner, cs, k, ids, res, nbytes, offsets, cand, n_chunks, out):
    c = cand.shape[0]
    for x in prange(n_chunks):
        _lut_range(tab, q_off8, q_len, owner, cs, k, ids, res, nbytes, offsets, cand,
                   x * c // n_chunks, (x + 1) * c // n_chunks, out)


@njit(cache=True, parallel=True)
def _coded_parallel(q4, q_off4, q_len, owner, ids, res, base, w4, w2, d1, renorm, offsets, cand,
                    n_chunks, out):
    c = cand.shape[0]
    for k in prange(n_chunks):
        _coded_range(q4, q_off4, q_len, owner, ids, res, base, w4, w2, d1, renorm, offsets, cand,
                     k * c // n_chunks, (k + 1) * c // n_chunks, out)


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


def _pad_queries(q: np.ndarray, q_offsets: np.ndarray, multiple: int = 4):
    """Repeat each query's last row up to a multiple of ``multiple`` rows; returns
    (q4, q_off4, q_len)."""
    q_len = np.diff(q_offsets)
    pad = (-q_len) % multiple
    pad[q_len == 0] = 0
    q_off4 = np.zeros_like(q_offsets)
    np.cumsum(q_len + pad, out=q_off4[1:])
    rows = np.arange(q_off4[-1]) - np.repeat(q_off4[:-1] - q_offsets[:-1], q_len + pad)
    # Padding rows index past their query's end; clamp them to its last row.
    rows = np.minimum(rows, np.repeat(q_offsets[1:] - 1, q_len + pad))
    return q[rows], q_off4, q_len


def _check_candidates(candidates, k: int) -> int:
    if candidates is None:
        return max(int(k), FIRST_STAGE_CANDIDATES)
    if isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) \
            or candidates < 1:
        raise ValueError(f"candidates must be an integer >= 1, got {candidates!r}")
    return max(int(k), int(candidates))


def _top(scores: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` of ``cand`` by ``scores`` (ties to the lower row), padded with 0 / -1."""
    order = np.lexsort((cand, -scores))[:k]
    out_s = np.zeros(k, np.float32)
    out_i = np.full(k, -1, np.int64)
    out_s[: order.size] = scores[order]
    out_i[: order.size] = cand[order]
    return out_s, out_i


class _MaxSimStore:
    """Reading API shared by both stores: ``maxsim``, ``maxsim_batch``, ``search``.

    A subclass sets ``offsets`` and provides ``dim``, ``bytes_per_token``,
    ``_kernel(query args, cand, out, n_chunks)`` (0 chunks: on the calling thread) and
    ``decode_range(lo, hi)`` (tokens as float32); a store that scores in another space (a
    rotated codec) overrides ``_prepare`` (queries into it) and ``_native_range`` (tokens in it).
    """

    offsets: np.ndarray

    def _prepare(self, q: np.ndarray) -> np.ndarray:
        return q

    def _native_range(self, lo: int, hi: int) -> np.ndarray:
        return self.decode_range(lo, hi)

    def _query_args(self, Q: np.ndarray, q_offsets: np.ndarray) -> tuple:
        """``(q4, q_off4, q_len, extra)``: the checked queries as the kernels take them (rows padded
        to a multiple of 4, in the store's space) plus what ``_kernel`` needs per query batch."""
        q4, q_off4, q_len = _pad_queries(self._prepare(Q), q_offsets)
        return _readonly(q4), _readonly(q_off4), _readonly(q_len), None

    @property
    def n_docs(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

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
        for a, z in self._query_groups(q_offsets):
            lo, hi = int(cand_offsets[a]), int(cand_offsets[z])
            if hi > lo:
                self._batch_group(Q[q_offsets[a]:q_offsets[z]], q_offsets[a:z + 1] - q_offsets[a],
                                  cand[lo:hi], cand_offsets[a:z + 1] - lo, out[lo:hi])
        return out

    def _query_groups(self, q_offsets: np.ndarray) -> list[tuple[int, int]]:
        """Queries ``[a, z)`` that :meth:`maxsim_batch` prepares and scores together."""
        return [(0, q_offsets.shape[0] - 1)]

    def _batch_group(self, Q, q_offsets, cand, cand_offsets, out) -> None:
        q4, q_off4, q_len, extra = self._query_args(Q, q_offsets)
        owner = np.repeat(np.arange(q_len.shape[0], dtype=np.int64), np.diff(cand_offsets))
        doc_len = self.offsets[cand + 1] - self.offsets[cand]
        flops = int((doc_len * q_len[owner]).sum()) * self.dim
        args = (q4, q_off4, q_len, _readonly(owner), extra)
        threads = numba.get_num_threads()
        if threads == 1 or cand.shape[0] == 1 or flops < PARALLEL_MIN_FLOPS:
            self._kernel(args, _readonly(cand), out, 0)
        else:
            # Chunks are handed out one at a time, so a thread slowed by other load takes fewer.
            old = numba.set_parallel_chunksize(1)
            try:
                self._kernel(args, _readonly(cand), out, min(8 * threads, cand.shape[0]))
            finally:
                numba.set_parallel_chunksize(old)

    def _check_search(self, k, allowed) -> np.ndarray | None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if allowed is None:
            return None
        allowed = np.asarray(allowed)
        if allowed.dtype != np.bool_ or allowed.shape != (self.n_docs,):
            raise ValueError(f"allowed must be a ({self.n_docs},) bool mask, "
                             f"got {allowed.dtype} {allowed.shape}")
        return allowed

    def search(self, q: np.ndarray, k: int, allowed: np.ndarray | None = None, *,
               exhaustive: bool = False, candidates: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of one query ``(m, d)`` by exact MaxSim over the allowed docs.

        ``allowed`` is ``(n_docs,)`` bool or None. Returns scores ``(k,)`` float32 and ids
        ``(k,)`` int64, best first, ties to the lower row; slots beyond the allowed docs hold
        score 0 and id -1 (as in the sparse retriever).

        A coded store (unless ``exhaustive``) scores exactly only the ``max(k, candidates)``
        (default ``FIRST_STAGE_CANDIDATES``) allowed docs of best centroid score
        (:meth:`first_stage`): the scores returned are exact, the set approximate (recall@10
        against the exhaustive search in bench/results/colbert_first_stage.md). A float16 store
        is always searched exhaustively. Exhaustively, long queries (``SEARCH_BLOCKED_MIN_QUERY``
        vectors or more) score whole blocks of documents by BLAS (:meth:`scores_blocked`) unless
        few documents are allowed or the store's kernel is faster anyway (codes without
        renormalisation); otherwise the MaxSim kernel scores the allowed docs one by one.
        """
        allowed = self._check_search(k, allowed)
        q = _check_vectors(q, self.dim, "q")
        n = _check_candidates(candidates, k)
        n_allowed = self.n_docs if allowed is None else int(np.count_nonzero(allowed))
        depth = refine_depth(n, n_allowed) if self._refines() else n
        # the stages pay only where they leave documents out: at most 16 x candidates allowed
        # (16k by default), the exhaustive scan is exact and faster (bench/RESULTS.md, 10k docs)
        if not exhaustive and self._has_first_stage() and depth < n_allowed:
            cand, _ = self.first_stage(q, depth, allowed)
            if cand.shape[0] > n:
                cand = np.sort(cand)
                cand = cand[_top(self.partial_maxsim(q, cand), np.arange(cand.shape[0]), n)[1]]
            return _top(self.maxsim(q, cand), cand, k)
        if allowed is None:
            cand = np.arange(self.n_docs, dtype=np.int64)
        else:
            cand = np.flatnonzero(allowed).astype(np.int64)
        lengths = self.offsets[cand + 1] - self.offsets[cand]
        if (self._blocked_pays() and q.shape[0] >= SEARCH_BLOCKED_MIN_QUERY and cand.size
                and int(lengths.sum()) * SEARCH_BLOCKED_MIN_SHARE >= self.n_tokens):
            scores = self.scores_blocked(q, allowed)[cand]
        else:
            scores = self.maxsim(q, cand)
        return _top(scores, cand, k)

    def _has_first_stage(self) -> bool:
        return False

    def _blocked_pays(self) -> bool:
        """Whether long queries score faster by :meth:`scores_blocked` than by the kernel."""
        return True

    def _refines(self) -> bool:
        return False

    def first_stage(self, q: np.ndarray, n: int, allowed: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``min(n, allowed docs)`` candidate rows of one query ``(m, d)`` for exact
        rescoring, with their first-stage scores: rows ``(c,)`` int64 and scores ``(c,)``
        float32, best first (ties to the lower row).

        Coded store: centroid scores (:mod:`centroid_stage`, MaxSim with every token replaced
        by its centroid), comparable across stores of one codec. Float16 store: the exact
        MaxSim top ``n`` (these stores are small: written before the codebook existed).
        """
        allowed = self._check_search(n, allowed)
        s, i = self.search(q, n, allowed, exhaustive=True)
        ok = i >= 0
        return i[ok], s[ok]

    def scores_blocked(self, q: np.ndarray, allowed: np.ndarray | None = None,
                       block_tokens: int | None = None) -> np.ndarray:
        """MaxSim of one query ``(m, d)`` against every doc: ``(n_docs,)`` float32.

        The store is read in blocks of whole documents of about ``block_tokens`` tokens
        (``SEARCH_BLOCK_TOKENS``): each is widened/decoded to float32, multiplied with the query
        by BLAS and reduced by a per-document maximum, so memory stays bounded. Blocks without
        an allowed doc are skipped (their scores stay 0).
        """
        q = _check_vectors(q, self.dim, "q")
        block = int(block_tokens or SEARCH_BLOCK_TOKENS)
        out = np.zeros(self.n_docs, np.float32)
        m = q.shape[0]
        if m == 0 or self.n_docs == 0:
            return out
        offsets = np.asarray(self.offsets)
        qt = np.ascontiguousarray(self._prepare(q).T)
        s = 0
        while s < self.n_docs:
            e = int(np.searchsorted(offsets, offsets[s] + block, side="right")) - 1
            e = min(max(e, s + 1), self.n_docs)
            if allowed is None or allowed[s:e].any():
                lo, hi = int(offsets[s]), int(offsets[e])
                lengths = np.diff(offsets[s:e + 1])
                full = np.flatnonzero(lengths)
                if full.size:
                    sims = self._native_range(lo, hi) @ qt
                    best = np.maximum.reduceat(sims, offsets[s + full] - lo, axis=0)
                    out[s + full] = best.sum(axis=1) / np.float32(m)
            s = e
        return out


class ColbertStore(_MaxSimStore):
    """Token vectors of one segment: doc ``i`` owns ``vectors[offsets[i]:offsets[i + 1]]``.

    Attributes:
        vectors: ``(T, d)`` float16, memory-mapped when loaded.
        offsets: ``(n_docs + 1,)`` int64, non-decreasing, from 0 to T.
    """

    codec = None

    def __init__(self, vectors: np.ndarray, offsets: np.ndarray):
        self.vectors = _readonly(vectors)
        self.offsets = _readonly(offsets)
        self._flat = _readonly(self.vectors.view(np.uint16).reshape(-1))

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.dim

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

        paths = _store_paths(folder, prefix, ("vectors", "offsets"))
        v_shape, _, _ = read_npy_header(paths["vectors"], np.float16, (None, dim))
        read_npy_header(paths["offsets"], np.int64, (None if n_docs is None else n_docs + 1,))
        if v_shape[1] < 1:
            raise IndexFormatError(f"{paths['vectors']} has no columns: shape {v_shape}")
        vectors = load_npy(paths["vectors"], mmap=mmap)
        offsets = _load_offsets(paths["offsets"], v_shape[0], mmap)
        return cls(vectors, offsets)

    def _kernel(self, args, cand, out, n_chunks):
        args = args[:4]
        if n_chunks:
            _maxsim_parallel(*args, self._flat, self.dim, self.offsets, cand, n_chunks, out)
        else:
            _maxsim_range(*args, self._flat, self.dim, self.offsets, cand, 0, cand.shape[0], out)

    def decode_range(self, lo: int, hi: int) -> np.ndarray:
        """Tokens ``[lo, hi)`` as ``(hi - lo, d)`` float32."""
        out = np.empty((hi - lo, self.dim), np.float32)
        _widen(self._flat[lo * self.dim:hi * self.dim], out.reshape(-1))
        return out


class CodedColbertStore(_MaxSimStore):
    """Residual-coded token vectors of one segment (see :mod:`colbert_codec`): doc ``i`` owns
    tokens ``offsets[i]:offsets[i + 1]``, each a centroid id plus packed residual bits.

    Attributes:
        codes: ``(T,)`` uint16 centroid ids, all ``< codec.k``; memory-mapped when loaded.
        residuals: ``(T, dim * nbits // 8)`` uint8 packed residual buckets.
        offsets: ``(n_docs + 1,)`` int64 (of the pooled tokens when ``codec.pool > 1``).
        codec: the :class:`ColbertCodec` they decode with.
    """

    def __init__(self, codes: np.ndarray, residuals: np.ndarray, offsets: np.ndarray,
                 codec: ColbertCodec):
        # The kernels read residual rows and their tables unchecked: the shapes must agree.
        if (np.ndim(codes) != 1 or np.ndim(residuals) != 2
                or np.shape(residuals) != (np.shape(codes)[0], codec.residual_bytes)):
            raise ValueError(f"codes ({np.shape(codes)}) and residuals ({np.shape(residuals)}) "
                             f"must be (T,) and (T, {codec.residual_bytes})")
        self.codes = _readonly(codes)
        self.residuals = _readonly(residuals)
        self.offsets = _readonly(offsets)
        self.codec = codec
        self._sets = None  # (bitsets, empty docs) for the first stage, made on first use
        self._sets_lock = threading.Lock()

    def __getstate__(self):
        # A lock does not pickle (stores are sent to worker processes); the sets are rebuilt there.
        state = dict(self.__dict__)
        state["_sets"], state["_sets_lock"] = None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._sets_lock = threading.Lock()

    @property
    def dim(self) -> int:
        return self.codec.dim

    @property
    def bytes_per_token(self) -> int:
        return self.codec.bytes_per_token

    @classmethod
    def from_arrays(cls, vectors: np.ndarray, offsets: np.ndarray, codec: ColbertCodec
                    ) -> CodedColbertStore:
        """Pool (when ``codec.pool > 1``) then encode ``(T, d)`` float vectors of documents
        ``offsets`` ``(n_docs + 1,)``; the store's offsets are the pooled ones."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
            raise TypeError(f"vectors must be a 2-d float array, "
                            f"got {vectors.dtype} {vectors.shape}")
        if vectors.shape[1] != codec.dim:
            raise ValueError(f"vectors have {vectors.shape[1]} columns, the codec {codec.dim}")
        if not np.isfinite(vectors).all():
            raise ValueError("vectors must be finite")
        offsets = _check_offsets(offsets, vectors.shape[0], "offsets")
        if codec.pool > 1:
            vectors, offsets = pool_tokens(vectors, offsets, codec.pool)
        codes, residuals = codec.encode(vectors)
        return cls(codes, residuals, offsets, codec)

    def save(self, folder: str | Path, prefix: str = "colbert") -> list[str]:
        """Write ``{prefix}_codes.npy``, ``{prefix}_residuals.npy`` and ``{prefix}_offsets.npy``
        into ``folder`` (the codec is saved separately, :meth:`ColbertCodec.save`)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for name, a in (("codes", self.codes), ("residuals", self.residuals),
                        ("offsets", self.offsets)):
            np.save(folder / f"{prefix}_{name}.npy", a, allow_pickle=False)
            names.append(f"{prefix}_{name}.npy")
        return names

    @classmethod
    def load(cls, folder: str | Path, prefix: str = "colbert", mmap: bool = True, *,
             dim: int | None = None, n_docs: int | None = None, codec: ColbertCodec,
             check: bool = True) -> CodedColbertStore:
        """Open files written by :meth:`save`, as untrusted.

        Always (O(n_docs)): no links, dtypes, shapes and sizes (codes ``(T,)`` uint16,
        residuals ``(T, codec.dim * nbits // 8)`` uint8, offsets ``(n_docs + 1,)`` int64), the
        codec's dim equal to ``dim``, offsets from 0 to T never decreasing. With ``check``, one
        more pass reads every code in chunks (bounded memory) and requires it ``< codec.k``:
        the kernels index the centroids by code unchecked, so skip it only for files this
        process wrote or already checked.
        """
        from hybridsearch.index.storage import load_npy, npy_chunks, read_npy_header

        if dim is not None and dim != codec.dim:
            raise IndexFormatError(f"ColBERT codec of {folder} has dim {codec.dim}, "
                                   f"the model {dim}")
        paths = _store_paths(folder, prefix, ("codes", "residuals", "offsets"))
        c_shape, _, _ = read_npy_header(paths["codes"], np.uint16, (None,))
        read_npy_header(paths["residuals"], np.uint8, (c_shape[0], codec.residual_bytes))
        read_npy_header(paths["offsets"], np.int64, (None if n_docs is None else n_docs + 1,))
        offsets = _load_offsets(paths["offsets"], c_shape[0], mmap)
        if check:
            for chunk in npy_chunks(paths["codes"], np.uint16, CHECK_CHUNK):
                if int(chunk.max()) >= codec.k:
                    raise IndexFormatError(f"index file corrupted: {paths['codes']} holds a "
                                           f"centroid id {int(chunk.max())} >= k={codec.k}")
        codes = load_npy(paths["codes"], mmap=mmap)
        residuals = load_npy(paths["residuals"], mmap=mmap)
        return cls(codes.reshape(-1), residuals.reshape(c_shape[0], codec.residual_bytes),
                   offsets, codec)

    def _prepare(self, q: np.ndarray) -> np.ndarray:
        return self.codec.rotate(q)

    def _native_range(self, lo: int, hi: int) -> np.ndarray:
        return self.codec.decode_native(self.codes[lo:hi], self.residuals[lo:hi])

    def _query_args(self, Q: np.ndarray, q_offsets: np.ndarray) -> tuple:
        """Without renormalisation, a score splits into the query row against the token's base
        (``cs``, one product per centroid) plus the coded dimensions, which the kernel adds up
        from nibble tables (:mod:`_nibbles`): ``(tables, q_off8, q_len, cs)``, rows padded to
        a multiple of 8, ``cs`` each query's ``(k, rows)`` flat."""
        if self.codec.renorm:
            q4, q_off4, q_len = _pad_queries(self._prepare(Q), q_offsets)
            return _readonly(q4), _readonly(q_off4), _readonly(q_len), None
        q8, q_off8, q_len = _pad_queries(np.ascontiguousarray(Q, dtype=np.float32), q_offsets,
                                         _nibbles.LANES)
        coded, cs = self.codec.split_query(q8)
        weights, first, count = self.codec.nibble_layout()
        tab = _nibbles.empty_tables(q8.shape[0] * 16 * weights.shape[0])
        if q8.shape[0]:
            build = (_nibbles.build_tables_parallel if q_len.shape[0] >= PARALLEL_MIN_QUERIES
                     and numba.get_num_threads() > 1 else _nibbles.build_tables)
            build(_readonly(np.ascontiguousarray(coded.T)), _readonly(q_off8), weights, first,
                  count, tab)
        if q_off8.shape[0] == 2:
            cs_t = cs.T
        else:
            cs_t = np.concatenate([cs[a:z].T.ravel() for a, z in zip(q_off8[:-1], q_off8[1:])])
        return (_readonly(tab), _readonly(q_off8), _readonly(q_len),
                _readonly(np.ascontiguousarray(cs_t).reshape(-1)))

    def _query_groups(self, q_offsets: np.ndarray) -> list[tuple[int, int]]:
        """Queries ``[a, z)`` whose nibble tables (16 KiB a query row at d=1024, res1) take at
        most ``LUT_BATCH_BYTES`` together (a query alone may take more)."""
        if self.codec.renorm:
            return super()._query_groups(q_offsets)
        per_row = 16 * 4 * self.codec.nibble_layout()[0].shape[0]
        rows = np.diff(q_offsets) + _nibbles.LANES  # at most this many once padded
        groups, a, used = [], 0, 0
        for z, r in enumerate(rows.tolist()):
            if z > a and used + r * per_row > LUT_BATCH_BYTES:
                groups.append((a, z))
                a, used = z, 0
            used += r * per_row
        groups.append((a, rows.shape[0]))
        return groups

    def _kernel(self, args, cand, out, n_chunks, nbytes=None):
        q4, q_off4, q_len, owner, cs = args
        if cs is not None:
            res = self.residuals
            nbytes = res.shape[1] if nbytes is None else nbytes
            tail = (cs, self.codec.k, self.codes, res, nbytes, self.offsets, cand)
            if n_chunks:
                _lut_parallel(q4, q_off4, q_len, owner, *tail, n_chunks, out)
            else:
                _lut_range(q4, q_off4, q_len, owner, *tail, 0, cand.shape[0], out)
            return
        args = args[:4]
        tail = (self.codes, self.residuals, *self.codec.kernel_tables(), self.offsets, cand)
        if n_chunks:
            _coded_parallel(*args, *tail, n_chunks, out)
        else:
            _coded_range(*args, *tail, 0, cand.shape[0], out)

    def decode_range(self, lo: int, hi: int) -> np.ndarray:
        """Tokens ``[lo, hi)`` decoded to ``(hi - lo, d)`` float32."""
        return self.codec.decode(self.codes[lo:hi], self.residuals[lo:hi])

    def _has_first_stage(self) -> bool:
        return self.codec.k <= FIRST_STAGE_MAX_K

    def _blocked_pays(self) -> bool:
        # the nibble-table kernel won at every query length measured (32 to 1,024 vectors)
        return self.codec.renorm

    def _refines(self) -> bool:
        return self.codec.transform and not self.codec.renorm

    def _leading_bytes(self, dims: int) -> int:
        """Residual bytes of the leading ``dims`` coded dimensions (at a byte boundary of the
        last section kept; earlier sections whole, so byte offsets hold)."""
        n4, n2, _ = self.codec.sections
        dims = max(0, int(dims))
        if dims <= n4:
            return dims // 2
        if dims <= n4 + n2:
            return n4 // 2 + (dims - n4) // 4
        return min(self.residuals.shape[1], n4 // 2 + n2 // 4 + (dims - n4 - n2) // 8)

    def partial_maxsim(self, q: np.ndarray, cand: np.ndarray, dims: int = REFINE_DIMS) -> np.ndarray:
        """MaxSim of one query ``(m, d)`` against rows ``cand`` ``(c,)`` with every token cut to
        its base (centroid + bucket 0) plus its leading ``dims`` coded dimensions (the rest at
        bucket 0): ``(c,)`` float32, an approximation for ranking (exact when ``dims`` covers
        every coded dimension). A renormalising codec has no split: exact scores."""
        if not self._refines():
            return self.maxsim(q, cand)
        q = _check_vectors(q, self.dim, "q")
        cand = self._check_cand(cand)
        out = np.zeros(cand.shape[0], np.float32)
        if cand.size == 0:
            return out
        args = _with_owner(self._query_args(q, np.array([0, q.shape[0]], np.int64)), cand)
        nbytes = self._leading_bytes(dims)
        threads = numba.get_num_threads()
        if threads == 1 or cand.shape[0] < 64:
            self._kernel(args, _readonly(cand), out, 0, nbytes)
        else:
            old = numba.set_parallel_chunksize(1)
            try:
                self._kernel(args, _readonly(cand), out, min(8 * threads, cand.shape[0]), nbytes)
            finally:
                numba.set_parallel_chunksize(old)
        return out

    def centroid_sets(self) -> tuple[np.ndarray, np.ndarray]:
        """``(bits, empty)``: each document's set of centroid ids, ``(n_docs, ceil(k / 64))``
        uint64 (:func:`centroid_stage.centroid_bits`), and ``(n_docs,)`` bool documents without
        tokens. Built on first use from the codes (one pass, about 32 MB per 1M documents at
        k = 256) and kept; thread-safe."""
        sets = self._sets
        if sets is None:
            with self._sets_lock:
                sets = self._sets
                if sets is None:
                    bits = centroid_stage.centroid_bits(self.codes, self.offsets, self.codec.k)
                    empty = np.diff(np.asarray(self.offsets)) == 0
                    sets = self._sets = (_readonly(bits), _readonly(empty))
        return sets

    def centroid_table(self, q: np.ndarray) -> centroid_stage.Quantised:
        """The first stage's quantised query x centroid scores of ``q`` ``(m, d)``; equal for
        every store of one codec (pass it to :meth:`first_stage` of each)."""
        q = _check_vectors(q, self.dim, "q")
        return centroid_stage.Quantised(q @ self.codec.centroids.T)

    def first_stage(self, q: np.ndarray, n: int, allowed: np.ndarray | None = None, *,
                    table: centroid_stage.Quantised | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
        if not self._has_first_stage():
            return super().first_stage(q, n, allowed)
        allowed = self._check_search(n, allowed)
        if table is None:
            table = self.centroid_table(q)
        elif table.table.shape[0] != self.codec.k:
            raise ValueError(f"table has {table.table.shape[0]} centroids, the codec {self.codec.k}")
        bits, empty = self.centroid_sets()
        threads = numba.get_num_threads()
        old = numba.set_parallel_chunksize(1)
        try:
            rows, ints = centroid_stage.top_candidates(bits, empty, table, n, allowed, threads)
        finally:
            numba.set_parallel_chunksize(old)
        order = np.lexsort((rows, -ints))
        return rows[order], table.dequantise(ints[order])

    def doc_vectors(self, row: int) -> np.ndarray:
        """Decoded ``(n, d)`` float32 tokens of doc ``row``."""
        return self.decode_range(int(self.offsets[row]), int(self.offsets[row + 1]))


def _store_paths(folder, prefix: str, names) -> dict[str, Path]:
    folder = Path(folder)
    paths = {name: folder / f"{prefix}_{name}.npy" for name in names}
    for path in paths.values():
        if not os.path.lexists(path):
            raise IndexFormatError(f"missing {path}; was this segment saved with "
                                   f"prefix {prefix!r}?")
    return paths


def _load_offsets(path: Path, total: int, mmap: bool) -> np.ndarray:
    from hybridsearch.index.storage import load_npy

    offsets = load_npy(path, mmap=mmap)
    try:
        _check_offsets(offsets, total, str(path))
    except ValueError as e:
        raise IndexFormatError(str(e)) from None
    return offsets


class _NpyWriter:
    """A ``.npy`` file of known dtype and shape written a chunk of rows at a time (no mapping,
    so memory stays at one chunk); :meth:`close` checks the row count and fsyncs."""

    def __init__(self, path: Path, dtype, shape: tuple):
        self.path, self.dtype, self.shape, self.rows = path, np.dtype(dtype), shape, 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        self.f = os.fdopen(fd, "wb")
        np.lib.format.write_array_header_1_0(self.f, {
            "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
            "shape": shape})

    def write(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=self.dtype)
        if a.shape[1:] != self.shape[1:] or self.rows + a.shape[0] > self.shape[0]:
            raise ValueError(f"{self.path}: chunk {a.shape} does not fit {self.shape} "
                             f"after {self.rows} rows")
        self.f.write(memoryview(a.reshape(-1)).cast("B"))
        self.rows += a.shape[0]

    def close(self, complete: bool = True) -> None:
        try:
            if complete:
                if self.rows != self.shape[0]:
                    raise ValueError(f"{self.path}: wrote {self.rows} rows of {self.shape[0]}")
                self.f.flush()
                os.fsync(self.f.fileno())
        finally:
            self.f.close()


def _token_index(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token positions of ``rows`` in order ``(sum n,)`` int64 and their local offsets."""
    starts = np.asarray(offsets[rows], np.int64)
    lengths = np.asarray(offsets[rows + 1], np.int64) - starts
    local = np.zeros(rows.shape[0] + 1, np.int64)
    np.cumsum(lengths, out=local[1:])
    idx = np.arange(local[-1], dtype=np.int64) + np.repeat(starts - local[:-1], lengths)
    return idx, local


def _row_groups(lengths: np.ndarray, budget: int):
    """Consecutive ``[i, j)`` slices of rows holding about ``budget`` tokens (at least one row)."""
    cum = np.concatenate([[0], np.cumsum(lengths)])
    i = 0
    while i < lengths.shape[0]:
        j = int(np.searchsorted(cum, cum[i] + budget, side="right")) - 1
        j = min(max(j, i + 1), lengths.shape[0])
        yield i, j
        i = j


def write_colbert(folder: str | Path, prefix: str, sources, codec: ColbertCodec | None,
                  chunk_tokens: int = 1 << 18, *, dim: int | None = None) -> dict[str, None]:
    """Stream the ColBERT tokens of some documents of some stores into new files (merges).

    Args:
        folder: existing folder to write ``{prefix}_*.npy`` into.
        sources: iterable of ``(store, rows)``: a :class:`ColbertStore` or
            :class:`CodedColbertStore` and the ``(k,)`` integer rows of it to keep; the output
            holds those documents' tokens, source after source, row after row.
        codec: ``None`` writes float16 (``{prefix}_vectors.npy``); a codec writes
            ``{prefix}_codes.npy`` and ``{prefix}_residuals.npy``. Codes of a source with the
            same ``codec.identity`` are copied verbatim; float16 sources are encoded; codes of
            another codec are decoded then encoded again. Tokens are pooled on the way when the
            codec pools more than the source did (a pooled source is never un-pooled).
        chunk_tokens: codes copied per step; float16 and decoded float32 steps are also capped
            at ``WRITE_FLOAT_CHUNK_BYTES`` (64 MiB), so memory is bounded whatever the total
            (about 160 MiB peak measured for 300k 1024-d tokens, float16 -> res1).
        dim: needed only when ``sources`` is empty and ``codec`` is None.

    Returns:
        ``{file name: None}`` of the files written (each fsynced; fsync the folder after).
    """
    folder = Path(folder)
    plans = []
    for store, rows in sources:
        if not isinstance(store, (ColbertStore, CodedColbertStore)):
            raise TypeError(f"sources must hold ColbertStore or CodedColbertStore, got {type(store)}")
        plans.append((store, store._check_cand(rows)))
    if codec is not None:
        dim = codec.dim
    elif plans:
        dim = plans[0][0].dim
    elif dim is None:
        raise ValueError("write_colbert needs dim when there are no sources and no codec")
    budget = max(1, int(chunk_tokens))
    float_budget = max(1, min(budget, WRITE_FLOAT_CHUNK_BYTES // (4 * dim)))
    lengths_out = []
    for store, rows in plans:
        if store.dim != dim:
            raise ValueError(f"a source store has dim {store.dim}, the output {dim}")
        n = store.offsets[rows + 1] - store.offsets[rows]
        f = _pool_factor(store, codec)
        lengths_out.append(-(-n // f) if f > 1 else np.asarray(n, np.int64))
    offsets = np.zeros(sum(len(r) for _, r in plans) + 1, np.int64)
    if plans:
        np.cumsum(np.concatenate(lengths_out), out=offsets[1:])
    total = int(offsets[-1])
    if codec is None:
        writers = {"vectors": _NpyWriter(folder / f"{prefix}_vectors.npy", np.float16, (total, dim))}
    else:
        writers = {"codes": _NpyWriter(folder / f"{prefix}_codes.npy", np.uint16, (total,)),
                   "residuals": _NpyWriter(folder / f"{prefix}_residuals.npy", np.uint8,
                                           (total, codec.residual_bytes))}
    writers["offsets"] = _NpyWriter(folder / f"{prefix}_offsets.npy", np.int64, offsets.shape)
    ok = False
    try:
        writers["offsets"].write(offsets)
        for store, rows in plans:
            _copy_source(store, rows, codec, writers, budget, float_budget)
        ok = True
    finally:
        for w in writers.values():
            w.close(complete=ok)
    return {w.path.name: None for w in writers.values()}


def _pool_factor(store, codec: ColbertCodec | None) -> int:
    have = store.codec.pool if store.codec is not None else 1
    want = codec.pool if codec is not None else 1
    return want // have if want > have else 1


def _copy_source(store, rows, codec, writers, budget, float_budget) -> None:
    same = (codec is not None and store.codec is not None
            and store.codec.identity == codec.identity)
    verbatim = same or (codec is None and store.codec is None)
    factor = _pool_factor(store, codec)
    lengths = store.offsets[rows + 1] - store.offsets[rows]
    if verbatim and not same:  # float16 rows: 2 * dim bytes a token
        budget = max(1, min(budget, 2 * float_budget))
    for i, j in _row_groups(lengths, budget if verbatim else float_budget):
        idx, local = _token_index(store.offsets, rows[i:j])
        if same:
            writers["codes"].write(store.codes[idx])
            writers["residuals"].write(store.residuals[idx])
            continue
        if verbatim:
            writers["vectors"].write(store.vectors[idx])
            continue
        if store.codec is None:
            x = _float32(store.vectors[idx])
        else:
            x = store.codec.decode(store.codes[idx], store.residuals[idx])
        if factor > 1:
            x, _ = pool_tokens(x, local, factor)
        if codec is None:
            writers["vectors"].write(x.astype(np.float16))
        else:
            ids, res = codec.encode(x)
            writers["codes"].write(ids)
            writers["residuals"].write(res)


# Work items per thread handed out by maxsim_many: enough that a thread slowed by other load
# takes fewer, few enough that dispatch stays small next to a ~1 ms item.
MANY_ITEMS_PER_THREAD = 4
_POOL_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def _forget_pool() -> None:
    # A forked child has none of the parent's pool threads: it must build its own pool (and its
    # own lock, which a parent thread may have held at the fork).
    global _POOL, _POOL_SIZE, _POOL_LOCK
    _POOL, _POOL_SIZE, _POOL_LOCK = None, 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _pool(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``threads`` workers (rebuilt when the thread count changes)."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE != threads:
            old = _POOL
            _POOL = ThreadPoolExecutor(threads, thread_name_prefix="hybridsearch-maxsim")
            _POOL_SIZE = threads
            if old is not None:
                old.shutdown(wait=False)
        return _POOL


def _with_owner(args, rows):
    """Query args of one query (``_query_args``) -> kernel args for ``rows``."""
    q4, q_off4, q_len, extra = args
    return q4, q_off4, q_len, _readonly(np.zeros(rows.shape[0], np.int64)), extra


def maxsim_many(q: np.ndarray, parts) -> list[np.ndarray]:
    """MaxSim of one query against rows of several stores (the segments of an index) in one
    parallel pass: :meth:`_MaxSimStore.maxsim` per part, equal scores.

    One store at a time would open one parallel region per segment, each too small to keep
    every thread busy (and waiting on its slowest thread); here every part is cut into chunks of
    about equal tokens, and a process-wide pool of ``numba.get_num_threads()`` threads runs the
    serial kernels (which release the GIL) over all of them.

    Args:
        q: ``(m, d)`` float query vectors.
        parts: sequence of ``(store, rows)``: a :class:`ColbertStore` or
            :class:`CodedColbertStore` and the ``(c,)`` integer rows to score in it.

    Returns:
        One ``(c,)`` float32 array per part.
    """
    parts = list(parts)
    outs, jobs, total, m = [], [], 0, 0
    prepared = {}
    for store, rows in parts:
        if not isinstance(store, _MaxSimStore):
            raise TypeError(f"parts must hold ColBERT stores, got {type(store)}")
        qs = _check_vectors(q, store.dim, "q")
        rows = store._check_cand(rows)
        out = np.zeros(rows.shape[0], np.float32)
        outs.append(out)
        m = qs.shape[0]
        if rows.size == 0 or m == 0:
            continue
        key = id(store.codec)  # stores sharing a codec share its prepared query
        if key not in prepared:
            prepared[key] = (store.codec, store._query_args(qs, np.array([0, qs.shape[0]], np.int64)))
        lengths = store.offsets[rows + 1] - store.offsets[rows]
        total += int(lengths.sum())
        jobs.append((store, prepared[key][1], rows, lengths, out))
    if not jobs:
        return outs
    threads = numba.get_num_threads()
    if threads == 1 or total * m * jobs[0][0].dim < PARALLEL_MIN_FLOPS:
        for store, args, rows, _, out in jobs:
            store._kernel(_with_owner(args, rows), _readonly(rows), out, 0)
        return outs
    step = max(1, total // (MANY_ITEMS_PER_THREAD * threads))
    items = []
    for store, args, rows, lengths, out in jobs:
        ends = np.searchsorted(np.cumsum(lengths), np.arange(step, int(lengths.sum()) + step, step),
                               side="left") + 1
        lo = 0
        for hi in np.unique(np.minimum(ends, rows.shape[0])):
            if hi > lo:
                items.append((store, args, rows[lo:hi], out[lo:hi]))
                lo = int(hi)
        if lo < rows.shape[0]:
            items.append((store, args, rows[lo:], out[lo:]))

    def run(item):
        store, args, rows, out = item
        store._kernel(_with_owner(args, rows), _readonly(rows), out, 0)

    for _ in _pool(threads).map(run, items):
        pass
    return outs


def coded_maxsim_reference(q: np.ndarray, store: CodedColbertStore, cand) -> np.ndarray:
    """Plain numpy MaxSim on codes: decode each candidate with the codec's numpy reference,
    then :func:`maxsim_reference`."""
    docs = []
    for c in np.asarray(cand, np.int64):
        lo, hi = int(store.offsets[c]), int(store.offsets[c + 1])
        docs.append(store.codec.decode_reference(store.codes[lo:hi], store.residuals[lo:hi]))
    return maxsim_reference(q, docs)


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
