"""The HTTP API, over real sockets: uvicorn on 127.0.0.1 (ephemeral ports) in a thread, on a tiny
random BGE-M3 index.

Every response a test receives is checked against the generated OpenAPI document's schema for its
path and status (with jsonschema when installed).
"""

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")

from hybridsearch import HybridIndex  # noqa: E402
from hybridsearch.server import DEFAULT_MAX_BODY_BYTES, Settings, create_app, start  # noqa: E402
from hybridsearch.server.schemas import MAX_K  # noqa: E402

WORDS = ["fox", "dog", "river", "cloud", "light", "water", "ranking", "vector", "token", "search"]
OPENAPI = create_app("unused", Settings(), log=None).api.openapi()
API_ROUTES = {"/health": {"GET"}, "/ready": {"GET"}, "/stats": {"GET"}, "/metrics": {"GET"},
              "/search": {"POST"}, "/add": {"POST"}, "/delete": {"POST"}, "/compact": {"POST"}}


def make_docs(n, prefix="d", **md):
    return [{"id": f"{prefix}{i}", "text": f"{WORDS[i % len(WORDS)]} {WORDS[(3 * i + 1) % len(WORDS)]} {prefix}{i}",
             "metadata": {"i": i, **md}} for i in range(n)]


# --------------------------------------------------------------------------- OpenAPI schema checks

try:
    import jsonschema
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012
except ImportError:  # the contract checks need jsonschema; the HTTP tests run without it
    jsonschema = None

_DOC_URI = "urn:hybridsearch:openapi"


def _validator(pointer, doc=OPENAPI):
    reg = Registry().with_resource(_DOC_URI, Resource.from_contents(doc, default_specification=DRAFT202012))
    return jsonschema.Draft202012Validator({"$ref": f"{_DOC_URI}#{pointer}"}, registry=reg)


def _esc(s):
    return s.replace("~", "~0").replace("/", "~1")


