"""What a running app holds: settings, the index (or why it is not open), limiters, the log
(written by a thread, so a stuck stderr never stalls the event loop) and the metrics."""

from __future__ import annotations

import queue
import threading
import time
import traceback
from typing import TextIO

import anyio

from ..index.hybrid import HybridIndex
from .errors import ApiError
from .guard import json_bytes
from .metrics import Metrics
from .settings import Settings

LOG_QUEUE = 10_000  # log lines waiting for stderr before new ones are dropped


class Runtime:
    """What the app holds while it runs: settings, the index, limiters, log and metrics."""

    def __init__(self, settings: Settings, index: HybridIndex | None, log: TextIO | None, *,
                 index_dir: str | None = None, model: str | None = None) -> None:
        self.settings = settings
        self.index = index
        self.owns_index = index is None
        self.index_dir, self.model = index_dir, model
        self.open_error: str | None = None
        self.stopping = False
        self.log_stream = log
        self._log_lock = threading.Lock()
        self._log_lines: queue.Queue[str] = queue.Queue(maxsize=LOG_QUEUE)
        self._log_dropped = 0
        self._log_writer: threading.Thread | None = None
        self.metrics = Metrics(self)
        self.search_limiter: anyio.CapacityLimiter | None = None  # made on the event loop
        self.write_limiter: anyio.CapacityLimiter | None = None

    def log(self, line: str) -> None:
        """Queue one log line. A thread writes them, so a slow or stuck stderr (a full pipe nobody
        reads) never stalls the event loop; past ``LOG_QUEUE`` waiting lines, lines are dropped
        and counted."""
        if self.log_stream is None:
            return
        with self._log_lock:
            if self._log_writer is None:
                self._log_writer = threading.Thread(target=self._write_log, name="hybridsearch-log", daemon=True)
                self._log_writer.start()
        try:
            self._log_lines.put_nowait(line if line.endswith("\n") else line + "\n")
        except queue.Full:
            self._log_dropped += 1

    def _write_log(self) -> None:
        while True:
            line = self._log_lines.get()
            try:
                if self._log_dropped:
                    n, self._log_dropped = self._log_dropped, 0
                    self.log_stream.write(json_bytes({"event": "log_lines_dropped", "lines": n}).decode() + "\n")
                self.log_stream.write(line)
                self.log_stream.flush()
            except (OSError, ValueError):  # a closed stream: logging never fails a request
                pass
            finally:
                self._log_lines.task_done()

    def flush_log(self, timeout: float = 5.0) -> bool:
        """Wait (up to ``timeout`` s) until every queued log line is written; True when done."""
        deadline = time.monotonic() + timeout
        while self._log_lines.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def need_index(self) -> HybridIndex:
        if self.index is None:
            why = f"the index could not be opened: {self.open_error}" if self.open_error else \
                "the index is still opening"
            raise ApiError(503, why, headers={"Retry-After": "1"})
        return self.index

    def finished(self, scope, state: dict, status: int, nbytes: int, seconds: float) -> None:
        """Called once per request when its response is out: metrics and the access log."""
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "other"
        mode = state.get("hs_mode", "")
        self.metrics.observe(endpoint, scope["method"], mode, status, seconds)
        if not self.settings.access_log:
            return
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
                 "client": (scope.get("client") or ("-",))[0], "method": scope["method"],
                 "path": scope["path"], "status": status, "ms": round(seconds * 1000, 2), "bytes": nbytes}
        if mode:
            entry["mode"] = mode
        if "hs_queries" in state:
            entry["queries"] = state["hs_queries"]
        if self.settings.log_queries and "hs_query" in state:
            entry["query"] = state["hs_query"]
        self.log(json_bytes(entry).decode("utf-8", "replace"))

    def note_slow_client(self, client) -> None:
        self.log(json_bytes({"event": "request_timeout", "client": (client or ("-",))[0],
                             "seconds": self.settings.request_timeout_s}).decode())

    def open_index(self) -> None:
        """Open ``index_dir`` (in a thread at startup); /ready is 503 until it is done."""
        try:
            self.index = HybridIndex.open(self.index_dir, self.model)
        except Exception as e:  # noqa: BLE001 - reported by /ready and every request
            self.open_error = " ".join(str(e).split()) or type(e).__name__
            self.log(f"cannot open the index {self.index_dir}:\n{traceback.format_exc()}")
