"""BM25 over our own per-segment postings, scored by Numba with statistics taken at query time.

Each segment stores what BM25 needs of its documents and nothing that depends on the others:
term frequencies, document lengths and a per-term bound. The collection statistics -- the
number of documents ``N``, each query term's document frequency ``df`` and the average
document length -- are summed over the segments when a batch of queries is searched, so a
commit adds a segment and a deletion adds a tombstone without rewriting or rescoring anything.
(bm25s instead precomputes every score into one matrix and re-indexes on each change.)

Scoring is tantivy's BM25, so an index keeps its ranking when it moves from the tantivy channel
(:mod:`.bm25`) to this one: ``k1 = 1.2``, ``b = 0.75``,
``idf = ln(1 + (N - df + 0.5) / (df + 0.5))``, a document's length quantised to one byte the way
tantivy (and Lucene) store field norms (:data:`FIELDNORM_TABLE`; exact up to 23 tokens, then 3
significant bits), and per term occurrence of the query::

    score += idf * (1 + k1) * tf / (tf + k1 * (1 - b + b * fieldnorm(len) / avg_len))

in float32. ``N`` and the total length count every stored row, deleted ones included, until a
merge drops them (as tantivy and Lucene do): a deletion does not move other documents' scores.
Analysis is :mod:`.bm25`'s (:func:`document_terms`, :func:`.bm25.analyze_query`): the terms of a
document are exactly those the tantivy channel indexes, and a query term repeated counts once per
occurrence.

Files of one segment (plain ``.npy`` and one byte blob, never pickled; ``V`` terms, ``nnz``
postings, ``n`` rows):

* ``bm25_terms.bin``          UTF-8 bytes of the terms, concatenated in dictionary order;
* ``bm25_term_offsets.npy``   (V + 1,) int64 boundaries of each term in ``bm25_terms.bin``;
* ``bm25_term_hash.npy``      (V,) uint64 ascending 64-bit hashes of the terms' bytes (the
  docstore's id hash); the dictionary order. Distinct terms sharing a hash sit side by side, and
  a look-up compares the bytes, so a collision costs nothing but a comparison;
* ``bm25_indptr.npy``         (V + 1,) int64: term ``t`` owns postings ``indptr[t]:indptr[t+1]``;
* ``bm25_docs.npy``           (nnz,) int32 rows, strictly ascending within a term;
* ``bm25_tf.npy``             (nnz,) int32 term frequencies, >= 1;
* ``bm25_lengths.npy``        (n,) int32 document lengths in terms (the field norm's input);
* ``bm25_term_bound.npy``     (V, 2) int32: each term's largest tf and the smallest length of a
  document holding it. ``tf / (tf + k1 * (1 - b + b * fieldnorm(minlen) / avg))`` at the largest
  tf bounds every score of the term whatever the statistics, for pruning.

Search results follow :mod:`.sparse`'s conventions: ``(scores, rows)`` of shape ``(nq, k)``,
float32 and int64, best first, ties to the lower row, padded with ``0`` / ``-1``; a document is a
hit when it holds a query term and is allowed.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange

from ..errors import IndexFormatError
from .bm25 import _split_scripts, _text_analyzer, analyze_query
from .sparse import (BLOCK_DOCS, PARALLEL_MIN_POSTINGS, _check_allowed, _check_k, _heap_drain,
                     _heap_push, _merge_blocks, _readonly)

__all__ = ["B", "FIELDNORM_TABLE", "FILES", "K1", "Bm25Postings", "document_terms",
           "fieldnorm_ids", "merge_bm25", "reference_scores", "search"]

K1 = 1.2
B = 0.75
PREFIX = "bm25_"
FILES = tuple(PREFIX + n for n in ("terms.bin", "term_offsets.npy", "term_hash.npy", "indptr.npy",
                                   "docs.npy", "tf.npy", "lengths.npy", "term_bound.npy"))
MAX_LENGTH = (1 << 31) - 1


def _fieldnorm_table() -> np.ndarray:
    """The 256 lengths a field-norm byte stands for: Lucene's ``SmallFloat.byte4ToInt``, which
    tantivy uses too (0..23 exact, then 4 significant bits: 24 + (8 | low 3 bits) << shift)."""
    free = 24  # 255 - intToByte4(2**31 - 1)
    out = np.empty(256, np.int64)
    for code in range(256):
        if code < free:
            out[code] = code
            continue
        i = code - free
        bits, shift = i & 7, (i >> 3) - 1
        out[code] = free + (bits if shift < 0 else (bits | 8) << shift)
    return out


FIELDNORM_TABLE = _fieldnorm_table()


def fieldnorm_ids(lengths: np.ndarray) -> np.ndarray:
    """``(n,)`` uint8 field-norm code of each length: the largest table entry not above it."""
    lengths = np.asarray(lengths, np.int64)
    return (np.searchsorted(FIELDNORM_TABLE, lengths, side="right") - 1).astype(np.uint8)


_ANALYZER = None


def document_terms(text: str) -> list[str]:
    """The terms BM25 indexes for a document, with repeats, in the tantivy channel's analysis:
    analysed words, then spaceless-script bigrams and unigrams (:mod:`.bm25`)."""
    global _ANALYZER
    if _ANALYZER is None:  # built lazily: importing must not do work
        _ANALYZER = _text_analyzer()
    if not isinstance(text, str):
        raise TypeError(f"a document text must be a str, got {type(text).__name__}")
    t, grams = _split_scripts(text, for_query=False)
    return _ANALYZER.analyze(t) + grams if grams else _ANALYZER.analyze(t)


def _hash_terms(terms: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(hashes (V,) uint64, blob (B,) uint8, offsets (V + 1,) int64)`` of UTF-8 terms."""
    from ..index.docstore import hash_spans

    offsets = np.zeros(len(terms) + 1, np.int64)
    if terms:
        np.cumsum(np.fromiter(map(len, terms), np.int64, len(terms)), out=offsets[1:])
    blob = np.frombuffer(b"".join(terms), np.uint8)
    return hash_spans(blob, offsets), blob, offsets