def _deref(obj):
    while "$ref" in obj:
        node = OPENAPI
        for part in obj["$ref"].lstrip("#/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        obj = node
    return obj


def response_pointer(path, method, status):
    """JSON pointer of the documented schema of a response, or None if the status is undocumented."""
    op = OPENAPI["paths"][path][method.lower()]
    if str(status) not in op["responses"]:
        return None
    return f"/paths/{_esc(path)}/{method.lower()}/responses/{status}/content/application~1json/schema"


def check_against_openapi(path, method, status, body):
    if path == "/openapi.json" and status == 200:
        return
    if path not in OPENAPI["paths"]:
        assert status in (404, 405) and set(body) == {"error"}, (path, status, body)
        return
    if method.lower() not in OPENAPI["paths"][path]:
        assert status == 405 and set(body) == {"error"}
        return
    pointer = response_pointer(path, method, status)
    assert pointer is not None, f"{method} {path} answered {status}, which the OpenAPI document does not list"
    if jsonschema is not None and body is not None and path != "/metrics":
        _validator(pointer).validate(body)


# --------------------------------------------------------------------------- client helpers


class Client:
    """Minimal JSON client; one keep-alive connection."""

    def __init__(self, port):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def request(self, method, path, body=None, raw=None, headers=None, check=True):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = {"Content-Type": "application/json", **(headers or {})}
        self.conn.request(method, path, body=data, headers=h)
        r = self.conn.getresponse()
        payload = r.read()
        ctype = r.getheader("Content-Type", "")
        out = json.loads(payload) if payload and ctype.startswith("application/json") else (payload or None)
        if r.getheader("Connection", "").lower() == "close":
            self.conn.close()
        if check and method != "HEAD":
            check_against_openapi(path.split("?")[0], method, r.status, out)
        return r.status, out, r

    def get(self, path, **kw):
        s, b, _ = self.request("GET", path, **kw)
        return s, b

    def post(self, path, body=None, **kw):
        s, b, _ = self.request("POST", path, body, **kw)
        return s, b

    def close(self):
        self.conn.close()


@pytest.fixture
def index(tmp_path, m3_encoder):
    idx = HybridIndex.create(tmp_path / "idx", m3_encoder)
    idx.add(make_docs(12))
    yield idx
    idx.close()


@pytest.fixture
def log():
    return io.StringIO()


def _start(index, log, **kw):
    return start(create_app(index, Settings(port=0, **kw), log=log))


@pytest.fixture
def server(index, log):
    running = _start(index, log)
    yield running
    running.stop()


@pytest.fixture
def client(server):
    c = Client(server.port)
    yield c
    c.close()


# --------------------------------------------------------------------------- round trip


def test_binds_to_loopback_ephemeral_port(server):
    host, port = server.sock.getsockname()[:2]
    assert host == "127.0.0.1" and port > 0 and port == server.port
    assert server.url == f"http://127.0.0.1:{port}"


def test_round_trip(client, index):
    assert client.get("/health") == (200, {"status": "ok", "documents": 12})
    s, stats = client.get("/stats")
    assert s == 200 and stats["documents"] == 12 and stats["channels"] == ["dense", "sparse", "colbert", "bm25"]

    s, body = client.post("/search", {"query": "fox river", "k": 3})
    assert s == 200 and len(body["hits"]) == 3
    want = index.search("fox river", k=3)
    assert [h["id"] for h in body["hits"]] == [h.id for h in want]
    h0 = body["hits"][0]
    assert h0["score"] == pytest.approx(want[0].score) and h0["text"] == want[0].text
    assert h0["metadata"] == want[0].metadata and set(h0["scores"]) == {"dense", "sparse", "colbert", "bm25"}

    docs = [{"id": "new1", "text": "zebra quagga savanna", "metadata": {"kind": "animal", "year": 2024}},
            {"id": "new2", "text": "quagga extinct zebra"}]
    assert client.post("/add", {"documents": docs}) == (200, {"added": 2, "upsert": False, "documents": 14})
    s, body = client.post("/search", {"query": "quagga", "k": 5, "mode": "bm25"})
    assert {h["id"] for h in body["hits"]} == {"new1", "new2"}
    s, body = client.post("/search", {"query": "zebra", "k": 5, "filter": {"kind": "animal"}})
    assert [h["id"] for h in body["hits"]] == ["new1"]

    # add of an existing id is refused; upsert replaces
    s, body = client.post("/add", {"documents": [{"id": "new1", "text": "again"}]})
    assert s == 400 and "already in the index" in body["error"]
    s, body = client.post("/add", {"documents": [{"id": "new1", "text": "okapi giraffe"}], "upsert": True})
    assert (s, body) == (200, {"added": 1, "upsert": True, "documents": 14})
    assert index.get("new1")["text"] == "okapi giraffe" and index.get("new1")["metadata"] == {}

    assert client.post("/delete", {"ids": ["new1", "new2"]}) == (200, {"deleted": 2, "documents": 12})
    s, body = client.post("/search", {"query": "quagga okapi", "k": 5, "mode": "bm25"})
    assert s == 200 and body == {"hits": []}
    s, body = client.post("/delete", {"ids": ["d1", "nope"]})
    assert s == 404 and "nope" in body["error"]
    assert "d1" in index  # nothing deleted


def test_search_options(client, index):
    s, body = client.post("/search", {"query": ["fox", "water cloud"], "k": 2, "mode": "dense"})
    assert s == 200 and [len(r) for r in body["results"]] == [2, 2]
    assert [h["id"] for h in body["results"][1]] == [h.id for h in index.search("water cloud", k=2, mode="dense")]
    for mode in ("dense", "sparse", "colbert", "bm25"):
        s, body = client.post("/search", {"query": "fox dog", "k": 4, "mode": mode})
        assert s == 200 and all(set(h["scores"]) == {mode} for h in body["hits"])
    s, body = client.post("/search", {"query": "fox", "k": 12, "filter": {"i": {"gte": 3, "lt": 6}}})
    assert sorted(h["metadata"]["i"] for h in body["hits"]) == [3, 4, 5]
    s, body = client.post("/search", {"query": "fox", "k": 3, "fusion": "rrf", "candidates": 5,
                                      "weights": {"bm25": 1.0}, "normalize": ["bm25", "dense"]})
    assert s == 200 and len(body["hits"]) == 3
    want = index.search("fox", k=3, fusion="rrf", candidates=5, weights={"bm25": 1.0}, normalize=["bm25", "dense"])
    assert [h["id"] for h in body["hits"]] == [h.id for h in want]
    assert client.post("/search", {"query": "fox", "weights": None, "filter": None, "normalize": None})[0] == 200
    s, body = client.post("/search", {"query": "fox", "k": MAX_K})
    assert s == 200 and len(body["hits"]) == 12


def test_keep_alive_survives_errors(client):
    conn = client.conn
    assert client.get("/health")[0] == 200
    sock = conn.sock
    assert client.post("/nowhere", {"x": 1})[0] == 404
    assert client.post("/health", {"x": 1})[0] == 405
    assert client.post("/search", raw=b"{oops")[0] == 400
    assert client.post("/search", {"query": "fox", "k": 1})[0] == 200
    assert conn.sock is sock  # the same connection served all of them


# --------------------------------------------------------------------------- errors

BAD_BODIES = [
    ("/search", {"k": 5}),
    ("/search", {"query": 5}),
    ("/search", {"query": []}),
    ("/search", {"query": ["a", 1]}),
    ("/search", {"query": ""}),
    ("/search", {"query": " \t "}),
    ("/search", {"query": ["a", " "]}),
    ("/search", {"query": "x", "k": 0}),
    ("/search", {"query": "x", "k": MAX_K + 1}),
    ("/search", {"query": "x", "k": "5"}),
    ("/search", {"query": "x", "k": True}),
    ("/search", {"query": "x", "mode": "semantic"}),
    ("/search", {"query": "x", "fusion": "max"}),
    ("/search", {"query": "x", "weights": {"splade": 1}}),
    ("/search", {"query": "x", "weights": {"dense": -1}}),
    ("/search", {"query": "x", "weights": [1]}),
    ("/search", {"query": "x", "filter": [1]}),
    ("/search", {"query": "x", "filter": {"i": {"between": [1, 2]}}}),
    ("/search", {"query": "x", "filter": {"i": {"gte": "a"}}}),
    ("/search", {"query": "x", "normalize": ["nope"]}),
    ("/search", {"query": "x", "candidates": 0}),
    ("/search", {"query": "x", "extra": 1}),
    ("/search", ["x"]),
    ("/add", {"documents": []}),
    ("/add", {"documents": "x"}),
    ("/add", {"documents": [{"id": "a"}]}),
    ("/add", {"documents": [{"id": "", "text": "x"}]}),
    ("/add", {"documents": [{"id": 3, "text": "x"}]}),
    ("/add", {"documents": [{"id": "a", "text": "   "}]}),
    ("/add", {"documents": [{"id": "a", "text": "x", "metadata": [1]}]}),
    ("/add", {"documents": [{"id": "a", "text": "x", "meta": {}}]}),
    ("/add", {"documents": [{"id": "a", "text": "x"}], "upsert": "yes"}),
    ("/add", {"docs": []}),
    ("/delete", {"ids": []}),
    ("/delete", {"ids": "d1"}),
    ("/delete", {"ids": [1]}),
    ("/delete", {}),
]


@pytest.mark.parametrize("path,body", BAD_BODIES, ids=[f"{p}-{i}" for i, (p, _) in enumerate(BAD_BODIES)])
def test_wrong_shapes_are_400_and_the_schema_agrees(client, index, path, body):
    s, out = client.post(path, body)
    assert s == 400 and isinstance(out["error"], str) and out["error"]
    assert len(index) == 12
    if jsonschema is not None:
        schema = _deref(OPENAPI["paths"][path]["post"]["requestBody"])["content"]["application/json"]["schema"]
        assert not _validator(schema["$ref"].lstrip("#")).is_valid(body), f"the schema accepts {body}"


def test_library_errors_are_400(client, index):
    s, out = client.post("/add", {"documents": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]})
    assert s == 400 and "duplicate" in out["error"]
    s, out = client.post("/add", {"documents": [{"id": "a", "text": "x", "metadata": {"x": {"y": [1, 2]}}},
                                                {"id": "d3", "text": "y"}]})
    assert s == 400 and "already" in out["error"]
    assert "a" not in index and len(index) == 12


