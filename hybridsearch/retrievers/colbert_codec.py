"""Compressed ColBERT token vectors: residual codes on a k-means codebook, and token pooling.

A residual codec (ColBERTv2/PLAID style) stores each token as the id of its nearest centroid
(uint16, so ``k <= 65536``) plus ``nbits * dim`` bits for the residual ``r = v - centroids[id]``.
At d=1024 and 1 bit a token is 2 + 128 = 130 bytes against 2,048 for float16.

Two layouts share the kernels:

* **transform** (codec format 2, what :meth:`ColbertCodec.train` makes by default). The residual
  is rotated into the principal axes of the training residuals (``z = r @ rotation``, an
  orthogonal ``(dim, dim)`` matrix) and the bit budget is spread over the rotated dimensions by
  their measured quantisation error: ``sections = (n4, n2, n1)`` dimensions, in order of
  decreasing variance, get 4, 2 and 1 bits (``4 n4 + 2 n2 + n1 = nbits * dim``, each a multiple
  of 8) and the rest none. Each coded dimension has its own quantile cutoffs and bucket means;
  an uncoded dimension decodes to the training mean (``fill``). Learned ColBERT vectors are
  strongly anisotropic, so this beats one bit everywhere at the same size (SciFact, 1024-d,
  bench/results/colbert_codec.md). MaxSim runs in the rotated space: queries are rotated once
  (``q @ rotation``), which keeps every dot product.
* **uniform** (codec format 1, read for older indexes and available with ``transform=False``):
  no rotation, every dimension ``nbits`` bits with global cutoffs (quantiles over every residual
  value) and bucket weights (the mean value in each bucket).

Decoded tokens are ``centroid + weight`` per dimension (in the rotated space for transform
codecs), optionally (``renorm``) scaled back to unit length. Renormalising is off by default: it
turns the residual's error into a multiplicative error on the centroid's (dominant) share of
every score.

Residual bits are packed little-endian within each byte, section after section (4-bit
dimensions first, then 2-bit, then 1-bit): with ``per = 8 // width`` dimensions a byte, the
``l``-th dimension of a section lives in byte ``section_start + l // per`` at bit
``width * (l % per)``. A uniform codec is one section of ``dim`` dimensions.

Token pooling (``pool=2``) merges each document's tokens into ``ceil(n / 2)`` groups by greedy
average-linkage agglomerative clustering on cosine similarity, each group replaced by its
L2-normalised mean; it runs before coding, so a pooled store has its own (pooled) offsets.

Files written by :meth:`ColbertCodec.save` into one folder:

* ``codec.json`` ``{"format_version", "kind", "nbits", "pool", "dim", "k", "renorm",
  "trained_on"}`` plus, in format 2, ``"transform"`` and ``"sections"`` ``[n4, n2, n1]``;
* ``centroids.npy`` ``(k, dim)`` float32 unit rows (unrotated);
* uniform: ``cutoffs.npy`` ``(2**nbits - 1,)`` and ``weights.npy`` ``(2**nbits,)`` float32
  ascending;
* transform: ``rotation.npy`` ``(dim, dim)`` float32 orthogonal, ``cutoffs.npy``
  ``(n_coded, 15)`` and ``weights.npy`` ``(n_coded, 16)`` float32, each row ascending (a
  dimension of width w uses its first ``2**w - 1`` cutoffs and ``2**w`` weights, the rest repeat
  the last), ``fill.npy`` ``(dim,)`` float32.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from hybridsearch.errors import IndexFormatError
from hybridsearch.retrievers import _nibbles

CODEC_FILES = ("codec.json", "centroids.npy", "cutoffs.npy", "weights.npy")
TRANSFORM_FILES = CODEC_FILES + ("rotation.npy", "fill.npy")
CODEC_FORMAT_VERSION = 2
# Bits a transform codec may give one rotated dimension (byte-aligned sections).
WIDTHS = (4, 2, 1)
MAX_LEVELS = 16
# Rows of the training residuals used for their covariance (the rotation).
COV_SAMPLE = 1 << 16
# Rows held out of k-means and the rotation, for a transform codec's per-dimension cutoffs,
# weights and bit allocation (at least, up to half the sample).
STATS_MIN_ROWS = 4096
# Codec names accepted by parse_codec.
CODECS = {
    "fp16": {"kind": "fp16", "nbits": None, "pool": 1},
    "res1": {"kind": "residual", "nbits": 1, "pool": 1},
    "res2": {"kind": "residual", "nbits": 2, "pool": 1},
    "res1-pool2": {"kind": "residual", "nbits": 1, "pool": 2},
}
# How an index trains each codec: most centroids, renormalisation, transform layout. With the
# transform layout K=256 without renormalisation is used for every codec: more centroids cost
# encode time (tokens x K x dim) and did not raise the ranking agreement of 1-bit codes
# (bench/results/colbert_codec.md).
INDEX_TRAINING = {"res1": {"k_max": 256, "renorm": False, "transform": True},
                  "res2": {"k_max": 256, "renorm": False, "transform": True},
                  "res1-pool2": {"k_max": 256, "renorm": False, "transform": True}}
# Centroid count: PLAID's 2**floor(log2(16 * sqrt(tokens))), capped, since encoding costs
# tokens * k * dim multiply-adds. At d=1024 on one core: K=256 codes ~130k tokens per CPU-second,
# K=1024 ~42k, K=4096 ~11k, i.e. 100M tokens (1M BGE-M3 passages) in ~6.5 / 20 / 75 minutes on
# 2 cores. Quality by K on SciFact: bench/results/colbert_codec.md.
K_MAX = 256
K_LIMIT = 1 << 16  # ids are uint16
# Rows a caller should pass to train(): k-means cost grows with it, quality barely does.
MAX_TRAIN_SAMPLE = 1 << 17
KMEANS_NITER = 20
# Tokens per encode chunk are chosen so its (chunk, k) score matrix stays near this size.
ENCODE_CHUNK_BYTES = 32 << 20
# Longer documents are pooled window by window (the similarity matrix is window^2 float64).
POOL_WINDOW = 1024
_MAX_JSON_BYTES = 1 << 16


def parse_codec(spec: str) -> dict:
    """``{"name", "kind" ("fp16" | "residual"), "nbits" (None | 1 | 2), "pool" (1 | 2)}`` of a
    codec name; ValueError listing the valid names otherwise."""
    if not isinstance(spec, str) or spec not in CODECS:
        raise ValueError(f"unknown ColBERT codec {spec!r}; valid names: {', '.join(CODECS)}")
    return {"name": spec, **CODECS[spec]}


def default_k(total_tokens: int) -> int:
    """``min(2**floor(log2(16 * sqrt(total_tokens))), K_MAX)`` (at least 1)."""
    if total_tokens < 1:
        return 1
    return int(min(2 ** math.floor(math.log2(16 * math.sqrt(total_tokens))), K_MAX, K_LIMIT))


# ---------------------------------------------------------------- Numba kernels


@intrinsic
def _half_to_float(typingctx, bits):
    """float16 bit pattern (uint16) -> float32; numba has no CPU float16, LLVM has (F16C)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@njit(cache=True)
