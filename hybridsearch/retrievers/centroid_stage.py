"""ColBERT first stage from the codebook's centroids alone (PLAID's centroid interaction).

A coded token is a centroid id plus residual bits; dropping the residual, a document is the
*set* of centroids its tokens use. The approximate score of a document is

    approx(q, doc) = mean over query vectors i of  max over centroids c used by doc of  cs[i, c]

with ``cs = q @ centroids.T`` ``(m, k)``: MaxSim with every token replaced by its centroid.
It ranks the documents; only the best ``n`` of them get the exact MaxSim
(:meth:`multivector.CodedColbertStore.search`).

Why not PLAID's "probe each query vector's nearest cells" step: an index has at most 256
centroids (``colbert_codec.INDEX_TRAINING``) over ~100 tokens a document, so every cell holds a
large share of all documents and probing prunes almost nothing. Instead each document keeps its
centroid set as a bitset (``ceil(k / 64)`` uint64 words: 32 bytes at k = 256, 32 MB for 1M
documents), built once per store from the codes (:func:`centroid_bits`), and the scoring kernel
visits each document's set bits, each a max over one row of a quantised ``(k, m)`` table.

Quantisation: ``cs`` is mapped to uint8 per query vector, ``round((cs[i, c] - lo_i) / scale)``
with ``lo_i = min_c cs[i, c]`` and one ``scale`` for all rows (the widest row's range / 255), so
32 query vectors of one centroid are one 32-byte row and a document's sum of maxima is an
integer. Rounding is monotonic, so the maximum commutes with it: the integer score is the exact
centroid score up to ``scale / 2`` per query vector. Documents without tokens get the integer
nearest their true score 0. The best ``n`` are then found from a histogram of the integer
scores (no sort), ties at the threshold going to the lower rows.

Nothing here is written to disk.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.cpython.unsafe.numbers import trailing_zeros

from hybridsearch.errors import IndexFormatError

# Query vectors are padded to a multiple of LANES: a table row is LANES bytes, one SIMD max.
LANES = 32
LEVELS = 255
# Documents a parallel chunk scores (its own histogram); below 2 chunks' worth: one thread.
CHUNK_DOCS = 1 << 15


@njit(cache=True, parallel=True)
def _bits_parallel(codes, offsets, k, n_chunks, out):
    n = offsets.shape[0] - 1
    bad = np.zeros(n_chunks, np.int64)
    one = np.uint64(1)
    for ch in prange(n_chunks):
        for d in range(ch * n // n_chunks, (ch + 1) * n // n_chunks):
            for t in range(offsets[d], offsets[d + 1]):
                c = np.int64(codes[t])
                if c >= k:
                    bad[ch] += 1
                    continue
                out[d, c >> 6] |= one << np.uint64(c & 63)
    return bad.sum()


def centroid_bits(codes: np.ndarray, offsets: np.ndarray, k: int) -> np.ndarray:
    """Per document, the set of centroid ids its tokens use: ``(n, ceil(k / 64))`` uint64, bit
    ``c & 63`` of word ``c >> 6`` set when some token of the document has code ``c``.

    ``codes`` ``(T,)`` uint16 and ``offsets`` ``(n + 1,)`` int64 (checked: from 0 to T, never
    decreasing) as a :class:`CodedColbertStore` holds them. A code ``>= k`` raises
    :class:`IndexFormatError` (the scoring kernel indexes its table by these bits).
    """
    n = offsets.shape[0] - 1
    out = np.zeros((n, max(1, -(-int(k) // 64))), np.uint64)
    if n == 0:
        return out
    n_chunks = max(1, min(64, n // 4096))
    if _bits_parallel(codes, offsets, int(k), n_chunks, out):
        raise IndexFormatError(f"ColBERT codes hold a centroid id >= k={k}")
    return out


def centroid_bits_reference(codes: np.ndarray, offsets: np.ndarray, k: int) -> np.ndarray:
    """Plain numpy :func:`centroid_bits`."""
    n = offsets.shape[0] - 1
    flags = np.zeros((n, max(1, -(-k // 64)) * 64), bool)
    doc = np.repeat(np.arange(n), np.diff(offsets))
    flags[doc, np.asarray(codes, np.int64)] = True
    return np.packbits(flags, axis=1, bitorder="little").view(np.uint64)


class Quantised:
    """The uint8 table of one query: ``table`` ``(k, m_pad)`` uint8 (query vectors padded to a
    multiple of ``LANES`` with zero columns), ``scale`` and ``lo_sum`` (``sum_i lo_i``) to turn an
    integer score ``s`` back into ``(s * scale + lo_sum) / m``, and ``empty``: the integer for
    documents without tokens (true score 0), clamped to the integer range."""

    def __init__(self, cs: np.ndarray):
        cs = np.asarray(cs, np.float64)
        self.m, k = cs.shape
        m_pad = max(LANES, -(-self.m // LANES) * LANES)
        self.table = np.zeros((k, m_pad), np.uint8)
        if self.m == 0:
            self.scale, self.lo_sum, self.empty = 1.0, 0.0, 0
            return
        lo = cs.min(axis=1)
        width = float((cs.max(axis=1) - lo).max())
        self.scale = width / LEVELS if width > 0 else 1.0
        self.table[:, :self.m] = np.rint((cs - lo[:, None]) / self.scale).T.astype(np.uint8)
        self.lo_sum = float(lo.sum())
        self.empty = int(min(max(round(-self.lo_sum / self.scale), 0), LEVELS * self.m))

    @property
    def max_score(self) -> int:
        return LEVELS * self.m

    def dequantise(self, s: np.ndarray) -> np.ndarray:
        """Integer scores -> approximate MaxSim, float32."""
        if self.m == 0:
            return np.zeros(np.shape(s), np.float32)
        return ((np.asarray(s, np.float64) * self.scale + self.lo_sum) / self.m).astype(np.float32)


@njit(cache=True, nogil=True)
def _score_range(bits, empty_doc, table, empty, allowed, use_mask, lo, hi, out, hist):
    """Integer centroid scores of docs ``[lo, hi)`` into ``out`` (-1 for disallowed docs) and
    their histogram into ``hist``."""
    w_count = bits.shape[1]
    m_pad = table.shape[1]
    best = np.zeros(m_pad, np.uint8)
    for d in range(lo, hi):
        if use_mask and not allowed[d]:
            out[d] = -1
            continue
        if empty_doc[d]:
            out[d] = empty
            hist[empty] += 1
            continue
        best[:] = 0
        for w in range(w_count):
            x = bits[d, w]
            while x != 0:
                row = table[w * 64 + trailing_zeros(x)]
                x &= x - np.uint64(1)
                # One loop over all columns: LLVM turns it into byte-wise SIMD maxima (a fixed
                # 32-wide loop measured 4x slower: it was unrolled to scalar code).
                for i in range(m_pad):
                    best[i] = max(best[i], row[i])
        s = 0
        for i in range(m_pad):
            s += np.int32(best[i])
        out[d] = s
        hist[s] += 1


@njit(cache=True, parallel=True)
def _score_parallel(bits, empty_doc, table, empty, allowed, use_mask, n_chunks, out, hists):
    n = bits.shape[0]
    for ch in prange(n_chunks):
        _score_range(bits, empty_doc, table, empty, allowed, use_mask,
                     ch * n // n_chunks, (ch + 1) * n // n_chunks, out, hists[ch])


@njit(cache=True)
def _gather(scores, threshold, above, n, out):
    """Rows with a score > ``threshold`` (``above`` of them) and the first ``n - above`` rows
    scoring exactly ``threshold``, in row order."""
    j = 0
    ties = n - above
    for d in range(scores.shape[0]):
        s = scores[d]
        if s > threshold:
            out[j] = d
            j += 1
        elif s == threshold and ties > 0:
            out[j] = d
            j += 1
            ties -= 1
    return j


def top_candidates(bits: np.ndarray, empty_doc: np.ndarray, quant: Quantised, n: int,
                   allowed: np.ndarray | None = None, threads: int = 1
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The ``min(n, allowed docs)`` documents of best centroid score.

    Args:
        bits: ``(n_docs, w)`` uint64 from :func:`centroid_bits` (``w * 64 >= k``).
        empty_doc: ``(n_docs,)`` bool, documents without tokens.
        quant: the query's :class:`Quantised` table, ``k`` rows.
        n: how many to return (>= 1).
        allowed: ``(n_docs,)`` bool or None; a disallowed document is never returned.
        threads: parallel chunks are used when > 1 and the store is large enough.

    Returns:
        rows ``(c,)`` int64 ascending and their integer scores ``(c,)`` int32.
    """
    n_docs = bits.shape[0]
    if quant.table.shape[0] > bits.shape[1] * 64:
        raise ValueError(f"the table has {quant.table.shape[0]} rows, the bitsets "
                         f"{bits.shape[1] * 64} bits")
    scores = np.empty(n_docs, np.int32)
    use_mask = allowed is not None
    mask = allowed if use_mask else np.zeros(0, np.bool_)
    n_chunks = min(threads * 4, n_docs // CHUNK_DOCS) if threads > 1 else 1
    n_chunks = max(1, n_chunks)
    hists = np.zeros((n_chunks, quant.max_score + 1), np.int64)
    if n_chunks == 1:
        _score_range(bits, empty_doc, quant.table, quant.empty, mask, use_mask, 0, n_docs,
                     scores, hists[0])
    else:
        _score_parallel(bits, empty_doc, quant.table, quant.empty, mask, use_mask, n_chunks,
                        scores, hists)
    hist = hists.sum(axis=0)
    # Highest threshold whose count of scores >= it reaches n (or every allowed doc).
    at_least = np.cumsum(hist[::-1])[::-1]
    total = int(at_least[0]) if at_least.size else 0
    want = min(int(n), total)
    if want == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int32)
    threshold = int(np.flatnonzero(at_least >= want)[-1])
    above = int(at_least[threshold + 1]) if threshold + 1 < at_least.size else 0
    rows = np.empty(want, np.int64)
    got = _gather(scores, threshold, above, want, rows)
    assert got == want
    return rows, scores[rows]


