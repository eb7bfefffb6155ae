"""BM25 with statistics given from outside (what the shards of a sharded index do): a collection
split in two scores exactly as the whole when each part gets the summed N, df and length."""

import random

import numpy as np
import pytest

from hybridsearch.retrievers import bm25_postings as bp


def _texts(n, seed):
    rng = random.Random(seed)
    words = [f"t{i}" for i in range(60)] + ["common"] * 20
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def test_parts_with_summed_stats_score_as_the_whole():
    a, b = bp.Bm25Postings.from_texts(_texts(300, 1)), bp.Bm25Postings.from_texts(_texts(200, 2))
    queries = ["common t1 t2", "t3 t3 t59", "nothing-here", "t7 common common"]
    whole = bp.search([a, b], queries, 10)
    terms = bp.query_terms(queries)
    sa, sb = bp.collection_stats([a], terms), bp.collection_stats([b], terms)
    summed = (sa[0] + sb[0], sa[1] + sb[1], sa[2] + sb[2])
    assert summed[0] == 500
    (pa,), (pb,) = bp.search([a], queries, 10, stats=summed), bp.search([b], queries, 10, stats=summed)
    for got, want in ((pa, whole[0]), (pb, whole[1])):
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    # without the global statistics a part scores differently (its own N and df)
    (alone,) = bp.search([a], queries, 10)
    assert not np.allclose(alone[0], whole[0][0])


def test_bad_stats_are_refused():
    a = bp.Bm25Postings.from_texts(_texts(20, 3))
    terms = bp.query_terms(["t1 t2"])
    with pytest.raises(ValueError, match="stats"):
        bp.search([a], ["t1 t2"], 5, stats=(10, 100, np.array([1])))  # df of the wrong length
    with pytest.raises(ValueError, match="stats"):
        bp.search([a], ["t1 t2"], 5, stats=(1, 100, np.array([5, 0])))  # df > N
    assert len(terms) == 2


# ---------------------------------------------------------------- a codebook given from outside


def _corpus(n, seed):
    rng = random.Random(seed)
    words = "quick brown fox lazy dog dense sparse colbert token passage bm25 hybrid fusion vectors".split()
    return [{"id": f"{seed}-{i}", "text": " ".join(rng.choice(words) for _ in range(rng.randint(4, 16)))}
            for i in range(n)]


def test_install_codebook_codes_what_follows_and_is_checked(tmp_path, m3_encoder):
    """An index made with train_codebook=False never trains its own codebook (the setting is in
    the manifest, so a reopened index keeps it); install_codebook() makes the next writes coded
    with the given one, is idempotent for the same codebook and refuses another one or a codec
    of another kind or dimension."""
    import json

    from hybridsearch import HybridIndex
    from hybridsearch.retrievers.colbert_codec import ColbertCodec

    enc = m3_encoder
    trained = HybridIndex.create(tmp_path / "trained", enc, codec_train_tokens=200, merge_policy=None)
    docs = _corpus(60, 1)
    trained.add(docs)
    codec = trained.codebook()
    assert codec is not None and codec.name == "res1"

    given = HybridIndex.create(tmp_path / "given", enc, codec_train_tokens=200, train_codebook=False,
                               merge_policy=None)
    given.add(docs[:30])
    assert given.codebook() is None
    given.close()
    given = HybridIndex.open(tmp_path / "given", enc, merge_policy=None)  # the setting survives a reopen
    given.add(docs[30:])  # far past train_tokens: still not trained here
    assert given.codebook() is None
    assert {s.colbert_kind for s in given._current().segments} == {"fp16"}
    m = json.loads((given.path / "manifest.json").read_text())
    assert m["channels"]["colbert_codec"]["train"] is False

    gen = given._current().generation
    name = given.install_codebook(codec)
    assert given._current().generation == gen + 1
    assert given.codebook().identity == codec.identity
    assert given.install_codebook(codec) == name and given._current().generation == gen + 1  # idempotent
    loaded = ColbertCodec.load(given.path / name, dim=enc.spec.colbert_dim)
    assert loaded.identity == codec.identity
    more = _corpus(20, 2)
    given.add(more)
    kinds = [s.colbert_kind for s in given._current().segments]
    assert kinds == ["fp16", "fp16", "codes"]  # stored before it: float16 until merged
    given.compact()
    assert [s.colbert_kind for s in given._current().segments] == ["codes"]
    # the same codebook gives the same ColBERT scores as the index that trained it: exactly for
    # the documents both coded from the encoder's float32 vectors, and within float16's rounding
    # for those `given` held as float16 first
    trained.add(more)
    trained.compact()
    ids_more = {d["id"] for d in more}
    for q in ("quick brown fox", "colbert token passage"):
        a = {h.id: h.score for h in given.search(q, k=80, mode="colbert", exhaustive=True)}
        b = {h.id: h.score for h in trained.search(q, k=80, mode="colbert", exhaustive=True)}
        assert a.keys() == b.keys() and len(a) == 80
        for i in a:
            assert abs(a[i] - b[i]) <= (1e-5 if i in ids_more else 2e-2), (q, i)
        assert sum(a[i] != b[i] for i in a) > 0  # the float16 rounding is there (the check can fail)

    other = ColbertCodec.train(np.random.default_rng(0).standard_normal((600, enc.spec.colbert_dim)).astype(np.float32),
                               nbits=1, k=8)
    with pytest.raises(ValueError, match="another codebook"):
        given.install_codebook(other)
    with pytest.raises(TypeError):
        given.install_codebook("codec-000001")
    res2 = HybridIndex.create(tmp_path / "res2", enc, colbert_codec="res2", train_codebook=False)
    with pytest.raises(ValueError, match="does not fit"):
        res2.install_codebook(codec)
    fp16 = HybridIndex.create(tmp_path / "fp16", enc, colbert_codec="fp16", train_codebook=False)
    with pytest.raises(ValueError, match="float16"):
        fp16.install_codebook(codec)
    with pytest.raises(ValueError, match="train_codebook"):
        HybridIndex.create(tmp_path / "bad", enc, train_codebook="no")
    for x in (res2, fp16, given, trained):
        x.close()


def test_a_hostile_train_setting_is_refused(tmp_path, m3_encoder):
    import json

    from hybridsearch import HybridIndex
    from hybridsearch.errors import IndexFormatError

    HybridIndex.create(tmp_path / "ix", m3_encoder, train_codebook=False).close()
    f = tmp_path / "ix" / "manifest.json"
    m = json.loads(f.read_text())
    m["channels"]["colbert_codec"]["train"] = "yes"
    f.write_text(json.dumps(m))
    with pytest.raises(IndexFormatError, match="train"):
        HybridIndex.open(tmp_path / "ix", m3_encoder)
