"""A writer killed with SIGKILL at any moment leaves an index that opens at its last commit."""

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from hybridsearch.index.hybrid import HybridIndex

WRITER = textwrap.dedent("""
    import os, signal, sys
    from hybridsearch import BGEM3Encoder
    from hybridsearch.index import hybrid, storage
    model, path, mode = sys.argv[1:4]
    idx = hybrid.HybridIndex.open(path, BGEM3Encoder(model, device="cpu"))
    if mode == "at-manifest":
        # Die exactly between the BM25 commit and the manifest switch.
        real = storage.write_json_durable
        def die(p, obj):
            if p.name == "manifest.json":
                os.kill(os.getpid(), signal.SIGKILL)
            real(p, obj)
        storage.write_json_durable = die
    i = 0
    print("ready", flush=True)
    while True:
        idx.add([{"id": f"w{i}-{j}", "text": f"writer batch {i} doc {j} fox"} for j in range(20)])
        if i % 3 == 2:
            idx.delete([f"w{i - 1}-0"])
        i += 1
""")


def run_writer(tiny_m3, path, mode, delay):
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(tiny_m3), str(path), mode],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdout.readline().strip() == b"ready"
    if mode == "at-manifest":
        p.wait(timeout=120)
    else:
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL


def check_consistent(path, m3_encoder):
    idx = HybridIndex.open(path, m3_encoder)
    n = len(idx)
    ids = set(idx._state.ids)
    # every committed document is searchable by every channel, and nothing else is
    for mode in ("dense", "sparse", "colbert", "bm25"):
        hits = idx.search("writer fox", k=n + 50, mode=mode)
        assert {h.id for h in hits} <= ids
        if mode in ("dense", "colbert"):
            assert len(hits) == n
    assert {h.id for h in idx.search("writer batch doc fox", k=n + 50, mode="bm25")} == ids
    idx.verify()
    # and the next writer cleans up and continues
    idx.add([{"id": f"after-{n}", "text": "after the crash fox"}])
    assert len(idx) == n + 1
    assert [h.id for h in idx.search("after crash", k=1, mode="bm25")] == [f"after-{n}"]
    leftovers = [p.name for p in path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    idx.close()
    return n


def test_kill_between_bm25_commit_and_manifest(tmp_path, tiny_m3, m3_encoder):
    path = tmp_path / "idx"
    HybridIndex.create(path, m3_encoder).close()
    run_writer(tiny_m3, path, "at-manifest", 0)
    # The segment and the BM25 docs were written, the manifest was not: nothing of it is visible.
    assert check_consistent(path, m3_encoder) == 0


@pytest.mark.parametrize("delay", [0.3, 0.9, 1.7])
def test_kill_at_random_moments(tmp_path, tiny_m3, m3_encoder, delay):
    path = tmp_path / "idx"
    HybridIndex.create(path, m3_encoder).close()
    run_writer(tiny_m3, path, "loop", delay)
    check_consistent(path, m3_encoder)
