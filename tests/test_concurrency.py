"""Many threads and many processes on one index folder.

* every search answers from one snapshot, whatever commits and compactions land meanwhile;
* a reader (also a server in another process) follows other processes' commits;
* writers serialize across processes (wait, or fail with a clear lock error naming the holder);
* files of older generations outlive the readers that still use them;
* two ``hybridsearch index`` runs on a new folder lose no committed document;
* an index on read-only media opens and answers.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import pytest

from hybridsearch.errors import IndexLockedError
from hybridsearch.index.hybrid import HybridIndex
from hybridsearch.index.merge import MergePolicy

WORDS = "fox otter heron walrus quokka narwhal lemur okapi tapir ibis".split()
QUERIES = ["fox otter", "heron walrus", "quokka", "narwhal lemur okapi", "tapir ibis fox"]


def doc(i, tag=""):
    w = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(1 + i % 4)]
    return {"id": f"d{i}", "text": f"document {i} {tag} " + " ".join(w), "metadata": {"g": i % 3}}


def answer(idx, state, mode):
    """The ranking ``idx`` gives for QUERIES on the fixed snapshot ``state``."""
    cfg = idx.default_fusion() if mode == "hybrid" else None
    C = idx.default_candidates()
    allowed = None if state.all_alive else state.alive
    hits = idx._search(state, QUERIES, 5, mode, cfg, allowed, C)
    return [[(h.id, round(h.score, 4)) for h in row] for row in hits]


def test_searches_answer_from_one_snapshot_while_writing(tmp_path, m3_encoder, monkeypatch):
    # A small merge factor: segments merge every few commits, in generations of their own.
    idx = HybridIndex.create(tmp_path / "idx", m3_encoder, merge_policy=MergePolicy(factor=3, floor=10))
    idx.add([doc(i) for i in range(60)])
    expected, seen, errors, merges = {}, [], [], []
    used = threading.local()
    real_search = HybridIndex._search
    real_install = HybridIndex._install
    real_merge = HybridIndex._merge_range

    def spy(self, state, *a, **kw):  # record which generation each search read
        used.gen = state.generation
        return real_search(self, state, *a, **kw)

    def install(self, state, key):  # every generation, merges included (readers race the writer)
        real_install(self, state, key)
        won = self._state  # the first state made for a generation is the one every search reads
        if won.generation == state.generation and state.generation not in expected:
            expected[state.generation] = {m: answer(self, won, m) for m in ("bm25", "dense", "hybrid")}

    def merge(self, i, j, renumber=False):
        real_merge(self, i, j, renumber)
        if not renumber:
            merges.append(self._state.generation)

    monkeypatch.setattr(HybridIndex, "_search", spy)
    monkeypatch.setattr(HybridIndex, "_install", install)
    monkeypatch.setattr(HybridIndex, "_merge_range", merge)

    def record_expected():
        st = idx._current()
        assert st.generation in expected

    expected[idx._current().generation] = {m: answer(idx, idx._current(), m) for m in ("bm25", "dense", "hybrid")}
    stop = threading.Event()

    def searcher(mode):
        try:
            while not stop.is_set():
                hits = idx.search_batch(QUERIES, k=5, mode=mode)
                seen.append((used.gen, mode, [[(h.id, round(h.score, 4)) for h in r] for r in hits]))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=searcher, args=(m,)) for m in ("bm25", "dense", "hybrid", "bm25")]
    for t in threads:
        t.start()
    try:
        n = 60
        for step in range(8):
            idx.add([doc(i, "new") for i in range(n, n + 15)])
            n += 15
            record_expected()
            idx.delete([f"d{i}" for i in range(step * 5, step * 5 + 5)])
            record_expected()
            idx.upsert([doc(i, "changed") for i in range(step * 5 + 5, step * 5 + 8)])
            record_expected()
            if step % 3 == 2:
                idx.compact()
                record_expected()
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert len(seen) > 20
    gens = {g for g, _, _ in seen}
    assert len(gens) > 3  # searches really ran across many commits
    for gen, mode, got in seen:
        assert got == expected[gen][mode], (gen, mode)
    assert merges  # merges happened, and answered exactly as the generation before them
    for gen in merges:  # (equal scores may come in another order: the segments changed)
        for mode in expected[gen]:
            if mode == "bm25":  # its statistics lose the deleted rows a merge drops (as Lucene's)
                continue
            for a, b in zip(expected[gen][mode], expected[gen - 1][mode]):
                assert [sc for _, sc in a] == [sc for _, sc in b], (gen, mode)
                low = a[-1][1] if a else None
                assert {i for i, sc in a if sc != low} == {i for i, sc in b if sc != low}, (gen, mode)


def test_reader_follows_commits_and_old_files_outlive_its_snapshot(tmp_path, m3_encoder):
    w = HybridIndex.create(tmp_path / "idx", m3_encoder)
    w.add([doc(i) for i in range(30)])
    r = HybridIndex.open(tmp_path / "idx", m3_encoder)
    assert len(r) == 30
    w.add([doc(i) for i in range(30, 40)])
    assert len(r) == 40 and "d35" in r  # a separate object (another process alike) follows
    held = r._current()  # a search in flight on this generation
    old_segments = [s.folder for s in held.segments]
    w.delete(["d0", "d1"])
    w.compact()
    assert len(r) == 38
    # the in-flight snapshot still reads its files: nothing it names was removed
    assert all(p.is_dir() for p in old_segments)
    assert [h.id for h in r._hits(held, *r._bm25_topk(held, ["document 0"], 40, None), "bm25")[0]].count("d0") == 1
    assert r._docs(held, [0])[0]["id"] == "d0"
    del held
    w.add([doc(100)])  # the next writer collects what nobody holds any more
    assert not any(p.exists() for p in old_segments)
    names = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert sum(n.startswith("seg-") for n in names) == 2
    # r's current snapshot is still the compacted generation: its lease stays until r moves on
    assert sum(n.startswith("lease-") for n in names) == 2
    assert {h.id for h in r.search("document", k=100, mode="bm25")} == set(w.ids())
    w.delete(["d2"])
    assert sum(p.name.startswith("lease-") for p in (tmp_path / "idx").iterdir()) == 2  # r: previous
    assert len(r) == 38
    w.delete(["d3"])
    assert sum(p.name.startswith("lease-") for p in (tmp_path / "idx").iterdir()) == 2
    r.close()
    w.delete(["d4"])
    assert [p.name for p in (tmp_path / "idx").iterdir() if p.name.startswith("lease-")] == \
        [f"lease-{w._current().generation:06d}.json"]


HOLD_LOCK = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{os.getpid()}\\n".encode())
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def test_second_writer_waits_then_fails_naming_the_holder(tmp_path, m3_encoder):
    idx = HybridIndex.create(tmp_path / "idx", m3_encoder)
    idx.add([doc(i) for i in range(5)])
    p = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "idx" / "LOCK"), "30"],
                         stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == b"locked"
        idx.lock_timeout = 0.5
        with pytest.raises(IndexLockedError, match=f"held by pid {p.pid}") as e:
            idx.add([doc(10)])
        assert str(tmp_path / "idx" / "LOCK") in str(e.value)
        assert len(idx) == 5 and len(idx.search("document", k=10, mode="bm25")) == 5  # reads go on
    finally:
        p.kill()
        p.wait()
    idx.add([doc(10)])  # the lock is free again
    assert len(idx) == 6
    # a holder that lets go within the timeout: the writer waits, then writes
    p = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "idx" / "LOCK"), "1"],
                         stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"locked"
    idx.lock_timeout = 60
    idx.add([doc(11)])
    p.wait()
    assert len(idx) == 7


def write_corpus(path, lo, hi):
    path.write_text("".join(json.dumps({"id": f"c{i}", "text": doc(i)["text"]}) + "\n" for i in range(lo, hi)))
    return path


def cli(*args):
    return [sys.executable, "-m", "hybridsearch.cli", *map(str, args)]


def test_two_index_runs_on_a_new_folder_lose_nothing(tmp_path, tiny_m3):
    for attempt in range(2):
        folder = tmp_path / f"new{attempt}"
        a = write_corpus(tmp_path / f"a{attempt}.jsonl", 0, 40)
        b = write_corpus(tmp_path / f"b{attempt}.jsonl", 100, 130)
        procs = [subprocess.Popen(cli("index", c, "--index", folder, "--model", tiny_m3, "-q",
                                      "--commit-every", "8"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in (a, b)]
        outs = [p.communicate(timeout=300) for p in procs]
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, err.decode()
        idx = HybridIndex.open(folder, tiny_m3)
        # each run deletes passages of documents missing from its corpus only for ids it
        # indexed itself, so both document sets are there, exactly once
        assert sorted(idx.ids()) == sorted([f"c{i}" for i in range(40)] + [f"c{i}" for i in range(100, 130)])
        assert {h.id for h in idx.search("document", k=200, mode="bm25")} == set(idx.ids())


COMPACTOR = textwrap.dedent("""
    import sys
    from hybridsearch import BGEM3Encoder
    from hybridsearch.index.hybrid import HybridIndex
    idx = HybridIndex.open(sys.argv[1], BGEM3Encoder(sys.argv[2], device="cpu"))
    for _ in range(int(sys.argv[3])):
        idx.compact()
    print("compacted", len(idx), flush=True)
