"""Dense channel for ONE immutable segment: a FAISS index chosen by a factory string.

Vectors are L2-normalised, so inner product is cosine similarity. ``Flat`` (exact, the default)
keeps no FAISS file: it is rebuilt from ``dense.npy`` when the segment opens. Other factories
(``HNSW32``, ``IVF1024,PQ64``...) are trained and written to ``dense.faiss``; an IVF factory on a
segment too small to train its coarse quantiser falls back to ``Flat`` for that segment.

Deleted and filtered-out rows are excluded inside FAISS with an ``IDSelectorBitmap``. On a GPU
(faiss-gpu with a visible device) Flat indexes move to the GPU, where selectors are not supported,
so the search over-fetches and filters instead -- still exact for Flat.

The vectors themselves may live in a :class:`~.dense_store.DenseStore` (fp32 / fp16 / sq8, memory-
mapped): :meth:`DenseIndex.build_from` trains on a sample and adds in chunks, and exact
searches on CPU are the store's own (:meth:`DenseStore.search`), with no FAISS copy at all.

``dense.faiss`` is memory-mapped where FAISS can (``IO_FLAG_MMAP_IFC``: Flat / SQ / PQ codes and
HNSW graphs and storage; ``IO_FLAG_MMAP``: IVF inverted lists), so opening costs page cache, not
private memory. Both flags carry FAISS's "skip IVF data" bit, which also keeps a planted
``OnDiskInvertedLists`` record from opening the file it names (it is then refused).
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
from .dense_store import DenseStore

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


def _check_faiss(index, n: int, dim: int, path, inner_product: bool = True) -> None:
    """IndexFormatError unless a FAISS index read from ``path`` is one we could have written for
    ``n`` vectors of ``dim``: see :meth:`DenseIndex.load`. O(index size), once per open.

    Only the structures hybridsearch writes pass (after any pre-transform): flat codes (Flat,
    SQ, PQ), HNSW over flat codes, and IVF with a flat-code or HNSW coarse quantiser and
    in-memory or FAISS-mapped inverted lists; anything else could hide a part this cannot
    check. ``inner_product`` False skips the metric check (an IVF's HNSW quantiser is L2).
    """

    faiss = _faiss()

    def bad(why):
        raise IndexFormatError(f"index file corrupted: {path} ({why})")

    if index.ntotal != n or index.d != dim:
        bad(f"holds {index.ntotal} vectors of dimension {index.d}, the segment has {n} of {dim}")
    if inner_product and index.metric_type != faiss.METRIC_INNER_PRODUCT:
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
        if q is None or q.ntotal != base.nlist or q.d != base.d:
            bad(f"coarse quantiser does not hold {base.nlist} centroids of dimension {base.d}")
        if not isinstance(q, faiss.IndexFlatCodes):
            if not isinstance(q, faiss.IndexHNSW):
                bad(f"coarse quantiser is a {type(q).__name__}, which hybridsearch never writes")
            _check_faiss(q, q.ntotal, q.d, path, inner_product=False)
        inv, total = _invlists(base, path), 0
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
        if not isinstance(storage, faiss.IndexFlatCodes):
            bad(f"HNSW storage is a {type(storage).__name__}, which hybridsearch never writes")
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
    elif not isinstance(base, faiss.IndexFlatCodes):
        bad(f"a {type(base).__name__} index, which hybridsearch never writes")


def check_factory(factory: str, dim: int) -> None:
    """ValueError unless ``factory`` is a FAISS factory string whose index
    :func:`_check_faiss` can validate when it is read back (flat codes, HNSW over flat codes,
    IVF over a flat or HNSW quantiser, behind optional pre-transforms): call it when an index
    is created, so that no index is written that its own reader would refuse."""
    faiss = _faiss()
    try:
        index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"invalid FAISS factory string {factory!r}: {e}") from e
    base = faiss.downcast_index(index)
    while isinstance(base, faiss.IndexPreTransform):
        base = faiss.downcast_index(base.index)
    part = base
    if isinstance(base, faiss.IndexIVF):
        part = faiss.downcast_index(base.quantizer)
    if isinstance(part, faiss.IndexHNSW):
        part = faiss.downcast_index(part.storage)
    if isinstance(base, (faiss.IndexIDMap, faiss.IndexIDMap2)) or not isinstance(part, faiss.IndexFlatCodes):
        raise ValueError(f"FAISS factory {factory!r} builds a {type(base).__name__}; hybridsearch supports "
                         f"flat codes (Flat, SQ8, PQ..), HNSW over them and IVF (optionally after PCA/OPQ)")


def _invlists(ivf, path):
    """The inverted lists of ``ivf``, unless they are an ``OnDiskInvertedLists`` record naming
    a file of its own, which a downloaded index could point anywhere. (Read with the skip-IVF-
    data bit, FAISS leaves such a record unopened and unmapped; the lists FAISS maps from
    ``path`` itself have no file name and a live mapping of the whole file.)"""
    faiss = _faiss()
    inv = faiss.downcast_InvertedLists(ivf.invlists)
    if isinstance(inv, faiss.OnDiskInvertedLists) and (
            inv.filename != "" or inv.ptr is None or inv.totsize != os.path.getsize(path)):
        raise IndexFormatError(f"index file corrupted: {path} (its inverted lists name a file of their "
                               f"own, {inv.filename!r}; hybridsearch never writes that)"[:500])
    return inv


def read_faiss(path: str | os.PathLike, mmap: bool = True):
    """``faiss.read_index`` of an untrusted ``path``, memory-mapped where FAISS can.

    Every flag used carries FAISS's skip-IVF-data bit, so an ``OnDiskInvertedLists`` record is
    never opened (:func:`_check_faiss` refuses it). ``mmap``: ``IO_FLAG_MMAP_IFC`` maps flat
    codes and HNSW graphs; IVF files fail that combination and are read with ``IO_FLAG_MMAP``,
    which maps their inverted lists (also without ``mmap``: it is the only reading that cannot
    open another file). Raises FAISS's RuntimeError for a file it cannot read.
    """
    faiss = _faiss()
    path = str(path)
    if mmap:
        try:
            return faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_MMAP)
        except RuntimeError:
            pass
    return faiss.read_index(path, faiss.IO_FLAG_MMAP)


class DenseIndex:
    """FAISS inner-product index over one segment's ``(n, d)`` float32 vectors (local row ids)."""

    def __init__(self, index, n: int, factory: str, vectors: np.ndarray | DenseStore | None = None):
        self.index = index
        self.n = n
        self.factory = factory
        self.on_gpu = False
        #: the (n, d) float32 vectors (memory-mapped) or their DenseStore, when known: exact
        #: filtered search on GPU past faiss-gpu's k limit
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

    @classmethod
    def build_from(cls, store: DenseStore, factory: str = "Flat", *, train_size: int | None = None,
                   chunk_rows: int | None = None, seed: int = 0) -> DenseIndex:
        """Index a :class:`DenseStore` without decoding it whole: train (when the factory needs
        it) on ``train_size`` rows drawn at random (default: every row up to 100k, else 100k or
        256 per IVF list if more), then add the decoded rows ``chunk_rows`` at a time (~8 MiB).

        The FAISS index holds its own copy of what it stores (for Flat: all of it as float32,
        which is what a GPU index needs; on CPU search the store itself instead).
        """
        faiss = _faiss()
        n, dim = store.shape
        eff = factory
        if _min_train(factory) > n:
            log.warning("segment of %d vectors is too small to train %s; using Flat", n, factory)
            eff = "Flat"
        try:
            index = faiss.index_factory(dim, eff, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(f"invalid FAISS factory string {factory!r}: {e}") from e
        if not index.is_trained:
            if train_size is None:
                m = re.search(r"IVF(\d+)", eff)
                train_size = max(100_000, 256 * int(m.group(1)) if m else 0)
            take = min(n, int(train_size))
            rows = np.arange(n) if take == n else np.sort(np.random.default_rng(seed).choice(n, take, replace=False))
            index.train(np.ascontiguousarray(store.rows(rows)))
        for _, x in store.iter_rows(np.arange(n, dtype=np.int64), chunk_rows):
            index.add(np.ascontiguousarray(x))
        return cls(index, n, eff, store if eff == "Flat" else None)

    def save(self, folder: Path) -> None:
        """Write ``dense.faiss`` unless the index is Flat (then dense.npy is enough)."""
        if self.factory != "Flat":
            _faiss().write_index(self.index, str(folder / FAISS_FILE))

    @classmethod
    def load(cls, folder: Path, vectors: np.ndarray | DenseStore | None, factory: str,
             use_gpu: bool | None = None, *, n: int | None = None, dim: int | None = None,
             mmap: bool = True) -> DenseIndex:
        """Open a segment's index: read ``dense.faiss`` (non-Flat factories) or rebuild Flat
        from ``vectors`` ``(n, d)`` (an array or a :class:`DenseStore`, added in chunks).
        A non-Flat factory needs only the shape: ``vectors`` may be None with ``n`` and ``dim``.

        The file is untrusted: it must be a regular file (no link), read without error, hold
        ``n`` vectors of dimension ``d`` under inner product, map no ids of its own (no IDMap),
        keep its inverted lists in itself (no ``OnDiskInvertedLists`` naming another file) and
        its internal ids / graph links in range (IVF lists, HNSW neighbours), so that a search
        cannot return or follow a row outside the segment. IndexFormatError names the file.
        ``mmap`` maps the file where FAISS can (:func:`read_faiss`): opening then costs page
        cache rather than private memory (HNSW32 over 100k x 1024: +28 MB instead of +418 MB).
        """
        faiss = _faiss()
        if vectors is None:
            if factory == "Flat" or n is None or dim is None:
                raise ValueError("DenseIndex.load needs the vectors for Flat, else vectors or n and dim")
            shape = (int(n), int(dim))
        else:
            if not isinstance(vectors, DenseStore):
                vectors = np.asarray(vectors)
            shape = tuple(vectors.shape)
            if len(shape) != 2:
                raise IndexFormatError(f"dense vectors under {folder} must be 2-d, got {shape}")
        n, dim = shape
        if factory != "Flat":
            path = Path(folder) / FAISS_FILE
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                raise IndexFormatError(f"index file missing: {path}") from None
            if not stat.S_ISREG(mode):
                raise IndexFormatError(f"index file corrupted: {path} is not a regular file (links are refused)")
            try:
                index = read_faiss(path, mmap=mmap)
            except Exception as e:
                raise IndexFormatError(f"index file corrupted: {path} ({type(e).__name__}: {e})"[:500]) from e
            _check_faiss(index, n, dim, path)
            d = cls(index, n, factory)
        elif isinstance(vectors, DenseStore):
            d = cls.build_from(vectors, "Flat")
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
            s, i = self._exact(q, kk, allowed)
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
        wrapped = isinstance(base, faiss.IndexPreTransform)
        while isinstance(base, faiss.IndexPreTransform):
            base = faiss.downcast_index(base.index)
        if isinstance(base, faiss.IndexIVF):
            params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        elif isinstance(base, faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=ef_search)
        elif sel is not None:
            params = faiss.SearchParameters(sel=sel)
        else:
            return None
        if not wrapped:
            return params
        # A pre-transform (PCA, OPQ..) hands index_params to the index it wraps; FAISS keeps a
        # raw pointer, so the outer object holds the inner one alive.
        outer = faiss.SearchParametersPreTransform()
        outer.index_params = params
        outer.inner = params
        return outer

    def _exact(self, q, k, allowed):
        """Exact top-k over the allowed rows of ``self.vectors`` (array or DenseStore)."""
        if isinstance(self.vectors, DenseStore):
            return self.vectors.search(q, k, allowed)
        rows = np.arange(self.n) if allowed is None else np.flatnonzero(allowed)
        return exact_topk(self.vectors, q, k, rows)

    def _overfetch(self, q, k, allowed, n_allowed):
        # The top k + (rows not allowed) always hold the allowed top k: exact. faiss-gpu selects
        # at most GPU_MAX_K hits, so past that the allowed rows are scored directly instead.
        fetch = min(self.n, max(4 * k, k + self.n - n_allowed))
        if fetch > GPU_MAX_K:
            if self.vectors is None:
                raise RuntimeError(f"a filtered GPU search needing {fetch} hits (more than faiss-gpu's "
                                   f"{GPU_MAX_K}) needs the segment's vectors")
            return self._exact(q, k, allowed)
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
