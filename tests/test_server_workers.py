"""`hybridsearch serve DIR --workers 2`: two processes over one folder, in a real subprocess.

A write answered by one worker is visible through the other (readers follow commits), writes
sent to both at once are serialised by the index's file lock, /metrics on any worker counts every
worker's requests, and SIGTERM stops them all and removes the metrics folder.
"""

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")

from hybridsearch import HybridIndex  # noqa: E402


def request(port, method, path, body=None):
    """One request on a fresh connection (so the kernel may hand it to either worker)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        data = None if body is None else json.dumps(body).encode()
        c.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        r = c.getresponse()
        payload = r.read()
        out = json.loads(payload) if r.getheader("Content-Type", "").startswith("application/json") else payload
        return r.status, out, int(r.getheader("X-Worker"))
    finally:
        c.close()


def by_each_worker(port, method, path, body=None, workers=2, tries=400):
    """Send the request until each of ``workers`` distinct workers has answered it; {pid: answer}."""
    seen = {}
    for _ in range(tries):
        s, out, pid = request(port, method, path, body)
        seen.setdefault(pid, (s, out))
        if len(seen) == workers:
            return seen
    raise AssertionError(f"only workers {sorted(seen)} answered in {tries} tries")


@pytest.fixture
def two_workers(tmp_path, m3_encoder):
    idx = HybridIndex.create(tmp_path / "idx", m3_encoder)
    idx.add([{"id": f"d{i}", "text": f"fox river water {i}", "metadata": {"i": i}} for i in range(10)])
    idx.close()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp), "PYTHONPATH": os.getcwd()}
    env.pop("HYBRIDSEARCH_API_KEY", None)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "hybridsearch.cli", "serve", str(tmp_path / "idx"), "--port", "0",
                             "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    port_found = threading.Event()

    def drain():  # read stderr all along (the access log), note the port
        for line in proc.stderr:
            lines.append(line)
            if "http://127.0.0.1:" in line and not port_found.is_set():
                port_found.port = int(line.split("http://127.0.0.1:")[1].split()[0].split("/")[0])
                port_found.set()

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    try:
        assert port_found.wait(120), "".join(lines)
        port = port_found.port
        deadline = time.monotonic() + 180
        while True:  # both workers load the model: wait until each one answers /ready
            try:
                answers = by_each_worker(port, "GET", "/ready", tries=50)
                if all(s == 200 for s, _ in answers.values()):
                    break
            except (OSError, AssertionError):
                pass
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.3)
        yield proc, port, tmp, lines
    finally:
        if proc.poll() is None:  # SIGTERM first: the supervisor stops its workers
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)


def test_two_workers_serve_one_folder_then_stop_on_sigterm(two_workers):
    """One server for everything (two workers take a while to load their models)."""
    proc, port, tmp, lines = two_workers
    _consistent_writes(port, tmp, proc)
    _metrics_of_every_worker_then_sigterm(proc, port, tmp, lines)


def _consistent_writes(port, tmp, proc):
    assert [p.name for p in tmp.iterdir() if p.name.startswith("hybridsearch-metrics-")]  # multiprocess metrics
    health = by_each_worker(port, "GET", "/health")
    assert len(health) == 2 and os.getpid() not in health and proc.pid not in health
    assert all(out == {"status": "ok", "documents": 10} for s, out in health.values())

    # a write through one worker is visible through the other at once
    for n in range(3):
        s, out, writer = request(port, "POST", "/add", {"documents": [{"id": f"new{n}", "text": f"quagga zebra {n}"}]})
        assert s == 200 and out["added"] == 1
        answers = by_each_worker(port, "POST", "/search", {"query": f"quagga {n}", "k": 20, "mode": "bm25"})
        for pid, (s, out) in answers.items():
            assert s == 200 and {f"new{j}" for j in range(n + 1)} <= {h["id"] for h in out["hits"]}, (pid, writer)
        for pid, (s, out) in by_each_worker(port, "GET", "/health").items():
            assert out["documents"] == 11 + n, pid

    # writes sent to both workers at once are serialised through the index's lock: none lost
    results = []

    def writer(w):
        for b in range(3):
            docs = [{"id": f"w{w}-{b}-{i}", "text": f"okapi {w} {b} {i}"} for i in range(2)]
            results.append(request(port, "POST", "/add", {"documents": docs}))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [s for s, _, _ in results] == [200] * 12
    assert len({pid for _, _, pid in results}) == 2  # both workers wrote
    for pid, (s, out) in by_each_worker(port, "GET", "/stats").items():
        assert out["documents"] == 13 + 24, pid
    s, out, _ = request(port, "POST", "/delete", {"ids": ["new0"]})
    assert s == 200
    for pid, (s, out) in by_each_worker(port, "POST", "/search", {"query": "quagga", "k": 20, "mode": "bm25"}).items():
        assert "new0" not in {h["id"] for h in out["hits"]}, pid


def _metrics_of_every_worker_then_sigterm(proc, port, tmp, lines):
    from prometheus_client.parser import text_string_to_metric_families

    def searches(text):
        fams = {f.name: f for f in text_string_to_metric_families(text.decode())}
        return fams, sum(x.value for x in fams["hybridsearch_requests"].samples
                         if x.name == "hybridsearch_requests_total" and x.labels["endpoint"] == "/search")

    s, text, _ = request(port, "GET", "/metrics")
    before = searches(text)[1]
    assert s == 200 and before > 0
    sent = 0
    pids = set()
    while len(pids) < 2 or sent < 20:
        s, _, pid = request(port, "POST", "/search", {"query": "fox", "k": 3, "mode": "bm25"})
        assert s == 200
        sent += 1
        pids.add(pid)
    for pid, (s, text) in by_each_worker(port, "GET", "/metrics").items():
        assert s == 200
        fams, total = searches(text)
        assert total == before + sent, (pid, total, before, sent)  # both workers' counts, from either worker
        assert fams["hybridsearch_documents"].samples[0].value == 13 + 24 - 1

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(90) == 0
    with pytest.raises(OSError):
        request(port, "GET", "/health")
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("hybridsearch-metrics-")]
    time.sleep(0.5)
    assert any("server stopped" in line for line in lines)


def test_what_a_worker_unpickles_is_light():
    """uvicorn's supervisor pings a spawned worker while it unpickles its config; if that pulled in
    torch or numpy the worker could miss the pings on a busy machine and be restarted for ever."""
    code = ("import functools, pickle, sys, uvicorn\n"
            "from hybridsearch.server.protocol import Protocol\n"
            "from hybridsearch.server.settings import Settings\n"
            "from hybridsearch.server.worker import make_app\n"
            "cfg = uvicorn.Config(functools.partial(make_app, 'DIR', None, Settings()), http=Protocol, factory=True)\n"
            "sys.stdout.buffer.write(pickle.dumps(cfg))\n")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    blob = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=120, check=True).stdout
    check = ("import pickle, sys\n"
             "pickle.loads(sys.stdin.buffer.read())\n"
             "print(sorted(m for m in ('torch', 'numpy', 'faiss', 'numba', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", check], input=blob, capture_output=True, env=env, timeout=120,
                         check=True).stdout
    assert out.strip() == b"[]"
