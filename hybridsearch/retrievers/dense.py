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
import math
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

#: ``dense_factory="auto"``: a segment with fewer rows is searched exactly over its stored
#: vectors (no FAISS file); from this many rows on it gets :data:`AUTO_ANN`. Measured on this
#: project's 2-core machine, 1024-d, one thread (bench/results/dense_scale.md): the exact sq8 scan
#: takes ~0.1 ms per 1,000 rows, HNSW ~0.3-0.8 ms from 20k rows on.
AUTO_ANN_MIN_ROWS = 20_000
#: the ANN structure "auto" builds below :data:`AUTO_IVF_MIN_ROWS`: an HNSW graph over SQ8 codes
#: (1 byte a dimension + the graph); the segment's stored vectors stay and rescore what it finds.
#: Chosen over IVF,SQ8 at these sizes because IVF's recall depends on how clustered the vectors
#: are (measured at 5k-20k weakly clustered rows, 16 probes: recall@10 0.46-0.66; HNSW at
#: efSearch 128 with rescoring: 0.94-0.95 at 25k-30k, 0.985 at 100k).
AUTO_ANN = "HNSW32,SQ8"
#: from this many rows on "auto" builds an inverted file over SQ8 codes instead
#: (``IVF{nlist},SQ8``, :func:`auto_nlist` lists): HNSW's build took 25 min at 1M x 1024 on this
#: machine (a merge holds the writer lock that long) and its recall@10 at efSearch 128 was 0.62
#: on clustered vectors (near-ties inside a cluster of ~250 need a walk over most of it);
#: measured in bench/results/dense_scale.md.
AUTO_IVF_MIN_ROWS = 200_000
#: "auto" keeps an ANN structure only where it finds the data's neighbours. Once built, it is
#: probed with AUTO_RECALL_PROBES of the segment's own rows, each asking for its 10 nearest other
#: rows through the structure (rescored, as searches are) and by an exact scan; below
#: AUTO_MIN_RECALL (recall@10, mean over the probes) the segment stays Flat (exact). Vectors with
#: no neighbourhood structure (uniformly random ones: recall@10 0.06 at 1M x 384 with IVF, 0.25
#: at 100k with HNSW, bench/RESULTS.md) would otherwise get fast, wrong answers.
AUTO_RECALL_PROBES = 64
AUTO_MIN_RECALL = 0.9
#: k-means iterations when "auto" trains an IVF (FAISS's default is 25), on 64 rows a list
AUTO_IVF_ITERS = 10
AUTO_IVF_TRAIN_PER_LIST = 64
#: search-time defaults for ANN segments (k = 10, every row allowed); both grow with k and as a
#: filter removes rows, see :func:`search_effort`. HNSW32 over SQ8 at 1M x 1024: recall@10
#: against exact in bench/results/dense_scale.md.
EF_SEARCH = 128
NPROBE = 16
#: below this share of allowed rows (filters, deletions) an ANN segment is searched exactly over
#: the allowed rows instead: a graph walk would discard most of what it visits.
ANN_MIN_ALLOWED = 0.1
#: rows fetched from an ANN index per row asked for, rescored exactly from the stored vectors
RESCORE_FACTOR = 2


def is_auto(factory) -> bool:
    return factory == "auto"


