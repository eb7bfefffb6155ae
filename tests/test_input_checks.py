"""Inputs the index cannot store or search are refused with a clear ValueError, before encoding."""

import math

import pytest

from hybridsearch import HybridIndex
from hybridsearch.index.filters import check_filter
from hybridsearch.index.hybrid import _check_docs, _check_query_inputs

BIG = 10**400


@pytest.fixture
def no_encoding(m3_encoder, monkeypatch):
    def refuse(*a, **kw):
        raise RuntimeError("the model ran")

    monkeypatch.setattr(m3_encoder, "encode_arrays", refuse)
    monkeypatch.setattr(m3_encoder, "encode", refuse)


@pytest.fixture
def index(tmp_path, m3_encoder):
    idx = HybridIndex.create(tmp_path / "idx", m3_encoder)
    idx.add([{"id": f"d{i}", "text": f"fox river {i}", "metadata": {"i": i}} for i in range(4)])
    yield idx
    idx.close()


@pytest.mark.parametrize("doc,fragment", [
    ({"id": "a", "text": "x", "metadata": {"n": 2**63}}, "metadata['n']: integer 9223372036854775808 is outside"),
    ({"id": "a", "text": "x", "metadata": {"n": -2**63 - 1}}, "outside the 64-bit range"),
    ({"id": "a", "text": "x", "metadata": {"n": 2**64}}, "outside the 64-bit range"),
    ({"id": "a", "text": "x", "metadata": {"n": [1, {"m": -BIG}]}}, "metadata['n'][1]['m']: integer -(about 401 digits)"),
    ({"id": "a", "text": "x", "metadata": {"f": math.inf}}, "inf is not a finite number"),
    ({"id": "a", "text": "x", "metadata": {"f": [math.nan]}}, "nan is not a finite number"),
    ({"id": "a", "text": "ab\ud800", "metadata": {}}, "the text contains a lone surrogate (U+D800) at position 2; "
                                                       "texts must be valid Unicode"),
    ({"id": "\udcff", "text": "x"}, "document 0: the id contains a lone surrogate (U+DCFF) at position 0"),
    ({"id": "a", "text": "x", "metadata": {"t": ["ok", "\udfff"]}}, "metadata['t'][1] contains a lone surrogate"),
    ({"id": "a", "text": "x", "metadata": {"\ud800": 1}}, "a field name contains a lone surrogate"),
])
def test_unstorable_documents_are_refused_before_encoding(index, no_encoding, doc, fragment):
    with pytest.raises(ValueError) as info:
        _check_docs([doc])
    assert fragment in str(info.value)
    generation = index.stats()["generation"]
    for op in (index.add, index.upsert):
        with pytest.raises(ValueError, match="lone surrogate|64-bit|finite"):
            op([{"id": "ok", "text": "fine"}, doc])
    assert len(index) == 4 and "ok" not in index and index.stats()["generation"] == generation


def test_storable_extremes_are_accepted(index):
    md = {"lo": -2**63, "hi": 2**63 - 1, "f": 1e308, "t": "😀 é 中", "b": True, "n": None, "l": [1, [2.5, "x"]]}
    assert index.add([{"id": "😀", "text": "emoji 😀 text", "metadata": md}]) == 1
    assert index.get("😀")["metadata"] == md
    hits = index.search("emoji", k=1, filter={"hi": 2**63 - 1, "lo": {"lte": -2**63}})
    assert [h.id for h in hits] == ["😀"]


@pytest.mark.parametrize("flt,fragment", [
    ({"i": BIG}, "filter on 'i': integer with about 401 digits is outside the 64-bit range"),
    ({"i": {"gte": 2**63}}, "integer 9223372036854775808 is outside"),
    ({"i": {"in": [1, -2**64]}}, "outside the 64-bit range"),
    ({"i": {"lt": math.inf}}, "inf is not a finite number"),
    ({"i": [math.nan]}, "nan is not a finite number"),
    ({"i": {"ne": {"x": BIG}}}, "outside the 64-bit range"),
])
def test_filters_with_unusable_numbers_are_refused(index, no_encoding, flt, fragment):
    with pytest.raises(ValueError) as info:
        check_filter(flt)
    assert fragment in str(info.value)
    with pytest.raises(ValueError, match="64-bit|finite"):
        index.search("fox", filter=flt)


@pytest.mark.parametrize("queries,weights,fragment", [
    ("", None, "the query is empty or blank"),
    (" \t\n", None, "the query is empty or blank"),
    (["fox", "  "], None, "query 1 is empty or blank"),
    ("fox \ud800", None, "the query contains a lone surrogate (U+D800) at position 4; texts must be valid Unicode"),
    (["ok", "\udfff"], None, "query 1 contains a lone surrogate (U+DFFF) at position 0"),
    ("fox", {"colbert": 1}, "this index has no colbert channel (it has: dense, bm25)"),
    ("fox", {"splade": 1}, "unknown channel 'splade'"),
    ("fox", {"dense": -1}, "finite number >= 0, got -1"),
    ("fox", {"dense": math.nan}, "got nan"),
    ("fox", {"dense": math.inf}, "got inf"),
    ("fox", {"dense": BIG}, "got (about 401 digits)"),
    ("fox", {"dense": True}, "got True"),
    ("fox", {"dense": "1"}, "got '1'"),
])
def test_check_query_inputs(queries, weights, fragment):
    with pytest.raises(ValueError) as info:
        _check_query_inputs(queries, weights, ("dense", "bm25"))
    assert fragment in str(info.value)


def test_check_query_inputs_accepts_good_inputs_and_refuses_wrong_types():
    _check_query_inputs("fox", None, ("dense",))
    _check_query_inputs(["fox", "é 😀"], {"dense": 0, "bm25": 2.5}, ("dense", "bm25"))
    for bad in ([], [1], None, {"q": 1}):
        with pytest.raises(TypeError):
            _check_query_inputs(bad, None, ("dense",))
    with pytest.raises(TypeError):
        _check_query_inputs("fox", [("dense", 1)], ("dense",))


def test_search_refuses_bad_queries_and_weights_before_encoding(index, no_encoding):
    for query, weights in [("  ", None), ("fox \ud800", None), ("fox", {"splade": 1}), ("fox", {"dense": -1})]:
        with pytest.raises(ValueError):
            index.search(query, weights=weights)


def test_search_takes_one_string_and_search_batch_a_list(index, no_encoding):
    # the return type never depends on the input's: a list to search() and a string to
    # search_batch() are refused before anything is encoded, each naming the other method
    for batch in (["fox"], ("fox", "dog"), []):
        with pytest.raises(TypeError, match="search_batch"):
            index.search(batch, k=3)
    for bad in (None, 3, b"fox", {"q": "fox"}):
        with pytest.raises(TypeError):
            index.search(bad, k=3)
    with pytest.raises(TypeError, match=r"use search\(\)"):
        index.search_batch("fox", k=3)
    for bad in ([], ["fox", 3], None, {"fox": 1}, b"fox"):
        with pytest.raises(TypeError):
            index.search_batch(bad, k=3)
    with pytest.raises(ValueError):  # the same checks as search(): a blank query in the batch
        index.search_batch(["fox", "  "], k=3)
