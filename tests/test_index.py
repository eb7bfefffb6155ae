"""HybridIndex end to end on a tiny random BGE-M3 checkpoint: every channel, persistence, errors."""

import json
import shutil

import numpy as np
import pytest

from hybridsearch import BGEM3Encoder
from hybridsearch.errors import IndexFormatError, ModelMismatchError
from hybridsearch.index.hybrid import HybridIndex
from hybridsearch.representations import colbert_score, lexical_matching_score
from hybridsearch.retrievers.bm25 import analyze_query

WORDS = ("fox dog dense sparse vector token bm25 ranking hybrid search faiss colbert retrieval "
         "water light energy river cloud model query passage index").split()


def make_docs(n, seed=0, prefix="d"):
    rng = np.random.default_rng(seed)
    return [{"id": f"{prefix}{i}", "text": " ".join(rng.choice(WORDS, size=int(rng.integers(3, 15)))),
             "metadata": {"year": 2000 + i % 10, "lang": "en" if i % 3 else "fr", "i": i}} for i in range(n)]


@pytest.fixture
def index(tmp_path, m3_encoder):
    idx = HybridIndex.create(tmp_path / "idx", m3_encoder)
    idx.add(make_docs(30))
    idx.add(make_docs(20, seed=1, prefix="e"))
    yield idx
    idx.close()


def ids_of(hits):
    return [h.id for h in hits]


ALL_DOCS = make_docs(30) + make_docs(20, seed=1, prefix="e")  # what the `index` fixture holds


def matching(encoder, docs, query, mode):
    """``(ids, scores)`` of every doc in ``docs`` that ``mode`` can return for ``query``, best
    first (docno order among equal scores): dense and ColBERT score every document, sparse only
    those sharing a token with the query, BM25 those sharing an analysed term (score 1 here)."""
    ids = [d["id"] for d in docs]
    if mode == "bm25":
        terms = set(analyze_query(query))
        return [i for i, d in zip(ids, docs) if terms & set(analyze_query(d["text"]))], None
    enc = encoder.encode_arrays([d["text"] for d in docs], colbert=True)
    q = encoder.encode_arrays([query], kind="query", colbert=True)
    if mode == "dense":
        s = enc.dense @ q.dense[0]
    elif mode == "sparse":
        s = (enc.sparse @ q.sparse.T).toarray()[:, 0]
    else:
        s = np.array([colbert_score(q.colbert_of(0), enc.colbert_of(i)) for i in range(len(docs))])
    keep = np.flatnonzero(s > 0) if mode == "sparse" else np.arange(len(docs))
    order = keep[np.argsort(-s[keep], kind="stable")]
    return [ids[i] for i in order], s[order]


def assert_ranking(hits, want_ids, want_scores, k, atol):
    """``hits`` are the top ``min(k, len(want_ids))`` of the reference ranking: exact count, scores
    rank by rank within ``atol``, and every reference id scoring clearly above the last returned
    score is present (near-ties may swap)."""
    n = min(k, len(want_ids))
    assert len(hits) == n, (len(hits), n)
    got = np.array([h.score for h in hits])
    np.testing.assert_allclose(got, want_scores[:n], atol=atol)
    must = {i for i, s in zip(want_ids, want_scores) if s > want_scores[n - 1] + 2 * atol}
    assert must <= set(ids_of(hits))
    assert set(ids_of(hits)) <= set(want_ids)


