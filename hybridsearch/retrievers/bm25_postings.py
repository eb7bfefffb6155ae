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
* ``bm25_impact.npy``         (nnz,) uint16 ``min(tf, 255) << 8 | fieldnorm code of the row``:
  what the kernel reads per posting (two bytes, no look-up into the rows); ``tf`` itself is read
  only where ``tf >= 32``;
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
import threading
from collections.abc import Iterable, Sequence
from itertools import accumulate
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange

from ..errors import IndexFormatError
from .bm25 import _split_scripts, _text_analyzer, analyze_query
from .sparse import (
    BLOCK_DOCS,
    PARALLEL_MIN_POSTINGS,
    _check_allowed,
    _check_k,
    _check_rows,
    _gallop,
    _heap_drain,
    _heap_push,
    _merge_blocks,
    _offer_touched,
    _readonly,
)

__all__ = ["B", "FIELDNORM_TABLE", "FILES", "K1", "Bm25Postings", "document_terms",
           "fieldnorm_ids", "merge_bm25", "reference_scores", "search"]

K1 = 1.2
B = 0.75
PREFIX = "bm25_"
FILES = tuple(PREFIX + n for n in ("terms.bin", "term_offsets.npy", "term_hash.npy", "indptr.npy",
                                   "docs.npy", "tf.npy", "impact.npy", "lengths.npy",
                                   "term_bound.npy"))
# Postings with tf below TABLE_TF read their factor tf / (tf + norm) from a per-search table of
# TABLE_TF * 256 float32 (32 KiB: stays in L1) instead of dividing.
TABLE_TF = 32
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

    offsets = np.fromiter(accumulate(map(len, terms), initial=0), np.int64, len(terms) + 1)
    blob = np.frombuffer(b"".join(terms), np.uint8)
    return hash_spans(blob, offsets), blob, offsets


class _QueryTerms:
    """A batch's distinct terms, hashed once for every segment: ``hashes`` (m,) uint64,
    ``blob`` (B,) uint8 and ``offsets`` (m + 1,) int64 of their UTF-8 bytes."""

    __slots__ = ("terms", "hashes", "blob", "offsets")

    def __init__(self, terms: Sequence[str]):
        self.terms = list(terms)
        self.hashes, self.blob, self.offsets = _hash_terms([t.encode("utf-8") for t in self.terms])


@njit(cache=True)
def _find_terms(term_hash, term_offsets, term_blob, indptr, q_hash, q_offsets, q_blob, ids, df):
    """For each query term ``i``: ``ids[i]``, its row in the segment's sorted ``term_hash``
    whose bytes equal the term's (left at -1 if none), and ``df[i]`` its posting count."""
    v = term_hash.shape[0]
    for i in range(q_hash.shape[0]):
        h = q_hash[i]
        lo, hi = 0, v
        while lo < hi:  # first entry >= h
            mid = (lo + hi) >> 1
            if term_hash[mid] < h:
                lo = mid + 1
            else:
                hi = mid
        a, n = q_offsets[i], q_offsets[i + 1] - q_offsets[i]
        j = lo
        while j < v and term_hash[j] == h:  # one entry, unless two terms share a hash
            b = term_offsets[j]
            if term_offsets[j + 1] - b == n:
                same = True
                for c in range(n):
                    if term_blob[b + c] != q_blob[a + c]:
                        same = False
                        break
                if same:
                    ids[i] = j
                    df[i] = indptr[j + 1] - indptr[j]
                    break
            j += 1


# ----------------------------------------------------------------------------- scoring kernel


@njit(cache=True, inline="always")
def _factor(impact, tfs, p, cache, table):
    """``tf / (tf + cache[code])`` of posting ``p``: from the table while tf < TABLE_TF."""
    key = impact[p]
    if key < table.shape[0]:
        return table[key]
    tf = np.float32(tfs[p])
    return tf / (tf + cache[key & 255])


