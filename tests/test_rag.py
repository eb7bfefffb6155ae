"""RAG helpers: Retriever / Passage / build_prompt, and the LangChain and LlamaIndex adapters
against the real packages (skipped when they are not installed)."""

import subprocess
import sys

import pytest

from hybridsearch import HybridIndex
from hybridsearch.rag import DEFAULT_TEMPLATE, Passage, Retriever, build_prompt, format_sources

DOCS = [
    {"id": "d1#0", "text": "The fox jumps over the dog near the river.",
     "metadata": {"doc_id": "d1", "title": "Fox", "lang": "en"}},
    {"id": "d1#1", "text": "The dog sleeps while the fox runs away.",
     "metadata": {"doc_id": "d1", "title": "Fox", "lang": "en"}},
    {"id": "d2", "text": "Dense retrieval ranks passages by vector similarity.", "metadata": {"lang": "en"}},
    {"id": "d3", "text": "BM25 ranking uses term frequency and document length.", "metadata": {"lang": "de"}},
    {"id": "d4", "text": "Water and light let plants make energy.", "metadata": {}},
]


@pytest.fixture(scope="module")
def index(tmp_path_factory, m3_encoder):
    idx = HybridIndex.create(tmp_path_factory.mktemp("rag") / "idx", m3_encoder)
    idx.add(DOCS)
    yield idx
    idx.close()


def test_retriever_returns_passages_like_search(index):
    r = Retriever(index, k=3)
    got = r.retrieve("fox dog river")
    hits = index.search("fox dog river", k=3)
    assert [p.id for p in got] == [h.id for h in hits]
    assert [p.score for p in got] == pytest.approx([h.score for h in hits])
    for p, h in zip(got, hits):
        assert isinstance(p, Passage)
        assert p.text == h.text and p.metadata == h.metadata and p.scores == h.scores
        assert p.doc_id == h.metadata.get("doc_id", h.id)
    by_id = {p.id: p for p in Retriever(index, k=5, mode="bm25").retrieve("fox dog ranking water")}
    assert by_id["d1#0"].doc_id == "d1" and by_id["d1#1"].doc_id == "d1"
    assert by_id["d3"].doc_id == "d3"
    with pytest.raises(AttributeError):  # frozen
        got[0].text = "x"


def test_retriever_options(index):
    r = Retriever(index, k=2, mode="dense", filter={"lang": "en"})
    assert len(r.retrieve("fox")) == 2
    assert {p.metadata["lang"] for p in r.retrieve("fox", k=5)} == {"en"}
    assert len(r.retrieve("fox", k=5)) == 3
    # a per-call option overrides the retriever's
    assert {p.id for p in r.retrieve("fox", k=5, filter={"lang": "de"})} == {"d3"}
    assert r("fox") == r.retrieve("fox")
    assert Retriever(index, k=3, fusion="rrf", candidates=10).retrieve("fox")
    with pytest.raises(TypeError, match="unknown search option"):
        Retriever(index, filters={"lang": "en"})
    with pytest.raises(ValueError, match="k must be"):
        Retriever(index, k=0)
    with pytest.raises(ValueError, match="unknown mode"):
        Retriever(index, mode="semantic")
    with pytest.raises(TypeError):
        Retriever("not an index")
    with pytest.raises(TypeError):
        r.retrieve(["a list"])


def _passage(i, text, **md):
    return Passage(text=text, metadata=md, doc_id=md.get("doc_id", i), id=i, score=1.0, scores={})


def test_build_prompt_numbers_sources():
    ps = [_passage("a", "Alpha text.", title="Alpha"), _passage("b#2", " Beta text. ", doc_id="b")]
    prompt = build_prompt("  What is alpha? ", ps)
    assert prompt.startswith(DEFAULT_TEMPLATE.split("{context}")[0])
    assert "[1] Alpha (a)\nAlpha text.\n\n[2] (b)\nBeta text." in prompt
    assert prompt.endswith("Question: What is alpha?\nAnswer:")
    assert "{context}" not in prompt and "{question}" not in prompt
    # custom template with other braces; placeholders inside the inputs are not expanded again
    tpl = 'Reply as JSON {"answer": ...}.\nQ: {question}\n{context}'
    out = build_prompt("why {context}?", [_passage("x", "has {question} inside")], tpl)
    assert out == 'Reply as JSON {"answer": ...}.\nQ: why {context}?\n[1] (x)\nhas {question} inside'
    assert "(no sources found)" in build_prompt("q", [])
    with pytest.raises(ValueError, match="context"):
        build_prompt("q", ps, "no placeholders {question}")


