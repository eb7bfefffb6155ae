"""A disk that fills up in the middle of a commit: the previous commit survives, and a rerun works."""

import errno

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
    calls = fill_disk_after(monkeypatch, 1)
    with pytest.raises(OSError) as info:
        getattr(idx, op)(batch)
    assert is_disk_full(info.value) and len(calls) >= 2  # the first file was written, the second failed

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
