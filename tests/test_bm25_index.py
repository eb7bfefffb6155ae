"""BM25 inside HybridIndex: new indexes keep BM25 postings in their segments (format 3), old ones
keep tantivy until compact() moves them; both answer alike, under commits, deletes, upserts,
filters and merges; the new files are checked on open."""

import json
import os

import numpy as np
import pytest

from hybridsearch.errors import IndexFormatError
from hybridsearch.index import storage as st
from hybridsearch.index.hybrid import HybridIndex
from hybridsearch.index.merge import MergePolicy
from hybridsearch.retrievers import bm25_postings as bp
from hybridsearch.retrievers.bm25 import BM25Index
from hybridsearch.testing import legacy_bm25_index

WORDS = ("fox river cloud token stone delta maple quartz running runs ran the of lake "
         "東京大学 한국어").split()
QUERIES = ["fox river", "running stone", "quartz", "東京", "the lake lake", "nothing"]


def _docs(n, prefix, seed):
    rng = np.random.default_rng(seed)
    return [{"id": f"{prefix}{i}", "text": " ".join(rng.choice(WORDS, int(rng.integers(2, 14)))),
             "metadata": {"i": i, "tag": ["a", "b", "c"][i % 3]}} for i in range(n)]


HISTORY = [("add", _docs(30, "a", 0)), ("add", _docs(25, "b", 1)), ("delete", ["a3", "b4", "a10"]),
           ("upsert", _docs(6, "a", 2)), ("add", _docs(12, "c", 3)), ("delete", ["c1"])]


def _apply(idx, history):
    for kind, arg in history:
        getattr(idx, kind)(arg)


def _build(path, encoder, legacy=False, policy=None):
    HybridIndex.create(path, encoder).close()
    if legacy:
        legacy_bm25_index(path)
    idx = HybridIndex.open(path, encoder, merge_policy=policy)
    _apply(idx, HISTORY)
    return idx


def _expected(idx, query, k, flt=None):
    """Plain-Python BM25 over every stored row (deleted rows count in the statistics until a
    merge drops them), the top-k of the live (and filtered) ones: ``[(id, score)]``."""
    state = idx._state
    rows, live = [], []
    allowed = state.alive if flt is None else state.filter_mask(flt)
    for s in state.segments:
        ids, texts, _ = s.docs_of(np.arange(s.count))
        docnos = s.docno_of(np.arange(s.count))
        rows += [bp.document_terms(t) for t in texts]
        live += [(i, bool(allowed[d])) for i, d in zip(ids, docnos)]
    sc = bp.reference_scores(rows, query)
    order = np.argsort(-sc, kind="stable")
    return [(live[j][0], sc[j]) for j in order if sc[j] > 0 and live[j][1]][:k]


def _same(got, want):
    assert len(got) == len(want)
    np.testing.assert_allclose([h.score for h in got], [s for _, s in want], rtol=2e-6, atol=1e-6)
    for h, (i, s) in zip(got, want):
        if h.id != i:  # only between tied scores
            assert any(abs(s2 - h.score) <= 1e-6 * abs(s2) + 1e-6 for i2, s2 in want if i2 == h.id)


def test_new_index_uses_postings(tmp_path, m3_encoder):
    idx = _build(tmp_path / "idx", m3_encoder)
    m = json.loads((tmp_path / "idx" / st.MANIFEST).read_text())
    assert m["format_version"] == 3 and m["channels"]["bm25_store"] == "postings" and m["bm25"] is None
    assert not list((tmp_path / "idx").glob("bm25-*"))
    for e in m["segments"]:
        assert set(st.BM25_FILES) <= set(e["files"])
    assert idx.stats()["channel_bytes"]["bm25"]["bytes"] > 0
    for q in QUERIES:
        for flt in (None, {"tag": "a"}):
            _same(idx.search(q, k=20, mode="bm25", filter=flt), _expected(idx, q, 20, flt))
    # Batches and hybrid runs see the same BM25 scores.
    batch = idx.search_batch(QUERIES, k=5, mode="bm25")
    for q, hits in zip(QUERIES, batch):
        assert [h.id for h in hits] == [h.id for h in idx.search(q, k=5, mode="bm25")]
    hyb = idx.search("fox river", k=50, mode="hybrid", candidates=50)
    bm = {h.id: h.score for h in idx.search("fox river", k=50, mode="bm25")}
    for h in hyb:
        if h.scores.get("bm25") is not None:
            assert h.scores["bm25"] == pytest.approx(bm[h.id], rel=1e-6)
    idx.close()


def test_postings_and_tantivy_rank_alike(tmp_path, m3_encoder):
    new = _build(tmp_path / "new", m3_encoder)
    old = _build(tmp_path / "old", m3_encoder, legacy=True)
    assert old._state.bm25 is not None and new._state.bm25 is None
    for q in QUERIES:
        a = new.search(q, k=15, mode="bm25")
        b = old.search(q, k=15, mode="bm25")
        # Same statistics too: tantivy keeps deleted docs in them until its merges, so compare
        # against the reference rather than bit for bit with tantivy.
        _same(a, _expected(new, q, 15))
        assert {h.id for h in a[:5]} == {h.id for h in b[:5]} or len(a) < 5
    new.close()
    old.close()


