"""Prometheus metrics for ``GET /metrics`` (prometheus-client, text format 0.0.4).

* ``hybridsearch_requests_total{endpoint, method, mode, status}`` and
  ``hybridsearch_request_seconds{endpoint, mode}`` (histogram) for every request;
* ``hybridsearch_errors_total{endpoint, status}`` for answers of 400 and above;
* ``hybridsearch_encode_seconds{mode}`` and ``hybridsearch_search_seconds{mode}``: per search
  request, the time spent encoding the queries and the time spent searching the index;
* ``hybridsearch_documents``, ``hybridsearch_segments``, ``hybridsearch_index_generation``,
  ``hybridsearch_deleted_pending_compaction``: read from the index when scraped.

Several workers (``--workers N``): the parent points ``PROMETHEUS_MULTIPROC_DIR`` at a private
temporary folder before starting them, each worker writes its counters there, and a scrape of
any worker sums them all. The index gauges come from the scraping worker's view of the folder,
which follows every worker's commits.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _IndexCollector:
    """Gauges read from the index at scrape time (documents, segments, generation)."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime

    def collect(self):
        index = self.runtime.index
        if index is None or index.closed:
            return
        st = index.stats()
        for name, key, doc in (
                ("hybridsearch_documents", "documents", "live documents in the index"),
                ("hybridsearch_segments", "segments", "segments of the current generation"),
                ("hybridsearch_index_generation", "generation", "generation (commit number) of the index"),
                ("hybridsearch_deleted_pending_compaction", "deleted_pending_compaction",
                 "deleted documents still stored until a merge or compaction")):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(st[key]))
            yield g


class Metrics:
    """The server's metrics; one object per app."""

    def __init__(self, runtime) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        # In multiprocess mode the values live in files; a scrape builds a fresh registry that
        # reads them all. Otherwise the metrics live in this app's own registry (not the global
        # one, so tests can make several apps in one process).
        self._own = None if self.multiprocess else CollectorRegistry(auto_describe=True)
        reg = self._own
        self.requests = Counter("hybridsearch_requests", "HTTP requests answered",
                                ["endpoint", "method", "mode", "status"], registry=reg)
        self.latency = Histogram("hybridsearch_request_seconds", "time from request to response",
                                 ["endpoint", "mode"], buckets=_LATENCY_BUCKETS, registry=reg)
        self.errors = Counter("hybridsearch_errors", "HTTP answers of status 400 and above",
                              ["endpoint", "status"], registry=reg)
        self.encode = Histogram("hybridsearch_encode_seconds", "time encoding the queries of a search request",
                                ["mode"], buckets=_LATENCY_BUCKETS, registry=reg)
        self.search = Histogram("hybridsearch_search_seconds",
                                "time searching the index for a search request (encoding excluded)",
                                ["mode"], buckets=_LATENCY_BUCKETS, registry=reg)
        self._index = _IndexCollector(runtime)
        if reg is not None:
            reg.register(self._index)

    def observe(self, endpoint: str, method: str, mode: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, mode, str(status)).inc()
        self.latency.labels(endpoint, mode).observe(seconds)
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()

    def render(self) -> bytes:
        """The text exposition of every metric (all workers' in multiprocess mode)."""
        if not self.multiprocess:
            return generate_latest(self._own)
        from prometheus_client import multiprocess

        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        reg.register(self._index)
        return generate_latest(reg)