def centroid_scores_reference(cs: np.ndarray, codes: np.ndarray, offsets: np.ndarray
                              ) -> np.ndarray:
    """Plain numpy centroid scores (float, unquantised): ``(n_docs,)`` float32, the mean over
    query vectors of the best ``cs[i, c]`` over the document's codes; 0 without tokens."""
    cs = np.asarray(cs, np.float32)
    out = np.zeros(offsets.shape[0] - 1, np.float32)
    if cs.shape[0] == 0:
        return out
    for d in range(out.shape[0]):
        c = np.unique(np.asarray(codes[offsets[d]:offsets[d + 1]], np.int64))
        if c.size:
            out[d] = cs[:, c].max(axis=1).sum() / np.float32(cs.shape[0])
    return out


def integer_scores_reference(table: np.ndarray, m: int, empty: int, codes: np.ndarray,
                             offsets: np.ndarray) -> np.ndarray:
    """Plain numpy integer scores of the kernel for a quantised ``table`` ``(k, m_pad)``."""
    out = np.zeros(offsets.shape[0] - 1, np.int64)
    for d in range(out.shape[0]):
        c = np.unique(np.asarray(codes[offsets[d]:offsets[d + 1]], np.int64))
        out[d] = table[c][:, :m].astype(np.int64).max(axis=0).sum() if c.size else empty
    return out