def test_modes_return_hits_with_channel_scores(index, m3_encoder):
    q = "fox dense ranking"
    qe = m3_encoder.encode([q], return_colbert_vecs=True)
    for mode in ("dense", "sparse", "colbert", "bm25"):
        hits = index.search(q, k=5, mode=mode)
        want, _ = matching(m3_encoder, ALL_DOCS, q, mode)
        assert len(want) >= 5  # the query matches enough documents in every channel
        assert len(hits) == 5
        assert set(ids_of(hits)) <= set(want)
        assert all(set(h.scores) == {mode} for h in hits)
        assert [h.score for h in hits] == sorted([h.score for h in hits], reverse=True)
    hits = index.search(q, k=5)
    for h in hits:
        doc = m3_encoder.encode([index.get(h.id)["text"]], return_colbert_vecs=True)
        assert h.scores["dense"] == pytest.approx(float(qe["dense_vecs"][0] @ doc["dense_vecs"][0]), abs=1e-5)
        assert h.scores["sparse"] == pytest.approx(
            lexical_matching_score(qe["lexical_weights"][0], doc["lexical_weights"][0]), abs=1e-5)
        # ColBERT vectors are stored as float16
        assert h.scores["colbert"] == pytest.approx(colbert_score(qe["colbert_vecs"][0], doc["colbert_vecs"][0]), abs=2e-3)
        # default M3 fusion: 0.4 dense + 0.2 sparse + 0.4 colbert (BM25 weight 0)
        want = 0.4 * h.scores["dense"] + 0.2 * h.scores["sparse"] + 0.4 * h.scores["colbert"]
        assert h.score == pytest.approx(want, abs=1e-5)


def test_dense_sparse_colbert_topk_equal_brute_force(index, m3_encoder):
    q = "water light river"
    for mode, atol in (("dense", 1e-5), ("sparse", 1e-5), ("colbert", 2e-3)):  # ColBERT: float16
        want_ids, want_scores = matching(m3_encoder, ALL_DOCS, q, mode)
        assert len(want_ids) >= 10
        for k in (1, 10, 50):
            assert_ranking(index.search(q, k=k, mode=mode), want_ids, want_scores, k, atol)
    # a query sharing no analysed term with any document: BM25 returns nothing at all
    assert index.search("zzzz qqqq", k=5, mode="bm25") == []


def test_batch_equals_single(index):
    qs = ["fox", "water cloud", "hybrid search faiss"]
    batch = index.search_batch(qs, k=4)
    assert len(batch) == 3
    for q, hits in zip(qs, batch):
        assert len(hits) == 4 and ids_of(hits) == ids_of(index.search(q, k=4))


def test_search_batch_of_one_and_tuple_input(index):
    one = index.search("water cloud", k=5, mode="bm25")
    assert isinstance(one, list) and all(hasattr(h, "id") for h in one)
    for qs in (["water cloud"], ("water cloud",)):
        (hits,) = index.search_batch(qs, k=5, mode="bm25")
        assert ids_of(hits) == ids_of(one)


def test_persistence_roundtrip(index, m3_encoder):
    before = {m: ids_of(index.search("token ranking", k=8, mode=m)) for m in ("dense", "sparse", "colbert", "bm25", "hybrid")}
    assert all(len(ids) == 8 for ids in before.values()), before
    index.close()
    again = HybridIndex.open(index.path, m3_encoder)
    assert len(again) == 50
    for m, ids in before.items():
        assert ids_of(again.search("token ranking", k=8, mode=m)) == ids
    again.close()


def test_delete_upsert_take_effect_and_persist(index, m3_encoder):
    top = index.search("fox dog", k=1, mode="bm25")[0].id
    index.delete([top])
    rest = [d for d in ALL_DOCS if d["id"] != top]
    for mode in ("dense", "sparse", "colbert", "bm25", "hybrid"):
        got = ids_of(index.search("fox dog", k=50, mode=mode))
        want, _ = matching(m3_encoder, rest, "fox dog", "dense" if mode == "hybrid" else mode)
        assert len(want) > 0 and sorted(got) == sorted(want), mode  # all matches but the deleted
    index.upsert([{"id": "d1", "text": "completely new words about quasar nebula", "metadata": {"year": 1999}}])
    assert index.get("d1")["text"].startswith("completely")
    assert ids_of(index.search("quasar nebula", k=1, mode="bm25")) == ["d1"]
    assert len(index) == 49
    index.close()
    again = HybridIndex.open(index.path, m3_encoder)
    assert len(again) == 49 and top not in again and again.get("d1")["metadata"] == {"year": 1999}
    assert ids_of(again.search("quasar nebula", k=1, mode="bm25")) == ["d1"]
    again.compact()
    assert again.stats()["segments"] == 1 and again.stats()["deleted_pending_compaction"] == 0
    assert ids_of(again.search("quasar nebula", k=1, mode="bm25")) == ["d1"]
    assert len(again) == 49 and top not in again
    again.close()


