"""bench/bench_server_load.py runs end to end against a real `hybridsearch serve` on 127.0.0.1:
a tiny index, two short cases, a few clients. Timings are not checked; that the load was served
without errors and that every acknowledged write is on disk afterwards is."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_load_bench_smoke(tmp_path, tiny_dense):
    out, raw = tmp_path / "load.md", tmp_path / "load.json"
    p = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_server_load.py"), "--tiny-model", str(tiny_dense),
         "--docs", "60", "--servers", "serve", "--seconds", "1.5", "--clients-scale", "0.25",
         "--cases", "16 read-only fresh", "16 + writer keep-alive", "--health-requests", "20",
         "--timeout", "30", "--work", str(tmp_path / "work"), "--out", str(out), "--json-out", str(raw)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    (server,) = json.loads(raw.read_text())["servers"].values()
    for name in ("16 read-only fresh", "16 + writer keep-alive"):
        case = server["cases"][name]
        assert case["errors"] == {}, (case["errors"], case.get("error_samples"))
        assert case["count"]["search"] > 0 and case["searches_per_s"] > 0
    writer = server["cases"]["16 + writer keep-alive"]["count"]
    assert writer["add"] >= 1
    v = server["verify"]  # read back from the index folder after the server stopped
    assert v["acked_adds"] == writer["add"] and v["acked_deletes"] == writer.get("delete", 0)
    assert v["missing_adds"] == 0 and v["deleted_but_present"] == 0
    assert server["health"]["keep-alive"] > 0 and server["health"]["fresh"] > 0  # p50s, ms
    if server["header"].startswith("hybridsearch/"):  # the stdlib server: not sent the 7 MB query
        assert server["big_query"] is None
    else:  # refused (a query-length or body cap), not searched
        assert server["big_query"]["status"] in (400, 413), server["big_query"]
    text = out.read_text()
    assert "| 16 + writer keep-alive | 4 + 1 | hybridsearch serve |" in text
    assert "## Acknowledged writes after the servers stopped" in text
