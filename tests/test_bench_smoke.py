"""The benchmark runner runs end to end and writes its report (figures themselves are not
checked: timings do not belong in tests)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # runs every benchmark section end to end: minutes
def test_quick_bench_runs_and_writes_results(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "RESULTS.md"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--tiny", "--sections", "scale",
                        "breakdown", "quality", "--out", str(out), "--tmp", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "Machine:" in text and "## Where we lose" in text
    assert "This section failed" not in text, text
    assert "| 1,000 | hybridsearch hybrid |" in text            # scale table row for our hybrid
    assert "bare FAISS dense (1 thread)" in text and "bm25s BM25" in text
    assert "Milvus Lite hybrid (RRF)" in text
    assert "Not run: no `--scifact` folder given." in text       # quality needs the data path
    assert "| sum of stages |" in text                            # breakdown table
    for png in ("latency.png", "build.png", "stages.png"):
        assert (tmp_path / "results" / "plots" / png).stat().st_size > 1000
        assert f"results/plots/{png}" in text


def test_bad_arguments_fail_clearly(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--tiny", "--scifact", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no corpus.jsonl" in r.stderr
