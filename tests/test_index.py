"""HybridIndex end to end on a tiny random BGE-M3 checkpoint: every channel, persistence, errors."""

import json
import shutil

import numpy as np
import pytest

from hybridsearch import BGEM3Encoder
from hybridsearch.errors import IndexFormatError, ModelMismatchError
from hybridsearch.index.hybrid import HybridIndex
from hybridsearch.representations import colbert_score, lexical_matching_score

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


def test_modes_return_hits_with_channel_scores(index, m3_encoder):
    q = "fox dense ranking"
    qe = m3_encoder.encode([q], return_colbert_vecs=True)
    for mode in ("dense", "sparse", "colbert", "bm25"):
        hits = index.search(q, k=5, mode=mode)
        assert 0 < len(hits) <= 5
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


def test_dense_and_sparse_topk_equal_brute_force(index, m3_encoder):
    docs = make_docs(30) + make_docs(20, seed=1, prefix="e")
    enc = m3_encoder.encode_arrays([d["text"] for d in docs])
    q = m3_encoder.encode_arrays(["water light river"], kind="query")
    dense = enc.dense @ q.dense[0]
    sparse = (enc.sparse @ q.sparse.T).toarray()[:, 0]
    for mode, ref in (("dense", dense), ("sparse", sparse)):
        hits = index.search("water light river", k=10, mode=mode)
        got = np.array([h.score for h in hits])
        np.testing.assert_allclose(got, np.sort(ref[ref > 0] if mode == "sparse" else ref)[::-1][:len(got)], atol=1e-5)


def test_batch_equals_single(index):
    qs = ["fox", "water cloud", "hybrid search faiss"]
    batch = index.search(qs, k=4)
    for q, hits in zip(qs, batch):
        assert ids_of(hits) == ids_of(index.search(q, k=4))


def test_persistence_roundtrip(index, m3_encoder):
    before = {m: ids_of(index.search("token ranking", k=8, mode=m)) for m in ("dense", "sparse", "colbert", "bm25", "hybrid")}
    index.close()
    again = HybridIndex.open(index.path, m3_encoder)
    assert len(again) == 50
    for m, ids in before.items():
        assert ids_of(again.search("token ranking", k=8, mode=m)) == ids
    again.close()


def test_delete_upsert_take_effect_and_persist(index, m3_encoder):
    top = index.search("fox dog", k=1, mode="bm25")[0].id
    index.delete([top])
    for mode in ("dense", "sparse", "colbert", "bm25", "hybrid"):
        assert top not in ids_of(index.search("fox dog", k=50, mode=mode))
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


def test_filters_apply_to_every_channel(index):
    cases = [({"lang": "fr"}, lambda m: m["lang"] == "fr"),
             ({"year": {"gte": 2003, "lt": 2006}}, lambda m: 2003 <= m["year"] < 2006),
             ({"i": {"in": [1, 2, 3, 4]}}, lambda m: m["i"] in (1, 2, 3, 4)),
             ({"lang": {"ne": "fr"}, "year": 2001}, lambda m: m["lang"] != "fr" and m["year"] == 2001)]
    for flt, pred in cases:
        expected = sum(pred(d["metadata"]) for d in make_docs(30) + make_docs(20, seed=1, prefix="e"))
        for mode in ("dense", "sparse", "colbert", "bm25", "hybrid"):
            hits = index.search("fox dense water token", k=50, mode=mode, filter=flt)
            assert all(pred(h.metadata) for h in hits), (flt, mode)
            if mode in ("dense", "colbert"):  # these score every document
                assert len(hits) == expected
    with pytest.raises(ValueError, match="unknown operator"):
        index.search("x", filter={"year": {"between": 1}})


def test_rrf_and_weights_per_query(index):
    a = index.search("fox", k=5, fusion="rrf")
    assert all(0 < h.score <= 4 / 61 for h in a)
    b = index.search("fox", k=5, weights={"dense": 0.0, "sparse": 0.0, "colbert": 0.0, "bm25": 1.0})
    assert ids_of(b)[:3] == ids_of(index.search("fox", k=3, mode="bm25"))


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