def test_filters_apply_to_every_channel(index, m3_encoder):
    cases = [({"lang": "fr"}, lambda m: m["lang"] == "fr"),
             ({"year": {"gte": 2003, "lt": 2006}}, lambda m: 2003 <= m["year"] < 2006),
             ({"i": {"in": [1, 2, 3, 4]}}, lambda m: m["i"] in (1, 2, 3, 4)),
             ({"lang": {"ne": "fr"}, "year": 2001}, lambda m: m["lang"] != "fr" and m["year"] == 2001)]
    q = "fox dense water token"
    for flt, pred in cases:
        kept = [d for d in ALL_DOCS if pred(d["metadata"])]
        assert kept
        for mode in ("dense", "sparse", "colbert", "bm25", "hybrid"):
            hits = index.search(q, k=50, mode=mode, filter=flt)
            # k = 50 holds them all: exactly the documents the filter keeps that the channel
            # matches (hybrid: the dense first stage brings every kept document)
            want, _ = matching(m3_encoder, kept, q, "dense" if mode == "hybrid" else mode)
            assert len(want) > 0, (flt, mode)
            assert sorted(ids_of(hits)) == sorted(want), (flt, mode)
            assert all(pred(h.metadata) for h in hits), (flt, mode)
    with pytest.raises(ValueError, match="unknown operator"):
        index.search("x", filter={"year": {"between": 1}})


def test_rrf_and_weights_per_query(index):
    # k = 50: every document is in the union (the dense first stage brings them all) and comes
    # back with each channel's score, so the RRF ranking can be recomputed from those scores.
    a = index.search("fox", k=50, fusion="rrf")
    assert len(a) == 50
    docno = {d["id"]: n for n, d in enumerate(ALL_DOCS)}
    a_by_docno = sorted(a, key=lambda h: docno[h.id])  # the union's order: ties rank lower docno first
    weights = {"dense": 0.4, "sparse": 0.2, "colbert": 0.4, "bm25": 0.0}  # BGE-M3 defaults
    want = np.zeros(50)
    for ch, w in weights.items():
        s = [h.scores[ch] for h in a_by_docno]
        seen = [i for i in range(50) if s[i] is not None]
        order = sorted(seen, key=lambda i: -s[i])  # stable: equal scores keep docno order
        rank = {i: r + 1 for r, i in enumerate(order)}
        want += [w / (60 + rank[i]) if i in rank else 0.0 for i in range(50)]
    got = {h.id: h.score for h in a}
    np.testing.assert_allclose([got[h.id] for h in a_by_docno], want, rtol=1e-6)
    expected_order = sorted(range(50), key=lambda i: -want[i])
    scores_in_order = want[expected_order]
    distinct = [i for i, v in enumerate(scores_in_order) if np.isclose(scores_in_order, v, rtol=1e-6).sum() == 1]
    assert [ids_of(a)[i] for i in distinct] == [a_by_docno[expected_order[i]].id for i in distinct]
    # per-query weights: BM25 alone (min-max normalised) orders as the BM25 channel
    b = index.search("fox", k=5, weights={"dense": 0.0, "sparse": 0.0, "colbert": 0.0, "bm25": 1.0})
    bm = ids_of(index.search("fox", k=3, mode="bm25"))
    assert len(bm) == 3 and ids_of(b)[:3] == bm