def test_build_prompt_budget():
    ps = [_passage(str(i), "x" * 50) for i in range(5)]
    full = format_sources(ps)
    assert full.count("\n\n") == 4
    two = format_sources(ps, max_chars=2 * len("[1] (0)\n" + "x" * 50) + 2)
    assert two.count("[") == 2 and "[3]" not in two
    one = format_sources(ps, max_chars=10)
    assert one == "[1] (0)\nxx"
    assert "[2]" not in build_prompt("q", ps, max_context_chars=80)


def test_importing_rag_does_not_import_frameworks():
    code = ("import sys, hybridsearch.rag, hybridsearch.rag.langchain, hybridsearch.rag.llamaindex; "
            "bad = [m for m in sys.modules if m.startswith(('langchain', 'llama_index'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_package_names_the_install_command(index, monkeypatch):
    import hybridsearch.rag.langchain as lc
    import hybridsearch.rag.llamaindex as li

    monkeypatch.setattr(lc, "_CLASS", None)
    monkeypatch.setattr(li, "_CLASS", None)
    monkeypatch.setitem(sys.modules, "langchain_core.retrievers", None)
    monkeypatch.setitem(sys.modules, "llama_index.core.retrievers", None)
    from hybridsearch.rag import as_langchain_retriever, as_llamaindex_retriever

    with pytest.raises(ImportError, match=r'pip install "hybridsearch\[langchain\]"'):
        as_langchain_retriever(index)
    with pytest.raises(ImportError, match=r'pip install "hybridsearch\[llamaindex\]"'):
        as_llamaindex_retriever(index)


def test_langchain_retriever(index):
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever

    from hybridsearch.rag import as_langchain_retriever

    r = as_langchain_retriever(index, k=3, filter={"lang": "en"})
    assert isinstance(r, BaseRetriever)
    docs = r.invoke("fox dog river")
    want = Retriever(index, k=3, filter={"lang": "en"}).retrieve("fox dog river")
    assert [d.metadata["id"] for d in docs] == [p.id for p in want]
    for d, p in zip(docs, want):
        assert isinstance(d, Document)
        assert d.page_content == p.text and d.id == p.id
        assert d.metadata["doc_id"] == p.doc_id and d.metadata["lang"] == "en"
        assert d.metadata["score"] == pytest.approx(p.score)
        assert set(d.metadata["scores"]) == {"dense", "sparse", "colbert", "bm25"}
    # batch and async go through LangChain's machinery
    assert [len(x) for x in r.batch(["fox", "water"])] == [3, 3]
    import asyncio

    assert len(asyncio.run(r.ainvoke("fox"))) == 3
    # a prepared Retriever works too
    r2 = as_langchain_retriever(Retriever(index, k=1, mode="bm25"))
    assert [d.id for d in r2.invoke("term frequency")] == ["d3"]
    with pytest.raises(TypeError):
        as_langchain_retriever(Retriever(index), filter={"lang": "en"})


def test_llamaindex_retriever(index):
    pytest.importorskip("llama_index.core")
    from llama_index.core.retrievers import BaseRetriever
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode

    from hybridsearch.rag import as_llamaindex_retriever

    r = as_llamaindex_retriever(index, k=3, mode="hybrid")
    assert isinstance(r, BaseRetriever)
    nodes = r.retrieve("fox dog river")
    want = Retriever(index, k=3).retrieve("fox dog river")
    assert [n.node.node_id for n in nodes] == [p.id for p in want]
    for n, p in zip(nodes, want):
        assert isinstance(n, NodeWithScore) and isinstance(n.node, TextNode)
        assert n.node.text == p.text and n.score == pytest.approx(p.score)
        assert n.node.ref_doc_id == p.doc_id
        assert n.node.metadata["scores"] == p.scores
        assert "scores" not in n.node.get_content(MetadataMode.LLM)
    assert [n.node.node_id for n in r.retrieve(QueryBundle("fox dog river"))] == [p.id for p in want]
    r2 = as_llamaindex_retriever(index, k=1, mode="bm25", filter={"lang": "de"})
    assert [n.node.node_id for n in r2.retrieve("ranking")] == ["d3"]
    import asyncio

    assert len(asyncio.run(r.aretrieve("fox"))) == 3
