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
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np

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


def _min_train(factory: str) -> int:
    m = re.search(r"IVF(\d+)", factory)
    return 39 * int(m.group(1)) if m else 0


class DenseIndex:
    """FAISS inner-product index over one segment's ``(n, d)`` float32 vectors (local row ids)."""

    def __init__(self, index, n: int, factory: str):
        self.index = index
        self.n = n
        self.factory = factory
        self.on_gpu = False

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
        return cls(index, len(x), eff)

    def save(self, folder: Path) -> None:
        """Write ``dense.faiss`` unless the index is Flat (then dense.npy is enough)."""
        if self.factory != "Flat":
            _faiss().write_index(self.index, str(folder / FAISS_FILE))

    @classmethod
    def load(cls, folder: Path, vectors: np.ndarray, factory: str, use_gpu: bool | None = None) -> DenseIndex:
        """Open a segment's index: read ``dense.faiss`` or rebuild Flat from ``vectors``."""
        faiss = _faiss()
        if (folder / FAISS_FILE).exists():
            d = cls(faiss.read_index(str(folder / FAISS_FILE)), len(vectors), factory)
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
        if allowed is None or n_allowed == self.n:
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
        faiss = _faiss()
        base = faiss.downcast_index(self.index)
        if isinstance(base, faiss.IndexIVF):
            return faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        if isinstance(base, faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(sel=sel, efSearch=ef_search)
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def _overfetch(self, q, k, allowed, n_allowed):
        fetch = min(self.n, max(4 * k, k + self.n - n_allowed))
        s, i = self.index.search(q, fetch)
        out_s = np.zeros((len(q), k), np.float32)
        out_i = np.full((len(q), k), -1, np.int64)
        for r in range(len(q)):
            ok = (i[r] >= 0) & allowed[np.maximum(i[r], 0)]
            take = np.flatnonzero(ok)[:k]
            out_s[r, : len(take)] = s[r, take]
            out_i[r, : len(take)] = i[r, take]
        return out_s, out_i