def test_bad_inputs_write_nothing(index, m3_encoder):
    gen = index.stats()["generation"]
    with pytest.raises(ValueError, match="duplicate"):
        index.add([{"id": "x", "text": "a"}, {"id": "x", "text": "b"}])
    with pytest.raises(ValueError, match="already in the index"):
        index.add([{"id": "d3", "text": "a"}])
    with pytest.raises(KeyError, match="unknown"):
        index.delete(["d3", "nope"])
    with pytest.raises(ValueError, match="non-empty"):
        index.add([{"id": "y", "text": "   "}])
    with pytest.raises(ValueError, match="JSON"):
        index.add([{"id": "y", "text": "t", "metadata": {"a": object()}}])
    enc = m3_encoder.encode_arrays(["some text"], colbert=True)
    from dataclasses import replace
    with pytest.raises(ValueError, match="shape"):
        index.add([{"id": "y", "text": "t"}], encoded=replace(enc, dense=np.zeros((1, 7), np.float32)))
    with pytest.raises(ValueError, match="unknown mode"):
        index.search("x", mode="magic")
    assert index.stats()["generation"] == gen and len(index) == 50 and "d3" in index


def test_damaged_folders(index, m3_encoder, tiny_dense, tmp_path):
    path = index.path
    index.close()
    # model mismatch
    with pytest.raises(ModelMismatchError, match="built with model"):
        HybridIndex.open(path, BGEM3Encoder(tiny_dense, device="cpu"))
    # newer format version
    m = json.loads((path / "manifest.json").read_text())
    bad = tmp_path / "newer"
    shutil.copytree(path, bad)
    (bad / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(IndexFormatError, match="Upgrade hybridsearch"):
        HybridIndex.open(bad, m3_encoder)
    # truncated file, missing file, corrupted manifest
    seg = m["segments"][0]["name"]
    for damage, match in [
        (lambda p: (p / seg / "dense.npy").write_bytes(b"garbage"), "corrupted"),
        (lambda p: (p / seg / "colbert_offsets.npy").unlink(), "missing"),
        (lambda p: (p / "manifest.json").write_text("{not json"), "corrupted"),
        (lambda p: (p / "manifest.json").unlink(), "not a hybridsearch index"),
    ]:
        d = tmp_path / f"damaged{len(list(tmp_path.iterdir()))}"
        shutil.copytree(path, d)
        damage(d)
        with pytest.raises(IndexFormatError, match=match):
            HybridIndex.open(d, m3_encoder)
    # the original still opens and verifies
    ok = HybridIndex.open(path, m3_encoder)
    ok.verify()
    ok.close()


def test_create_refuses_existing(index, m3_encoder):
    with pytest.raises(FileExistsError):
        HybridIndex.create(index.path, m3_encoder)


def test_stats(index):
    s = index.stats()
    assert s["documents"] == 50 and s["segments"] == 2 and s["tokens"] > 50
    for ch in ("dense", "sparse", "colbert", "bm25", "docstore"):
        assert s["channel_bytes"][ch]["bytes_per_doc"] > 0


def test_rerank_stage(index, tmp_path_factory):
    from hybridsearch.rerank import Reranker
    from hybridsearch.testing import make_tiny_reranker

    rr = Reranker(make_tiny_reranker(tmp_path_factory.mktemp("rr")), device="cpu")
    fused = index.search("fox dense ranking", k=8)
    assert len(fused) == 8
    hits = index.search("fox dense ranking", k=3, reranker=rr, rerank_top=8)
    want = rr.compute_score([("fox dense ranking", h.text) for h in fused])
    order = np.argsort(-np.array(want), kind="stable")[:3]
    assert ids_of(hits) == [fused[i].id for i in order]
    for h, i in zip(hits, order):
        assert h.rerank_score == pytest.approx(want[i], abs=1e-5)
        assert h.score == pytest.approx(fused[i].score, abs=1e-6)  # fused score kept

    # interpolation: w * minmax(rerank) + (1 - w) * minmax(fused), by hand
    def mm(x):
        x = np.asarray(x, np.float64)
        return (x - x.min()) / (x.max() - x.min())

    for w in (0.0, 0.5):
        mixed = index.search("fox dense ranking", k=3, reranker=rr, rerank_top=8, rerank_weight=w)
        key = w * mm(want) + (1 - w) * mm([h.score for h in fused])
        assert ids_of(mixed) == [fused[i].id for i in np.argsort(-key, kind="stable")[:3]]
    assert ids_of(index.search("fox dense ranking", k=3, reranker=rr, rerank_top=8, rerank_weight=0.0)) \
        == ids_of(fused[:3])  # weight 0 keeps the fused order
    for bad in (-0.1, 1.5, "0.5", True):
        with pytest.raises(ValueError, match="rerank_weight"):
            index.search("fox", k=3, reranker=rr, rerank_weight=bad)


def test_hnsw_index_with_deletions(tmp_path, m3_encoder):
    idx = HybridIndex.create(tmp_path / "hnsw", m3_encoder, dense_factory="HNSW32")
    idx.add(make_docs(40))
    gone = ids_of(idx.search("fox", k=3, mode="dense"))
    idx.delete(gone)
    hits = idx.search("fox", k=40, mode="dense")
    assert not set(gone) & set(ids_of(hits)) and len(hits) == 37
    idx.close()
    with pytest.raises(ValueError, match="factory"):
        HybridIndex.create(tmp_path / "bad", m3_encoder, dense_factory="Nope")
    assert not (tmp_path / "bad").exists()


def _own_representations(spec, n, seed, first_token):
    """Synthetic representations under which each document is its own best match in every
    channel: random unit dense vectors, a sparse row with one token id of its own (weight 1, ids
    ``5 + first_token ..`` handed out in random order) plus two of the low-weight shared ids
    0..4, and random unit ColBERT vectors."""
    import scipy.sparse as sp

    from hybridsearch.representations import Encoded

    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((n, spec.dim)).astype(np.float32)
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    assert 5 + first_token + n <= spec.vocab_size
    rows = np.zeros((n, spec.vocab_size), np.float32)
    rows[np.arange(n), 5 + first_token + rng.permutation(n)] = 1.0
    for i in range(n):
        rows[i, rng.choice(5, 2, replace=False)] = 0.1
    lengths = rng.integers(2, 6, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    cb = rng.standard_normal((int(offsets[-1]), spec.colbert_dim)).astype(np.float32)
    cb /= np.linalg.norm(cb, axis=1, keepdims=True)
    return Encoded(dense, sp.csr_matrix(rows), cb, offsets, lengths + 1)


def test_compact_keeps_every_channel_mapped_to_its_documents(tmp_path, m3_encoder):
    """After deletes, an upsert and compact(), each live document is still found by its own
    stored dense vector, sparse row, ColBERT vectors and unique word, with its own text."""
    from hybridsearch.representations import Encoded

    spec = m3_encoder.spec
    idx = HybridIndex.create(tmp_path / "c", m3_encoder)
    words = np.array(WORDS)
    rng = np.random.default_rng(5)
    reps, docs = {}, {}
    for b in range(3):  # three segments of 40
        enc = _own_representations(spec, 40, seed=b, first_token=40 * b)
        batch = [{"id": f"b{b}-{i}", "text": " ".join(rng.choice(words, 4)) + f" uniq{b}x{i}",
                  "metadata": {"b": b, "i": i}} for i in range(40)]
        idx.add(batch, encoded=enc)
        for i, d in enumerate(batch):
            docs[d["id"]] = d
            reps[d["id"]] = (enc, i)
    gone = [f"b{b}-{i}" for b in range(3) for i in range(0, 40, 3)]
    idx.delete(gone)
    up_enc = _own_representations(spec, 2, seed=9, first_token=120)
    up = [{"id": "b1-1", "text": "replaced text uniqupa", "metadata": {"up": 1}},
          {"id": "b2-2", "text": "replaced text uniqupb", "metadata": {"up": 2}}]
    idx.upsert(up, encoded=up_enc)
    for i, d in enumerate(up):
        docs[d["id"]] = d
        reps[d["id"]] = (up_enc, i)
    for g in gone:
        del docs[g], reps[g]
    idx.compact()
    assert idx.stats()["segments"] == 1 and idx.stats()["deleted_pending_compaction"] == 0
    assert sorted(idx.ids()) == sorted(docs) and len(idx) == 40 * 3 - len(gone)

    live = sorted(docs)
    dense = np.stack([reps[i][0].dense[reps[i][1]] for i in live])
    sparse_rows = [reps[i][0].sparse[reps[i][1]] for i in live]
    cbs = [reps[i][0].colbert_of(reps[i][1]) for i in live]
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in cbs])]).astype(np.int64)
    import scipy.sparse as sp

    q = Encoded(dense, sp.vstack(sparse_rows).tocsr(), np.concatenate(cbs), offsets,
                np.array([len(c) + 1 for c in cbs]))
    texts = [docs[i]["text"] for i in live]
    for mode in ("dense", "sparse", "colbert", "hybrid"):
        res = idx.search_batch(texts, k=3, mode=mode, query_encoded=q)
        for doc_id, hits in zip(live, res):
            assert hits and hits[0].id == doc_id, (mode, doc_id, ids_of(hits))
            assert hits[0].text == docs[doc_id]["text"] and hits[0].metadata == docs[doc_id]["metadata"]
            if mode == "dense":
                assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    # BM25: each document's unique word finds it and nothing else
    uniq = [docs[i]["text"].split()[-1] for i in live]
    for doc_id, hits in zip(live, idx.search_batch(uniq, k=3, mode="bm25")):
        assert ids_of(hits) == [doc_id]
    # reopened from disk, the same
    idx.close()
    again = HybridIndex.open(idx.path, m3_encoder)
    for mode in ("dense", "sparse", "colbert"):
        assert [h[0].id for h in again.search_batch(texts, k=1, mode=mode, query_encoded=q)] == live
    assert [h[0].id for h in again.search_batch(uniq, k=1, mode="bm25")] == live
    again.close()


