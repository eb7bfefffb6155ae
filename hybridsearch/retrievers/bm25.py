"""BM25 channel over raw text, stored in a tantivy index.

Each document is identified by an integer ``docno`` that the engine assigns (not contiguous after
deletions). Scoring is tantivy's BM25 (k1 = 1.2, b = 0.75) over one indexed ``text`` field.

Analysis: which analyser sees which script
------------------------------------------
Every text, document or query, is first NFKC-normalised when it is not pure ASCII (full-width
Latin, half-width katakana and ligatures meet their ordinary forms); then each script has its
analyser, and the terms of both go into the same field:

* Latin, Greek, Cyrillic and every other script written with spaces: tantivy's simple tokenizer
  (maximal runs of Unicode alphanumeric characters), tokens over 40 bytes dropped, lowercased,
  Lucene's 33-word English stopword list (the one ``bm25s`` uses for ``"en"``), Snowball English
  stemmer. This is the analyser registered on the field. (A combining mark that is not
  alphabetic, such as a Devanagari virama, splits a word, in documents and queries alike.)
* Han (Chinese, kanji), Hiragana, Katakana, Hangul, Thai, Lao, Khmer, Myanmar: each maximal run of
  these characters is blanked out of the text above and becomes its overlapping character
  bigrams, made in Python. A document also gets every character of each run as a unigram, so
  that a one-character query can match inside a longer word; a query gets a run's bigrams, or the
  character itself for a one-character run. A document holding such text is handed to tantivy
  pre-tokenized (both kinds of terms), so the n-grams bypass the English filters.

Why: tantivy's default tokenizers take a run of Chinese or Thai as one word, which exceeds the
40-byte limit and is silently dropped, so such text never matched. Bigrams are the standard
dictionary-free answer (Lucene's CJK analyser does the same). Hangul is written with spaces but
glues particles onto words, so it gets bigrams too. Characters are code points: a Thai vowel sign
is a character of its own, identically for documents and queries. One field rather than one per
script because tantivy averages a field's length over all documents, also those without the
field: a separate CJK field in a mostly-English corpus would have a tiny average length and crush
every CJK document's score by length normalisation.

Queries are a bag of words, never query syntax: the query text goes through the same analysers and
becomes a boolean OR of term queries, so quotes, colons, parentheses, ``AND``, ``-`` or ``*`` in a
question neither fail nor change its meaning. A query left with no term returns no hits.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import unicodedata
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tantivy

from ..errors import IndexFormatError

__all__ = ["ENGLISH_STOPWORDS", "BM25Index", "analyze_query"]

FORMAT_VERSION = 1
META_FILE = "hybridsearch_bm25.json"
DOCNO, TEXT = "docno", "text"
# Versioned name: a future change of analysis gets a new name, and an old index fails loudly.
TEXT_ANALYZER = "hs_text_v1"
# Term frequencies are all BM25 needs; positions would only grow the index.
_INDEX_OPTION = "freq"

ENGLISH_STOPWORDS: tuple[str, ...] = (
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is",
    "it", "no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there",
    "these", "they", "this", "to", "was", "will", "with",
)  # fmt: skip
MAX_TOKEN_BYTES = 40

# Code points of the scripts written without spaces. Punctuation inside these blocks (Katakana
# middle dot, Thai/Khmer/Myanmar sentence marks, the baht sign) is left out so it separates runs.
_SPACELESS_RANGES: tuple[tuple[int, int], ...] = (
    (0x0E01, 0x0E3A), (0x0E40, 0x0E4E), (0x0E50, 0x0E59),  # Thai
    (0x0E81, 0x0EDF),  # Lao
    (0x1000, 0x1049), (0x1050, 0x109F), (0xA9E0, 0xA9FF), (0xAA60, 0xAA7F),  # Myanmar
    (0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xAC00, 0xD7FF),  # Hangul
    (0x1780, 0x17D3), (0x17D7, 0x17D7), (0x17DC, 0x17DD), (0x17E0, 0x17E9),  # Khmer
    (0x19E0, 0x19FF),  # Khmer symbols
    (0x2E80, 0x2FDF),  # CJK and Kangxi radicals
    (0x3005, 0x3007), (0x3021, 0x3029), (0x3038, 0x303B),  # iteration marks, Hangzhou numerals
    (0x3041, 0x309F),  # Hiragana
    (0x30A1, 0x30FA), (0x30FC, 0x30FF), (0x31F0, 0x31FF),  # Katakana, middle dot U+30FB excluded
    (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x323AF),  # Han
    (0xFF66, 0xFF9F),  # half-width Katakana (NFKC maps it; kept in case of odd input)
)  # fmt: skip
_SPACELESS_RUN = re.compile(
    "[" + "".join(f"\\U{a:08X}-\\U{b:08X}" for a, b in _SPACELESS_RANGES) + "]+"
)

# Over-fetch policy for ``allowed``: start with this many hits per wanted hit, then double.
_OVERFETCH_START = 4
# At most this many allowed docnos: filter inside tantivy with a docno term set instead.
_TERMSET_MAX = 4096
_WRITER_HEAP_PER_THREAD = 64_000_000
_WRITER_MAX_THREADS = 4


def _text_analyzer() -> tantivy.TextAnalyzer:
    return (
        # The simple tokenizer indexes about twice as fast as an equivalent regex tokenizer.
        tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
        .filter(tantivy.Filter.remove_long(MAX_TOKEN_BYTES))
        .filter(tantivy.Filter.lowercase())
        .filter(tantivy.Filter.custom_stopword(list(ENGLISH_STOPWORDS)))
        .filter(tantivy.Filter.stemmer("english"))
        .build()
    )


def _split_scripts(text: str, for_query: bool) -> tuple[str, list[str]]:
    """``(text for the English analyser, n-grams of the spaceless scripts)`` (module docstring).

    The text is NFKC-normalised; its spaceless-script runs are blanked out of the first part (the
    simple tokenizer would take a run as one word, counted twice or dropped as too long).
    """
    if text.isascii():  # the common English case: nothing to normalise or split
        return text, []
    text = unicodedata.normalize("NFKC", text)
    runs = _SPACELESS_RUN.findall(text)
    if not runs:
        return text, []
    grams: list[str] = []
    for run in runs:
        if len(run) == 1:
            grams.append(run)
            continue
        grams.extend(run[i : i + 2] for i in range(len(run) - 1))
        if not for_query:
            grams.extend(run)
    return _SPACELESS_RUN.sub(" ", text), grams


_TEXT_ANALYZER_SINGLETON: tantivy.TextAnalyzer | None = None


def analyze_query(query: str) -> list[str]:
    """The terms a query searches for: analysed words, then spaceless-script n-grams.

    Duplicates are kept: a term repeated in the query counts once per occurrence, as it would
    through a query parser.
    """
    global _TEXT_ANALYZER_SINGLETON
    if not isinstance(query, str):
        raise TypeError(f"a query must be a str, got {type(query).__name__}")
    if _TEXT_ANALYZER_SINGLETON is None:  # built lazily: importing must not do work
        _TEXT_ANALYZER_SINGLETON = _text_analyzer()
    text, grams = _split_scripts(query, for_query=True)
    return _TEXT_ANALYZER_SINGLETON.analyze(text) + grams


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _shadow_folder(path: Path) -> Path:
    """A temporary folder of symlinks to ``path``'s regular files (links were refused above)."""
    shadow = Path(tempfile.mkdtemp(prefix="hybridsearch-bm25-ro-"))
    with os.scandir(path) as entries:
        for e in entries:
            if e.is_file(follow_symlinks=False) and not e.name.endswith(".lock"):
                os.symlink(os.path.abspath(e.path), shadow / e.name)
    return shadow


