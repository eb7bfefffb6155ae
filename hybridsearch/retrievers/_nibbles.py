"""Nibble tables: how the coded ColBERT kernel scores a token without decoding it.

Past its base (the centroid, scored once per centroid), a coded token's dot product with a
query row is a sum over the token's residual bytes. Each byte holds two nibbles, and the nibble
at position ``p`` (two per byte, the low one first) covers 1, 2 or 4 consecutive coded
dimensions (the codec's 4-, 2- and 1-bit sections). So the nibble's share of the dot product
with query row ``i`` takes one of 16 values, ``T[p, v, i]``, fixed once the query is known.

Per query, :func:`build_tables` fills ``T`` for every nibble position in blocks of up to
``BLOCK_ROWS`` rows (a block is ``(16 * positions, R)`` float32, row-major: 512 KiB for 256
positions and 32 rows, which stays in L2). A token's scores for the ``R`` rows of a block are
then ``2 * nbytes`` vector loads and adds of 8 rows each (:func:`nibble_sum`): no decode and no
multiply, where decoding then multiplying costs one multiply-add per coded dimension and row (up
to ``8 * nbytes``).

:func:`nibble_sum` is written in LLVM IR: Numba's loop vectoriser turns the plain loop into
gathers along the nibbles (5x slower than the kernel it replaces), while this keeps the ``R``
rows in vector registers (one accumulator set per nibble of a byte; with aligned tables a single
set measured the same, 9.5 ms for 28,099 tokens and 32 rows on one thread).
:func:`tables_reference` and :func:`nibble_sum_reference` are plain numpy versions.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

# Query rows per table block; a block's rows are a multiple of LANES (query rows are padded).
BLOCK_ROWS = 32
LANES = 8
_FASTMATH = {"reassoc", "contract", "nsz"}


def layout(sections, w4: np.ndarray, w2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The nibble positions of a residual row coded in ``sections`` ``(n4, n2, n1)`` (4-, 2-
    and 1-bit dimensions, in that order, as :mod:`colbert_codec` packs them), with the 4-bit
    dimensions' 16 values ``w4`` ``(n4, 16)`` and the 2-bit ones' 4 values ``w2`` ``(n2, 4)``;
    a 1-bit dimension is worth its bit (its weight is in the query).

    Returns ``(weights, first, count)``: ``(P, 16, 4)`` float32, the value of each of the
    ``count[p]`` dimensions from ``first[p]`` on (both ``(P,)`` int64) when nibble ``p`` is
    ``v``; unused slots are 0.
    """
    n4, n2, n1 = (int(s) for s in sections)
    v = np.arange(16)
    weights, first, count = [], [], []
    for j in range(n4):
        w = np.zeros((16, 4))
        w[:, 0] = w4[j, v]
        weights.append(w)
        first.append(j)
        count.append(1)
    for j in range(0, n2, 2):
        w = np.zeros((16, 4))
        w[:, 0] = w2[j, v & 3]
        w[:, 1] = w2[j + 1, v >> 2]
        weights.append(w)
        first.append(n4 + j)
        count.append(2)
    for j in range(0, n1, 4):
        w = np.zeros((16, 4))
        for s in range(4):
            w[:, s] = (v >> s) & 1
        weights.append(w)
        first.append(n4 + n2 + j)
        count.append(4)
    out = (np.array(weights, np.float32).reshape(-1, 16, 4), np.array(first, np.int64),
           np.array(count, np.int64))
    for a in out:
        a.flags.writeable = False
    return out


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _query_tables(coded_t, r_start, r_end, weights, first, count, out):
    n_pos = weights.shape[0]
    ne = 16 * n_pos
    for r in range(r_start, r_end, BLOCK_ROWS):
        rows = min(BLOCK_ROWS, r_end - r)
        blk = out[ne * r:ne * (r + rows)]
        for p in range(n_pos):
            d0 = first[p]
            for v in range(16):
                e = blk[(16 * p + v) * rows:(16 * p + v + 1) * rows]
                e[:] = 0
                for s in range(count[p]):
                    w = weights[p, v, s]
                    col = coded_t[d0 + s, r:r + rows]
                    for i in range(rows):
                        e[i] += w * col[i]


@njit(cache=True, nogil=True)
def build_tables(coded_t, q_off8, weights, first, count, out):
    """Tables of queries ``b`` (rows ``q_off8[b]:q_off8[b + 1]`` of ``coded_t`` ``(n_coded,
    rows)``: the rows' coded dimensions, transposed) into ``out`` (flat float32, ``16 * P``
    values per row): query ``b``'s block of rows ``[r, r + R)`` (``R <= BLOCK_ROWS``) is the
    ``(16 * P, R)`` row-major array at ``16 * P * r``, entry ``(16 p + v, i)`` = ``T[p, v, i]``.
    On the calling thread (a process that never opened a parallel region can still fork)."""
    for b in range(q_off8.shape[0] - 1):
        _query_tables(coded_t, q_off8[b], q_off8[b + 1], weights, first, count, out)


