"""Reranker: scores against a plain one-pair-at-a-time reference, batching, truncation, errors."""

import math

import numpy as np
import pytest
import torch

from hybridsearch.errors import ModelFormatError, ModelNotFoundError
from hybridsearch.rerank import Reranker

LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)
PAIRS = [
    ("the quick brown fox", "the lazy dog"),
    ("dense retrieval", "sparse retrieval scores shared tokens with learned weights"),
    ("hybrid search", "bm25 is a classic lexical ranking function from information retrieval"),
    ("fox", "el zorro marrón salta sobre el perro perezoso"),
    ("数据检索", "混合搜索 向量 稀疏 词元"),
    ("colbert", LONG),
    ("", "an empty query"),
    ("an empty passage", ""),
    (LONG, "a very long query"),
    ("vectors faiss", "vectors are stored in faiss and token matrices are memory mapped"),
]


@pytest.fixture(scope="session")
def tiny_reranker_path(tmp_path_factory):
    from hybridsearch.testing import make_tiny_reranker

    return make_tiny_reranker(tmp_path_factory.mktemp("tiny_reranker"), seed=3)


@pytest.fixture(scope="session")
def reranker(tiny_reranker_path):
    return Reranker(tiny_reranker_path, device="cpu")


def reference_ids(tok, q, p, max_length, query_max_length=None):
    """FlagReranker's tokenisation written out for the XLM-R template <s> q </s></s> p </s>."""
    qmax = max_length * 3 // 4 if query_max_length is None else query_max_length
    q_ids = tok(q, add_special_tokens=False, truncation=True, max_length=qmax)["input_ids"]
    p_ids = tok(p, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
    extra = len(q_ids) + len(p_ids) + 4 - max_length
    if extra > 0:
        p_ids = p_ids[: len(p_ids) - extra]
    cls, sep = tok.cls_token_id, tok.sep_token_id
    return [cls] + q_ids + [sep, sep] + p_ids + [sep]


def reference_scores(rr, pairs, max_length):
    out = []
    with torch.no_grad():
        for q, p in pairs:
            ids = torch.tensor([reference_ids(rr.tokenizer, q, p, max_length)])
            out.append(float(rr.model(input_ids=ids).logits[0, 0]))
    return np.array(out)


def test_loads_as_cross_encoder(reranker):
    assert reranker.model.config.num_labels == 1
    assert reranker.dtype == torch.float32
    assert "Reranker(" in repr(reranker)


@pytest.mark.parametrize("max_length", [512, 48])
def test_scores_match_reference(reranker, max_length):
    ref = reference_scores(reranker, PAIRS, min(max_length, 128))
    got = reranker.compute_score(PAIRS, max_length=max_length)
    assert isinstance(got, list) and len(got) == len(PAIRS)
    assert all(isinstance(x, float) for x in got)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    # The random model is not constant: the check above compares distinct numbers.
    assert np.ptp(ref) > 1e-2


def test_tokenisation_matches_reference(reranker):
    for ml in (128, 40, 24):  # lengths where transformers' only_second can fit every pair
        got = reranker.tokenize_pairs(PAIRS, max_length=ml)
        assert got == [reference_ids(reranker.tokenizer, q, p, ml) for q, p in PAIRS]


def test_single_pair_gives_float(reranker):
    one = reranker.compute_score(PAIRS[1])
    assert isinstance(one, float)
    assert one == pytest.approx(reranker.compute_score([PAIRS[1]])[0], abs=1e-5)
    assert isinstance(reranker.compute_score(list(PAIRS[1])), float)


def test_batch_size_invariance_and_order(reranker):
    base = np.array(reranker.compute_score(PAIRS, batch_size=len(PAIRS)))
    for bs in (1, 3, 4):
        np.testing.assert_allclose(reranker.compute_score(PAIRS, batch_size=bs), base, atol=1e-5, rtol=0)
    perm = np.random.default_rng(0).permutation(len(PAIRS))
    shuffled = reranker.compute_score([PAIRS[i] for i in perm], batch_size=3)
    np.testing.assert_allclose(shuffled, base[perm], atol=1e-5, rtol=0)


def test_normalize_is_sigmoid(reranker):
    raw = reranker.compute_score(PAIRS)
    norm = reranker.compute_score(PAIRS, normalize=True)
    np.testing.assert_allclose(norm, [1 / (1 + math.exp(-x)) for x in raw], atol=1e-7, rtol=0)
    assert all(0 < x < 1 for x in norm)


def test_long_passage_truncated_query_kept(reranker):
    tok = reranker.tokenizer
    query = "dense retrieval uses a single vector"
    q_ids = tok(query, add_special_tokens=False)["input_ids"]
    (ids,) = reranker.tokenize_pairs([(query, LONG)], max_length=64)
    assert len(ids) == 64
    assert ids[: 1 + len(q_ids)] == [tok.cls_token_id] + q_ids
    assert ids[1 + len(q_ids) : 3 + len(q_ids)] == [tok.sep_token_id] * 2
    assert ids[-1] == tok.sep_token_id
    p_ids = tok(LONG, add_special_tokens=False)["input_ids"]
    assert ids[3 + len(q_ids) : -1] == p_ids[: 64 - len(q_ids) - 4]
    # Scoring uses the truncated pair (agrees with the reference at that length).
    ref = reference_scores(reranker, [(query, LONG)], 64)
    assert reranker.compute_score((query, LONG), max_length=64) == pytest.approx(ref[0], abs=1e-5)


def test_long_query_truncated_to_query_max_length(reranker):
    tok = reranker.tokenizer
    q_ids = tok(LONG, add_special_tokens=False)["input_ids"]
    (ids,) = reranker.tokenize_pairs([(LONG, "short passage")], max_length=64)
    assert ids[1 : 1 + 48] == q_ids[:48]  # default query_max_length = 64 * 3 // 4
    assert ids[49:51] == [tok.sep_token_id] * 2
    (ids,) = reranker.tokenize_pairs([(LONG, "short passage")], max_length=64, query_max_length=20)
    assert ids[1:21] == q_ids[:20] and ids[21] == tok.sep_token_id
    # A query limit that leaves no room for the passage still gives a pair of max_length tokens.
    (ids,) = reranker.tokenize_pairs([(LONG, LONG)], max_length=64, query_max_length=200)
    assert len(ids) == 64 and ids[1:60] == q_ids[:59]


def test_max_length_capped_by_positions(reranker):
    (ids,) = reranker.tokenize_pairs([("fox", LONG)], max_length=100_000)
    assert len(ids) == 128  # the tiny model has 128 positions
    assert isinstance(reranker.compute_score(("fox", LONG), max_length=100_000), float)


def test_progress_bar_and_many_pairs(reranker, capsys):
    pairs = PAIRS * 30  # 300 pairs: progress bar on by default
    got = reranker.compute_score(pairs, batch_size=64)
    np.testing.assert_allclose(got, reranker.compute_score(PAIRS) * 30, atol=1e-5, rtol=0)
    assert "rerank" in capsys.readouterr().err


def test_oom_retry_halves_batch(reranker, monkeypatch):
    calls = []
    real = reranker._forward_batch

    def flaky(ids, types, idx, width):
        calls.append(len(idx))
        if len(idx) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")
        return real(ids, types, idx, width)

    monkeypatch.setattr(reranker, "_forward_batch", flaky)
    got = reranker.compute_score(PAIRS, batch_size=8)
    monkeypatch.undo()
    np.testing.assert_allclose(got, reranker.compute_score(PAIRS), atol=1e-5, rtol=0)
    assert calls[:3] == [8, 4, 2]


def test_oom_on_a_single_pair_is_a_clear_error(reranker, monkeypatch):
    cause = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB")

    def always(*a):
        raise cause

    monkeypatch.setattr(reranker, "_forward_batch", always)
    with pytest.raises(torch.OutOfMemoryError, match=r"single pair of 128 tokens on cpu .*max_length") as info:
        reranker.compute_score(PAIRS, batch_size=4)
    assert info.value.__cause__ is cause and "Tried to allocate 20 GiB" in str(info.value)


def test_other_runtime_errors_propagate(reranker, monkeypatch):
    def broken(*a):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(reranker, "_forward_batch", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        reranker.compute_score(PAIRS)


def test_rerank(reranker):
    query = "quick fox"
    passages = [p for _, p in PAIRS]
    scores, order = reranker.rerank(query, passages)
    assert scores.dtype == np.float32 and scores.shape == (len(passages),)
    assert order.dtype == np.int64 and sorted(order.tolist()) == list(range(len(passages)))
    np.testing.assert_allclose(scores, reranker.compute_score([(query, p) for p in passages]), atol=1e-6)
    assert np.all(np.diff(scores[order]) <= 0)
    s3, top3 = reranker.rerank(query, passages, top_n=3)
    assert top3.tolist() == order[:3].tolist() and s3.shape == (len(passages),)
    assert len(reranker.rerank(query, passages, top_n=100)[1]) == len(passages)
    s1, o1 = reranker.rerank(query, ["same text", "same text"])
    assert s1[0] == s1[1]  # equal texts: exactly equal scores (scored once)
    assert o1.tolist() == [0, 1]  # ties keep input order


def test_equal_pairs_scored_once_equal_scores(reranker, monkeypatch):
    rows = []
    real = reranker._forward_batch

    def counting(ids, types, idx, width):
        rows.extend(ids[i] for i in idx)
        return real(ids, types, idx, width)

    monkeypatch.setattr(reranker, "_forward_batch", counting)
    # Copies of pairs at different positions, among pairs of other lengths, over several batches.
    pairs = [PAIRS[i] for i in (5, 0, 1, 0, 9, 5, 3, 0, 1, 2, 5, 0)]
    for bs in (1, 3, 5, 64):
        rows.clear()
        got = reranker.compute_score(pairs, batch_size=bs)
        assert len(rows) == len(set(pairs)) and len({tuple(r) for r in rows}) == len(rows)
        for i, p in enumerate(pairs):
            for j in range(i):
                if pairs[j] == p:
                    assert got[i] == got[j]  # exactly: one score per distinct pair
        np.testing.assert_allclose(got, reference_scores(reranker, pairs, 128), atol=1e-5, rtol=0)
    # Different strings that give the same model input are one input too.
    tok = reranker.tokenizer
    assert tok("fox  jumps")["input_ids"] == tok("fox jumps")["input_ids"]
    rows.clear()
    a, b = reranker.compute_score([("q", "fox jumps"), ("q", "fox  jumps")])
    assert a == b and len(rows) == 1


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        ([], ValueError, "empty"),
        ("just a string", TypeError, "pair"),
        (None, TypeError, "pair"),
        ([("q",)], TypeError, r"sentence_pairs\[0\]"),
        ([("q", "p", "x")], TypeError, r"sentence_pairs\[0\]"),
        ([("q", "p"), ("q", 3)], TypeError, r"sentence_pairs\[1\]"),
        ([("q", None)], TypeError, "two strings"),
        (("q", 1), TypeError, "two strings"),
        ([["q", "p"], "x"], TypeError, r"sentence_pairs\[1\]"),
    ],
)
def test_bad_pairs(reranker, bad, exc, match):
    with pytest.raises(exc, match=match):
        reranker.compute_score(bad)