def _schema() -> tantivy.Schema:
    sb = tantivy.SchemaBuilder()
    sb.add_integer_field(DOCNO, stored=True, indexed=True, fast=True)
    sb.add_text_field(TEXT, tokenizer_name=TEXT_ANALYZER, index_option=_INDEX_OPTION)
    return sb.build()


def _as_docnos(docnos, name: str = "docnos") -> np.ndarray:
    arr = np.asarray(docnos)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be >= 0, got {int(arr.min())}")
    return arr


class BM25Index:
    """A tantivy BM25 index of ``(docno, text)`` pairs; use :meth:`create`, :meth:`open` or
    :meth:`in_memory`, not the constructor.

    Writes (:meth:`add`, :meth:`delete`, :meth:`delete_from`) become visible to :meth:`search`
    at :meth:`commit`. One process may write to a folder at a time (tantivy holds a lock file
    while a writer is open); :meth:`close` releases it.
    """

    def __init__(self, index: tantivy.Index, schema: tantivy.Schema, folder: Path | None):
        self._index = index
        self._schema = schema
        self.folder = folder
        # Registered on every open: tantivy stores analyser names, not analysers.
        self._analyzer = _text_analyzer()
        index.register_tokenizer(TEXT_ANALYZER, self._analyzer)
        self._writer: tantivy.IndexWriter | None = None
        self._searcher = index.searcher()

    # ----------------------------------------------------------------- opening
    @classmethod
    def create(cls, folder: str | os.PathLike) -> BM25Index:
        """A new empty index in ``folder`` (created if missing; must not hold an index)."""
        path = Path(folder)
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"BM25 index folder {path} is a file")
        path.mkdir(parents=True, exist_ok=True)
        if tantivy.Index.exists(str(path)) or (path / META_FILE).exists():
            raise FileExistsError(f"{path} already holds an index; use BM25Index.open")
        schema = _schema()
        index = tantivy.Index(schema, path=str(path), reuse=False)
        meta = {"format_version": FORMAT_VERSION, "analyzer": TEXT_ANALYZER}
        (path / META_FILE).write_text(json.dumps(meta))
        return cls(index, schema, path)

    @classmethod
    def open(cls, folder: str | os.PathLike) -> BM25Index:
        """The index in ``folder``, as of its last commit.

        The folder is untrusted: it must be a real folder (not a link) and hold no links, so
        tantivy never reads or writes a file outside it.
        """
        path = Path(folder)
        if path.is_symlink():
            raise IndexFormatError(f"BM25 index folder {path} is a symbolic link; links are refused")
        if not path.is_dir():
            raise FileNotFoundError(f"BM25 index folder {path} does not exist")
        with os.scandir(path) as entries:
            for e in entries:
                if e.is_symlink():
                    raise IndexFormatError(f"{path / e.name} is a symbolic link; a BM25 index "
                                           "folder may not contain links")
        meta_path = path / META_FILE
        if not meta_path.exists() or not tantivy.Index.exists(str(path)):
            raise IndexFormatError(f"{path} holds no BM25 index (no {META_FILE} or tantivy meta)")
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as e:
            raise IndexFormatError(f"{meta_path} is not valid JSON: {e}") from e
        if meta.get("format_version") != FORMAT_VERSION:
            raise IndexFormatError(
                f"{meta_path}: format_version {meta.get('format_version')!r}, this version of "
                f"hybridsearch reads {FORMAT_VERSION}; rebuild the index"
            )
        where = path
        if not os.access(path, os.W_OK) or _read_only_fs(path):
            # tantivy creates a lock file to read; on read-only media it reads through a private
            # folder of links to the (immutable) files instead.
            where = _shadow_folder(path)
        if not tantivy.Index.is_compatible(str(where)):
            raise IndexFormatError(f"{path} was written by an unsupported tantivy version")
        index = tantivy.Index.open(str(where))
        b = cls(index, index.schema, path)
        if where is not path:
            b._shadow = weakref.finalize(b, shutil.rmtree, where, True)
        return b

    @classmethod
    def in_memory(cls) -> BM25Index:
        """An index held in RAM only (tests, throw-away corpora)."""
        schema = _schema()
        return cls(tantivy.Index(schema), schema, None)

    # ----------------------------------------------------------------- writing
    def _get_writer(self) -> tantivy.IndexWriter:
        if self._writer is None:
            threads = max(1, min(_WRITER_MAX_THREADS, os.cpu_count() or 1))
            self._writer = self._index.writer(
                heap_size=_WRITER_HEAP_PER_THREAD * threads, num_threads=threads
            )
        return self._writer

    def add(self, docnos: np.ndarray, texts: list[str]) -> None:
        """Queue documents ``texts[i]`` under ``docnos[i]``; visible after :meth:`commit`.

        Args:
            docnos: ``(n,)`` int64, >= 0, distinct, not already in the index (not checked
                against the index: the engine owns docno assignment).
            texts: ``n`` strings.
        """
        d = _as_docnos(docnos)
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
        if len(texts) != d.shape[0]:
            raise ValueError(f"{d.shape[0]} docnos but {len(texts)} texts")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
        if np.unique(d).shape[0] != d.shape[0]:
            raise ValueError("docnos contain duplicates")
        writer = self._get_writer()
        for docno, text in zip(d.tolist(), texts):
            t, grams = _split_scripts(text, for_query=False)
            doc = tantivy.Document()
            doc.add_integer(DOCNO, docno)
            if grams:
                # The words analysed by the registered analyser, then the n-grams verbatim.
                pre = self._analyzer.pre_tokenize(t)
                tokens = pre.tokens
                pos = len(tokens)
                tokens.extend(tantivy.Token(g, pos + j, 0, 0) for j, g in enumerate(grams))
                doc.add_pre_tokenized_text(TEXT, tantivy.PreTokenizedString(t, tokens))
            else:
                doc.add_text(TEXT, t)
            writer.add_document(doc)

    def delete(self, docnos: np.ndarray) -> None:
        """Queue the removal of ``docnos`` (``(m,)`` int64); unknown docnos are ignored."""
        d = _as_docnos(docnos)
        if d.size == 0:
            return
        writer = self._get_writer()
        if d.size == 1:
            writer.delete_documents_by_term(DOCNO, int(d[0]))
        else:
            q = tantivy.Query.term_set_query(self._schema, DOCNO, np.unique(d).tolist())
            writer.delete_documents_by_query(q)

    def delete_from(self, docno_min: int) -> None:
        """Queue the removal of every document with ``docno >= docno_min`` (crash recovery)."""
        if not isinstance(docno_min, (int, np.integer)) or isinstance(docno_min, bool):
            raise TypeError(f"docno_min must be an int, got {type(docno_min).__name__}")
        q = tantivy.Query.range_query(
            self._schema, DOCNO, tantivy.FieldType.Integer, lower_bound=int(docno_min)
        )
        self._get_writer().delete_documents_by_query(q)

    def commit(self) -> None:
        """Persist queued writes and make them visible to :meth:`search`."""
        if self._writer is not None:
            self._writer.commit()
        self.reload()

    def rollback(self) -> None:
        """Drop writes queued since the last commit."""
        if self._writer is not None:
            self._writer.rollback()

    def reload(self) -> None:
        """Take a fresh searcher on the last commit (also one made by another process)."""
        self._searcher = self.fresh_searcher()

    def fresh_searcher(self):
        """A searcher on the last commit. It keeps seeing that commit, whatever is written
        later: pass it to :meth:`search` for a fixed snapshot."""
        self._index.reload()
        return self._index.searcher()

    def has_docnos_from(self, docno_min: int) -> bool:
        """True when a committed document has ``docno >= docno_min``."""
        q = tantivy.Query.range_query(
            self._schema, DOCNO, tantivy.FieldType.Integer, lower_bound=int(docno_min)
        )
        return bool(self.fresh_searcher().search(q, limit=1, count=False).hits)

    def close(self) -> None:
        """Release the writer and the folder's lock once merges finish; uncommitted writes are
        dropped. The index stays searchable, and a later write opens a new writer."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.wait_merging_threads()

    def __enter__(self) -> BM25Index:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- reading
    @property
    def num_docs(self) -> int:
        """Live (committed, not deleted) documents."""
        return int(self._searcher.num_docs)

    def disk_bytes(self) -> int:
        """Bytes of all files in the index folder (0 in memory)."""
        if self.folder is None:
            return 0
        return sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())

    def _query(self, text: str) -> tantivy.Query | None:
        clauses = [
            (tantivy.Occur.Should, tantivy.Query.term_query(self._schema, TEXT, t, _INDEX_OPTION))
            for t in analyze_query(text)
        ]
        return tantivy.Query.boolean_query(clauses) if clauses else None

    @staticmethod
    def _fetch(searcher, query, offset: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """Hits ``offset .. offset + limit`` of tantivy's ranking: float32 scores, int64 docnos."""
        hits = searcher.search(query, limit=limit, offset=offset, count=False).hits
        if not hits:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        scores, addresses = zip(*hits)  # C-level unzip: cheaper than two generator passes
        docnos = searcher.fast_field_values(DOCNO, addresses)
        return np.array(scores, dtype=np.float32), np.array(docnos, dtype=np.int64)

    def search(
        self, queries: list[str], k: int, allowed: np.ndarray | None = None, *, threads: int = 1,
        searcher=None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` BM25 hits of each query, best first.

        Args:
            queries: ``nq`` strings, each a bag of words.
            k: hits per query, >= 1.
            allowed: optional ``(n,)`` bool indexed by docno; only docnos with ``allowed[d]``
                True are returned, docnos >= n count as not allowed. The result is exactly the
                top-``k`` of the allowed documents.
            threads: queries are spread over this many threads (tantivy releases the GIL while
                it searches); 1 searches in the calling thread.
            searcher: a searcher from :meth:`fresh_searcher` to search that snapshot (default:
                the one taken at the last commit or reload).

        Returns:
            ``(scores, docnos)``: ``(nq, k)`` float32 and ``(nq, k)`` int64, padded with 0 / -1.
        """
        if isinstance(queries, str) or not isinstance(queries, (list, tuple)):
            raise TypeError("queries must be a list of str")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        k = int(k)
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {threads!r}")
        if allowed is not None:
            allowed = np.asarray(allowed)
            if allowed.ndim != 1 or allowed.dtype != np.bool_:
                raise TypeError(
                    f"allowed must be a 1-D bool array, got {allowed.dtype} "
                    f"of shape {allowed.shape}"
                )
        nq = len(queries)
        out_s = np.zeros((nq, k), np.float32)
        out_d = np.full((nq, k), -1, np.int64)
        queries_t = [self._query(q) for q in queries]
        if searcher is None:
            searcher = self._searcher  # one snapshot for the whole batch, even if a commit lands

        restrict, first_page = None, k
        if allowed is not None:
            n_ok = int(np.count_nonzero(allowed))  # cheaper than flatnonzero on a large mask
            if n_ok == 0:
                return out_s, out_d
            if n_ok <= _TERMSET_MAX:
                # Few allowed docs: let tantivy intersect with them, no over-fetch needed.
                ids = np.flatnonzero(allowed).tolist()
                restrict = tantivy.Query.const_score_query(
                    tantivy.Query.term_set_query(self._schema, DOCNO, ids), 0.0
                )
                allowed = None
            else:
                # Expect about k / density hits to hold k allowed ones; ask for 4x that.
                density = min(1.0, n_ok / max(1, int(searcher.num_docs)))
                first_page = int(np.ceil(_OVERFETCH_START * k / density))

        def run(rows: range) -> None:
            # Each call writes only its own rows of the outputs, so threads need no lock.
            for i in rows:
                query = queries_t[i]
                if query is None:
                    continue
                if restrict is not None:
                    query = tantivy.Query.boolean_query(
                        [(tantivy.Occur.Must, query), (tantivy.Occur.Must, restrict)]
                    )
                if allowed is None:
                    s, d = self._fetch(searcher, query, 0, k)
                else:
                    s, d = self._search_filtered(searcher, query, k, allowed, first_page)
                out_s[i, : s.shape[0]] = s
                out_d[i, : d.shape[0]] = d

        threads = min(threads, nq)
        if threads <= 1:
            run(range(nq))
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(run, [range(t, nq, threads) for t in range(threads)]))
        return out_s, out_d

    def _search_filtered(self, searcher, query, k: int, allowed: np.ndarray, first_page: int):
        # Over-fetch pages of tantivy's ranking (first_page hits, then doubling) until k allowed
        # hits: exact, since the allowed top-k of the ranking is the allowed top-k of the first
        # pages that hold k allowed hits; one page when the mask is mostly True.
        got_s, got_d, n_ok = [], [], 0
        offset, limit = 0, first_page
        while True:
            s, d = self._fetch(searcher, query, offset, limit)
            keep = d < allowed.shape[0]
            keep[keep] = allowed[d[keep]]
            got_s.append(s[keep])
            got_d.append(d[keep])
            n_ok += int(keep.sum())
            if n_ok >= k or s.shape[0] < limit:
                break
            offset += limit
            limit *= 2
        return np.concatenate(got_s)[:k], np.concatenate(got_d)[:k]

    def __repr__(self) -> str:
        where = str(self.folder) if self.folder is not None else "memory"
        return f"BM25Index({where}, num_docs={self.num_docs})"