# ----------------------------------------------------------------------------- scoring kernel


@njit(cache=True)
def _bm25_items(indptr, docs, tfs, norms, cache, q_indptr, q_idx, q_w, allowed, use_allowed,
                n_docs, block, n_blocks, item_lo, item_hi, out_s, out_i):
    """Score work items ``[item_lo, item_hi)``; item ``q * n_blocks + b`` is query ``q`` over the
    rows of block ``b``. A posting adds ``w * tf / (tf + cache[norms[row]])`` (float32, the
    query's entries in order). Writes each item's top-k into its output row."""
    k = out_s.shape[1]
    acc = np.zeros(block, np.float32)
    touched = np.empty(block, np.int32)
    hs = np.empty(k, np.float32)
    hi = np.empty(k, np.int64)
    max_terms = 0
    for item in range(item_lo, item_hi):
        q = item // n_blocks
        max_terms = max(max_terms, q_indptr[q + 1] - q_indptr[q])
    starts = np.empty(max_terms, np.int64)
    ends = np.empty(max_terms, np.int64)
    for item in range(item_lo, item_hi):
        q = item // n_blocks
        d_lo = (item % n_blocks) * block
        width = min(d_lo + block, n_docs) - d_lo
        e0 = q_indptr[q]
        n_terms = q_indptr[q + 1] - e0
        total = 0
        for e in range(n_terms):
            t = q_idx[e0 + e]
            p_lo = indptr[t]
            p_hi = indptr[t + 1]
            if n_blocks > 1:
                p_lo += np.searchsorted(docs[p_lo:p_hi], d_lo)
                p_hi = p_lo + np.searchsorted(docs[p_lo:p_hi], d_lo + width)
            starts[e] = p_lo
            ends[e] = p_hi
            total += p_hi - p_lo
        size = 0
        if total * 4 >= width:
            # Most rows touched: no bookkeeping, scan the block afterwards.
            for e in range(n_terms):
                w = q_w[e0 + e]
                for p in range(starts[e], ends[e]):
                    d = docs[p]
                    tf = np.float32(tfs[p])
                    acc[np.uint32(d - d_lo)] += w * (tf / (tf + cache[norms[d]]))
            for d in range(width):
                s = acc[d]
                if s <= 0.0 or (size == k and (s < hs[0] or (s == hs[0] and d_lo + d > hi[0]))):
                    continue
                if use_allowed and not allowed[d_lo + d]:
                    continue
                size = _heap_push(hs, hi, size, k, s, np.int64(d_lo + d))
            acc[:width] = 0.0
        else:
            n_touched = 0
            for e in range(n_terms):
                w = q_w[e0 + e]
                for p in range(starts[e], ends[e]):
                    d = docs[p]
                    tf = np.float32(tfs[p])
                    r = np.uint32(d - d_lo)
                    old = acc[r]
                    acc[r] = old + w * (tf / (tf + cache[norms[d]]))
                    # Every contribution is > 0: a row leaves 0 once, recorded once.
                    if old == 0.0:
                        touched[n_touched] = r
                        n_touched += 1
            for j in range(n_touched):
                d = touched[j]
                s = acc[d]
                acc[d] = 0.0
                if size == k and (s < hs[0] or (s == hs[0] and d_lo + d > hi[0])):
                    continue
                if use_allowed and not allowed[d_lo + d]:
                    continue
                size = _heap_push(hs, hi, size, k, s, np.int64(d_lo + d))
        _heap_drain(hs, hi, size, out_s[item], out_i[item])