@njit(cache=True, parallel=True)
def build_tables_parallel(coded_t, q_off8, weights, first, count, out):
    """:func:`build_tables`, queries spread over Numba's threads."""
    for b in prange(q_off8.shape[0] - 1):
        _query_tables(coded_t, q_off8[b], q_off8[b + 1], weights, first, count, out)


def empty_tables(n: int) -> np.ndarray:
    """``(n,)`` float32 for :func:`build_tables`, its start on a 64-byte boundary: numpy's
    allocations are only 16-byte aligned, and a misaligned table splits one vector load in two
    across cache lines (the kernel ran 1.5x slower in the processes where that happened)."""
    raw = np.empty(n + 16, np.float32)
    skip = (-raw.ctypes.data % 64) // 4
    return raw[skip:skip + n]


def tables_reference(coded: np.ndarray, weights: np.ndarray, first: np.ndarray,
                     count: np.ndarray) -> np.ndarray:
    """Plain numpy ``T`` ``(P, 16, m)`` of query rows ``coded`` ``(m, n_coded)``."""
    coded = np.asarray(coded, np.float64)
    out = np.zeros((weights.shape[0], 16, coded.shape[0]))
    for p in range(weights.shape[0]):
        for s in range(int(count[p])):
            out[p] += np.outer(weights[p, :, s], coded[:, first[p] + s])
    return out.astype(np.float32)


def _nibble_sum(rows: int):
    """The intrinsic for blocks of ``rows`` (a multiple of LANES) query rows."""
    lanes = rows // LANES

    @intrinsic
    def impl(typingctx, table, res, t, nbytes, out):
        for name, a, dt, nd in (("table", table, types.float32, 1), ("res", res, types.uint8, 2),
                                ("out", out, types.float32, 1)):
            if not isinstance(a, types.Array) or a.dtype != dt or a.ndim != nd or a.layout != "C":
                raise TypingError(f"{name} must be a C-contiguous {nd}-d {dt} array, got {a}")

        def codegen(context, builder, sig, args):
            tab = context.make_array(sig.args[0])(context, builder, args[0])
            ra = context.make_array(sig.args[1])(context, builder, args[1])
            oa = context.make_array(sig.args[4])(context, builder, args[4])
            i64 = ir.IntType(64)
            vec = ir.VectorType(ir.FloatType(), LANES)
            vptr = vec.as_pointer()

            def c(x):
                return ir.Constant(i64, x)

            stride = cgutils.unpack_tuple(builder, ra.strides, 2)[0]
            row = builder.gep(ra.data, [builder.mul(args[2], stride)])
            zero = ir.Constant(vec, [0.0] * LANES)
            # acc[h][u]: nibble half h (low / high), lanes u; LLVM keeps them in registers.
            acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(lanes)]
                   for _ in range(2)]
            with cgutils.for_range(builder, args[3]) as loop:
                b = loop.index
                x = builder.zext(builder.load(builder.gep(row, [b])), i64)
                for h, v in ((0, builder.and_(x, c(15))), (1, builder.lshr(x, c(4)))):
                    entry = builder.add(builder.mul(b, c(32)), builder.add(c(16 * h), v))
                    p = builder.gep(tab.data, [builder.mul(entry, c(rows))])
                    for u in range(lanes):
                        w = builder.load(builder.bitcast(builder.gep(p, [c(LANES * u)]), vptr),
                                         align=4)
                        builder.store(builder.fadd(builder.load(acc[h][u]), w), acc[h][u])
            for u in range(lanes):
                s = builder.fadd(builder.load(acc[0][u]), builder.load(acc[1][u]))
                builder.store(s, builder.bitcast(builder.gep(oa.data, [c(LANES * u)]), vptr),
                              align=4)
            return context.get_dummy_value()

        return types.void(table, res, types.int64, types.int64, out), codegen

    return impl


_sum8, _sum16, _sum24, _sum32 = (_nibble_sum(r) for r in (8, 16, 24, 32))


@njit(inline="always")
def nibble_sum(table, res, t, nbytes, rows, out):
    """``out[:rows]`` = the sum over bytes ``b < nbytes`` of residual row ``t`` of ``table``'s
    entries for its two nibbles (``table``: one block, ``(16 * P, rows)`` flat, ``rows`` 8, 16,
    24 or 32). Unchecked: the caller guarantees ``table`` holds ``32 * nbytes * rows`` values,
    ``res`` row ``t`` at least ``nbytes`` bytes and ``out`` ``rows`` values (any byte value
    stays inside the table)."""
    if rows == 32:
        _sum32(table, res, t, nbytes, out)
    elif rows == 24:
        _sum24(table, res, t, nbytes, out)
    elif rows == 16:
        _sum16(table, res, t, nbytes, out)
    else:
        _sum8(table, res, t, nbytes, out)


def nibble_sum_reference(table: np.ndarray, row: np.ndarray, nbytes: int, rows: int) -> np.ndarray:
    """Plain numpy :func:`nibble_sum` of one residual row."""
    t = np.asarray(table, np.float64).reshape(-1, rows)
    x = np.asarray(row[:nbytes], np.int64)
    entries = np.concatenate([32 * np.arange(nbytes) + (x & 15), 32 * np.arange(nbytes) + 16 + (x >> 4)])
    return t[entries].sum(axis=0).astype(np.float32)
