"""hybridsearch._blas: single-query searches hold the process's BLAS libraries to one thread."""

import threading

import numpy as np
import pytest

threadpoolctl = pytest.importorskip("threadpoolctl")

from hybridsearch import _blas  # noqa: E402


def _blas_threads():
    """Thread counts of the process-wide BLAS libraries (OpenMP-threaded ones, per thread, and
    which single queries do not call, are not limited)."""
    return sorted({i["num_threads"] for i in threadpoolctl.threadpool_info()
                   if i["user_api"] == "blas" and i.get("threading_layer") != "openmp"})


def test_one_blas_thread_limits_and_restores():
    np.ones((64, 64)) @ np.ones((64, 64))  # BLAS loaded
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        assert _blas_threads() == [2]
        with _blas.one_blas_thread():
            assert _blas_threads() == [1]
            with _blas.one_blas_thread():  # nested
                assert _blas_threads() == [1]
            assert _blas_threads() == [1]  # the outer scope still holds the limit
        assert _blas_threads() == [2]


def test_one_blas_thread_shared_by_concurrent_searches():
    """Overlapping scopes in several threads: the limit holds until the last one leaves."""
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        inside, release, seen = threading.Barrier(5), threading.Event(), []

        def search():
            with _blas.one_blas_thread():
                inside.wait(timeout=30)
                release.wait(timeout=30)
                seen.append(_blas_threads())

        threads = [threading.Thread(target=search) for _ in range(4)]
        for t in threads:
            t.start()
        inside.wait(timeout=30)
        assert _blas_threads() == [1]
        release.set()
        for t in threads:
            t.join(timeout=30)
        assert seen == [[1]] * 4
        assert _blas_threads() == [2]
        assert _blas._depth == 0


def test_search_runs_under_the_limit(monkeypatch, tmp_path, m3_encoder):
    """Hybrid searches, single or batched, run inside one_blas_thread (BLAS on one thread: MaxSim's
    pool needs the cores); dense searches only below BLAS_THREADS_FROM queries (a larger dense
    batch keeps every thread); the limit is lifted afterwards."""
    from hybridsearch import HybridIndex
    from hybridsearch.index import hybrid

    idx = HybridIndex.create(tmp_path / "idx", m3_encoder)
    idx.add([{"id": f"d{i}", "text": f"document number {i} about topic {i % 7}"} for i in range(50)])
    seen = []
    real_hybrid, real_dense = hybrid.HybridIndex._hybrid, hybrid.HybridIndex._dense_topk

    def spy_hybrid(self, *a, **kw):
        seen.append(("hybrid", _blas_threads()))
        return real_hybrid(self, *a, **kw)

    def spy_dense(self, *a, **kw):
        seen.append(("dense", _blas_threads()))
        return real_dense(self, *a, **kw)

    monkeypatch.setattr(hybrid.HybridIndex, "_hybrid", spy_hybrid)
    monkeypatch.setattr(hybrid.HybridIndex, "_dense_topk", spy_dense)
    batch = ["topic 1", "topic 2", "topic 3", "topic 4"]
    assert len(batch) >= _blas.BLAS_THREADS_FROM
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        hits = idx.search("document about topic 3", k=5)
        assert len(hits) == 5 and seen[0] == ("hybrid", [1])
        assert _blas_threads() == [2]
        seen.clear()
        idx.search_batch(batch, k=5)
        assert seen[0] == ("hybrid", [1])
        seen.clear()
        idx.search("topic 2", k=5, mode="dense")
        assert seen == [("dense", [1])]
        seen.clear()
        idx.search_batch(batch, k=5, mode="dense")
        assert seen == [("dense", [2])]
        assert _blas_threads() == [2]
    idx.close()
