"""BM25 channel: analysis per script, bag-of-words queries, writes, filtering, persistence."""

import numpy as np
import pytest

from hybridsearch.errors import IndexFormatError
from hybridsearch.retrievers import bm25 as bm25_mod
from hybridsearch.retrievers.bm25 import BM25Index, analyze_query

ENGLISH = [
    "The runner was running along the river",
    "She runs every morning before work",
    "Swimming in the cold lake is refreshing",
    "A quiet library full of old books",
]


def build(texts, docnos=None, index=None):
    ix = index or BM25Index.in_memory()
    docnos = np.arange(len(texts), dtype=np.int64) if docnos is None else docnos
    ix.add(docnos, list(texts))
    ix.commit()
    return ix


def top(ix, query, k=3):
    _scores, docnos = ix.search([query], k)
    return docnos[0][docnos[0] >= 0].tolist()


def test_result_shapes_and_padding():
    ix = build(ENGLISH)
    scores, docnos = ix.search(["running", "library", "zebra"], 5)
    assert scores.shape == docnos.shape == (3, 5)
    assert scores.dtype == np.float32 and docnos.dtype == np.int64
    assert set(docnos[0][:2].tolist()) == {0, 1} and (docnos[0][2:] == -1).all()
    assert docnos[1].tolist() == [3, -1, -1, -1, -1]
    assert (docnos[2] == -1).all() and (scores[2] == 0).all()
    assert (np.diff(scores[0][:2]) <= 0).all()


def test_english_stemming_matches_inflections():
    ix = build(ENGLISH)
    assert set(top(ix, "run")) == {0, 1}
    assert set(top(ix, "running")) == {0, 1}
    assert top(ix, "swim") == [2]
    assert top(ix, "BOOK") == [3]


def test_stopwords_are_dropped():
    assert analyze_query("the cats and the dogs") == ["cat", "dog"]
    ix = build(ENGLISH)
    for q in ["the", "the of and is a", "", "   ", "?!.,;", "*", ":", '"', "(", ")", "AND OR NOT"]:
        scores, docnos = ix.search([q], 3)
        assert (docnos == -1).all() and (scores == 0).all(), q


def test_query_syntax_characters_are_plain_text():
    ix = build(ENGLISH)
    plain = ix.search(["runner river morning"], 4)
    for q in [
        '"runner" AND (river: OR morning)',
        "runner: river* -morning",
        "+runner ^river~ [morning TO",
        "runner) (river' morning\\",
    ]:
        got = ix.search([q], 4)
        np.testing.assert_array_equal(got[1], plain[1], err_msg=q)
        np.testing.assert_allclose(got[0], plain[0], rtol=1e-6, err_msg=q)


def test_long_tokens_dropped_without_error():
    ix = build(["x" * 100 + " short words", "other"])
    assert top(ix, "x" * 100) == []
    assert top(ix, "short") == [0]


CHINESE = ["我喜欢吃苹果和香蕉", "今天天气很好我们去公园", "苹果公司发布了新手机"]


def test_chinese_without_spaces_matches():
    ix = build(CHINESE)
    assert set(top(ix, "苹果")) == {0, 2}
    assert top(ix, "今天天气怎么样")[0] == 1
    assert top(ix, "香蕉") == [0]
    assert top(ix, "手机")[0] == 2
    # a one-character query matches inside longer runs (documents carry unigrams)
    assert set(top(ix, "吃")) == {0}


def test_japanese_and_thai_and_korean_match():
    ix = build(
        [
            "東京タワーに行きました",
            "京都の寺はとても美しいです",
            "ภาษาไทยเป็นภาษาที่สวยงาม",
            "กรุงเทพมหานครเป็นเมืองหลวง",
            "한국어를 공부하고 있습니다",
            "Tokyo tower at night",
        ]
    )
    assert top(ix, "東京タワー")[0] == 0
    assert top(ix, "京都の寺")[0] == 1
    assert top(ix, "ภาษาไทย")[0] == 2
    assert top(ix, "เมืองหลวง")[0] == 3
    assert top(ix, "한국어")[0] == 4
    assert top(ix, "tokyo")[0] == 5


def test_mixed_script_text_uses_both_analysers():
    assert analyze_query("Running 東京, in 京都") == ["run", "東京", "京都"]
    ix = build(["BGE-M3 模型在东京发布", "unrelated english words"])
    assert top(ix, "bge 东京") == [0]


def test_cjk_documents_share_length_statistics_with_english():
    # 100 English docs and one Chinese doc of similar token counts; one rare term each.
    texts = ["alpha beta gamma delta"] * 100 + ["alpha beta gamma zebra", "猫狗"]
    ix = build(texts)
    scores, docnos = ix.search(["zebra", "猫狗"], 1)
    assert docnos[:, 0].tolist() == [100, 101]
    # Same idf and tf, similar lengths: similar scores (a separate CJK field, averaged over all
    # documents, would have divided the Chinese score several times over).
    assert 0.8 < scores[1, 0] / scores[0, 0] < 1.25


