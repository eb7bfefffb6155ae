"""The outermost ASGI layer: checks made from the headers alone, before a body is read, plus
the access log, the metrics of every request and the ``X-Worker`` header.

* 503 while the server shuts down (``/health`` still answers);
* 401 / 403 for a missing, wrong or read-only key (:mod:`.auth`), so a stranger's body is never
  read or parsed;
* 411 for a chunked body (no Content-Length), 400 for an unusable Content-Length;
* 413 when Content-Length is over the limit (a smaller one for /search, whose queries are
  short): the body is never read (uvicorn drops what the client still sends, within the
  request deadline), so a 7 MB query costs the server nothing;
* 415 for a body that is not ``application/json``: HTML forms and ``text/plain`` are what a
  browser may send cross-site without asking first, so refusing them keeps other web pages
  from writing to a server on localhost.
"""

from __future__ import annotations

import json
import math
import os
import time

from . import auth
from .errors import ApiError

_JSON_TYPES = (b"application/json",)


def json_bytes(obj) -> bytes:
    """Compact UTF-8 JSON; lone surrogates (in an error message, say) are \\u-escaped."""
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _is_json(content_type: bytes) -> bool:
    mt = content_type.split(b";")[0].strip().lower()
    return mt in _JSON_TYPES or (mt.startswith(b"application/") and mt.endswith(b"+json"))


class Guard:
    """ASGI middleware around the FastAPI app; see the module docstring."""

    def __init__(self, app, runtime) -> None:
        self.app = app
        self.rt = runtime
        self.pid = str(os.getpid()).encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        info = {"status": 0, "bytes": 0, "done": False}
        state = scope.setdefault("state", {})
        pid = self.pid

        def finish() -> None:
            if not info["done"]:
                info["done"] = True
                self.rt.finished(scope, state, info["status"] or 500, info["bytes"], time.perf_counter() - t0)

        async def send_(message) -> None:
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-worker", pid)]}
            elif message["type"] == "http.response.body":
                info["bytes"] += len(message.get("body", b""))
                if not message.get("more_body", False):
                    finish()  # logged before the client can have the whole answer
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                status, msg, headers = refusal
                await _answer(send_, status, {"error": msg}, headers)
            else:
                await self.app(scope, receive, send_)
        finally:
            finish()

    def _refusal(self, scope) -> tuple[int, str, tuple] | None:
        path = scope["path"]
        if self.rt.stopping and path != "/health":
            return 503, "the server is shutting down", ((b"connection", b"close"),)
        lengths, chunked, ctype, authorization = [], False, None, None
        for k, v in scope["headers"]:
            if k == b"content-length":
                lengths.append(v)
            elif k == b"transfer-encoding":
                chunked = True
            elif k == b"content-type":
                ctype = v
            elif k == b"authorization":
                authorization = v
        write = auth.PROTECTED.get((scope["method"], path))
        if write is not None:  # the key before anything else: no body is read for a stranger
            try:
                auth.check(self.rt.settings, None if authorization is None else authorization.decode("latin-1"),
                           write)
            except ApiError as e:
                return e.status, e.message, tuple((k.lower().encode(), v.encode()) for k, v in e.headers.items())
        if chunked:
            return 411, "chunked request bodies are not supported; send a Content-Length header", ()
        if not lengths:
            return None
        if len(set(lengths)) != 1 or not lengths[0].strip().isdigit() or len(lengths[0].strip()) > 19:
            return 400, "invalid Content-Length header", ((b"connection", b"close"),)
        n = int(lengths[0])
        limit = self.rt.settings.max_body_bytes
        if n > limit:
            return 413, f"request body of {n} bytes is over the limit of {limit} bytes", ()
        search_limit = self.rt.settings.max_search_body_bytes
        if path == "/search" and n > search_limit:  # no valid search is that large: refuse unread
            return 413, (f"search request body of {n} bytes is over the limit of {search_limit} bytes "
                         f"(a query may have {self.rt.settings.max_query_chars} characters)"), ()
        if n > 0 and scope["method"] == "POST" and (ctype is None or not _is_json(ctype)):
            got = "no Content-Type" if ctype is None else f"Content-Type {ctype.decode('latin-1')!r}"
            return 415, f"request bodies are JSON: send 'Content-Type: application/json' ({got} given)", ()
        return None


async def _answer(send, status: int, obj, headers=()) -> None:
    body = json_bytes(obj)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def finite(x) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)