""")


def _get(port, path, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, json.loads(r.read())


def test_server_index_process_and_compaction_at_once(tmp_path, tiny_m3):
    folder = tmp_path / "idx"
    first = write_corpus(tmp_path / "first.jsonl", 0, 30)
    subprocess.run(cli("index", first, "--index", folder, "--model", tiny_m3, "-q"), check=True, timeout=300)
    server = subprocess.Popen(cli("serve", folder, "--port", "0"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline:
            line = server.stderr.readline()
            if "http://127.0.0.1:" in line:
                port = int(line.split("http://127.0.0.1:")[1].split()[0].split("/")[0])
        assert port, "server did not start"
        assert _get(port, "/health")[1]["documents"] == 30
        # a separate `index` process adds documents, a third process compacts, the server answers
        # searches all along
        more = tmp_path / "more.jsonl"
        more.write_text(first.read_text() + "".join(
            json.dumps({"id": f"c{i}", "text": doc(i)["text"]}) + "\n" for i in range(30, 70)))
        writer = subprocess.Popen(cli("index", more, "--index", folder, "-q", "--commit-every", "5"),
                                  stderr=subprocess.PIPE)
        compactor = subprocess.Popen([sys.executable, "-c", COMPACTOR, folder, tiny_m3, "3"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        answers = 0
        while writer.poll() is None or compactor.poll() is None:
            status, body = _get(port, "/search", {"query": "document fox", "k": 100, "mode": "bm25"})
            assert status == 200
            ids = [h["id"] for h in body["hits"]]
            assert len(ids) == len(set(ids)) and set(ids) <= {f"c{i}" for i in range(70)}
            assert len(ids) >= 30  # never fewer than the first commit's documents
            answers += 1
        assert writer.returncode == 0, writer.stderr.read().decode()
        assert compactor.returncode == 0, compactor.stderr.read().decode()
        assert answers > 0
        # within a few seconds the server sees everything the other processes committed
        deadline = time.monotonic() + 10
        while _get(port, "/health")[1]["documents"] != 70:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        _, body = _get(port, "/search", {"query": "document", "k": 100, "mode": "bm25"})
        assert sorted(h["id"] for h in body["hits"]) == sorted(f"c{i}" for i in range(70))
    finally:
        server.terminate()
        server.wait(30)


READ_ONLY = textwrap.dedent("""
    import sys
    from hybridsearch.index.hybrid import HybridIndex
    idx = HybridIndex.open(sys.argv[1], sys.argv[2])
    print(idx.stats()["documents"], [h.id for h in idx.search("document 3", k=3, mode="bm25")][0])
    try:
        idx.add([{"id": "new", "text": "new doc"}])
    except PermissionError as e:
        print("refused:", e)