def test_nfkc_normalisation():
    ix = build(["ＡＢＣ corporation", "ﬁle system"])
    assert top(ix, "abc") == [0]
    assert top(ix, "file") == [1]


def test_non_contiguous_docnos():
    ix = build(ENGLISH, docnos=np.array([7, 10**12, 3, 42], dtype=np.int64))
    assert set(top(ix, "running")) == {7, 10**12}
    assert top(ix, "library") == [42]


def test_writes_visible_only_after_commit_and_rollback():
    ix = build(ENGLISH)
    ix.add(np.array([10]), ["zebra crossing"])
    assert top(ix, "zebra") == []
    ix.rollback()
    ix.commit()
    assert top(ix, "zebra") == [] and ix.num_docs == 4
    ix.add(np.array([10]), ["zebra crossing"])
    ix.commit()
    assert top(ix, "zebra") == [10] and ix.num_docs == 5


def test_delete_and_delete_from():
    ix = build(ENGLISH + ["more running", "running again"], docnos=np.arange(6) * 2)
    assert ix.num_docs == 6
    ix.delete(np.array([0]))
    ix.commit()
    assert set(top(ix, "running", k=10)) == {2, 8, 10}
    ix.delete(np.array([2, 4, 999]))  # unknown docnos are ignored
    ix.commit()
    assert ix.num_docs == 3
    ix.delete_from(9)  # removes 10, keeps 6 and 8
    ix.commit()
    assert ix.num_docs == 2
    assert top(ix, "running", k=10) == [8]
    ix.delete(np.array([], dtype=np.int64))  # no-op


def _random_corpus(n, seed):
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(30)]
    return [" ".join(rng.choice(vocab, size=rng.integers(3, 40))) for _ in range(n)]


@pytest.mark.parametrize("termset_max", [0, 4096])  # over-fetch path, term-set path
def test_allowed_mask_is_exact(monkeypatch, termset_max):
    monkeypatch.setattr(bm25_mod, "_TERMSET_MAX", termset_max)
    n = 300
    ix = build(_random_corpus(n, seed=0))
    queries = ["w1 w2 w3", "w7", "w0 w29 w15 w4", "nothing matches"]
    full_s, full_d = ix.search(queries, n)
    rng = np.random.default_rng(1)
    k = 5
    masks = {
        "mostly_true": rng.random(n) < 0.9,
        "sparse": rng.random(n) < 0.05,
        "short": np.ones(n // 2, dtype=bool),  # docnos beyond the mask are not allowed
        "none": np.zeros(n, dtype=bool),
    }
    # Only the worst-ranked docs of query 0 allowed: forces several over-fetch pages.
    tail = np.zeros(n, dtype=bool)
    ranked = full_d[0][full_d[0] >= 0]
    tail[ranked[-k:]] = True
    masks["tail"] = tail
    # Allowed docs are half the corpus but all ranked low: several doubling pages.
    bottom = np.zeros(n, dtype=bool)
    bottom[ranked[len(ranked) // 2 :]] = True
    masks["bottom_half"] = bottom
    for name, mask in masks.items():
        got_s, got_d = ix.search(queries, k, allowed=mask)
        for i in range(len(queries)):
            d, s = full_d[i], full_s[i]
            keep = (d >= 0) & (d < mask.shape[0])
            keep[keep] = mask[d[keep]]
            exp_d = np.full(k, -1)
            exp_s = np.zeros(k, np.float32)
            m = min(k, int(keep.sum()))
            exp_d[:m], exp_s[:m] = d[keep][:m], s[keep][:m]
            np.testing.assert_allclose(got_s[i], exp_s, rtol=1e-5, err_msg=f"{name} q{i}")
            np.testing.assert_array_equal(got_d[i], exp_d, err_msg=f"{name} q{i}")


def test_threads_give_the_same_results():
    ix = build(_random_corpus(200, seed=3))
    queries = [f"w{i} w{(i * 7) % 30}" for i in range(30)] + ["the", "w5"]
    mask = np.random.default_rng(0).random(200) < 0.5
    for allowed in (None, mask):
        one = ix.search(queries, 7, allowed=allowed)
        three = ix.search(queries, 7, allowed=allowed, threads=3)
        np.testing.assert_array_equal(three[1], one[1])
        np.testing.assert_array_equal(three[0], one[0])


def test_persistence_reopen(tmp_path):
    folder = tmp_path / "bm25"
    ix = BM25Index.create(folder)
    build(ENGLISH + CHINESE, index=ix)
    before = ix.search(["running", "苹果"], 3)
    ix.close()
    assert ix.disk_bytes() > 0

    ix2 = BM25Index.open(folder)
    assert ix2.num_docs == len(ENGLISH) + len(CHINESE)
    after = ix2.search(["running", "苹果"], 3)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0])
    ix2.add(np.array([100]), ["running late"])  # analysers re-registered on open
    ix2.delete(np.array([0]))
    ix2.commit()
    ix2.close()
    ix3 = BM25Index.open(folder)
    assert set(top(ix3, "run", k=5)) == {1, 100}


def test_open_and_create_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        BM25Index.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexFormatError):
        BM25Index.open(tmp_path / "empty")
    BM25Index.create(tmp_path / "ix").close()
    with pytest.raises(FileExistsError):
        BM25Index.create(tmp_path / "ix")
    (tmp_path / "ix" / bm25_mod.META_FILE).write_text('{"format_version": 99}')
    with pytest.raises(IndexFormatError, match="format_version"):
        BM25Index.open(tmp_path / "ix")


