"""A disk that fills up in the middle of a commit: the previous commit survives, and a rerun works."""

import errno
from pathlib import Path

import pytest

from hybridsearch import HybridIndex
from hybridsearch.errors import DiskFullError

WORDS = ["fox", "dog", "river", "cloud", "light", "water", "ranking", "vector", "token", "search"]


def docs(n, prefix="d"):
    return [{"id": f"{prefix}{i}", "text": f"{WORDS[i % 10]} {WORDS[(3 * i + 1) % 10]} {prefix}{i}",
             "metadata": {"i": i}} for i in range(n)]


def fill_disk_after(monkeypatch, n_ok):
    """``save_npy`` writes ``n_ok`` files, then raises ENOSPC (as a full disk would) on every call."""
    import hybridsearch.index.segment as segment
    import hybridsearch.index.storage as storage

    real = storage.save_npy
    calls = []

    def save_npy(path, arr, *a, **kw):
        calls.append(path)
        if len(calls) > n_ok:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, arr, *a, **kw)

    monkeypatch.setattr(storage, "save_npy", save_npy)
    monkeypatch.setattr(segment, "save_npy", save_npy, raising=False)
    import hybridsearch.retrievers.dense_store as dense_store

    monkeypatch.setattr(dense_store, "save_npy", save_npy, raising=False)
    return calls


def snapshot(idx, queries=("fox river", "cloud token")):
    return ({i: idx.get(i) for i in idx.ids()},
            [[(h.id, h.score) for h in idx.search(q, k=5)] for q in queries],
            [[h.id for h in idx.search(q, k=5, mode="bm25")] for q in queries])


def is_disk_full(e):
    return isinstance(e, DiskFullError) or (isinstance(e, OSError) and e.errno == errno.ENOSPC)


@pytest.mark.parametrize("op", ["add", "upsert"])
def test_enospc_midway_through_a_segment_keeps_the_previous_commit(tmp_path, m3_encoder, monkeypatch, op):
    path = tmp_path / "idx"
    idx = HybridIndex.create(path, m3_encoder)
    idx.add(docs(8))
    idx.delete(["d3"])
    before = snapshot(idx)
    generation = idx.stats()["generation"]

    batch = docs(4, "n") + ([{"id": "d1", "text": "replaced text about zebras"}] if op == "upsert" else [])
    calls = fill_disk_after(monkeypatch, 0)  # docstore and columns written, n_tokens.npy fails
    with pytest.raises(OSError) as info:
        getattr(idx, op)(batch)
    assert is_disk_full(info.value) and len(calls) >= 1
    assert Path(calls[0]).name == "n_tokens.npy"  # after the docstore and columns were written

    # the same object still serves the previous commit
    assert snapshot(idx) == before and idx.stats()["generation"] == generation
    monkeypatch.undo()
    idx.close()

    # so does a fresh open: same documents, same rankings, files intact
    idx = HybridIndex.open(path, m3_encoder)
    assert snapshot(idx) == before and idx.stats()["generation"] == generation
    idx.verify()
    # the rerun of the same write succeeds and cleans up what the failed one left
    assert getattr(idx, op)(batch) == len(batch)
    assert len(idx) == 7 + 4 and all(f"n{i}" in idx for i in range(4))
    assert not [p.name for p in path.iterdir() if p.name.endswith(".tmp")]
    if op == "upsert":
        assert idx.get("d1")["text"] == "replaced text about zebras"
    after = snapshot(idx)
    idx.close()
    idx = HybridIndex.open(path, m3_encoder)
    assert snapshot(idx) == after
    idx.verify()
    idx.close()


def test_enospc_on_the_same_object_then_retry_without_reopening(tmp_path, m3_encoder, monkeypatch):
    idx = HybridIndex.create(tmp_path / "idx", m3_encoder)
    idx.add(docs(5))
    before = snapshot(idx)
    fill_disk_after(monkeypatch, 0)
    with pytest.raises(OSError) as info:
        idx.add(docs(3, "n"))
    assert is_disk_full(info.value)
    monkeypatch.undo()
    assert snapshot(idx) == before
    assert idx.add(docs(3, "n")) == 3 and len(idx) == 8
    assert [h.id for h in idx.search("n1", k=1, mode="bm25")] == ["n1"]
    idx.close()


REAL_DISK = """
import sys
from hybridsearch import BGEM3Encoder, HybridIndex
from hybridsearch.errors import DiskFullError
folder, model = sys.argv[1], sys.argv[2]
enc = BGEM3Encoder(model, device="cpu")
idx = HybridIndex.create(folder + "/idx", enc)
committed, n = 0, 0
while True:
    batch = [{"id": f"d{n + j}", "text": ("fox river cloud " * 40) + str(n + j)} for j in range(200)]
    try:
        idx.add(batch)
    except DiskFullError as e:
        print("FULL", e.errno, e, flush=True)
        break
    n += 200
    committed = n
idx = HybridIndex.open(folder + "/idx", enc)
print("COUNT", committed, len(idx), len(idx.search("fox", k=committed + 10, mode="bm25")), flush=True)
idx.delete([f"d{i}" for i in range(committed // 2)])  # space is freed by the next write's collection
print("AFTER", len(idx), flush=True)
"""


def test_a_really_full_disk(tmp_path, tiny_m3):
    """A 4 MB tmpfs in a user namespace fills up for real: ENOSPC with a path, last commit intact."""
    import shutil
    import subprocess
    import sys

    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs user namespaces to mount a small tmpfs")
    script = tmp_path / "fill.py"
    script.write_text(REAL_DISK)
    mnt = tmp_path / "small"
    mnt.mkdir()
    cmd = f"mount -t tmpfs -o size=4m tmpfs {mnt} && {sys.executable} {script} {mnt} {tiny_m3}"
    p = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = {line.split()[0]: line for line in p.stdout.splitlines()}
    full = out["FULL"].split()
    assert full[1] == str(errno.ENOSPC) and "disk full (ENOSPC) writing" in out["FULL"]
    assert str(mnt) in out["FULL"]  # names the path
    _, committed, n_open, n_bm25 = out["COUNT"].split()
    assert int(committed) > 0 and int(n_open) == int(committed) == int(n_bm25)
    assert int(out["AFTER"].split()[1]) == int(committed) - int(committed) // 2
