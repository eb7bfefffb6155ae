"""The FastAPI application: routes, request parsing and error answers.

Endpoints (request and response bodies: :mod:`.schemas`; the generated contract is served at
``GET /openapi.json``)::

    GET  /health        {"status": "ok", "documents": n}    liveness (never needs a key)
    GET  /ready         {"status": "ready", ...} or 503     the index is open and not shutting down
    GET  /stats         HybridIndex.stats()
    GET  /metrics       Prometheus text format
    POST /search        one query -> {"hits": [...]}, a list -> {"results": [[...], ...]}
    POST /add           {"documents": [{"id", "text", "metadata"}], "upsert": false}
    POST /delete        {"ids": [...]}
    POST /compact       {}   merge every segment into one (drops deleted documents)
    GET  /              the search page (hybridsearch/web/index.html)
    GET  /assets/NAME   the page's files listed in hybridsearch/web/MANIFEST

Errors are ``{"error": "..."}``: 400 malformed JSON, a wrong shape or a value the index refuses,
401 / 403 a missing, wrong or read-only key, 404 unknown route or id, 405 wrong method, 411
chunked body, 413 body over the limit (from Content-Length, before reading), 415 a body that is
not JSON, 503 shutting down / index not open / writer lock busy (Retry-After), 507 disk full,
500 anything unexpected (traceback in the log; the server keeps running).

Searches run in a thread pool of ``search_threads`` (the event loop never encodes or searches);
writes run one at a time in their own thread, and the index's file lock serialises them with
other processes. A write that answered 200 is committed to disk.
"""

from __future__ import annotations

import re
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

try:
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import JSONResponse as _StarletteJSON
    from starlette.responses import PlainTextResponse, Response
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("the HTTP server needs its extra: pip install 'hybridsearch[server]'") from e

