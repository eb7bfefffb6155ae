"""Reading document collections and splitting long documents into passages.

Corpus formats (:func:`read_corpus`):

* a BEIR ``corpus.jsonl``: one JSON object per line with ``_id``, ``title``, ``text``
  (and optionally ``metadata``);
* any JSONL file with ``id`` and ``text`` (optional ``title`` and ``metadata``, a dict);
* a folder of ``.txt`` / ``.md`` files, read recursively (hidden files and folders skipped);
  a document's id is its path relative to the folder, with ``/`` separators.

Passages (:func:`split_spans`, :func:`split_documents`) are windows of at most ``max_tokens``
tokens of the model's tokenizer, consecutive windows sharing about ``overlap`` tokens. Window
ends prefer a sentence end, then a word boundary, within the last quarter of the window; a
window never starts inside a word when it can avoid it. Every passage is an exact slice of the
original text (``text[char_start:char_end]``), without surrounding whitespace.

A document that fits one window gives one passage whose id is the document id; a longer one
gives ``DOCID#p0``, ``DOCID#p1``... (:func:`passage_ids`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .jsonl import iter_jsonl

__all__ = [
    "CorpusError", "Document", "Passage", "passage_ids", "read_corpus", "split_documents",
    "split_spans", "validate_corpus",
]

TEXT_SUFFIXES = (".txt", ".md")
_PASSAGE_SUFFIX = re.compile(r"#p\d+$")
_SENTENCE_END = frozenset(".!?;:。！？；：")


class CorpusError(ValueError):
    """A corpus file or folder that cannot be read; the message names the file (and line)."""


@dataclass
class Document:
    id: str
    text: str
    title: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # "file:line" or the file path, for messages


@dataclass
class Passage:
    id: str
    doc_id: str
    text: str  # == original document text[char_start:char_end]
    char_start: int
    char_end: int
    title: str = ""
    doc_metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def metadata(self) -> dict[str, Any]:
        """The document's own metadata plus ``doc_id``, ``char_start``, ``char_end``, ``title``."""
        md = dict(self.doc_metadata)
        md.update(doc_id=self.doc_id, char_start=self.char_start, char_end=self.char_end, title=self.title)
        return md

    def indexed_text(self, with_title: bool = True) -> str:
        """The text to index: ``title + "\\n" + text`` when there is a title (and ``with_title``).

        The passage body is always the suffix: ``indexed_text().endswith(text)``.
        """
        if with_title and self.title.strip():
            return f"{self.title.strip()}\n{self.text}" if self.text else self.title.strip()
        return self.text


# ------------------------------------------------------------------------------ readers


def read_corpus(path: str | Path) -> Iterator[Document]:
    """Yield the documents of a JSONL file or a folder of .txt/.md files, validating each.

    Raises :class:`CorpusError` (a ``ValueError``) naming the file and line of the first problem.
    Duplicate ids are only detected by :func:`validate_corpus`.
    """
    p = Path(path)
    if not p.exists():
        raise CorpusError(f"corpus {p} not found")
    if p.is_dir():
        yield from _read_folder(p)
    else:
        yield from _read_jsonl(p)


def validate_corpus(path: str | Path) -> int:
    """Read the whole corpus once, checking every record and that ids are unique.

    Also refuses a pair of ids ``X`` and ``X#p<N>``: the second could collide with a passage id
    of the first. Returns the number of documents (at least one).
    """
    seen: dict[str, str] = {}
    for doc in read_corpus(path):
        if doc.id in seen:
            raise CorpusError(f"{doc.source}: duplicate document id {doc.id!r} (first at {seen[doc.id]})")
        seen[doc.id] = doc.source
    if not seen:
        what = "no .txt or .md files" if Path(path).is_dir() else "no documents"
        raise CorpusError(f"corpus {path} holds {what}")
    for doc_id, source in seen.items():
        m = _PASSAGE_SUFFIX.search(doc_id)
        if m and doc_id[: m.start()] in seen:
            raise CorpusError(
                f"{source}: document id {doc_id!r} could collide with a passage id of document "
                f"{doc_id[: m.start()]!r} (passages are named ID#p0, ID#p1...); rename one of them"
            )
    return len(seen)


