"""Learned-sparse retrieval over one immutable segment: an inverted index scored by Numba.

The index is the transpose of the documents' ``(n_docs, V)`` lexical-weight matrix, stored as
postings per term. A query is scored term-at-a-time into a float32 accumulator, in the order of
the query's CSR entries, which is the order scipy's ``q @ D.T`` uses, without fused
multiply-adds: :meth:`search`, :meth:`score` and :func:`brute_force_topk` compute the same
float32 sums (bit-identical on the machines tested), so their rankings agree.

Two exact kernels serve :meth:`SparsePostings.search`: the term-at-a-time scan of every
posting of the query's terms, and a pruned one (MaxScore over posting lists split by weight,
see "pruned search" below) that reads a fraction of them and returns the same top-k, float32
scores included, because every score it reports is summed in that same order. ``search``
picks the pruned kernel from :data:`PRUNED_MIN_DOCS` documents on, for ``k`` up to one
:data:`PRUNED_DOCS_PER_K`-th of them, and while the segment's recent pruned queries read at most
:data:`PRUNED_MAX_READ` of their postings; elsewhere the scan wins.

Conventions shared by every function here: a document is a hit only if its score is positive
(it shares a token with the query) and it is allowed; ties are broken by the lower row; result
slots beyond the hits hold score ``0`` and id ``-1``.

Files written by :meth:`SparsePostings.save` (all plain ``.npy``, never pickled):
``{prefix}_indptr.npy``, ``{prefix}_docs.npy``, ``{prefix}_weights.npy``,
``{prefix}_term_max.npy`` and ``{prefix}_n_docs.npy`` (a 0-d int64: trailing empty documents
cannot be derived from the postings). The pruned kernel's extra arrays (high and mid lists,
block starts and block maxima of long lists, a 1-in-64 sample of the doc ids, each list's
:data:`PRUNE_SEED_TOPS` heaviest postings, and a forward index with :data:`PRUNE_FORWARD`) are
not stored: they are built from these files on its first use (a few passes over the postings,
~3 s at 1M documents) and kept in memory (104 MiB, of which 39 MiB of heaviest postings, plus a
427 MiB forward index, next to 419 MiB of postings at 1M learned-sparse-like documents), so
segments written before it existed work unchanged.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numba
import numpy as np
import scipy.sparse as sp
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from hybridsearch.errors import IndexFormatError

# Accumulators of this many float32 fit in L2; bigger segments are scored block by block, which
# also lets a single query use several threads.
BLOCK_DOCS = 1 << 16
# Below this many postings (a few ms of work) a batch is scored on the calling thread: waking
# the pool costs microseconds on an idle machine but milliseconds on a busy one.
PARALLEL_MIN_POSTINGS = 1 << 20
# The pruned kernel scores blocks of 2**PRUNE_BLOCK_SHIFT docs; it splits lists of at least
# PRUNE_SPLIT_MIN postings at PRUNE_SPLIT_FACTOR (high list) and PRUNE_MID_FACTOR (mid list)
# times their mean weight; its non-essential bounds add up to at most PRUNE_NE_FRAC times the
# k-th score (see "pruned search" below).
PRUNE_BLOCK_SHIFT = 16
PRUNE_SPLIT_MIN = 256
PRUNE_SPLIT_FACTOR = 3.0
PRUNE_MID_FACTOR = 1.5
# Docs scored in full (term at a time) for a first k-th score.
PRUNE_FIRST_DOCS = 1 << 12
# Lists of at least this many postings get their block starts precomputed (no searches).
PRUNE_OFFSETS_MIN = 4096
# search(kernel="auto") prunes from PRUNED_MIN_DOCS docs on, and while k is at most one
# PRUNED_DOCS_PER_K-th of them; otherwise the term-at-a-time scan wins (measured at 1M docs
# and k = 10 / 100 / 250 / 500: 4.6x / 2.2x / 1.5x faster, then 0.85x).
PRUNED_MIN_DOCS = 1 << 17
PRUNED_DOCS_PER_K = 4000
# The data decide the rest: pruning pays where the query's lists carry very different bounds
# (learned weights that shrink for frequent terms: 6-12% of the postings read, 1.4-4.8x faster)
# and loses where they do not (uniform weights: 32% read at 100k, 0.72x; 41% on the 1M run's
# queries, 0.52-0.74x). So "auto" keeps, per segment, a running mean of the share of postings
# its pruned searches read (weight PRUNED_READ_EMA per search) and scans term at a time while
# that share is above PRUNED_MAX_READ, trying the pruned kernel again on one search in
# PRUNED_REPROBE to follow a change of queries. Both kernels return identical results: the
# choice moves only the time.
PRUNED_MAX_READ = 0.3
PRUNED_READ_EMA = 0.25
PRUNED_REPROBE = 16
PRUNE_NE_FRAC = 0.5
# A first k-th score from the docs best on the heaviest postings (the PRUNE_SEED_TOPS heaviest
# of each list, kept with the split lists) of the PRUNE_SEED_TERMS query terms of largest
# bound: the k-th best of their exact scores (at most PRUNE_SEED_LOOKUPS look-ups without a
# forward index), or with PRUNE_SEED_LOOKUPS = 0 of their partial sums over those postings.
PRUNE_SEED_TERMS = 16
PRUNE_SEED_TOPS = 32
PRUNE_SEED_LOOKUPS = 20_000
PRUNE_PARALLEL_FACTOR = 2
# Candidates evaluated together (see _eval_candidates).
PRUNE_EVAL_CHUNK = 256
# A forward index (doc -> its terms and weights, 8 bytes a posting + 8 a doc: 448 bytes a doc
# at 55 terms, as much memory again as the postings) built with the split lists: candidates and
# first-k-th-score docs get their exact scores from their row (one memory region each) instead
# of a search in every list not read (~2,700 searches a query at 1M docs, most of them cache
# misses when other work has run in between). False: searches, no extra memory.
PRUNE_FORWARD = True
# With the forward index the first k-th score is the k-th of the exact scores of this many
# times k docs (compiled in: change it before the first pruned search).
PRUNE_SEED_FWD_MULT = 4


@intrinsic
def _prefetch(typingctx, arr, i):
    """``_prefetch(arr, i)``: asks the CPU to bring ``arr[i]``'s cache line in (LLVM's
    ``llvm.prefetch``: a read, kept in every cache level). It changes no value and needs no
    bounds check: a prefetch of any address is harmless."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]],
                                       wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
            "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3),
                          ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(arr, types.int64), codegen


@njit(cache=True)
def _prefetch_rows(fwd, rows, n):
    """Prefetches the forward-index rows ``rows[:n]`` (``fwd``: see :func:`_fwd_score`): their
    offsets first, then every line of each row, so that the rows' cache misses overlap instead
    of following one another (scoring ~200 candidates a query at 1M documents took half the
    cycles)."""
    f_indptr, words = fwd[0], fwd[1]
    for c in range(n):
        _prefetch(f_indptr, np.int64(rows[c]))
    for c in range(n):
        r = np.int64(rows[c])
        for p in range(2 * f_indptr[r], 2 * f_indptr[r + 1], 16):
            _prefetch(words, p)


@njit(cache=True, inline="always")
def _worse(s_a, i_a, s_b, i_b):
    return s_a < s_b or (s_a == s_b and i_a > i_b)


@njit(cache=True)
def _sift_down(hs, hi, size, pos):
    # Min-heap on "worse first", so the root is the entry the next better hit evicts.
    while True:
        child = 2 * pos + 1
        if child >= size:
            return
        if child + 1 < size and _worse(hs[child + 1], hi[child + 1], hs[child], hi[child]):
            child += 1
        if not _worse(hs[child], hi[child], hs[pos], hi[pos]):
            return
        hs[pos], hs[child] = hs[child], hs[pos]
        hi[pos], hi[child] = hi[child], hi[pos]
        pos = child


@njit(cache=True)
def _heap_push(hs, hi, size, k, s, i):
    """Offer ``(s, i)`` to a heap of ``size`` <= ``k`` entries; returns the new size."""
    if size < k:
        pos = size
        hs[pos] = s
        hi[pos] = i
        while pos > 0:
            parent = (pos - 1) // 2
            if not _worse(hs[pos], hi[pos], hs[parent], hi[parent]):
                break
            hs[pos], hs[parent] = hs[parent], hs[pos]
            hi[pos], hi[parent] = hi[parent], hi[pos]
            pos = parent
        return size + 1
    if _worse(hs[0], hi[0], s, i):
        hs[0] = s
        hi[0] = i
        _sift_down(hs, hi, size, 0)
    return size



@njit(cache=True, inline="always")
def _offer_touched(acc, touched, n_touched, d_lo, allowed, use_allowed, k, size, hs, hi):
    """Offer the accumulated score of each touched row (relative to ``d_lo``) to the top-k heap,
    zeroing ``acc`` behind it; a row that cannot enter (a tie loses to the lower row) or is not
    allowed is skipped. Returns the heap's size."""
    for j in range(n_touched):
        d = touched[j]
        s = acc[d]
        acc[d] = 0.0
        if size == k and (s < hs[0] or (s == hs[0] and d_lo + d > hi[0])):
            continue
        if use_allowed and not allowed[d_lo + d]:
            continue
        size = _heap_push(hs, hi, size, k, s, np.int64(d_lo + d))
    return size

@njit(cache=True)
def _heap_drain(hs, hi, size, out_s, out_i):
    """Write the heap best-first into ``out_s``/``out_i`` (length k), padding with 0 / -1."""
    out_s[:] = 0.0
    out_i[:] = -1
    while size > 0:
        size -= 1
        out_s[size] = hs[0]
        out_i[size] = hi[0]
        hs[0] = hs[size]
        hi[0] = hi[size]
        _sift_down(hs, hi, size, 0)


@njit(cache=True)
def _search_items(indptr, docs, weights, q_indptr, q_idx, q_w, allowed, use_allowed,
                  n_docs, block, n_blocks, item_lo, item_hi, out_s, out_i):
    """Score work items ``[item_lo, item_hi)``; item ``q * n_blocks + b`` is query ``q`` over the
    docs of block ``b``. Writes each item's top-k (k = out_s.shape[1]) into its output row."""
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
            # Dense regime: most docs get touched, so skip the bookkeeping and scan them all.
            for e in range(n_terms):
                w = q_w[e0 + e]
                for p in range(starts[e], ends[e]):
                    # Unsigned: skips numba's negative-index wraparound on the hot path.
                    acc[np.uint32(docs[p] - d_lo)] += w * weights[p]
            for d in range(width):
                s = acc[d]
                # Most docs lose to the current k-th best: test that before any heap work.
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
                    d = np.uint32(docs[p] - d_lo)
                    old = acc[d]
                    new = old + w * weights[p]
                    acc[d] = new
                    # Weights are >= 0, so a doc leaves 0 at most once: recorded exactly once.
                    if old == 0.0 and new > 0.0:
                        touched[n_touched] = d
                        n_touched += 1
            size = _offer_touched(acc, touched, n_touched, d_lo, allowed, use_allowed, k, size, hs, hi)
        _heap_drain(hs, hi, size, out_s[item], out_i[item])


