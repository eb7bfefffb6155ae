"""One BLAS thread for the small matrix products of a search.

A query multiplies a few dozen vectors by matrices of a few hundred rows (the ColBERT query's
rotation and centroid scores, dense rescoring). OpenBLAS splits even those over its threads, and
its worker threads then keep spinning for a while after the call: on this project's 2-core
machine the spinning thread took the core that ColBERT's rescoring pool needed next, and the
pool's 2 threads ran no faster than 1 (``bench/results/query_speed_1m.md``).

:func:`one_blas_thread` sets the process's BLAS libraries to one thread while at least one
search inside it runs, and restores their setting when the last one ends. :func:`search_scope`
says which searches enter it: hybrid and ColBERT searches, batched or not, and dense searches of
fewer than :data:`BLAS_THREADS_FROM` queries; dense batches, BM25, sparse and index builds keep
every thread. The setting is process-wide (OpenBLAS's pthreads build has no other): other BLAS
work running meanwhile gets one thread until the search ends, which changes its speed, never
its results. Libraries threaded by OpenMP (per-thread settings, only FAISS's own
OpenBLAS here, which single queries do not call) are left alone.

The libraries are found through threadpoolctl (without it, nothing is limited), again whenever
modules were imported since the last look (a library loaded later is limited too).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

#: dense searches of fewer queries than this run with one BLAS thread (as FAISS's single queries
#: run on one OpenMP thread: ``retrievers.dense.SINGLE_THREAD_BELOW``)
BLAS_THREADS_FROM = 4

_lock = threading.Lock()
_libs: list | None = None  # [(get, set)] of each limited library, made on first use
_seen_modules = -1  # len(sys.modules) when _libs was made
_depth = 0  # searches inside one_blas_thread()
_saved: list = []  # thread counts to restore


def _find() -> list:
    try:
        from threadpoolctl import ThreadpoolController

        found = ThreadpoolController().select(user_api="blas").lib_controllers
    except Exception:  # no threadpoolctl, or a library it cannot read: leave BLAS be
        return []
    out = []
    for lc in found:
        if getattr(lc, "threading_layer", None) == "openmp":
            continue
        # threadpoolctl lets one Python thread alone set a pthreads OpenBLAS (its "controlling
        # thread"); searches run in many threads, so take the library's own setter when there.
        setter = getattr(lc, "_real_set_num_threads", None) or lc.set_num_threads
        out.append((lc.get_num_threads, setter))
    return out


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the block with the process's BLAS libraries on one thread (nested and concurrent
    uses share one limit; the original thread counts come back when the last one leaves)."""
    global _libs, _seen_modules, _depth, _saved
    with _lock:
        if _depth == 0:
            if _libs is None or _seen_modules != len(sys.modules):
                _seen_modules = len(sys.modules)
                _libs = _find()
            _saved = []
            for get, put in _libs:
                try:
                    n = get()
                    if n is None or n == 1:
                        continue
                    put(1)
                except Exception:
                    continue
                _saved.append((put, n))
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for put, n in _saved:
                    try:
                        put(n)
                    except Exception:
                        pass
                _saved = []


def search_scope(mode: str, n_queries: int):
    """The BLAS scope a search runs in: :func:`one_blas_thread` for hybrid and ColBERT searches,
    batched or not (MaxSim's pool needs the cores that OpenBLAS's idle workers spin on: a hybrid
    batch of 30 queries at 100k ran 1.2-1.3x faster on one BLAS thread), and for dense searches
    of fewer than :data:`BLAS_THREADS_FROM` queries (larger dense batches gain from BLAS
    threads); BM25 and learned sparse run no BLAS."""
    if mode in ("hybrid", "colbert") or (mode == "dense" and n_queries < BLAS_THREADS_FROM):
        return one_blas_thread()
    return nullcontext()
