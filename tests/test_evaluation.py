"""Retrieval metrics on hand-computed examples, and the BEIR loader."""

import json
import math

import pytest

from hybridsearch.evaluation import evaluate, load_beir, mrr_at_k, ndcg_at_k, recall_at_k

# Graded qrels: d1 highly relevant, d2 relevant, d3 judged not relevant.
QRELS = {"d1": 2, "d2": 1, "d3": 0}
RANKING = ["d3", "d1", "x", "d2"]  # relevant docs at ranks 2 and 4


def test_ndcg_graded_by_hand():
    dcg = 2 / math.log2(3) + 1 / math.log2(5)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(RANKING, QRELS, 10) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(RANKING, QRELS, 10) == pytest.approx(0.64332, abs=1e-5)
    # cut at 2: d2 (rank 4) no longer counts, the ideal still holds both grades
    assert ndcg_at_k(RANKING, QRELS, 2) == pytest.approx((2 / math.log2(3)) / idcg)
    # cut at 1: the ideal is the single best grade
    assert ndcg_at_k(["d2"], QRELS, 1) == pytest.approx(1 / 2)
    assert ndcg_at_k(["d1", "d2"], QRELS, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["d2", "d1"], QRELS, 10) == pytest.approx((1 + 2 / math.log2(3)) / idcg)


def test_recall_and_mrr_by_hand():
    assert recall_at_k(RANKING, QRELS, 1) == 0.0
    assert recall_at_k(RANKING, QRELS, 2) == 0.5
    assert recall_at_k(RANKING, QRELS, 4) == 1.0
    assert mrr_at_k(RANKING, QRELS, 1) == 0.0
    assert mrr_at_k(RANKING, QRELS, 10) == 0.5
    assert mrr_at_k(["x", "y", "d2"], QRELS, 10) == pytest.approx(1 / 3)


def test_query_with_no_hits_and_padding():
    for fn in (ndcg_at_k, recall_at_k, mrr_at_k):
        assert fn([], QRELS, 10) == 0.0
        assert fn([-1, -1], QRELS, 10) == 0.0
        assert fn(["d1"], {"d1": 0}, 10) == 0.0  # nothing relevant


def test_duplicates_count_once():
    assert recall_at_k(["d1", "d1"], QRELS, 2) == 0.5
    assert ndcg_at_k(["d1", "d1", "d2"], QRELS, 10) == pytest.approx(1.0)


def test_bad_k():
    with pytest.raises(ValueError):
        ndcg_at_k(RANKING, QRELS, 0)
    with pytest.raises(ValueError):
        evaluate({}, {}, ks=(10, -1))


def test_evaluate_averages_over_judged_queries():
    qrels = {"q1": QRELS, "q2": {"a": 1}, "q3": {"b": 0}}  # q3 has nothing relevant: skipped
    run = {"q1": RANKING, "q3": ["b"], "q9": ["a"]}  # q2 missing: scores 0; q9 unjudged: ignored
    res = evaluate(run, qrels, ks=(2, 10))
    assert res["num_queries"] == 2
    assert res["ndcg@10"] == pytest.approx(ndcg_at_k(RANKING, QRELS, 10) / 2)
    assert res["recall@2"] == pytest.approx(0.25)
    assert res["mrr@10"] == pytest.approx(0.25)
    assert set(res) == {"num_queries"} | {
        f"{m}@{k}" for m in ("ndcg", "recall", "mrr") for k in (2, 10)
    }
    assert evaluate(run, {}, ks=(10,))["ndcg@10"] == 0.0


def _write_beir(root, corpus_lines=None, qrels_text=None):
    (root / "qrels").mkdir(parents=True)
    corpus_lines = corpus_lines or [
        json.dumps({"_id": "d1", "title": "T1", "text": "first doc"}),
        json.dumps({"_id": 2, "text": "second doc, no title"}),
    ]
    (root / "corpus.jsonl").write_text("\n".join(corpus_lines) + "\n", encoding="utf-8")
    (root / "queries.jsonl").write_text(
        json.dumps({"_id": "q1", "text": "which doc?", "metadata": {}}) + "\n\n", encoding="utf-8"
    )
    qrels_text = qrels_text or "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\t2\t2\n"
    (root / "qrels" / "test.tsv").write_text(qrels_text, encoding="utf-8")


def test_load_beir(tmp_path):
    _write_beir(tmp_path)
    corpus, queries, qrels = load_beir(tmp_path, "test")
    assert corpus == {
        "d1": {"title": "T1", "text": "first doc"},
        "2": {"title": "", "text": "second doc, no title"},
    }
    assert queries == {"q1": "which doc?"}
    assert qrels == {"q1": {"d1": 1, "2": 2}}


def test_load_beir_errors_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_beir(tmp_path / "missing")
    bad_json = tmp_path / "a"
    _write_beir(bad_json, corpus_lines=[json.dumps({"_id": "d1", "text": "ok"}), "{not json"])
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2"):
        load_beir(bad_json)
    no_id = tmp_path / "b"
    _write_beir(no_id, corpus_lines=[json.dumps({"text": "no id"})])
    with pytest.raises(ValueError, match=r"corpus\.jsonl:1.*_id"):
        load_beir(no_id)
    bad_score = tmp_path / "c"
    _write_beir(bad_score, qrels_text="query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\thigh\n")
    with pytest.raises(ValueError, match=r"test\.tsv:3"):
        load_beir(bad_score)
    bad_cols = tmp_path / "d"
    _write_beir(bad_cols, qrels_text="query-id\tcorpus-id\tscore\nq1\td1\n")
    with pytest.raises(ValueError, match=r"test\.tsv:2.*3 tab-separated"):
        load_beir(bad_cols)
    with pytest.raises(FileNotFoundError, match=r"dev\.tsv"):
        load_beir(bad_cols, "dev")  # checked before the corpus is parsed
