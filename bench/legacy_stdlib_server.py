# The standard-library HTTP server as it was before the switch to FastAPI (issue 14), kept so that
# bench/bench_server_load.py can measure it side by side with the new one in one run. A copy of
# hybridsearch/server.py at commit 90df51f with absolute imports, its one search call moved to
# search / search_batch, and a __main__ (python bench/legacy_stdlib_server.py DIR --port P).
# Not part of the package; not maintained beyond running.
"""HTTP JSON API over one :class:`~hybridsearch.index.hybrid.HybridIndex` (standard library only).

Endpoints (the full contract is :data:`OPENAPI`, served at ``GET /openapi.json``)::

    GET  /health        {"status": "ok", "documents": n}
    GET  /stats         HybridIndex.stats()
    GET  /openapi.json  this API as an OpenAPI 3.1 document
    POST /search        {"query": str | [str], "k", "mode", "weights", "filter", "candidates",
                         "fusion", "normalize"} -> {"hits": [...]} or {"results": [[...], ...]}
    POST /add           {"documents": [{"id", "text", "metadata"}], "upsert": false}
    POST /delete        {"ids": [...]}
    POST /compact       {}   merge every segment into one (drops deleted documents)

Errors are JSON ``{"error": "..."}``: 400 malformed JSON or a wrong shape (also ValueError /
TypeError raised by the index), 404 unknown route or unknown id, 405 wrong method, 411 no
Content-Length, 413 body over the limit (decided from Content-Length, before the body is read),
503 shutting down, or the index's writer lock not obtained in time (with Retry-After), 507 the
disk is full (ENOSPC / EDQUOT; the previous commit is intact), 500 anything unexpected (the
traceback goes to the log; the server keeps running).

Options a request leaves out are left to the library's defaults, so a query ranks the same over
HTTP as ``index.search(query)`` in Python.

Concurrency: :class:`http.server.ThreadingHTTPServer` gives each connection a thread. Searches
read the index's immutable snapshot, so they run while a write is in progress; writes are
serialised by the index itself (an in-process lock plus a file lock). A write that answered 200
is committed to disk.

There is no authentication: the server binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import errno
import json
import math
import re
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO
from urllib.parse import urlsplit

from hybridsearch._version import __version__
from hybridsearch.errors import DiskFullError, HybridSearchError, IndexLockedError
from hybridsearch.index.filters import check_filter
from hybridsearch.index.hybrid import MODES, HybridIndex, _check_query_inputs

__all__ = ["DEFAULT_MAX_BODY_BYTES", "OPENAPI", "ROUTES", "HybridSearchServer", "make_server", "serve"]

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_REQUEST_TIMEOUT_S = 30.0
MAX_K = 1000  # hits per query; bounds the arrays a request can make the index allocate
MAX_CANDIDATES = 10_000
MAX_QUERIES = 64  # queries in one batched search request
LOCKED_RETRY_AFTER_S = 1  # Retry-After of a 503 when the index's writer lock was busy
CHANNEL_NAMES = ("dense", "sparse", "colbert", "bm25")
# After refusing a body without reading it, read and discard at most this much (for at most this
# long) before closing, so that the client sees the response instead of a connection reset.
_DRAIN_MAX_BYTES = 16 * 1024 * 1024
_DRAIN_SECONDS = 2.0
_STDERR = object()  # "sys.stderr at the time of the call" (pytest and others swap it)


class ApiError(Exception):
    """An error answered to the client as ``{"error": message}`` with an HTTP status."""

    def __init__(self, status: int, message: str, *, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.headers = headers


# --------------------------------------------------------------------------- request validation


def _object(body: Any, what: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, f"{what} must be a JSON object, got {_json_type(body)}")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ApiError(400, f"{what}: unknown field(s) {unknown}; allowed fields are {list(allowed)}")
    missing = [f for f in required if f not in body]
    if missing:
        raise ApiError(400, f"{what}: missing required field(s) {missing}")
    return body


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object" if isinstance(v, dict) else type(v).__name__


def _int(v: Any, name: str, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ApiError(400, f"{name!r} must be an integer from {lo} to {hi}, got {v!r}")
    return v


def _enum(v: Any, name: str, values: tuple[str, ...]) -> str:
    if v not in values or not isinstance(v, str):
        raise ApiError(400, f"{name!r} must be one of {list(values)}, got {v!r}")
    return v


def _parse_search(body: Any) -> tuple[str | list[str], dict]:
    fields = ("query", "k", "mode", "weights", "filter", "candidates", "fusion", "normalize")
    body = _object(body, "search request", fields, ("query",))
    q = body["query"]
    if isinstance(q, list):
        if not 1 <= len(q) <= MAX_QUERIES or not all(isinstance(x, str) for x in q):
            raise ApiError(400, f"'query' must be a string or a list of 1 to {MAX_QUERIES} strings")
    elif not isinstance(q, str):
        raise ApiError(400, f"'query' must be a string or a list of strings, got {_json_type(q)}")
    # Only what the request says: every option left out keeps the library's default (e.g.
    # candidates: 100 for BGE-M3, 1000 for a dense-only model), as in index.search(query).
    kw: dict[str, Any] = {}
    if "k" in body:
        kw["k"] = _int(body["k"], "k", 1, MAX_K)
    if "mode" in body:
        kw["mode"] = _enum(body["mode"], "mode", MODES)
    if body.get("candidates") is not None:
        kw["candidates"] = _int(body["candidates"], "candidates", 1, MAX_CANDIDATES)
    if "fusion" in body:
        kw["fusion"] = _enum(body["fusion"], "fusion", ("weighted", "rrf"))
    w = body.get("weights")
    if w is not None:
        if not isinstance(w, dict):
            raise ApiError(400, f"'weights' must be an object of channel -> number, got {_json_type(w)}")
        for c, x in w.items():
            _enum(c, "weights key", CHANNEL_NAMES)
            if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) or x < 0:
                raise ApiError(400, f"weight of {c!r} must be a finite number >= 0, got {x!r}")
        kw["weights"] = w
    f = body.get("filter")
    if f is not None:
        if not isinstance(f, dict):
            raise ApiError(400, f"'filter' must be an object, got {_json_type(f)}")
        kw["filter"] = check_filter(f)  # operators and values (ValueError / TypeError -> 400)
    n = body.get("normalize")
    if n is not None:
        if not isinstance(n, list):
            raise ApiError(400, f"'normalize' must be a list of channel names, got {_json_type(n)}")
        kw["normalize"] = [_enum(c, "normalize item", CHANNEL_NAMES) for c in n]
    return q, kw


def _parse_add(body: Any) -> tuple[list[dict], bool]:
    body = _object(body, "add request", ("documents", "upsert"), ("documents",))
    docs = body["documents"]
    if not isinstance(docs, list) or not docs:
        raise ApiError(400, "'documents' must be a non-empty list of {id, text, metadata} objects")
    for n, d in enumerate(docs):
        _object(d, f"documents[{n}]", ("id", "text", "metadata"), ("id", "text"))
        if not isinstance(d["id"], str) or not d["id"]:
            raise ApiError(400, f"documents[{n}].id must be a non-empty string, got {d['id']!r}")
        if not isinstance(d["text"], str):
            raise ApiError(400, f"documents[{n}].text must be a string, got {_json_type(d['text'])}")
        md = d.get("metadata")
        if md is not None and not isinstance(md, dict):
            raise ApiError(400, f"documents[{n}].metadata must be an object, got {_json_type(md)}")
    upsert = body.get("upsert", False)
    if not isinstance(upsert, bool):
        raise ApiError(400, f"'upsert' must be true or false, got {upsert!r}")
    return docs, upsert


def _parse_delete(body: Any) -> list[str]:
    body = _object(body, "delete request", ("ids",), ("ids",))
    ids = body["ids"]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) and i for i in ids):
        raise ApiError(400, "'ids' must be a non-empty list of non-empty strings")
    return ids


# --------------------------------------------------------------------------- endpoints


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _hit_json(h) -> dict:
    out = {"id": h.id, "score": _finite(h.score), "text": h.text, "metadata": h.metadata,
           "scores": {c: _finite(s) for c, s in h.scores.items()}}
    if getattr(h, "rerank_score", None) is not None:
        out["rerank_score"] = _finite(h.rerank_score)
    return out


def _health(index: HybridIndex, body: Any) -> tuple[int, dict]:
    return 200, {"status": "ok", "documents": len(index)}


def _stats(index: HybridIndex, body: Any) -> tuple[int, dict]:
    return 200, index.stats()


def _openapi(index: HybridIndex, body: Any) -> tuple[int, dict]:
    return 200, OPENAPI


def _search(index: HybridIndex, body: Any) -> tuple[int, dict]:
    query, kw = _parse_search(body)
    # blank queries, lone surrogates, weights of channels this index lacks: 400 before encoding
    _check_query_inputs(query, kw.get("weights"), index.channels)
    res = index.search(query, **kw) if isinstance(query, str) else index.search_batch(query, **kw)
    if isinstance(query, str):
        return 200, {"hits": [_hit_json(h) for h in res]}
    return 200, {"results": [[_hit_json(h) for h in hits] for hits in res]}


def _add(index: HybridIndex, body: Any) -> tuple[int, dict]:
    docs, upsert = _parse_add(body)
    n = index.upsert(docs) if upsert else index.add(docs)
    return 200, {"added": n, "upsert": upsert, "documents": len(index)}


def _delete(index: HybridIndex, body: Any) -> tuple[int, dict]:
    ids = _parse_delete(body)
    try:
        n = index.delete(ids)
    except KeyError as e:  # unknown ids: nothing was deleted
        raise ApiError(404, str(e.args[0]) if e.args else "unknown id") from e
    return 200, {"deleted": n, "documents": len(index)}


def _compact(index: HybridIndex, body: Any) -> tuple[int, dict]:
    if body not in (None, {}):
        raise ApiError(400, "compact takes no parameters: send {} or no body")
    index.compact()
    st_ = index.stats()
    return 200, {"documents": st_["documents"], "segments": st_["segments"]}


Endpoint = Callable[[HybridIndex, Any], tuple[int, dict]]

#: path -> method -> handler. Every route here is documented in :data:`OPENAPI` (a test checks).
ROUTES: dict[str, dict[str, Endpoint]] = {
    "/health": {"GET": _health},
    "/stats": {"GET": _stats},
    "/openapi.json": {"GET": _openapi},
    "/search": {"POST": _search},
    "/add": {"POST": _add},
    "/delete": {"POST": _delete},
    "/compact": {"POST": _compact},
}


# --------------------------------------------------------------------------- HTTP plumbing


class HybridSearchServer(ThreadingHTTPServer):
    """A threading HTTP server holding one index; see :func:`make_server`."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], index: HybridIndex, *,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT_S,
                 log: TextIO | None = None):
        if not isinstance(max_body_bytes, int) or isinstance(max_body_bytes, bool) or max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.index = index
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout
        self.log_stream = log
        self.stopping = False  # set while shutting down: new requests get 503
        self._log_lock = threading.Lock()
        self._idle = threading.Condition()
        self._inflight = 0
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def log(self, line: str) -> None:
        if self.log_stream is None:
            return
        with self._log_lock:
            try:
                self.log_stream.write(line if line.endswith("\n") else line + "\n")
                self.log_stream.flush()
            except (OSError, ValueError):  # closed stream: logging must never fail a request
                pass

    def _enter(self) -> None:
        with self._idle:
            self._inflight += 1

    def _leave(self) -> None:
        with self._idle:
            self._inflight -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is being handled (e.g. a write in progress); True when idle."""
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)


def _printable(s: str) -> str:
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in s)


class _Handler(BaseHTTPRequestHandler):
    server: HybridSearchServer
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries Content-Length
    server_version = f"hybridsearch/{__version__}"
    sys_version = ""

    def setup(self) -> None:
        self.timeout = self.server.request_timeout  # socket timeout: slow clients cannot hold a thread
        super().setup()

    # one access-log line per request, written once the response is out
    def handle_one_request(self) -> None:
        self._status: int | None = None
        self._nbytes = 0
        self._t0 = time.monotonic()
        try:
            super().handle_one_request()
        finally:
            if self._status is not None:
                ms = (time.monotonic() - self._t0) * 1000
                self.server.log(f'{self.client_address[0]} - - [{self.log_date_time_string()}] '
                                f'"{_printable(self.requestline)}" {self._status} {self._nbytes} {ms:.1f}ms')

    def log_request(self, code="-", size="-") -> None:
        self._status = int(code) if isinstance(code, (int, HTTPStatus)) else None

    def log_message(self, format: str, *args) -> None:
        self.server.log(_printable(f"{self.client_address[0]} - - [{self.log_date_time_string()}] "
                                   + (format % args)))

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Used by the base class (malformed request line, header too long...): answer in JSON."""
        self.close_connection = True
        self._send_json(int(code), {"error": message or HTTPStatus(code).phrase})

    def _send_json(self, status: int, obj: Any, headers: tuple[tuple[str, str], ...] = ()) -> None:
        try:
            body = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (in an error message, say): \u-escape it
            body = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers:
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
                self._nbytes = len(body)
            self.wfile.flush()
        except OSError:  # the client went away; nothing more to say to it
            self.close_connection = True

    def handle_expect_100(self) -> bool:
        """``Expect: 100-continue``: refuse an oversized body before the client sends it."""
        try:
            n = self._content_length()
        except ApiError:
            n = 0  # reported by _dispatch
        if n > self.server.max_body_bytes:
            self.close_connection = True
            self._send_json(413, {"error": self._too_large(n)})
            return False
        return super().handle_expect_100()

    def _too_large(self, n: int) -> str:
        return f"request body of {n} bytes is over the limit of {self.server.max_body_bytes} bytes"

    def _content_length(self) -> int:
        if "Transfer-Encoding" in self.headers:
            self.close_connection = True
            raise ApiError(411, "chunked request bodies are not supported; send a Content-Length header")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            return 0
        if len(set(values)) != 1 or not re.fullmatch(r"[0-9]{1,19}", values[0].strip()):
            self.close_connection = True
            raise ApiError(400, "invalid Content-Length header")
        return int(values[0])

    def _drain(self, n: int) -> None:
        """Read and drop up to ``n`` bytes (bounded in size and time) of a body we refused."""
        n = min(n, _DRAIN_MAX_BYTES)
        deadline = time.monotonic() + _DRAIN_SECONDS
        try:
            self.connection.settimeout(0.25)
            while n > 0 and time.monotonic() < deadline:
                try:
                    chunk = self.rfile.read1(min(n, 65536))
                except TimeoutError:
                    continue
                if not chunk:
                    break
                n -= len(chunk)
        except OSError:
            pass

    def _discard(self, length: int) -> None:
        """Consume a (bounded) body we do not need, so that the connection stays usable."""
        if length:
            try:
                if len(self.rfile.read(length)) < length:
                    self.close_connection = True
            except OSError:
                self.close_connection = True

    def _read_json(self, length: int) -> Any:
        try:
            data = self.rfile.read(length)
        except TimeoutError as e:
            self.close_connection = True
            raise ApiError(408, "timed out reading the request body") from e
        if len(data) < length:
            self.close_connection = True
            raise ApiError(400, f"request body ended after {len(data)} of {length} bytes")
        if not data.strip():
            raise ApiError(400, "request body is empty; send a JSON object")
        try:
            return json.loads(data, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise ApiError(400, f"request body is not valid JSON: {e}") from e

    def _dispatch(self) -> None:
        if self.server.stopping:
            self.close_connection = True
            self._send_json(503, {"error": "the server is shutting down"})
            return
        path = urlsplit(self.path).path
        route = ROUTES.get(path)
        endpoint = route.get(self.command) if route else None
        try:
            length = self._content_length()
        except ApiError as e:
            self._send_json(e.status, {"error": e.message})
            if self.close_connection:
                self._drain(_DRAIN_MAX_BYTES)
            return
        if length > self.server.max_body_bytes:
            self.close_connection = True
            self._send_json(413, {"error": self._too_large(length)})
            self._drain(length)
            return
        if endpoint is None:
            self._discard(length)
            if route is None:
                self._send_json(404, {"error": f"no route {path!r}; the API is described at GET /openapi.json"})
            else:
                allow = ", ".join(sorted(route))
                self._send_json(405, {"error": f"method {self.command} not allowed on {path}; use {allow}"},
                                (("Allow", allow),))
            return
        self.server._enter()
        try:
            if self.command == "POST":
                body = self._read_json(length)
            else:
                body = None
                self._discard(length)
            status, payload = endpoint(self.server.index, body)
            self._send_json(status, payload)
        except Exception as e:  # noqa: BLE001 - the server must survive anything a request does
            status, message, headers = self._error_answer(e)
            self._send_json(status, {"error": message}, headers)
        finally:
            self.server._leave()

    def _error_answer(self, e: Exception) -> tuple[int, str, tuple[tuple[str, str], ...]]:
        """(status, message, headers) for an exception a request raised; logs what is unexpected."""
        if isinstance(e, ApiError):
            return e.status, e.message, e.headers
        if isinstance(e, IndexLockedError):  # another writer held the lock for too long
            return 503, str(e) or "the index is locked by another writer", (
                ("Retry-After", str(LOCKED_RETRY_AFTER_S)),)
        full = disk_full_error(e)
        if full is not None:  # DiskFullError, or ENOSPC / EDQUOT however it was wrapped
            msg = disk_full_message(full)
            self.server.log(f"{_printable(self.requestline)}: {msg}")
            return 507, msg, ()
        if isinstance(e, KeyError):
            return 404, str(e.args[0]) if e.args else "not found", ()
        if isinstance(e, (ValueError, TypeError)):
            return 400, str(e), ()
        self.server.log(f"error handling {_printable(self.requestline)}:\n{traceback.format_exc()}")
        if isinstance(e, HybridSearchError):  # e.g. IndexFormatError: the message says what to do
            return 500, str(e), ()
        return 500, f"internal error ({type(e).__name__}); see the server log", ()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _dispatch


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


_DISK_FULL_ERRNOS = frozenset(x for x in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if x is not None)


def disk_full_error(e: BaseException) -> OSError | None:
    """The disk-full error behind ``e`` -- a DiskFullError, or an OSError with errno ENOSPC or
    EDQUOT, ``e`` itself or one of its causes -- or None."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DiskFullError) or (isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS):
            return e
        e = e.__cause__ or e.__context__
    return None


def disk_full_message(e: OSError) -> str:
    """``disk full (ENOSPC) writing PATH: detail`` for a disk-full error (the CLI prints the same)."""
    code = errno.errorcode.get(e.errno, "ENOSPC") if isinstance(e.errno, int) else "ENOSPC"
    path, cause, seen = e.filename, e, set()
    while path is None and cause is not None and id(cause) not in seen:  # a cause may know the file
        seen.add(id(cause))
        path = getattr(cause, "filename", None)
        cause = cause.__cause__ or cause.__context__
    detail = " ".join((e.strerror or str(e) or "No space left on device").split())
    if detail.startswith("disk full"):  # already a complete message
        return detail
    return f"disk full ({code}) writing {path}: {detail}" if path else f"disk full ({code}): {detail}"


# --------------------------------------------------------------------------- entry points


def make_server(index: HybridIndex, host: str = "127.0.0.1", port: int = 8080, *,
                max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT_S,
                log: TextIO | None | object = _STDERR) -> HybridSearchServer:
    """A bound, not yet serving, HTTP server over ``index``; call ``serve_forever()`` on it.

    Args:
        port: 0 picks a free port (read it from ``server.server_address[1]`` or ``server.url``).
        max_body_bytes: larger request bodies get 413 without being read.
        request_timeout: seconds a connection may stay silent (None: forever).
        log: stream for the access log (one line per request) and tracebacks; None is quiet.
            Defaults to ``sys.stderr``.
    """
    if not isinstance(index, HybridIndex):
        raise TypeError(f"make_server needs a HybridIndex, got {type(index).__name__}")
    return HybridSearchServer((host, port), index, max_body_bytes=max_body_bytes,
                              request_timeout=request_timeout,
                              log=sys.stderr if log is _STDERR else log)


def serve(index_dir: str, host: str = "127.0.0.1", port: int = 8080, model: str | None = None, *,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    """Open the index in ``index_dir`` and serve it until Ctrl-C or SIGTERM (blocking).

    On shutdown, requests in progress (a write, say) are given up to 60 s to finish.
    """
    index = HybridIndex.open(index_dir, model)
    try:
        server = make_server(index, host, port, max_body_bytes=max_body_bytes)
        print(f"hybridsearch {__version__}: serving {index_dir} ({len(index)} documents, model "
              f"{index.encoder.spec.name}) on {server.url}  (API: {server.url}/openapi.json)",
              file=sys.stderr, flush=True)
        if host not in ("127.0.0.1", "localhost", "::1"):
            print("warning: the API has no authentication; anyone who can reach this address can "
                  "add and delete documents", file=sys.stderr, flush=True)

        def _on_sigterm(signum, frame):
            raise KeyboardInterrupt

        old = None
        if threading.current_thread() is threading.main_thread():
            old = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)
            server.stopping = True
            if not server.wait_idle(60):
                print("warning: requests still running after 60 s; stopping anyway", file=sys.stderr)
            server.server_close()
            print("hybridsearch: server stopped", file=sys.stderr, flush=True)
    finally:
        index.close()


# --------------------------------------------------------------------------- OpenAPI document


def _error_response(description: str, example: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"},
                                             "example": {"error": example}}}}


def _json_body(schema: str, examples: dict) -> dict:
    return {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{schema}"},
        "examples": {name: {"value": v} for name, v in examples.items()}}}}


def _json_ok(description: str, schema: dict, example: Any) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": schema, "example": example}}}


_REF = "#/components/schemas/"
_ERR = "#/components/responses/"
_ERROR_REFS = {"400": "BadRequest", "405": "MethodNotAllowed", "408": "RequestTimeout",
               "411": "LengthRequired", "413": "PayloadTooLarge", "500": "InternalError",
               "503": "Unavailable", "507": "InsufficientStorage"}


def _errors(*extra: tuple[str, dict], write: bool = False, commits: bool = False) -> dict:
    """The error responses every operation can give (a GET can only get 400/411/413 from its
    headers), plus ``extra`` (status, response) pairs. ``write``: it reads a body (408);
    ``commits``: it writes to the index (507 when the disk is full)."""
    codes = ["400", "405", "408", "411", "413", "500", "503"] if write else ["400", "405", "411", "413", "500", "503"]
    if commits:
        codes.append("507")
    out = {c: {"$ref": _ERR + _ERROR_REFS[c]} for c in codes}
    out.update(extra)
    return dict(sorted(out.items()))
_CHANNEL_SCORES = {"type": "object",
                   "description": "each channel's score; null where the channel did not see the document",
                   "propertyNames": {"enum": list(CHANNEL_NAMES)},
                   "additionalProperties": {"type": ["number", "null"]}}
_EXAMPLE_HIT = {"id": "d3", "score": 0.71, "text": "ColBERT keeps one vector per token...",
                "metadata": {"title": "ColBERT"},
                "scores": {"dense": 0.62, "sparse": 0.18, "colbert": 0.74, "bm25": None}}

#: The API as an OpenAPI 3.1 document, served at ``GET /openapi.json``.
OPENAPI: dict = {
    "openapi": "3.1.0",
    "info": {
        "title": "hybridsearch",
        "version": __version__,
        "summary": "Hybrid retrieval (dense, learned sparse, ColBERT, BM25) over one index.",
        "description": (
            "JSON over HTTP. Every error is a JSON object `{\"error\": message}`. Request bodies "
            "need a Content-Length and are limited in size (413 before they are read; 8 MiB by "
            "default). There is no authentication: bind to a loopback address or put the server "
            "behind one that authenticates. A path not listed here answers 404."),
    },
    "servers": [{"url": "http://127.0.0.1:8080"}],
    "paths": {
        "/health": {"get": {
            "operationId": "health",
            "summary": "Liveness and the number of live documents.",
            "responses": {
                "200": _json_ok("The server is up.", {"$ref": _REF + "Health"},
                                {"status": "ok", "documents": 1234}),
                **_errors(),
            },
        }},
        "/stats": {"get": {
            "operationId": "stats",
            "summary": "Index statistics: model, channels, documents, tokens, bytes per channel.",
            "responses": {
                "200": _json_ok("HybridIndex.stats().", {"$ref": _REF + "Stats"}, {
                    "path": "indexes/demo", "format_version": 1, "generation": 3,
                    "model": "BAAI/bge-m3", "outputs": ["dense", "sparse", "colbert"],
                    "channels": ["dense", "sparse", "colbert", "bm25"], "documents": 1234,
                    "deleted_pending_compaction": 2, "segments": 2, "tokens": 98765,
                    "channel_bytes": {"dense": {"bytes": 5054464, "bytes_per_doc": 4096.0}}}),
                **_errors(),
            },
        }},
        "/openapi.json": {"get": {
            "operationId": "openapi",
            "summary": "This document.",
            "responses": {
                "200": {"description": "The OpenAPI 3.1 description of this API.",
                        "content": {"application/json": {"schema": {"type": "object"}}}},
                **_errors(),
            },
        }},
        "/search": {"post": {
            "operationId": "search",
            "summary": "Search one query (-> hits) or a batch of queries (-> results).",
            "description": (
                "`mode` picks one channel (`dense`, `sparse`, `colbert`, `bm25`) or fuses them "
                "(`hybrid`). A channel the index lacks (e.g. `sparse` for a dense-only model) is a "
                "400. For `hybrid`, the top `candidates` of each first-stage channel are unioned, "
                "rescored by every channel and fused by a weighted sum (`weights` are merged over "
                "the model's defaults) or reciprocal rank fusion. `filter` applies to every "
                "channel: `{\"field\": value}`, `{\"field\": {\"gte\": 1, \"lt\": 5}}`, "
                "`{\"field\": {\"in\": [...]}}`, `{\"field\": {\"ne\": x}}`."),
            "requestBody": _json_body("SearchRequest", {
                "simple": {"query": "how does late interaction score a passage?"},
                "tuned": {"query": "late interaction", "k": 5, "mode": "hybrid",
                          "weights": {"dense": 0.4, "sparse": 0.2, "colbert": 0.4, "bm25": 0.1},
                          "filter": {"year": {"gte": 2020}, "lang": "en"}, "candidates": 200,
                          "fusion": "weighted"},
                "bm25_rrf_batch": {"query": ["bm25 ranking", "photosynthesis"], "k": 3, "mode": "hybrid",
                                   "fusion": "rrf", "filter": {"title": {"in": ["BM25", "ColBERT"]}}},
                "one_channel": {"query": "inverted index", "k": 10, "mode": "bm25"},
            }),
            "responses": {
                "200": {"description": "`hits` for a string query, `results` (one list per query) for a list.",
                        "content": {"application/json": {
                            "schema": {"oneOf": [{"$ref": _REF + "SearchResponse"},
                                                 {"$ref": _REF + "BatchSearchResponse"}]},
                            "examples": {"single": {"value": {"hits": [_EXAMPLE_HIT]}},
                                         "batch": {"value": {"results": [[_EXAMPLE_HIT], []]}}}}}},
                **_errors(write=True),
            },
        }},
        "/add": {"post": {
            "operationId": "add",
            "summary": "Add documents (or replace them with upsert); one atomic commit.",
            "description": (
                "Without `upsert`, an id already in the index is a 400 and nothing is written. "
                "A 200 means the documents are committed to disk. Writes are serialised; searches "
                "keep running while a write is in progress."),
            "requestBody": _json_body("AddRequest", {
                "add": {"documents": [
                    {"id": "d1", "text": "Dense retrieval encodes a query and a passage into vectors.",
                     "metadata": {"title": "Dense retrieval", "year": 2020}},
                    {"id": "d2", "text": "BM25 is a lexical ranking function."}]},
                "upsert": {"documents": [{"id": "d1", "text": "Dense retrieval, revised.",
                                          "metadata": {"year": 2024}}], "upsert": True},
            }),
            "responses": {
                "200": _json_ok("Committed.", {"$ref": _REF + "AddResponse"},
                                {"added": 2, "upsert": False, "documents": 1236}),
                **_errors(write=True, commits=True),
            },
        }},
        "/delete": {"post": {
            "operationId": "delete",
            "summary": "Delete documents by id; one atomic commit.",
            "description": "If any id is unknown, nothing is deleted and the answer is 404.",
            "requestBody": _json_body("DeleteRequest", {"delete": {"ids": ["d1", "d2"]}}),
            "responses": {
                "200": _json_ok("Committed.", {"$ref": _REF + "DeleteResponse"},
                                {"deleted": 2, "documents": 1234}),
                **_errors(("404", _error_response("An id is not in the index; nothing was deleted.",
                                                  "1 unknown id(s), nothing deleted: ['d9']")),
                          write=True, commits=True),
            },
        }},
        "/compact": {"post": {
            "operationId": "compact",
            "summary": "Merge every segment into one, dropping deleted documents; one atomic commit.",
            "description": "Commits also merge segments as they go (a tiered policy); this rewrites "
                           "everything, renumbers documents and rebuilds BM25: minutes on a large index.",
            "requestBody": _json_body("CompactRequest", {"compact": {}}),
            "responses": {
                "200": _json_ok("Compacted.", {"$ref": _REF + "CompactResponse"},
                                {"documents": 1234, "segments": 1}),
                **_errors(write=True, commits=True),
            },
        }},
    },
    "components": {
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "additionalProperties": False,
                      "properties": {"error": {"type": "string", "description": "what went wrong"}}},
            "CompactRequest": {"type": "object", "additionalProperties": False, "maxProperties": 0},
            "CompactResponse": {"type": "object", "required": ["documents", "segments"],
                                "additionalProperties": False,
                                "properties": {"documents": {"type": "integer", "minimum": 0},
                                               "segments": {"type": "integer", "minimum": 0}}},
            "Health": {"type": "object", "required": ["status", "documents"], "additionalProperties": False,
                       "properties": {"status": {"const": "ok"},
                                      "documents": {"type": "integer", "minimum": 0}}},
            "Stats": {
                "type": "object",
                "required": ["model", "channels", "documents", "segments"],
                "properties": {
                    "path": {"type": "string"}, "format_version": {"type": "integer"},
                    "generation": {"type": "integer", "minimum": 0}, "model": {"type": "string"},
                    "outputs": {"type": "array", "items": {"enum": ["dense", "sparse", "colbert"]}},
                    "channels": {"type": "array", "items": {"enum": list(CHANNEL_NAMES)}},
                    "documents": {"type": "integer", "minimum": 0},
                    "deleted_pending_compaction": {"type": "integer", "minimum": 0},
                    "segments": {"type": "integer", "minimum": 0},
                    "tokens": {"type": "integer", "minimum": 0},
                    "channel_bytes": {"type": "object", "additionalProperties": {
                        "type": "object", "properties": {"bytes": {"type": "integer", "minimum": 0},
                                                         "bytes_per_doc": {"type": "number", "minimum": 0}}}},
                },
            },
            "Filter": {
                "type": "object",
                "description": "All conditions must hold. A document without the field fails every "
                               "condition on it except `ne`. Ranges only match numbers.",
                "additionalProperties": {"anyOf": [
                    {"not": {"type": "object"}, "description": "equality"},
                    {"type": "object", "minProperties": 1, "additionalProperties": False, "properties": {
                        "eq": {}, "ne": {}, "in": {"type": "array"},
                        "gt": {"type": "number"}, "gte": {"type": "number"},
                        "lt": {"type": "number"}, "lte": {"type": "number"}}},
                ]},
            },
            "SearchRequest": {
                "type": "object", "required": ["query"], "additionalProperties": False,
                "properties": {
                    "query": {"oneOf": [{"type": "string", "pattern": "\\S", "description": "must not be blank"},
                                        {"type": "array", "items": {"type": "string", "pattern": "\\S"},
                                         "minItems": 1, "maxItems": MAX_QUERIES}]},
                    "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10},
                    "mode": {"enum": list(MODES), "default": "hybrid"},
                    "weights": {"type": ["object", "null"], "additionalProperties": False,
                                "description": "hybrid only; merged over the model's default weights; "
                                               "a channel the index lacks is a 400",
                                "properties": {c: {"type": "number", "minimum": 0} for c in CHANNEL_NAMES}},
                    "filter": {"anyOf": [{"$ref": _REF + "Filter"}, {"type": "null"}]},
                    "candidates": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_CANDIDATES,
                                   "description": "hits each first-stage channel contributes to the hybrid "
                                                  "union (default, as in the library: 100 for BGE-M3, "
                                                  "1000 for a dense-only model)"},
                    "fusion": {"enum": ["weighted", "rrf"], "default": "weighted"},
                    "normalize": {"type": ["array", "null"], "items": {"enum": list(CHANNEL_NAMES)},
                                  "description": "channels min-max normalised per query before a weighted sum "
                                                 "(default: the model's)"},
                },
            },
            "Hit": {
                "type": "object", "required": ["id", "score", "text", "metadata", "scores"],
                "additionalProperties": False,
                "properties": {
                    "id": {"type": "string"},
                    "score": {"type": ["number", "null"],
                              "description": "the fused (hybrid) or channel score; null only if not finite"},
                    "text": {"type": "string"}, "metadata": {"type": "object"},
                    "scores": _CHANNEL_SCORES,
                    "rerank_score": {"type": ["number", "null"]},
                },
            },
            "SearchResponse": {"type": "object", "required": ["hits"], "additionalProperties": False,
                               "properties": {"hits": {"type": "array", "items": {"$ref": _REF + "Hit"}}}},
            "BatchSearchResponse": {
                "type": "object", "required": ["results"], "additionalProperties": False,
                "properties": {"results": {"type": "array", "items": {
                    "type": "array", "items": {"$ref": _REF + "Hit"}}}}},
            "Document": {
                "type": "object", "required": ["id", "text"], "additionalProperties": False,
                "properties": {"id": {"type": "string", "minLength": 1},
                               "text": {"type": "string", "minLength": 1, "pattern": "\\S",
                                        "description": "must not be blank"},
                               "metadata": {"type": ["object", "null"],
                                            "description": "JSON values; filterable by field"}},
            },
            "AddRequest": {
                "type": "object", "required": ["documents"], "additionalProperties": False,
                "properties": {"documents": {"type": "array", "minItems": 1, "items": {"$ref": _REF + "Document"},
                                             "description": "ids must be unique within the request"},
                               "upsert": {"type": "boolean", "default": False,
                                          "description": "replace documents whose id exists"}},
            },
            "AddResponse": {"type": "object", "required": ["added", "upsert", "documents"],
                            "additionalProperties": False,
                            "properties": {"added": {"type": "integer", "minimum": 1},
                                           "upsert": {"type": "boolean"},
                                           "documents": {"type": "integer", "minimum": 0,
                                                         "description": "live documents after the commit"}}},
            "DeleteRequest": {"type": "object", "required": ["ids"], "additionalProperties": False,
                              "properties": {"ids": {"type": "array", "minItems": 1,
                                                     "items": {"type": "string", "minLength": 1}}}},
            "DeleteResponse": {"type": "object", "required": ["deleted", "documents"],
                               "additionalProperties": False,
                               "properties": {"deleted": {"type": "integer", "minimum": 0},
                                              "documents": {"type": "integer", "minimum": 0}}},
        },
        "responses": {
            "BadRequest": _error_response(
                "Malformed JSON, a wrong shape, a value the index refuses (unknown mode or channel, "
                "duplicate id, bad filter...), or an invalid Content-Length header.", "'k' must be an integer from 1 to 1000, got 0"),
            "MethodNotAllowed": _error_response("Wrong method for this path; see the Allow header.",
                                                "method GET not allowed on /search; use POST"),
            "RequestTimeout": _error_response("The request body did not arrive in time.",
                                              "timed out reading the request body"),
            "LengthRequired": _error_response("No Content-Length (chunked bodies are not accepted).",
                                              "chunked request bodies are not supported; send a Content-Length header"),
            "PayloadTooLarge": _error_response(
                "The body is over the server's limit (8 MiB by default); refused before reading it.",
                "request body of 9000000 bytes is over the limit of 8388608 bytes"),
            "InternalError": _error_response("An unexpected error; the server logged it and keeps running.",
                                             "internal error (RuntimeError); see the server log"),
            "Unavailable": _error_response(
                "The server is shutting down, or (a write) another writer held the index's lock for too "
                "long: retry after the Retry-After header's seconds.", "the server is shutting down"),
            "InsufficientStorage": _error_response(
                "The disk is full (ENOSPC or EDQUOT); nothing was committed and the previous commit is "
                "intact. Free space and retry.",
                "disk full (ENOSPC) writing indexes/demo/seg-000004.tmp/dense.npy: No space left on device"),
        },
    },
}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="the pre-FastAPI stdlib server (benchmark baseline)")
    ap.add_argument("index")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--model", default=None)
    a = ap.parse_args()
    serve(a.index, a.host, a.port, a.model)