def test_hybrid_hits_carry_each_channels_contribution(index):
    """Hit.contributions: one entry per channel, adding up to the fused score (weighted sum and
    RRF, default and per-query weights, with a filter); None in single-channel modes."""
    q = "fox dense ranking"
    for h in index.search(q, k=8):
        assert set(h.contributions) == set(index.channels) == {"dense", "sparse", "colbert", "bm25"}
        assert sum(h.contributions.values()) == pytest.approx(h.score, abs=1e-9)
        # BGE-M3 defaults: raw dense 0.4, sparse 0.2, ColBERT 0.4, BM25 weight 0
        for c, w in (("dense", 0.4), ("sparse", 0.2), ("colbert", 0.4)):
            assert h.contributions[c] == pytest.approx(w * (h.scores[c] or 0.0), abs=1e-6)
        assert h.contributions["bm25"] == 0.0
    w = {"dense": 0.1, "sparse": 0.0, "colbert": 0.3, "bm25": 1.0}
    hits = index.search(q, k=8, weights=w, filter={"lang": "en"})
    assert hits and all(index.get(h.id)["metadata"]["lang"] == "en" for h in hits)
    for h in hits:
        assert sum(h.contributions.values()) == pytest.approx(h.score, abs=1e-9)
        assert h.contributions["sparse"] == 0.0
    # BM25 enters z-scored and gated (a positive factor): its term rises with its score, and a
    # document BM25 did not see gets the channel's lowest term
    lo = min(h.scores["bm25"] for h in hits if h.scores["bm25"] is not None)
    order = sorted(hits, key=lambda h: lo - 1 if h.scores["bm25"] is None else h.scores["bm25"])
    terms = [h.contributions["bm25"] for h in order]
    assert terms == sorted(terms) and terms[-1] > terms[0]
    rr = index.search(q, k=50, fusion="rrf")
    for h in rr:
        assert sum(h.contributions.values()) == pytest.approx(h.score, rel=1e-6)
        assert all(v >= 0 for v in h.contributions.values())
        assert h.contributions["bm25"] == 0.0  # weight 0
    # each RRF term is w / (60 + the channel's rank among the union's scores)
    by_dense = sorted((h for h in rr if h.scores["dense"] is not None), key=lambda h: -h.scores["dense"])
    assert by_dense[0].contributions["dense"] == pytest.approx(0.4 / 61)
    for mode in ("dense", "sparse", "colbert", "bm25"):
        assert all(h.contributions is None for h in index.search(q, k=3, mode=mode))
