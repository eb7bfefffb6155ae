"""Dense channel for ONE immutable segment: a FAISS index chosen by a factory string.

Vectors are L2-normalised, so inner product is cosine similarity. ``Flat`` (exact, the default)
keeps no FAISS file: it is rebuilt from ``dense.npy`` when the segment opens. Other factories
(``HNSW32``, ``IVF1024,PQ64``...) are trained and written to ``dense.faiss``; an IVF factory on a
segment too small to train its coarse quantiser falls back to ``Flat`` for that segment.

Deleted and filtered-out rows are excluded inside FAISS with an ``IDSelectorBitmap``. On a GPU
(faiss-gpu with a visible device) Flat indexes move to the GPU, where selectors are not supported,
so the search over-fetches and filters instead -- still exact for Flat.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import IndexFormatError

log = logging.getLogger(__name__)

FAISS_FILE = "dense.faiss"


def _faiss():
    import faiss

    return faiss


def gpu_available() -> bool:
    """True when the installed faiss was built with GPU support and sees a device."""
    faiss = _faiss()
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


@contextmanager
def _threads_for(nq: int, on_gpu: bool):
    """One OpenMP thread for a handful of queries on CPU.

    FAISS parallelises a single query over the database; on a machine whose cores are busy the
    OpenMP threads then wait on each other (measured here, 100k x 384 Flat under load: 43 ms with
    2 threads, 12 ms with 1). Batches keep every thread.
    """
    faiss = _faiss()
    if on_gpu or nq >= SINGLE_THREAD_BELOW:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


SINGLE_THREAD_BELOW = 4
# faiss-gpu's largest k for one search (k-selection limit without cuVS).
GPU_MAX_K = 2048


def _min_train(factory: str) -> int:
    m = re.search(r"IVF(\d+)", factory)
    return 39 * int(m.group(1)) if m else 0


def _check_faiss(index, n: int, dim: int, path) -> None:
    """IndexFormatError unless a FAISS index read from ``path`` is one we could have written for
    ``n`` vectors of ``dim``: see :meth:`DenseIndex.load`. O(index size), once per open."""

    faiss = _faiss()

    def bad(why):
        raise IndexFormatError(f"index file corrupted: {path} ({why})")

    if index.ntotal != n or index.d != dim:
        bad(f"holds {index.ntotal} vectors of dimension {index.d}, the segment has {n} of {dim}")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        bad("not an inner-product index")
    base = faiss.downcast_index(index)
    while isinstance(base, faiss.IndexPreTransform):
        base = faiss.downcast_index(base.index)
    if isinstance(base, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        bad("an IDMap index, which hybridsearch never writes")
    if base.ntotal != n:
        bad(f"inner index holds {base.ntotal} vectors, the segment has {n}")
    if isinstance(base, faiss.IndexIVF):
        q = faiss.downcast_index(base.quantizer)
        if q.ntotal != base.nlist or q.d != base.d:
            bad(f"coarse quantiser holds {q.ntotal} centroids of dimension {q.d} for {base.nlist} lists")
        inv, total = base.invlists, 0
        if inv.nlist != base.nlist:
            bad(f"{inv.nlist} inverted lists for nlist {base.nlist}")
        for lst in range(base.nlist):
            size = inv.list_size(lst)
            if size:
                ptr = inv.get_ids(lst)
                try:
                    ids = faiss.rev_swig_ptr(ptr, size)
                    if ids.min() < 0 or ids.max() >= n:
                        bad(f"inverted list {lst} holds ids outside [0, {n})")
                finally:
                    inv.release_ids(lst, ptr)
                total += size
        if total != n:
            bad(f"inverted lists hold {total} entries for {n} vectors")
    elif isinstance(base, faiss.IndexHNSW):
        h = base.hnsw
        storage = faiss.downcast_index(base.storage)
        if storage is None or storage.ntotal != n or storage.d != base.d:
            bad("HNSW storage does not hold the segment's vectors")
        levels = faiss.vector_to_array(h.levels)
        offsets = faiss.vector_to_array(h.offsets).astype(np.int64)
        neighbors = faiss.vector_to_array(h.neighbors)
        cum = faiss.vector_to_array(h.cum_nneighbor_per_level).astype(np.int64)
        if levels.shape != (n,) or offsets.shape != (n + 1,) or cum.size < 2:
            bad("HNSW graph arrays do not match the vector count")
        if n and (levels.min() < 1 or levels.max() >= cum.size):
            bad("HNSW levels out of range")
        if offsets[0] != 0 or offsets[-1] != neighbors.size or (n and not (np.diff(offsets) == cum[levels]).all()):
            bad("HNSW neighbour offsets are inconsistent")
        if neighbors.size and (neighbors.min() < -1 or neighbors.max() >= n):
            bad(f"HNSW neighbours outside [0, {n})")
        if n and not (0 <= h.entry_point < n and h.max_level == levels[h.entry_point] - 1):
            bad("HNSW entry point out of range")


class DenseIndex:
    """FAISS inner-product index over one segment's ``(n, d)`` float32 vectors (local row ids)."""

    def __init__(self, index, n: int, factory: str, vectors: np.ndarray | None = None):
        self.index = index
        self.n = n
        self.factory = factory
        self.on_gpu = False
        #: the (n, d) float32 vectors (memory-mapped) when known: exact filtered search on GPU
        self.vectors = vectors

    @classmethod
    def build(cls, vectors: np.ndarray, factory: str = "Flat") -> DenseIndex:
        """Index ``vectors`` (n, d) float32; train first when the factory needs it."""
        faiss = _faiss()
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        eff = factory
        if _min_train(factory) > len(x):
            log.warning("segment of %d vectors is too small to train %s; using Flat", len(x), factory)
            eff = "Flat"
        try:
            index = faiss.index_factory(x.shape[1], eff, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(f"invalid FAISS factory string {factory!r}: {e}") from e
        if not index.is_trained:
            index.train(x)
        index.add(x)
        return cls(index, len(x), eff, vectors if eff == "Flat" else None)

    def save(self, folder: Path) -> None:
        """Write ``dense.faiss`` unless the index is Flat (then dense.npy is enough)."""
        if self.factory != "Flat":
            _faiss().write_index(self.index, str(folder / FAISS_FILE))

    @classmethod
    def load(cls, folder: Path, vectors: np.ndarray, factory: str, use_gpu: bool | None = None) -> DenseIndex:
        """Open a segment's index: read ``dense.faiss`` (non-Flat factories) or rebuild Flat
        from ``vectors`` ``(n, d)``.

        The file is untrusted: it must be a regular file (no link), read without error, hold
        ``n`` vectors of dimension ``d`` under inner product, map no ids of its own (no IDMap),
        and its internal ids / graph links must stay in range (IVF lists, HNSW neighbours), so
        that a search cannot return or follow a row outside the segment. IndexFormatError
        names the file.
        """
        faiss = _faiss()
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise IndexFormatError(f"dense vectors under {folder} must be 2-d, got {vectors.shape}")
        if factory != "Flat":
            path = Path(folder) / FAISS_FILE
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                raise IndexFormatError(f"index file missing: {path}") from None
            if not stat.S_ISREG(mode):
                raise IndexFormatError(f"index file corrupted: {path} is not a regular file (links are refused)")
            try:
                index = faiss.read_index(str(path))
            except Exception as e:
                raise IndexFormatError(f"index file corrupted: {path} ({type(e).__name__}: {e})"[:500]) from e
            _check_faiss(index, vectors.shape[0], vectors.shape[1], path)
            d = cls(index, len(vectors), factory)
        else:
            d = cls.build(vectors, "Flat")
        if (gpu_available() if use_gpu is None else use_gpu) and d.factory == "Flat":
            d.index = faiss.index_cpu_to_all_gpus(d.index)
            d.on_gpu = True
        return d

    def search(self, q: np.ndarray, k: int, allowed: np.ndarray | None = None,
               nprobe: int = 16, ef_search: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product. ``q`` (nq, d) float32; ``allowed`` (n,) bool or None.

        Returns scores (nq, k) float32 and local ids (nq, k) int64, -1 where there is no hit.
        """
        q = np.ascontiguousarray(q, dtype=np.float32)
        nq = len(q)
        scores = np.zeros((nq, k), np.float32)
        ids = np.full((nq, k), -1, np.int64)
        n_allowed = self.n if allowed is None else int(allowed.sum())
        if n_allowed == 0 or nq == 0:
            return scores, ids
        kk = min(k, self.n)
        with _threads_for(nq, self.on_gpu):
            s, i = self._search(q, kk, allowed, n_allowed, nprobe, ef_search)
        scores[:, :kk] = np.where(i >= 0, s, 0)
        ids[:, :kk] = i
        return scores, ids

    def _search(self, q, kk, allowed, n_allowed, nprobe, ef_search):
        faiss = _faiss()
        if self.on_gpu and kk > GPU_MAX_K and self.vectors is not None:
            rows = np.arange(self.n) if allowed is None else np.flatnonzero(allowed)
            s, i = exact_topk(self.vectors, q, kk, rows)
        elif allowed is None or n_allowed == self.n:
            s, i = self.index.search(q, kk, params=self._params(None, nprobe, ef_search))
        elif self.on_gpu:
            s, i = self._overfetch(q, kk, allowed, n_allowed)
        else:
            # FAISS keeps only a raw pointer to the bitmap: hold the array (and the selector)
            # in locals until the search has returned, or it reads freed memory.
            bits = np.ascontiguousarray(np.packbits(allowed, bitorder="little"))
            sel = faiss.IDSelectorBitmap(self.n, faiss.swig_ptr(bits))
            params = self._params(sel, nprobe, ef_search)
            s, i = self.index.search(q, kk, params=params)
            del params, sel, bits
        return s, i

    def _params(self, sel, nprobe, ef_search):
        if self.on_gpu:  # GPU Flat indexes take no search parameters (filters over-fetch)
            return None
        faiss = _faiss()
        base = faiss.downcast_index(self.index)
        if isinstance(base, faiss.IndexIVF):
            return faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        if isinstance(base, faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(sel=sel, efSearch=ef_search)
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def _overfetch(self, q, k, allowed, n_allowed):
        # The top k + (rows not allowed) always hold the allowed top k: exact. faiss-gpu selects
        # at most GPU_MAX_K hits, so past that the allowed rows are scored directly instead.
        fetch = min(self.n, max(4 * k, k + self.n - n_allowed))
        if fetch > GPU_MAX_K:
            if self.vectors is None:
                raise RuntimeError(f"a filtered GPU search needing {fetch} hits (more than faiss-gpu's "
                                   f"{GPU_MAX_K}) needs the segment's vectors")
            return exact_topk(self.vectors, q, k, np.flatnonzero(allowed))
        s, i = self.index.search(q, fetch)
        out_s = np.zeros((len(q), k), np.float32)
        out_i = np.full((len(q), k), -1, np.int64)
        for r in range(len(q)):
            ok = (i[r] >= 0) & allowed[np.maximum(i[r], 0)]
            take = np.flatnonzero(ok)[:k]
            out_s[r, : len(take)] = s[r, take]
            out_i[r, : len(take)] = i[r, take]
        return out_s, out_i


def exact_topk(vectors: np.ndarray, q: np.ndarray, k: int, rows: np.ndarray,
               block: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products of ``q`` over ``vectors[rows]``, ``block`` rows at a time.

    Returns scores (nq, k) float32 and row ids (nq, k) int64, padded with 0 / -1.
    """
    nq = len(q)
    best_s = np.full((nq, 0), -np.inf, np.float32)
    best_i = np.zeros((nq, 0), np.int64)
    for lo in range(0, len(rows), block):
        r = rows[lo:lo + block]
        sc = q @ np.asarray(vectors[r], dtype=np.float32).T
        cand_s = np.concatenate([best_s, sc], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(r, sc.shape)], axis=1)
        if cand_s.shape[1] > k:
            part = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
            cand_s = np.take_along_axis(cand_s, part, 1)
            cand_i = np.take_along_axis(cand_i, part, 1)
        best_s, best_i = cand_s, cand_i
    order = np.lexsort((best_i, -best_s), axis=1) if best_s.size else np.zeros(best_s.shape, np.int64)
    best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
    out_s = np.zeros((nq, k), np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    out_s[:, :best_s.shape[1]] = best_s
    out_i[:, :best_i.shape[1]] = best_i
    return out_s, out_i
