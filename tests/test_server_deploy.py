"""What someone deploying the server relies on: keys, CORS, limits a hostile client cannot get
around, bursts of connections, metrics, readiness, the page's static routes. Real uvicorn servers
on 127.0.0.1 (ephemeral ports), in a thread of the test process."""

import http.client
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")

from hybridsearch import HybridIndex  # noqa: E402
from hybridsearch.server import Settings, create_app, start  # noqa: E402
from hybridsearch.server.app import WEB_DIR  # noqa: E402

WRITE_KEY = "w" * 20 + "-write"
READ_KEY = "r" * 20 + "-read"


@pytest.fixture(scope="module")
def index(tmp_path_factory, m3_encoder):
    idx = HybridIndex.create(tmp_path_factory.mktemp("deploy") / "idx", m3_encoder)
    idx.add([{"id": f"d{i}", "text": f"fox river water {i} " + "cloud " * (i % 3), "metadata": {"i": i}}
             for i in range(12)])
    yield idx
    idx.close()


def serving(index, **settings):
    return start(create_app(index, Settings(port=0, **settings), log=None))


def call(port, method, path, body=None, headers=None, raw=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = {"Content-Type": "application/json", **(headers or {})} if data is not None else dict(headers or {})
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        payload = r.read()
        ctype = r.getheader("Content-Type", "")
        return r.status, (json.loads(payload) if ctype.startswith("application/json") else payload), r
    finally:
        c.close()


# --------------------------------------------------------------------------- auth


def test_keys_read_and_write(index):
    srv = serving(index, api_key=WRITE_KEY, read_key=READ_KEY)
    try:
        p = srv.port
        bearer = {"w": {"Authorization": f"Bearer {WRITE_KEY}"}, "r": {"Authorization": f"Bearer {READ_KEY}"}}
        # no key, a wrong key, a wrong scheme: 401 with a Bearer challenge, and nothing happens
        for headers in ({}, {"Authorization": "Bearer " + "x" * 26}, {"Authorization": f"Basic {WRITE_KEY}"},
                        {"Authorization": f"Bearer {WRITE_KEY[:-1]}"}, {"Authorization": "Bearer"}):
            for method, path, body in (("POST", "/search", {"query": "fox"}), ("GET", "/stats", None),
                                       ("GET", "/metrics", None),
                                       ("POST", "/add", {"documents": [{"id": "x", "text": "y"}]}),
                                       ("POST", "/delete", {"ids": ["d1"]}), ("POST", "/compact", {})):
                s, out, r = call(p, method, path, body, headers)
                assert s == 401 and r.getheader("WWW-Authenticate", "").startswith("Bearer"), (headers, path)
                assert set(out) == {"error"}
        assert len(index) == 12 and "x" not in index
        # a stranger's body is not even read: malformed JSON, or a body over the search limit, is 401
        assert call(p, "POST", "/add", raw=b"{malformed")[0] == 401
        assert call(p, "POST", "/search", raw=b" " * (2 * 1024 * 1024))[0] == 401
        assert call(p, "POST", "/search", raw=b"{malformed", headers=bearer["r"])[0] == 400
        # the read key searches, reads stats and metrics, and cannot write
        assert call(p, "POST", "/search", {"query": "fox", "k": 2}, bearer["r"])[0] == 200
        assert call(p, "GET", "/stats", None, bearer["r"])[0] == 200
        assert call(p, "GET", "/metrics", None, bearer["r"])[0] == 200
        for path, body in (("/add", {"documents": [{"id": "x", "text": "y"}]}), ("/delete", {"ids": ["d1"]}),
                           ("/compact", {})):
            s, out, _ = call(p, "POST", path, body, bearer["r"])
            assert s == 403 and "write key" in out["error"]
        assert len(index) == 12
        # the write key does everything
        assert call(p, "POST", "/add", {"documents": [{"id": "x", "text": "zebra"}]}, bearer["w"])[0] == 200
        assert call(p, "POST", "/search", {"query": "zebra", "k": 1}, bearer["w"])[0] == 200
        assert call(p, "POST", "/delete", {"ids": ["x"]}, bearer["w"])[0] == 200
        # liveness, readiness, the contract and the page need no key
        for path in ("/health", "/ready", "/openapi.json", "/"):
            assert call(p, "GET", path)[0] == 200, path
        doc = call(p, "GET", "/openapi.json")[1]
        assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        assert doc["paths"]["/search"]["post"]["security"] and "security" not in doc["paths"]["/health"]["get"]
        assert {"401", "403"} <= set(doc["paths"]["/add"]["post"]["responses"])
    finally:
        srv.stop()


def test_binding_beyond_loopback_needs_a_key(index):
    with pytest.raises(ValueError, match="without an API key"):
        serving(index, host="0.0.0.0")
    for settings in ({"host": "0.0.0.0", "insecure": True}, {"host": "0.0.0.0", "api_key": WRITE_KEY}):
        srv = serving(index, **settings)
        try:
            assert srv.sock.getsockname()[0] == "0.0.0.0"
            assert call(srv.port, "GET", "/health")[0] == 200
        finally:
            srv.stop()


@pytest.mark.parametrize("bad", [{"api_key": "short"}, {"read_key": READ_KEY},
                                 {"api_key": WRITE_KEY, "read_key": WRITE_KEY},
                                 {"api_key": "a key with spaces inside"}, {"cors_origins": ("evil.example",)}])
def test_unusable_settings_are_refused(bad):
    with pytest.raises(ValueError):
        Settings(**bad)


# --------------------------------------------------------------------------- CORS


def test_cors_is_off_by_default_and_on_for_the_origins_given(index):
    pre = {"Origin": "http://page.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type"}
    srv = serving(index)
    try:
        s, _, r = call(srv.port, "OPTIONS", "/search", headers=pre)
        assert s == 405 and r.getheader("Access-Control-Allow-Origin") is None
        s, _, r = call(srv.port, "POST", "/search", {"query": "fox"}, {"Origin": "http://page.example"})
        assert s == 200 and r.getheader("Access-Control-Allow-Origin") is None
    finally:
        srv.stop()
    srv = serving(index, cors_origins=("http://page.example",), api_key=WRITE_KEY)
    try:
        s, _, r = call(srv.port, "OPTIONS", "/search", headers=pre)  # preflight needs no key
        assert s == 200 and r.getheader("Access-Control-Allow-Origin") == "http://page.example"
        assert "authorization" in r.getheader("Access-Control-Allow-Headers").lower()
        s, _, r = call(srv.port, "POST", "/search", {"query": "fox"},
                       {"Origin": "http://page.example", "Authorization": f"Bearer {WRITE_KEY}"})
        assert s == 200 and r.getheader("Access-Control-Allow-Origin") == "http://page.example"
        s, out, r = call(srv.port, "OPTIONS", "/search", headers={**pre, "Origin": "http://evil.example"})
        assert s == 400 and r.getheader("Access-Control-Allow-Origin") is None and "origin" in out["error"]
    finally:
        srv.stop()


def test_form_and_text_bodies_are_refused(index):
    """A page on another site may POST a form or text/plain without asking first: refused (415)."""
    srv = serving(index)
    try:
        body = json.dumps({"documents": [{"id": "csrf", "text": "planted"}]}).encode()
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            headers = {} if ctype is None else {"Content-Type": ctype}
            c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
            c.putrequest("POST", "/add", skip_accept_encoding=True)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                c.putheader(k, v)
            c.endheaders(body)
            r = c.getresponse()
            assert r.status == 415 and "application/json" in json.loads(r.read())["error"]
            c.close()
        assert "csrf" not in index
        assert call(srv.port, "POST", "/add", raw=body, headers={"Content-Type": "application/json; charset=utf-8"})[0] == 200
        assert call(srv.port, "POST", "/delete", {"ids": ["csrf"]})[0] == 200
    finally:
        srv.stop()


# --------------------------------------------------------------------------- limits


def test_query_length_caps_in_characters_and_tokens(index):
    srv = serving(index, max_query_tokens=8)
    try:
        p = srv.port
        huge = "fox " * (7 * 1024 * 1024 // 4)  # 7 MiB: under the 8 MiB body limit, not read
        s, out, _ = call(p, "POST", "/search", {"query": huge})
        assert s == 413 and "search request body of 7340045 bytes" in out["error"]
        s, out, _ = call(p, "POST", "/search", {"query": huge[:900_000]})  # under 1 MiB: read, refused
        assert s == 400 and "is 900000 characters long; the limit is 8192" in out["error"]
        s, out, _ = call(p, "POST", "/search", {"query": ["fox", huge[:9000]]})
        assert s == 400 and "query 1 is 9000 characters" in out["error"]
        s, out, _ = call(p, "POST", "/search", {"query": "fox river water cloud light dog token vector search"})
        assert s == 400 and "tokens long; the limit is 8" in out["error"]
        assert call(p, "POST", "/search", {"query": "fox river"})[0] == 200
        assert call(p, "GET", "/health")[1] == {"status": "ok", "documents": 12}
    finally:
        srv.stop()


def test_batch_size_times_k_is_capped(index):
    srv = serving(index, max_batch_hits=50, max_k=20, max_candidates=30)
    try:
        p = srv.port
        s, out, _ = call(p, "POST", "/search", {"query": ["fox"] * 10, "k": 10})
        assert s == 400 and "10 queries x k=10 = 100 hits; the limit is 50" in out["error"]
        assert call(p, "POST", "/search", {"query": ["fox"] * 5, "k": 10, "mode": "bm25"})[0] == 200
        s, out, _ = call(p, "POST", "/search", {"query": "fox", "k": 21})
        assert s == 400 and "at most 20" in out["error"]
        s, out, _ = call(p, "POST", "/search", {"query": "fox", "candidates": 31})
        assert s == 400 and "at most 30" in out["error"]
        s, out, _ = call(p, "POST", "/search", {"query": ["fox"] * 65})  # the schema's own cap
        assert s == 400 and "query" in out["error"]
    finally:
        srv.stop()


def _closed_within(sock, seconds):
    """True when the server closes ``sock`` within ``seconds`` (reading what it sends meanwhile)."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False


def test_slow_clients_are_cut_off(index):
    """A client trickling its headers or its body is disconnected at the request deadline, and
    other clients are served meanwhile."""
    srv = serving(index, request_timeout_s=1.0)
    try:
        p = srv.port
        socks = []
        for kind in ("headers", "body"):
            s = socket.create_connection(("127.0.0.1", p))
            s.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\n")
            if kind == "body":
                s.sendall(b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
            socks.append(s)
        stop = time.monotonic() + 1.6
        closed = [False, False]
        while time.monotonic() < stop and not all(closed):  # one byte every 0.1 s on each
            for n, s in enumerate(socks):
                try:
                    s.sendall(b"X-Slow: 1\r\n" if n == 0 else b" ")
                except OSError:
                    closed[n] = True
            time.sleep(0.1)
            assert call(p, "GET", "/health")[0] == 200  # the others are served
        for n, s in enumerate(socks):
            assert closed[n] or _closed_within(s, 3.0), ("headers", "body")[n]
            s.close()
        # a keep-alive client that goes idle is closed too (uvicorn's keep-alive timeout)
        c = http.client.HTTPConnection("127.0.0.1", p, timeout=30)
        c.request("GET", "/health")
        assert c.getresponse().read()
        assert _closed_within(c.sock, 10.0)
        c.close()
    finally:
        srv.stop()


def test_64_and_200_simultaneous_connections_are_all_answered(index):
    srv = serving(index)
    try:
        p = srv.port
        for n in (64, 200):
            barrier = threading.Barrier(n)
            answers, errors = [], []

            def client(i):
                try:
                    c = http.client.HTTPConnection("127.0.0.1", p, timeout=120)
                    barrier.wait(30)
                    if i % 4 == 0:
                        c.request("POST", "/search", body=json.dumps({"query": "fox river", "k": 3, "mode": "bm25"}),
                                  headers={"Content-Type": "application/json"})
                    else:
                        c.request("GET", "/health")
                    r = c.getresponse()
                    r.read()
                    answers.append(r.status)
                    c.close()
                except Exception as e:  # noqa: BLE001 - a reset or refusal is what this test looks for
                    errors.append(repr(e))

            threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(180)
            assert errors == [] and answers == [200] * n, (n, errors[:3])
    finally:
        srv.stop()


def test_keep_alive_requests_use_one_connection_and_tcp_nodelay(index):
    srv = serving(index)
    try:
        c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        c.request("GET", "/health")
        c.getresponse().read()
        sock = c.sock
        for _ in range(20):
            c.request("POST", "/search", body=b'{"query": "fox", "k": 1, "mode": "bm25"}',
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            assert r.status == 200 and r.read()
        assert c.sock is sock
        # the server's side of this connection has Nagle off (no ~40 ms delayed-ACK stalls)
        conns = list(srv.server.server_state.connections)
        assert conns
        for proto in conns:
            ssock = proto.transport.get_extra_info("socket")
            assert ssock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        c.close()
    finally:
        srv.stop()


# --------------------------------------------------------------------------- metrics


def _families(text):
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(fam, sample_name, **labels):
    return sum(s.value for s in fam.samples
               if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_are_scraped_and_parsed(index):
    srv = serving(index)
    try:
        p = srv.port
        for _ in range(3):
            assert call(p, "POST", "/search", {"query": "fox", "k": 2, "mode": "bm25"})[0] == 200
        assert call(p, "POST", "/search", {"query": ["fox", "water"], "k": 2})[0] == 200
        assert call(p, "POST", "/search", {"query": "x", "k": 0})[0] == 400
        assert call(p, "GET", "/nowhere")[0] == 404
        s, text, r = call(p, "GET", "/metrics")
        assert s == 200 and r.getheader("Content-Type").startswith("text/plain")
        fams = _families(text.decode())
        req = fams["hybridsearch_requests"]
        assert _value(req, "hybridsearch_requests_total", endpoint="/search", mode="bm25", status="200") == 3
        assert _value(req, "hybridsearch_requests_total", endpoint="/search", mode="hybrid", status="200") == 1
        assert _value(req, "hybridsearch_requests_total", endpoint="other", status="404") == 1
        err = fams["hybridsearch_errors"]
        assert _value(err, "hybridsearch_errors_total", endpoint="/search", status="400") == 1
        lat = fams["hybridsearch_request_seconds"]
        assert _value(lat, "hybridsearch_request_seconds_count", endpoint="/search", mode="bm25") == 3
        # encoding and searching are timed apart; BM25 encodes nothing (~0 s), hybrid encodes
        enc, srch = fams["hybridsearch_encode_seconds"], fams["hybridsearch_search_seconds"]
        assert _value(enc, "hybridsearch_encode_seconds_count", mode="hybrid") == 1
        assert _value(enc, "hybridsearch_encode_seconds_sum", mode="hybrid") > 0
        assert _value(srch, "hybridsearch_search_seconds_count", mode="bm25") == 3
        st = index.stats()
        assert fams["hybridsearch_documents"].samples[0].value == st["documents"] == 12
        assert fams["hybridsearch_segments"].samples[0].value == st["segments"]
        assert fams["hybridsearch_index_generation"].samples[0].value == st["generation"]
    finally:
        srv.stop()


# --------------------------------------------------------------------------- readiness, page, headers


def test_ready_while_the_index_opens(tmp_path, tiny_m3, index):
    """Given a folder, the app opens it in the background: alive at once, ready once open."""
    srv = start(create_app(str(index.path), Settings(port=0), model=str(tiny_m3), log=None))
    try:
        deadline = time.monotonic() + 60
        seen = set()
        while True:
            s, out, r = call(srv.port, "GET", "/ready")
            seen.add(s)
            if s == 200:
                break
            assert s == 503 and "opening" in out["error"] and r.getheader("Retry-After")
            assert call(srv.port, "POST", "/search", {"query": "fox"})[0] == 503
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert out["documents"] == 12 and out["generation"] == index.stats()["generation"]
        assert call(srv.port, "POST", "/search", {"query": "fox", "k": 1})[0] == 200
    finally:
        srv.stop()
    assert srv.runtime.index.closed  # the app opened it, the app closed it
    bad = start(create_app(str(tmp_path / "nothing"), Settings(port=0), log=None))
    try:
        deadline = time.monotonic() + 30
        while True:
            s, out, _ = call(bad.port, "GET", "/ready")
            if "could not be opened" in out.get("error", ""):
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert s == 503 and call(bad.port, "GET", "/health")[0] == 200
    finally:
        bad.stop()


def test_page_and_assets(index):
    srv = serving(index)
    try:
        p = srv.port
        s, html, r = call(p, "GET", "/")
        assert s == 200 and r.getheader("Content-Type").startswith("text/html") and b"<html" in html.lower()
        listed = (WEB_DIR / "MANIFEST").read_text().split()
        assert "app.js" in listed and "style.css" in listed
        for name in listed:
            s, data, r = call(p, "GET", f"/assets/{name}")
            assert s == 200 and data == (WEB_DIR / name).read_bytes()
        assert call(p, "GET", "/assets/app.js")[2].getheader("Content-Type").startswith("text/javascript")
        assert call(p, "GET", "/assets/style.css")[2].getheader("Content-Type").startswith("text/css")
        for name in ("MANIFEST", "..%2Fserver%2Fapp.py", "../../pyproject.toml", "%2e%2e", "nope.js", ".hidden"):
            s, out, _ = call(p, "GET", f"/assets/{name}")
            assert s == 404 and set(out) == {"error"}, name
    finally:
        srv.stop()


def test_every_answer_names_its_worker(index):
    import os

    srv = serving(index)
    try:
        for method, path, body in (("GET", "/health", None), ("POST", "/search", {"query": "fox"}),
                                   ("GET", "/nowhere", None), ("POST", "/search", {"k": 1})):
            assert call(srv.port, method, path, body)[2].getheader("X-Worker") == str(os.getpid())
    finally:
        srv.stop()