@njit(cache=True)
def _offer_block(acc, width, d_lo, allowed, use_allowed, k, size, hs, hi):
    """Offer the block's allowed rows with a positive sum to the heap; returns its size. Once
    the heap is full, runs of 64 rows none of which beats its worst entry are skipped after one
    branch-free (vectorised) comparison: rows come in ascending order, so a tie loses too."""
    for c0 in range(0, width, 64):
        c1 = min(c0 + 64, width)
        if size == k:
            worst = hs[0]
            hit = False
            for d in range(c0, c1):
                hit |= acc[d] > worst
            if not hit:
                continue
        for d in range(c0, c1):
            s = acc[d]
            if s <= 0.0 or (size == k and (s < hs[0] or (s == hs[0] and d_lo + d > hi[0]))):
                continue
            if use_allowed and not allowed[d_lo + d]:
                continue
            size = _heap_push(hs, hi, size, k, s, np.int64(d_lo + d))
    return size


@njit(cache=True)
def _kth_with(hs, hi, size, k, acc, touched, n_touched, d_lo, allowed, use_allowed, ths, thi):
    """The k-th best of the heap's entries and the block's partial sums (0.0 while fewer than
    ``k``): partial sums only grow, so it is a lower bound of the final k-th score."""
    ths[:size] = hs[:size]
    thi[:size] = hi[:size]
    t = size
    for j in range(n_touched):
        d = touched[j]
        s = acc[d]
        if t == k and s <= ths[0]:
            continue
        if use_allowed and not allowed[d_lo + d]:
            continue
        t = _heap_push(ths, thi, t, k, s, np.int64(d_lo + d))
    return np.float64(ths[0]) if t == k else 0.0