def test_bad_input():
    ix = build(ENGLISH)
    with pytest.raises(ValueError, match="2 docnos but 1 texts"):
        ix.add(np.array([5, 6]), ["one"])
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        ix.add(np.array([5, 6]), ["one", b"two"])
    with pytest.raises(TypeError):
        ix.add(np.array([5.0]), ["one"])
    with pytest.raises(ValueError, match="duplicates"):
        ix.add(np.array([5, 5]), ["one", "two"])
    with pytest.raises(ValueError, match=">= 0"):
        ix.add(np.array([-1]), ["one"])
    with pytest.raises(ValueError, match="k must be"):
        ix.search(["run"], 0)
    with pytest.raises(TypeError):
        ix.search("run", 3)
    with pytest.raises(TypeError):
        ix.search([3], 3)
    with pytest.raises(TypeError, match="allowed"):
        ix.search(["run"], 3, allowed=np.ones(4, dtype=np.int64))
    with pytest.raises(TypeError):
        ix.delete_from("5")
    with pytest.raises(ValueError, match="threads"):
        ix.search(["run"], 3, threads=0)


def _bm25_by_hand(docs_terms, query_terms, k1=1.2, b=0.75):
    """Tantivy's BM25 for a one-segment index without deletions, in float64: for each query
    term occurrence, idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len / avg_len)), with
    idf = ln(1 + (N - n + 0.5) / (n + 0.5)) and len the document's number of (analysed) tokens."""
    n_docs = len(docs_terms)
    lengths = np.array([len(t) for t in docs_terms], np.float64)
    avg = lengths.sum() / n_docs
    out = np.zeros(n_docs)
    for term in query_terms:
        tf = np.array([t.count(term) for t in docs_terms], np.float64)
        n = int((tf > 0).sum())
        if n == 0:
            continue
        idf = np.log(1 + (n_docs - n + 0.5) / (n + 0.5))
        out += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths / avg))
    return out


def test_scores_follow_the_bm25_formula():
    # Short documents (< 40 tokens, where tantivy's field-length norm is exact) over a small
    # vocabulary, so terms repeat within documents and document frequencies vary.
    rng = np.random.default_rng(11)
    vocab = [f"w{i}" for i in range(12)]
    p = np.linspace(3, 1, len(vocab))
    docs_terms = [list(rng.choice(vocab, size=int(rng.integers(1, 31)), p=p / p.sum())) for _ in range(80)]
    ix = build([" ".join(t) for t in docs_terms])
    queries = ["w0", "w11", "w3 w7", "w1 w1 w5", "w2 w4 w6 w8 w10", "w9 unknownword"]
    scores, docnos = ix.search(queries, 80)
    for j, q in enumerate(queries):
        want = _bm25_by_hand(docs_terms, analyze_query(q))
        hit = docnos[j] >= 0
        assert sorted(docnos[j][hit].tolist()) == np.flatnonzero(want > 0).tolist(), q
        np.testing.assert_allclose(scores[j][hit], want[docnos[j][hit]], rtol=2e-5, err_msg=q)
        assert (np.diff(scores[j][hit]) <= 0).all()


def test_scores_agree_with_bm25s():
    bm25s = pytest.importorskip("bm25s")
    rng = np.random.default_rng(12)
    vocab = [f"w{i}" for i in range(20)]
    docs_terms = [list(rng.choice(vocab, size=int(rng.integers(2, 25)))) for _ in range(50)]
    ix = build([" ".join(t) for t in docs_terms])
    ref = bm25s.BM25(k1=1.2, b=0.75, method="lucene")  # lucene: the idf above, as tantivy
    ref.index(bm25s.tokenize([" ".join(t) for t in docs_terms], stopwords=None, show_progress=False),
              show_progress=False)
    for q in ["w3", "w1 w12", "w0 w4 w19"]:
        # Lucene (8+) and bm25s's "lucene" leave out BM25's constant factor (k1 + 1); tantivy keeps it
        want = ref.get_scores(q.split()) * (1.2 + 1)
        scores, docnos = ix.search([q], 50)
        hit = docnos[0] >= 0
        assert sorted(docnos[0][hit].tolist()) == np.flatnonzero(want > 0).tolist()
        np.testing.assert_allclose(scores[0][hit], want[docnos[0][hit]], rtol=1e-4, err_msg=q)