@njit(cache=True, parallel=True)
def _search_parallel(indptr, docs, weights, q_indptr, q_idx, q_w, allowed, use_allowed,
                     n_docs, block, n_blocks, n_chunks, out_s, out_i):
    n_items = out_s.shape[0]
    for c in prange(n_chunks):
        _search_items(indptr, docs, weights, q_indptr, q_idx, q_w, allowed, use_allowed,
                      n_docs, block, n_blocks, c * n_items // n_chunks,
                      (c + 1) * n_items // n_chunks, out_s, out_i)


@njit(cache=True)
def _merge_blocks(part_s, part_i, n_blocks, out_s, out_i):
    """Top-k of each query over its ``n_blocks`` consecutive rows of partial results."""
    k = out_s.shape[1]
    hs = np.empty(k, np.float32)
    hi = np.empty(k, np.int64)
    for q in range(out_s.shape[0]):
        size = 0
        for r in range(q * n_blocks, (q + 1) * n_blocks):
            for j in range(k):
                if part_i[r, j] < 0:
                    break
                size = _heap_push(hs, hi, size, k, part_s[r, j], part_i[r, j])
        _heap_drain(hs, hi, size, out_s[q], out_i[q])


@njit(cache=True)
def _score_candidates(indptr, docs, weights, q_idx, q_w, cand):
    order = np.argsort(cand, kind="mergesort")
    out = np.zeros(cand.shape[0], np.float32)
    for e in range(q_idx.shape[0]):
        w = q_w[e]
        t = q_idx[e]
        p = indptr[t]
        p_hi = indptr[t + 1]
        # Candidates are visited in increasing row order, so each search resumes where the last
        # one stopped: a merge of the posting list with the sorted candidates.
        for j in range(order.shape[0]):
            if p >= p_hi:
                break
            c = order[j]
            p += np.searchsorted(docs[p:p_hi], cand[c])
            if p < p_hi and docs[p] == cand[c]:
                out[c] += w * weights[p]
    return out


# ----------------------------------------------------------------------------- pruned search
#
# Exact MaxScore over split posting lists. At first use (never stored), the long lists are
# split by weight into three tiers: term ``t``'s postings heavier than ``tau[t]``
# (``PRUNE_SPLIT_FACTOR`` times the list's mean weight) are copied into a short "high" list,
# those heavier than ``tau2[t]`` (``PRUNE_MID_FACTOR`` times it, high ones included) into a
# "mid" list; ``low_max[t]`` and ``low2_max[t]`` are the largest weights left out of each. A
# query entry then offers three bounds, ``w * term_max[t]`` for docs in its high list,
# ``w * low_max[t]`` for the rest of its mid list and ``w * low2_max[t]`` for the others,
# several times smaller on learned-sparse weights, whose tails are long; it reads nothing, its
# high list, its mid list or its whole list. (Two tiers, the high list only, read 24% more
# postings at 1M documents: 429k against 346k a query; 5% slower.)
#
# A query first gets a lower bound of its k-th score: the exact scores of the docs best on its
# few heaviest terms with short lists (merged directly), the k-th best of them (when that finds
# no k docs, the first ``PRUNE_FIRST_DOCS`` rows are read in full, term at a time, instead).
# Docs are scored in blocks of ``2**PRUNE_BLOCK_SHIFT`` rows into a float32 accumulator; each
# block splits the bounds MaxScore-style by the k-th score: bounds whose sum stays under
# ``PRUNE_NE_FRAC`` times it are "non-essential", picked greedily by postings saved per unit of
# bound (a tier never before the one under it). In lists of at least ``PRUNE_OFFSETS_MIN``
# postings the three bounds are those of the block (block-max: the largest weights of the list and
# of what each of its high and mid lists leaves out, among the block's docs), never above the
# global ones. An entry reads the tiers whose bounds are essential. A doc is a candidate if its
# partial sum plus the bounds left can beat the k-th score (recorded as its sum crosses that line
# during the scatter). Candidates are looked up in the lists not read (an interpolation search on
# a 1-in-64 sample of the doc ids, then the 64 postings it points to), largest bound first, and
# dropped as soon as they cannot enter; survivors get their exact score, the float32 sum over
# every entry in query-CSR order, which is the arithmetic of the term-at-a-time kernel, so the
# top-k is identical to it, scores included. With a forward index (PRUNE_FORWARD), candidates
# whose partial sum plus every unread bound can still enter get their exact score from their
# forward row instead (the same float32 sum in query order), without searches.
#
# Bounds are compared after multiplying by ``1 + (n + 2) * 2**-21`` for a query of ``n``
# entries: a float32 sum of ``n`` non-negative rounded products exceeds the real sum by at most
# a factor ``(1 + 2**-24)**n``, and partial sums are float32 too, so the slack covers both
# roundings with room to spare: pruning never drops a doc that could enter.


@njit(cache=True)
def _split_lists(indptr, docs, weights, min_len, factor):
    """``(tau (V,) float32, low_max (V,) float32, h_indptr (V + 1,) int64, h_docs, h_weights)``:
    lists of at least ``min_len`` postings keep their weights above ``tau = factor * mean`` in a
    high list; shorter ones are not split (``tau = -1``, ``low_max = 0``, no high list)."""
    vocab = indptr.shape[0] - 1
    tau = np.full(vocab, -1.0, np.float32)
    low_max = np.zeros(vocab, np.float32)
    h_indptr = np.zeros(vocab + 1, np.int64)
    for t in range(vocab):
        lo = indptr[t]
        hi = indptr[t + 1]
        h_indptr[t + 1] = h_indptr[t]
        if hi - lo < min_len:
            continue
        total = 0.0
        for p in range(lo, hi):
            total += weights[p]
        cut = np.float32(factor * total / (hi - lo))
        tau[t] = cut
        n_high = 0
        mx = np.float32(0.0)
        for p in range(lo, hi):
            if weights[p] > cut:
                n_high += 1
            elif weights[p] > mx:
                mx = weights[p]
        low_max[t] = mx
        h_indptr[t + 1] += n_high
    h_docs = np.empty(h_indptr[vocab], np.int32)
    h_weights = np.empty(h_indptr[vocab], np.float32)
    for t in range(vocab):
        f = h_indptr[t]
        if tau[t] < 0:
            continue
        for p in range(indptr[t], indptr[t + 1]):
            if weights[p] > tau[t]:
                h_docs[f] = docs[p]
                h_weights[f] = weights[p]
                f += 1
    return tau, low_max, h_indptr, h_docs, h_weights


@njit(cache=True)
def _block_offsets(indptr, docs, weights, tau, h_indptr, h_docs, shift, n_docs, min_len):
    """Where each block of ``2**shift`` rows starts in the long lists (at least ``min_len``
    postings), which galloping searches would reach through a cache miss a step, and the
    largest weights there: ``(row (V,) int32, -1 for other terms; offs, h_offs (n_long,
    n_blocks + 1) int64; b_max, b_low (n_long, n_blocks) float32)``, the positions in ``docs``
    and ``h_docs`` of each block's first posting of the term, the largest weight of its
    postings in the block, and the largest of those not in its high list (weight <= ``tau``;
    0 for a list not split)."""
    vocab = indptr.shape[0] - 1
    n_blocks = (n_docs + (1 << shift) - 1) >> shift
    row = np.full(vocab, -1, np.int32)
    n_long = 0
    for t in range(vocab):
        if indptr[t + 1] - indptr[t] >= min_len:
            row[t] = n_long
            n_long += 1
    offs = np.empty((n_long, n_blocks + 1), np.int64)
    h_offs = np.empty((n_long, n_blocks + 1), np.int64)
    b_max = np.zeros((n_long, max(n_blocks, 1)), np.float32)
    b_low = np.zeros((n_long, max(n_blocks, 1)), np.float32)
    for t in range(vocab):
        r = row[t]
        if r < 0:
            continue
        p = indptr[t]
        h = h_indptr[t]
        for b in range(n_blocks + 1):
            lo = b << shift
            mx = np.float32(0.0)
            ml = np.float32(0.0)
            while p < indptr[t + 1] and docs[p] < lo:
                w = weights[p]
                mx = max(mx, w)
                if tau[t] >= 0 and w <= tau[t]:
                    ml = max(ml, w)
                p += 1
            while h < h_indptr[t + 1] and h_docs[h] < lo:
                h += 1
            offs[r, b] = p
            h_offs[r, b] = h
            if b > 0:
                b_max[r, b - 1] = mx
                b_low[r, b - 1] = ml
    return row, offs, h_offs, b_max, b_low


@njit(cache=True)
def _seek(docs, skip, p, hi, row):
    """:func:`_gallop` for long lists: the search runs on ``skip`` (every 64th entry of
    ``docs``, 64 times denser in cache), then within the 64 postings it points to. On
    ``skip`` it starts where the row would sit if the list's rows were evenly spread
    (interpolation) and gallops from there: look-ups at random rows are cache misses, and
    this takes fewer of them than a search from ``p``."""
    if p >= hi or docs[p] >= row:
        return p
    jl = (p >> 6) + 1  # the first sampled position after p
    jh = (hi - 1) >> 6  # the last sampled position before hi
    if jl > jh:
        return _gallop(docs, p, hi, row)
    a = np.int64(skip[jl])
    b = np.int64(skip[jh])
    if row <= a:
        j = jl
    elif row > b:
        j = jh + 1
    else:
        # The first j in (jl, jh] with skip[j] >= row, searched from a guess g.
        g = min(max(jl + (jh - jl) * (row - a) // max(b - a, 1), jl + 1), jh)
        step = 1
        if skip[g] >= row:  # downwards: the answer is in (jl, g]
            while g - step > jl and skip[g - step] >= row:
                g -= step
                step <<= 1
            j = _lower_bound(skip, max(g - step, jl) + 1, g, row)
        else:  # upwards: in (g, jh]
            while g + step <= jh and skip[g + step] < row:
                g += step
                step <<= 1
            j = _lower_bound(skip, g + 1, min(g + step, jh + 1), row)
    lo = max(p, (j - 1) << 6)
    up = hi if j > jh else (j << 6) + 1
    return _lower_bound(docs, lo, up, row)


@njit(cache=True, inline="always")
def _lower_bound(docs, lo, up, row):
    """First position in ``docs[lo:up]`` (ascending) holding a row >= ``row``, or ``up``."""
    while lo < up:
        mid = (lo + up) >> 1
        if docs[mid] < row:
            lo = mid + 1
        else:
            up = mid
    return lo


@njit(cache=True, inline="always")
def _tier_window(docs, indptr, offs, aligned, r, blk, t, e, w_lo, d_hi, cur, end):
    """Set entry ``e``'s span of a tier list (high or mid) of term ``t`` to the window's docs
    ``[w_lo, d_hi)``: from the block offsets when the window is a block (``aligned``, row ``r``
    of ``offs``), else by galloping from where it was. Returns the span's length."""
    if aligned and r >= 0:
        cur[e] = offs[r, blk]
        end[e] = offs[r, blk + 1]
    else:
        cur[e] = _gallop(docs, cur[e], indptr[t + 1], w_lo)
        end[e] = _gallop(docs, cur[e], indptr[t + 1], d_hi)
    return end[e] - cur[e]


@njit(cache=True)
def _gallop(docs, p, hi, row):
    """First position in ``docs[p:hi]`` (ascending) holding a row >= ``row``, or ``hi``: an
    exponential search from ``p``, cheap when successive rows land close together."""
    if p >= hi or docs[p] >= row:
        return p
    step = 1  # invariant: docs[p] < row
    while p + step < hi and docs[p + step] < row:
        p += step
        step <<= 1
    return _lower_bound(docs, p + 1, min(p + step, hi), row)


@njit(cache=True)
def _scatter(docs, weights, w, lo, hi, d_lo, acc):
    for p in range(lo, hi):
        acc[np.uint32(docs[p] - d_lo)] += w * weights[p]


@njit(cache=True)
def _scatter_cut(docs, weights, w, lo, hi, d_lo, acc, cut, up, n_up):
    """:func:`_scatter`, recording in ``up`` the docs whose sum reaches ``cut`` (> 0)."""
    for p in range(lo, hi):
        d = np.uint32(docs[p] - d_lo)
        old = acc[d]
        new = old + w * weights[p]
        acc[d] = new
        if new >= cut and old < cut:
            up[n_up] = d
            n_up += 1
    return n_up


@njit(cache=True)
def _scatter_touched(docs, weights, w, lo, hi, d_lo, acc, touched, n_touched):
    for p in range(lo, hi):
        d = np.uint32(docs[p] - d_lo)
        old = acc[d]
        new = old + w * weights[p]
        acc[d] = new
        # Weights are >= 0, so a doc leaves 0 at most once: recorded exactly once.
        if old == 0.0 and new > 0.0:
            touched[n_touched] = d
            n_touched += 1
    return n_touched


@njit(cache=True)
def _offer_all(acc, width, d_lo, allowed, use_allowed, k, size, hs, hi):
    """Offer every allowed doc of the accumulator with a positive sum to the heap; returns its
    new size. (A function of its own: inlined, this loop compiled about 4x slower.)"""
    for d in range(width):
        s = acc[d]
        if s <= 0.0 or (size == k and (s < hs[0] or (s == hs[0] and d_lo + d > hi[0]))):
            continue
        if use_allowed and not allowed[d_lo + d]:
            continue
        size = _heap_push(hs, hi, size, k, s, np.int64(d_lo + d))
    return size


@njit(cache=True, inline="always")
def _gain_per_bound(postings, bound):
    return np.inf if bound <= 0.0 else postings / bound


@njit(cache=True)
def _tops(indptr, docs, weights, m):
    """``(t_indptr (V + 1,) int64, t_docs, t_weights)``: the ``m`` heaviest postings of every
    list longer than ``m`` (in no particular order; ties broken arbitrarily), none for the
    others, whose whole list serves instead. One pass over the postings with a min-heap a list."""
    vocab = indptr.shape[0] - 1
    t_indptr = np.zeros(vocab + 1, np.int64)
    for t in range(vocab):
        t_indptr[t + 1] = t_indptr[t] + (m if indptr[t + 1] - indptr[t] > m else 0)
    t_docs = np.empty(t_indptr[vocab], np.int32)
    t_weights = np.empty(t_indptr[vocab], np.float32)
    for t in range(vocab):
        lo = indptr[t]
        hi = indptr[t + 1]
        if hi - lo <= m:
            continue
        f = t_indptr[t]
        hw = t_weights[f:f + m]
        hd = t_docs[f:f + m]
        for j in range(m):  # the first m postings, heapified (the lightest at the root)
            w = weights[lo + j]
            d = docs[lo + j]
            c = j
            while c > 0 and hw[(c - 1) // 2] > w:
                hw[c] = hw[(c - 1) // 2]
                hd[c] = hd[(c - 1) // 2]
                c = (c - 1) // 2
            hw[c] = w
            hd[c] = d
        for p in range(lo + m, hi):
            w = weights[p]
            if w <= hw[0]:
                continue
            d = docs[p]
            c = 0
            while True:
                ch = 2 * c + 1
                if ch >= m:
                    break
                if ch + 1 < m and hw[ch + 1] < hw[ch]:
                    ch += 1
                if w <= hw[ch]:
                    break
                hw[c] = hw[ch]
                hd[c] = hd[ch]
                c = ch
            hw[c] = w
            hd[c] = d
    return t_indptr, t_docs, t_weights


@njit(cache=True)
def _seed_theta(indptr, docs, weights, skip, tops, fwd, qmap, found, ts, ws, b_high, allowed,
                use_allowed, k, n_top, budget):
    """A lower bound of the query's k-th score, 0.0 if none, from the docs with the largest
    partial sums over the heaviest postings (``tops``, :func:`_tops`; a short list in full) of
    the ``n_top`` entries of largest bound. With ``budget`` > 0: the exact scores of ``2k`` of
    them (fewer if ``budget`` look-ups would not cover that many; with a forward index
    ``PRUNE_SEED_FWD_MULT * k``), the k-th best of them. With ``budget`` == 0: the k-th best
    partial sum itself, less the float32 roundings (a score is at least its partial sum over
    some of its terms): no look-ups. ``qmap`` and ``found``: the query's :func:`_query_map`
    and scratch for :func:`_fwd_score`, as the search made them."""
    n = ts.shape[0]
    m = min(2 * k, budget // max(n, 1)) if budget > 0 else k
    if budget > 0 and fwd[0].shape[0] > 1:
        m = PRUNE_SEED_FWD_MULT * k  # a row a doc: cheap
    if m < k:
        return 0.0
    t_indptr, t_docs, t_weights = tops
    order = np.argsort(-b_high)
    n_use = 0
    n_post = 0
    while n_use < min(n_top, n) and b_high[order[n_use]] > 0.0:
        t = ts[order[n_use]]
        got = t_indptr[t + 1] - t_indptr[t]
        n_post += got if got > 0 else indptr[t + 1] - indptr[t]
        n_use += 1
    if n_post < k:
        return 0.0
    # Partial sums by doc in an open-addressing table of at least twice the postings.
    bits = 4
    while (1 << bits) < 2 * n_post:
        bits += 1
    mask = (1 << bits) - 1
    keys = np.full(1 << bits, -1, np.int64)
    sums = np.zeros(1 << bits, np.float64)
    n_keys = 0
    for i in range(n_use):
        e = order[i]
        t = ts[e]
        w = np.float64(ws[e])
        lo = t_indptr[t]
        hi = t_indptr[t + 1]
        src_d, src_w = t_docs, t_weights
        if hi == lo:
            lo = indptr[t]
            hi = indptr[t + 1]
            src_d, src_w = docs, weights
        for p in range(lo, hi):
            row = np.int64(src_d[p])
            if use_allowed and not allowed[row]:
                continue
            h = _hash_slot(row, bits)
            while keys[h] >= 0 and keys[h] != row:
                h = (h + 1) & mask
            if keys[h] < 0:
                keys[h] = row
                n_keys += 1
            sums[h] += w * src_w[p]
    if n_keys < k:
        return 0.0
    pi = np.empty(n_keys, np.int64)
    ps = np.empty(n_keys, np.float64)
    j = 0
    for h in range(1 << bits):
        if keys[h] >= 0:
            pi[j] = keys[h]
            ps[j] = sums[h]
            j += 1
    best = np.argsort(-ps)
    size = min(m, n_keys)
    if budget <= 0:
        # The k-th best partial sum (float64, exact products). A float32 score of n entries
        # is at least (1 - 2**-24)**(n + 1) times the real sum, which is at least the
        # partial one.
        return ps[best[k - 1]] * (1.0 - (n + 2) * 2.0 ** -21)
    pi = pi[best[:size]]
    # Their exact scores, every entry in query order (the search's arithmetic).
    rows = np.sort(pi[:size])
    exact = np.zeros(size, np.float32)
    if fwd[0].shape[0] > 1:
        _prefetch_rows(fwd, rows, size)
        for c in range(size):
            exact[c] = _fwd_score(fwd, ts, ws, qmap, found, rows[c])
        n = 0  # the loop below has nothing left to do
    for e in range(n):
        t = ts[e]
        lo = indptr[t]
        hi = indptr[t + 1]
        w = ws[e]
        for c in range(size):
            # Each search from the list's start: independent of the previous one, so the CPU
            # overlaps their cache misses (chained, they would wait for each other).
            p = _seek(docs, skip, lo, hi, rows[c])
            if p < hi and docs[p] == rows[c]:
                exact[c] += w * weights[p]
    exact.sort()
    kth = exact[size - k]
    return np.float64(kth) if kth > 0.0 else 0.0


@njit(cache=True)
def _pruned_items(indptr, docs, weights, term_max, tau, low_max, h_indptr, h_docs, h_weights,
                  tau2, low2_max, m_indptr, m_docs, m_weights, off_row, offs, h_offs, m_offs,
                  bm_all, bm_low, bm_low2, skip, tops, fwd, q_indptr, q_idx, q_w, seeds,
                  allowed, use_allowed, shift, first_width, n_docs, ne_frac, seed_top,
                  seed_budget, n_parts, item_lo, item_hi, out_s, out_i, acc, touched, cand,
                  cbound, stats):
    """Items ``[item_lo, item_hi)``; item ``q * n_parts + j`` is query ``q`` over the blocks
    ``b`` with ``b % n_parts == j``. Writes each item's top-k into its output row. ``stats``
    (int64, 8) counts windows, windows read in full, postings read, candidates, docs scored
    exactly, list look-ups, queries given a first k-th score by :func:`_seed_theta`
    (``seed_top`` > 0 enables it; ``seeds[q]`` > 0 gives one instead) and postings read from
    mid lists. Scratch of at least ``2**shift`` entries, reused across calls: ``acc``
    (float32, all zero on entry and left so), ``touched``, ``cand`` (int32) and ``cbound``
    (float32)."""
    k = out_s.shape[1]
    hs = np.empty(k, np.float32)
    hi = np.empty(k, np.int64)
    for item in range(item_lo, item_hi):
        q = item // n_parts
        part = item % n_parts
        e0 = q_indptr[q]
        n = q_indptr[q + 1] - e0
        slack = 1.0 + (n + 2) * 2.0 ** -21
        # A k-th score known beforehand (exact scores of k allowed docs), 0 if none.
        seed = np.float64(seeds[q])
        # Per entry: term, weight, bounds (whole list, less its high list, less its mid list),
        # cursors in the three lists.
        ts = q_idx[e0:e0 + n]
        ws = q_w[e0:e0 + n]
        b_high = np.empty(n, np.float64)
        b_mid = np.empty(n, np.float64)
        b_low = np.empty(n, np.float64)
        split = np.empty(n, np.bool_)
        cur = np.empty(n, np.int64)
        cur_h = np.empty(n, np.int64)
        cur_m = np.empty(n, np.int64)
        end = np.empty(n, np.int64)
        end_h = np.empty(n, np.int64)
        end_m = np.empty(n, np.int64)
        for e in range(n):
            t = ts[e]
            b_high[e] = np.float64(ws[e]) * term_max[t]
            split[e] = tau[t] >= 0
            b_mid[e] = np.float64(ws[e]) * low_max[t] if split[e] else 0.0
            b_low[e] = np.float64(ws[e]) * low2_max[t] if split[e] else 0.0
            cur[e] = indptr[t]
            cur_h[e] = h_indptr[t]
            cur_m[e] = m_indptr[t]
        # What leaving a tier unread saves (postings) per unit of bound it costs: v < n is
        # entry v's bottom tier (its list less its mid list), n <= v < 2n its mid tier (the mid
        # list less the high list), 2n <= v its high list; never a tier before the one under
        # it. Per block, the non-essential tiers are picked greedily in that order.
        ratio = np.empty(3 * n, np.float64)
        for e in range(n):
            t = ts[e]
            n_high = h_indptr[t + 1] - h_indptr[t]
            n_mid = m_indptr[t + 1] - m_indptr[t]
            n_all = indptr[t + 1] - indptr[t]
            if split[e]:
                ratio[e] = _gain_per_bound(n_all - n_mid, b_low[e])
                ratio[n + e] = min(_gain_per_bound(n_mid - n_high, b_mid[e] - b_low[e]),
                                   ratio[e])
                ratio[2 * n + e] = min(_gain_per_bound(n_high, b_high[e] - b_mid[e]),
                                       ratio[n + e])
            else:
                ratio[e] = -1.0
                ratio[n + e] = -1.0
                ratio[2 * n + e] = _gain_per_bound(n_all, b_high[e])
        by_ratio = np.argsort(-ratio, kind="mergesort")
        qmap = _query_map(ts, indptr.shape[0] - 1)
        found = np.empty(2 * n, np.int64)
        if seed == 0.0 and seed_top > 0:
            seed = _seed_theta(indptr, docs, weights, skip, tops, fwd, qmap, found, ts, ws,
                               b_high, allowed, use_allowed, k, seed_top, seed_budget)
            stats[6] += seed > 0.0
        # 0: read nothing, 1: the high list only, 2: the mid list (high included), 3: all
        level = np.empty(n, np.int8)
        above = np.empty(n, np.float32)  # postings heavier than this were read
        cw = np.empty((PRUNE_EVAL_CHUNK, n), np.float32)  # candidates' looked-up terms
        c_idx = np.empty(PRUNE_EVAL_CHUNK, np.int64)
        c_sum = np.empty(PRUNE_EVAL_CHUNK, np.float32)
        resid = np.empty(n, np.float64)  # bound of what is not read
        wb_high = np.empty(n, np.float64)  # this window's bounds (in blocks: block-max)
        wb_mid = np.empty(n, np.float64)
        wb_low = np.empty(n, np.float64)
        size = 0
        b = part
        d_lo = b << shift
        while d_lo < n_docs:
            # Windows: the blocks of this part, except that while fewer than k hits are held
            # only first_width docs are read in full; the k-th score they give prunes the rest.
            b_hi = min((b + 1) << shift, n_docs)
            d_hi = b_hi if size == k or seed > 0.0 else min(d_lo + first_width, b_hi)
            width = d_hi - d_lo
            w_lo = d_lo
            if d_hi == b_hi:
                b += n_parts
                d_lo = b << shift
            else:
                d_lo = d_hi
            stats[0] += 1
            blk = w_lo >> shift
            aligned = w_lo == blk << shift and d_hi == min((blk + 1) << shift, n_docs)
            for e in range(n):
                t = ts[e]
                r = off_row[t]
                if aligned and r >= 0:
                    cur[e] = offs[r, blk]
                    end[e] = offs[r, blk + 1]
                    # Block-max: the largest weights of this block only.
                    wb_high[e] = np.float64(ws[e]) * bm_all[r, blk]
                    wb_mid[e] = np.float64(ws[e]) * bm_low[r, blk]
                    wb_low[e] = np.float64(ws[e]) * bm_low2[r, blk]
                else:
                    cur[e] = _gallop(docs, cur[e], indptr[t + 1], w_lo)
                    end[e] = _gallop(docs, cur[e], indptr[t + 1], d_hi)
                    wb_high[e] = b_high[e]
                    wb_mid[e] = b_mid[e]
                    wb_low[e] = b_low[e]
            # The non-essential bounds: the smallest, while their sum times the slack stays
            # under ne_frac times the k-th score (none while fewer than k hits are held).
            for e in range(n):
                level[e] = 3
                resid[e] = 0.0
            ne_bound = 0.0
            theta = max(seed, np.float64(hs[0])) if size == k else seed
            if theta > 0.0:
                theta_ne = theta * ne_frac
                for v in by_ratio:
                    e = v % n
                    tier = v // n  # 0: bottom, 1: mid, 2: high
                    if split[e]:
                        if level[e] != 3 - tier:
                            continue  # the tier under it is read
                        cost = (wb_low[e] if tier == 0 else wb_mid[e] - wb_low[e] if tier == 1
                                else wb_high[e] - wb_mid[e])
                    else:
                        if tier != 2:
                            continue
                        cost = wb_high[e]
                    if cost > 0.0 and (ne_bound + cost) * slack >= theta_ne:
                        continue
                    ne_bound += cost
                    level[e] = 2 - tier
                    resid[e] = (wb_low[e] if tier == 0 else wb_mid[e] if tier == 1
                                else wb_high[e])
            if ne_bound == 0.0:
                # Every list read in full, in query order: the exact term-at-a-time sums.
                stats[1] += 1
                size = _taat_block(docs, weights, ws, cur, end, allowed, use_allowed, w_lo,
                                   width, k, size, hs, hi, acc, touched, stats)
                continue
            # Essential lists into the accumulator: partial sums of the docs they reach.
            total = 0
            for e in range(n):
                t = ts[e]
                r = off_row[t]
                above[e] = np.inf
                if level[e] == 1:
                    above[e] = tau[t]
                    total += _tier_window(h_docs, h_indptr, h_offs, aligned, r, blk, t, e, w_lo, d_hi,
                                          cur_h, end_h)
                elif level[e] == 2:
                    above[e] = tau2[t]
                    got = _tier_window(m_docs, m_indptr, m_offs, aligned, r, blk, t, e, w_lo, d_hi,
                                       cur_m, end_m)
                    total += got
                    stats[7] += got
                elif level[e] == 3:
                    total += end[e] - cur[e]
            stats[2] += total
            # Docs whose partial sum is under cut cannot enter (rounded down: lets more through).
            # At least the smallest positive float32: a doc none of the lists read reaches is
            # bounded by the unread ones alone, under the k-th score.
            cut = max(np.float32((theta / slack - ne_bound) * (1.0 - 1e-6)),
                      np.float32(1.4e-45))
            n_cand = 0
            if total * 4 >= width:
                # Docs recorded as their partial sum reaches cut (sums only grow: once each).
                n_up = 0
                for e in range(n):
                    if level[e] == 1:
                        n_up = _scatter_cut(h_docs, h_weights, ws[e], cur_h[e], end_h[e], w_lo,
                                            acc, cut, touched, n_up)
                    elif level[e] == 2:
                        n_up = _scatter_cut(m_docs, m_weights, ws[e], cur_m[e], end_m[e], w_lo,
                                            acc, cut, touched, n_up)
                    elif level[e] == 3:
                        n_up = _scatter_cut(docs, weights, ws[e], cur[e], end[e], w_lo, acc,
                                            cut, touched, n_up)
                for j in range(n_up):
                    d = touched[j]
                    if use_allowed and not allowed[w_lo + d]:
                        continue
                    cand[n_cand] = w_lo + d
                    cbound[n_cand] = acc[d]
                    n_cand += 1
                acc[:width] = 0.0
                order = np.argsort(cand[:n_cand])
                cand[:n_cand] = cand[:n_cand][order]
                cbound[:n_cand] = cbound[:n_cand][order]
            else:
                n_touched = 0
                for e in range(n):
                    if level[e] == 1:
                        n_touched = _scatter_touched(h_docs, h_weights, ws[e], cur_h[e],
                                                     end_h[e], w_lo, acc, touched, n_touched)
                    elif level[e] == 2:
                        n_touched = _scatter_touched(m_docs, m_weights, ws[e], cur_m[e],
                                                     end_m[e], w_lo, acc, touched, n_touched)
                    elif level[e] == 3:
                        n_touched = _scatter_touched(docs, weights, ws[e], cur[e], end[e],
                                                     w_lo, acc, touched, n_touched)
                for j in range(n_touched):
                    d = touched[j]
                    s = acc[d]
                    acc[d] = 0.0
                    if s < cut:
                        continue
                    if use_allowed and not allowed[w_lo + d]:
                        continue
                    cand[n_cand] = w_lo + np.int32(d)
                    cbound[n_cand] = s
                    n_cand += 1
                # Candidates in row order, for the galloping searches.
                order = np.argsort(cand[:n_cand])
                cand[:n_cand] = cand[:n_cand][order]
                cbound[:n_cand] = cbound[:n_cand][order]
            stats[3] += n_cand
            if n_cand == 0:
                continue
            if fwd[0].shape[0] > 1:
                size, theta = _eval_forward(fwd, ts, ws, qmap, found, resid, cand, cbound, n_cand,
                                            slack, seed, theta, k, size, hs, hi, stats)
                continue
            size, theta = _eval_candidates(docs, weights, skip, ts, ws, above, resid, cur, end,
                                           cand, cbound, n_cand, slack, seed, theta, k, size,
                                           hs, hi, cw, c_idx, c_sum, stats)
        _heap_drain(hs, hi, size, out_s[item], out_i[item])


@njit(cache=True)
def _query_map(ts, vocab):
    """The query's terms for :func:`_fwd_score`: ``(keys, vals, present)``, an open-addressing
    hash table (``keys[slot]`` a term, -1: empty, ``vals[slot]`` its entry, at least 4 slots an
    entry) and a bit per vocabulary term, set for the query's (a row's terms are mostly not
    the query's: one bit test rules each out); empty ``keys`` if a term occurs twice (then
    rows are searched per entry)."""
    n = ts.shape[0]
    bits = 6
    while (1 << bits) < 4 * n:
        bits += 1
    keys = np.full(1 << bits, -1, np.int32)
    vals = np.empty(1 << bits, np.int32)
    present = np.zeros((vocab + 7) >> 3, np.uint8)
    mask = (1 << bits) - 1
    for e in range(n):
        t = ts[e]
        present[t >> 3] |= np.uint8(1 << (t & 7))
        h = _hash_slot(t, bits)
        while keys[h] >= 0:
            if keys[h] == t:
                return np.empty(0, np.int32), vals, present
            h = (h + 1) & mask
        keys[h] = t
        vals[h] = e
    return keys, vals, present


@njit(cache=True, inline="always")
def _hash_slot(t, bits):
    return np.int64(((np.uint64(t) * np.uint64(2654435769)) & np.uint64(0xFFFFFFFF))
                    >> np.uint64(32 - bits))


@njit(cache=True)
def _fwd_score(fwd, ts, ws, qmap, found, row):
    """The exact score of doc ``row`` from the forward index ``fwd = (f_indptr, f_terms,
    f_weights)`` (row ``r``'s terms ascending at ``f_terms[2 * f_indptr[r]:][:len]``, their
    weights at ``f_weights[2 * f_indptr[r] + len:][:len]``, one buffer): the float32 sum over
    the query's entries in query order of ``w * weight``, a missing term adding nothing, which
    is the term-at-a-time kernel's arithmetic. The row's terms are looked up in the query's
    hash table ``qmap`` (:func:`_query_map`) and the entries found summed in entry order
    (``found``: scratch of the query's length); without a table, a binary search in the row
    per entry."""
    f_indptr, f_terms, f_weights = fwd
    lo = 2 * f_indptr[row]
    m = f_indptr[row + 1] - f_indptr[row]
    hi = lo + m
    s = np.float32(0.0)
    keys, vals, present = qmap
    if keys.shape[0] == 0:
        for e in range(ts.shape[0]):
            p = _lower_bound(f_terms, lo, hi, ts[e])
            if p < hi and f_terms[p] == ts[e]:
                s += ws[e] * f_weights[p + m]
        return s
    mask = keys.shape[0] - 1
    bits = 0
    while (1 << bits) < keys.shape[0]:
        bits += 1
    n = ts.shape[0]
    nf = 0
    for p in range(lo, hi):
        t = f_terms[p]
        if not present[t >> 3] & np.uint8(1 << (t & 7)):
            continue
        h = _hash_slot(t, bits)
        while keys[h] >= 0 and keys[h] != t:
            h = (h + 1) & mask
        if keys[h] == t:
            # Kept in entry order (already so when the query's terms ascend): found[j] the
            # entry, found[n + j] the weight's position.
            e = vals[h]
            j = nf
            while j > 0 and found[j - 1] > e:
                found[j] = found[j - 1]
                found[n + j] = found[n + j - 1]
                j -= 1
            found[j] = e
            found[n + j] = p + m
            nf += 1
    for j in range(nf):
        s += ws[found[j]] * f_weights[found[n + j]]
    return s


@njit(cache=True)
def _eval_forward(fwd, ts, ws, qmap, found, resid, cand, cbound, n_cand, slack, seed, theta, k,
                  size, hs, hi, stats):
    """:func:`_eval_candidates` with a forward index: each candidate whose bound (its partial
    sum plus every unread bound) can reach ``theta`` gets its exact score from its row."""
    rest = 0.0
    for e in range(ts.shape[0]):
        rest += resid[e]
    n_live = 0
    for c in range(n_cand):  # those that can enter now, kept in place, rows prefetched
        if (cbound[c] + rest) * slack >= theta:
            cand[n_live] = cand[c]
            cbound[n_live] = cbound[c]
            n_live += 1
    _prefetch_rows(fwd, cand, n_live)
    for c in range(n_live):
        if (cbound[c] + rest) * slack < theta:  # theta rises as they are scored
            continue
        row = np.int64(cand[c])
        s = _fwd_score(fwd, ts, ws, qmap, found, row)
        stats[4] += 1
        size, theta = _offer_exact(hs, hi, size, k, s, row, theta, seed)
    return size, theta


@njit(cache=True)
def _forward(indptr, docs, weights, f_indptr, words):
    """Fills ``words`` (2 nnz int32) with the forward index of the postings: doc ``r``'s terms
    ascending, then their weights' bits, at ``words[2 * f_indptr[r]:2 * f_indptr[r + 1]]``
    (``f_indptr``: the docs' cumulated posting counts). Allocated by numpy, which asks the
    kernel for huge pages: one look-up a row then costs one TLB entry, not two."""
    vocab = indptr.shape[0] - 1
    n_docs = f_indptr.shape[0] - 1
    bits = weights.view(np.int32)
    fill = np.zeros(n_docs, np.int64)
    cur = indptr[:vocab].copy()
    # Doc range by doc range (each list's postings ascend by doc): the rows written stay
    # closer together while a range is filled (1M docs, loaded machine: 1.0 s in ranges of
    # 2**17 docs, 1.2-1.7 s with 2**13-2**19, 2.3 s in one pass, as scipy's tocsr).
    step = 1 << 17
    for d_lo in range(0, n_docs, step):
        d_hi = min(d_lo + step, n_docs)
        for t in range(vocab):
            p = cur[t]
            end = indptr[t + 1]
            while p < end and docs[p] < d_hi:
                r = docs[p]
                m = f_indptr[r + 1] - f_indptr[r]
                j = 2 * f_indptr[r] + fill[r]
                words[j] = t
                words[j + m] = bits[p]
                fill[r] += 1
                p += 1
            cur[t] = p


@njit(cache=True)
def _eval_candidates(docs, weights, skip, ts, ws, above, resid, cur, end, cand, cbound,
                     n_cand, slack, seed, theta, k, size, hs, hi, cw, c_idx, c_sum, stats):
    """MaxScore's second half for one window: the candidates ``cand[:n_cand]`` (rows, with
    ``cbound`` their partial sums over the lists read) are looked up in the lists not read
    (``resid[e]`` > 0: the bound of what entry ``e`` did not read; it read its postings
    heavier than ``above[e]``, already in ``cbound``), largest bound first, and
    dropped as soon as their bound cannot reach the k-th score ``theta``; the survivors get
    their exact score, the float32 sum over every entry in query order, as term at a time (a
    missing term adds nothing), and are offered to the heap. Returns ``(size, theta)``.

    Candidates go list by list in chunks of ``cw.shape[0]``, not one by one: the searches
    of one list for different candidates do not depend on each other, so their cache misses
    overlap (one candidate's searches in list after list wait for each other's bounds).
    ``theta`` rises between chunks only. ``cbound`` is updated in place."""
    n = ts.shape[0]
    by_resid = np.argsort(-resid)
    m = 0
    while m < n and resid[by_resid[m]] > 0.0:
        m += 1
    rest = np.empty(m + 1, np.float64)
    rest[m] = 0.0
    for i in range(m - 1, -1, -1):
        rest[i] = rest[i + 1] + resid[by_resid[i]]
    chunk = cw.shape[0]
    for c0 in range(0, n_cand, chunk):
        n_alive = min(chunk, n_cand - c0)
        for j in range(n_alive):
            c_idx[j] = c0 + j
        for i in range(m):
            e = by_resid[i]
            lo = cur[e]
            up = end[e]
            w = ws[e]
            read_above = above[e]
            kept = 0
            for j in range(n_alive):
                c = c_idx[j]
                bound = cbound[c]
                if (bound + rest[i]) * slack < theta:
                    continue
                row = cand[c]
                p = _seek(docs, skip, lo, up, row)
                x = np.float32(0.0)
                if p < up and docs[p] == row:
                    x = w * weights[p]
                    if not weights[p] > read_above:
                        cbound[c] = bound + x
                cw[c - c0, e] = x
                c_idx[kept] = c
                kept += 1
            stats[5] += kept
            n_alive = kept
        kept = 0
        for j in range(n_alive):
            c = c_idx[j]
            if cbound[c] * slack >= theta:
                c_idx[kept] = c
                c_sum[kept] = 0.0
                kept += 1
        n_alive = kept
        stats[4] += n_alive
        # Exact scores, entry by entry in query order for every survivor at once.
        for e in range(n):
            if resid[e] > 0.0:
                for j in range(n_alive):
                    c_sum[j] += cw[c_idx[j] - c0, e]
            else:
                lo = cur[e]
                up = end[e]
                w = ws[e]
                for j in range(n_alive):
                    row = cand[c_idx[j]]
                    p = _seek(docs, skip, lo, up, row)
                    if p < up and docs[p] == row:
                        c_sum[j] += w * weights[p]
        for j in range(n_alive):
            size, theta = _offer_exact(hs, hi, size, k, c_sum[j], np.int64(cand[c_idx[j]]), theta, seed)
    return size, theta


@njit(cache=True, inline="always")
def _offer_exact(hs, hi, size, k, s, row, theta, seed):
    """Offer a candidate's exact score ``s`` to the top-``k`` heap (ties go to the lower row);
    returns ``(size, theta)``, ``theta`` raised to the heap's floor once it holds ``k``."""
    if s <= 0.0 or (size == k and (s < hs[0] or (s == hs[0] and row > hi[0]))):
        return size, theta
    size = _heap_push(hs, hi, size, k, s, row)
    if size == k:
        theta = max(seed, np.float64(hs[0]))
    return size, theta


@njit(cache=True)
def _taat_block(docs, weights, ws, cur, end, allowed, use_allowed, d_lo, width, k, size,
                hs, hi, acc, touched, stats):
    """Every list over one block, term at a time in query order (the exact float32 sums): the
    search kernel's inner loop. Returns the new heap size."""
    n = ws.shape[0]
    total = 0
    for e in range(n):
        total += end[e] - cur[e]
    stats[2] += total
    if total * 4 >= width:
        for e in range(n):
            _scatter(docs, weights, ws[e], cur[e], end[e], d_lo, acc)
        size = _offer_all(acc, width, d_lo, allowed, use_allowed, k, size, hs, hi)
        acc[:width] = 0.0
        return size
    n_touched = 0
    for e in range(n):
        n_touched = _scatter_touched(docs, weights, ws[e], cur[e], end[e], d_lo, acc, touched,
                                     n_touched)
    return _offer_touched(acc, touched, n_touched, d_lo, allowed, use_allowed, k, size, hs, hi)


@njit(cache=True, parallel=True)
def _pruned_parallel(indptr, docs, weights, term_max, tau, low_max, h_indptr, h_docs,
                     h_weights, tau2, low2_max, m_indptr, m_docs, m_weights, off_row, offs,
                     h_offs, m_offs, bm_all, bm_low, bm_low2, skip, tops, fwd, q_indptr, q_idx,
                     q_w, seeds, allowed, use_allowed, shift, first_width, n_docs, ne_frac,
                     seed_top, seed_budget, n_parts, n_chunks, out_s, out_i, acc,
                     touched, cand, cbound, stats):
    n_items = out_s.shape[0]
    for c in prange(n_chunks):
        _pruned_items(indptr, docs, weights, term_max, tau, low_max, h_indptr, h_docs,
                      h_weights, tau2, low2_max, m_indptr, m_docs, m_weights, off_row, offs,
                      h_offs, m_offs, bm_all, bm_low, bm_low2, skip, tops, fwd, q_indptr, q_idx,
                      q_w, seeds, allowed, use_allowed, shift, first_width, n_docs, ne_frac,
                      seed_top, seed_budget, n_parts, c * n_items // n_chunks,
                      (c + 1) * n_items // n_chunks, out_s, out_i, acc[c], touched[c], cand[c],
                      cbound[c], stats[c])


@njit(cache=True)
def _count_part(indptr, indices, data, n_parts, r, counts, maxima):
    """Non-zero entries per term, and their largest weight, among the docs of range ``r`` of
    ``n_parts``: accumulated into ``counts`` and ``maxima`` ``(V,)``."""
    n_docs = indptr.shape[0] - 1
    for p in range(indptr[r * n_docs // n_parts], indptr[(r + 1) * n_docs // n_parts]):
        t = np.uint32(indices[p])
        w = data[p]
        counts[t] += w != 0.0  # branch-free: twice as fast
        maxima[t] = max(maxima[t], w)


@njit(cache=True)
def _scatter_part(indptr, indices, data, n_parts, r, fill, docs, weights):
    """Second half of the counting-sort transpose for doc range ``r``: it writes each term's
    postings from ``fill[t]`` on, after those of earlier ranges, so rows come out ascending."""
    n_docs = indptr.shape[0] - 1
    for d in range(r * n_docs // n_parts, (r + 1) * n_docs // n_parts):
        for p in range(indptr[d], indptr[d + 1]):
            w = data[p]
            if w != 0.0:
                # Unsigned indices skip numba's negative-index wraparound: ~30% here.
                t = np.uint32(indices[p])
                f = np.uint64(fill[t])
                docs[f] = d
                weights[f] = w
                fill[t] += 1


@njit(cache=True, parallel=True)
def _count_parallel(indptr, indices, data, counts, maxima):
    for r in prange(counts.shape[0]):
        _count_part(indptr, indices, data, counts.shape[0], r, counts[r], maxima[r])


@njit(cache=True, parallel=True)
def _scatter_parallel(indptr, indices, data, fill, docs, weights):
    for r in prange(fill.shape[0]):
        _scatter_part(indptr, indices, data, fill.shape[0], r, fill[r], docs, weights)


@njit(cache=True)
def _offsets(counts, indptr, fill):
    """Term pointers from per-range counts ``(n_parts, V)``, and where each range starts
    writing each term: after the earlier ranges' postings of that term."""
    pos = 0
    for t in range(counts.shape[1]):
        indptr[t] = pos
        for r in range(counts.shape[0]):
            fill[r, t] = pos
            pos += counts[r, t]
    indptr[counts.shape[1]] = pos


def _transpose(csr: sp.csr_matrix, n_parts: int):
    """(indptr, docs, weights, term_max) of the postings of a canonical float32 CSR."""
    vocab = csr.shape[1]
    counts = np.zeros((n_parts, vocab), np.int32)  # a term has < 2**31 docs per range
    maxima = np.zeros((n_parts, vocab), np.float32)
    if n_parts == 1:
        _count_part(csr.indptr, csr.indices, csr.data, 1, 0, counts[0], maxima[0])
    else:
        _count_parallel(csr.indptr, csr.indices, csr.data, counts, maxima)
    indptr = np.empty(vocab + 1, np.int64)
    # int32 positions where they fit: half the cache footprint of the scatter's hot array.
    fill = np.empty((n_parts, vocab), np.int32 if csr.nnz < 2**31 else np.int64)
    _offsets(counts, indptr, fill)
    nnz = int(indptr[-1])
    # Allocated by numpy, which asks for huge pages: the scatter is TLB-bound without them.
    docs = np.empty(nnz, np.int32)
    weights = np.empty(nnz, np.float32)
    if n_parts == 1:
        _scatter_part(csr.indptr, csr.indices, csr.data, 1, 0, fill[0], docs, weights)
    else:
        _scatter_parallel(csr.indptr, csr.indices, csr.data, fill, docs, weights)
    term_max = maxima[0] if n_parts == 1 else maxima.max(axis=0)
    return indptr, docs, weights, term_max


_local = threading.local()


def _scratch(n_chunks: int, width: int):
    """The pruned kernel's scratch arrays ``(acc, touched, cand, cbound)``, ``(n_chunks, width)``
    each, kept per calling thread: allocating and first touching them cost ~0.4 ms a query.
    The kernel leaves ``acc`` zero; it is zeroed again only if the last call did not finish."""
    arrays = getattr(_local, "arrays", None)
    if arrays is None or arrays[0].shape[0] < n_chunks or arrays[0].shape[1] < width:
        arrays = (np.zeros((n_chunks, width), np.float32), np.empty((n_chunks, width), np.int32),
                  np.empty((n_chunks, width), np.int32), np.empty((n_chunks, width), np.float32))
        _local.arrays = arrays
    elif not getattr(_local, "clean", True):
        arrays[0][:] = 0.0
    _local.clean = False
    return tuple(a[:n_chunks, :width] for a in arrays)


def _readonly(a: np.ndarray) -> np.ndarray:
    # Kernels always see read-only arrays (as loaded memmaps are), so each compiles once.
    v = np.asarray(a).view()
    v.flags.writeable = False
    return v


_CSR_TYPES = (sp.csr_matrix, sp.csr_array)


def _as_query_csr(q, vocab_size: int) -> sp.csr_matrix:
    # The common case (a float32 CSR of the right width) in a few attribute reads: with the
    # caches cold, as after other work, the general checks below cost ~0.08 ms a query.
    if type(q) in _CSR_TYPES and q.data.dtype == np.float32 and len(q.shape) == 2 \
            and q.shape[1] == vocab_size:
        data = q.data
        if data.size and not data.min() >= 0:  # also catches NaN, which min() propagates
            raise ValueError("query weights must be >= 0 and not NaN "
                             "(learned-sparse weights are non-negative)")
        return q
    if not sp.issparse(q):
        raise TypeError(f"queries must be a scipy.sparse CSR matrix (nq, {vocab_size}), "
                        f"got {type(q)}")
    if q.ndim != 2 or q.shape[1] != vocab_size:
        raise ValueError(f"queries have shape {q.shape}; "
                         f"this index has a vocabulary of {vocab_size}")
    if not np.issubdtype(q.dtype, np.floating):
        raise TypeError(f"query weights must be floating point, got {q.dtype}")
    if q.format != "csr" or q.dtype != np.float32:
        q = sp.csr_matrix(q, dtype=np.float32)
    if q.nnz and not q.data.min() >= 0:  # also catches NaN, which min() propagates
        raise ValueError("query weights must be >= 0 and not NaN "
                         "(learned-sparse weights are non-negative)")
    return q


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return int(k)


def _check_allowed(allowed, n_docs: int) -> tuple[np.ndarray, bool]:
    if allowed is None:
        return np.zeros(0, np.bool_), False
    allowed = np.asarray(allowed)
    if allowed.dtype != np.bool_:
        raise TypeError(f"allowed must be a bool mask, got dtype {allowed.dtype}")
    if allowed.shape != (n_docs,):
        raise ValueError(f"allowed has shape {allowed.shape}, expected ({n_docs},)")
    return np.ascontiguousarray(allowed), True


def _check_rows(path, indptr: np.ndarray, n_docs: int, chunks) -> None:
    """One chunked pass over a postings file of int32 rows: every row in ``[0, n_docs)``, strictly
    ascending inside each posting list (the blocked searches binary-search them). A row may not
    exceed its predecessor only where a new list starts; ``indptr`` was checked non-decreasing, so
    its inner values are the sorted list starts (repeats for empty lists)."""
    starts = indptr[1:-1]
    pos, prev = 0, None
    for a in chunks(path, np.int32):
        if a.min() < 0 or a.max() >= n_docs:
            raise IndexFormatError(f"{path}: document ids must lie in [0, {n_docs})")
        bad = pos + 1 + np.flatnonzero(a[1:] <= a[:-1])
        if prev is not None and a[0] <= prev:
            bad = np.concatenate([[pos], bad])
        if bad.size:
            at = np.searchsorted(starts, bad)
            if not (at < starts.size).all() or not (starts[np.minimum(at, starts.size - 1)] == bad).all():
                raise IndexFormatError(f"{path}: document ids must ascend strictly within each posting list")
        prev = a[-1]
        pos += a.size


def _check_postings(paths: dict, indptr: np.ndarray, n_docs: int, chunks) -> None:
    """One chunked pass over the postings: doc ids checked by :func:`_check_rows`, weights finite
    and >= 0 (the kernel records a touched doc once because weights never decrease a score)."""
    _check_rows(paths["docs"], indptr, n_docs, chunks)
    for w in chunks(paths["weights"], np.float32):
        if not (w.min() >= 0 and w.max() < np.inf):  # min() is NaN if any is
            raise IndexFormatError(f"{paths['weights']}: weights must be finite and >= 0")


class SparsePostings:
    """Inverted index of one segment's learned-sparse weights.

    Attributes:
        indptr: ``(V + 1,)`` int64; term ``t`` owns postings ``indptr[t]:indptr[t + 1]``.
        docs: ``(nnz,)`` int32 local document rows, strictly ascending within each term.
        weights: ``(nnz,)`` float32 positive document weights, aligned with ``docs``.
        term_max: ``(V,)`` float32 largest weight of each term (0 for unused terms), an upper
            bound for pruning.
        n_docs: number of documents (rows) in the segment, empty ones included.
    """

    def __init__(self, indptr, docs, weights, term_max, n_docs: int):
        self.indptr = _readonly(indptr)
        self.docs = _readonly(docs)
        self.weights = _readonly(weights)
        self.term_max = _readonly(term_max)
        self.n_docs = int(n_docs)
        self._lock = threading.Lock()
        self._split_lists = None  # the pruned kernel's split lists, built on first use
        self._split_key = None
        self._weight_max = 0.0
        self._list_lengths = None
        # Counters of the pruned kernel summed over calls, for the benchmark (not thread safe):
        # see _pruned_items.
        self.prune_stats = np.zeros((1, 8), np.int64)
        # kernel="auto": running share of postings its pruned searches read (None: none yet),
        # searches it sent to the scan since the last pruned one, and how many went each way
        self._read_share = None
        self._scanned = 0
        self.auto_counts = {"taat": 0, "pruned": 0}

    @property
    def vocab_size(self) -> int:
        return int(self.indptr.shape[0] - 1)

    @classmethod
    def from_csr(cls, csr) -> SparsePostings:
        """Build from a ``(n_docs, V)`` scipy CSR of float weights (explicit zeros dropped)."""
        if not sp.issparse(csr) or csr.ndim != 2:
            raise TypeError(f"from_csr needs a 2-d scipy.sparse matrix, got {type(csr)}")
        if not np.issubdtype(csr.dtype, np.floating):
            raise TypeError(f"document weights must be floating point, got {csr.dtype}")
        n_docs, vocab = csr.shape
        if n_docs >= 2**31 or vocab >= 2**31:
            raise ValueError("a segment holds fewer than 2**31 documents and terms (int32 ids)")
        csr = sp.csr_matrix(csr, dtype=np.float32)
        if csr.nnz and not (0 <= int(csr.indices.min()) and int(csr.indices.max()) < vocab):
            raise ValueError(f"term ids must lie in [0, {vocab}) (the matrix's width), got "
                             f"{int(csr.indices.min())}..{int(csr.indices.max())}")
        if not csr.has_canonical_format:  # repeated (doc, term) entries would repeat postings
            csr = csr.copy()
            csr.sum_duplicates()
        if csr.nnz and not csr.data.min() >= 0:  # also catches NaN, which min() propagates
            raise ValueError("document weights must be >= 0 and not NaN "
                             "(learned-sparse weights are non-negative)")
        # Parallel only where the pool wake-up is negligible next to the work.
        n_parts = numba.get_num_threads() if csr.nnz >= PARALLEL_MIN_POSTINGS else 1
        return cls(*_transpose(csr, n_parts), n_docs)

    def save(self, folder: str | Path, prefix: str = "sparse") -> None:
        """Write the five ``{prefix}_*.npy`` files of the module docstring into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, arr in self._files().items():
            np.save(folder / f"{prefix}_{name}.npy", arr, allow_pickle=False)

    def _files(self) -> dict[str, np.ndarray]:
        return {"indptr": self.indptr, "docs": self.docs, "weights": self.weights,
                "term_max": self.term_max, "n_docs": np.array(self.n_docs, np.int64)}

    @classmethod
    def load(cls, folder: str | Path, prefix: str = "sparse", mmap: bool = True, *,
             vocab_size: int | None = None, n_docs: int | None = None,
             check_postings: bool = True) -> SparsePostings:
        """Open files written by :meth:`save`, treating them as untrusted; with ``mmap`` the
        postings stay on disk until read.

        Before anything is allocated from them: no links, dtypes, shapes and file sizes
        (indptr ``(V + 1,)`` with ``V == vocab_size`` when given, term_max ``(V,)``, docs and
        weights ``(nnz,)``, n_docs 0-d and ``== n_docs`` when given). Then indptr starts at 0,
        never decreases and ends at nnz (O(V)); with ``check_postings`` (one chunked pass over
        the files, leaving no mapped pages) every doc id lies in ``[0, n_docs)`` and ascends
        strictly within its posting list, and every weight is finite and >= 0 -- what the
        kernels rely on to stay inside their buffers. IndexFormatError names the bad file.
        """
        from hybridsearch.index.storage import load_npy, npy_chunks, read_npy_header

        folder = Path(folder)
        paths = {name: folder / f"{prefix}_{name}.npy"
                 for name in ("indptr", "docs", "weights", "term_max", "n_docs")}
        for path in paths.values():
            if not os.path.lexists(path):
                raise IndexFormatError(f"missing {path}; was this segment saved with "
                                       f"prefix {prefix!r}?")
        vocab = None if vocab_size is None else int(vocab_size)
        indptr_shape, _, _ = read_npy_header(paths["indptr"], np.int64,
                                             (None if vocab is None else vocab + 1,))
        docs_shape, _, _ = read_npy_header(paths["docs"], np.int32, (None,))
        weights_shape, _, _ = read_npy_header(paths["weights"], np.float32)
        term_max_shape, _, _ = read_npy_header(paths["term_max"], np.float32)
        if (indptr_shape[0] < 1 or weights_shape != docs_shape
                or term_max_shape != (indptr_shape[0] - 1,)):
            raise IndexFormatError(f"sparse files under {folder} with prefix {prefix!r} are "
                                   f"inconsistent: indptr {indptr_shape}, docs {docs_shape}, "
                                   f"weights {weights_shape}, term_max {term_max_shape}")
        n_file = int(load_npy(paths["n_docs"], mmap=False, dtype=np.int64, shape=()))
        if n_file < 0 or n_file >= 2**31 or (n_docs is not None and n_file != n_docs):
            raise IndexFormatError(f"{paths['n_docs']} says {n_file} documents, expected "
                                   f"{n_docs if n_docs is not None else 'fewer than 2**31'}")
        nnz = docs_shape[0]
        indptr = load_npy(paths["indptr"], mmap=mmap, dtype=np.int64)
        ip = np.asarray(indptr)
        if not (ip[0] == 0 and ip[-1] == nnz and bool((ip[1:] >= ip[:-1]).all())):
            raise IndexFormatError(f"{paths['indptr']}: must start at 0, never decrease and end at "
                                   f"{nnz}; sparse files under {folder} with prefix {prefix!r} "
                                   "are inconsistent")
        if check_postings and nnz:
            _check_postings(paths, ip, n_file, npy_chunks)
        arrs = {name: load_npy(paths[name], mmap=mmap) for name in ("docs", "weights", "term_max")}
        return cls(indptr, arrs["docs"], arrs["weights"], arrs["term_max"], n_file)

    def search(self, q, k: int, allowed: np.ndarray | None = None, *,
               kernel: str = "auto") -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by sparse dot product for a batch of queries.

        Args:
            q: ``(nq, V)`` scipy CSR of non-negative float query weights.
            k: number of results per query, >= 1.
            allowed: ``(n_docs,)`` bool mask, False for deleted or filtered-out rows; None
                allows all.
            kernel: ``"taat"`` (term-at-a-time over every posting), ``"pruned"`` (exact
                block-max pruning, see the module docstring) or ``"auto"``: pruned from
                :data:`PRUNED_MIN_DOCS` documents on while ``k`` is at most one
                :data:`PRUNED_DOCS_PER_K`-th of them, unless this segment's pruned searches
                have been reading more than :data:`PRUNED_MAX_READ` of their postings (then
                the scan, with a pruned search again every :data:`PRUNED_REPROBE`-th). All
                three return identical results.

        Returns:
            ``scores`` ``(nq, k)`` float32 and ``ids`` ``(nq, k)`` int64 local rows, best first.
        """
        if kernel not in ("auto", "taat", "pruned"):
            raise ValueError(f"kernel must be 'auto', 'taat' or 'pruned', got {kernel!r}")
        q = _as_query_csr(q, self.vocab_size)
        k = _check_k(k)
        allowed, use_allowed = _check_allowed(allowed, self.n_docs)
        nq = q.shape[0]
        out_s = np.zeros((nq, k), np.float32)
        out_i = np.empty((nq, k), np.int64)
        out_i.fill(-1)
        if nq == 0 or self.n_docs == 0:
            return out_s, out_i
        auto = kernel == "auto"
        if auto:
            kernel = self._auto_kernel(k)
        q_indptr = _readonly(q.indptr.astype(np.int64))
        q_idx = _readonly(q.indices.astype(np.int32))
        q_w = _readonly(q.data)
        postings = int(self._lengths()[q.indices].sum())
        # Below PARALLEL_MIN_POSTINGS no kernel uses threads (and asking costs ~0.02 ms cold).
        threads = numba.get_num_threads() if postings >= PARALLEL_MIN_POSTINGS else 1
        if kernel == "pruned" and self._prunable(q):
            read = self._search_pruned(q_indptr, q_idx, q_w, k, allowed, use_allowed,
                                       postings, threads, out_s, out_i)
            if auto and postings:
                self._observe_read(read / postings)
            return out_s, out_i
        block = min(self.n_docs, BLOCK_DOCS)
        n_blocks = -(-self.n_docs // block)
        args = (self.indptr, self.docs, self.weights, q_indptr, q_idx, q_w, _readonly(allowed),
                use_allowed, self.n_docs, block, n_blocks)
        part_s, part_i = (out_s, out_i) if n_blocks == 1 else (
            np.zeros((nq * n_blocks, k), np.float32), np.full((nq * n_blocks, k), -1, np.int64))
        n_items = nq * n_blocks
        if threads == 1 or n_items == 1 or postings < PARALLEL_MIN_POSTINGS:
            _search_items(*args, 0, n_items, part_s, part_i)
        else:
            _search_parallel(*args, min(threads, n_items), part_s, part_i)
        if n_blocks > 1:
            _merge_blocks(part_s, part_i, n_blocks, out_s, out_i)
        return out_s, out_i

    def _lengths(self) -> np.ndarray:
        """``(V,)`` int64 postings per term (computed once)."""
        lengths = self._list_lengths
        if lengths is None:
            lengths = self._list_lengths = np.diff(self.indptr)
        return lengths

    def _auto_kernel(self, k: int) -> str:
        if self.n_docs < PRUNED_MIN_DOCS or k * PRUNED_DOCS_PER_K > self.n_docs:
            self.auto_counts["taat"] += 1
            return "taat"
        with self._lock:
            share = self._read_share
            if share is not None and share > PRUNED_MAX_READ and self._scanned + 1 < PRUNED_REPROBE:
                self._scanned += 1
                self.auto_counts["taat"] += 1
                return "taat"
            self._scanned = 0
            self.auto_counts["pruned"] += 1
            return "pruned"

    def _observe_read(self, share: float) -> None:
        with self._lock:
            prev = self._read_share
            self._read_share = share if prev is None else prev + PRUNED_READ_EMA * (share - prev)

    def _split(self):
        """The pruned kernel's split lists and block offsets, computed on first use (a few
        passes over the postings, O(nnz)) and kept: ``(tau, low_max, h_indptr, h_docs,
        h_weights, tau2, low2_max, m_indptr, m_docs, m_weights, off_row, offs, h_offs, m_offs,
        b_max, b_low, b_low2, skip)`` (high lists, mid lists, block starts and maxima, doc-id
        sample), rebuilt if the PRUNE_* settings change."""
        mid_factor = min(PRUNE_MID_FACTOR, PRUNE_SPLIT_FACTOR)  # the mid list holds the high
        key = (PRUNE_SPLIT_MIN, PRUNE_SPLIT_FACTOR, mid_factor, PRUNE_BLOCK_SHIFT,
               PRUNE_OFFSETS_MIN, PRUNE_FORWARD, PRUNE_SEED_TOPS)
        with self._lock:
            if self._split_lists is None or self._split_key != key:
                high = _split_lists(self.indptr, self.docs, self.weights, PRUNE_SPLIT_MIN,
                                    PRUNE_SPLIT_FACTOR)
                mid = _split_lists(self.indptr, self.docs, self.weights, PRUNE_SPLIT_MIN,
                                   mid_factor)
                row, offs, h_offs, b_max, b_low = _block_offsets(
                    self.indptr, self.docs, self.weights, high[0], high[2], high[3],
                    PRUNE_BLOCK_SHIFT, self.n_docs, PRUNE_OFFSETS_MIN)
                _, _, m_offs, _, b_low2 = _block_offsets(
                    self.indptr, self.docs, self.weights, mid[0], mid[2], mid[3],
                    PRUNE_BLOCK_SHIFT, self.n_docs, PRUNE_OFFSETS_MIN)
                skip = np.ascontiguousarray(self.docs[::64])  # for _seek
                arrays = high + mid + (row, offs, h_offs, m_offs, b_max, b_low, b_low2, skip)
                if PRUNE_FORWARD:
                    f_indptr = np.zeros(self.n_docs + 1, np.int64)
                    np.cumsum(np.bincount(self.docs, minlength=self.n_docs), out=f_indptr[1:])
                    words = np.empty(2 * int(f_indptr[-1]), np.int32)
                    _forward(self.indptr, self.docs, self.weights, f_indptr, words)
                    fwd = (f_indptr, words, words.view(np.float32))
                else:
                    fwd = (np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
                tops = _tops(self.indptr, self.docs, self.weights, max(int(PRUNE_SEED_TOPS), 1))
                self._split_lists = tuple(_readonly(a) for a in arrays) + (
                    tuple(_readonly(a) for a in tops), tuple(_readonly(a) for a in fwd))
                self._split_key = key
                self._weight_max = float(self.term_max.max()) if self.term_max.size else 0.0
            return self._split_lists

    def _prunable(self, q: sp.csr_matrix) -> bool:
        """Whether the pruned kernel's float64 bounds hold: finite query weights and no sum that
        could overflow float32 (the term-at-a-time kernel serves the rest)."""
        self._split()
        data = q.data
        if not data.size:
            return True
        longest = data.size if q.shape[0] == 1 else int(np.diff(q.indptr).max())
        # The weights are >= 0 and not NaN (checked on entry): finite if their largest is.
        top = float(data.max())
        return top < np.inf and top * self._weight_max * longest < 1e37

    def _search_pruned(self, q_indptr, q_idx, q_w, k, allowed, use_allowed, postings, threads,
                       out_s, out_i):
        split = self._split()
        nq = out_s.shape[0]
        n_blocks = -(-self.n_docs // (1 << PRUNE_BLOCK_SHIFT))
        # It reads a fraction of the query terms' postings (7-25% measured at 1M documents), so
        # threads pay off from PRUNE_PARALLEL_FACTOR times the term-at-a-time threshold: on 2
        # cores, a 1M-doc query (~5M postings) took 1.0 ms on two threads against 1.4 on one.
        parallel = threads > 1 and postings >= PARALLEL_MIN_POSTINGS * PRUNE_PARALLEL_FACTOR
        # One query alone is split over the threads by blocks (each part keeps its own top-k).
        n_parts = threads if parallel and nq < threads else 1
        n_parts = max(1, min(n_parts, n_blocks))
        part_s, part_i = (out_s, out_i) if n_parts == 1 else (
            np.zeros((nq * n_parts, k), np.float32), np.full((nq * n_parts, k), -1, np.int64))
        n_items = nq * n_parts
        seeds = _readonly(np.zeros(nq, np.float32))
        args = (self.indptr, self.docs, self.weights, self.term_max, *split, q_indptr, q_idx,
                q_w, seeds, _readonly(allowed), use_allowed, PRUNE_BLOCK_SHIFT,
                min(PRUNE_FIRST_DOCS, 1 << PRUNE_BLOCK_SHIFT), self.n_docs,
                min(float(PRUNE_NE_FRAC), 1.0), PRUNE_SEED_TERMS, PRUNE_SEED_LOOKUPS, n_parts)
        n_chunks = 1 if not parallel or n_items == 1 else min(threads, n_items)
        scratch = _scratch(n_chunks, 1 << PRUNE_BLOCK_SHIFT)
        stats = np.zeros((n_chunks, self.prune_stats.shape[1]), np.int64)
        if n_chunks == 1:
            _pruned_items(*args, 0, n_items, part_s, part_i, *(a[0] for a in scratch), stats[0])
        else:
            _pruned_parallel(*args, n_chunks, part_s, part_i, *scratch, stats)
        stats = stats[0] if n_chunks == 1 else stats.sum(axis=0)
        self.prune_stats[0] += stats
        _local.clean = True
        if n_parts > 1:
            _merge_blocks(part_s, part_i, n_parts, out_s, out_i)
        return int(stats[2])

    def score(self, q_indices: np.ndarray, q_weights: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """Exact scores of one query against chosen rows, equal to what :meth:`search` computes.

        Args:
            q_indices: ``(e,)`` integer term ids of the query.
            q_weights: ``(e,)`` non-negative float query weights.
            cand: ``(c,)`` integer local rows (any order, repeats allowed).

        Returns:
            ``(c,)`` float32 scores aligned with ``cand`` (0 for rows sharing no term).
        """
        q_idx = np.ascontiguousarray(q_indices)
        q_w = np.ascontiguousarray(q_weights)
        cand = np.ascontiguousarray(cand)
        if q_idx.ndim != 1 or q_w.shape != q_idx.shape:
            raise ValueError(f"q_indices {q_idx.shape} and q_weights {q_w.shape} must be equal 1-d")
        for name, a in (("q_indices", q_idx), ("cand", cand)):
            if a.size and not np.issubdtype(a.dtype, np.integer):
                raise TypeError(f"{name} must be integers, got {a.dtype}")
        if q_w.size and not np.issubdtype(q_w.dtype, np.floating):
            raise TypeError(f"q_weights must be floating point, got {q_w.dtype}")
        if cand.ndim != 1:
            raise ValueError(f"cand must be 1-d, got shape {cand.shape}")
        if q_idx.size and (q_idx.min() < 0 or q_idx.max() >= self.vocab_size):
            raise ValueError(f"q_indices must lie in [0, {self.vocab_size})")
        if q_w.size and not q_w.min() >= 0:
            raise ValueError("query weights must be >= 0 and not NaN")
        if cand.size and (cand.min() < 0 or cand.max() >= self.n_docs):
            raise ValueError(f"cand rows must lie in [0, {self.n_docs})")
        return _score_candidates(self.indptr, self.docs, self.weights,
                                 _readonly(q_idx.astype(np.int32)),
                                 _readonly(q_w.astype(np.float32)),
                                 _readonly(cand.astype(np.int64)))


def brute_force_topk(doc_csr, q_csr, k: int, allowed: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Reference for :meth:`SparsePostings.search`: ``q @ doc.T`` densified, then a full sort.

    ``doc_csr`` ``(n_docs, V)``, ``q_csr`` ``(nq, V)``; returns ``(nq, k)`` float32 scores and
    int64 ids with the module's conventions.
    """
    k = _check_k(k)
    n_docs = doc_csr.shape[0]
    allowed, use_allowed = _check_allowed(allowed, n_docs)
    q = _as_query_csr(q_csr, doc_csr.shape[1])
    dense = (q @ sp.csr_matrix(doc_csr, dtype=np.float32).T).toarray().astype(np.float32)
    out_s = np.zeros((q.shape[0], k), np.float32)
    out_i = np.full((q.shape[0], k), -1, np.int64)
    rows = np.arange(n_docs)
    for r in range(q.shape[0]):
        hit = dense[r] > 0
        if use_allowed:
            hit &= allowed
        ids = rows[hit]
        order = np.lexsort((ids, -dense[r, ids]))[:k]
        out_s[r, : order.size] = dense[r, ids[order]]
        out_i[r, : order.size] = ids[order]
    return out_s, out_i


# ----------------------------------------------------------------------------- merging


@njit(cache=True)
def _merge_count(indptr, docs, weights, remap, counts, maxima):
    """Add to ``counts[t]`` the postings of term ``t`` whose row survives (``remap >= 0``)."""
    for t in range(indptr.shape[0] - 1):
        c = 0
        mx = maxima[t]
        for p in range(indptr[t], indptr[t + 1]):
            if remap[docs[p]] >= 0:
                c += 1
                if weights[p] > mx:
                    mx = weights[p]
        counts[t] += c
        maxima[t] = mx


@njit(cache=True)
def _merge_fill(indptr, docs, weights, remap, fill, out_docs, out_weights):
    """Append the surviving postings of each term at ``fill[t]`` with their new rows."""
    for t in range(indptr.shape[0] - 1):
        f = fill[t]
        for p in range(indptr[t], indptr[t + 1]):
            r = remap[docs[p]]
            if r >= 0:
                out_docs[f] = r
                out_weights[f] = weights[p]
                f += 1
        fill[t] = f


def merge_postings(folder: str | Path, prefix: str, sources) -> list[str]:
    """Write the postings of the concatenation of ``sources`` into ``folder``, streaming.

    ``sources`` is a list of ``(SparsePostings, rows)``: the kept rows (ascending int64) of each
    source, in output order. Posting lists stay sorted because sources are appended in order and
    rows ascend within each. Memory: O(V + rows of one source); the output arrays are written
    through memory maps, so their pages go to disk, not to this process's heap. Returns the
    file names written (not fsynced).
    """
    from numpy.lib.format import open_memmap

    folder = Path(folder)
    if not sources:
        raise ValueError("merge_postings needs at least one source")
    vocab = sources[0][0].vocab_size
    counts = np.zeros(vocab, np.int64)
    maxima = np.zeros(vocab, np.float32)
    remaps, base = [], 0
    for p, rows in sources:
        if p.vocab_size != vocab:
            raise ValueError(f"sources disagree on the vocabulary size ({p.vocab_size} != {vocab})")
        rows = np.asarray(rows, np.int64)
        remap = np.full(p.n_docs, -1, np.int32)
        remap[rows] = np.arange(base, base + len(rows), dtype=np.int32)
        base += len(rows)
        remaps.append(remap)
        _merge_count(p.indptr, p.docs, p.weights, remap, counts, maxima)
    indptr = np.zeros(vocab + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    nnz = int(indptr[-1])
    names = [f"{prefix}_{n}.npy" for n in ("indptr", "docs", "weights", "term_max", "n_docs")]
    np.save(folder / names[0], indptr, allow_pickle=False)
    out_docs = open_memmap(folder / names[1], mode="w+", dtype=np.int32, shape=(nnz,))
    out_weights = open_memmap(folder / names[2], mode="w+", dtype=np.float32, shape=(nnz,))
    if nnz:
        fill = indptr[:-1].copy()
        for (p, _), remap in zip(sources, remaps):
            _merge_fill(p.indptr, p.docs, p.weights, remap, fill, out_docs, out_weights)
    out_docs.flush()
    out_weights.flush()
    del out_docs, out_weights
    np.save(folder / names[3], maxima, allow_pickle=False)
    np.save(folder / names[4], np.array(base, np.int64), allow_pickle=False)
    return names