@pytest.mark.parametrize("raw", [b"{bad", b"", b"   ", b"[1, 2]", b'"text"', b'{"query": NaN}',
                                 b"\xff\xfe{}", b"[" * 100_000, b'{"query": "x"} trailing'])
def test_malformed_json_is_400(client, raw):
    s, out = client.post("/search", raw=raw)
    assert s == 400 and out["error"]
    assert client.get("/health")[0] == 200


def test_unknown_route_404_and_wrong_method_405(client):
    for path in ("/searches", "/search/", "/health/x", "/../etc/passwd", "/docs", "/redoc",
                 "/assets/../pyproject.toml", "/assets/MANIFEST", "/assets/%2e%2e%2fserver%2fapp.py",
                 "/assets/__init__.py"):
        s, out = client.get(path)
        assert s == 404 and set(out) == {"error"}, (path, out)
    s, out, r = client.request("GET", "/search")
    assert s == 405 and r.getheader("Allow") == "POST"
    for method in ("PUT", "DELETE", "PATCH"):
        s, out, r = client.request(method, "/add", {"documents": []})
        assert s == 405 and r.getheader("Allow") == "POST"
    s, out, r = client.request("POST", "/stats", {})
    assert s == 405 and r.getheader("Allow") == "GET"
    s, out, r = client.request("HEAD", "/health")
    assert s == 405 and out is None
    assert client.get("/health?verbose=1")[0] == 200  # query strings are ignored


def test_unexpected_error_is_500_and_the_server_lives(server, client, index, log, monkeypatch):
    def boom(*a, **kw):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(index, "search", boom)
    s, out = client.post("/search", {"query": "fox"})
    assert s == 500 and "RuntimeError" in out["error"] and "kaboom" not in out["error"]
    assert server.runtime.flush_log()
    assert "Traceback" in log.getvalue() and "kaboom" in log.getvalue()
    monkeypatch.undo()
    assert client.post("/search", {"query": "fox", "k": 1})[0] == 200