def _widen(bits, out):
    """float16 bit patterns -> float32, flat (numpy's astype is several times slower)."""
    for x in range(bits.shape[0]):
        out[x] = _half_to_float(bits[x])


@njit(cache=True, parallel=True)
def _widen_parallel(bits, n_chunks, out):
    t = bits.shape[0]
    for c in prange(n_chunks):
        _widen(bits[c * t // n_chunks:(c + 1) * t // n_chunks],
               out[c * t // n_chunks:(c + 1) * t // n_chunks])


@njit(cache=True, parallel=True)
def _residual_codes(z, cut, nlev, byte, shift, out):
    """Pack the bucket of every coded dimension ``j < len(nlev)`` of the residual rows ``z``
    ``(T, dim)`` float32 into ``out`` ``(T, residual_bytes)`` uint8: the bucket is the number
    of the dimension's first ``nlev[j] - 1`` cutoffs ``cut[j]`` below ``z[i, j]``."""
    t = z.shape[0]
    nd = nlev.shape[0]
    for i in prange(t):
        for b in range(out.shape[1]):
            out[i, b] = 0
        for j in range(nd):
            v = z[i, j]
            bucket = 0
            for u in range(nlev[j] - 1):
                if v > cut[j, u]:
                    bucket += 1
            out[i, byte[j]] |= np.uint8(bucket << shift[j])


# Byte -> its 8 bits (least significant first) as float32 0/1, for the 1-bit sections.
_BITS = ((np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1).astype(np.float32)


@njit(cache=True, nogil=True)
def _decode_relative(res, start, n, w4, w2, d1, stride, out):
    """The coded dimensions of tokens ``[start, start + n)`` relative to their base: token ``t``
    goes to ``out[t * stride:t * stride + n_coded]`` (flat float32). A code adds ``w4[j, code]``
    (4-bit dimensions), ``w2[j, code]`` (2-bit) or ``code * d1[j]`` (1-bit) to bucket 0's value,
    which the base holds; the section sizes are the tables' lengths. Literal widths let LLVM
    vectorise each byte."""
    n4 = w4.shape[0]
    n2 = w2.shape[0]
    n1 = d1.shape[0]
    b2 = n4 // 2
    b1 = b2 + n2 // 4
    for t in range(n):
        row = res[start + t]
        o = t * stride
        for b in range(n4 // 2):
            byte = row[b]
            out[o + 2 * b] = w4[2 * b, byte & 15]
            out[o + 2 * b + 1] = w4[2 * b + 1, byte >> 4]
        for b in range(n2 // 4):
            byte = row[b2 + b]
            j = 4 * b
            for s in range(4):
                out[o + n4 + j + s] = w2[j + s, (byte >> (2 * s)) & 3]
        base = o + n4 + n2
        for b in range(n1 // 8):
            bits = _BITS[row[b1 + b]]  # the byte's 8 bits as 0.0 / 1.0: one vector multiply
            j = 8 * b
            for s in range(8):
                out[base + j + s] = bits[s] * d1[j + s]


@njit(cache=True, nogil=True)
def _decode_tokens(ids, res, start, n, base, w4, w2, d1, renorm, out):
    """Decode tokens ``[start, start + n)`` into ``out[:n * d]`` (flat float32): ``base[id]``
    (the centroid in the coding space, plus each coded dimension's bucket-0 weight and ``fill``
    beyond the coded dimensions) plus :func:`_decode_relative`."""
    d = base.shape[1]
    nc = w4.shape[0] + w2.shape[0] + d1.shape[0]
    _decode_relative(res, start, n, w4, w2, d1, d, out)
    for t in range(n):
        c = base[ids[start + t]]
        o = t * d
        for j in range(nc):
            out[o + j] += c[j]
        for j in range(nc, d):
            out[o + j] = c[j]
        if renorm:
            ss = np.float32(0.0)
            for j in range(d):
                ss += out[o + j] * out[o + j]
            if ss > 0:
                inv = np.float32(1.0) / np.sqrt(ss)
                for j in range(d):
                    out[o + j] *= inv


@njit(cache=True, parallel=True)
def _decode_parallel(ids, res, base, w4, w2, d1, renorm, n_chunks, out):
    t = ids.shape[0]
    d = base.shape[1]
    flat = out.reshape(-1)
    for c in prange(n_chunks):
        lo = c * t // n_chunks
        hi = (c + 1) * t // n_chunks
        _decode_tokens(ids, res, lo, hi - lo, base, w4, w2, d1, renorm, flat[lo * d:hi * d])


def _layout(sections) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per coded dimension: levels, byte and bit shift in the packed sections
    ``[(width, count), ...]`` (in ``WIDTHS`` order)."""
    nlev, byte, shift = [], [], []
    b0 = 0
    for width, count in sections:
        per = 8 // width
        loc = np.arange(count)
        nlev.append(np.full(count, 1 << width))
        byte.append(b0 + loc // per)
        shift.append(width * (loc % per))
        b0 += count // per
    cat = [np.ascontiguousarray(np.concatenate(a) if a else np.zeros(0), dtype=np.int64)
           for a in (nlev, byte, shift)]
    return cat[0], cat[1], cat[2]


def _pack(buckets: np.ndarray, nbits: int) -> np.ndarray:
    """``(T, d)`` bucket numbers < 2**nbits -> ``(T, d * nbits // 8)`` uint8, little-endian."""
    if nbits == 1:
        return np.packbits(buckets.astype(bool), axis=1, bitorder="little")
    per = 8 // nbits
    t, d = buckets.shape
    g = buckets.reshape(t, d // per, per).astype(np.uint8)
    out = np.zeros((t, d // per), np.uint8)
    for s in range(per):
        out |= g[:, :, s] << np.uint8(nbits * s)
    return out


def unpack_buckets(residual: np.ndarray, nbits: int) -> np.ndarray:
    """Inverse of the packing: ``(T, d * nbits // 8)`` uint8 -> ``(T, d)`` uint8 bucket numbers."""
    residual = np.asarray(residual, np.uint8)
    per = 8 // nbits
    shifts = (nbits * np.arange(per)).astype(np.uint8)
    b = (residual[:, :, None] >> shifts) & np.uint8((1 << nbits) - 1)
    return b.reshape(residual.shape[0], residual.shape[1] * per)


# ---------------------------------------------------------------- token pooling


@njit(cache=True, fastmath={"reassoc", "contract", "nsz"})
def _gram(x):
    """``x @ x.T`` in float64 by plain loops. Not ``np.dot``: that calls OpenBLAS, which must not
    run inside the OpenMP threads of a parallel kernel (OpenBLAS warns "Detect OpenMP Loop" and
    may hang)."""
    n, d = x.shape
    sim = np.empty((n, n), np.float64)
    for i in range(n):
        for j in range(i, n):
            acc = 0.0
            for e in range(d):
                acc += np.float64(x[i, e]) * np.float64(x[j, e])
            sim[i, j] = acc
            sim[j, i] = acc
    return sim


@njit(cache=True)
def _pool_window(x, target, out):
    """Greedy average-linkage clustering of the unit rows ``x`` ``(n, d)`` into ``target`` groups.

    Writes the groups' L2-normalised means into ``out[:target]`` ordered by their first token.
    Each step merges the most similar pair (ties to the lowest (i, j)); a per-row best-neighbour
    cache keeps a step near O(n).
    """
    n, d = x.shape
    sim = _gram(x)
    size = np.ones(n, np.float64)
    active = np.ones(n, np.bool_)
    label = np.arange(n)
    best = np.full(n, -1, np.int64)
    best_s = np.full(n, -np.inf)
    for i in range(n):
        for j in range(n):
            if j != i and sim[i, j] > best_s[i]:
                best_s[i] = sim[i, j]
                best[i] = j
    for _ in range(n - target):
        a = -1
        s_a = -np.inf
        for i in range(n):
            if active[i] and best[i] >= 0 and best_s[i] > s_a:
                s_a = best_s[i]
                a = i
        b = best[a]
        if b < a:
            a, b = b, a
        # Merge b into a (a < b): Lance-Williams update for average linkage.
        na = size[a]
        nb = size[b]
        for c in range(n):
            if active[c] and c != a and c != b:
                v = (na * sim[a, c] + nb * sim[b, c]) / (na + nb)
                sim[a, c] = v
                sim[c, a] = v
        size[a] = na + nb
        active[b] = False
        for i in range(n):
            if label[i] == b:
                label[i] = a
        for c in range(n):
            if not active[c]:
                continue
            if c == a or best[c] == a or best[c] == b:
                best[c] = -1
                best_s[c] = -np.inf
                for j in range(n):
                    if j != c and active[j] and sim[c, j] > best_s[c]:
                        best_s[c] = sim[c, j]
                        best[c] = j
            elif sim[c, a] > best_s[c] or (sim[c, a] == best_s[c] and a < best[c]):
                best_s[c] = sim[c, a]
                best[c] = a
    # Groups in order of their first token (the cluster keeps its lowest member's index).
    g = 0
    for i in range(n):
        if active[i]:
            acc = np.zeros(d, np.float64)
            for t in range(n):
                if label[t] == i:
                    for e in range(d):
                        acc[e] += x[t, e]
            ss = 0.0
            for e in range(d):
                ss += acc[e] * acc[e]
            inv = 1.0 / np.sqrt(ss) if ss > 0 else 0.0
            for e in range(d):
                out[g, e] = acc[e] * inv
            g += 1


@njit(cache=True, parallel=True)
def _pool_parallel(x, offsets, new_offsets, factor, window, out):
    n_docs = offsets.shape[0] - 1
    for k in prange(n_docs):
        lo = offsets[k]
        hi = offsets[k + 1]
        o = new_offsets[k]
        for w0 in range(lo, hi, window):
            w1 = min(w0 + window, hi)
            target = (w1 - w0 + factor - 1) // factor
            _pool_window(x[w0:w1], target, out[o:o + target])
            o += target


def _float32(v: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 copy (float16 widened by Numba: numpy's cast is ~4x slower)."""
    if v.dtype == np.float16 and v.size:
        out = np.empty(v.shape, np.float32)
        bits = np.ascontiguousarray(v).view(np.uint16).reshape(-1)
        _widen_parallel(bits, max(1, min(16, bits.shape[0] >> 18)), out.reshape(-1))
        return out
    return np.ascontiguousarray(v, dtype=np.float32)


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _pool_args(vectors, offsets, factor):
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
        raise TypeError(f"vectors must be a 2-d float array, got {vectors.dtype} {vectors.shape}")
    offsets = np.asarray(offsets)
    if (offsets.ndim != 1 or offsets.size == 0 or not np.issubdtype(offsets.dtype, np.integer)
            or offsets[0] != 0 or offsets[-1] != vectors.shape[0] or np.any(np.diff(offsets) < 0)):
        raise ValueError(f"offsets must be a 1-d integer array from 0 to {vectors.shape[0]}, "
                         "never decreasing")
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
    offsets = offsets.astype(np.int64)
    lengths = np.diff(offsets)
    # Windows are multiples of the factor, so the counts add up to ceil(n / factor).
    new_offsets = np.zeros_like(offsets)
    np.cumsum(-(-lengths // factor), out=new_offsets[1:])
    return _unit_rows(vectors), offsets, new_offsets


def _pool_window_size(factor: int) -> int:
    return max(factor, POOL_WINDOW - POOL_WINDOW % factor)


def pool_tokens(vectors: np.ndarray, offsets: np.ndarray, factor: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Pool each document's tokens into ``ceil(n / factor)`` groups (Numba, parallel over docs).

    Args:
        vectors: ``(T, d)`` float token vectors (rows are L2-normalised first).
        offsets: ``(n_docs + 1,)`` integers from 0 to T.
        factor: integer >= 1; 1 returns the normalised vectors unchanged.

    Returns:
        ``(T', d)`` float32 unit vectors (a group's normalised mean, groups in order of their
        first token) and ``(n_docs + 1,)`` int64 offsets, ``T' = sum(ceil(n_i / factor))``.
        Documents longer than ``POOL_WINDOW`` tokens are pooled window by window.
    """
    x, offsets, new_offsets = _pool_args(vectors, offsets, factor)
    if factor == 1:
        return x, offsets
    out = np.zeros((int(new_offsets[-1]), x.shape[1]), np.float32)
    if out.shape[0]:
        _pool_parallel(x, offsets, new_offsets, int(factor), _pool_window_size(int(factor)), out)
    return out, new_offsets


def _pool_window_reference(x: np.ndarray, target: int) -> np.ndarray:
    n = x.shape[0]
    xd = x.astype(np.float64)
    sim = xd @ xd.T
    groups = {i: [i] for i in range(n)}
    while len(groups) > target:
        keys = sorted(groups)
        best = (-np.inf, -1, -1)
        for ai, a in enumerate(keys):
            for b in keys[ai + 1:]:
                if sim[a, b] > best[0]:
                    best = (sim[a, b], a, b)
        _, a, b = best
        na, nb = len(groups[a]), len(groups[b])
        for c in keys:
            if c not in (a, b):
                v = (na * sim[a, c] + nb * sim[b, c]) / (na + nb)
                sim[a, c] = sim[c, a] = v
        groups[a] += groups.pop(b)
    out = np.zeros((target, x.shape[1]), np.float32)
    for g, key in enumerate(sorted(groups)):
        m = xd[groups[key]].sum(axis=0)
        nrm = np.linalg.norm(m)
        out[g] = m / nrm if nrm > 0 else 0
    return out


def pool_tokens_reference(vectors: np.ndarray, offsets: np.ndarray, factor: int
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Plain-Python :func:`pool_tokens` (full similarity matrix scanned at every merge)."""
    x, offsets, new_offsets = _pool_args(vectors, offsets, factor)
    if factor == 1:
        return x, offsets
    out = np.zeros((int(new_offsets[-1]), x.shape[1]), np.float32)
    window = _pool_window_size(int(factor))
    for k in range(offsets.shape[0] - 1):
        o = new_offsets[k]
        for w0 in range(offsets[k], offsets[k + 1], window):
            w1 = min(w0 + window, offsets[k + 1])
            target = -(-(w1 - w0) // factor)
            out[o:o + target] = _pool_window_reference(x[w0:w1], target)
            o += target
    return out, new_offsets


# ---------------------------------------------------------------- the codec


def _open_nofollow(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise IndexFormatError(f"codec file missing: {path}") from None
    except OSError as e:
        raise IndexFormatError(f"codec file {path} cannot be opened ({e}); links are refused") from e
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise IndexFormatError(f"codec file corrupted: {path} is not a regular file")
    return f


class ColbertCodec:
    """A trained residual codebook (immutable once built).

    Attributes:
        nbits: residual bits per dimension on average (1 or 2).
        pool: token pooling factor applied before coding (1 or 2).
        centroids: ``(k, dim)`` float32 unit rows.
        cutoffs, weights: uniform: ``(2**nbits - 1,)`` and ``(2**nbits,)`` float32 ascending;
            transform: ``(n_coded, 15)`` and ``(n_coded, 16)`` float32, rows ascending.
        rotation: ``(dim, dim)`` float32 orthogonal, or None (uniform layout).
        sections: ``(n4, n2, n1)`` rotated dimensions coded with 4, 2 and 1 bits.
        fill: ``(dim,)`` float32 decoded value of uncoded rotated dimensions.
        renorm: decoded tokens are scaled to unit length.
        trained_on: rows of the training sample.
    """

    kind = "residual"

    def __init__(self, centroids: np.ndarray, cutoffs: np.ndarray, weights: np.ndarray, *,
                 nbits: int, pool: int = 1, renorm: bool = False, trained_on: int = 0,
                 rotation: np.ndarray | None = None, sections=None,
                 fill: np.ndarray | None = None):
        if nbits not in (1, 2):
            raise ValueError(f"nbits must be 1 or 2, got {nbits!r}")
        if isinstance(pool, bool) or pool not in (1, 2):
            raise ValueError(f"pool must be 1 or 2, got {pool!r}")
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        cutoffs = np.ascontiguousarray(cutoffs, dtype=np.float32)
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        if centroids.ndim != 2 or not 1 <= centroids.shape[0] <= K_LIMIT:
            raise ValueError(f"centroids must be (k, dim) with 1 <= k <= {K_LIMIT}, "
                             f"got {centroids.shape}")
        dim = centroids.shape[1]
        _check_dim(dim)
        if rotation is None:
            if sections is not None or fill is not None:
                raise ValueError("sections and fill belong to a transform codec (with rotation)")
            if cutoffs.shape != ((1 << nbits) - 1,) or weights.shape != (1 << nbits,):
                raise ValueError(f"{nbits}-bit codec needs {(1 << nbits) - 1} cutoffs and "
                                 f"{1 << nbits} weights, got {cutoffs.shape} and {weights.shape}")
            sections = (0, dim, 0) if nbits == 2 else (0, 0, dim)
            fill = np.zeros(dim, np.float32)
        else:
            rotation = np.ascontiguousarray(rotation, dtype=np.float32)
            sections = _check_sections(sections, nbits, dim)
            n_coded = sum(sections)
            fill = np.ascontiguousarray(fill, dtype=np.float32)
            if rotation.shape != (dim, dim):
                raise ValueError(f"rotation must be ({dim}, {dim}), got {rotation.shape}")
            if cutoffs.shape != (n_coded, MAX_LEVELS - 1) or weights.shape != (n_coded, MAX_LEVELS):
                raise ValueError(f"a transform codec needs ({n_coded}, {MAX_LEVELS - 1}) cutoffs "
                                 f"and ({n_coded}, {MAX_LEVELS}) weights, got {cutoffs.shape} "
                                 f"and {weights.shape}")
            if fill.shape != (dim,):
                raise ValueError(f"fill must be ({dim},), got {fill.shape}")
        for name, a in (("centroids", centroids), ("cutoffs", cutoffs), ("weights", weights),
                        ("rotation", rotation), ("fill", fill)):
            if a is not None and not np.isfinite(a).all():
                raise ValueError(f"{name} must be finite")
        if np.any(np.diff(cutoffs, axis=-1) < 0) or np.any(np.diff(weights, axis=-1) < 0):
            raise ValueError("cutoffs and weights must be ascending")
        if rotation is not None:
            err = np.abs(rotation.astype(np.float64).T @ rotation - np.eye(dim)).max()
            if err > 1e-3:
                raise ValueError(f"rotation must be orthogonal (|R^T R - I| = {err:.3g})")
        self.nbits, self.pool, self.renorm = int(nbits), int(pool), bool(renorm)
        self.trained_on = int(trained_on)
        self.centroids, self.cutoffs, self.weights = centroids, cutoffs, weights
        self.rotation, self.sections, self.fill = rotation, tuple(int(s) for s in sections), fill
        # Kernel tables: per coded dimension levels/byte/shift/mask, cutoffs and weights padded
        # to 16 levels, and the centroids in the coding space with ``fill`` beyond the coded
        # dimensions.
        self._nlev, self._byte, self._shift = _layout(
            [(w, c) for w, c in zip(WIDTHS, self.sections) if c])
        nc = self.n_coded
        if rotation is None:
            self._cut = np.ascontiguousarray(np.broadcast_to(_pad_row(cutoffs, MAX_LEVELS - 1), (nc, MAX_LEVELS - 1)))
            w = np.ascontiguousarray(np.broadcast_to(_pad_row(weights, MAX_LEVELS), (nc, MAX_LEVELS)))
            base = centroids.astype(np.float64)
        else:
            self._cut, w = cutoffs, weights
            base = centroids.astype(np.float64) @ rotation.astype(np.float64)
            base[:, nc:] += fill[nc:]
        # Decode tables: bucket 0 folded into the base, the sections' weights relative to it.
        base[:, :nc] += w[:, 0]
        rel = w.astype(np.float64) - w[:, :1]
        n4, n2, n1 = self.sections
        self._base = np.ascontiguousarray(base, dtype=np.float32)
        self._w4 = np.ascontiguousarray(rel[:n4], dtype=np.float32)
        self._w2 = np.ascontiguousarray(rel[n4:n4 + n2, :4], dtype=np.float32)
        self._d1 = np.ascontiguousarray(rel[n4 + n2:nc, 1], dtype=np.float32)
        self._nibbles = _nibbles.layout(self.sections, self._w4, self._w2)
        self._query_maps = None  # split_query's matrices, made on first use
        for a in (centroids, cutoffs, weights, rotation, fill, self._nlev, self._byte,
                  self._shift, self._cut, self._base, self._w4, self._w2, self._d1):
            if a is not None:
                a.flags.writeable = False

    def with_options(self, *, pool: int | None = None, renorm: bool | None = None) -> ColbertCodec:
        """The same codebook with another pooling factor or renormalisation."""
        t = self.rotation is not None
        return ColbertCodec(self.centroids, self.cutoffs, self.weights, nbits=self.nbits,
                            pool=self.pool if pool is None else pool,
                            renorm=self.renorm if renorm is None else renorm,
                            trained_on=self.trained_on, rotation=self.rotation,
                            sections=self.sections if t else None, fill=self.fill if t else None)

    # -- identity and sizes

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def transform(self) -> bool:
        return self.rotation is not None

    @property
    def n_coded(self) -> int:
        """Dimensions that carry residual bits (all of them for a uniform codec)."""
        return int(sum(self.sections))

    @property
    def name(self) -> str:
        return f"res{self.nbits}" + (f"-pool{self.pool}" if self.pool > 1 else "")

    @property
    def residual_bytes(self) -> int:
        return self.dim * self.nbits // 8

    @property
    def bytes_per_token(self) -> int:
        """Bytes per stored token (uint16 id + packed residual); a pooled store holds about
        ``1 / pool`` as many tokens as the documents had."""
        return 2 + self.residual_bytes

    @property
    def identity(self) -> str:
        """sha256 (hex) of everything decoding depends on: equal identities decode alike."""
        h = hashlib.sha256()
        meta = [self.kind, self.nbits, self.pool, self.dim, self.k, self.renorm]
        if self.transform:
            meta += ["transform", list(self.sections)]
        h.update(json.dumps(meta).encode())
        for a in (self.centroids, self.cutoffs, self.weights, self.rotation, self.fill):
            if a is not None and (a is not self.fill or self.transform):
                h.update(a.tobytes())
        return h.hexdigest()

    def __repr__(self) -> str:
        layout = f"transform {self.sections}" if self.transform else "uniform"
        return (f"ColbertCodec({self.name}, dim={self.dim}, k={self.k}, {layout}, "
                f"renorm={self.renorm}, trained_on={self.trained_on})")

    # -- training

    @classmethod
    def train(cls, sample: np.ndarray, *, nbits: int = 1, pool: int = 1, k: int | None = None,
              total_tokens: int | None = None, seed: int = 0, renorm: bool = False,
              niter: int = KMEANS_NITER, transform: bool = True) -> ColbertCodec:
        """Train on ``sample`` ``(n, dim)`` float16/32 token vectors (pass at most
        ``MAX_TRAIN_SAMPLE`` rows, drawn across the collection).

        ``k`` defaults to :func:`default_k` of ``total_tokens`` (or of ``n``), and is capped to
        the k-means rows. About 5% of the sample (at most 16,384 rows) is held out of k-means to
        set the cutoffs and weights (and, with ``transform``, to measure each rotated
        dimension's error at 0/1/2/4 bits for the bit allocation); the rotation is the
        eigenvectors of the covariance of at most ``COV_SAMPLE`` training residuals.
        ``dim % 8 == 0`` is required.
        """
        import faiss

        if nbits not in (1, 2):
            raise ValueError(f"nbits must be 1 or 2, got {nbits!r}")
        sample = np.asarray(sample)
        if sample.ndim != 2 or not np.issubdtype(sample.dtype, np.floating) or sample.shape[0] < 1:
            raise ValueError(f"sample must be a non-empty (n, dim) float array, "
                             f"got {sample.dtype} {sample.shape}")
        _check_dim(sample.shape[1])
        if sample.shape[0] > 4 * MAX_TRAIN_SAMPLE:
            raise ValueError(f"sample has {sample.shape[0]} rows; pass at most "
                             f"{MAX_TRAIN_SAMPLE} (a random subset)")
        if not np.isfinite(sample).all():
            raise ValueError("sample must be finite")
        x = _unit_rows(sample)
        n, dim = x.shape
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n)
        n_held = min(n // 20, 1 << 14)
        if transform:
            # Per-dimension quantiles and the bit allocation need rows the rotation was not
            # fitted on (in-sample, its top axes overstate the variance they hold).
            n_held = min(max(n_held, min(n // 2, STATS_MIN_ROWS)), 1 << 14)
        held, fit = (x[perm[:n_held]], x[perm[n_held:]]) if n_held else (x, x)
        if k is None:
            k = default_k(total_tokens if total_tokens is not None else n)
            k = min(k, 1 << int(math.floor(math.log2(fit.shape[0]))))
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= K_LIMIT:
            raise ValueError(f"k must be an integer in [1, {K_LIMIT}], got {k!r}")
        if k > fit.shape[0]:
            raise ValueError(f"k={k} centroids need at least {k} training rows, "
                             f"got {fit.shape[0]}")
        km = faiss.Kmeans(dim, int(k), niter=niter, seed=int(seed) + 1, spherical=True,
                          min_points_per_centroid=1,
                          max_points_per_centroid=max(256, -(-fit.shape[0] // int(k))))
        km.train(fit)
        centroids = _unit_rows(km.centroids)
        if not transform:
            cutoffs, weights = _bucket_stats(held, centroids, nbits)
            return cls(centroids, cutoffs, weights, nbits=nbits, pool=pool, renorm=renorm,
                       trained_on=n)
        rotation = _residual_rotation(fit[:COV_SAMPLE], centroids)
        z = _residuals(held, centroids) @ rotation
        stats = {w: _dim_stats(z, w) for w in WIDTHS}
        sections = _allocate(z, stats, nbits * dim)
        cutoffs, weights, off = [], [], 0
        for w, count in zip(WIDTHS, sections):
            cutoffs.append(stats[w][0][off:off + count])
            weights.append(stats[w][1][off:off + count])
            off += count
        return cls(centroids, np.concatenate(cutoffs), np.concatenate(weights), nbits=nbits,
                   pool=pool, renorm=renorm, trained_on=n, rotation=rotation, sections=sections,
                   fill=z.mean(axis=0).astype(np.float32))

    # -- coding

    def _chunk(self) -> int:
        return int(max(256, min(1 << 14, ENCODE_CHUNK_BYTES // (4 * max(self.k, self.dim)))))

    def _encode_chunk(self, x: np.ndarray):
        """float32 ``(n, dim)`` rows -> (ids uint16, residuals uint8)."""
        x = _unit_rows(x)
        ids = np.argmax(x @ self.centroids.T, axis=1)
        z = x - self.centroids[ids]
        if self.rotation is not None:
            z = z @ self.rotation
        res = np.empty((x.shape[0], self.residual_bytes), np.uint8)
        _residual_codes(np.ascontiguousarray(z, dtype=np.float32), self._cut, self._nlev,
                        self._byte, self._shift, res)
        return ids.astype(np.uint16), res

    def encode(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Code ``(T, dim)`` finite float vectors (rows normalised first), a bounded chunk at a
        time: nearest centroid and rotation by BLAS, residual buckets by a Numba kernel.

        Returns ids ``(T,)`` uint16 and residuals ``(T, dim * nbits // 8)`` uint8. No pooling
        here: :func:`pool_tokens` first when ``pool > 1``.
        """
        vectors = self._check_input(vectors)
        t = vectors.shape[0]
        ids = np.empty(t, np.uint16)
        res = np.empty((t, self.residual_bytes), np.uint8)
        step = self._chunk()
        for lo in range(0, t, step):
            hi = min(lo + step, t)
            ids[lo:hi], res[lo:hi] = self._encode_chunk(_float32(vectors[lo:hi]))
        return ids, res

    def encode_reference(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Plain numpy :meth:`encode` (one chunk)."""
        x = _unit_rows(self._check_input(vectors))
        ids = np.argmax(x @ self.centroids.T, axis=1)
        r = x - self.centroids[ids]
        if self.rotation is None:
            buckets = np.searchsorted(self.cutoffs, r.reshape(-1), side="left").reshape(r.shape)
            return ids.astype(np.uint16), _pack(buckets, self.nbits)
        z = r @ self.rotation
        parts, off = [], 0
        for w, count in zip(WIDTHS, self.sections):
            if count:
                cols = []
                for j in range(off, off + count):
                    cols.append(np.searchsorted(self.cutoffs[j, :(1 << w) - 1], z[:, j], side="left"))
                parts.append(_pack(np.stack(cols, axis=1), w))
            off += count
        return ids.astype(np.uint16), np.concatenate(parts, axis=1)

    def _check_input(self, vectors) -> np.ndarray:
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors must be (T, {self.dim}), got shape {vectors.shape}")
        if not np.issubdtype(vectors.dtype, np.floating):
            raise TypeError(f"vectors must be floating point, got {vectors.dtype}")
        return vectors

    def _check_codes(self, ids, residual):
        ids = np.asarray(ids)
        residual = np.asarray(residual)
        if ids.dtype != np.uint16 or ids.ndim != 1:
            raise ValueError(f"ids must be (T,) uint16, got {ids.dtype} {ids.shape}")
        if residual.dtype != np.uint8 or residual.shape != (ids.shape[0], self.residual_bytes):
            raise ValueError(f"residual must be ({ids.shape[0]}, {self.residual_bytes}) uint8, "
                             f"got {residual.dtype} {residual.shape}")
        if ids.size and int(ids.max()) >= self.k:
            raise ValueError(f"ids must be < k={self.k}")
        return ids, residual

    def nibble_layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(weights, first, count)`` of the residual rows' nibble positions
        (:func:`_nibbles.layout`): what the split kernel's tables are built from, with the
        query rows of :meth:`split_query`."""
        return self._nibbles

    def kernel_tables(self) -> tuple:
        """``(base, w4, w2, d1, renorm)``: what the decode kernel takes after
        ``(ids, residuals, start, n)``."""
        return self._base, self._w4, self._w2, self._d1, self.renorm

    def split_query(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What the split kernel scores query rows ``q`` ``(m, dim)`` (unrotated) with:
        ``(coded (m, n_coded), cs (m, k))``, the rotated rows' coded dimensions with the 1-bit
        ones times their weights ``d1`` (the kernel decodes those bits as 0.0 / 1.0), and the
        rotated rows against every base. Both come from one product each with a matrix made
        once per codec (the rotation's coded columns, folded; rotation x bases), not from
        rotating all ``dim`` columns first."""
        maps = self._query_maps
        if maps is None:
            nc = self.n_coded
            fold = np.ones(nc, np.float64)
            fold[nc - self._d1.shape[0]:] = self._d1
            base = self._base.astype(np.float64)
            if self.rotation is None:
                maps = (None, fold.astype(np.float32), np.ascontiguousarray(base.T, dtype=np.float32))
            else:
                r = self.rotation.astype(np.float64)
                maps = (np.ascontiguousarray(r[:, :nc] * fold, dtype=np.float32), None,
                        np.ascontiguousarray(r @ base.T, dtype=np.float32))
            self._query_maps = maps
        q = np.ascontiguousarray(q, dtype=np.float32)
        coded = q[:, :self.n_coded] * maps[1] if maps[0] is None else q @ maps[0]
        return np.ascontiguousarray(coded, dtype=np.float32), np.ascontiguousarray(q @ maps[2])

    def rotate(self, q: np.ndarray) -> np.ndarray:
        """Query vectors ``(m, dim)`` into the coding space (float32; unchanged for a uniform
        codec). Dot products with :meth:`decode_native` tokens equal those with :meth:`decode`."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        return q if self.rotation is None else np.ascontiguousarray(q @ self.rotation)

    def decode_native(self, ids: np.ndarray, residual: np.ndarray) -> np.ndarray:
        """Decode to ``(T, dim)`` float32 in the coding space (rotated for a transform codec)."""
        ids, residual = self._check_codes(ids, residual)
        out = np.empty((ids.shape[0], self.dim), np.float32)
        if ids.size:
            _decode_parallel(ids, np.ascontiguousarray(residual), *self.kernel_tables(),
                             max(1, min(64, ids.shape[0] // 1024)), out)
        return out

    def decode(self, ids: np.ndarray, residual: np.ndarray) -> np.ndarray:
        """``(T,)`` uint16 ids + ``(T, dim * nbits // 8)`` uint8 -> ``(T, dim)`` float32 (Numba),
        in the vectors' own space."""
        out = self.decode_native(ids, residual)
        return out if self.rotation is None else np.ascontiguousarray(out @ self.rotation.T)

    def decode_reference(self, ids: np.ndarray, residual: np.ndarray) -> np.ndarray:
        """Plain numpy :meth:`decode`."""
        ids, residual = self._check_codes(ids, residual)
        c = self.centroids[ids.astype(np.int64)]
        if self.rotation is None:
            v = c + self.weights[unpack_buckets(residual, self.nbits)]
        else:
            z = np.tile(self.fill, (len(ids), 1))
            off = byte = 0
            for w, count in zip(WIDTHS, self.sections):
                if count:
                    nb = count * w // 8
                    codes = unpack_buckets(residual[:, byte:byte + nb], w)
                    z[:, off:off + count] = self.weights[np.arange(off, off + count), codes]
                    byte += nb
                off += count
            v = c + z @ self.rotation.T
        if self.renorm:
            v = _unit_rows(v)
        return v.astype(np.float32)

    # -- files

    def save(self, folder: str | Path) -> list[str]:
        """Write the codec files into ``folder`` (created if needed), each fsynced; returns
        their names. A uniform codec is written in codec format 1, a transform one in 2."""
        from hybridsearch.index.storage import save_npy, write_bytes_durable

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"format_version": 1, "kind": self.kind, "nbits": self.nbits,
                "pool": self.pool, "dim": self.dim, "k": self.k, "renorm": self.renorm,
                "trained_on": self.trained_on}
        arrays = [("centroids", self.centroids), ("cutoffs", self.cutoffs),
                  ("weights", self.weights)]
        if self.transform:
            meta.update(format_version=2, transform=True, sections=list(self.sections))
            arrays += [("rotation", self.rotation), ("fill", self.fill)]
        for name, a in arrays:
            save_npy(folder / f"{name}.npy", a)
        write_bytes_durable(folder / "codec.json", json.dumps(meta, indent=2, sort_keys=True).encode())
        return list(TRANSFORM_FILES if self.transform else CODEC_FILES)

    @classmethod
    def load(cls, folder: str | Path, dim: int | None = None) -> ColbertCodec:
        """Read a codec folder as untrusted: links refused, JSON schema, ``.npy`` dtypes and
        shapes against it, finite values, ascending cutoffs/weights, an orthogonal rotation;
        IndexFormatError naming the file otherwise."""
        from hybridsearch.index.storage import load_npy

        folder = Path(folder)
        path = folder / "codec.json"
        with _open_nofollow(path) as f:
            raw = f.read(_MAX_JSON_BYTES + 1)
        if len(raw) > _MAX_JSON_BYTES:
            raise IndexFormatError(f"codec file corrupted: {path} is larger than {_MAX_JSON_BYTES} bytes")
        try:
            meta = json.loads(raw.decode())
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise IndexFormatError(f"codec file corrupted: {path} ({e})") from e

        def field(key, types, ok):
            v = meta.get(key) if isinstance(meta, dict) else None
            if not isinstance(v, types) or isinstance(v, bool) != (types is bool) or not ok(v):
                raise IndexFormatError(f"codec file corrupted: {path}: bad {key!r}: {v!r}"[:300])
            return v

        version = field("format_version", int, lambda v: v >= 1)
        if version > CODEC_FORMAT_VERSION:
            raise IndexFormatError(f"{path} is codec format {version}; this hybridsearch reads up "
                                   f"to {CODEC_FORMAT_VERSION}. Upgrade hybridsearch to open it.")
        field("kind", str, lambda v: v == cls.kind)
        nbits = field("nbits", int, lambda v: v in (1, 2))
        pool = field("pool", int, lambda v: v in (1, 2))
        d = field("dim", int, lambda v: 8 <= v <= (1 << 16) and v % 8 == 0
                  and (dim is None or v == dim))
        k = field("k", int, lambda v: 1 <= v <= K_LIMIT)
        renorm = field("renorm", bool, lambda v: True)
        trained_on = field("trained_on", int, lambda v: v >= 0)
        transform = version >= 2 and field("transform", bool, lambda v: True)
        if transform:
            sections = field("sections", list, lambda v: len(v) == 3 and all(
                isinstance(s, int) and not isinstance(s, bool) for s in v))
            try:
                sections = _check_sections(sections, nbits, d)
            except ValueError as e:
                raise IndexFormatError(f"codec file corrupted: {path}: {e}") from None
            n_coded = sum(sections)
            shapes = [("centroids", (k, d)), ("cutoffs", (n_coded, MAX_LEVELS - 1)),
                      ("weights", (n_coded, MAX_LEVELS)), ("rotation", (d, d)), ("fill", (d,))]
        else:
            shapes = [("centroids", (k, d)), ("cutoffs", ((1 << nbits) - 1,)),
                      ("weights", (1 << nbits,))]
        arrays = {}
        for name, shape in shapes:
            p = folder / f"{name}.npy"
            a = load_npy(p, mmap=False, dtype=np.float32, shape=shape)
            if not np.isfinite(a).all():
                raise IndexFormatError(f"codec file corrupted: {p} holds non-finite values")
            if name in ("cutoffs", "weights") and np.any(np.diff(a, axis=-1) < 0):
                raise IndexFormatError(f"codec file corrupted: {p} must be ascending")
            arrays[name] = a
        extra = {}
        if transform:
            extra = {"rotation": arrays["rotation"], "sections": sections, "fill": arrays["fill"]}
        try:
            return cls(arrays["centroids"], arrays["cutoffs"], arrays["weights"], nbits=nbits,
                       pool=pool, renorm=renorm, trained_on=trained_on, **extra)
        except ValueError as e:
            raise IndexFormatError(f"codec file corrupted: {folder}: {e}") from None


def _check_dim(dim: int) -> None:
    if dim < 8 or dim % 8:
        raise ValueError(f"residual ColBERT codecs need a dimension that is a multiple of 8 "
                         f"(packed bits), got {dim}; use the fp16 codec for this model")


def _check_sections(sections, nbits: int, dim: int) -> tuple[int, int, int]:
    if sections is None or len(sections) != 3:
        raise ValueError(f"sections must be (n4, n2, n1), got {sections!r}")
    s = tuple(int(v) for v in sections)
    if any(v < 0 or v % 8 for v in s):
        raise ValueError(f"sections must be non-negative multiples of 8, got {s}")
    if sum(w * v for w, v in zip(WIDTHS, s)) != nbits * dim or sum(s) > dim:
        raise ValueError(f"sections {s} must spend exactly {nbits * dim} bits on at most "
                         f"{dim} dimensions")
    return s


def _pad_row(a: np.ndarray, n: int) -> np.ndarray:
    """Extend the last axis of ``a`` to ``n`` entries by repeating its last value."""
    return np.concatenate([a, np.repeat(a[..., -1:], n - a.shape[-1], axis=-1)], axis=-1)


def _residuals(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    ids = np.argmax(x @ centroids.T, axis=1)
    return x - centroids[ids]


def _residual_rotation(fit: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Principal axes of the residuals of ``fit``, by decreasing variance; each column's
    largest entry is made positive, so the result does not depend on the eigen-solver's signs."""
    dim = fit.shape[1]
    cov = np.zeros((dim, dim))
    mean = np.zeros(dim)
    for lo in range(0, fit.shape[0], 8192):
        r = _residuals(fit[lo:lo + 8192], centroids).astype(np.float64)
        cov += r.T @ r
        mean += r.sum(axis=0)
    n = max(fit.shape[0], 1)
    mean /= n
    cov = cov / n - np.outer(mean, mean)
    vals, vecs = np.linalg.eigh(cov)
    vecs = vecs[:, np.argsort(-vals, kind="stable")]
    top = np.argmax(np.abs(vecs), axis=0)
    vecs *= np.where(vecs[top, np.arange(dim)] < 0, -1.0, 1.0)
    return np.ascontiguousarray(vecs, dtype=np.float32)


def _dim_stats(z: np.ndarray, width: int):
    """Per dimension of ``z`` ``(n, dim)`` at ``width`` bits: cutoffs ``(dim, 15)`` (quantiles
    ``i / 2**width``), weights ``(dim, 16)`` (bucket means; an empty bucket takes its nearest
    cutoff), both padded by repetition, and the mean squared error ``(dim,)``."""
    levels = 1 << width
    zd = z.astype(np.float64)
    cut = np.quantile(zd, np.arange(1, levels) / levels, axis=0).T  # (dim, levels - 1)
    buckets = np.zeros(z.shape, np.int64)
    for u in range(levels - 1):
        buckets += zd > cut[:, u]
    weights = np.empty((z.shape[1], levels))
    for b in range(levels):
        hit = buckets == b
        cnt = hit.sum(axis=0)
        s = np.where(hit, zd, 0.0).sum(axis=0)
        near = cut[:, min(b, levels - 2)]
        weights[:, b] = np.where(cnt > 0, s / np.maximum(cnt, 1), near)
    weights = np.maximum.accumulate(weights, axis=1)
    err = ((zd - np.take_along_axis(weights, buckets.T, axis=1).T) ** 2).mean(axis=0)
    return (_pad_row(cut, MAX_LEVELS - 1).astype(np.float32),
            _pad_row(weights, MAX_LEVELS).astype(np.float32), err)


def _allocate(z: np.ndarray, stats: dict, budget: int) -> tuple[int, int, int]:
    """``(n4, n2, n1)`` (multiples of 8, ``4 n4 + 2 n2 + n1 = budget``) with the least total
    squared error of the rotated residuals ``z``, widths decreasing with the dimension's rank
    (the rotation orders them by variance); an uncoded dimension costs its variance."""
    dim = z.shape[1]
    pre = {w: np.concatenate([[0.0], np.cumsum(stats[w][2])]) for w in WIDTHS}
    pre[0] = np.concatenate([[0.0], np.cumsum(z.astype(np.float64).var(axis=0))])
    best = None
    for n4 in range(0, min(dim, budget // 4) + 1, 8):
        for n2 in range(0, min(dim - n4, (budget - 4 * n4) // 2) + 1, 8):
            n1 = budget - 4 * n4 - 2 * n2
            if n1 < 0 or n4 + n2 + n1 > dim:
                continue
            a, b, c = n4, n4 + n2, n4 + n2 + n1
            err = (pre[4][a] + pre[2][b] - pre[2][a] + pre[1][c] - pre[1][b]
                   + pre[0][dim] - pre[0][c])
            if best is None or err < best[0] - 1e-12:
                best = (err, (n4, n2, n1))
    return best[1]


def _bucket_stats(held: np.ndarray, centroids: np.ndarray, nbits: int):
    """Uniform layout: :func:`_dim_stats` of every residual value of ``held`` pooled as one
    dimension (cutoffs = quantiles ``i / 2**nbits``, weights = bucket means)."""
    cut, weights, _ = _dim_stats(_residuals(held, centroids).reshape(-1, 1), nbits)
    levels = 1 << nbits
    return cut[0, :levels - 1].copy(), weights[0, :levels].copy()