def test_bad_arguments(reranker):
    with pytest.raises(TypeError, match="normalize"):
        reranker.compute_score(PAIRS, normalize=1)
    with pytest.raises(TypeError, match="normalize"):
        reranker.compute_score(PAIRS, normalize="yes")
    with pytest.raises(ValueError, match="batch_size"):
        reranker.compute_score(PAIRS, batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        reranker.compute_score(PAIRS, max_length=-3)
    with pytest.raises(ValueError, match="max_length must be at least"):
        reranker.compute_score(PAIRS, max_length=4)
    with pytest.raises(ValueError, match="empty"):
        reranker.rerank("q", [])
    with pytest.raises(TypeError, match="query"):
        reranker.rerank(None, ["p"])
    with pytest.raises(TypeError, match="passages"):
        reranker.rerank("q", "one passage")
    with pytest.raises(TypeError, match=r"passages\[1\]"):
        reranker.rerank("q", ["p", 2])
    with pytest.raises(ValueError, match="top_n"):
        reranker.rerank("q", ["p"], top_n=0)


def test_bad_constructor_arguments(tiny_reranker_path):
    with pytest.raises(ValueError, match="dtype"):
        Reranker(tiny_reranker_path, device="cpu", dtype="fp64")
    with pytest.raises(ValueError, match="batch_size"):
        Reranker(tiny_reranker_path, device="cpu", batch_size=0)


def test_constructor_lengths_are_defaults(tiny_reranker_path, reranker):
    rr = Reranker(tiny_reranker_path, device="cpu", max_length=40, query_max_length=10, batch_size=2)
    assert rr.tokenize_pairs([(LONG, LONG)]) == [reference_ids(rr.tokenizer, LONG, LONG, 40, 10)]
    np.testing.assert_allclose(rr.compute_score(PAIRS),
                               reranker.compute_score(PAIRS, max_length=40, query_max_length=10),
                               atol=1e-5, rtol=0)


def test_embedding_model_is_rejected(tiny_m3):
    with pytest.raises(ModelFormatError, match="not a cross-encoder"):
        Reranker(tiny_m3, device="cpu")


def test_multi_label_model_is_rejected(tmp_path, tiny_reranker_path):
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaForSequenceClassification

    config = XLMRobertaConfig(vocab_size=400, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=32, max_position_embeddings=34, num_labels=3)
    XLMRobertaForSequenceClassification(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(str(tiny_reranker_path)).save_pretrained(tmp_path)
    with pytest.raises(ModelFormatError, match="3 labels"):
        Reranker(tmp_path, device="cpu")


def test_missing_model(tmp_path):
    with pytest.raises(ModelNotFoundError):
        Reranker(str(tmp_path / "nope" / "model"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFormatError, match="config.json"):
        Reranker(tmp_path / "empty", device="cpu")


def test_threads_with_different_max_lengths(reranker):
    """Pairs tokenised and scored at max lengths 24 and 128 at the same time in several threads,
    while another user truncates the public tokenizer: the same ids and scores as one thread."""
    import threading

    pairs = [PAIRS[i] for i in (0, 1, 5, 8, 9)]
    want = {ml: (reranker.tokenize_pairs(pairs, max_length=ml), reranker.compute_score(pairs, max_length=ml))
            for ml in (24, 128)}
    start, bad, errors = threading.Barrier(4), [], []

    def job(ml, n):
        try:
            start.wait()
            for _ in range(n):
                ids = reranker.tokenize_pairs(pairs, max_length=ml)
                scores = reranker.compute_score(pairs, max_length=ml)
                if ids != want[ml][0] or not np.allclose(scores, want[ml][1], atol=1e-5, rtol=0):
                    bad.append(ml)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def other_user():
        start.wait()
        for i in range(150):
            reranker.tokenizer([q for q, _ in pairs], truncation=True, max_length=2 + i % 4)

    threads = [threading.Thread(target=job, args=a) for a in ((24, 30), (128, 10), (128, 10))]
    threads.append(threading.Thread(target=other_user))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and bad == []