def auto_nlist(n: int) -> int:
    """Inverted lists for an "auto" IVF over ``n`` rows: the power of two nearest ``2 sqrt(n)``
    (2,048 at 1M: ~490 rows a list), at least 64 ..."""
    n = max(int(n), 1)
    # ... and no more than FAISS's 39 training rows a list can train
    return 1 << max(6, min(int(round(math.log2(2 * math.sqrt(n)))), int(math.log2(max(n // 39, 1)))))


def auto_factory(n: int) -> str:
    """The structure ``dense_factory="auto"`` gives a segment of ``n`` rows: ``"Flat"`` (exact
    scan of the stored vectors) below :data:`AUTO_ANN_MIN_ROWS`, :data:`AUTO_ANN` below
    :data:`AUTO_IVF_MIN_ROWS`, else ``IVF{auto_nlist(n)},SQ8``."""
    n = int(n)
    if n < AUTO_ANN_MIN_ROWS:
        return "Flat"
    return AUTO_ANN if n < AUTO_IVF_MIN_ROWS else f"IVF{auto_nlist(n)},SQ8"


def resolve_factory(factory: str, n: int) -> str:
    """The factory a segment of ``n`` rows is built with: ``"auto"`` resolved by its size,
    any explicit factory string unchanged."""
    return auto_factory(n) if is_auto(factory) else factory


def self_recall(index, store: DenseStore, probes: int = AUTO_RECALL_PROBES, k: int = 10,
                seed: int = 0) -> float:
    """Recall@k of the built FAISS ``index`` over ``store`` against an exact scan, with ``probes``
    of the stored rows as queries (each row's ``k`` nearest *other* rows; mean over the probes)."""
    n = store.n
    if n < 2:
        return 1.0
    k = min(k, n - 1)
    rows = np.sort(np.random.default_rng(seed).choice(n, min(probes, n), replace=False))
    q = np.ascontiguousarray(store.rows(rows), dtype=np.float32)
    _, exact = store.search(q, k + 1, None)
    _, found = DenseIndex(index, n, "probe", store).search(q, k + 1)
    rec = []
    for r, e, f in zip(rows, exact, found):
        truth = [x for x in e if x >= 0 and x != r][:k]
        if truth:
            rec.append(len(set(truth) & {x for x in f if x >= 0 and x != r}) / len(truth))
    return float(np.mean(rec)) if rec else 1.0


def search_effort(k: int, allowed_share: float, ef_search: int | None = None,
                  nprobe: int | None = None, nlist: int | None = None) -> tuple[int, int]:
    """``(efSearch, nprobe)`` for a top-``k`` search where ``allowed_share`` of the rows may be
    returned. Given values are kept; missing ones are, for every row allowed, efSearch
    ``max(EF_SEARCH, 2 k)`` and nprobe ``NPROBE * sqrt(k / 10)`` (at least :data:`NPROBE`),
    both divided by the allowed share (a selector discards what the search visits), nprobe
    capped at ``nlist``."""
    share = max(float(allowed_share), 1e-9)
    if ef_search is None:
        ef_search = int(min(max(EF_SEARCH, 2 * int(k)) / share, 1 << 16))
    if nprobe is None:
        nprobe = int(math.ceil(NPROBE * max(1.0, (max(int(k), 1) / 10) ** 0.5) / share))
    if nlist is not None:
        nprobe = min(nprobe, int(nlist))
    return max(int(ef_search), 1), max(int(nprobe), 1)


def _auto_ivf(index) -> int:
    """For an IVF that "auto" builds: set its k-means to :data:`AUTO_IVF_ITERS` iterations and
    return its nlist; 0 for other indexes."""
    faiss = _faiss()
    base = faiss.downcast_index(index)
    if not isinstance(base, faiss.IndexIVF):
        return 0
    base.cp.niter = AUTO_IVF_ITERS
    return int(base.nlist)


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
    is created, so that no index is written that its own reader would refuse. ``"auto"``
    (:func:`auto_factory`) passes."""
    faiss = _faiss()
    if is_auto(factory):
        check_factory(AUTO_ANN, dim)
        check_factory("IVF64,SQ8", dim)
        return
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
        """Index ``vectors`` (n, d) float32; train first when the factory needs it. ``"auto"``
        picks the structure from ``n`` (:func:`auto_factory`)."""
        faiss = _faiss()
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        eff = resolve_factory(factory, len(x))
        if _min_train(factory) > len(x):
            log.warning("segment of %d vectors is too small to train %s; using Flat", len(x), factory)
            eff = "Flat"
        try:
            index = faiss.index_factory(x.shape[1], eff, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(f"invalid FAISS factory string {factory!r}: {e}") from e
        if not index.is_trained:
            if is_auto(factory) and _auto_ivf(index):
                take = min(len(x), AUTO_IVF_TRAIN_PER_LIST * _auto_ivf(index))
                x_train = x if take == len(x) else x[np.sort(np.random.default_rng(0).choice(len(x), take, replace=False))]
                index.train(x_train)
            else:
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
        which is what a GPU index needs; on CPU search the store itself instead). ``"auto"``
        picks the structure from ``n`` (:func:`auto_factory`); the result keeps ``store`` for
        exact fallbacks and rescoring.
        """
        faiss = _faiss()
        n, dim = store.shape
        eff = resolve_factory(factory, n)
        if _min_train(factory) > n:
            log.warning("segment of %d vectors is too small to train %s; using Flat", n, factory)
            eff = "Flat"
        try:
            index = faiss.index_factory(dim, eff, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(f"invalid FAISS factory string {factory!r}: {e}") from e
        if not index.is_trained:
            if train_size is None and is_auto(factory) and _auto_ivf(index):
                train_size = AUTO_IVF_TRAIN_PER_LIST * _auto_ivf(index)
            if train_size is None:
                m = re.search(r"IVF(\d+)", eff)
                train_size = max(100_000, 256 * int(m.group(1)) if m else 0)
            take = min(n, int(train_size))
            rows = np.arange(n) if take == n else np.sort(np.random.default_rng(seed).choice(n, take, replace=False))
            index.train(np.ascontiguousarray(store.rows(rows)))
        for _, x in store.iter_rows(np.arange(n, dtype=np.int64), chunk_rows):
            index.add(np.ascontiguousarray(x))
        return cls(index, n, eff, store)

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
            d = cls(index, n, factory, vectors)
        elif isinstance(vectors, DenseStore):
            d = cls.build_from(vectors, "Flat")
        else:
            d = cls.build(vectors, "Flat")
        if (gpu_available() if use_gpu is None else use_gpu) and d.factory == "Flat":
            d.index = faiss.index_cpu_to_all_gpus(d.index)
            d.on_gpu = True
        return d

    def search(self, q: np.ndarray, k: int, allowed: np.ndarray | None = None,
               nprobe: int | None = None, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product. ``q`` (nq, d) float32; ``allowed`` (n,) bool or None.

        Returns scores (nq, k) float32 and local ids (nq, k) int64, -1 where there is no hit.

        An ANN index whose stored vectors are known (``self.vectors``, as segments open it)
        keeps the guarantees of an exact search where it matters: it never returns a row that
        is not allowed (a FAISS selector), it returns ``min(k, allowed rows)`` hits (a query
        that came back short is answered by an exact scan of the allowed rows, and so is every
        query when fewer than :data:`ANN_MIN_ALLOWED` of the rows are allowed), and its scores
        are the exact scores over the stored values (it fetches ``RESCORE_FACTOR * k`` rows and
        rescores them). ``nprobe`` / ``ef_search`` default to :func:`search_effort`.
        """
        q = np.ascontiguousarray(q, dtype=np.float32)
        nq = len(q)
        scores = np.zeros((nq, k), np.float32)
        ids = np.full((nq, k), -1, np.int64)
        n_allowed = self.n if allowed is None else int(allowed.sum())
        if n_allowed == 0 or nq == 0:
            return scores, ids
        kk = min(k, self.n)
        store = self.vectors if isinstance(self.vectors, DenseStore) else None
        ann = self.factory != "Flat" and store is not None and not self.on_gpu
        if ann and n_allowed < ANN_MIN_ALLOWED * self.n:
            s, i = store.search(q, kk, None if n_allowed == self.n else allowed)
        elif ann:
            fetch = min(self.n, RESCORE_FACTOR * kk)
            ef, npr = search_effort(kk, n_allowed / self.n, ef_search, nprobe, self._nlist())
            ef = max(ef, fetch)
            with _threads_for(nq, self.on_gpu):
                s, i = self._search(q, fetch, allowed, n_allowed, npr, ef)
            s, i = self._rescore(store, q, i, kk)
            need = min(kk, n_allowed)
            short = np.flatnonzero((i[:, :need] < 0).any(axis=1)) if need else np.zeros(0, np.int64)
            if short.size:  # the walk found too few allowed rows: exact for those queries
                s[short], i[short] = store.search(q[short], kk, None if n_allowed == self.n else allowed)
        else:
            ef, npr = search_effort(kk, n_allowed / self.n, ef_search, nprobe, self._nlist())
            with _threads_for(nq, self.on_gpu):
                s, i = self._search(q, kk, allowed, n_allowed, npr, ef)
        scores[:, :kk] = np.where(i >= 0, s, 0)
        ids[:, :kk] = i
        return scores, ids

    def _nlist(self) -> int | None:
        if self.on_gpu or self.factory == "Flat":
            return None
        faiss = _faiss()
        base = faiss.downcast_index(self.index)
        while isinstance(base, faiss.IndexPreTransform):
            base = faiss.downcast_index(base.index)
        return int(base.nlist) if isinstance(base, faiss.IndexIVF) else None

    @staticmethod
    def _rescore(store: DenseStore, q: np.ndarray, ids: np.ndarray, k: int):
        """Exact scores over ``store`` of the found ``ids`` ``(nq, f)`` (-1 = none); the best
        ``k`` per query, best first, ties to the lower row, padded with 0 / -1."""
        nq = len(q)
        out_s = np.zeros((nq, k), np.float32)
        out_i = np.full((nq, k), -1, np.int64)
        found = ids >= 0
        if not found.any():
            return out_s, out_i
        uniq, inv = np.unique(ids[found], return_inverse=True)
        vecs = store.rows(uniq)  # (u, d) float32, each row decoded once for the whole batch
        pos = np.zeros(ids.shape, np.int64)
        pos[found] = inv
        for r in range(nq):
            f = found[r]
            if not f.any():
                continue
            rows, sc = ids[r][f], vecs[pos[r][f]] @ q[r]
            order = np.lexsort((rows, -sc))[:k]
            out_s[r, :order.size] = sc[order]
            out_i[r, :order.size] = rows[order]
        return out_s, out_i

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
