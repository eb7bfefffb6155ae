"""Learned-sparse retrieval over one immutable segment: an inverted index scored by Numba.

The index is the transpose of the documents' ``(n_docs, V)`` lexical-weight matrix, stored as
postings per term. A query is scored term-at-a-time into a float32 accumulator, in the order of
the query's CSR entries, which is the order scipy's ``q @ D.T`` uses, without fused
multiply-adds: :meth:`search`, :meth:`score` and :func:`brute_force_topk` compute the same
float32 sums (bit-identical on the machines tested), so their rankings agree.

Conventions shared by every function here: a document is a hit only if its score is positive
(it shares a token with the query) and it is allowed; ties are broken by the lower row; result
slots beyond the hits hold score ``0`` and id ``-1``.

Files written by :meth:`SparsePostings.save` (all plain ``.npy``, never pickled):
``{prefix}_indptr.npy``, ``{prefix}_docs.npy``, ``{prefix}_weights.npy``,
``{prefix}_term_max.npy`` and ``{prefix}_n_docs.npy`` (a 0-d int64: trailing empty documents
cannot be derived from the postings).
"""

from __future__ import annotations

import os
from pathlib import Path

import numba
import numpy as np
import scipy.sparse as sp
from numba import njit, prange

from hybridsearch.errors import IndexFormatError

# Accumulators of this many float32 fit in L2; bigger segments are scored block by block, which
# also lets a single query use several threads.
BLOCK_DOCS = 1 << 16
# Below this many postings (a few ms of work) a batch is scored on the calling thread: waking
# the pool costs microseconds on an idle machine but milliseconds on a busy one.
PARALLEL_MIN_POSTINGS = 1 << 20


@njit(cache=True, inline="always")
def _worse(s_a, i_a, s_b, i_b):
    return s_a < s_b or (s_a == s_b and i_a > i_b)


@njit(cache=True)
def _sift_down(hs, hi, size, pos):
    # Min-heap on "worse first", so the root is the entry the next better hit evicts.
    while True:
        child = 2 * pos + 1
        if child >= size:
            return
        if child + 1 < size and _worse(hs[child + 1], hi[child + 1], hs[child], hi[child]):
            child += 1
        if not _worse(hs[child], hi[child], hs[pos], hi[pos]):
            return
        hs[pos], hs[child] = hs[child], hs[pos]
        hi[pos], hi[child] = hi[child], hi[pos]
        pos = child


@njit(cache=True)
def _heap_push(hs, hi, size, k, s, i):
    """Offer ``(s, i)`` to a heap of ``size`` <= ``k`` entries; returns the new size."""
    if size < k:
        pos = size
        hs[pos] = s
        hi[pos] = i
        while pos > 0:
            parent = (pos - 1) // 2
            if not _worse(hs[pos], hi[pos], hs[parent], hi[parent]):
                break
            hs[pos], hs[parent] = hs[parent], hs[pos]
            hi[pos], hi[parent] = hi[parent], hi[pos]
            pos = parent
        return size + 1
    if _worse(hs[0], hi[0], s, i):
        hs[0] = s
        hi[0] = i
        _sift_down(hs, hi, size, 0)
    return size


@njit(cache=True)
def _heap_drain(hs, hi, size, out_s, out_i):
    """Write the heap best-first into ``out_s``/``out_i`` (length k), padding with 0 / -1."""
    out_s[:] = 0.0
    out_i[:] = -1
    while size > 0:
        size -= 1
        out_s[size] = hs[0]
        out_i[size] = hi[0]
        hs[0] = hs[size]
        hi[0] = hi[size]
        _sift_down(hs, hi, size, 0)