""")


def test_index_on_read_only_media_opens_for_reading(tmp_path, m3_encoder, tiny_m3):
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs user namespaces to make a read-only bind mount")
    idx = HybridIndex.create(tmp_path / "idx", m3_encoder)
    idx.add([doc(i) for i in range(10)])
    idx.close()
    before = sorted(os.listdir(tmp_path / "idx"))
    script = tmp_path / "ro.py"
    script.write_text(READ_ONLY)
    folder = tmp_path / "idx"
    cmd = (f"mount --bind -o ro {folder} {folder} && {sys.executable} {script} {folder} {tiny_m3}")
    p = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0] == "10 d3"
    assert lines[1].startswith("refused:") and "read-only" in lines[1]
    assert sorted(os.listdir(folder)) == before


def test_lock_file_symlink_is_refused(tmp_path, m3_encoder):
    from hybridsearch.errors import IndexFormatError

    idx = HybridIndex.create(tmp_path / "idx", m3_encoder)
    idx.add([doc(0)])
    target = tmp_path / "elsewhere"
    (tmp_path / "idx" / "LOCK").unlink()
    os.symlink(target, tmp_path / "idx" / "LOCK")
    with pytest.raises(IndexFormatError, match="symlink"):
        idx.add([doc(1)])
    assert not target.exists()
    with pytest.raises(IndexFormatError, match="symbolic link"):
        HybridIndex.open(tmp_path / "idx", m3_encoder)
    (tmp_path / "idx" / "LOCK").unlink()
    assert len(HybridIndex.open(tmp_path / "idx", m3_encoder)) == 1


def test_stray_path_helper_names():
    from hybridsearch.index.locking import owned_entry

    assert owned_entry("seg-000001") and owned_entry("lease-000002.json") and owned_entry("LOCK")
    assert not owned_entry("notes.txt") and not owned_entry("seg-1") and not owned_entry("../seg-000001")
