"""Segment merging: the tiered policy, and merged indexes answering exactly like fresh ones.

An index built in many small commits, with deletions and upserts along the way, is merged as it
grows (a small merge factor makes merges happen at test size). Every channel must then answer
exactly as an index holding the same live documents in one segment: merges keep docnos, drop
deleted rows, stream each channel, and never change a score.
"""

import json

import numpy as np
import pytest
import scipy.sparse as sp

from hybridsearch.index import segment as segment_mod
from hybridsearch.index.hybrid import HybridIndex
from hybridsearch.index.merge import MergePolicy, plan_merges
from hybridsearch.representations import Encoded

SMALL = MergePolicy(factor=3, floor=4)


# ----------------------------------------------------------------------------- the policy


def _simulate(commits: int, size: int, policy: MergePolicy, delete_every: int = 0):
    """Segment (live, stored) sizes after ``commits`` commits of ``size``, merging as planned."""
    live, stored, worst = [], [], 0
    for c in range(commits):
        live.append(size)
        stored.append(size)
        if delete_every and c % delete_every == 0 and live:
            live[0] = max(0, live[0] - size // 2)  # deletions land in the oldest segment
        while (p := plan_merges(np.array(live), np.array(stored), policy)) is not None:
            i, j = p
            n = sum(live[i:j])
            live[i:j], stored[i:j] = [n], [n]
        worst = max(worst, len(live))
    return live, worst


def test_policy_keeps_segments_logarithmic():
    live, worst = _simulate(1000, 1000, MergePolicy())
    assert sum(live) == 1_000_000
    assert len(live) == 1 and worst <= 30  # 1000 = 10^3 commits: one segment at the end
    live, worst = _simulate(999, 1000, MergePolicy())
    assert len(live) == 27 and worst <= 30  # 9 + 9 + 9: the worst case of three tiers


def test_policy_expunges_deleted_and_only_merges_neighbours():
    live, _ = _simulate(50, 1000, MergePolicy(), delete_every=3)
    assert sum(live) < 50_000 and len(live) <= 20
    # a segment more than half deleted is rewritten alone
    assert plan_merges(np.array([1000, 400]), np.array([1000, 1000])) == (1, 2)
    # nine small segments after a big one: the big one is not pulled into their merge
    live = np.array([10_000] + [1000] * 10)
    assert plan_merges(live, live) == (1, 11)
    with pytest.raises(ValueError, match="merge factor"):
        MergePolicy(factor=1)


# ----------------------------------------------------------------------------- merged == fresh


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _encoded(rng, n, spec):
    dense = _unit(rng.standard_normal((n, spec.dim)))
    nnz = rng.integers(1, 7, n)
    indptr = np.concatenate([[0], np.cumsum(nnz)]).astype(np.int64)
    sparse = sp.csr_matrix((rng.random(int(indptr[-1])).astype(np.float32) + 0.05,
                            rng.integers(0, min(300, spec.vocab_size), int(indptr[-1])), indptr), shape=(n, spec.vocab_size))
    sparse.sum_duplicates()
    lengths = rng.integers(1, 6, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    colbert = _unit(rng.standard_normal((int(offsets[-1]), spec.colbert_dim))).astype(np.float16).astype(np.float32)
    return Encoded(dense, sparse, colbert, offsets, lengths + 1)


def _take(enc: Encoded, rows) -> Encoded:
    rows = np.asarray(rows)
    off = enc.colbert_offsets
    parts = [enc.colbert[off[r]:off[r + 1]] for r in rows]
    new_off = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    return Encoded(enc.dense[rows], enc.sparse[rows], np.concatenate(parts), new_off, enc.n_tokens[rows])


WORDS = [f"w{i}" for i in range(40)]


def _docs(rng, ids):
    return [{"id": i, "text": " ".join(rng.choice(WORDS, 5)),
             "metadata": {"g": int(rng.integers(0, 4)), "tag": str(rng.choice(["a", "b", "c"]))}}
            for i in ids]


@pytest.fixture(scope="module")
def history(tmp_path_factory, m3_encoder):
    """An index grown in 40 commits of 6 with deletions and upserts, and its live documents."""
    spec = m3_encoder.spec
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("merge") / "grown"
    idx = HybridIndex.create(path, m3_encoder, colbert_codec="fp16", merge_policy=SMALL)
    live: dict[str, tuple[dict, Encoded]] = {}
    n_segments = []
    for c in range(40):
        ids = [f"d{c}-{j}" for j in range(6)]
        docs = _docs(rng, ids)
        enc = _encoded(rng, 6, spec)
        idx.add(docs, encoded=enc)
        for j, d in enumerate(docs):
            live[d["id"]] = (d, _take(enc, [j]))
        if c % 4 == 3:  # delete a few older documents
            gone = list(rng.choice(sorted(live), 4, replace=False))
            idx.delete(gone)
            for g in gone:
                live.pop(g)
        if c % 7 == 6:  # upsert two live documents with new representations
            ups = list(rng.choice(sorted(live), 2, replace=False))
            docs = _docs(rng, ups)
            enc = _encoded(rng, 2, spec)
            idx.upsert(docs, encoded=enc)
            for j, d in enumerate(docs):
                live[d["id"]] = (d, _take(enc, [j]))
        n_segments.append(len(idx._current().segments))
    return idx, live, n_segments


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, m3_encoder, history):
    _, live, _ = history
    ids = sorted(live)
    encs = [live[i][1] for i in ids]
    enc = Encoded(np.concatenate([e.dense for e in encs]), sp.vstack([e.sparse for e in encs]).tocsr(),
                  np.concatenate([e.colbert for e in encs]),
                  np.concatenate([[0], np.cumsum([len(e.colbert) for e in encs])]).astype(np.int64),
                  np.concatenate([e.n_tokens for e in encs]))
    idx = HybridIndex.create(tmp_path_factory.mktemp("merge") / "fresh", m3_encoder, colbert_codec="fp16",
                             merge_policy=None)
    idx.add([live[i][0] for i in ids], encoded=enc)
    return idx


def test_segments_stay_few_and_merged_ones_drop_deleted_rows(history):
    idx, live, n_segments = history
    assert max(n_segments) <= 2 * SMALL.factor + 2  # 40 commits: without merging, 40+ segments
    state = idx._current()
    assert len(idx) == len(live) == sum(len(state.live_rows(s)) for s in state.segments)
    assert sorted(idx.ids()) == sorted(live)
    m = json.loads((idx.path / "manifest.json").read_text())
    assert any(e.get("docnos") for e in m["segments"])  # some merge dropped rows (holes kept)
    for i, (d, _) in live.items():
        assert idx.get(i) == {"id": i, "text": d["text"], "metadata": d["metadata"]}
        assert i in idx
    assert "nope" not in idx


def _query(rng, spec, nq=12):
    return _encoded(rng, nq, spec)


@pytest.mark.parametrize("mode", ["dense", "sparse", "colbert", "hybrid"])
@pytest.mark.parametrize("flt", [None, {"g": {"in": [1, 3]}}, {"tag": "b", "g": {"gte": 1}}])
def test_merged_answers_like_fresh(history, fresh, m3_encoder, mode, flt):
    idx, live, _ = history
    rng = np.random.default_rng(11)
    q = _query(rng, m3_encoder.spec)
    queries = [f"w{i} w{i + 1}" for i in range(len(q))]
    kw = dict(k=15, mode=mode, filter=flt, query_encoded=q)
    if mode == "hybrid":
        kw["candidates"] = 1000  # the union is every matching document in both indexes
    got, want = idx.search_batch(queries, **kw), fresh.search_batch(queries, **kw)
    for g, w in zip(got, want):
        assert [h.id for h in g] == [h.id for h in w] or \
            np.allclose([h.score for h in g], [h.score for h in w], atol=1e-5)  # ties may swap
        np.testing.assert_allclose([h.score for h in g], [h.score for h in w], atol=1e-5)
        if flt is not None:
            for h in g:
                md = live[h.id][0]["metadata"]
                assert all(md.get(f) == v if not isinstance(v, dict) else
                           (md[f] in v["in"] if "in" in v else md[f] >= v["gte"]) for f, v in flt.items())


def test_bm25_and_filters_after_merges(history):
    idx, live, _ = history
    hits = idx.search("w1 w2 w3", k=500, mode="bm25")
    assert {h.id for h in hits} <= set(live)
    want = {i for i, (d, _) in live.items() if {"w1", "w2", "w3"} & set(d["text"].split())}
    assert {h.id for h in hits} == want
    mask = idx._current().filter_mask({"tag": "a"})
    got = {d["id"] for d in idx._docs(idx._current(), np.flatnonzero(mask))}
    assert got == {i for i, (d, _) in live.items() if d["metadata"]["tag"] == "a"}


def test_compact_renumbers_and_keeps_answers(tmp_path, m3_encoder, history, fresh):
    import shutil

    idx, live, _ = history
    path = tmp_path / "copy"
    shutil.copytree(idx.path, path)
    c = HybridIndex.open(path, m3_encoder, merge_policy=SMALL)
    c.compact()
    st = c.stats()
    assert st["segments"] == 1 and st["documents"] == len(live) and st["deleted_pending_compaction"] == 0
    m = json.loads((path / "manifest.json").read_text())
    assert m["next_docno"] == len(live) and not m["segments"][0].get("docnos")
    q = _query(np.random.default_rng(3), m3_encoder.spec)
    queries = [f"w{i}" for i in range(len(q))]
    for mode in ("dense", "sparse", "colbert"):
        got = c.search_batch(queries, k=10, mode=mode, query_encoded=q)
        want = fresh.search_batch(queries, k=10, mode=mode, query_encoded=q)
        for g, w in zip(got, want):
            np.testing.assert_allclose([h.score for h in g], [h.score for h in w], atol=1e-5)
    assert {h.id for h in c.search("w5", k=500, mode="bm25")} == \
        {i for i, (d, _) in live.items() if "w5" in d["text"].split()}
    c.close()


def test_a_commit_opens_only_what_it_adds(tmp_path, m3_encoder, monkeypatch):
    rng = np.random.default_rng(5)
    idx = HybridIndex.create(tmp_path / "ix", m3_encoder, colbert_codec="fp16", merge_policy=None)
    opened = []
    real = segment_mod.Segment.open.__func__

    def counting(cls, root, entry, *a, **kw):
        opened.append(entry["name"])
        return real(cls, root, entry, *a, **kw)

    monkeypatch.setattr(segment_mod.Segment, "open", classmethod(counting))
    for c in range(8):
        idx.add(_docs(rng, [f"x{c}-{j}" for j in range(3)]), encoded=_encoded(rng, 3, m3_encoder.spec))
    assert len(opened) == 8 and len(set(opened)) == 8  # each new segment once, old ones reused


def test_codebook_trained_once_enough_vectors_and_merges_code_fp16(tmp_path, m3_encoder):
    rng = np.random.default_rng(9)
    spec = m3_encoder.spec
    idx = HybridIndex.create(tmp_path / "ix", m3_encoder, colbert_codec="res1", codec_train_tokens=120,
                             merge_policy=SMALL)
    kinds = []
    for c in range(12):
        enc = _encoded(rng, 10, spec)
        idx.add(_docs(rng, [f"c{c}-{j}" for j in range(10)]), encoded=enc)
        kinds.append(sorted({s.colbert_kind for s in idx._current().segments}))
    m = json.loads((idx.path / "manifest.json").read_text())
    assert m["channels"]["colbert_codec"]["codebook"] is not None
    assert ["fp16"] in kinds  # before the codebook
    idx.compact()
    state = idx._current()
    assert [s.colbert_kind for s in state.segments] == ["codes"]
    st = idx.stats()
    per_token = st["channel_bytes"]["colbert"]["bytes_per_token"]
    assert per_token < 2 * spec.colbert_dim / 2  # far below float16's 2 bytes a dimension
    # the last commit's documents still find themselves first by their own vectors (lossy, not broken)
    hits = idx.search_batch([f"q{j}" for j in range(10)], k=1, mode="colbert", query_encoded=enc)
    assert sum(h[0].id == f"c11-{j}" for j, h in enumerate(hits)) >= 9


def test_pooled_codec_trains_on_pooled_documents_and_halves_the_vectors(tmp_path, m3_encoder):
    from hybridsearch.retrievers.colbert_codec import ColbertCodec

    rng = np.random.default_rng(13)
    spec = m3_encoder.spec
    idx = HybridIndex.create(tmp_path / "ix", m3_encoder, colbert_codec="res1-pool2", codec_train_tokens=100,
                             merge_policy=None)
    encs = []
    for c in range(3):
        enc = _encoded(rng, 30, spec)
        encs.append(enc)
        idx.add(_docs(rng, [f"p{c}-{j}" for j in range(30)]), encoded=enc)
    m = json.loads((idx.path / "manifest.json").read_text())
    codec = ColbertCodec.load(idx.path / m["channels"]["colbert_codec"]["codebook"])
    assert codec.pool == 2 and codec.transform and not codec.renorm
    state = idx._current()
    coded = [s for s in state.segments if s.colbert_kind == "codes"]
    assert coded
    for s, enc in zip(state.segments, encs):
        if s.colbert_kind == "codes":  # ceil(n / 2) vectors a document
            np.testing.assert_array_equal(np.diff(s.colbert.offsets), (np.diff(enc.colbert_offsets) + 1) // 2)
    st = idx.stats()["channel_bytes"]["colbert"]
    assert st["vectors"] < sum(len(e.colbert) for e in encs)