@njit(cache=True)
def _search_items(indptr, docs, weights, q_indptr, q_idx, q_w, allowed, use_allowed,
                  n_docs, block, n_blocks, item_lo, item_hi, out_s, out_i):
    """Score work items ``[item_lo, item_hi)``; item ``q * n_blocks + b`` is query ``q`` over the
    docs of block ``b``. Writes each item's top-k (k = out_s.shape[1]) into its output row."""
    k = out_s.shape[1]
    acc = np.zeros(block, np.float32)
    touched = np.empty(block, np.int32)
    hs = np.empty(k, np.float32)
    hi = np.empty(k, np.int64)
    max_terms = 0
    for item in range(item_lo, item_hi):
        q = item // n_blocks
        max_terms = max(max_terms, q_indptr[q + 1] - q_indptr[q])
    starts = np.empty(max_terms, np.int64)
    ends = np.empty(max_terms, np.int64)
    for item in range(item_lo, item_hi):
        q = item // n_blocks
        d_lo = (item % n_blocks) * block
        width = min(d_lo + block, n_docs) - d_lo
        e0 = q_indptr[q]
        n_terms = q_indptr[q + 1] - e0
        total = 0
        for e in range(n_terms):
            t = q_idx[e0 + e]
            p_lo = indptr[t]
            p_hi = indptr[t + 1]
            if n_blocks > 1:
                p_lo += np.searchsorted(docs[p_lo:p_hi], d_lo)
                p_hi = p_lo + np.searchsorted(docs[p_lo:p_hi], d_lo + width)
            starts[e] = p_lo
            ends[e] = p_hi
            total += p_hi - p_lo
        size = 0
        if total * 4 >= width:
            # Dense regime: most docs get touched, so skip the bookkeeping and scan them all.
            for e in range(n_terms):
                w = q_w[e0 + e]
                for p in range(starts[e], ends[e]):
                    # Unsigned: skips numba's negative-index wraparound on the hot path.
                    acc[np.uint32(docs[p] - d_lo)] += w * weights[p]
            for d in range(width):
                s = acc[d]
                # Most docs lose to the current k-th best: test that before any heap work.
                if s <= 0.0 or (size == k and (s < hs[0] or (s == hs[0] and d_lo + d > hi[0]))):
                    continue
                if use_allowed and not allowed[d_lo + d]:
                    continue
                size = _heap_push(hs, hi, size, k, s, np.int64(d_lo + d))
            acc[:width] = 0.0
        else:
            n_touched = 0
            for e in range(n_terms):
                w = q_w[e0 + e]
                for p in range(starts[e], ends[e]):
                    d = np.uint32(docs[p] - d_lo)
                    old = acc[d]
                    new = old + w * weights[p]
                    acc[d] = new
                    # Weights are >= 0, so a doc leaves 0 at most once: recorded exactly once.
                    if old == 0.0 and new > 0.0:
                        touched[n_touched] = d
                        n_touched += 1
            for j in range(n_touched):
                d = touched[j]
                s = acc[d]
                acc[d] = 0.0
                if size == k and (s < hs[0] or (s == hs[0] and d_lo + d > hi[0])):
                    continue
                if use_allowed and not allowed[d_lo + d]:
                    continue
                size = _heap_push(hs, hi, size, k, s, np.int64(d_lo + d))
        _heap_drain(hs, hi, size, out_s[item], out_i[item])