def _read_jsonl(path: Path) -> Iterator[Document]:
    for obj, where in iter_jsonl(path, CorpusError):
        yield _record(obj, where)


def _record(obj: Any, where: str) -> Document:
    if not isinstance(obj, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    key = "id" if "id" in obj else "_id"
    if key not in obj:
        raise CorpusError(f"{where}: missing the document id (an 'id' or '_id' field)")
    doc_id = obj[key]
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise CorpusError(f"{where}: field {key!r} must be a non-empty string, got {doc_id!r}")
    if "text" not in obj:
        raise CorpusError(f"{where}: missing the 'text' field (document {doc_id!r})")
    text = obj["text"]
    if not isinstance(text, str):
        raise CorpusError(f"{where}: field 'text' must be a string, got {type(text).__name__}")
    title = obj.get("title")
    if title is None:
        title = ""
    if not isinstance(title, str):
        raise CorpusError(f"{where}: field 'title' must be a string, got {type(title).__name__}")
    md = obj.get("metadata")
    if md is None:
        md = {}
    if not isinstance(md, dict):
        raise CorpusError(f"{where}: field 'metadata' must be an object, got {type(md).__name__}")
    try:
        json.dumps(md, allow_nan=False)
    except ValueError as e:
        raise CorpusError(f"{where}: metadata is not plain JSON ({e})") from None
    return Document(doc_id, text, title, md, where)


def _read_folder(root: Path) -> Iterator[Document]:
    files = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in TEXT_SUFFIXES and p.is_file():
            files.append(rel)
    for rel in sorted(files, key=lambda r: r.as_posix()):
        p = root / rel
        try:
            text = p.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            raise CorpusError(f"{p}: not valid UTF-8") from None
        except OSError as e:
            raise CorpusError(f"cannot read {p}: {e.strerror or e}") from None
        yield Document(rel.as_posix(), text, "", {}, str(p))


# ------------------------------------------------------------------------------ splitting


def passage_ids(doc_id: str, n: int) -> list[str]:
    """Ids of a document's ``n`` passages: ``[doc_id]`` for one, else ``doc_id#p0``..."""
    return [doc_id] if n == 1 else [f"{doc_id}#p{i}" for i in range(n)]


def split_spans(text: str, offsets: Sequence[tuple[int, int]], max_tokens: int,
                overlap: int = 0) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the passages of ``text``.

    Args:
        offsets: each token's ``(start, end)`` character offsets in ``text`` (a fast tokenizer's
            ``offset_mapping`` without special tokens), in order.
        max_tokens: most tokens per passage (>= 1).
        overlap: tokens shared by consecutive passages (0 <= overlap < max_tokens); a passage
            may start a few tokens earlier to avoid starting inside a word.

    Every span is stripped of surrounding whitespace; spans cover every token's characters.
    Returns ``[]`` for a text with no tokens (or only whitespace).
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not 0 <= overlap < max_tokens:
        raise ValueError(f"overlap must be >= 0 and smaller than max_tokens ({max_tokens}), got {overlap}")
    # Normalise: zero-width tokens take the end of the previous token, so that a window never
    # starts or ends at a position unrelated to its neighbours.
    starts, ends = [], []
    prev_end = 0
    for s, e in offsets:
        s, e = int(s), int(e)
        if e <= s:
            s = e = max(prev_end, min(s, len(text)))
        starts.append(s)
        ends.append(e)
        prev_end = max(prev_end, e)
    n = len(starts)
    if n == 0:
        return []
    end_max = []  # running max of token ends (offsets can overlap for byte-level tokens)
    m = 0
    for e in ends:
        m = max(m, e)
        end_max.append(m)

    def splittable(i: int) -> bool:  # token i shares no character with the tokens before it
        return i <= 0 or i >= n or starts[i] >= end_max[i - 1]

    def word_start(i: int) -> bool:
        if i <= 0 or i >= n:
            return True
        s = starts[i]
        if s < end_max[i - 1]:  # shares characters with the previous token (e.g. after a lone "▁")
            return False
        if s > end_max[i - 1]:
            return True
        return (s > 0 and text[s - 1].isspace()) or (s < len(text) and text[s].isspace())

    def sentence_end(i: int) -> bool:  # a sentence (or line) ends just before token i
        if i <= 0 or i >= n:
            return True
        e = end_max[i - 1]
        last = text[e - 1] if e > 0 else ""
        if last in "。！？；：":  # CJK punctuation needs no space after it
            return True
        if not word_start(i):
            return False
        return last in _SENTENCE_END or "\n" in text[e:starts[i]]

    windows = []
    a = b = 0
    while True:
        if n - a <= max_tokens:
            b = n
        else:
            hard = a + max_tokens
            # the end moves forward and leaves room for the overlap; prefer the latest sentence
            # end, then the latest word start, in the last quarter of the window
            lo = max(a + max(overlap + 1, max_tokens - max_tokens // 4), b + 1)
            b = next((i for i in range(hard, lo - 1, -1) if sentence_end(i)), None)
            if b is None:
                b = next((i for i in range(hard, lo - 1, -1) if word_start(i)), None)
            if b is None:
                b = next((i for i in range(hard, lo - 1, -1) if splittable(i)), hard)
        windows.append((a, b))
        if b == n:
            break
        nxt = b
        if overlap:
            # start `overlap` tokens back, or a little earlier at a word start, but not so early
            # that the next window could not choose its end among a quarter of its tokens past b
            nxt = b - overlap
            floor = max(a + 1, b + 1 + max_tokens // 4 - max_tokens, nxt - max(overlap, 8))
            j = nxt
            while j > floor and not word_start(j):
                j -= 1
            if word_start(j):
                nxt = j
            elif not splittable(nxt):  # never start inside a character shared by two tokens
                back = next((i for i in range(nxt - 1, floor - 1, -1) if splittable(i)), None)
                fwd = next((i for i in range(nxt + 1, b + 1) if splittable(i)), None)
                nxt = back if back is not None else (fwd if fwd is not None else nxt)
        a = max(nxt, a + 1)

    spans = []
    for a, b in windows:
        s, e = starts[a], end_max[b - 1]
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if e > s:
            spans.append((s, e))
    return spans


def split_documents(docs: Sequence[Document], tokenizer, max_tokens: int, overlap: int = 0, *,
                    room: int | None = None, with_title: bool = True) -> list[list[Passage]]:
    """Split each document into passages (one list per document, in order).

    Args:
        tokenizer: a Hugging Face *fast* tokenizer (offsets are needed).
        room: the most tokens a passage may have once the title is prepended (the model's
            passage length minus special and prefix tokens); each document's window is
            ``min(max_tokens, room - title tokens)``, but never less than half of ``room``.
        with_title: count the title's tokens against ``room`` (the title is indexed with each
            passage, see :meth:`Passage.indexed_text`).

    A document whose text is blank gives one passage holding only its title, or none at all
    when it has no title either.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("splitting needs a fast tokenizer (one with a tokenizer.json)")
    docs = list(docs)
    if not docs:
        return []
    enc = tokenizer([d.text for d in docs], return_offsets_mapping=True, add_special_tokens=False,
                    return_attention_mask=False, return_token_type_ids=False)
    title_len = [0] * len(docs)
    if with_title and room is not None:
        titled = [i for i, d in enumerate(docs) if d.title.strip()]
        if titled:
            t = tokenizer([docs[i].title.strip() + "\n" for i in titled], add_special_tokens=False,
                          return_attention_mask=False, return_token_type_ids=False)["input_ids"]
            for i, ids in zip(titled, t):
                title_len[i] = len(ids)
    out = []
    for d, offs, tl in zip(docs, enc["offset_mapping"], title_len):
        window = max_tokens
        if room is not None:
            window = max(1, min(max_tokens, max(room - tl, room // 2)))
        spans = split_spans(d.text, offs, window, overlap if overlap < window else window // 2)
        if not spans and d.title.strip():
            spans = [(0, 0)]
        ids = passage_ids(d.id, len(spans))
        out.append([Passage(pid, d.id, d.text[s:e], s, e, d.title, d.metadata)
                    for pid, (s, e) in zip(ids, spans)])
    return out


def batched(items: Iterable, n: int) -> Iterator[list]:
    """Lists of ``n`` consecutive items (the last one shorter)."""
    batch = []
    for x in items:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