def test_merges_keep_bm25_exact(tmp_path, m3_encoder):
    idx = _build(tmp_path / "idx", m3_encoder, policy=MergePolicy(factor=2, floor=10))
    _apply(idx, [("add", _docs(8, "d", 4)), ("add", _docs(9, "e", 5)), ("delete", ["d2"])])
    assert any(e.get("docnos") for e in idx._state.manifest["segments"]) or \
        len(idx._state.segments) < 8
    for q in QUERIES:
        _same(idx.search(q, k=30, mode="bm25"), _expected(idx, q, 30))
    idx.compact()
    assert len(idx._state.segments) == 1
    for q in QUERIES:
        _same(idx.search(q, k=30, mode="bm25"), _expected(idx, q, 30))
    idx.close()


def test_legacy_index_keeps_tantivy_until_compact(tmp_path, m3_encoder):
    path = tmp_path / "old"
    idx = _build(path, m3_encoder, legacy=True)
    m = json.loads((path / st.MANIFEST).read_text())
    assert m["bm25"] is not None and "bm25_store" not in m["channels"]
    assert not any(n.startswith("bm25_") for e in m["segments"] for n in e["files"])
    ids_before = sorted(idx.ids())
    for q in QUERIES:  # tantivy's statistics differ slightly (its deletions): compare the hits
        got = {h.id for h in idx.search(q, k=100, mode="bm25")}
        assert got == {i for i, _ in _expected(idx, q, 100)}
    idx.compact()
    m = json.loads((path / st.MANIFEST).read_text())
    assert m["bm25"] is None and m["channels"]["bm25_store"] == "postings"
    assert not list(path.glob("bm25-*"))  # collected: no reader holds it
    assert sorted(idx.ids()) == ids_before
    for q in QUERIES:
        _same(idx.search(q, k=20, mode="bm25"), _expected(idx, q, 20))
    idx.add(_docs(5, "z", 9))
    for q in QUERIES:
        _same(idx.search(q, k=20, mode="bm25"), _expected(idx, q, 20))
    idx.close()
    with HybridIndex.open(path, m3_encoder) as again:
        _same(again.search("fox", k=10, mode="bm25"), _expected(again, "fox", 10))


def test_reader_of_old_generation_keeps_its_bm25(tmp_path, m3_encoder):
    path = tmp_path / "idx"
    idx = _build(path, m3_encoder)
    reader = HybridIndex.open(path, m3_encoder)
    held = reader._current()
    before = reader._bm25_topk(held, ["fox"], 50, held.alive)
    idx.add(_docs(20, "n", 7))
    idx.compact()
    after = reader._bm25_topk(held, ["fox"], 50, held.alive)  # the old generation, still readable
    np.testing.assert_array_equal(before[1], after[1])
    assert len(reader.search("fox", k=100, mode="bm25")) > len([d for d in before[1][0] if d >= 0])
    reader.close()
    idx.close()


def test_newer_format_refused_and_postings_need_version_3(tmp_path, m3_encoder):
    path = tmp_path / "idx"
    _build(path, m3_encoder).close()
    m = json.loads((path / st.MANIFEST).read_text())
    (path / st.MANIFEST).write_text(json.dumps({**m, "format_version": 4}))
    with pytest.raises(IndexFormatError, match="Upgrade hybridsearch"):
        HybridIndex.open(path, m3_encoder)
    (path / st.MANIFEST).write_text(json.dumps({**m, "format_version": 2}))
    with pytest.raises(IndexFormatError, match="bm25_store"):
        HybridIndex.open(path, m3_encoder)
    m["channels"]["bm25_store"] = "lucene"
    (path / st.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(IndexFormatError, match="bm25_store"):
        HybridIndex.open(path, m3_encoder)


@pytest.mark.parametrize("name", ["bm25_tf.npy", "bm25_docs.npy", "bm25_term_offsets.npy",
                                  "bm25_lengths.npy"])
def test_corrupt_bm25_file_is_refused(tmp_path, m3_encoder, name):
    path = tmp_path / "idx"
    _build(path, m3_encoder).close()
    m = json.loads((path / st.MANIFEST).read_text())
    f = path / m["segments"][0]["name"] / name
    a = np.load(f)
    if name == "bm25_tf.npy":
        a[0] = 0
    elif name == "bm25_docs.npy":
        a[-1] = 10**6
    elif name == "bm25_term_offsets.npy":
        a[1] = a[-1] + 1
    else:
        a[0] = -5
    os.chmod(f, 0o644)
    np.save(f, a)  # same size: only the data checks can see it
    with pytest.raises(IndexFormatError, match=name.replace(".", r"\.")):
        HybridIndex.open(path, m3_encoder)
    # A missing BM25 file is a wrong file list.
    f.unlink()
    with pytest.raises(IndexFormatError, match="missing"):
        HybridIndex.open(path, m3_encoder)


def test_no_bm25_channel(tmp_path, m3_encoder):
    idx = HybridIndex.create(tmp_path / "idx", m3_encoder, bm25=False)
    idx.add(_docs(10, "a", 0))
    m = json.loads((tmp_path / "idx" / st.MANIFEST).read_text())
    assert "bm25_store" not in m["channels"] and m["bm25"] is None
    assert not any(n.startswith("bm25_") for e in m["segments"] for n in e["files"])
    assert "bm25" not in idx.channels
    assert len(idx.search("fox", k=3)) == 3
    idx.compact()
    assert "bm25" not in idx.channels
    idx.close()


def test_tantivy_module_still_importable():
    # Old indexes are read through it; a throw-away in-memory index still works.
    b = BM25Index.in_memory()
    b.add(np.arange(2), ["fox", "river"])
    b.commit()
    assert b.search(["fox"], 1)[1][0, 0] == 0