def test_access_log_one_line_per_request(server, client, log):
    client.get("/health")
    client.post("/search", {"query": "secret fox words", "k": 1, "mode": "bm25"})
    client.get("/missing")
    client.post("/search", raw=b"{")
    deadline = time.monotonic() + 30  # a request's line is queued as its answer goes out: wait for 4
    while True:
        assert server.runtime.flush_log()
        lines = [json.loads(line) for line in log.getvalue().splitlines()]
        if len(lines) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert [(e["method"], e["path"], e["status"]) for e in lines] == [
        ("GET", "/health", 200), ("POST", "/search", 200), ("GET", "/missing", 404), ("POST", "/search", 400)]
    assert all(e["client"] == "127.0.0.1" and e["ms"] >= 0 and e["bytes"] > 0 for e in lines)
    assert lines[1]["mode"] == "bm25" and lines[1]["queries"] == 1
    assert "secret" not in log.getvalue()  # no query text unless log_queries


def test_shutting_down_answers_503(server, client):
    assert client.get("/health")[0] == 200
    server.runtime.stopping = True
    s, out, r = client.request("POST", "/search", {"query": "fox"})
    assert s == 503 and "shutting down" in out["error"] and r.getheader("Connection") == "close"
    c = Client(server.port)
    assert c.get("/ready")[0] == 503 and c.get("/health")[0] == 200  # alive, not ready
    server.runtime.stopping = False
    assert Client(server.port).get("/ready")[0] == 200


def test_missing_content_length_and_chunked(server, client):
    port = server.port
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.putrequest("POST", "/search")
    c.putheader("Transfer-Encoding", "chunked")
    c.endheaders()
    c.send(b"5\r\nhello\r\n0\r\n\r\n")
    r = c.getresponse()
    assert r.status == 411 and "Content-Length" in json.loads(r.read())["error"]
    c.close()
    s, out = client.post("/search", raw=b"", headers={"Content-Length": "abc"})
    assert s == 400 and "Content-Length" in out["error"]


# --------------------------------------------------------------------------- body limit


