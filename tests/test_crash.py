"""A writer killed with SIGKILL at any moment leaves an index that opens at its last commit."""

import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from hybridsearch.index import locking
from hybridsearch.index.hybrid import HybridIndex
from hybridsearch.testing import legacy_bm25_index

WRITER = textwrap.dedent("""
    import os, signal, sys
    from hybridsearch import BGEM3Encoder
    from hybridsearch.index import hybrid, storage
    model, path, mode = sys.argv[1:4]
    from hybridsearch.index.merge import MergePolicy
    policy = MergePolicy(factor=2, floor=10) if mode == "merging" else MergePolicy()
    idx = hybrid.HybridIndex.open(path, BGEM3Encoder(model, device="cpu"), merge_policy=policy)
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
    ids = set(idx.ids())
    assert len(ids) == n
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


@pytest.mark.parametrize("delay", [1.0, 2.5, 4.0])
def test_kill_while_merging(tmp_path, tiny_m3, m3_encoder, delay):
    """Merges after nearly every commit (factor 2), a ColBERT codebook trained early and float16
    segments coded as they merge: a kill at any moment leaves a consistent index."""
    path = tmp_path / "idx"
    HybridIndex.create(path, m3_encoder, codec_train_tokens=150).close()
    run_writer(tiny_m3, path, "merging", delay)
    n = check_consistent(path, m3_encoder)
    segments = json.loads((path / "manifest.json").read_text())["segments"]
    if n >= 100:  # five commits of 20 or more: merges ran (one segment a commit otherwise)
        assert len(segments) < (n + 1) // 20


# ----------------------------------------------------------------------------------------------
# delete / upsert / compact on an index with history, killed at the worst moments and at random.
#
# Children are forked from one "zygote" process that has imported torch and loaded the tiny model
# once (single-threaded, no inference, no tantivy before the fork), so each kill costs a fork, not
# a Python start and a model load. The child installs its kill point, opens the index, runs its
# operations, and SIGKILLs itself at the chosen point (or is killed by the test after a delay).

ZYGOTE = textwrap.dedent("""
    import json, os, signal, sys, traceback
    from pathlib import Path
    import torch
    torch.set_num_threads(1)  # no OpenMP pool in the zygote: forking stays safe
    from hybridsearch import BGEM3Encoder
    from hybridsearch.index import hybrid, locking, storage
    from hybridsearch.retrievers.bm25 import BM25Index
    encoder = BGEM3Encoder(sys.argv[1], device="cpu")

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def install(point):
        switched = []  # non-empty once manifest.json has been renamed into place
        real_wjd, real_replace = storage.write_json_durable, os.replace
        def wjd(p, obj):
            if point == "manifest" and p.name == "manifest.json":
                die()  # lease of the new generation written, manifest not
            real_wjd(p, obj)
            if p.name == "manifest.json":
                switched.append(True)
        storage.write_json_durable = wjd
        def replace(src, dst):
            name = Path(dst).name
            if point == "rename" and name == "manifest.json":
                die()  # manifest.json.tmp written and fsynced, not renamed
            real_replace(src, dst)
            if point == "deleted" and name.startswith("deleted-"):
                die()  # the new deletion file is in place, nothing else of the commit
        os.replace = replace
        if point == "lease":  # everything of the commit written (compaction: the new BM25 too)
            locking.write_lease = lambda *a: die()
        if point == "segment":  # the new segment folder is complete and renamed into place
            real_ws = hybrid.write_segment
            def ws(*a, **kw):
                entry = real_ws(*a, **kw)
                die()
                return entry
            hybrid.write_segment = ws
            real_ms = hybrid.merge_segments  # compaction and merges write their segment here
            def ms(*a, **kw):
                entry = real_ms(*a, **kw)
                die()
                return entry
            hybrid.merge_segments = ms
        if point == "bm25-commit":  # manifest switched, BM25's deletions queued, not committed
            real_commit = BM25Index.commit
            def commit(self):
                if switched:
                    die()
                real_commit(self)
            BM25Index.commit = commit
        if point == "collect":  # manifest switched, old generation not collected
            real_collect = locking.collect
            def collect(*a):
                if switched:
                    die()
                return real_collect(*a)
            locking.collect = collect

    def apply(idx, op):
        kind, arg = op
        if kind == "delete":
            idx.delete(arg)
        elif kind == "upsert":
            idx.upsert(arg)
        elif kind == "add":
            idx.add(arg)
        else:
            idx.compact()

    def child(req):
        if req.get("kill"):
            install(req["kill"])
        idx = hybrid.HybridIndex.open(req["path"], encoder)
        log = None
        if req.get("progress"):
            log = os.open(req["progress"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.write(1, f"ready {os.getpid()}\\n".encode())
        for k, op in enumerate(req["ops"]):
            apply(idx, op)
            if log is not None:
                os.write(log, f"{k}\\n".encode())

    print("zygote", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                child(req)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print("exit", os.waitstatus_to_exitcode(status), flush=True)
""")


class Zygote:
    def __init__(self, tiny_m3, folder):
        self.err = folder / "zygote.stderr"
        with open(self.err, "wb") as err:
            self.p = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(tiny_m3)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=err)
        self.buf = b""
        assert self.line(120) == "zygote", self.stderr()

    def stderr(self):
        return self.err.read_text(errors="replace")[-3000:]

    def line(self, timeout=60.0):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.p.stdout], [], [], left)[0]:
                raise AssertionError(f"no answer from the writer in {timeout:g} s\n{self.stderr()}")
            chunk = os.read(self.p.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"the zygote died\n{self.stderr()}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def run(self, path, ops, *, kill=None, progress=None, kill_after=None) -> int:
        """Run ``ops`` in a forked child; returns its exit code (-9: SIGKILL)."""
        req = {"path": str(path), "ops": ops, "kill": kill, "progress": str(progress) if progress else None}
        self.p.stdin.write((json.dumps(req) + "\n").encode())
        self.p.stdin.flush()
        first = self.line()
        if first.startswith("exit"):  # died before it was ready
            return int(first.split()[1])
        assert first.startswith("ready"), first
        if kill_after is not None:
            time.sleep(kill_after)
            os.kill(int(first.split()[1]), signal.SIGKILL)
        code = int(self.line(120).split()[1])
        if code != -signal.SIGKILL:
            raise AssertionError(f"writer exited with {code}, not killed\n{self.stderr()}")
        return code

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote(tiny_m3, tmp_path_factory):
    z = Zygote(tiny_m3, tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


def _doc(doc_id, version=0):
    return {"id": doc_id, "text": f"{doc_id} version {version} quick brown fox",
            "metadata": {"v": version}}


def apply_op(idx, op):
    kind, arg = op
    if kind == "delete":
        idx.delete(arg)
    elif kind == "upsert":
        idx.upsert(arg)
    elif kind == "add":
        idx.add(arg)
    else:
        idx.compact()


def expect_after(state: dict, op) -> dict:
    """The id -> text an index holds after ``op`` on ``state``."""
    kind, arg = op
    out = dict(state)
    if kind == "delete":
        for i in arg:
            del out[i]
    elif kind in ("upsert", "add"):
        out.update((d["id"], d["text"]) for d in arg)
    return out


@pytest.fixture(scope="module", params=["postings", "tantivy"])
def history(request, tmp_path_factory, m3_encoder):
    """An index several commits old: two segments, deletions, an upserted document. BM25 as
    postings in the segments, or (an index written before them) in a tantivy folder."""
    path = tmp_path_factory.mktemp("history") / "idx"
    HybridIndex.create(path, m3_encoder).close()
    if request.param == "tantivy":
        legacy_bm25_index(path)
    ops = [("add", [_doc(f"a{i:02d}") for i in range(14)]),
           ("add", [_doc(f"b{i:02d}") for i in range(10)]),
           ("delete", ["a03", "b05"]),
           ("upsert", [_doc("a01", 1), _doc("b01", 1)])]
    state = {}
    with HybridIndex.open(path, m3_encoder) as idx:
        for op in ops:
            apply_op(idx, op)
            state = expect_after(state, op)
        gen = idx.stats()["generation"]
    return path, state, gen, request.param


def assert_state(idx, expected: dict, full: bool = True):
    """``idx`` holds exactly ``expected`` (id -> text), and every channel returns exactly those
    documents with those texts: nothing deleted, no old version of an upserted document, nothing
    the manifest does not know."""
    assert sorted(idx.ids()) == sorted(expected)
    assert len(idx) == len(expected)
    assert {i: idx.get(i)["text"] for i in expected} == expected
    ids = sorted(expected)
    n = len(ids)
    fox = idx.search("fox", k=n + 20, mode="bm25")
    assert sorted(h.id for h in fox) == ids  # once each: no stale BM25 copy of an upserted doc
    for h in fox:
        assert h.text == expected[h.id]
    if not full:
        return
    idx.verify()
    for mode in ("dense", "sparse", "colbert", "bm25", "hybrid"):
        results = idx.search_batch([expected[i] for i in ids], k=n + 20, mode=mode)
        for i, hits in zip(ids, results):
            got = [h.id for h in hits]
            assert len(got) == len(set(got)), (mode, got)
            unknown = [h.id for h in hits if h.id not in expected]
            assert unknown == [], (mode, unknown)
            assert [h.text for h in hits] == [expected[g] for g in got], mode
            if mode in ("dense", "colbert", "hybrid"):
                assert sorted(got) == ids, mode  # exhaustive channels see every live doc
            else:
                assert i in got, (mode, i)  # a document's own text finds it


def assert_no_leftovers(path):
    """Only what the current manifest names (plus LOCK and its lease) is in the folder."""
    m = json.loads((path / "manifest.json").read_text())
    keep = locking.generation_names(m) | {"manifest.json", "LOCK", locking.lease_name(m["generation"])}
    assert sorted(set(os.listdir(path)) - keep) == []


# the worst moments, and which committed state each must leave
WORST = [
    ("delete", "deleted", "before", 0),  # new deletion file renamed in, nothing else
    ("delete", "lease", "before", 0),
    ("delete", "manifest", "before", 0),  # lease of the new generation written
    ("delete", "rename", "before", 0),  # manifest.json.tmp written, not renamed
    ("delete", "bm25-commit", "after", 3),  # switched; tantivy still holds the deleted docs
    ("delete", "collect", "after", 0),
    ("upsert", "segment", "before", 0),
    ("upsert", "deleted", "before", 0),  # segment + deletion file written, BM25 not yet
    ("upsert", "lease", "before", 5),  # BM25 holds the new versions, the manifest does not
    ("upsert", "rename", "before", 5),
    ("upsert", "bm25-commit", "after", 3),  # switched; tantivy still holds the old versions
    ("upsert", "collect", "after", 0),
    ("compact", "segment", "before", 0),  # new segment written, new BM25 not built
    ("compact", "lease", "before", 0),  # new segment and new BM25 folder built
    ("compact", "rename", "before", 0),
    ("compact", "collect", "after", 0),  # switched; old segments, deletions, BM25 still there
]
WORST_OPS = {
    "delete": ("delete", ["a02", "b07", "a01"]),
    "upsert": ("upsert", [_doc("a05", 2), _doc("b02", 2), _doc("a01", 2), _doc("c00"), _doc("c01")]),
    "compact": ("compact", None),
}


@pytest.mark.parametrize("op_name,point,committed,stray", WORST, ids=[f"{o}-{p}" for o, p, _, _ in WORST])
def test_kill_write_at_worst_moment(tmp_path, zygote, history, m3_encoder, op_name, point, committed, stray):
    base, before, gen, store = history
    if store == "postings" and point == "bm25-commit":
        pytest.skip("no tantivy commit with BM25 postings")
    path = tmp_path / "idx"
    shutil.copytree(base, path)
    op = WORST_OPS[op_name]
    after = expect_after(before, op)
    zygote.run(path, [op], kill=point)

    idx = HybridIndex.open(path, m3_encoder)
    st = idx.stats()
    # the child died where it was meant to: tantivy holds exactly what that moment leaves
    # (compaction moves BM25 to postings)
    if idx._state.bm25 is not None:
        assert idx._state.bm25.num_docs == len(before if committed == "before" else after) + stray
    else:
        assert store == "postings" or (op_name == "compact" and committed == "after")
    if committed == "before":
        assert st["generation"] == gen
        assert_state(idx, before)
        apply_op(idx, op)  # rerun to completion
    else:
        assert st["generation"] == gen + 1
        if op_name == "compact":
            assert (st["segments"], st["deleted_pending_compaction"]) == (1, 0)
        assert_state(idx, after)
        if op_name == "delete":
            with pytest.raises(KeyError):  # committed: the ids are gone, and nothing else is
                apply_op(idx, op)
        else:
            apply_op(idx, op)
    assert_state(idx, after)
    if op_name != "compact":  # compaction: see test_compaction_rerun_after_crash_leaves_no_leftovers
        assert_no_leftovers(path)  # the rerun was the next successful write
    tail = ("add", [_doc("tail")])
    apply_op(idx, tail)
    final = expect_after(after, tail)
    assert_state(idx, final, full=False)
    assert_no_leftovers(path)
    idx.close()
    with HybridIndex.open(path, m3_encoder) as again:
        assert_state(again, final, full=False)


def random_ops(rng, state, n):
    """``n`` deterministic upsert / delete / compact operations and the state after each."""
    ops, states, fresh = [], [state], 0
    for k in range(n):
        kind = ("upsert", "delete", "compact")[k % 3]
        if kind == "upsert":
            docs = [_doc(i, k + 10) for i in rng.sample(sorted(state), 3)]
            docs += [_doc(f"r{fresh}"), _doc(f"r{fresh + 1}")]
            fresh += 2
            op = ("upsert", docs)
        elif kind == "delete":
            op = ("delete", rng.sample(sorted(state), 2))
        else:
            op = ("compact", None)
        state = expect_after(state, op)
        ops.append(op)
        states.append(state)
    return ops, states


@pytest.mark.parametrize("seed", [11, 12, 13, 14, 15])
def test_kill_delete_upsert_compact_at_random_moments(tmp_path, zygote, history, m3_encoder, seed):
    base, before, _, _ = history
    path = tmp_path / "idx"
    shutil.copytree(base, path)
    rng = random.Random(seed)
    delay = rng.uniform(0.05, 1.5)  # about 15-20 operations a second here
    ops, states = random_ops(rng, before, 300)
    progress = tmp_path / "progress"
    zygote.run(path, ops, progress=progress, kill_after=delay)
    done = len(progress.read_text().split()) if progress.exists() else 0  # ops that returned
    assert done < len(ops)

    idx = HybridIndex.open(path, m3_encoder)
    now = {i: idx.get(i)["text"] for i in idx.ids()}
    # at the last commit: before the interrupted operation, or after it (killed past its switch)
    assert now in (states[done], states[done + 1]), f"after {done} operations, killed {delay:.2f} s in"
    assert_state(idx, now)
    op = ops[done]
    if not (op[0] == "delete" and now == states[done + 1]):
        apply_op(idx, op)  # finish the interrupted operation
    assert_state(idx, states[done + 1])
    tail = ("add", [_doc("tail")])
    apply_op(idx, tail)
    assert_state(idx, expect_after(states[done + 1], tail), full=False)
    assert_no_leftovers(path)
    idx.close()


def test_compaction_rerun_after_crash_leaves_no_leftovers(tmp_path, zygote, history, m3_encoder):
    base, before, gen, _ = history
    path = tmp_path / "idx"
    shutil.copytree(base, path)
    zygote.run(path, [("compact", None)], kill="lease")  # new segment and BM25 built, not switched
    with HybridIndex.open(path, m3_encoder) as idx:
        assert idx.stats()["generation"] == gen
        idx.compact()  # the next successful write
        assert_state(idx, before, full=False)
        assert_no_leftovers(path)