@njit(cache=True, parallel=True)
def _bm25_parallel(indptr, docs, tfs, norms, cache, q_indptr, q_idx, q_w, allowed, use_allowed,
                   n_docs, block, n_blocks, n_chunks, out_s, out_i):
    n_items = out_s.shape[0]
    for c in prange(n_chunks):
        _bm25_items(indptr, docs, tfs, norms, cache, q_indptr, q_idx, q_w, allowed, use_allowed,
                    n_docs, block, n_blocks, c * n_items // n_chunks,
                    (c + 1) * n_items // n_chunks, out_s, out_i)


# ----------------------------------------------------------------------------- one segment


class Bm25Postings:
    """BM25 postings of one segment (module docstring); build with :meth:`from_texts`,
    :meth:`load` or :func:`merge_bm25`.

    Attributes: ``term_hash`` (V,) uint64, ``term_blob`` (B,) uint8, ``term_offsets`` (V + 1,)
    int64, ``indptr`` (V + 1,) int64, ``docs`` (nnz,) int32, ``tf`` (nnz,) int32, ``lengths``
    (n,) int32, ``term_bound`` (V, 2) int32; derived on construction: ``norms`` (n,) uint8
    field-norm codes and ``total_length`` (int, the sum of ``lengths``).
    """

    def __init__(self, term_hash, term_blob, term_offsets, indptr, docs, tf, lengths, term_bound):
        self.term_hash = _readonly(term_hash)
        self.term_blob = _readonly(term_blob)
        self.term_offsets = _readonly(term_offsets)
        self.indptr = _readonly(indptr)
        self.docs = _readonly(docs)
        self.tf = _readonly(tf)
        self.lengths = _readonly(lengths)
        self.term_bound = _readonly(term_bound)
        self.norms = _readonly(fieldnorm_ids(self.lengths))
        self.total_length = int(np.asarray(self.lengths).sum(dtype=np.int64))

    @property
    def n_docs(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def vocab_size(self) -> int:
        return int(self.term_hash.shape[0])

    # ------------------------------------------------------------------ building
    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> Bm25Postings:
        """Analyse ``texts`` (row ``i`` is ``texts[i]``) and build their postings."""
        return cls.from_terms(document_terms(t) for t in texts)

    @classmethod
    def from_terms(cls, docs_terms) -> Bm25Postings:
        """Build from each row's list of terms (repeats counted), an iterable of lists of str."""
        vocab: dict[str, int] = {}
        get = vocab.setdefault
        ids: list[int] = []
        lengths: list[int] = []
        for terms in docs_terms:
            lengths.append(len(terms))
            ids.extend([get(t, len(vocab)) for t in terms])
        n = len(lengths)
        if n >= 2**31:
            raise ValueError("a segment holds fewer than 2**31 documents")
        lens = np.array(lengths, np.int64)
        if lens.size and lens.max() > MAX_LENGTH:
            raise ValueError(f"a document has more than {MAX_LENGTH} terms")
        hashes, blob, offsets = _hash_terms([t.encode("utf-8") for t in vocab])
        order = np.argsort(hashes, kind="stable")  # dictionary order
        rank = np.empty(len(vocab), np.int64)
        rank[order] = np.arange(len(vocab))
        row = np.repeat(np.arange(n, dtype=np.int64), lens)
        key = rank[np.array(ids, np.int64)] * max(n, 1) + row
        del ids, row
        key, tf = np.unique(key, return_counts=True)  # sorted by (term, row)
        term = key // max(n, 1)
        docs = (key - term * max(n, 1)).astype(np.int32)
        del key
        indptr = np.zeros(len(vocab) + 1, np.int64)
        np.cumsum(np.bincount(term, minlength=len(vocab)), out=indptr[1:])
        new_off = np.zeros(len(vocab) + 1, np.int64)
        np.cumsum(np.diff(offsets)[order], out=new_off[1:])
        new_blob = (np.concatenate([blob[offsets[i]:offsets[i + 1]] for i in order])
                    if len(vocab) else np.zeros(0, np.uint8))
        tf = tf.astype(np.int32)
        bound = _term_bound(indptr, docs, tf, lens.astype(np.int32))
        return cls(hashes[order], new_blob, new_off, indptr, docs, tf, lens.astype(np.int32),
                   bound)

    def save(self, folder: str | os.PathLike) -> list[str]:
        """Write :data:`FILES` into ``folder`` (not fsynced); returns their names."""
        folder = Path(folder)
        arrays = (self.term_offsets, self.term_hash, self.indptr, self.docs, self.tf,
                  self.lengths, self.term_bound)
        with open(folder / FILES[0], "wb") as f:
            f.write(np.asarray(self.term_blob).tobytes())
        for name, a in zip(FILES[1:], arrays):
            np.save(folder / name, np.ascontiguousarray(a), allow_pickle=False)
        return list(FILES)

    # ------------------------------------------------------------------ opening
    @classmethod
    def load(cls, folder: str | os.PathLike, mmap: bool = True, *, n_docs: int | None = None,
             check_postings: bool = True) -> Bm25Postings:
        """Open :data:`FILES` of ``folder``, treating them as untrusted.

        Headers first (no links, dtypes, shapes, sizes; ``lengths`` (n,) with ``n == n_docs``
        when given), then O(V) checks of the offsets and hashes, then with ``check_postings``
        one chunked pass: rows in ``[0, n)`` ascending strictly within each term, tf >= 1,
        lengths >= 0. Every problem is an :class:`IndexFormatError` naming the file.
        """
        from ..index.storage import _open_nofollow, load_npy, npy_chunks, read_npy_header

        folder = Path(folder)
        p = {name: folder / name for name in FILES}
        for path in p.values():
            if not os.path.lexists(path):
                raise IndexFormatError(f"missing {path}")
        hash_shape, _, _ = read_npy_header(p["bm25_term_hash.npy"], np.uint64, (None,))
        v = hash_shape[0]
        read_npy_header(p["bm25_term_offsets.npy"], np.int64, (v + 1,))
        read_npy_header(p["bm25_indptr.npy"], np.int64, (v + 1,))
        read_npy_header(p["bm25_term_bound.npy"], np.int32, (v, 2))
        docs_shape, _, _ = read_npy_header(p["bm25_docs.npy"], np.int32, (None,))
        read_npy_header(p["bm25_tf.npy"], np.int32, docs_shape)
        len_shape, _, _ = read_npy_header(p["bm25_lengths.npy"], np.int32,
                                          (None if n_docs is None else int(n_docs),))
        n, nnz = len_shape[0], docs_shape[0]
        with _open_nofollow(p["bm25_terms.bin"]) as f:
            blob_size = os.fstat(f.fileno()).st_size
            blob = (np.memmap(f, np.uint8, mode="r") if mmap and blob_size
                    else np.frombuffer(f.read(), np.uint8))
        if blob.shape[0] != blob_size:
            raise IndexFormatError(f"index file corrupted: {p['bm25_terms.bin']} changed while read")
        offsets = load_npy(p["bm25_term_offsets.npy"], mmap=False, dtype=np.int64)
        if not (offsets[0] == 0 and offsets[-1] == blob_size
                and bool((offsets[1:] >= offsets[:-1]).all())):
            raise IndexFormatError(f"index file corrupted: {p['bm25_term_offsets.npy']} must start "
                                   f"at 0, never decrease and end at {blob_size} (the size of "
                                   f"{FILES[0]})")
        hashes = load_npy(p["bm25_term_hash.npy"], mmap=False, dtype=np.uint64)
        if v and not bool((hashes[1:] >= hashes[:-1]).all()):
            raise IndexFormatError(f"index file corrupted: {p['bm25_term_hash.npy']} must ascend")
        indptr = load_npy(p["bm25_indptr.npy"], mmap=False, dtype=np.int64)
        if not (indptr[0] == 0 and indptr[-1] == nnz and bool((indptr[1:] >= indptr[:-1]).all())):
            raise IndexFormatError(f"index file corrupted: {p['bm25_indptr.npy']} must start at 0, "
                                   f"never decrease and end at {nnz}")
        lengths = load_npy(p["bm25_lengths.npy"], mmap=False, dtype=np.int32)
        if n and lengths.min() < 0:
            raise IndexFormatError(f"index file corrupted: {p['bm25_lengths.npy']}: lengths must be "
                                   ">= 0")
        if check_postings and nnz:
            _check_rows(p["bm25_docs.npy"], indptr, n, npy_chunks)
            for a in npy_chunks(p["bm25_tf.npy"], np.int32):
                if a.min() < 1:
                    raise IndexFormatError(f"index file corrupted: {p['bm25_tf.npy']}: term "
                                           "frequencies must be >= 1")
        docs = load_npy(p["bm25_docs.npy"], mmap=mmap, dtype=np.int32)
        tf = load_npy(p["bm25_tf.npy"], mmap=mmap, dtype=np.int32)
        bound = load_npy(p["bm25_term_bound.npy"], mmap=False, dtype=np.int32)
        return cls(hashes, blob, offsets, indptr, docs, tf, lengths, bound)

    # ------------------------------------------------------------------ reading
    def lookup(self, terms: Sequence[str]) -> np.ndarray:
        """``(m,)`` int64 term ids of ``terms`` in this segment, -1 where absent."""
        out = np.full(len(terms), -1, np.int64)
        if not terms or not self.vocab_size:
            return out
        enc = [t.encode("utf-8") for t in terms]
        qh, _, _ = _hash_terms(enc)
        at = np.searchsorted(self.term_hash, qh)
        th, off, blob = self.term_hash, self.term_offsets, self.term_blob
        for i, (j, h, b) in enumerate(zip(at.tolist(), qh.tolist(), enc)):
            while j < th.shape[0] and th[j] == h:  # one entry, unless two terms share a hash
                if blob[off[j]:off[j + 1]].tobytes() == b:
                    out[i] = j
                    break
                j += 1
        return out

    def doc_freq(self, term_ids: np.ndarray) -> np.ndarray:
        """``(m,)`` int64 documents holding each term (0 for id -1)."""
        t = np.asarray(term_ids, np.int64)
        ok = t >= 0
        df = np.zeros(t.shape[0], np.int64)
        df[ok] = self.indptr[t[ok] + 1] - self.indptr[t[ok]]
        return df

    def search_ids(self, q_indptr, q_idx, q_w, cache, k: int, allowed=None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows for queries given as this segment's term ids (the kernel's input).

        ``q_indptr`` (nq + 1,) int64, ``q_idx`` (e,) int32 term ids, ``q_w`` (e,) float32 term
        weights ``idf * (1 + k1) * occurrences``, ``cache`` (256,) float32 ``k1 * (1 - b + b *
        FIELDNORM_TABLE / avg_len)``, ``allowed`` (n,) bool or None. Returns ``(nq, k)`` float32
        scores and int64 rows.
        """
        k = _check_k(k)
        allowed, use_allowed = _check_allowed(allowed, self.n_docs)
        nq = q_indptr.shape[0] - 1
        out_s = np.zeros((nq, k), np.float32)
        out_i = np.full((nq, k), -1, np.int64)
        if nq == 0 or self.n_docs == 0 or q_idx.shape[0] == 0:
            return out_s, out_i
        block = min(self.n_docs, BLOCK_DOCS)
        n_blocks = -(-self.n_docs // block)
        postings = int((self.indptr[q_idx + 1] - self.indptr[q_idx]).sum())
        args = (self.indptr, self.docs, self.tf, self.norms, _readonly(cache), _readonly(q_indptr),
                _readonly(q_idx), _readonly(q_w), _readonly(allowed), use_allowed, self.n_docs,
                block, n_blocks)
        part_s, part_i = (out_s, out_i) if n_blocks == 1 else (
            np.zeros((nq * n_blocks, k), np.float32), np.full((nq * n_blocks, k), -1, np.int64))
        n_items = nq * n_blocks
        threads = numba.get_num_threads()
        if threads == 1 or n_items == 1 or postings < PARALLEL_MIN_POSTINGS:
            _bm25_items(*args, 0, n_items, part_s, part_i)
        else:
            _bm25_parallel(*args, min(threads, n_items), part_s, part_i)
        if n_blocks > 1:
            _merge_blocks(part_s, part_i, n_blocks, out_s, out_i)
        return out_s, out_i

    def __repr__(self) -> str:
        return f"Bm25Postings(n_docs={self.n_docs}, terms={self.vocab_size}, postings={self.docs.shape[0]})"


def _check_rows(path, indptr: np.ndarray, n_docs: int, chunks) -> None:
    """Rows in ``[0, n_docs)``, strictly ascending within each posting list (one chunked pass)."""
    starts = indptr[1:-1]  # a posting may not exceed its predecessor only where a list starts
    pos, prev = 0, None
    for a in chunks(path, np.int32):
        if a.min() < 0 or a.max() >= n_docs:
            raise IndexFormatError(f"index file corrupted: {path}: rows must lie in [0, {n_docs})")
        bad = pos + 1 + np.flatnonzero(a[1:] <= a[:-1])
        if prev is not None and a[0] <= prev:
            bad = np.concatenate([[pos], bad])
        if bad.size:
            at = np.searchsorted(starts, bad)
            if not (at < starts.size).all() or not (starts[np.minimum(at, starts.size - 1)] == bad).all():
                raise IndexFormatError(f"index file corrupted: {path}: rows must ascend strictly "
                                       "within each posting list")
        prev = a[-1]
        pos += a.size


def _term_bound(indptr, docs, tf, lengths) -> np.ndarray:
    """(V, 2) int32: per term the largest tf and the smallest length of a document holding it."""
    v = indptr.shape[0] - 1
    bound = np.zeros((v, 2), np.int32)
    nz = np.flatnonzero(np.diff(indptr) > 0)
    if nz.size:
        bound[nz, 0] = np.maximum.reduceat(tf, indptr[nz])
        bound[nz, 1] = np.minimum.reduceat(lengths[docs], indptr[nz])
    return bound


# ----------------------------------------------------------------------------- many segments


def _statistics(segments, terms: list[str]):
    """Per segment the term ids of ``terms``; the idf weights ``idf * (1 + k1)`` (float32, 0 for
    terms in no segment) and the length cache (256,) float32, from statistics summed over
    ``segments``."""
    ids = [s.lookup(terms) for s in segments]
    df = np.zeros(len(terms), np.int64)
    for s, t in zip(segments, ids):
        df += s.doc_freq(t)
    n = sum(s.n_docs for s in segments)
    total = sum(s.total_length for s in segments)
    # float32 throughout, as tantivy computes them.
    f32 = np.float32
    x = ((np.float32(n) - df.astype(f32)) + f32(0.5)) / (df.astype(f32) + f32(0.5))
    idf = np.log(f32(1.0) + x).astype(f32)
    weight = np.where(df > 0, idf * f32(1.0 + K1), f32(0.0)).astype(f32)
    avg = f32(total) / f32(n) if n and total else f32(1.0)
    cache = (f32(K1) * (f32(1.0 - B) + f32(B) * FIELDNORM_TABLE.astype(f32) / avg)).astype(f32)
    return ids, weight, cache


def _analyze(queries) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """Distinct terms of a batch and, per query, ``(term index, occurrences)`` in first-seen
    order."""
    if isinstance(queries, str) or not isinstance(queries, (list, tuple)):
        raise TypeError("queries must be a list of str")
    index: dict[str, int] = {}
    per_query = []
    for q in queries:
        counts = Counter(analyze_query(q))
        per_query.append([(index.setdefault(t, len(index)), c) for t, c in counts.items()])
    return list(index), per_query


def search(segments: Sequence[Bm25Postings], queries: list[str], k: int,
           allowed: Sequence[np.ndarray | None] | None = None
           ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Top-``k`` BM25 hits of each query in each segment, scored with statistics summed over
    all ``segments`` (the module docstring).

    Args:
        segments: the postings of every segment of the collection (statistics come from all).
        queries: ``nq`` strings, each a bag of words.
        k: hits per query and segment, >= 1.
        allowed: None, or per segment None or an ``(n_docs,)`` bool mask of its rows.

    Returns:
        Per segment ``(scores, rows)``: ``(nq, k)`` float32 and int64 local rows, best first,
        padded with 0 / -1. Scores of different segments are comparable (merge them by score).
    """
    k = _check_k(k)
    terms, per_query = _analyze(queries)
    if allowed is None:
        allowed = [None] * len(segments)
    if len(allowed) != len(segments):
        raise ValueError(f"{len(segments)} segments but {len(allowed)} masks")
    ids, weight, cache = _statistics(segments, terms)
    out = []
    for s, local, mask in zip(segments, ids, allowed):
        q_indptr = np.zeros(len(per_query) + 1, np.int64)
        q_idx: list[int] = []
        q_w: list[float] = []
        for j, entries in enumerate(per_query):
            for ti, c in entries:
                if local[ti] >= 0:
                    q_idx.append(int(local[ti]))
                    q_w.append(weight[ti] * np.float32(c))
            q_indptr[j + 1] = len(q_idx)
        out.append(s.search_ids(q_indptr, np.array(q_idx, np.int32), np.array(q_w, np.float32),
                                cache, k, mask))
    return out


def reference_scores(docs_terms: Sequence[Sequence[str]], query: str, n_stats: int | None = None,
                     total_stats: int | None = None, df_docs=None) -> np.ndarray:
    """Plain-Python BM25 of one query against every document (float64), for tests.

    ``docs_terms``: each document's terms (:func:`document_terms`). The statistics are those of
    ``df_docs`` (default: the same documents; pass every stored document, deleted ones included,
    to match :func:`search` on several segments).
    """
    stats_docs = docs_terms if df_docs is None else df_docs
    n = len(stats_docs) if n_stats is None else n_stats
    total = sum(len(d) for d in stats_docs) if total_stats is None else total_stats
    avg = total / n if n and total else 1.0
    sets = [set(d) for d in stats_docs]
    out = np.zeros(len(docs_terms))
    for t in analyze_query(query):
        df = sum(t in s for s in sets)
        if df == 0:
            continue
        idf = math.log(1.0 + (n - df + 0.5) / (df + 0.5))
        for i, d in enumerate(docs_terms):
            tf = d.count(t)
            if tf:
                norm = K1 * (1 - B + B * FIELDNORM_TABLE[fieldnorm_ids([len(d)])[0]] / avg)
                out[i] += idf * (1 + K1) * tf / (tf + norm)
    return out


# ----------------------------------------------------------------------------- merging


@njit(cache=True)
def _merge_count(indptr, docs, tf, lengths, remap, tmap, counts, bound):
    for t in range(indptr.shape[0] - 1):
        m = tmap[t]
        for p in range(indptr[t], indptr[t + 1]):
            d = docs[p]
            if remap[d] >= 0:
                counts[m] += 1
                bound[m, 0] = max(bound[m, 0], tf[p])
                bound[m, 1] = min(bound[m, 1], lengths[d])


@njit(cache=True)
def _merge_fill(indptr, docs, tf, remap, tmap, fill, out_docs, out_tf):
    for t in range(indptr.shape[0] - 1):
        m = tmap[t]
        if m < 0:  # no kept row holds the term
            continue
        f = fill[m]
        for p in range(indptr[t], indptr[t + 1]):
            r = remap[docs[p]]
            if r >= 0:
                out_docs[f] = r
                out_tf[f] = tf[p]
                f += 1
        fill[m] = f


def merge_bm25(folder: str | os.PathLike, sources) -> list[str]:
    """Write the BM25 postings of the concatenation of ``sources`` into ``folder``, streaming.

    ``sources``: ``(Bm25Postings, rows)`` pairs, ``rows`` the kept rows (ascending) of each, in
    output order. Terms no kept row holds are dropped. Memory: the merged dictionary and one
    source's row map; postings are written through memory maps. Returns the file names (not
    fsynced).
    """
    from numpy.lib.format import open_memmap

    folder = Path(folder)
    merged: dict[bytes, int] = {}
    tmaps_raw = []
    for s, _ in sources:
        off, blob = np.asarray(s.term_offsets), np.asarray(s.term_blob)
        raw = blob.tobytes()
        tmaps_raw.append(np.array([merged.setdefault(raw[off[i]:off[i + 1]], len(merged))
                                   for i in range(s.vocab_size)], np.int64))
    terms = list(merged)
    hashes, blob, offsets = _hash_terms(terms)
    order = np.argsort(hashes, kind="stable")
    rank = np.empty(len(terms), np.int64)
    rank[order] = np.arange(len(terms))
    v = len(terms)
    counts = np.zeros(v, np.int64)
    bound = np.zeros((v, 2), np.int32)
    bound[:, 1] = MAX_LENGTH
    remaps, lengths, base = [], [], 0
    for (s, rows), tm in zip(sources, tmaps_raw):
        rows = np.asarray(rows, np.int64)
        remap = np.full(s.n_docs, -1, np.int32)
        remap[rows] = np.arange(base, base + rows.shape[0], dtype=np.int32)
        base += rows.shape[0]
        remaps.append(remap)
        lengths.append(np.asarray(s.lengths)[rows])
        _merge_count(s.indptr, s.docs, s.tf, s.lengths, remap, rank[tm] if tm.size else tm,
                     counts, bound)
    # Drop the terms no kept row holds; counts and bound are in dictionary order (by rank).
    keep = np.flatnonzero(counts > 0)
    kept_old = order[keep]  # merged ids of the kept terms, in dictionary order
    new_pos = np.full(v, -1, np.int64)
    new_pos[keep] = np.arange(keep.shape[0])
    counts = counts[keep]
    bound = bound[keep]
    indptr = np.zeros(kept_old.shape[0] + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    nnz = int(indptr[-1])
    t_off = np.zeros(kept_old.shape[0] + 1, np.int64)
    np.cumsum(np.diff(offsets)[kept_old], out=t_off[1:])
    with open(folder / FILES[0], "wb") as f:
        for i in kept_old.tolist():
            f.write(terms[i])
    np.save(folder / FILES[1], t_off, allow_pickle=False)
    np.save(folder / FILES[2], hashes[kept_old], allow_pickle=False)
    np.save(folder / FILES[3], indptr, allow_pickle=False)
    out_docs = open_memmap(folder / FILES[4], mode="w+", dtype=np.int32, shape=(nnz,))
    out_tf = open_memmap(folder / FILES[5], mode="w+", dtype=np.int32, shape=(nnz,))
    if nnz:
        fill = indptr[:-1].copy()
        for (s, _), remap, tm in zip(sources, remaps, tmaps_raw):
            if tm.size:
                _merge_fill(s.indptr, s.docs, s.tf, remap, new_pos[rank[tm]], fill, out_docs,
                            out_tf)
    out_docs.flush()
    out_tf.flush()
    del out_docs, out_tf
    all_len = np.concatenate([np.zeros(0, np.int32), *lengths]).astype(np.int32)
    np.save(folder / FILES[6], all_len, allow_pickle=False)
    np.save(folder / FILES[7], bound, allow_pickle=False)
    return list(FILES)