def _raw_post(port, path, declared, payload, expect_continue=False):
    """Send headers declaring ``declared`` bytes and then ``payload`` (maybe less); read the answer."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.putrequest("POST", path)
    c.putheader("Content-Type", "application/json")
    c.putheader("Content-Length", str(declared))
    if expect_continue:
        c.putheader("Expect", "100-continue")
    c.endheaders()
    if payload:
        try:
            c.send(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may stop listening once it has answered; the answer is what counts
    r = c.getresponse()
    out = r.status, json.loads(r.read()), r.getheader("Connection")
    c.close()
    return out


def test_oversized_body_is_413_before_it_is_read(server, client):
    port = server.port
    assert server.runtime.settings.max_body_bytes == DEFAULT_MAX_BODY_BYTES == 8 * 1024 * 1024
    t0 = time.monotonic()
    # declares 9 MiB but sends 1 KiB: the server must answer without waiting for the rest
    s, out, conn = _raw_post(port, "/add", 9 * 1024 * 1024, b"x" * 1024)
    assert s == 413 and "limit" in out["error"]
    assert time.monotonic() - t0 < 10
    # a real 9 MiB body, sent in full
    s, out, _ = _raw_post(port, "/search", 9 * 1024 * 1024, b" " * (9 * 1024 * 1024))
    assert s == 413
    # Expect: 100-continue -> refused before the client sends anything
    s, out, _ = _raw_post(port, "/add", 100 * 1024 * 1024, b"", expect_continue=True)
    assert s == 413
    check_against_openapi("/add", "POST", 413, out)
    assert client.get("/health") == (200, {"status": "ok", "documents": 12})
    assert client.post("/search", {"query": "fox", "k": 1})[0] == 200


def test_body_limit_is_configurable(index, log):
    server = _start(index, log, max_body_bytes=2048)
    try:
        c = Client(server.port)
        docs = [{"id": "big", "text": "word " * 1000}]
        s, out = c.post("/add", {"documents": docs})
        assert s == 413 and "2048" in out["error"]
        c = Client(server.port)
        assert c.post("/add", {"documents": [{"id": "small", "text": "word"}]})[0] == 200
        assert "big" not in index and "small" in index
        c.close()
    finally:
        server.stop()
    with pytest.raises(ValueError):
        Settings(max_body_bytes=0)


# --------------------------------------------------------------------------- concurrency


def test_concurrent_searches_while_writing(server, index, tmp_path, m3_encoder):
    port = server.port
    n_batches, per_batch, n_readers = 4, 5, 3
    stop = threading.Event()
    errors, counts = [], [0] * n_readers
    during_writes = [0]
    writing = threading.Event()

    def reader(r):
        c = Client(port)
        modes = ("hybrid", "dense", "bm25", "sparse")
        try:
            for it in range(2000):  # bounded; normally ends when the writer is done
                if stop.is_set():
                    break
                q = ["fox river", "zz3 cloud"][it % 2]
                s, out, _ = c.request("POST", "/search", {"query": q, "k": 5, "mode": modes[it % 4]})
                if s != 200 or not isinstance(out.get("hits"), list):
                    errors.append((s, out))
                counts[r] += 1
                if writing.is_set():
                    during_writes[0] += 1
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        finally:
            c.close()

    def writer():
        c = Client(port)
        try:
            writing.set()
            for b in range(n_batches):
                docs = [{"id": f"w{b}-{i}", "text": f"zz{b * per_batch + i} cloud water batch",
                         "metadata": {"batch": b}} for i in range(per_batch)]
                s, out = c.post("/add", {"documents": docs})
                if s != 200 or out["added"] != per_batch:
                    errors.append(("add", s, out))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        finally:
            writing.clear()
            stop.set()
            c.close()

    threads = [threading.Thread(target=reader, args=(r,)) for r in range(n_readers)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert all(n > 0 for n in counts) and during_writes[0] > 0

    # nothing lost: every added document is live, searchable, and on disk
    c = Client(port)
    total = 12 + n_batches * per_batch
    assert c.get("/health") == (200, {"status": "ok", "documents": total})
    for b in range(n_batches):
        s, out = c.post("/search", {"query": "cloud", "k": 10, "mode": "dense", "filter": {"batch": b}})
        assert s == 200
        assert sorted(h["id"] for h in out["hits"]) == sorted(f"w{b}-{i}" for i in range(per_batch))
        j = b * per_batch + 2
        _, out = c.post("/search", {"query": f"zz{j}", "k": 1, "mode": "bm25"})
        assert out["hits"][0]["id"] == f"w{b}-2"
    c.close()
    again = HybridIndex.open(index.path, m3_encoder)
    assert len(again) == total and all(f"w{b}-{i}" in again for b in range(n_batches) for i in range(per_batch))
    again.close()


def test_concurrent_writers_are_serialised(server, index):
    port = server.port
    results = []

    def writer(w):
        c = Client(port)
        for b in range(2):
            results.append(c.post("/add", {"documents": [{"id": f"x{w}-{b}-{i}", "text": f"text {w} {b} {i}"}
                                                         for i in range(3)]}))
        c.close()

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [s for s, _ in results] == [200] * 6
    assert len(index) == 12 + 18 and index.stats()["generation"] == 1 + 6


# --------------------------------------------------------------------------- OpenAPI document


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def _request_schema(path):
    schema = OPENAPI["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    if "anyOf" in schema:  # an optional body (compact): the model or null
        schema = next(s for s in schema["anyOf"] if "$ref" in s)
    return schema["$ref"].lstrip("#")


def test_openapi_is_generated_and_documents_every_route(client):
    s, doc = client.get("/openapi.json")
    assert s == 200 and doc == json.loads(json.dumps(OPENAPI))
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == set(API_ROUTES)
    for path, methods in API_ROUTES.items():
        assert set(doc["paths"][path]) == {m.lower() for m in methods}
        for m in methods:
            op = doc["paths"][path][m.lower()]
            assert op["operationId"] and op["summary"]
            codes = set(op["responses"])
            assert {"200", "400", "405", "411", "413", "500", "503"} <= codes and "422" not in codes
            if m == "POST":
                assert op["requestBody"].get("required") or path == "/compact"
                assert _deref({"$ref": "#" + _request_schema(path)})["examples"]
                assert ("507" in codes) == (path != "/search")
    assert "HTTPValidationError" not in doc["components"]["schemas"]  # our 400s replace FastAPI's 422
    for ref in _refs(doc):  # every $ref resolves
        assert _deref({"$ref": ref})


def test_openapi_examples_validate():
    pytest.importorskip("jsonschema")
    for name, schema in OPENAPI["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)
    n = 0
    for path in ("/search", "/add", "/delete", "/compact"):
        v = _validator(_request_schema(path))
        for ex in _deref({"$ref": "#" + _request_schema(path)})["examples"]:
            v.validate(ex)
            n += 1
    assert n >= 8


def test_openapi_example_requests_run(client):
    """The documented example requests are accepted by the server (not just by the schema)."""
    for path in ("/search", "/delete", "/add"):  # the delete example removes d1, d2; add puts them back
        for ex in _deref({"$ref": "#" + _request_schema(path)})["examples"]:
            s, out = client.post(path, ex)
            assert s == 200, (path, ex, out)


ACCEPTED = [  # bodies validation accepts: the schema must accept them too
    ("/search", {"query": "x"}), ("/search", {"query": ["a", "b"], "k": 3, "mode": "bm25"}),
    ("/search", {"query": "x", "weights": {"dense": 0, "bm25": 2.5}, "filter": {"i": {"gte": 1}},
                 "candidates": None, "normalize": ["dense"], "fusion": "rrf"}),
    ("/add", {"documents": [{"id": "n1", "text": "zebra", "metadata": {"a": [1, {"b": None}]}}]}),
    ("/add", {"documents": [{"id": "n2", "text": "quagga", "metadata": None}], "upsert": True}),
    ("/delete", {"ids": ["d1"]}), ("/compact", {}),
]


@pytest.mark.parametrize("path,body", ACCEPTED, ids=[f"{p}-{i}" for i, (p, _) in enumerate(ACCEPTED)])
def test_what_validation_accepts_the_schema_accepts(client, path, body):
    s, out = client.post(path, body)
    assert s == 200, out
    if jsonschema is not None:
        assert _validator(_request_schema(path)).is_valid(body)


# --------------------------------------------------------------------------- serve() in a process


def _free_port():
    with socket.socket() as s:  # a free port for the child (tiny race, fine for a test)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_up(proc, port, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        try:
            c = Client(port)
            s, out = c.get("/health")
            c.close()
            return s, out
        except OSError:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)


SLOW_SERVER = """
import sys, time
from hybridsearch.index.hybrid import HybridIndex
from hybridsearch.server import Settings, serve
real = HybridIndex.search
def slow(self, *a, **kw):  # a search that takes a while: in flight when SIGTERM comes
    time.sleep(float(sys.argv[3]))
    return real(self, *a, **kw)