@njit(cache=True, parallel=True)
def _search_parallel(indptr, docs, weights, q_indptr, q_idx, q_w, allowed, use_allowed,
                     n_docs, block, n_blocks, n_chunks, out_s, out_i):
    n_items = out_s.shape[0]
    for c in prange(n_chunks):
        _search_items(indptr, docs, weights, q_indptr, q_idx, q_w, allowed, use_allowed,
                      n_docs, block, n_blocks, c * n_items // n_chunks,
                      (c + 1) * n_items // n_chunks, out_s, out_i)


@njit(cache=True)
def _merge_blocks(part_s, part_i, n_blocks, out_s, out_i):
    """Top-k of each query over its ``n_blocks`` consecutive rows of partial results."""
    k = out_s.shape[1]
    hs = np.empty(k, np.float32)
    hi = np.empty(k, np.int64)
    for q in range(out_s.shape[0]):
        size = 0
        for r in range(q * n_blocks, (q + 1) * n_blocks):
            for j in range(k):
                if part_i[r, j] < 0:
                    break
                size = _heap_push(hs, hi, size, k, part_s[r, j], part_i[r, j])
        _heap_drain(hs, hi, size, out_s[q], out_i[q])


@njit(cache=True)
def _score_candidates(indptr, docs, weights, q_idx, q_w, cand):
    order = np.argsort(cand, kind="mergesort")
    out = np.zeros(cand.shape[0], np.float32)
    for e in range(q_idx.shape[0]):
        w = q_w[e]
        t = q_idx[e]
        p = indptr[t]
        p_hi = indptr[t + 1]
        # Candidates are visited in increasing row order, so each search resumes where the last
        # one stopped: a merge of the posting list with the sorted candidates.
        for j in range(order.shape[0]):
            if p >= p_hi:
                break
            c = order[j]
            p += np.searchsorted(docs[p:p_hi], cand[c])
            if p < p_hi and docs[p] == cand[c]:
                out[c] += w * weights[p]
    return out


@njit(cache=True)
def _count_part(indptr, indices, data, n_parts, r, counts, maxima):
    """Non-zero entries per term, and their largest weight, among the docs of range ``r`` of
    ``n_parts``: accumulated into ``counts`` and ``maxima`` ``(V,)``."""
    n_docs = indptr.shape[0] - 1
    for p in range(indptr[r * n_docs // n_parts], indptr[(r + 1) * n_docs // n_parts]):
        t = np.uint32(indices[p])
        w = data[p]
        counts[t] += w != 0.0  # branch-free: twice as fast
        maxima[t] = max(maxima[t], w)


@njit(cache=True)
def _scatter_part(indptr, indices, data, n_parts, r, fill, docs, weights):
    """Second half of the counting-sort transpose for doc range ``r``: it writes each term's
    postings from ``fill[t]`` on, after those of earlier ranges, so rows come out ascending."""
    n_docs = indptr.shape[0] - 1
    for d in range(r * n_docs // n_parts, (r + 1) * n_docs // n_parts):
        for p in range(indptr[d], indptr[d + 1]):
            w = data[p]
            if w != 0.0:
                # Unsigned indices skip numba's negative-index wraparound: ~30% here.
                t = np.uint32(indices[p])
                f = np.uint64(fill[t])
                docs[f] = d
                weights[f] = w
                fill[t] += 1


@njit(cache=True, parallel=True)
def _count_parallel(indptr, indices, data, counts, maxima):
    for r in prange(counts.shape[0]):
        _count_part(indptr, indices, data, counts.shape[0], r, counts[r], maxima[r])


@njit(cache=True, parallel=True)
def _scatter_parallel(indptr, indices, data, fill, docs, weights):
    for r in prange(fill.shape[0]):
        _scatter_part(indptr, indices, data, fill.shape[0], r, fill[r], docs, weights)


@njit(cache=True)
def _offsets(counts, indptr, fill):
    """Term pointers from per-range counts ``(n_parts, V)``, and where each range starts
    writing each term: after the earlier ranges' postings of that term."""
    pos = 0
    for t in range(counts.shape[1]):
        indptr[t] = pos
        for r in range(counts.shape[0]):
            fill[r, t] = pos
            pos += counts[r, t]
    indptr[counts.shape[1]] = pos


def _transpose(csr: sp.csr_matrix, n_parts: int):
    """(indptr, docs, weights, term_max) of the postings of a canonical float32 CSR."""
    vocab = csr.shape[1]
    counts = np.zeros((n_parts, vocab), np.int32)  # a term has < 2**31 docs per range
    maxima = np.zeros((n_parts, vocab), np.float32)
    if n_parts == 1:
        _count_part(csr.indptr, csr.indices, csr.data, 1, 0, counts[0], maxima[0])
    else:
        _count_parallel(csr.indptr, csr.indices, csr.data, counts, maxima)
    indptr = np.empty(vocab + 1, np.int64)
    # int32 positions where they fit: half the cache footprint of the scatter's hot array.
    fill = np.empty((n_parts, vocab), np.int32 if csr.nnz < 2**31 else np.int64)
    _offsets(counts, indptr, fill)
    nnz = int(indptr[-1])
    # Allocated by numpy, which asks for huge pages: the scatter is TLB-bound without them.
    docs = np.empty(nnz, np.int32)
    weights = np.empty(nnz, np.float32)
    if n_parts == 1:
        _scatter_part(csr.indptr, csr.indices, csr.data, 1, 0, fill[0], docs, weights)
    else:
        _scatter_parallel(csr.indptr, csr.indices, csr.data, fill, docs, weights)
    term_max = maxima[0] if n_parts == 1 else maxima.max(axis=0)
    return indptr, docs, weights, term_max


def _readonly(a: np.ndarray) -> np.ndarray:
    # Kernels always see read-only arrays (as loaded memmaps are), so each compiles once.
    v = np.asarray(a).view()
    v.flags.writeable = False
    return v


def _as_query_csr(q, vocab_size: int) -> sp.csr_matrix:
    if not sp.issparse(q):
        raise TypeError(f"queries must be a scipy.sparse CSR matrix (nq, {vocab_size}), "
                        f"got {type(q)}")
    if q.ndim != 2 or q.shape[1] != vocab_size:
        raise ValueError(f"queries have shape {q.shape}; "
                         f"this index has a vocabulary of {vocab_size}")
    if not np.issubdtype(q.dtype, np.floating):
        raise TypeError(f"query weights must be floating point, got {q.dtype}")
    if q.format != "csr" or q.dtype != np.float32:
        q = sp.csr_matrix(q, dtype=np.float32)
    if q.nnz and not q.data.min() >= 0:  # also catches NaN, which min() propagates
        raise ValueError("query weights must be >= 0 and not NaN "
                         "(learned-sparse weights are non-negative)")
    return q


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def _check_allowed(allowed, n_docs: int) -> tuple[np.ndarray, bool]:
    if allowed is None:
        return np.zeros(0, np.bool_), False
    allowed = np.asarray(allowed)
    if allowed.dtype != np.bool_:
        raise TypeError(f"allowed must be a bool mask, got dtype {allowed.dtype}")
    if allowed.shape != (n_docs,):
        raise ValueError(f"allowed has shape {allowed.shape}, expected ({n_docs},)")
    return np.ascontiguousarray(allowed), True


def _check_postings(paths: dict, indptr: np.ndarray, n_docs: int, chunks) -> None:
    """One chunked pass over the postings: doc ids in ``[0, n_docs)``, strictly ascending inside
    each posting list (the blocked search binary-searches them), weights finite and >= 0 (the
    kernel records a touched doc once because weights never decrease a score)."""
    # A posting may not exceed its predecessor only where a new list starts. indptr was checked
    # non-decreasing, so its inner values are the sorted list starts (repeats for empty lists).
    starts = indptr[1:-1]
    pos, prev = 0, None
    for a in chunks(paths["docs"], np.int32):
        if a.min() < 0 or a.max() >= n_docs:
            raise IndexFormatError(f"{paths['docs']}: document ids must lie in [0, {n_docs})")
        bad = pos + 1 + np.flatnonzero(a[1:] <= a[:-1])
        if prev is not None and a[0] <= prev:
            bad = np.concatenate([[pos], bad])
        if bad.size:
            at = np.searchsorted(starts, bad)
            if not (at < starts.size).all() or not (starts[np.minimum(at, starts.size - 1)] == bad).all():
                raise IndexFormatError(f"{paths['docs']}: document ids must ascend strictly within "
                                       "each posting list")
        prev = a[-1]
        pos += a.size
    for w in chunks(paths["weights"], np.float32):
        if not (w.min() >= 0 and w.max() < np.inf):  # min() is NaN if any is
            raise IndexFormatError(f"{paths['weights']}: weights must be finite and >= 0")


class SparsePostings:
    """Inverted index of one segment's learned-sparse weights.

    Attributes:
        indptr: ``(V + 1,)`` int64; term ``t`` owns postings ``indptr[t]:indptr[t + 1]``.
        docs: ``(nnz,)`` int32 local document rows, strictly ascending within each term.
        weights: ``(nnz,)`` float32 positive document weights, aligned with ``docs``.
        term_max: ``(V,)`` float32 largest weight of each term (0 for unused terms), an upper
            bound for pruning.
        n_docs: number of documents (rows) in the segment, empty ones included.
    """

    def __init__(self, indptr, docs, weights, term_max, n_docs: int):
        self.indptr = _readonly(indptr)
        self.docs = _readonly(docs)
        self.weights = _readonly(weights)
        self.term_max = _readonly(term_max)
        self.n_docs = int(n_docs)

    @property
    def vocab_size(self) -> int:
        return int(self.indptr.shape[0] - 1)

    @classmethod
    def from_csr(cls, csr) -> SparsePostings:
        """Build from a ``(n_docs, V)`` scipy CSR of float weights (explicit zeros dropped)."""
        if not sp.issparse(csr) or csr.ndim != 2:
            raise TypeError(f"from_csr needs a 2-d scipy.sparse matrix, got {type(csr)}")
        if not np.issubdtype(csr.dtype, np.floating):
            raise TypeError(f"document weights must be floating point, got {csr.dtype}")
        n_docs, vocab = csr.shape
        if n_docs >= 2**31 or vocab >= 2**31:
            raise ValueError("a segment holds fewer than 2**31 documents and terms (int32 ids)")
        csr = sp.csr_matrix(csr, dtype=np.float32)
        if csr.nnz and not (0 <= int(csr.indices.min()) and int(csr.indices.max()) < vocab):
            raise ValueError(f"term ids must lie in [0, {vocab}) (the matrix's width), got "
                             f"{int(csr.indices.min())}..{int(csr.indices.max())}")
        if not csr.has_canonical_format:  # repeated (doc, term) entries would repeat postings
            csr = csr.copy()
            csr.sum_duplicates()
        if csr.nnz and not csr.data.min() >= 0:  # also catches NaN, which min() propagates
            raise ValueError("document weights must be >= 0 and not NaN "
                             "(learned-sparse weights are non-negative)")
        # Parallel only where the pool wake-up is negligible next to the work.
        n_parts = numba.get_num_threads() if csr.nnz >= PARALLEL_MIN_POSTINGS else 1
        return cls(*_transpose(csr, n_parts), n_docs)

    def save(self, folder: str | Path, prefix: str = "sparse") -> None:
        """Write the five ``{prefix}_*.npy`` files of the module docstring into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, arr in self._files().items():
            np.save(folder / f"{prefix}_{name}.npy", arr, allow_pickle=False)

    def _files(self) -> dict[str, np.ndarray]:
        return {"indptr": self.indptr, "docs": self.docs, "weights": self.weights,
                "term_max": self.term_max, "n_docs": np.array(self.n_docs, np.int64)}

    @classmethod
    def load(cls, folder: str | Path, prefix: str = "sparse", mmap: bool = True, *,
             vocab_size: int | None = None, n_docs: int | None = None,
             check_postings: bool = True) -> SparsePostings:
        """Open files written by :meth:`save`, treating them as untrusted; with ``mmap`` the
        postings stay on disk until read.

        Before anything is allocated from them: no links, dtypes, shapes and file sizes
        (indptr ``(V + 1,)`` with ``V == vocab_size`` when given, term_max ``(V,)``, docs and
        weights ``(nnz,)``, n_docs 0-d and ``== n_docs`` when given). Then indptr starts at 0,
        never decreases and ends at nnz (O(V)); with ``check_postings`` (one chunked pass over
        the files, leaving no mapped pages) every doc id lies in ``[0, n_docs)`` and ascends
        strictly within its posting list, and every weight is finite and >= 0 -- what the
        kernels rely on to stay inside their buffers. IndexFormatError names the bad file.
        """
        from hybridsearch.index.storage import load_npy, npy_chunks, read_npy_header

        folder = Path(folder)
        paths = {name: folder / f"{prefix}_{name}.npy"
                 for name in ("indptr", "docs", "weights", "term_max", "n_docs")}
        for path in paths.values():
            if not os.path.lexists(path):
                raise IndexFormatError(f"missing {path}; was this segment saved with "
                                       f"prefix {prefix!r}?")
        vocab = None if vocab_size is None else int(vocab_size)
        indptr_shape, _, _ = read_npy_header(paths["indptr"], np.int64,
                                             (None if vocab is None else vocab + 1,))
        docs_shape, _, _ = read_npy_header(paths["docs"], np.int32, (None,))
        weights_shape, _, _ = read_npy_header(paths["weights"], np.float32)
        term_max_shape, _, _ = read_npy_header(paths["term_max"], np.float32)
        if (indptr_shape[0] < 1 or weights_shape != docs_shape
                or term_max_shape != (indptr_shape[0] - 1,)):
            raise IndexFormatError(f"sparse files under {folder} with prefix {prefix!r} are "
                                   f"inconsistent: indptr {indptr_shape}, docs {docs_shape}, "
                                   f"weights {weights_shape}, term_max {term_max_shape}")
        n_file = int(load_npy(paths["n_docs"], mmap=False, dtype=np.int64, shape=()))
        if n_file < 0 or n_file >= 2**31 or (n_docs is not None and n_file != n_docs):
            raise IndexFormatError(f"{paths['n_docs']} says {n_file} documents, expected "
                                   f"{n_docs if n_docs is not None else 'fewer than 2**31'}")
        nnz = docs_shape[0]
        indptr = load_npy(paths["indptr"], mmap=mmap, dtype=np.int64)
        ip = np.asarray(indptr)
        if not (ip[0] == 0 and ip[-1] == nnz and bool((ip[1:] >= ip[:-1]).all())):
            raise IndexFormatError(f"{paths['indptr']}: must start at 0, never decrease and end at "
                                   f"{nnz}; sparse files under {folder} with prefix {prefix!r} "
                                   "are inconsistent")
        if check_postings and nnz:
            _check_postings(paths, ip, n_file, npy_chunks)
        arrs = {name: load_npy(paths[name], mmap=mmap) for name in ("docs", "weights", "term_max")}
        return cls(indptr, arrs["docs"], arrs["weights"], arrs["term_max"], n_file)

    def search(self, q, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by sparse dot product for a batch of queries.

        Args:
            q: ``(nq, V)`` scipy CSR of non-negative float query weights.
            k: number of results per query, >= 1.
            allowed: ``(n_docs,)`` bool mask, False for deleted or filtered-out rows; None
                allows all.

        Returns:
            ``scores`` ``(nq, k)`` float32 and ``ids`` ``(nq, k)`` int64 local rows, best first.
        """
        q = _as_query_csr(q, self.vocab_size)
        k = _check_k(k)
        allowed, use_allowed = _check_allowed(allowed, self.n_docs)
        nq = q.shape[0]
        out_s = np.zeros((nq, k), np.float32)
        out_i = np.full((nq, k), -1, np.int64)
        if nq == 0 or self.n_docs == 0:
            return out_s, out_i
        q_indptr = _readonly(q.indptr.astype(np.int64))
        q_idx = _readonly(q.indices.astype(np.int32))
        q_w = _readonly(q.data)
        postings = int((self.indptr[q.indices + 1] - self.indptr[q.indices]).sum())
        threads = numba.get_num_threads()
        block = min(self.n_docs, BLOCK_DOCS)
        n_blocks = -(-self.n_docs // block)
        args = (self.indptr, self.docs, self.weights, q_indptr, q_idx, q_w, _readonly(allowed),
                use_allowed, self.n_docs, block, n_blocks)
        part_s, part_i = (out_s, out_i) if n_blocks == 1 else (
            np.zeros((nq * n_blocks, k), np.float32), np.full((nq * n_blocks, k), -1, np.int64))
        n_items = nq * n_blocks
        if threads == 1 or n_items == 1 or postings < PARALLEL_MIN_POSTINGS:
            _search_items(*args, 0, n_items, part_s, part_i)
        else:
            _search_parallel(*args, min(threads, n_items), part_s, part_i)
        if n_blocks > 1:
            _merge_blocks(part_s, part_i, n_blocks, out_s, out_i)
        return out_s, out_i

    def score(self, q_indices: np.ndarray, q_weights: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """Exact scores of one query against chosen rows, equal to what :meth:`search` computes.

        Args:
            q_indices: ``(e,)`` integer term ids of the query.
            q_weights: ``(e,)`` non-negative float query weights.
            cand: ``(c,)`` integer local rows (any order, repeats allowed).

        Returns:
            ``(c,)`` float32 scores aligned with ``cand`` (0 for rows sharing no term).
        """
        q_idx = np.ascontiguousarray(q_indices)
        q_w = np.ascontiguousarray(q_weights)
        cand = np.ascontiguousarray(cand)
        if q_idx.ndim != 1 or q_w.shape != q_idx.shape:
            raise ValueError(f"q_indices {q_idx.shape} and q_weights {q_w.shape} must be equal 1-d")
        for name, a in (("q_indices", q_idx), ("cand", cand)):
            if a.size and not np.issubdtype(a.dtype, np.integer):
                raise TypeError(f"{name} must be integers, got {a.dtype}")
        if q_w.size and not np.issubdtype(q_w.dtype, np.floating):
            raise TypeError(f"q_weights must be floating point, got {q_w.dtype}")
        if cand.ndim != 1:
            raise ValueError(f"cand must be 1-d, got shape {cand.shape}")
        if q_idx.size and (q_idx.min() < 0 or q_idx.max() >= self.vocab_size):
            raise ValueError(f"q_indices must lie in [0, {self.vocab_size})")
        if q_w.size and not q_w.min() >= 0:
            raise ValueError("query weights must be >= 0 and not NaN")
        if cand.size and (cand.min() < 0 or cand.max() >= self.n_docs):
            raise ValueError(f"cand rows must lie in [0, {self.n_docs})")
        return _score_candidates(self.indptr, self.docs, self.weights,
                                 _readonly(q_idx.astype(np.int32)),
                                 _readonly(q_w.astype(np.float32)),
                                 _readonly(cand.astype(np.int64)))


def brute_force_topk(doc_csr, q_csr, k: int, allowed: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Reference for :meth:`SparsePostings.search`: ``q @ doc.T`` densified, then a full sort.

    ``doc_csr`` ``(n_docs, V)``, ``q_csr`` ``(nq, V)``; returns ``(nq, k)`` float32 scores and
    int64 ids with the module's conventions.
    """
    k = _check_k(k)
    n_docs = doc_csr.shape[0]
    allowed, use_allowed = _check_allowed(allowed, n_docs)
    q = _as_query_csr(q_csr, doc_csr.shape[1])
    dense = (q @ sp.csr_matrix(doc_csr, dtype=np.float32).T).toarray().astype(np.float32)
    out_s = np.zeros((q.shape[0], k), np.float32)
    out_i = np.full((q.shape[0], k), -1, np.int64)
    rows = np.arange(n_docs)
    for r in range(q.shape[0]):
        hit = dense[r] > 0
        if use_allowed:
            hit &= allowed
        ids = rows[hit]
        order = np.lexsort((ids, -dense[r, ids]))[:k]
        out_s[r, : order.size] = dense[r, ids[order]]
        out_i[r, : order.size] = ids[order]
    return out_s, out_i


# ----------------------------------------------------------------------------- merging


@njit(cache=True)
def _merge_count(indptr, docs, weights, remap, counts, maxima):
    """Add to ``counts[t]`` the postings of term ``t`` whose row survives (``remap >= 0``)."""
    for t in range(indptr.shape[0] - 1):
        c = 0
        mx = maxima[t]
        for p in range(indptr[t], indptr[t + 1]):
            if remap[docs[p]] >= 0:
                c += 1
                if weights[p] > mx:
                    mx = weights[p]
        counts[t] += c
        maxima[t] = mx


@njit(cache=True)
def _merge_fill(indptr, docs, weights, remap, fill, out_docs, out_weights):
    """Append the surviving postings of each term at ``fill[t]`` with their new rows."""
    for t in range(indptr.shape[0] - 1):
        f = fill[t]
        for p in range(indptr[t], indptr[t + 1]):
            r = remap[docs[p]]
            if r >= 0:
                out_docs[f] = r
                out_weights[f] = weights[p]
                f += 1
        fill[t] = f


def merge_postings(folder: str | Path, prefix: str, sources) -> list[str]:
    """Write the postings of the concatenation of ``sources`` into ``folder``, streaming.

    ``sources`` is a list of ``(SparsePostings, rows)``: the kept rows (ascending int64) of each
    source, in output order. Posting lists stay sorted because sources are appended in order and
    rows ascend within each. Memory: O(V + rows of one source); the output arrays are written
    through memory maps, so their pages go to disk, not to this process's heap. Returns the
    file names written (not fsynced).
    """
    from numpy.lib.format import open_memmap

    folder = Path(folder)
    if not sources:
        raise ValueError("merge_postings needs at least one source")
    vocab = sources[0][0].vocab_size
    counts = np.zeros(vocab, np.int64)
    maxima = np.zeros(vocab, np.float32)
    remaps, base = [], 0
    for p, rows in sources:
        if p.vocab_size != vocab:
            raise ValueError(f"sources disagree on the vocabulary size ({p.vocab_size} != {vocab})")
        rows = np.asarray(rows, np.int64)
        remap = np.full(p.n_docs, -1, np.int32)
        remap[rows] = np.arange(base, base + len(rows), dtype=np.int32)
        base += len(rows)
        remaps.append(remap)
        _merge_count(p.indptr, p.docs, p.weights, remap, counts, maxima)
    indptr = np.zeros(vocab + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    nnz = int(indptr[-1])
    names = [f"{prefix}_{n}.npy" for n in ("indptr", "docs", "weights", "term_max", "n_docs")]
    np.save(folder / names[0], indptr, allow_pickle=False)
    out_docs = open_memmap(folder / names[1], mode="w+", dtype=np.int32, shape=(nnz,))
    out_weights = open_memmap(folder / names[2], mode="w+", dtype=np.float32, shape=(nnz,))
    if nnz:
        fill = indptr[:-1].copy()
        for (p, _), remap in zip(sources, remaps):
            _merge_fill(p.indptr, p.docs, p.weights, remap, fill, out_docs, out_weights)
    out_docs.flush()
    out_weights.flush()
    del out_docs, out_weights
    np.save(folder / names[3], maxima, allow_pickle=False)
    np.save(folder / names[4], np.array(base, np.int64), allow_pickle=False)
    return names