@njit(cache=True)
def _bm25_items(indptr, docs, impact, tfs, cache, table, q_indptr, q_idx, q_w, q_ub, allowed,
                use_allowed, prune, n_docs, block, n_parts, item_lo, item_hi, out_s, out_i, acc,
                touched, cand):
    """Score work items ``[item_lo, item_hi)``; item ``q * n_parts + j`` is query ``q`` over the
    blocks ``b`` of ``block`` rows with ``b % n_parts == j``, whose top-k (k = out_s.shape[1])
    goes to output row ``item``. A posting adds ``w * tf / (tf + cache[code])`` (float32).

    A query's entries are scored shortest list first (rare terms, the largest idf), term at a
    time. With ``prune``, a block is skipped when the bounds of the entries with postings in it
    sum below the k-th score held; before each next list that holds more postings than twice the rows
    touched so far, the k-th best score so far (heap and partial sums) is compared with the
    bounds ``q_ub`` of the entries left: when they sum below it, no untouched row can enter
    the top-k, so the rest of the lists are only searched for the touched rows whose partial
    sum plus those bounds can still reach it (MaxScore, term at a time), and such rows are
    dropped as the bounds left shrink. Sums are added in the same order either way, so the
    scores are the same float32 numbers with or without pruning.

    Scratch: ``acc`` float32 (all zero on entry, left so), ``touched`` and ``cand`` int32,
    ``block`` entries each."""
    k = out_s.shape[1]
    hs = np.empty(k, np.float32)
    hi = np.empty(k, np.int64)
    ths = np.empty(k, np.float32)
    thi = np.empty(k, np.int64)
    max_terms = 0
    for item in range(item_lo, item_hi):
        q = item // n_parts
        max_terms = max(max_terms, q_indptr[q + 1] - q_indptr[q])
    starts = np.empty(max_terms, np.int64)
    ends = np.empty(max_terms, np.int64)
    lens = np.empty(max_terms, np.int64)
    n_blocks = -(-n_docs // block)
    for item in range(item_lo, item_hi):
        q = item // n_parts
        e0 = q_indptr[q]
        n_terms = q_indptr[q + 1] - e0
        slack = 1.0 + (n_terms + 2) * 2.0 ** -20
        for e in range(n_terms):
            t = q_idx[e0 + e]
            lens[e] = indptr[t + 1] - indptr[t]
        order = np.argsort(lens[:n_terms], kind="mergesort")
        size = 0
        for b in range(item % n_parts, n_blocks, n_parts):
            d_lo = b * block
            width = min(d_lo + block, n_docs) - d_lo
            left = 0
            for e in range(n_terms):
                t = q_idx[e0 + e]
                p_lo = indptr[t]
                p_hi = indptr[t + 1]
                if n_blocks > 1:
                    p_lo += np.searchsorted(docs[p_lo:p_hi], d_lo)
                    p_hi = p_lo + np.searchsorted(docs[p_lo:p_hi], d_lo + width)
                starts[e] = p_lo
                ends[e] = p_hi
                left += p_hi - p_lo
            rest = 0.0  # bound of what the block's lists can still add
            for e in range(n_terms):
                if ends[e] > starts[e]:
                    rest += q_ub[e0 + e]
            if prune and size == k and rest * slack < hs[0]:
                continue  # no row of the block can enter (a tie loses: its row is larger)
            n_touched = 0
            n_cand = -1  # -1: every row can still enter; else cand[:n_cand] can
            theta = 0.0
            for oi in range(n_terms):
                e = order[oi]
                w = q_w[e0 + e]
                n_post = ends[e] - starts[e]
                if prune and n_cand < 0 and oi > 0 and left > 2 * n_touched:
                    theta = _kth_with(hs, hi, size, k, acc, touched, n_touched, d_lo, allowed,
                                      use_allowed, ths, thi)
                    if theta > 0.0 and rest * slack < theta:
                        n_cand = 0
                        for j in range(n_touched):
                            d = touched[j]
                            if (acc[d] + rest) * slack >= theta and not (
                                    use_allowed and not allowed[d_lo + d]):
                                cand[n_cand] = d
                                n_cand += 1
                        cand[:n_cand].sort()
                left -= n_post
                if n_post > 0:
                    rest -= q_ub[e0 + e]
                if n_cand < 0:
                    for p in range(starts[e], ends[e]):
                        r = np.uint32(docs[p] - d_lo)
                        old = acc[r]
                        acc[r] = old + w * _factor(impact, tfs, p, cache, table)
                        # Every contribution is > 0: a row leaves 0 once, recorded once.
                        if old == 0.0:
                            touched[n_touched] = r
                            n_touched += 1
                    continue
                p = starts[e]
                m = 0
                for j in range(n_cand):
                    d = cand[j]
                    p = _gallop(docs, p, ends[e], d_lo + d)
                    if p < ends[e] and docs[p] == d_lo + d:
                        acc[d] += w * _factor(impact, tfs, p, cache, table)
                    if (acc[d] + rest) * slack >= theta:
                        cand[m] = d
                        m += 1
                n_cand = m
            if n_cand >= 0:
                for j in range(n_cand):
                    d = cand[j]
                    s = acc[d]
                    if size == k and (s < hs[0] or (s == hs[0] and d_lo + d > hi[0])):
                        continue
                    size = _heap_push(hs, hi, size, k, s, np.int64(d_lo + d))
                for j in range(n_touched):
                    acc[touched[j]] = 0.0
            elif n_touched * 4 >= width:
                size = _offer_block(acc, width, d_lo, allowed, use_allowed, k, size, hs, hi)
                acc[:width] = 0.0
            else:
                size = _offer_touched(acc, touched, n_touched, d_lo, allowed, use_allowed, k, size, hs, hi)
        _heap_drain(hs, hi, size, out_s[item], out_i[item])


@njit(cache=True, parallel=True)
def _bm25_parallel(indptr, docs, impact, tfs, cache, table, q_indptr, q_idx, q_w, q_ub, allowed,
                   use_allowed, prune, n_docs, block, n_parts, n_chunks, out_s, out_i, acc,
                   touched, cand):
    n_items = out_s.shape[0]
    for c in prange(n_chunks):
        _bm25_items(indptr, docs, impact, tfs, cache, table, q_indptr, q_idx, q_w, q_ub,
                    allowed, use_allowed, prune, n_docs, block, n_parts,
                    c * n_items // n_chunks, (c + 1) * n_items // n_chunks, out_s, out_i,
                    acc[c], touched[c], cand[c])


_local = threading.local()


def _scratch(n_chunks: int, width: int):
    """``(acc, touched, cand)`` scratch, ``(n_chunks, width)`` each, kept per calling thread:
    allocating and first touching 64k-entry buffers costs more than a small query. The kernel
    leaves ``acc`` zero; it is zeroed again only if the last call did not finish."""
    arrays = getattr(_local, "arrays", None)
    if arrays is None or arrays[0].shape[0] < n_chunks or arrays[0].shape[1] < width:
        arrays = (np.zeros((n_chunks, width), np.float32), np.empty((n_chunks, width), np.int32),
                  np.empty((n_chunks, width), np.int32))
        _local.arrays = arrays
    elif not getattr(_local, "clean", True):
        arrays[0][:] = 0.0
    _local.clean = False
    return tuple(x[:n_chunks, :width] for x in arrays)


_TABLES: dict[float, tuple[np.ndarray, np.ndarray]] = {}


def _tables(avg: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """``(cache (256,), table (TABLE_TF * 256,))`` float32 for an average length: ``cache[c] =
    k1 * (1 - b + b * FIELDNORM_TABLE[c] / avg)`` and ``table[tf << 8 | c] = tf / (tf +
    cache[c])``, computed in float32 as the kernel would. Kept for the last few averages."""
    got = _TABLES.get(float(avg))
    if got is None:
        f32 = np.float32
        cache = (f32(K1) * (f32(1.0 - B) + f32(B) * FIELDNORM_TABLE.astype(f32) / avg)).astype(f32)
        tf = np.arange(TABLE_TF, dtype=f32)[:, None]
        table = (tf / (tf + cache[None, :])).astype(f32).ravel()
        got = (_readonly(cache), _readonly(table))
        if len(_TABLES) > 16:
            _TABLES.clear()
        _TABLES[float(avg)] = got
    return got


# ----------------------------------------------------------------------------- one segment


class Bm25Postings:
    """BM25 postings of one segment (module docstring); build with :meth:`from_texts`,
    :meth:`load` or :func:`merge_bm25`.

    Attributes: ``term_hash`` (V,) uint64, ``term_blob`` (B,) uint8, ``term_offsets`` (V + 1,)
    int64, ``indptr`` (V + 1,) int64, ``docs`` (nnz,) int32, ``tf`` (nnz,) int32, ``impact``
    (nnz,) uint16, ``lengths`` (n,) int32, ``term_bound`` (V, 2) int32; derived on
    construction: ``total_length`` (int, the sum of ``lengths``).
    """

    def __init__(self, term_hash, term_blob, term_offsets, indptr, docs, tf, impact, lengths,
                 term_bound):
        self.term_hash = _readonly(term_hash)
        self.term_blob = _readonly(term_blob)
        self.term_offsets = _readonly(term_offsets)
        self.indptr = _readonly(indptr)
        self.docs = _readonly(docs)
        self.tf = _readonly(tf)
        self.impact = _readonly(impact)
        self.lengths = _readonly(lengths)
        self.term_bound = _readonly(term_bound)
        self.total_length = int(np.asarray(self.lengths).sum(dtype=np.int64))

    @property
    def n_docs(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def vocab_size(self) -> int:
        return int(self.term_hash.shape[0])

    # ------------------------------------------------------------------ building
    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> Bm25Postings:
        """Analyse ``texts`` (row ``i`` is the ``i``-th; any iterable) and build their postings."""
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
        lens = lens.astype(np.int32)
        bound = _term_bound(indptr, docs, tf, lens)
        return cls(hashes[order], new_blob, new_off, indptr, docs, tf,
                   _impact(tf, fieldnorm_ids(lens)[docs]), lens, bound)

    def save(self, folder: str | os.PathLike) -> list[str]:
        """Write :data:`FILES` into ``folder`` (not fsynced); returns their names."""
        folder = Path(folder)
        arrays = (self.term_offsets, self.term_hash, self.indptr, self.docs, self.tf,
                  self.impact, self.lengths, self.term_bound)
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
        impacts equal to what tf and the row's length give, lengths >= 0. Every problem is an :class:`IndexFormatError` naming the file.
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
        read_npy_header(p["bm25_impact.npy"], np.uint16, docs_shape)
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
            codes = fieldnorm_ids(lengths)
            for d, a, m in zip(npy_chunks(p["bm25_docs.npy"], np.int32),
                               npy_chunks(p["bm25_tf.npy"], np.int32),
                               npy_chunks(p["bm25_impact.npy"], np.uint16)):
                if a.min() < 1:
                    raise IndexFormatError(f"index file corrupted: {p['bm25_tf.npy']}: term "
                                           "frequencies must be >= 1")
                if not np.array_equal(m, _impact(a, codes[d])):
                    raise IndexFormatError(f"index file corrupted: {p['bm25_impact.npy']} "
                                           "disagrees with the term frequencies and lengths")
        docs = load_npy(p["bm25_docs.npy"], mmap=mmap, dtype=np.int32)
        tf = load_npy(p["bm25_tf.npy"], mmap=mmap, dtype=np.int32)
        impact = load_npy(p["bm25_impact.npy"], mmap=mmap, dtype=np.uint16)
        bound = load_npy(p["bm25_term_bound.npy"], mmap=False, dtype=np.int32)
        # The bounds decide what pruning skips: one understated would drop true hits silently.
        if check_postings and not np.array_equal(bound, _term_bound(indptr, docs, tf, lengths)):
            raise IndexFormatError(f"index file corrupted: {p['bm25_term_bound.npy']} disagrees "
                                   "with the postings")
        return cls(hashes, blob, offsets, indptr, docs, tf, impact, lengths, bound)

    # ------------------------------------------------------------------ reading
    def find(self, qt: _QueryTerms) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, df)``, ``(m,)`` int64 each, of hashed query terms: the term id in this
        segment (-1 where absent) and the documents holding it (0 where absent). One kernel
        call: the hash search and the byte check of every term (two terms may share a hash)."""
        m = qt.hashes.shape[0]
        ids, df = np.full(m, -1, np.int64), np.zeros(m, np.int64)
        if m and self.vocab_size:
            _find_terms(self.term_hash, self.term_offsets, self.term_blob, self.indptr, qt.hashes,
                        qt.offsets, qt.blob, ids, df)
        return ids, df

    def search_ids(self, q_indptr, q_idx, q_w, avg, k: int, allowed=None, *,
                   prune: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows for queries given as this segment's term ids (the kernel's input).

        ``q_indptr`` (nq + 1,) int64, ``q_idx`` (e,) int32 term ids, ``q_w`` (e,) float32 term
        weights ``idf * (1 + k1) * occurrences`` (> 0), ``avg`` the collection's average length
        (float32), ``allowed`` (n,) bool or None; ``prune`` False reads every posting (same
        results). Returns ``(nq, k)`` float32 scores and int64 rows.
        """
        k = _check_k(k)
        allowed, use_allowed = _check_allowed(allowed, self.n_docs)
        nq = q_indptr.shape[0] - 1
        out_s = np.zeros((nq, k), np.float32)
        out_i = np.full((nq, k), -1, np.int64)
        if nq == 0 or self.n_docs == 0 or q_idx.shape[0] == 0:
            return out_s, out_i
        cache, table = _tables(np.float32(avg))
        ip = self.indptr
        # Each entry's largest possible contribution: its largest tf in its shortest document.
        q_ub = np.empty(q_idx.shape[0], np.float64)
        postings = _entry_bounds(ip, self.term_bound, cache, FIELDNORM_TABLE, q_idx, q_w, q_ub)
        block = min(self.n_docs, BLOCK_DOCS)
        n_blocks = -(-self.n_docs // block)
        threads = numba.get_num_threads() if postings >= PARALLEL_MIN_POSTINGS else 1
        parallel = threads > 1
        # Without pruning, one query alone is split over the threads by blocks (each part keeps
        # its own top-k). Pruned, it stays on one thread: it reads a small share of the postings
        # (a 1M-doc query: 0.9 ms on one thread, 10 ms split over two on a busy 2-core machine,
        # each part pruning with a weaker k-th score of its own).
        n_parts = (max(1, min(threads, n_blocks)) if parallel and nq < threads and not prune
                   else 1)
        n_items = nq * n_parts
        n_chunks = min(threads, n_items) if parallel else 1
        part_s, part_i = (out_s, out_i) if n_parts == 1 else (
            np.zeros((n_items, k), np.float32), np.full((n_items, k), -1, np.int64))
        args = (ip, self.docs, self.impact, self.tf, cache, table, q_indptr, q_idx, q_w,
                _readonly(q_ub), allowed, use_allowed, bool(prune), self.n_docs, block, n_parts)
        acc, touched, cand = _scratch(n_chunks, block)
        if n_chunks == 1:
            _bm25_items(*args, 0, n_items, part_s, part_i, acc[0], touched[0], cand[0])
        else:
            _bm25_parallel(*args, n_chunks, part_s, part_i, acc, touched, cand)
        _local.clean = True
        if n_parts > 1:
            _merge_blocks(part_s, part_i, n_parts, out_s, out_i)
        return out_s, out_i

    def __repr__(self) -> str:
        return f"Bm25Postings(n_docs={self.n_docs}, terms={self.vocab_size}, postings={self.docs.shape[0]})"


def _impact(tf: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """(nnz,) uint16 ``min(tf, 255) << 8 | code`` of postings with frequencies ``tf`` in rows of
    field-norm codes ``codes``."""
    return (np.minimum(tf, 255).astype(np.uint16) << 8) | codes.astype(np.uint16)


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


def collection_stats(segments, terms: list[str]) -> tuple[int, int, np.ndarray]:
    """``(N, total length, df)`` of ``terms`` summed over ``segments``: what BM25 needs from a
    collection. Several collections (the shards of a sharded index) add theirs up and pass the
    sums to :func:`search` as ``stats``, so every shard scores as one index would."""
    qt = _QueryTerms(terms)
    df = np.zeros(len(terms), np.int64)
    for s in segments:
        df += s.find(qt)[1]
    return (sum(s.n_docs for s in segments), sum(s.total_length for s in segments), df)


def query_terms(queries) -> list[str]:
    """The distinct analysed terms of a batch of queries, in the order :func:`search` uses."""
    return _analyze(queries)[0]


def _statistics(segments, terms: list[str], stats=None):
    """``(ids, weight, avg)``: per segment the term ids of ``terms`` ((m,) int64, -1 where
    absent); ``idf * (1 + k1)`` of each term ((m,) float32, 0 for terms in no segment); the
    average length (float32), from statistics summed over ``segments``, or from ``stats``
    (``(N, total length, df)`` as :func:`collection_stats` gives them) when given."""
    qt = _QueryTerms(terms)
    found = [s.find(qt) for s in segments]
    ids = [f[0] for f in found]
    if stats is None:
        df = np.zeros(len(terms), np.int64)
        for f in found:
            df += f[1]
        n = sum(s.n_docs for s in segments)
        total = sum(s.total_length for s in segments)
    else:
        n, total, df = int(stats[0]), int(stats[1]), np.asarray(stats[2], np.int64)
        if n < 0 or total < 0 or df.shape != (len(terms),) or (df < 0).any() or (df > n).any():
            raise ValueError("stats must be (N >= 0, total length >= 0, df per query term in [0, N])")
    # float32 throughout, as tantivy computes them.
    f32 = np.float32
    dff = df.astype(f32)
    idf = np.log(f32(1.0) + ((f32(n) - dff) + f32(0.5)) / (dff + f32(0.5)))
    weight = np.where(df > 0, idf * f32(1.0 + K1), f32(0.0)).astype(f32)
    avg = f32(total) / f32(n) if n and total else f32(1.0)
    return ids, weight, avg


def _analyze(queries) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """Distinct terms of a batch and, per query, ``(term index, occurrences)`` in first-seen
    order."""
    if isinstance(queries, str) or not isinstance(queries, (list, tuple)):
        raise TypeError("queries must be a list of str")
    index: dict[str, int] = {}
    per_query = []
    for q in queries:
        counts: dict[str, int] = {}
        for t in analyze_query(q):  # first-seen order, as Counter keeps it
            counts[t] = counts.get(t, 0) + 1
        per_query.append([(index.setdefault(t, len(index)), c) for t, c in counts.items()])
    return list(index), per_query


def search(segments: Sequence[Bm25Postings], queries: list[str], k: int,
           allowed: Sequence[np.ndarray | None] | None = None, *, prune: bool = True,
           stats: tuple[int, int, np.ndarray] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Top-``k`` BM25 hits of each query in each segment, scored with statistics summed over
    all ``segments`` (the module docstring).

    Args:
        segments: the postings of every segment of the collection (statistics come from all).
        queries: ``nq`` strings, each a bag of words.
        k: hits per query and segment, >= 1.
        allowed: None, or per segment None or an ``(n_docs,)`` bool mask of its rows.
        prune: skip postings that cannot change the top-k (MaxScore, :func:`_bm25_items`);
            False reads them all. Both give the same hits and scores.
        stats: ``(N, total length, df per term of query_terms(queries))`` to score with
            instead of the sums over ``segments`` (a shard scoring with global statistics).

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
    ids, weight, avg = _statistics(segments, terms, stats)
    # The batch's entries, flat: query, term index, occurrences.
    flat = [(j, ti, c) for j, es in enumerate(per_query) for ti, c in es]
    e_q = np.array([e[0] for e in flat], np.int64)
    e_t = np.array([e[1] for e in flat], np.int64)
    e_w = weight[e_t] * np.array([e[2] for e in flat], np.float32)
    nq = len(per_query)
    out = []
    for s, local, mask in zip(segments, ids, allowed):
        q_indptr, q_idx, q_w = _segment_entries(e_q, e_t, e_w, local, nq)
        out.append(s.search_ids(_readonly(q_indptr), _readonly(q_idx), _readonly(q_w), avg, k, mask,
                                prune=prune))
    return out


@njit(cache=True)
def _segment_entries(e_q, e_t, e_w, local, nq):
    """One segment's kernel input from a batch's entries (query ``e_q``, term ``e_t``, weight
    ``e_w``; ``e_q`` ascending): the entries whose term is in the segment (``local[e_t] >= 0``)
    with a positive weight, in order, as ``(q_indptr (nq + 1,) int64, q_idx int32, q_w float32)``."""
    n = 0
    for e in range(e_q.shape[0]):
        if local[e_t[e]] >= 0 and e_w[e] > 0:
            n += 1
    q_indptr = np.zeros(nq + 1, np.int64)
    q_idx = np.empty(n, np.int32)
    q_w = np.empty(n, np.float32)
    j = 0
    for e in range(e_q.shape[0]):
        t = local[e_t[e]]
        if t >= 0 and e_w[e] > 0:
            q_indptr[e_q[e] + 1] += 1
            q_idx[j] = t
            q_w[j] = e_w[e]
            j += 1
    for i in range(nq):
        q_indptr[i + 1] += q_indptr[i]
    return q_indptr, q_idx, q_w


@njit(cache=True)
def _entry_bounds(indptr, term_bound, cache, fieldnorms, q_idx, q_w, q_ub):
    """Fill ``q_ub`` (e,) float64 with each entry's largest possible contribution, ``q_w * tf /
    (tf + cache[code])`` for the term's largest tf and the field-norm code of its shortest
    document (:func:`fieldnorm_ids`); returns the entries' posting count."""
    postings = 0
    for e in range(q_idx.shape[0]):
        t = q_idx[e]
        postings += indptr[t + 1] - indptr[t]
        length = term_bound[t, 1]
        lo, hi = 0, fieldnorms.shape[0]
        while lo < hi:  # the last table entry <= length
            mid = (lo + hi) >> 1
            if fieldnorms[mid] <= length:
                lo = mid + 1
            else:
                hi = mid
        tf = np.float64(term_bound[t, 0])
        q_ub[e] = np.float64(q_w[e]) * tf / (tf + np.float64(cache[lo - 1]))
    return postings


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
def _merge_fill(indptr, docs, tf, impact, remap, tmap, fill, out_docs, out_tf, out_impact):
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
                out_impact[f] = impact[p]  # the row's length, hence its code, is kept
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
    out_imp = open_memmap(folder / FILES[6], mode="w+", dtype=np.uint16, shape=(nnz,))
    if nnz:
        fill = indptr[:-1].copy()
        for (s, _), remap, tm in zip(sources, remaps, tmaps_raw):
            if tm.size:
                _merge_fill(s.indptr, s.docs, s.tf, s.impact, remap, new_pos[rank[tm]], fill,
                            out_docs, out_tf, out_imp)
    for a in (out_docs, out_tf, out_imp):
        a.flush()
    del out_docs, out_tf, out_imp, a
    all_len = np.concatenate([np.zeros(0, np.int32), *lengths]).astype(np.int32)
    np.save(folder / FILES[7], all_len, allow_pickle=False)
    np.save(folder / FILES[8], bound, allow_pickle=False)
    return list(FILES)