HybridIndex.search = slow
serve(sys.argv[1], Settings(port=int(sys.argv[2])), model=sys.argv[4])
print("serve returned", flush=True)
"""


def test_sigterm_finishes_the_request_in_flight_then_exits(tmp_path, tiny_m3, index):
    index.close()
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVER, str(index.path), str(port), "2", str(tiny_m3)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert _wait_up(proc, port) == (200, {"status": "ok", "documents": 12})
        answer = {}

        def search():
            c = Client(port)
            answer["r"] = c.post("/search", {"query": "fox", "k": 2, "mode": "bm25"}, check=False)
            c.close()

        t = threading.Thread(target=search)
        t.start()
        time.sleep(0.8)  # the search is sleeping inside the server
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        s, out = answer["r"]
        assert s == 200 and len(out["hits"]) == 2  # finished, not cut off
        assert proc.wait(60) == 0
        with pytest.raises(OSError):  # nobody listens any more
            Client(port).get("/health")
        err = proc.stderr.read()
        assert f"http://127.0.0.1:{port}" in err and "server stopped" in err
        log = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        assert {"method": "POST", "path": "/search", "status": 200} in [
            {k: e[k] for k in ("method", "path", "status")} for e in log if "method" in e]
        assert "serve returned" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- HTTP ranks like the library


@pytest.fixture(scope="module")
def dense_encoder(tiny_dense):
    from hybridsearch import BGEM3Encoder

    return BGEM3Encoder(tiny_dense, device="cpu")


def _serving(index):
    server = _start(index, None)
    return server, None, Client(server.port)


def _stop(server, t, client):
    client.close()
    server.stop()


@pytest.mark.parametrize("model", ["dense_only", "m3"])
def test_http_ranks_like_the_library_with_default_options(tmp_path, model, dense_encoder, m3_encoder):
    """A request that leaves every option out gets exactly index.search(query) (ids and scores):
    the server does not substitute its own defaults (it used to force candidates=100, while a
    dense-only model's hybrid default is 1000)."""
    enc = dense_encoder if model == "dense_only" else m3_encoder
    idx = HybridIndex.create(tmp_path / "idx", enc)
    # 150 documents that all contain "water", with different lengths: BM25 ranks all of them, so a
    # first stage of 100 candidates and one of 1000 give different unions (and normalisations)
    idx.add([{"id": f"w{i}", "text": " ".join(["water", WORDS[i % 10], WORDS[(i // 10) % 10]] + ["fox"] * (i % 7)),
              "metadata": {"i": i}} for i in range(150)])
    queries = ["water fox", "river water light"]
    if model == "dense_only":  # the case that used to differ: the library's default depth matters here
        assert idx.default_candidates() > 100
        shallow = idx.search(queries[0], candidates=100)
        deep = idx.search(queries[0])
        assert [(h.id, h.score) for h in shallow] != [(h.id, h.score) for h in deep]
    server, t, c = _serving(idx)
    try:
        for q in queries:
            s, body = c.post("/search", {"query": q})
            assert s == 200
            want = idx.search(q)
            assert [h["id"] for h in body["hits"]] == [h.id for h in want]
            assert [h["score"] for h in body["hits"]] == pytest.approx([h.score for h in want], rel=1e-6, abs=1e-7)
            # per-channel scores agree to float precision, not bit for bit: the first Numba parallel
            # kernel of a process sets the shared OpenMP thread count (numba's "omp" layer), which torch
            # reads too, so the request that runs first may encode the query on another thread count
            for got, h in zip(body["hits"], want):
                assert got["scores"].keys() == h.scores.keys()
                for ch, v in h.scores.items():
                    assert got["scores"][ch] == (None if v is None else pytest.approx(v, rel=1e-5, abs=1e-6))
        s, body = c.post("/search", {"query": queries, "candidates": None, "weights": None})
        assert s == 200
        want = idx.search_batch(queries)
        assert [[h["id"] for h in hits] for hits in body["results"]] == [[h.id for h in w] for w in want]
        assert [[h["score"] for h in hits] for hits in body["results"]] == \
            [pytest.approx([h.score for h in w], rel=1e-6, abs=1e-7) for w in want]
    finally:
        _stop(server, t, c)
        idx.close()


# --------------------------------------------------------------------------- refused before encoding


def _no_encoding(monkeypatch, encoder):
    """Make any encoding fail loudly (500), so that a 400 proves the request was refused before."""
    def refuse(*a, **kw):
        raise RuntimeError("the model ran")

    monkeypatch.setattr(encoder, "encode_arrays", refuse)
    monkeypatch.setattr(encoder, "encode", refuse)


BIG = "1" + "0" * 400  # a 401-digit integer, as JSON text

UNSTORABLE = [  # (path, raw JSON body, fragment of the error)
    ("/search", '{"query": "fox", "filter": {"i": %s}}' % BIG, "64-bit range"),
    ("/search", '{"query": "fox", "filter": {"i": {"gte": %s}}}' % BIG, "64-bit range"),
    ("/search", '{"query": "fox", "filter": {"i": {"in": [1, 18446744073709551616]}}}', "64-bit range"),
    ("/search", '{"query": "fox", "filter": {"i": {"lt": 1e400}}}', "not a finite number"),
    ("/search", '{"query": ""}', "empty or blank"),
    ("/search", '{"query": " \\t\\n "}', "empty or blank"),
    ("/search", '{"query": ["fox", "  "]}', "query 1 is empty or blank"),
    ("/search", '{"query": "fox \\ud800"}', "lone surrogate (U+D800) at position 4"),
    ("/search", '{"query": ["fox", "\\udfff"]}', "lone surrogate (U+DFFF)"),
    ("/search", '{"query": "fox", "weights": {"dense": 1e400}}', "finite"),
    ("/add", '{"documents": [{"id": "n", "text": "x", "metadata": {"n": 18446744073709551616}}]}', "64-bit range"),
    ("/add", '{"documents": [{"id": "n", "text": "x", "metadata": {"n": -9223372036854775809}}]}', "64-bit range"),
    ("/add", '{"documents": [{"id": "n", "text": "x", "metadata": {"a": [{"b": %s}]}}]}' % BIG, "64-bit range"),
    ("/add", '{"documents": [{"id": "n", "text": "x", "metadata": {"a": 1e400}}]}', "not a finite number"),
    ("/add", '{"documents": [{"id": "n", "text": "ab\\ud800cd"}]}', "lone surrogate (U+D800) at position 2"),
    ("/add", '{"documents": [{"id": "n\\udc80", "text": "x"}]}', "lone surrogate (U+DC80)"),
    ("/add", '{"documents": [{"id": "n", "text": "x", "metadata": {"t": "\\ud83d"}}]}', "lone surrogate"),
    ("/add", '{"documents": [{"id": "n", "text": "x", "metadata": {"\\ud83d": 1}}]}', "lone surrogate"),
    ("/add", '{"documents": [{"id": "ok", "text": "x"}, {"id": "n", "text": "\\ud800"}], "upsert": true}',
     "lone surrogate"),
]


@pytest.mark.parametrize("path,raw,fragment", UNSTORABLE, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(UNSTORABLE)])
def test_unstorable_inputs_are_400_before_encoding(client, index, monkeypatch, path, raw, fragment):
    _no_encoding(monkeypatch, index.encoder)
    generation = index.stats()["generation"]
    s, out = client.post(path, raw=raw.encode())
    assert s == 400, out
    assert fragment in out["error"]
    assert len(index) == 12 and index.stats()["generation"] == generation and "n" not in index
    monkeypatch.undo()
    assert client.post("/search", {"query": "fox", "k": 1})[0] == 200


def test_valid_unicode_and_int64_bounds_are_accepted(client, index):
    docs = [{"id": "emoji😀", "text": "surrogate pair 😀 é", "metadata": {"lo": -2**63, "hi": 2**63 - 1,
                                                                        "t": "😀", "f": 1.5}}]
    assert client.post("/add", {"documents": docs})[0] == 200
    s, out = client.post("/search", {"query": "😀 pair", "k": 1, "filter": {"hi": 2**63 - 1, "lo": {"lte": -2**63}}})
    assert s == 200 and [h["id"] for h in out["hits"]] == ["emoji😀"]
    assert out["hits"][0]["metadata"]["hi"] == 2**63 - 1


def test_weights_for_channels_the_index_lacks_are_400(tmp_path, dense_encoder, monkeypatch):
    idx = HybridIndex.create(tmp_path / "idx", dense_encoder)
    idx.add(make_docs(5))
    server, t, c = _serving(idx)
    try:
        _no_encoding(monkeypatch, idx.encoder)
        for w, fragment in [({"colbert": 1}, "this index has no colbert channel (it has: dense, bm25)"),
                            ({"dense": 1, "sparse": 0}, "no sparse channel"),
                            ({"splade": 1}, "splade"), ({"dense": -0.5}, ">= 0")]:
            s, out = c.post("/search", {"query": "fox", "weights": w})
            assert s == 400 and fragment in out["error"], (w, out)
        monkeypatch.undo()
        s, out = c.post("/search", {"query": "fox", "weights": {"dense": 0.5, "bm25": 0}})
        assert s == 200 and len(out["hits"]) == 5
    finally:
        _stop(server, t, c)
        idx.close()


# --------------------------------------------------------------------------- disk full, lock, format errors


def _fail_segment_writes(monkeypatch, exc):
    """Every .npy a segment write saves raises ``exc`` (the first file already written)."""
    import hybridsearch.index.segment as segment
    import hybridsearch.index.storage as storage

    calls = []

    def failing(path, arr, *a, **kw):
        calls.append(path)
        raise exc

    monkeypatch.setattr(storage, "save_npy", failing)
    monkeypatch.setattr(segment, "save_npy", failing, raising=False)
    return calls


@pytest.mark.parametrize("kind", ["oserror", "diskfull", "edquot", "wrapped"])
def test_disk_full_is_507_and_nothing_is_committed(server, client, index, monkeypatch, log, kind):
    import errno

    from hybridsearch.errors import DiskFullError

    enospc = OSError(errno.ENOSPC, "No space left on device", "/some/path")
    if kind == "diskfull":
        exc = DiskFullError(errno.ENOSPC, "No space left on device", "/some/path")
    elif kind == "edquot":
        exc = OSError(errno.EDQUOT, "Disk quota exceeded", "/some/path")
    elif kind == "wrapped":  # e.g. a library turning the OSError into its own error
        try:
            raise enospc
        except OSError as e:
            try:
                raise ValueError("tantivy: io error") from e
            except ValueError as v:
                exc = v
    else:
        exc = enospc
    calls = _fail_segment_writes(monkeypatch, exc)
    s, out, r = client.request("POST", "/add", {"documents": [{"id": "new", "text": "zebra quagga"}]})
    assert calls and s == 507
    code = "EDQUOT" if kind == "edquot" else "ENOSPC"
    assert out["error"].startswith(f"disk full ({code}) writing /some/path: ")
    assert ("Disk quota exceeded" if kind == "edquot" else "No space left on device") in out["error"]
    assert server.runtime.flush_log()
    assert "disk full" in log.getvalue()
    assert "new" not in index and len(index) == 12
    monkeypatch.undo()
    assert client.post("/add", {"documents": [{"id": "new", "text": "zebra quagga"}]})[0] == 200
    assert "new" in index and len(index) == 13


def test_index_locked_is_503_with_retry_after(client, index, monkeypatch):
    from hybridsearch.errors import IndexLockedError

    def locked(*a, **kw):
        raise IndexLockedError(f"{index.path} is locked by another writer (waited 10 s); retry later")

    monkeypatch.setattr(index, "add", locked)
    monkeypatch.setattr(index, "delete", locked)
    for path, body in [("/add", {"documents": [{"id": "x", "text": "y"}]}), ("/delete", {"ids": ["d1"]})]:
        s, out, r = client.request("POST", path, body)
        assert s == 503 and "locked by another writer" in out["error"]
        assert int(r.getheader("Retry-After")) >= 1
    monkeypatch.undo()
    assert client.post("/delete", {"ids": ["d1"]})[0] == 200


def test_index_format_error_is_500_with_its_message(server, client, index, monkeypatch, log):
    from hybridsearch.errors import IndexFormatError

    def corrupt(*a, **kw):
        raise IndexFormatError("index file corrupted: seg-000001/dense.npy; restore it from a backup")

    monkeypatch.setattr(index, "search", corrupt)
    s, out = client.post("/search", {"query": "fox"})
    assert s == 500 and out["error"] == "index file corrupted: seg-000001/dense.npy; restore it from a backup"
    assert server.runtime.flush_log()
    assert "Traceback" in log.getvalue()


def test_error_message_with_a_lone_surrogate_is_still_json(client, index, monkeypatch):
    def refuse(*a, **kw):
        raise ValueError("cannot search for 'a\ud800'")

    monkeypatch.setattr(index, "search", refuse)
    s, out = client.post("/search", {"query": "fox"})
    assert s == 400 and out == {"error": "cannot search for 'a\ud800'"}


def test_compact_endpoint(client, index):
    s, out = client.post("/delete", {"ids": ["d0"]})
    assert s == 200
    s, out = client.post("/compact", {})
    assert s == 200 and out == {"documents": len(index), "segments": 1}
    assert index.stats()["deleted_pending_compaction"] == 0
    s, out = client.post("/compact", {"now": True})
    assert s == 400 and "no parameters" in out["error"]