from .._version import __version__
from ..index.hybrid import HybridIndex, _check_query_inputs
from . import auth, schemas
from .errors import ApiError, error_answer
from .guard import Guard, finite, json_bytes
from .metrics import CONTENT_TYPE
from .parsing import StrictRoute, validation_message
from .protocol import APP_STATE_KEY
from .runtime import Runtime
from .settings import Settings

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
_STDERR = object()  # "sys.stderr at the time of the call" (pytest and others swap it)
_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                  ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                  ".json": "application/json", ".ico": "image/x-icon", ".txt": "text/plain; charset=utf-8"}
_ASSET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class JSONResponse(_StarletteJSON):
    """Compact UTF-8 JSON; non-finite numbers are refused, lone surrogates escaped."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


# --------------------------------------------------------------------------- app


def _hit_json(h) -> dict:
    out = {"id": h.id, "score": finite(h.score), "text": h.text, "metadata": h.metadata,
           "scores": {c: finite(s) for c, s in h.scores.items()}}
    contrib = getattr(h, "contributions", None)
    out["contributions"] = None if contrib is None else {c: finite(v) for c, v in contrib.items()}
    if getattr(h, "rerank_score", None) is not None:
        out["rerank_score"] = finite(h.rerank_score)
    return out


def _search_batch(index: HybridIndex, queries: list[str], **kw) -> list:
    batch = getattr(index, "search_batch", None)  # contract 1: search(str), search_batch(list)
    return batch(queries, **kw) if batch is not None else index.search(list(queries), **kw)


def _web_manifest() -> frozenset[str]:
    try:
        names = (WEB_DIR / "MANIFEST").read_text(encoding="utf-8").split()
    except OSError:
        return frozenset()
    return frozenset(n for n in names if _ASSET_NAME.fullmatch(n) and ".." not in n)


def _errors_doc(*codes: int) -> dict:
    what = {400: "Malformed JSON, a wrong shape, or a value the index refuses.",
            401: "No key, or a wrong one (see WWW-Authenticate).", 403: "The read key cannot write.",
            404: "Unknown route, or (delete) an unknown id: nothing was deleted.",
            405: "Wrong method for this path; see the Allow header.",
            411: "A chunked body (send a Content-Length).",
            413: "Body over the limit (8 MiB by default), refused before it is read.",
            415: "A body that is not application/json.",
            500: "Unexpected; logged, and the server keeps running.",
            503: "Shutting down, the index is not open yet, or (writes) another writer held the lock "
                 "too long: retry after Retry-After seconds.",
            507: "Disk full; nothing was committed and the previous commit is intact."}
    return {c: {"model": schemas.Error, "description": what[c]} for c in codes}


def _index_like(obj) -> bool:
    """An open index of another kind with the surface the app uses (hybridsearch.distributed's
    ShardedIndex): search, search_batch, add, upsert, delete, compact, stats, channels, encoder."""
    return not isinstance(obj, (str, Path)) and all(
        hasattr(obj, a) for a in ("search", "search_batch", "add", "upsert", "delete", "compact", "stats",
                                  "channels", "encoder", "close"))


def create_app(index: HybridIndex | str | Path, settings: Settings | None = None, *,
               model: str | None = None, log: TextIO | None | object = _STDERR):
    """The ASGI application serving ``index`` (an open HybridIndex, or a folder opened at startup).

    Args:
        settings: limits, keys, CORS... (:class:`Settings`; default: loopback, no keys).
        model: encoder for a folder (default: the one that built it).
        log: stream for the JSON access log and tracebacks (default ``sys.stderr``; None: quiet).
    Returns the app wrapped in :class:`Guard`; ``app.runtime`` is its :class:`Runtime`.
    """
    settings = settings or Settings()
    stream = sys.stderr if log is _STDERR else log
    if isinstance(index, HybridIndex) or _index_like(index):  # e.g. distributed.ShardedIndex
        rt = Runtime(settings, index, stream)
    elif isinstance(index, (str, Path)):
        rt = Runtime(settings, None, stream, index_dir=str(index), model=model)
    else:
        raise TypeError(f"create_app needs a HybridIndex or an index folder, got {type(index).__name__}")

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        rt.search_limiter = anyio.CapacityLimiter(settings.search_threads)
        rt.write_limiter = anyio.CapacityLimiter(1)
        opener = None
        if rt.index is None:
            opener = threading.Thread(target=rt.open_index, name="hybridsearch-open", daemon=True)
            opener.start()
        try:
            yield {APP_STATE_KEY: rt}
        finally:
            rt.stopping = True
            rt.flush_log(2.0)
            if rt.owns_index:
                if opener is not None:
                    opener.join()
                if rt.index is not None:
                    rt.index.close()

    api = FastAPI(title="hybridsearch", version=__version__,
                  summary="Hybrid retrieval (dense, learned sparse, ColBERT, BM25) over one index.",
                  description="JSON over HTTP. Every error is `{\"error\": message}`. Request bodies are "
                              "JSON with a Content-Length, limited in size (413 before they are read).",
                  docs_url=None, redoc_url=None, lifespan=lifespan, default_response_class=JSONResponse)
    api.router.route_class = StrictRoute
    api.router.redirect_slashes = False
    read = auth.dependencies(settings, write=False)
    write = auth.dependencies(settings, write=True)
    auth_codes = (401,) if not settings.auth else (401, 403)
    common = (400, 405, 411, 413, 415, 500, 503)
    read_errors = _errors_doc(*sorted(common + (auth_codes if settings.auth else ())))
    write_errors = _errors_doc(*sorted(common + (404, 507) + (auth_codes if settings.auth else ())))

    async def in_thread(fn, limiter=None):
        return await anyio.to_thread.run_sync(fn, limiter=limiter)

    def fail(e: BaseException, request: Request) -> JSONResponse:
        status, message, headers, unexpected = error_answer(e)
        if unexpected:
            rt.log(f"error handling {request.method} {request.url.path}:\n"
                   + "".join(traceback.format_exception(e)))
        elif status == 507:
            rt.log(f"{request.method} {request.url.path}: {message}")
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return JSONResponse({"error": validation_message(e.errors())}, status_code=400)

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        path = request.url.path
        if e.status_code == 404:
            msg = f"no route {path!r}; the API is described at GET /openapi.json"
        elif e.status_code == 405:
            allow = (e.headers or {}).get("Allow", "")
            msg = f"method {request.method} not allowed on {path}; use {allow}"
        else:
            msg = str(e.detail)
        return JSONResponse({"error": msg}, status_code=e.status_code, headers=e.headers)

    # ------------------------------------------------------------------ page

    @api.get("/", include_in_schema=False)
    async def page():
        return _file_response(WEB_DIR / "index.html")

    @api.get("/assets/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in _web_manifest():
            raise ApiError(404, f"no asset {name!r}")
        return _file_response(WEB_DIR / name)

    # ------------------------------------------------------------------ reads

    @api.get("/health", response_model=schemas.Health, responses=_errors_doc(*common), operation_id="health",
             summary="Liveness and the number of live documents (no key needed).")
    async def health(request: Request):
        if rt.index is None:  # alive, though not ready
            return JSONResponse({"status": "ok", "documents": 0})
        try:
            n = await in_thread(lambda: len(rt.index))
        except Exception as e:  # noqa: BLE001
            return fail(e, request)
        return JSONResponse({"status": "ok", "documents": n})

    @api.get("/ready", response_model=schemas.Ready, responses=_errors_doc(*common), operation_id="ready",
             summary="200 when the index is open and the server is not shutting down, else 503.")
    async def ready(request: Request):
        if rt.stopping:
            raise ApiError(503, "the server is shutting down")
        index = rt.need_index()
        try:
            st = await in_thread(lambda: (len(index), index.stats()["generation"]))
        except Exception as e:  # noqa: BLE001
            return fail(e, request)
        return JSONResponse({"status": "ready", "documents": st[0], "generation": st[1]})

    @api.get("/stats", response_model=schemas.Stats, responses=read_errors, dependencies=read,
             operation_id="stats", summary="Index statistics: model, channels, documents, bytes per channel.")
    async def stats(request: Request):
        index = rt.need_index()
        try:
            return JSONResponse(await in_thread(index.stats, rt.search_limiter))
        except Exception as e:  # noqa: BLE001
            return fail(e, request)

    @api.get("/metrics", responses=read_errors, dependencies=read, operation_id="metrics",
             response_class=PlainTextResponse,
             summary="Prometheus metrics (text format): requests, latency, errors, encode vs search time, "
                     "documents, segments, generation.")
    async def metrics(request: Request):
        try:
            body = await in_thread(rt.metrics.render)
        except Exception as e:  # noqa: BLE001
            return fail(e, request)
        return Response(body, media_type=CONTENT_TYPE)

    # ------------------------------------------------------------------ search

    @api.post("/search", response_model=schemas.SearchResponse | schemas.BatchSearchResponse,
              responses=read_errors, dependencies=read, operation_id="search",
              summary="Search one query (-> hits) or a batch of queries (-> results).")
    async def search(body: schemas.SearchRequest, request: Request):
        index = rt.need_index()
        kw = body.options()
        queries = body.queries()
        request.state.hs_mode = kw.get("mode", "hybrid")
        request.state.hs_queries = len(queries)
        if settings.log_queries:
            request.state.hs_query = body.query
        _check_limits(settings, queries, kw)
        try:
            hits = await in_thread(lambda: _run_search(rt, index, body.query, queries, kw), rt.search_limiter)
        except Exception as e:  # noqa: BLE001
            return fail(e, request)
        if isinstance(body.query, str):
            return JSONResponse({"hits": [_hit_json(h) for h in hits]})
        return JSONResponse({"results": [[_hit_json(h) for h in r] for r in hits]})

    # ------------------------------------------------------------------ writes

    @api.post("/add", response_model=schemas.AddResponse, responses=write_errors, dependencies=write,
              operation_id="add", summary="Add documents (or replace them with upsert); one atomic commit.")
    async def add(body: schemas.AddRequest, request: Request):
        index = rt.need_index()
        docs = [d.model_dump(exclude_unset=True) for d in body.documents]

        def run():
            n = index.upsert(docs) if body.upsert else index.add(docs)
            return {"added": n, "upsert": body.upsert, "documents": len(index)}

        try:
            return JSONResponse(await in_thread(run, rt.write_limiter))
        except Exception as e:  # noqa: BLE001
            return fail(e, request)

    @api.post("/delete", response_model=schemas.DeleteResponse, responses=write_errors, dependencies=write,
              operation_id="delete", summary="Delete documents by id; one atomic commit (404 if any is unknown).")
    async def delete(body: schemas.DeleteRequest, request: Request):
        index = rt.need_index()

        def run():
            return {"deleted": index.delete(body.ids), "documents": len(index)}

        try:
            return JSONResponse(await in_thread(run, rt.write_limiter))
        except Exception as e:  # noqa: BLE001
            return fail(e, request)

    @api.post("/compact", response_model=schemas.CompactResponse, responses=write_errors, dependencies=write,
              operation_id="compact",
              summary="Merge every segment into one, dropping deleted documents; one atomic commit.")
    async def compact(request: Request, body: schemas.CompactRequest | None = None):
        index = rt.need_index()

        def run():
            index.compact()
            st = index.stats()
            return {"documents": st["documents"], "segments": st["segments"]}

        try:
            return JSONResponse(await in_thread(run, rt.write_limiter))
        except Exception as e:  # noqa: BLE001
            return fail(e, request)

    _finish_openapi(api)
    app = api
    if settings.cors_origins:
        app = _cors(app, settings)
    guarded = Guard(app, rt)
    guarded.runtime = rt
    guarded.api = api
    return guarded


def _cors(app, settings: Settings):
    """Starlette's CORS middleware, with its refusals in our error shape."""
    from starlette.middleware.cors import CORSMiddleware

    class CORS(CORSMiddleware):
        def preflight_response(self, request_headers) -> Response:
            r = super().preflight_response(request_headers)
            if r.status_code == 200:
                return r
            keep = {k: v for k, v in r.headers.items() if k.lower() not in ("content-length", "content-type")}
            return JSONResponse({"error": f"CORS preflight refused: {r.body.decode('utf-8', 'replace')}"},
                                status_code=r.status_code, headers=keep)

    return CORS(app, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"], max_age=600)


def _file_response(path: Path) -> Response:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ApiError(404, f"{path.name} is not installed") from e
    return Response(data, media_type=_CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream"),
                    headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


def _check_limits(settings: Settings, queries: list[str], kw: dict) -> None:
    """The server's caps that are settings, not schema (400 before anything is encoded)."""
    if len(queries) > settings.max_queries:
        raise ApiError(400, f"'query': {len(queries)} queries in one request; the limit is {settings.max_queries}")
    for n, q in enumerate(queries):
        if len(q) > settings.max_query_chars:
            what = "the query" if len(queries) == 1 else f"query {n}"
            raise ApiError(400, f"{what} is {len(q)} characters long; the limit is {settings.max_query_chars}")
    k = kw.get("k", 10)
    if k > settings.max_k:
        raise ApiError(400, f"'k' must be at most {settings.max_k}, got {k}")
    if len(queries) * k > settings.max_batch_hits:
        raise ApiError(400, f"{len(queries)} queries x k={k} = {len(queries) * k} hits; the limit is "
                            f"{settings.max_batch_hits} per request")
    c = kw.get("candidates")
    if c is not None and c > settings.max_candidates:
        raise ApiError(400, f"'candidates' must be at most {settings.max_candidates}, got {c}")


def _run_search(rt: Runtime, index: HybridIndex, query, queries: list[str], kw: dict):
    """In a worker thread: validate against the index, count tokens, encode (timed), search (timed)."""
    mode = kw.get("mode", "hybrid")
    _check_query_inputs(query, kw.get("weights"), index.channels)  # channels this index lacks: 400
    if mode != "hybrid" and mode not in index.channels:
        raise ValueError(f"this index has no {mode} channel (it has: {', '.join(index.channels)})")
    enc = index.encoder
    tok = getattr(enc, "_tok", None)
    if tok is not None:
        limit = rt.settings.max_query_tokens
        for n, ids in enumerate(tok.ids(queries, add_special_tokens=False)):
            if len(ids) > limit:
                what = "the query" if len(queries) == 1 else f"query {n}"
                raise ApiError(400, f"{what} is {len(ids)} tokens long; the limit is {limit}")
    spec = enc.spec
    dense = mode in ("dense", "hybrid")
    sparse = spec.has_sparse and mode in ("sparse", "hybrid")
    colbert = spec.has_colbert and mode in ("colbert", "hybrid")
    t0 = time.perf_counter()
    encoded = None
    if dense or sparse or colbert:
        encoded = enc.encode_arrays(queries, kind="query", dense=dense, sparse=sparse, colbert=colbert,
                                    show_progress=False)
    t1 = time.perf_counter()
    if isinstance(query, str):
        hits = index.search(query, **kw, query_encoded=encoded)
    else:
        hits = _search_batch(index, queries, **kw, query_encoded=encoded)
    t2 = time.perf_counter()
    rt.metrics.encode.labels(mode).observe(t1 - t0)
    rt.metrics.search.labels(mode).observe(t2 - t1)
    return hits


def _finish_openapi(api: FastAPI) -> None:
    """Generated by FastAPI from the models; our validation errors are 400s, so drop its 422."""
    original = api.openapi

    def openapi() -> dict:
        if api.openapi_schema is None:
            doc = original()
            for item in doc.get("paths", {}).values():
                for op in item.values():
                    op.get("responses", {}).pop("422", None)
            schemas_ = doc.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas_.pop(name, None)
            api.openapi_schema = doc
        return api.openapi_schema

    api.openapi = openapi
