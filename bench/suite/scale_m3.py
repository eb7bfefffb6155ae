"""HybridIndex at BGE-M3's real shapes (100k and 1M documents, all four channels): build rate,
segments, bytes per document per channel, memory (opened index, build peak, compaction peak),
latency per mode, filter cost, a quality sanity check, and Milvus Lite on the same rows at 100k.

    python bench/bench_scale_m3.py --docs 100000 [--colbert-codec res1] [--dense-storage sq8]
    python bench/run.py --sections scale_m3 --m3-docs 100000

Synthetic rows (:class:`Corpus`), generated in blocks of 1,000 from ``(seed, block)`` alone, so
any range can be regenerated and the whole corpus is never in memory:

* dense: 1024-d unit vectors = topic centroid (4,096 topics) + noise;
* learned sparse: ~60 positive weights a document over a 250,002-term vocabulary (Zipf, half the
  terms from the document's topic);
* ColBERT: 50-150 1024-d unit vectors a document (mean 100), each a pool direction (4,096 of
  them, two in three from the topic's own 64) plus 0.35 x another, float32 as the encoder gives
  them (casting 100M vectors to float16 here would cost more than generating them);
* texts: ~60 words over a 100k-word Zipf vocabulary (a third from the topic);
* metadata: ``{"year": 1990..2024, "lang": one of 10 (skewed), "source": one of 1,000}``.

The model folder (:func:`make_model`) is the smallest checkpoint with BGE-M3's shapes (1 layer,
hidden 1024, vocabulary 250,002, both heads; fp16 safetensors, ~0.5 GB) cached under
``bench/.cache/``; it is never run: queries are passed precomputed (``query_encoded=``), derived
from random documents (perturbed vectors, a subset of their terms and words), so each has a real
answer: the document it came from.

Each measurement runs in its own fresh process (``python -m suite.scale_m3 WORKER ARGS_JSON``):
``build`` (commits of 1,000 through ``HybridIndex.add(encoded=...)``, peak RSS = its ru_maxrss,
merges included), ``serve`` (open, RSS, latency per mode, filters, hit rate), ``compact`` and
``milvus_build`` / ``milvus_serve``. A watchdog kills a worker whose RSS passes ``rss_cap_mib``
(the machine is shared) and the table says so.

Files written: the index folder and ``queries/`` under the work folder (removed at the end), and
``bench/results/scale_m3.md`` (tables and, at the end, the raw records as JSON, one per size; a
new run replaces the records of its sizes and keeps the others).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1]
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

TITLE = "Scale at BGE-M3 shape: 1024-d dense, 250k-term sparse, ~100 ColBERT vectors a document"
MODEL_CACHE = BENCH / ".cache"
LANGS = ("en", "zh", "es", "de", "fr", "ja", "ru", "pt", "ar", "ko")
LANG_P = np.array([0.35, 0.15, 0.1, 0.08, 0.08, 0.07, 0.06, 0.05, 0.03, 0.03])
YEARS = (1990, 2024)
N_SOURCES = 1000
FILTERS = {  # name -> (filter, fraction of documents it keeps, from the generator's distributions)
    "lang = de (equality)": ({"lang": "de"}, float(LANG_P[3])),
    "year in [2015, 2019] (range)": ({"year": {"gte": 2015, "lte": 2019}}, 5 / (YEARS[1] - YEARS[0] + 1)),
}
MODES = ("dense", "sparse", "bm25", "hybrid", "colbert")
# search() keywords that ask the index for the exhaustive ColBERT MaxSim (the anchor of colbert mode)
COLBERT_EXHAUSTIVE_KW: dict = {"exhaustive": True}


# ---------------------------------------------------------------- the synthetic corpus


@dataclass(frozen=True)
class Shape:
    """Sizes of the synthetic rows. The default is BGE-M3's; :data:`TINY` is for the smoke test."""
    dim: int = 1024
    colbert_dim: int = 1024
    vocab: int = 250_002
    topics: int = 4096
    pool: int = 4096              # ColBERT token directions
    topic_pool: int = 64          # of which each topic prefers this many
    tokens: tuple = (50, 150)     # ColBERT vectors a document, inclusive range
    terms: tuple = (68, 112)      # sparse terms drawn a document (~60 left once repeats merge)
    words: int = 100_000          # text vocabulary
    text_words: tuple = (50, 70)
    block: int = 1000             # documents generated together (from (seed, block index) alone)
    layers: int = 1               # of the model checkpoint

    def tokens_mean(self) -> float:
        return (self.tokens[0] + self.tokens[1]) / 2


TINY = Shape(dim=64, colbert_dim=32, vocab=5000, topics=16, pool=256, topic_pool=16, tokens=(10, 30),
             terms=(12, 20), words=2000, text_words=(20, 30), block=100)

DENSE_NOISE = 0.8       # norm of the noise added to a topic centroid (cosine to it ~0.78)
QUERY_DENSE_NOISE = 1.0  # norm of the noise added to the source document's vector
TOKEN_MIX = 0.35        # weight of the second pool direction in a ColBERT vector


def _unit(a: np.ndarray) -> np.ndarray:
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    return a


@dataclass
class Block:
    """Documents ``start..start+len`` of a corpus (rows of every representation, and metadata)."""
    start: int
    dense: np.ndarray            # (n, dim) float32, unit rows
    sparse: object               # (n, vocab) float32 CSR, sorted unique indices, weights > 0
    colbert: np.ndarray          # (T, colbert_dim) float32, unit rows
    colbert_offsets: np.ndarray  # (n + 1,) int64
    words: list                  # n int32 arrays of word ids
    topics: np.ndarray           # (n,) int64
    years: np.ndarray            # (n,) int64
    langs: np.ndarray            # (n,) int64 into LANGS
    sources: np.ndarray          # (n,) int64

    def __len__(self) -> int:
        return len(self.topics)

    def slice(self, a: int, b: int) -> Block:
        """Rows ``a:b`` of this block (relative), sharing memory where possible."""
        o = self.colbert_offsets
        return Block(self.start + a, self.dense[a:b], self.sparse[a:b], self.colbert[o[a]:o[b]],
                     o[a:b + 1] - o[a], self.words[a:b], self.topics[a:b], self.years[a:b],
                     self.langs[a:b], self.sources[a:b])

    def ids(self) -> list[str]:
        return [f"d{self.start + i}" for i in range(len(self))]

    def texts(self) -> list[str]:
        return [" ".join(f"w{w}" for w in ws.tolist()) for ws in self.words]

    def metadata(self) -> list[dict]:
        return [{"year": int(y), "lang": LANGS[int(la)], "source": f"s{int(s):03d}"}
                for y, la, s in zip(self.years.tolist(), self.langs.tolist(), self.sources.tolist())]

    def docs(self) -> list[dict]:
        return [{"id": i, "text": t, "metadata": m} for i, t, m in zip(self.ids(), self.texts(), self.metadata())]

    def encoded(self):
        from hybridsearch.representations import Encoded

        lens = np.diff(self.colbert_offsets)
        return Encoded(dense=self.dense, sparse=self.sparse, colbert=self.colbert,
                       colbert_offsets=self.colbert_offsets, n_tokens=(lens + 1).astype(np.int64))


def concat_blocks(parts: list[Block]) -> Block:
    import scipy.sparse as sp

    if len(parts) == 1:
        return parts[0]
    lens = np.concatenate([np.diff(p.colbert_offsets) for p in parts])
    off = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=off[1:])
    return Block(parts[0].start, np.concatenate([p.dense for p in parts]),
                 sp.vstack([p.sparse for p in parts]).tocsr(), np.concatenate([p.colbert for p in parts]), off,
                 [w for p in parts for w in p.words], *(np.concatenate([getattr(p, f) for p in parts])
                                                          for f in ("topics", "years", "langs", "sources")))


class Corpus:
    """Deterministic synthetic documents of a :class:`Shape`: block ``j`` depends only on
    ``(seed, j)``, so :meth:`rows` of any range is the same whatever was generated before."""

    def __init__(self, shape: Shape = Shape(), seed: int = 0):
        self.shape, self.seed = shape, seed
        s = shape
        rng = np.random.default_rng([seed, 0])
        self.centroids = _unit(rng.standard_normal((s.topics, s.dim), dtype=np.float32))
        self.pool = _unit(rng.standard_normal((s.pool, s.colbert_dim), dtype=np.float32))
        self.topic_tokens = rng.integers(0, s.pool, (s.topics, s.topic_pool))
        self.topic_terms = self._zipf_terms(rng, (s.topics, 128))
        self.topic_words = (rng.zipf(1.1, (s.topics, 64)) + rng.integers(0, s.words, (s.topics, 1))) % s.words
        self._gram: np.ndarray | None = None  # (pool, pool) float32, made on first use
        self._cache: tuple[int, Block] | None = None

    def _zipf_terms(self, rng, size) -> np.ndarray:
        # ids 0-4 are XLM-R's special tokens; a fixed odd stride spreads the Zipf head over the vocabulary
        v = self.shape.vocab - 5
        return ((rng.zipf(1.15, size) - 1) * 7919 % v + 5).astype(np.int64)

    def block(self, j: int, colbert: bool = True) -> Block:
        """Block ``j``: documents ``j * block .. (j + 1) * block``. ``colbert=False`` skips making
        the token vectors (most of the cost; ``colbert`` is then None): every other array is the
        same, since the vectors draw no random numbers."""
        if self._cache is not None and self._cache[0] == j and (self._cache[1].colbert is not None or not colbert):
            return self._cache[1]
        import scipy.sparse as sp

        s, n = self.shape, self.shape.block
        rng = np.random.default_rng([self.seed, 1, j])
        topics = rng.integers(0, s.topics, n)
        noise = rng.standard_normal((n, s.dim), dtype=np.float32) * np.float32(DENSE_NOISE / math.sqrt(s.dim))
        dense = _unit(self.centroids[topics] + noise)
        # sparse: half topic terms, half the global Zipf; repeats merged (np.unique sorts row-major)
        k = rng.integers(s.terms[0], s.terms[1] + 1, n)
        rows = np.repeat(np.arange(n), k)
        own = rng.random(len(rows)) < 0.5
        terms = np.where(own, self.topic_terms[topics[rows], rng.integers(0, 128, len(rows))],
                         self._zipf_terms(rng, len(rows)))
        keys = np.unique(rows * np.int64(s.vocab) + terms)
        r, c = keys // s.vocab, keys % s.vocab
        w = (0.02 + 0.33 * rng.random(len(keys), dtype=np.float32)).astype(np.float32)
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(r, minlength=n), out=indptr[1:])
        csr = sp.csr_matrix((w, c.astype(np.int32), indptr), shape=(n, s.vocab))
        # ColBERT: pool direction (2/3 from the topic's own) + TOKEN_MIX x another, unit, float16
        lens = rng.integers(s.tokens[0], s.tokens[1] + 1, n)
        off = np.zeros(n + 1, np.int64)
        np.cumsum(lens, out=off[1:])
        tt = np.repeat(topics, lens)
        a = np.where(rng.random(len(tt)) < 2 / 3, self.topic_tokens[tt, rng.integers(0, s.topic_pool, len(tt))],
                     rng.integers(0, s.pool, len(tt)))
        b = rng.integers(0, s.pool, len(tt))
        cb = self._token_vectors(a, b) if colbert else None
        nw = rng.integers(s.text_words[0], s.text_words[1] + 1, n)
        wt = np.repeat(topics, nw)
        wid = np.where(rng.random(len(wt)) < 1 / 3, self.topic_words[wt, rng.integers(0, 64, len(wt))],
                       (rng.zipf(1.1, len(wt)) - 1) % s.words).astype(np.int32)
        words = np.split(wid, np.cumsum(nw)[:-1])
        years = rng.integers(YEARS[0], YEARS[1] + 1, n)
        langs = rng.choice(len(LANGS), n, p=LANG_P)
        sources = (rng.zipf(1.3, n) - 1) % N_SOURCES
        blk = Block(j * n, dense, csr, cb, off, words, topics, years, langs, sources)
        if colbert:
            self._cache = (j, blk)
        return blk

    def _token_vectors(self, a: np.ndarray, b: np.ndarray, chunk: int = 1024) -> np.ndarray:
        """(len(a), colbert_dim) float32 unit rows ``pool[a] + TOKEN_MIX * pool[b]``, normalised
        through the pool's Gram matrix (no pass over the rows to measure them). float32, as the
        encoder hands them to ``add``: casting here would cost more than everything else."""
        if self._gram is None:
            self._gram = self.pool @ self.pool.T
        mix = np.float32(TOKEN_MIX)
        scale = (1 / np.sqrt(1 + mix * mix + 2 * mix * self._gram[a, b])).astype(np.float32)
        out = np.empty((len(a), self.shape.colbert_dim), np.float32)
        buf = np.empty((min(chunk, len(a)), self.shape.colbert_dim), np.float32)
        for i in range(0, len(a), chunk):
            o, m = out[i:i + chunk], min(chunk, len(a) - i)
            np.take(self.pool, a[i:i + m], axis=0, out=o)
            np.take(self.pool, b[i:i + m], axis=0, out=buf[:m])
            buf[:m] *= mix
            o += buf[:m]
            o *= scale[i:i + m, None]
        return out

    def rows(self, a: int, b: int) -> Block:
        """Documents ``a..b`` (any range)."""
        B = self.shape.block
        parts = []
        for j in range(a // B, (b - 1) // B + 1):
            blk = self.block(j)
            lo, hi = max(a, j * B) - j * B, min(b, (j + 1) * B) - j * B
            parts.append(blk if (lo, hi) == (0, B) else blk.slice(lo, hi))
        return concat_blocks(parts)

    def query(self, blk: Block, i: int) -> dict:
        """A query derived from row ``i`` of ``blk``: its dense vector plus noise, 8 of its sparse
        terms + 4 others, 20 of its ColBERT vectors (noised) + 12 others, 6 of its words + 2 others.
        Returns ``{"source", "dense" (dim,) f32, "terms" (m,) i64 sorted, "weights" (m,) f32,
        "colbert" (32, colbert_dim) f32, "text"}``; depends only on (seed, docno)."""
        s = self.shape
        docno = blk.start + i
        rng = np.random.default_rng([self.seed, 2, docno])
        d = blk.dense[i] + rng.standard_normal(s.dim, dtype=np.float32) * np.float32(QUERY_DENSE_NOISE / math.sqrt(s.dim))
        a, b = blk.sparse.indptr[i], blk.sparse.indptr[i + 1]
        own = blk.sparse.indices[a:b]
        terms = np.union1d(rng.choice(own, min(8, len(own)), replace=False), self._zipf_terms(rng, 4))
        weights = (0.05 + 0.3 * rng.random(len(terms), dtype=np.float32)).astype(np.float32)
        toks = blk.colbert[blk.colbert_offsets[i]:blk.colbert_offsets[i + 1]]
        mine = toks[rng.choice(len(toks), min(20, len(toks)), replace=False)]
        mine += rng.standard_normal(mine.shape, dtype=np.float32) * np.float32(0.5 / math.sqrt(s.colbert_dim))
        other = self._token_vectors(rng.integers(0, s.pool, 32 - len(mine)), rng.integers(0, s.pool, 32 - len(mine)))
        cb = _unit(np.concatenate([mine, other]))
        ws = blk.words[i]
        words = np.concatenate([rng.choice(ws, 6, replace=False), (rng.zipf(1.1, 2) - 1) % s.words])
        return {"source": docno, "dense": d / np.linalg.norm(d), "terms": terms, "weights": weights,
                "colbert": cb, "text": " ".join(f"w{w}" for w in words.tolist())}


def query_sources(n: int, nq: int, seed: int) -> np.ndarray:
    """(min(nq, n),) int64 sorted docnos the queries are derived from."""
    return np.sort(np.random.default_rng([seed, 3, n]).choice(n, min(nq, n), replace=False)).astype(np.int64)


# ---------------------------------------------------------------- the model folder


def make_model(folder: Path | None = None, shape: Shape = Shape()) -> Path:
    """The smallest checkpoint in the bge-m3 layout with ``shape``'s dimensions: ``shape.layers``
    layer(s), hidden ``dim``, vocabulary ``vocab``, ``sparse_linear.pt`` (dim -> 1) and
    ``colbert_linear.pt`` (dim -> colbert_dim), weights in fp16 safetensors (~0.5 GB at
    BGE-M3's shape). Built once into ``folder`` (default ``bench/.cache/m3-shape-...``) through a
    temporary folder renamed into place; returns the folder."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from hybridsearch.testing import train_tokenizer

    if folder is None:
        folder = MODEL_CACHE / f"m3-shape-d{shape.dim}-c{shape.colbert_dim}-v{shape.vocab}-l{shape.layers}"
    folder = Path(folder)
    if (folder / "colbert_linear.pt").exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train_tokenizer().save_pretrained(tmp)
    heads = max(1, shape.dim // 64)
    cfg = XLMRobertaConfig(vocab_size=shape.vocab, hidden_size=shape.dim, num_hidden_layers=shape.layers,
                           num_attention_heads=heads, intermediate_size=64, max_position_embeddings=514,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # never materialise the 1 GB fp32 embedding matrix
    try:
        model = XLMRobertaModel(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    model.save_pretrained(tmp)
    torch.save(torch.nn.Linear(shape.dim, 1).state_dict(), tmp / "sparse_linear.pt")
    torch.save(torch.nn.Linear(shape.dim, shape.colbert_dim).state_dict(), tmp / "colbert_linear.pt")
    try:
        os.rename(tmp, folder)
    except OSError:  # another process built it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_encoder(model: str | Path):
    """The model as an encoder that is never run: fp16 halves what its weights cost every process."""
    from hybridsearch import BGEM3Encoder

    return BGEM3Encoder(str(model), device="cpu", dtype="fp16")


# ---------------------------------------------------------------- index options and disk estimate


def create_options() -> dict:
    """``HybridIndex.create``'s keyword parameters and their defaults (whatever this version has)."""
    import inspect

    from hybridsearch import HybridIndex

    return {k: p.default for k, p in inspect.signature(HybridIndex.create).parameters.items()
            if p.kind == p.KEYWORD_ONLY}


def index_kwargs(dense_factory: str | None = None, dense_storage: str | None = None,
                 colbert_codec: str | None = None) -> dict:
    """The options given (None = the index's default), checked against this version's ``create``."""
    have = create_options()
    out = {}
    for k, v in (("dense_factory", dense_factory), ("dense_storage", dense_storage), ("colbert_codec", colbert_codec)):
        if v is None:
            continue
        if k not in have:
            raise SystemExit(f"--{k.replace('_', '-')} {v}: this hybridsearch's HybridIndex.create has no {k} "
                             f"option yet (it has: {', '.join(sorted(have))})")
        out[k] = v
    return out


def effective(kwargs: dict) -> dict:
    """Every storage option as the index will use it: given, else create()'s default, else today's format."""
    have = create_options()
    legacy = {"dense_factory": "Flat", "dense_storage": "fp32 (only format)", "colbert_codec": "fp16 (only format)"}
    return {k: kwargs.get(k, have.get(k, legacy[k])) for k in legacy}


def estimate_bytes(n: int, shape: Shape, opts: dict, commit: int) -> dict:
    """Expected bytes on disk per channel for ``n`` documents (before any compaction), from the
    shapes and the storage options; unknown options are costed as their largest known form."""
    d, dc = shape.dim, shape.colbert_dim
    ds = str(opts["dense_storage"]).split()[0]
    dense = {"fp32": 4 * d, "fp16": 2 * d, "sq8": d}.get(ds, 4 * d) * n
    if str(opts["dense_factory"]) != "Flat":
        dense += (4 * d + 300) * n  # a FAISS index beside the vectors
    codec = str(opts["colbert_codec"]).split()[0]
    per_token = {"fp16": 2 * dc, "res1": dc // 8 + 2, "res2": dc // 4 + 2, "res1-pool2": (dc // 8 + 2) / 2}
    colbert = per_token.get(codec, 2 * dc) * shape.tokens_mean() * n
    segments = math.ceil(n / commit)  # without merges; a merge policy only lowers it
    sparse = 8 * 60 * n + 12 * shape.vocab * segments  # postings + per-segment (V+1) indptr and (V,) term max
    return {"dense": dense, "colbert": colbert, "sparse": sparse, "docstore": 600 * n, "bm25": 400 * n,
            "known": ds in ("fp32", "fp16", "sq8") and codec in per_token}


def check_disk(work: Path, n: int, shape: Shape, opts: dict, commit: int, milvus: bool, log,
               reserve: float = 5 * 2**30) -> dict:
    """Print the estimate; refuse (SystemExit) when twice the index (a merge or a compaction
    rewrites it), Milvus' copy and ``reserve`` do not fit the free space of ``work``."""
    est = estimate_bytes(n, shape, opts, commit)
    total = sum(v for k, v in est.items() if k != "known")
    mil = n * (4 * shape.dim + 1500) * 1.5 if milvus else 0
    need = 2 * total + mil + reserve
    free = shutil.disk_usage(work).free
    log(f"scale_m3: {n:,} docs, dense {opts['dense_storage']} / ColBERT {opts['colbert_codec']}: expected index "
        f"{total / 2**30:.1f} GiB (ColBERT {est['colbert'] / 2**30:.1f}, dense {est['dense'] / 2**30:.1f}); needs "
        f"{need / 2**30:.1f} GiB free with merges/compaction{' and Milvus' if mil else ''} and a "
        f"{reserve / 2**30:.0f} GiB reserve; {free / 2**30:.1f} GiB free in {work}"
        + ("" if est["known"] else " (unknown storage option: costed as float16/fp32)"))
    if need > free:
        raise SystemExit(f"scale_m3: refusing {n:,} documents with ColBERT {opts['colbert_codec']}: about "
                         f"{need / 2**30:.0f} GiB needed, {free / 2**30:.0f} GiB free in {work}. Use a "
                         "compressed codec (--colbert-codec res1), fewer documents, or another --work folder.")
    return {"estimate_bytes": total, "needed_bytes": need, "free_bytes": free}


# ---------------------------------------------------------------- queries on disk (between workers)


@dataclass
class Queries:
    """Precomputed query representations: ``dense`` (nq, dim) f32, ``sparse`` (nq, vocab) f32 CSR,
    ``colbert`` (nq * 32, colbert_dim) f32 with ``colbert_offsets`` (nq + 1,) i64, ``texts``, and
    ``sources`` (nq,) i64: the docno each query was derived from."""
    dense: np.ndarray
    sparse: object
    colbert: np.ndarray
    colbert_offsets: np.ndarray
    texts: list
    sources: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)

    def row(self, i: int):
        from hybridsearch.representations import Encoded

        a, b = self.colbert_offsets[i], self.colbert_offsets[i + 1]
        return Encoded(dense=self.dense[i:i + 1], sparse=self.sparse[i:i + 1], colbert=self.colbert[a:b],
                       colbert_offsets=np.array([0, b - a], np.int64), n_tokens=np.array([b - a + 1], np.int64))

    def encoded(self):
        """Every query as one :class:`Encoded` batch."""
        from hybridsearch.representations import Encoded

        return Encoded(dense=self.dense, sparse=self.sparse, colbert=self.colbert,
                       colbert_offsets=self.colbert_offsets,
                       n_tokens=(np.diff(self.colbert_offsets) + 1).astype(np.int64))

    @classmethod
    def from_list(cls, qs: list[dict], vocab: int) -> Queries:
        import scipy.sparse as sp

        indptr = np.zeros(len(qs) + 1, np.int64)
        np.cumsum([len(q["terms"]) for q in qs], out=indptr[1:])
        sparse = sp.csr_matrix((np.concatenate([q["weights"] for q in qs]).astype(np.float32),
                                np.concatenate([q["terms"] for q in qs]).astype(np.int32), indptr),
                               shape=(len(qs), vocab))
        off = np.zeros(len(qs) + 1, np.int64)
        np.cumsum([len(q["colbert"]) for q in qs], out=off[1:])
        return cls(np.stack([q["dense"] for q in qs]).astype(np.float32), sparse,
                   np.concatenate([q["colbert"] for q in qs]).astype(np.float32), off,
                   [q["text"] for q in qs], np.array([q["source"] for q in qs], np.int64))

    FILES = ("dense", "sparse_indptr", "sparse_indices", "sparse_data", "colbert", "colbert_offsets", "sources")

    def save(self, folder: Path) -> None:
        from hybridsearch.index.storage import save_npy, write_json_durable

        folder.mkdir(parents=True, exist_ok=True)
        arrays = (self.dense, self.sparse.indptr.astype(np.int64), self.sparse.indices.astype(np.int32),
                  self.sparse.data, self.colbert, self.colbert_offsets, self.sources)
        for name, a in zip(self.FILES, arrays):
            save_npy(folder / f"{name}.npy", a)
        write_json_durable(folder / "texts.json", self.texts)

    @classmethod
    def load(cls, folder: Path, shape: Shape, n_docs: int) -> Queries:
        """Read what :meth:`save` wrote, checking dtypes, shapes and ranges; IndexFormatError names
        the bad file."""
        import scipy.sparse as sp

        from hybridsearch.errors import IndexFormatError
        from hybridsearch.index.storage import load_npy

        def npy(name, dtype, shp):
            return load_npy(folder / f"{name}.npy", mmap=False, dtype=dtype, shape=shp)

        src = npy("sources", np.int64, (None,))
        nq = len(src)
        dense = npy("dense", np.float32, (nq, shape.dim))
        indptr = npy("sparse_indptr", np.int64, (nq + 1,))
        idx, data = npy("sparse_indices", np.int32, (None,)), npy("sparse_data", np.float32, (None,))
        off = npy("colbert_offsets", np.int64, (nq + 1,))
        cb = npy("colbert", np.float32, (None, shape.colbert_dim))
        checks = {
            "sources": nq == 0 or (src.min() >= 0 and src.max() < n_docs),
            "sparse_indptr": indptr[0] == 0 and (np.diff(indptr) >= 0).all() and indptr[-1] == len(idx) == len(data),
            "sparse_indices": len(idx) == 0 or (idx.min() >= 0 and idx.max() < shape.vocab),
            "sparse_data": np.isfinite(data).all() and (data > 0).all(),
            "colbert_offsets": off[0] == 0 and (np.diff(off) > 0).all() and off[-1] == len(cb),
            "dense": np.isfinite(dense).all(), "colbert": np.isfinite(cb).all(),
        }
        for name, ok in checks.items():
            if not ok:
                raise IndexFormatError(f"query file corrupted: {folder / (name + '.npy')}")
        p = folder / "texts.json"
        try:
            if p.is_symlink() or p.stat().st_size > 64 * (nq + 1) * 1024:
                raise ValueError("a link, or too large")
            texts = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise IndexFormatError(f"query file corrupted: {p} ({e})") from e
        if not (isinstance(texts, list) and len(texts) == nq and all(isinstance(t, str) and t.strip() for t in texts)):
            raise IndexFormatError(f"query file corrupted: {p} (expected {nq} non-empty strings)")
        for i in range(nq):  # every row needs at least one sparse term
            if indptr[i + 1] == indptr[i]:
                raise IndexFormatError(f"query file corrupted: {folder / 'sparse_indptr.npy'} (query {i} has no term)")
        return cls(dense, sp.csr_matrix((data, idx, indptr), shape=(nq, shape.vocab)), cb, off, texts, src)


# ---------------------------------------------------------------- workers (each in a fresh process)


def proc_mib(pid: int | str = "self") -> dict:
    """``{"rss": VmRSS, "anon": RssAnon}`` of a process in MiB (0 when unreadable). RSS counts the
    pages of memory-mapped index files a process touched; RssAnon is what it allocated."""
    out = {"rss": 0.0, "anon": 0.0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for x in f:
                if x.startswith("VmRSS"):
                    out["rss"] = int(x.split()[1]) / 1024
                elif x.startswith("RssAnon"):
                    out["anon"] = int(x.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return out


def rss_mib() -> float:
    return proc_mib()["rss"]


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _shape(a: dict) -> Shape:
    return Shape(**{k: tuple(v) if isinstance(v, list) else v for k, v in a["shape"].items()})


def w_build(a: dict) -> dict:
    """Create the index and add ``docs`` documents in commits of ``commit``; derive the queries
    on the way (saved under ``queries``). Figures: per-commit seconds of ``add`` (merges inside
    it included), generation seconds (excluded from the build rate), RSS, stats()."""
    from hybridsearch import HybridIndex

    shape, n, commit = _shape(a), a["docs"], a["commit"]
    enc = load_encoder(a["model"])
    corpus = Corpus(shape, a["seed"])
    sources = query_sources(n, a["queries"], a["seed"])
    t = time.perf_counter()
    corpus.block(0)  # tables, Gram matrix and one block resident: the generator's share of the baseline
    gen_s = time.perf_counter() - t
    base_mem, maxrss_base = proc_mib(), maxrss_mib()
    idx = HybridIndex.create(a["index"], enc, **a["create"])
    qs, commit_s, t_wall = [], [], time.perf_counter()
    last_log, rss_seen = t_wall, base_mem["rss"]
    for s in range(0, n, commit):
        e = min(n, s + commit)
        t = time.perf_counter()
        blk = corpus.rows(s, e)
        docs, encd = blk.docs(), blk.encoded()
        qs += [corpus.query(blk, int(i) - s) for i in sources[(sources >= s) & (sources < e)]]
        gen_s += time.perf_counter() - t
        t = time.perf_counter()
        idx.add(docs, encoded=encd, show_progress=False)
        commit_s.append(time.perf_counter() - t)
        del blk, docs, encd
        free = shutil.disk_usage(a["index"]).free
        if free < a["min_free_bytes"]:
            raise SystemExit(f"build stopped at {e:,} documents: {free / 2**30:.1f} GiB left on the disk "
                             f"(the floor is {a['min_free_bytes'] / 2**30:.0f} GiB)")
        now = time.perf_counter()
        if now - last_log >= a["progress_s"] or e == n:
            last_log, rss_seen = now, max(rss_seen, rss_mib())
            rate = e / sum(commit_s)
            eta = (n - e) * (now - t_wall) / e
            segs = idx.stats()["segments"]
            print(f"[build {n:,}] {e:,} docs, {rate:,.0f} docs/s in add() ({e / (now - t_wall):,.0f} with "
                  f"generation), last commit {commit_s[-1]:.2f} s, slowest {max(commit_s):.2f} s, {segs} segments, "
                  f"RSS {rss_seen:,.0f} MiB, {free / 2**30:.0f} GiB free, ETA {eta / 60:.1f} min",
                  file=sys.stderr, flush=True)
    st = idx.stats()
    t = time.perf_counter()
    idx.close()
    close_s = time.perf_counter() - t
    Queries.from_list(qs, shape.vocab).save(Path(a["queries_dir"]))
    cs = np.asarray(commit_s)
    return {"docs": n, "commits": len(cs), "add_s": float(cs.sum()), "close_s": close_s, "gen_s": gen_s,
            "wall_s": time.perf_counter() - t_wall, "commit_max_s": float(cs.max()),
            "commit_p50_s": float(np.median(cs)), "commit_p99_s": float(np.percentile(cs, 99)),
            "slow_commits": int((cs > 3 * np.median(cs)).sum()), "commit_s": [round(x, 3) for x in commit_s],
            "rss_base_mib": base_mem["rss"], "anon_base_mib": base_mem["anon"], "maxrss_base_mib": maxrss_base,
            "maxrss_mib": maxrss_mib(), "stats": st, "colbert_input_dtype": "float32"}


def _mask_probe(idx):
    """(label, fn(filter) -> bool mask over docnos) for the index's own filter-mask step, or None.
    Tried in order: a public ``HybridIndex.filter_mask``, the snapshot's ``filter_mask`` and the
    older ``columns.mask`` (both private: the label says so)."""
    from hybridsearch.index.filters import check_filter

    if callable(getattr(idx, "filter_mask", None)):
        return "HybridIndex.filter_mask", idx.filter_mask
    try:
        state = idx._current()
        if callable(getattr(state, "filter_mask", None)):
            return "snapshot.filter_mask (private)", lambda flt: idx._current().filter_mask(check_filter(flt))
        if callable(getattr(getattr(state, "columns", None), "mask", None)):
            return ("snapshot.columns.mask (private)",
                    lambda flt: idx._current().columns.mask(check_filter(flt), idx._current().next_docno))
    except Exception:  # noqa: BLE001 -- a private path that moved: reported as not exposed
        pass
    return None


def _lat(fn, n: int) -> tuple[np.ndarray, list]:
    ts, out = np.empty(n), []
    for i in range(n):
        t = time.perf_counter()
        out.append(fn(i))
        ts[i] = time.perf_counter() - t
    return 1000 * ts, out


def w_serve(a: dict) -> dict:
    """Open the index in this fresh process; RSS after opening and after the queries; single-query
    latency per mode (first call reported apart), how often the source document is in the top 10,
    ColBERT brute force on a few queries, and the cost of two filters."""
    import gc

    from hybridsearch import HybridIndex

    shape, n = _shape(a), a["docs"]
    enc = load_encoder(a["model"])
    Q = Queries.load(Path(a["queries_dir"]), shape, n)
    nq = min(a["queries"], len(Q))
    ids = [f"d{s}" for s in Q.sources.tolist()]
    gc.collect()
    p0 = proc_mib()
    t = time.perf_counter()
    idx = HybridIndex.open(a["index"], enc)
    out = {"open_s": time.perf_counter() - t, "rss_before_open_mib": p0["rss"], "channels": list(idx.channels),
           "modes": {}}

    def mem(what):
        p = proc_mib()
        out[f"rss_{what}_mib"], out[f"anon_{what}_mib"] = p["rss"] - p0["rss"], p["anon"] - p0["anon"]

    mem("open")

    rows = [Q.row(i) for i in range(len(Q))]  # what an encoder would hand over, built before timing

    def search(mode, flt=None):  # BM25 takes the text alone: it needs no encoded query
        return lambda i: idx.search(Q.texts[i], k=10, mode=mode, filter=flt,
                                    query_encoded=None if mode == "bm25" else rows[i])

    for mode in [m for m in MODES if m != "colbert" and (m == "hybrid" or m in idx.channels)]:
        first, _ = _lat(search(mode), 1)
        ts, hits = _lat(search(mode), nq)
        out["modes"][mode] = {"first_ms": float(first[0]), "p50": float(np.percentile(ts, 50)),
                              "p99": float(np.percentile(ts, 99)), "queries": nq,
                              "hit10": float(np.mean([ids[i] in {h.id for h in hs} for i, hs in enumerate(hits)]))}
    mem("queries")
    if "colbert" in idx.channels and n <= a["colbert_max_docs"]:
        ts, hits, t0 = [], [], time.perf_counter()
        while len(ts) < min(a["colbert_queries"], nq) and (not ts or time.perf_counter() - t0 < a["colbert_budget_s"]):
            x, h = _lat(lambda i, j=len(ts): search("colbert")(j), 1)
            ts.append(float(x[0]))
            hits.append(ids[len(ts) - 1] in {y.id for y in h[0]})
        out["modes"]["colbert"] = {"first_ms": ts[0], "p50": float(np.median(ts)), "p99": float(max(ts)),
                                   "queries": len(ts), "hit10": float(np.mean(hits))}
    elif "colbert" in idx.channels:
        out["modes"]["colbert"] = {"skipped": f"brute-force MaxSim over every token of {n:,} documents "
                                   f"(~{n * shape.tokens_mean():,.0f} tokens) is minutes a query; measured up to "
                                   f"{a['colbert_max_docs']:,} documents (--colbert-max-docs)"}
    mem("colbert")
    nf = min(nq, a["filter_queries"])
    probe = _mask_probe(idx)
    out["filters"] = {}
    for name, (flt, frac) in FILTERS.items():
        f = {"fraction": frac, "queries": nf}
        x, first = _lat(lambda i: search("hybrid", flt)(0), 1)
        f["first_ms"] = float(x[0])
        plain, filt, bad = [], [], 0
        for i in range(nf):  # interleaved, so drift hits both alike
            plain.append(_lat(lambda j: search("hybrid")(i), 1)[0][0])
            x, h = _lat(lambda j: search("hybrid", flt)(i), 1)
            filt.append(x[0])
            bad += sum(not _passes(hit.metadata, flt) for hit in h[0])
        f.update(p50_plain=float(np.median(plain)), p50_filtered=float(np.median(filt)),
                 p99_filtered=float(np.percentile(filt, 99)), violations=bad)
        if probe is not None:
            f["mask_api"] = probe[0]
            x, m = _lat(lambda i: probe[1](flt), 1)
            f["mask_first_ms"] = float(x[0])
            xs, _ = _lat(lambda i: probe[1](flt), 20)
            f["mask_ms"] = float(np.median(xs))
            f["mask_fraction"] = float(np.asarray(m[0]).mean())
        out["filters"][name] = f
    mem("end")
    out["rss_end_abs_mib"] = rss_mib()
    idx.close()
    return out


def _passes(md: dict, flt: dict) -> bool:
    for field_, cond in flt.items():
        v = md.get(field_)
        if isinstance(cond, dict):
            if v is None or not all({"gte": v >= c, "lte": v <= c, "gt": v > c, "lt": v < c}[op]
                                    for op, c in cond.items()):
                return False
        elif v != cond:
            return False
    return True


def w_compact(a: dict) -> dict:
    """``compact()`` in a fresh process: seconds, peak RSS above the opened index, segments after."""
    from hybridsearch import HybridIndex

    enc = load_encoder(a["model"])
    idx = HybridIndex.open(a["index"], enc)
    before = idx.stats()["segments"]
    p0, m0 = proc_mib(), maxrss_mib()
    t = time.perf_counter()
    idx.compact(**({"dense_factory": a["dense_factory"]} if a.get("dense_factory") else {}))
    s = time.perf_counter() - t
    st = idx.stats()
    idx.close()
    return {"seconds": s, "dense_factory": a.get("dense_factory"), "segments_before": before, "segments_after": st["segments"], "rss_open_mib": p0["rss"],
            "anon_open_mib": p0["anon"],
            "maxrss_before_mib": m0, "maxrss_mib": maxrss_mib(), "stats": st}


def w_milvus_build(a: dict) -> dict:
    """The same rows into Milvus Lite (dense FLAT IP + learned sparse + BM25 over the text; it has
    no multi-vector field, so no ColBERT), in chunks of ``commit``, then flush."""
    from suite.milvus import MilvusLite

    shape, n, commit = _shape(a), a["docs"], a["commit"]
    corpus = Corpus(shape, a["seed"])
    m = MilvusLite(a["folder"], shape.dim, sparse=True, bm25=True)
    ins, gen = 0.0, 0.0
    for s in range(0, n, commit):
        t = time.perf_counter()
        blk = corpus.rows(s, min(n, s + commit))
        texts = blk.texts()
        gen += time.perf_counter() - t
        ins += m.insert(blk.dense, texts, blk.sparse, chunk=commit, base=s)
        if (s // commit) % max(1, n // commit // 10) == 0:
            print(f"[milvus {n:,}] {s + len(texts):,} docs, {(s + len(texts)) / ins:,.0f} docs/s",
                  file=sys.stderr, flush=True)
    m.close()
    return {"insert_s": ins, "gen_s": gen, "maxrss_mib": maxrss_mib(), "disk_bytes": m.disk_bytes(),
            "channels": m.channels}


def w_milvus_serve(a: dict) -> dict:
    """Reopen the collection in a fresh process: RSS after loading it and after the queries
    (dense, sparse, hybrid), latency and top-10 hit rate."""
    import gc

    from suite.milvus import MilvusLite, _sparse_row

    shape, n = _shape(a), a["docs"]
    Q = Queries.load(Path(a["queries_dir"]), shape, n)
    nq = min(a["queries"], len(Q))
    gc.collect()
    p0 = proc_mib()
    t = time.perf_counter()
    m = MilvusLite.reopen(a["folder"])
    p1 = proc_mib()
    out = {"open_s": time.perf_counter() - t, "rss_open_mib": p1["rss"] - p0["rss"],
           "anon_open_mib": p1["anon"] - p0["anon"], "modes": {}}
    ch = [c for c in ("dense", "sparse", "bm25") if c in m.channels]
    calls = {
        "dense": lambda i: m.search("dense", dense=Q.dense[i])[0],
        "sparse": lambda i: m.search("sparse", sparse=_sparse_row(Q.sparse, i))[0],
        "bm25": lambda i: m.search("bm25", text=Q.texts[i])[0],
        "hybrid (RRF)": lambda i: m.hybrid(ch, dense=Q.dense[i], sparse=_sparse_row(Q.sparse, i), text=Q.texts[i],
                                           rrf_k=60),
    }
    for mode, fn in calls.items():
        fn(0)
        ts, hits = _lat(fn, nq)
        out["modes"][mode] = {"p50": float(np.percentile(ts, 50)), "p99": float(np.percentile(ts, 99)),
                              "queries": nq, "hit10": float(np.mean([int(Q.sources[i]) in set(h)
                                                                     for i, h in enumerate(hits)]))}
    p1 = proc_mib()
    out["rss_queries_mib"], out["anon_queries_mib"] = p1["rss"] - p0["rss"], p1["anon"] - p0["anon"]
    m.close()
    return out


def _recall(found: list, truth: list) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (top-10 id sets)."""
    r = [len(set(f) & set(t)) / max(len(t), 1) for f, t in zip(found, truth) if len(t)]
    return float(np.mean(r)) if r else float("nan")


def w_versus(a: dict) -> dict:
    """Every channel against its anchor, on the same rows and queries, in this one fresh process
    (so rounds interleave and ratios compare like with like):

    * dense: ours (the index's structure) vs bare FAISS ``IndexFlatIP`` (exact; its top 10 is the
      truth for recall) and bare FAISS ``HNSW32`` (up to ``hnsw_max_docs``), one thread;
    * bm25: ours vs bm25s ('lucene', k1 1.2, b 0.75) with its numpy and numba backends;
    * sparse: ours (kernel auto) vs the exhaustive term-at-a-time kernel (``kernel="taat"``);
    * colbert: ours (first stage + exact MaxSim) vs the exhaustive MaxSim over every token, on
      ``colbert_exhaustive_queries`` queries (minutes each at 1M);
    * hybrid: ours (every channel).

    Single queries, k=10: p50/p99 over ``rounds`` interleaved rounds; batched: all queries in one
    call, queries/s (median of the rounds); recall@10 of ours against the exact anchor."""
    import gc

    import faiss

    from hybridsearch import HybridIndex
    from suite.report import interleaved

    shape, n = _shape(a), a["docs"]
    corpus = Corpus(shape, a["seed"])
    Q = Queries.load(Path(a["queries_dir"]), shape, n)
    nq, rounds = min(a["queries"], len(Q)), a.get("rounds", 3)
    out = {"queries": nq, "rounds": rounds, "systems": {}, "batch": {}, "recall": {}, "build": {}, "notes": []}
    faiss.omp_set_num_threads(1)
    t = time.perf_counter()
    flat = faiss.IndexFlatIP(shape.dim)
    texts: list[str] = []
    for j in range(-(-n // shape.block)):
        blk = corpus.block(j, colbert=False)
        m = min(shape.block, n - j * shape.block)
        flat.add(np.ascontiguousarray(blk.dense[:m]))
        texts.extend(blk.texts()[:m])
    out["build"]["regenerate dense + texts s"] = time.perf_counter() - t
    qd = np.ascontiguousarray(Q.dense[:nq])
    qtexts = Q.texts[:nq]
    _, gt = flat.search(qd, 10)
    truth = {"dense": [[f"d{x}" for x in row if x >= 0] for row in gt.tolist()]}
    # The exact dense anchor is timed here, before our index opens, and then freed: at 1M its
    # 4 GB of float32 vectors would otherwise squeeze the page cache our mapped index reads from
    # (on this 24 GB machine every channel of ours then paid disk reads, the anchors did not).
    flat_name = "bare FAISS IndexFlatIP (exact)"
    flat_lat = interleaved({flat_name: (lambda i, f=flat: f.search(qd[i:i + 1], 10), nq)}, rounds)[flat_name]
    flat_batch = []
    for _ in range(rounds):
        t = time.perf_counter()
        flat.search(qd, 10)
        flat_batch.append(nq / (time.perf_counter() - t))
    out["notes"].append(f"the exact dense anchor ({flat_name}) was timed in its own rounds before our index "
                        "opened, then freed")
    del flat
    gc.collect()
    hnsw = None
    if n <= a.get("hnsw_max_docs", 0):
        t = time.perf_counter()
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        hnsw = faiss.IndexHNSWFlat(shape.dim, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = 40
        for j in range(-(-n // shape.block)):
            blk = corpus.block(j, colbert=False)
            hnsw.add(np.ascontiguousarray(blk.dense[:min(shape.block, n - j * shape.block)]))
        faiss.omp_set_num_threads(1)
        out["build"]["bare FAISS HNSW32 (efConstruction 40, all cores) s"] = time.perf_counter() - t
        hnsw.hnsw.efSearch = a.get("hnsw_ef", 64)
    else:
        out["notes"].append(f"bare FAISS HNSW32 not built at {n:,} documents (--versus-hnsw-max-docs "
                            f"{a.get('hnsw_max_docs', 0):,})")
    bm = {}
    try:
        import bm25s

        toks = bm25s.tokenize(texts, stopwords=None, show_progress=False)
        for label, backend in (("bm25s", "numpy"), ("bm25s (numba backend)", "numba")):
            t = time.perf_counter()
            r = bm25s.BM25(method="lucene", k1=1.2, b=0.75, backend=backend)
            r.index(toks, show_progress=False)
            out["build"][f"{label} index s"] = time.perf_counter() - t
            bm[label] = r
        del toks
    except ImportError:
        out["notes"].append("bm25s is not installed: no BM25 anchor")
    del texts
    gc.collect()
    enc = load_encoder(a["model"])
    idx = HybridIndex.open(a["index"], enc)

    rows = [Q.row(i) for i in range(nq)]  # what an encoder would hand over, built before timing

    def ours(mode, **kw):  # BM25 takes the text alone: it needs no encoded query
        return lambda i: idx.search(Q.texts[i], k=10, mode=mode, query_encoded=None if mode == "bm25" else rows[i],
                                    **kw)

    def ids(hits):
        return [h.id for h in hits]

    systems = {"ours dense": (ours("dense"), nq)}
    if hnsw is not None:
        systems[f"bare FAISS HNSW32 (efSearch {hnsw.hnsw.efSearch})"] = (lambda i: hnsw.search(qd[i:i + 1], 10), nq)
    if "bm25" in idx.channels:
        systems["ours bm25"] = (ours("bm25"), nq)
    for label, r in bm.items():
        systems[label] = (lambda i, r=r: r.retrieve(bm25s.tokenize(qtexts[i:i + 1], stopwords=None,
                                                                   show_progress=False), k=10,
                                                    show_progress=False, n_threads=1), nq)
    state = idx._current()  # the exhaustive sparse kernel is a segment-level option (private path)
    if "sparse" in idx.channels:
        systems["ours sparse"] = (ours("sparse"), nq)
        systems["sparse, exhaustive TAAT kernel (segments, private path)"] = (
            lambda i: [s.sparse.search(rows[i].sparse, 10, s.rows_mask(None), kernel="taat")
                       for s in state.segments], nq)
    if "colbert" in idx.channels:
        systems["ours colbert"] = (ours("colbert"), nq)
    systems["ours hybrid"] = (ours("hybrid"), nq)
    lat = interleaved(systems, rounds)
    lat[flat_name] = flat_lat
    print("scale_m3 versus: p50 ms " + ", ".join(f"{k}: {np.median(v.p50s):.3g}" for k, v in lat.items()),
          file=sys.stderr, flush=True)
    for name, L in lat.items():
        out["systems"][name] = {"p50": float(np.median(L.p50s)), "p99": float(np.median(L.p99s)), "p99s": L.p99s,
                                "p50s": L.p50s, "queries": nq}
    # recall@10 against the exact anchors
    found = {m: [ids(ours(m)(i)) for i in range(nq)]
             for m in ("dense", "sparse", "bm25", "colbert", "hybrid") if m == "hybrid" or m in idx.channels}
    out["recall"]["ours dense vs exact Flat"] = _recall(found["dense"], truth["dense"])
    if hnsw is not None:
        _, hi = hnsw.search(qd, 10)
        out["recall"]["bare FAISS HNSW32 vs exact Flat"] = _recall(
            [[f"d{x}" for x in row if x >= 0] for row in hi.tolist()], truth["dense"])
    if "sparse" in found:
        from hybridsearch.index.hybrid import _docnos

        parts = [(sc, _docnos(sg, ix)) for sg in state.segments
                 for sc, ix in [sg.sparse.search(Q.sparse[:nq], 10, sg.rows_mask(None), kernel="taat")]]
        _, ex = idx._merge(parts, nq, 10)
        out["recall"]["ours sparse vs exhaustive TAAT"] = _recall(
            found["sparse"], [[f"d{int(x)}" for x in row if x >= 0] for row in ex.tolist()])
    for label, r in bm.items():
        res, _ = r.retrieve(bm25s.tokenize(qtexts, stopwords=None, show_progress=False), k=10,
                            show_progress=False, n_threads=1)
        out["recall"][f"ours bm25 vs {label} (top-10 overlap)"] = _recall(
            found.get("bm25", []), [[f"d{int(x)}" for x in row] for row in np.asarray(res).tolist()])
    # batched: every query in one call
    Qall = Queries(Q.dense[:nq], Q.sparse[:nq], Q.colbert[:Q.colbert_offsets[nq]], Q.colbert_offsets[:nq + 1],
                   Q.texts[:nq], Q.sources[:nq])
    batch = {f"ours {m}": (lambda m=m: idx.search_batch(list(qtexts), k=10, mode=m, query_encoded=Qall.encoded()))
             for m in ("dense", "sparse", "bm25", "hybrid") if m == "hybrid" or m in idx.channels}
    if hnsw is not None:
        batch["bare FAISS HNSW32"] = lambda: hnsw.search(qd, 10)
    for label, r in bm.items():
        batch[label] = (lambda r=r: r.retrieve(bm25s.tokenize(qtexts, stopwords=None, show_progress=False), k=10,
                                               show_progress=False, n_threads=1))
    bt = {k_: [] for k_ in batch}
    for fn in batch.values():
        fn()
    for _ in range(rounds):
        for label, fn in batch.items():
            t = time.perf_counter()
            fn()
            bt[label].append(nq / (time.perf_counter() - t))
    bt[flat_name] = flat_batch
    out["batch"] = {k_: float(np.median(v)) for k_, v in bt.items()}
    # Last: the exhaustive MaxSim streams the whole ColBERT store through the page cache.
    nx = min(a.get("colbert_exhaustive_queries", 3), nq)
    if "colbert" in idx.channels and nx > 0:
        ts, ex_ids = [], []
        for i in range(nx):
            t = time.perf_counter()
            hits = ours("colbert", **a["colbert_exhaustive_kw"])(i)
            ts.append(1000 * (time.perf_counter() - t))
            ex_ids.append(ids(hits))
        out["systems"]["colbert, exhaustive MaxSim over every token"] = {
            "p50": float(np.median(ts)), "p99": float(max(ts)), "p50s": ts, "queries": nx}
        out["recall"]["ours colbert vs exhaustive MaxSim"] = _recall(found["colbert"][:nx], ex_ids)
    out["structures"] = [s.dense_factory if hasattr(s, "dense_factory") else "?" for s in state.segments]
    idx.close()
    return out


WORKERS = {"build": w_build, "serve": w_serve, "compact": w_compact, "milvus_build": w_milvus_build,
           "milvus_serve": w_milvus_serve, "versus": w_versus}


def run_worker(kind: str, args: dict, log, rss_cap_mib: float, timeout_s: float = 6 * 3600) -> dict:
    """Run ``WORKERS[kind](args)`` in a fresh interpreter (its progress goes to our stderr) and
    return its result. A watchdog polls the worker's memory every 0.1 s (RSS and anonymous RSS: the
    maxima seen are added to the result) and kills it when its anonymous memory passes
    ``rss_cap_mib`` (file pages of the mapped index are the kernel's to drop); a failed or killed
    worker returns ``{"failed": why, ...}``."""
    out = Path(args["out"])
    out.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    p = subprocess.Popen([sys.executable, "-m", "suite.scale_m3", kind, json.dumps(args)], cwd=BENCH, env=env,
                         stdout=sys.stderr)
    seen, killed = {"rss": 0.0, "anon": 0.0}, []

    def watch():
        while p.poll() is None:
            m = proc_mib(p.pid)
            for k in seen:
                seen[k] = max(seen[k], m[k])
            if m["anon"] > rss_cap_mib and not killed:
                killed.append(m["anon"])
                p.kill()
            time.sleep(0.1)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        rc = p.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        p.kill()
        rc = p.wait()
        killed.append(-1)
    th.join()
    if killed:
        why = (f"killed after {timeout_s:.0f} s" if killed[0] < 0 else
               f"killed by the benchmark's watchdog at {killed[0]:,.0f} MiB of anonymous memory (cap "
               f"{rss_cap_mib:,.0f} MiB)")
        log(f"scale_m3: {kind} {why}")
        return {"failed": why, "rss_max_seen_mib": seen["rss"], "anon_max_seen_mib": seen["anon"]}
    if rc != 0 or not out.exists():
        log(f"scale_m3: {kind} failed (exit {rc})")
        return {"failed": f"exit status {rc} (its error is in the log above)", "rss_max_seen_mib": seen["rss"],
                "anon_max_seen_mib": seen["anon"]}
    res = json.loads(out.read_text())
    res["rss_max_seen_mib"], res["anon_max_seen_mib"] = seen["rss"], seen["anon"]
    return res


def _worker_main(argv: list[str]) -> int:
    kind, args = argv[0], json.loads(argv[1])
    res = WORKERS[kind](args)
    tmp = Path(args["out"] + ".tmp")
    tmp.write_text(json.dumps(res, default=_jsonable))
    os.replace(tmp, args["out"])
    return 0


def _jsonable(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# ---------------------------------------------------------------- one size, end to end


@dataclass
class Options:
    sizes: list
    shape: Shape = Shape()
    create: dict = field(default_factory=dict)  # HybridIndex.create keyword arguments (see index_kwargs)
    queries: int = 100
    commit: int = 1000
    seed: int = 0
    colbert_max_docs: int = 100_000
    colbert_queries: int = 3
    colbert_budget_s: float = 120.0
    filter_queries: int = 30
    milvus_max_docs: int = 100_000
    compact: bool = True
    rss_cap_mib: float = 0.0     # anonymous memory; 0: 60% of the memory available at the start, at most 12 GiB
    min_free_gib: float = 3.0
    progress_s: float = 30.0
    model: str | None = None     # None: make_model's cache folder
    work: str | None = None      # where the index is built (None: the caller's temporary folder)
    keep: bool = False
    command: str = ""
    reuse: str | dict | None = None  # a kept run folder (index/, queries/, build.json): no build;
    #                                  or {size: folder} for several sizes
    compact_first: bool = False  # compact() before serving (an older index is rewritten in today's format)
    compact_dense_factory: str | None = None  # compact(dense_factory=...): e.g. "auto" for an index made "Flat"
    versus: bool = True          # the per-channel anchors (w_versus)
    serve: bool = True           # the serving process (memory, latency per mode, filters)
    versus_queries: int = 30
    hnsw_max_docs: int = 1_000_000
    colbert_exhaustive_queries: int = 3


def _available_mib() -> float:
    try:
        with open("/proc/meminfo") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("MemAvailable")) / 1024
    except (OSError, StopIteration, ValueError):
        return 16384.0


def disk_bytes(folder: Path) -> tuple[int, int]:
    """(allocated bytes as ``du`` counts them, apparent bytes) of a folder, links not followed."""
    alloc = apparent = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                s = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            alloc += s.st_blocks * 512
            apparent += s.st_size
    return alloc, apparent


def run_size(n: int, o: Options, work: Path, log) -> dict:
    """Every measurement for ``n`` documents; returns the record :func:`render` reads."""
    opts = effective(o.create)
    milvus = n <= o.milvus_max_docs and _have_milvus()
    rec = {"docs": n, "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "command": o.command, "code": code_version(),
           "create": o.create, "storage": opts, "shape": asdict(o.shape), "queries": o.queries,
           "commit": o.commit, "threads": {k: os.environ.get(k, "unset") for k in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")},
           "load_start": os.getloadavg()[0], "cpus": os.cpu_count()}
    reuse = o.reuse.get(n) if isinstance(o.reuse, dict) else o.reuse
    rec["disk_check"] = ({"estimate_bytes": 0, "reused": reuse} if reuse
                         else check_disk(work, n, o.shape, opts, o.commit, milvus, log))
    cap = o.rss_cap_mib or min(12288.0, 0.6 * _available_mib())
    rec["rss_cap_mib"] = cap
    model = o.model or str(make_model(None, o.shape))
    folder = Path(reuse) if reuse else Path(tempfile.mkdtemp(prefix=f"scale_m3_{n}_", dir=work))
    try:
        base = {"shape": asdict(o.shape), "model": model, "docs": n, "seed": o.seed, "commit": o.commit,
                "index": str(folder / "index"), "queries_dir": str(folder / "queries"), "queries": o.queries}
        if reuse:  # the build of an earlier run, kept with --keep
            rec["build"] = json.loads((folder / "build.json").read_text())
            rec["build"]["reused"] = str(folder)
            log(f"scale_m3: {n:,} docs: reusing the index built in {folder}")
        else:
            log(f"scale_m3: {n:,} docs: build (commits of {o.commit:,}) in {folder}")
            rec["build"] = run_worker("build", {**base, "create": o.create, "min_free_bytes": o.min_free_gib * 2**30,
                                                "progress_s": o.progress_s, "out": str(folder / "build.json")}, log, cap)
        if "failed" in rec["build"]:
            return rec
        if o.compact_first:
            log(f"scale_m3: {n:,} docs: compact() first (rewrites the index in this version's format)")
            rec["compact"] = run_worker("compact", {**base, "dense_factory": o.compact_dense_factory,
                                                    "out": str(folder / "compact.json")}, log, cap)
            if "failed" in rec["compact"]:
                return rec
            rec["compact"]["du_bytes"] = disk_bytes(folder / "index")[0]
        rec["du_bytes"], rec["apparent_bytes"] = disk_bytes(folder / "index")
        log(f"scale_m3: {n:,} docs: built in {rec['build']['add_s']:.0f} s; serving in a fresh process")
        rec["serve"] = {} if not o.serve else run_worker("serve", {**base, "colbert_max_docs": o.colbert_max_docs,
                                            "colbert_queries": o.colbert_queries, "colbert_budget_s": o.colbert_budget_s,
                                            "filter_queries": o.filter_queries, "out": str(folder / "serve.json")},
                                  log, cap)
        if o.versus:
            log(f"scale_m3: {n:,} docs: every channel against its anchor, in one fresh process")
            rec["versus"] = run_worker("versus", {**base, "queries": min(o.versus_queries, o.queries),
                                                  "hnsw_max_docs": o.hnsw_max_docs,
                                                  "colbert_exhaustive_queries": o.colbert_exhaustive_queries,
                                                  "colbert_exhaustive_kw": COLBERT_EXHAUSTIVE_KW,
                                                  "out": str(folder / "versus.json")}, log, max(cap, 16384.0))
        if milvus:
            log(f"scale_m3: {n:,} docs: Milvus Lite on the same rows")
            mb = {**base, "folder": str(folder / "milvus")}
            rec["milvus_build"] = run_worker("milvus_build", {**mb, "out": str(folder / "mb.json")}, log, cap)
            if "failed" not in rec["milvus_build"]:
                rec["milvus_serve"] = run_worker("milvus_serve", {**mb, "queries": min(o.queries, 20),
                                                                  "out": str(folder / "ms.json")}, log, cap)
            shutil.rmtree(folder / "milvus", ignore_errors=True)
        if o.compact and not o.compact_first:
            from hybridsearch import HybridIndex

            if hasattr(HybridIndex, "compact"):
                log(f"scale_m3: {n:,} docs: compact() in a fresh process (RSS cap {cap:,.0f} MiB)")
                rec["compact"] = run_worker("compact", {**base, "out": str(folder / "compact.json")}, log, cap)
                if "failed" not in rec["compact"]:
                    rec["compact"]["du_bytes"] = disk_bytes(folder / "index")[0]
    finally:
        rec["load_end"] = os.getloadavg()[0]
        if o.keep or reuse:
            log(f"scale_m3: kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return rec


def code_version() -> str:
    """Which hybridsearch ran: version, and the git commit of its checkout (+ local changes), or its path."""
    import hybridsearch

    root = Path(hybridsearch.__file__).resolve().parents[1]
    ver = getattr(hybridsearch, "__version__", "?")

    def git(*a):
        r = subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else None

    head = git("rev-parse", "--short", "HEAD") if (root / ".git").exists() else None
    if not head:
        return f"hybridsearch {ver} from {root}"
    dirty = git("status", "--porcelain", "--", "hybridsearch")
    return f"hybridsearch {ver} at {head}" + (" with local changes" if dirty else "")


def _have_milvus() -> bool:
    from suite.milvus import available

    return available()


# ---------------------------------------------------------------- report


def _f(x, nd=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}g}" if abs(x) < 1000 else f"{x:,.0f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_f(v) for v in r) + " |" for r in rows])


def render(records: dict) -> tuple[str, list[str]]:
    """Markdown body (tables for every recorded size) and the lines where Milvus Lite beats us."""
    recs = [records[k] for k in sorted(records, key=int)]
    build, disk, mem, lat, filt, mil, notes, losses, versus = [], [], [], [], [], [], [], [], []
    for r in recs:
        n, key = r["docs"], f"{r['docs']:,}"
        s = r["storage"]
        conf = f"dense {s['dense_storage']}, ColBERT {s['colbert_codec']}" + (
            f", {s['dense_factory']}" if s["dense_factory"] != "Flat" else "")
        threads = ", ".join(f"{k}={v}" for k, v in r["threads"].items())
        notes.append(f"{key} documents: {r['date']}, `{r['command']}`, {r.get('code', '?')}; {conf}; commits of {r['commit']:,}; "
                     f"{threads}; worker cap {r['rss_cap_mib']:,.0f} MiB of anonymous memory; disk estimate before "
                     f"the run {r['disk_check']['estimate_bytes'] / 2**30:.1f} GiB"
                     + (f"; load average {r['load_start']:.1f} at the start, {r['load_end']:.1f} at the end on "
                        f"{r['cpus']} CPUs" if "load_end" in r else "") + ".")
        b = r.get("build", {})
        if "failed" in b:
            notes.append(f"**{key} documents: the build failed**: {b['failed']}.")
            continue
        st = b["stats"]
        bs = b["add_s"] + b["close_s"]
        cs = np.asarray(b.get("commit_s", []))
        if len(cs):
            top = np.argsort(-cs, kind="stable")[:5]
            notes.append(f"{key} documents, slowest commits (number from 1: seconds): "
                         + ", ".join(f"{i + 1}: {cs[i]:.1f}" for i in top) + f"; median {np.median(cs):.2f} s.")
        build.append([key + (" (recorded build of the reused index)" if b.get("reused") else ""), conf, bs, n / bs,
                      b["commit_max_s"], b["commit_p50_s"], b["commit_p99_s"],
                      b["slow_commits"], st["segments"], b["gen_s"], b["wall_s"]])
        tok = max(st["tokens"] - st["documents"], 1)
        total = 0
        for ch, v in st["channel_bytes"].items():
            total += v["bytes"]
            extra = f" ({v['bytes'] / tok:.0f} B per ColBERT vector given)" if ch == "colbert" else ""
            disk.append([key, ch + extra, v["bytes"] / n])
        disk.append([key, "all channels (stats())", total / n])
        disk.append([key, "index folder, allocated (du)", r["du_bytes"] / n])
        if "compact" in r and "failed" not in r["compact"]:
            disk.append([key, "index folder after compact(), allocated (du)", r["compact"]["du_bytes"] / n])
        mem += [[key, "build process: peak (RSS: ru_maxrss; anonymous: highest seen, polled), merges included",
                 b["maxrss_mib"], b.get("anon_max_seen_mib")],
                [key, "build process before the first add (python, torch, fp16 model, generator with one block)",
                 b["rss_base_mib"], b.get("anon_base_mib")]]
        sv = r.get("serve", {})
        if "failed" in sv:
            notes.append(f"**{key} documents: the serving process failed**: {sv['failed']}.")
        elif sv:
            m = sv["modes"]
            q = m.get("hybrid", {}).get("queries", 0)
            mem += [[key, "fresh process: growth after HybridIndex.open", sv["rss_open_mib"], sv["anon_open_mib"]],
                    [key, f"... after {q} single queries per mode (dense, sparse, bm25, hybrid)", sv["rss_queries_mib"],
                     sv["anon_queries_mib"]],
                    [key, "... after the ColBERT brute-force queries too", sv["rss_colbert_mib"], sv["anon_colbert_mib"]],
                    [key, "... after the filtered queries too", sv["rss_end_mib"], sv["anon_end_mib"]],
                    [key, "... the whole process at the end (python, torch, fp16 model included)", sv["rss_end_abs_mib"],
                     None]]
            for mode in MODES:
                x = m.get(mode)
                if x is None:
                    continue
                if "skipped" in x:
                    lat.append([key, mode, None, None, None, 0, None])
                    notes.append(f"{key} documents, colbert mode not timed: {x['skipped']}.")
                    continue
                lat.append([key, mode + (" (brute force)" if mode == "colbert" else ""), x["p50"], x["p99"],
                            x["first_ms"], x["queries"], f"{100 * x['hit10']:.0f}%"])
            for name, f in sv["filters"].items():
                filt.append([key, name, f"{100 * f['fraction']:.0f}%", f["p50_plain"], f["p50_filtered"],
                             f["p50_filtered"] - f["p50_plain"], f["first_ms"], f.get("mask_ms"),
                             f.get("mask_first_ms"), f.get("mask_api", "not exposed"), f["violations"]])
        vs = r.get("versus")
        if vs and "failed" in vs:
            notes.append(f"**{key} documents: the per-channel anchors failed**: {vs['failed']}.")
        elif vs:
            versus += _versus_rows(key, vs, losses)
            notes += [f"{key} documents, anchors: {x}" for x in vs.get("notes", [])]
            notes.append(f"{key} documents, anchors built in the same process: " + ", ".join(
                f"{k_} {v_:,.0f}" for k_, v_ in vs["build"].items()) + "; dense structure per segment: "
                + ", ".join(map(str, vs.get("structures", []))) + ".")
        c = r.get("compact")
        if c and "failed" in c:
            notes.append(f"{key} documents, compact(): {c['failed']}.")
        elif c:
            mem += [[key, f"compaction process: peak ({c['seconds']:.0f} s, {c['segments_before']} -> "
                          f"{c['segments_after']} segments)", c["maxrss_mib"], c.get("anon_max_seen_mib")],
                    [key, "compaction process: after opening the index, before compact()", c["rss_open_mib"],
                     c.get("anon_open_mib")]]
        mb, ms = r.get("milvus_build"), r.get("milvus_serve")
        if mb and "failed" in mb:
            notes.append(f"{key} documents, Milvus Lite: {mb['failed']}.")
        elif mb:
            ours_nc = sum(v["bytes"] for ch, v in st["channel_bytes"].items() if ch != "colbert")
            mil += [[key, "insert rate (docs/s; ours: add() with ColBERT)", n / bs, n / mb["insert_s"]],
                    [key, "disk bytes/doc (ours: all channels)", total / n, mb["disk_bytes"] / n],
                    [key, "disk bytes/doc without ColBERT (Milvus has no multi-vector field)", ours_nc / n,
                     mb["disk_bytes"] / n]]
            if ms and "failed" not in ms and sv and "failed" not in sv:
                mil += [[key, "RSS growth: reopen (MiB)", sv["rss_open_mib"], ms["rss_open_mib"]],
                        [key, "RSS growth: reopen + queries (MiB; ours: 4 modes)", sv["rss_queries_mib"],
                         ms["rss_queries_mib"]],
                        [key, "anonymous memory growth: reopen + queries (MiB)", sv["anon_queries_mib"],
                         ms["anon_queries_mib"]]]
                for mine, theirs in (("dense", "dense"), ("sparse", "sparse"), ("bm25", "bm25"),
                                     ("hybrid", "hybrid (RRF)")):
                    if mine in sv["modes"] and theirs in ms["modes"]:
                        a_, b_ = sv["modes"][mine], ms["modes"][theirs]
                        mil.append([key, f"{mine} p50 ms (Milvus: {theirs}); source in top 10", f"{a_['p50']:.3g} ms; "
                                    f"{100 * a_['hit10']:.0f}%", f"{b_['p50']:.3g} ms; {100 * b_['hit10']:.0f}%"])
                        if b_["p50"] < a_["p50"]:
                            losses.append(f"{key} docs (BGE-M3 shape), {mine} p50: ours {a_['p50']:.3g} ms vs Milvus "
                                          f"Lite {b_['p50']:.3g} ms")
                if ms["rss_queries_mib"] < sv["rss_queries_mib"] / 1.1:
                    losses.append(f"{key} docs (BGE-M3 shape), memory: our opened index grew {sv['rss_queries_mib']:,.0f}"
                                  f" MiB vs Milvus Lite {ms['rss_queries_mib']:,.0f} MiB (ours also serves ColBERT)")
            if mb["disk_bytes"] < ours_nc / 1.1:
                losses.append(f"{key} docs (BGE-M3 shape), disk without ColBERT: ours {ours_nc / n:,.0f} bytes/doc vs "
                              f"Milvus Lite {mb['disk_bytes'] / n:,.0f}")
            if mb["insert_s"] < bs:
                losses.append(f"{key} docs (BGE-M3 shape), build: Milvus Lite {n / mb['insert_s']:,.0f} docs/s vs ours "
                              f"{n / bs:,.0f} (ours also writes ColBERT"
                              + ("; ours is the recorded build of the reused index, not measured in this run)"
                                 if b.get("reused") else ")"))
    sh = Shape(**{k: tuple(v) if isinstance(v, list) else v for k, v in recs[0]["shape"].items()}) if recs else Shape()
    intro = (
        f"Synthetic rows with BGE-M3's shapes (`bench/suite/scale_m3.py`): dense {sh.dim}-d (centroid of one of "
        f"{sh.topics:,} topics + noise), learned sparse over {sh.vocab:,} terms (~60 a document), ColBERT {sh.colbert_dim}-d, "
        f"{sh.tokens[0]}-{sh.tokens[1]} vectors a document (mean {sh.tokens_mean():.0f}), ~60-word texts, metadata "
        f"year / lang / source. Built through `HybridIndex.add(docs, encoded=...)` in commits of {recs[0]['commit'] if recs else 1000:,} "
        "(the CLI's default is 1,000) in one process; every other figure comes from a fresh process that opens the index. Queries are "
        "derived from random documents (noised dense vector, 8 of their sparse terms + 4 others, 20 of their "
        "ColBERT vectors + 12 others, 6 of their words + 2 others), precomputed and passed with `query_encoded=`, "
        "so no model runs: 'source in top 10' is how often the document a query came from is among its 10 hits. "
        "Latency: single queries, k=10, p50/p99 over the queries after one warm-up call ('first call' is that "
        "call: it includes compiling the Numba kernels when their on-disk cache is cold). The serving process "
        "makes one pass over its queries right after opening the index, so its latencies include reading "
        "pages the page cache does not hold yet (at 1M the index is ~16.5 GB on this 24 GB machine); the "
        "anchor table's figures are medians over interleaved rounds, of which only the first reads them.")
    body = [intro,
            "### Build", _table(["docs", "storage", "add() + close() s", "docs/s", "slowest commit s",
                                 "median commit s", "p99 commit s", "commits > 3x median", "segments at end",
                                 "generation s (excluded)", "wall s"], build),
            "### Bytes per document on disk", _table(["docs", "channel", "bytes/doc"], disk),
            "### Memory (MiB)", "RSS includes the pages of memory-mapped index files a process touched (the "
            "kernel drops them under pressure); 'anonymous' is memory the process allocated.",
            _table(["docs", "process, moment", "RSS", "anonymous"], mem),
            "### Query latency (ms)", _table(["docs", "mode", "p50", "p99", "first call", "queries",
                                              "source in top 10"], lat),
            *(["### Every channel against its anchor (k=10, same rows and queries, one process)",
               "Single queries on one thread, p50/p99 per round and the median over interleaved rounds; "
               "'ratio' is the median over rounds of our p50 / the anchor's (< 1: we are faster; the "
               "exhaustive ColBERT MaxSim runs on a few queries only, so its ratio is of medians). Batched: "
               "every query in one call. Recall@10 is against the exact anchor of the channel (for BM25: the "
               "overlap of the two top-10 lists).",
               _table(["docs", "channel", "system", "p50 ms", "p99 ms", "batched queries/s", "recall@10",
                       "ours / it (p50)"], versus)] if versus else []),
            "### Filters (hybrid mode, k=10; filtered minus unfiltered, same queries interleaved)",
            _table(["docs", "filter", "keeps", "unfiltered p50", "filtered p50", "difference", "first filtered call",
                    "mask alone", "mask, first call", "mask API", "hits failing the filter"], filt)]
    if mil:
        body += ["### Milvus Lite on the same rows (dense FLAT + sparse + BM25; it cannot store ColBERT vectors)",
                 _table(["docs", "what", "hybridsearch", "Milvus Lite"], mil)]
    targets = _targets(recs_by_size(records_list=recs), losses)
    if targets:
        body += ["### Targets of the issue \"Query speed at 1M-10M\" (from the tables above)",
                 "The exact learned-sparse target (5x the term-at-a-time scan at 1M) is the section "
                 "\"Learned sparse: exact pruning\" of the same run.",
                 _table(["target", "docs", "measured", "met"], targets)]
    body += ["### Runs", "\n".join(f"- {x}" for x in notes)]
    if losses:
        body += ["### Where we lose here", "\n".join(f"- {x}" for x in losses)]
    return "\n\n".join(body), losses


def recs_by_size(records_list: list) -> dict:
    return {int(r["docs"]): r for r in records_list}


def _targets(recs: dict, losses: list) -> list:
    """Rows ``[target, docs, measured, met]`` of issue 13's targets that these records measure;
    a missed one also becomes a loss line."""
    rows = []

    def add(target, n, measured, ok):
        rows.append([target, f"{n:,}", measured, "yes" if ok else "**no**"])
        if not ok:
            losses.append(f"{n:,} docs (BGE-M3 shape), target missed: {target}: {measured}")

    for n, r in sorted(recs.items()):
        vs, sv = r.get("versus") or {}, r.get("serve") or {}
        S, B, R = vs.get("systems", {}), vs.get("batch", {}), vs.get("recall", {})
        if "ours bm25" in S and "bm25s (numba backend)" in S:
            a, b = S["ours bm25"], S["bm25s (numba backend)"]
            ratio = float(np.median(np.asarray(a["p50s"]) / np.asarray(b["p50s"])))
            add("BM25 single query at or ahead of bm25s-numba", n,
                f"{a['p50']:.3g} vs {b['p50']:.3g} ms p50 ({ratio:.2f}x its time)", ratio <= 1.0)
        if "ours bm25" in B and "bm25s (numba backend)" in B:
            a, b = B["ours bm25"], B["bm25s (numba backend)"]
            add("BM25 batched at or ahead of bm25s-numba", n, f"{a:,.0f} vs {b:,.0f} queries/s", a >= b)
        if n < 1_000_000:
            continue
        if "ours dense" in S and "ours dense vs exact Flat" in R:
            p, rc = S["ours dense"]["p50"], R["ours dense vs exact Flat"]
            add("dense p50 <= 5 ms at recall@10 >= 0.95 (vs exact)", n, f"{p:.3g} ms, recall {rc:.3f}",
                p <= 5.0 and rc >= 0.95)
        ex = S.get("colbert, exhaustive MaxSim over every token")
        if "ours colbert" in S and ex and "ours colbert vs exhaustive MaxSim" in R:
            sp, rc = ex["p50"] / S["ours colbert"]["p50"], R["ours colbert vs exhaustive MaxSim"]
            add("colbert mode >= 10x faster than exhaustive MaxSim at recall@10 >= 0.95", n,
                f"{sp:.0f}x ({S['ours colbert']['p50']:,.0f} vs {ex['p50']:,.0f} ms), recall {rc:.3f} on "
                f"{ex['queries']} quer{'y' if ex['queries'] == 1 else 'ies'}", sp >= 10 and rc >= 0.95)
        if "ours hybrid" in S:
            h = S["ours hybrid"]
            add("hybrid p50 <= 30 ms, all four channels", n,
                f"{h['p50']:.3g} ms p50, p99 {h['p99']:.3g} (median of {len(h['p50s'])} interleaved rounds of "
                f"{h['queries']} queries, anchor process)", h["p50"] <= 30.0)
        h = sv.get("modes", {}).get("hybrid")
        if h and "p50" in h:  # reported, not a target: one pass right after opening
            f = next(iter(sv.get("filters", {}).values()), {})
            rows.append(["hybrid, first pass of the serving process just after opening (cold page cache)",
                         f"{n:,}", f"{h['p50']:.3g} ms p50, p99 {h['p99']:.3g} ({h['queries']} queries)"
                         + (f"; the same process's next pass over {f['queries']} of them: {f['p50_plain']:.3g} ms p50"
                            if "p50_plain" in f else ""), "-"])
    return rows


def _versus_rows(key: str, vs: dict, losses: list) -> list:
    """Table rows (and loss lines) of one :func:`w_versus` record."""
    S, B, R = vs["systems"], vs.get("batch", {}), vs.get("recall", {})

    def find(prefix):
        return next((k_ for k_ in S if k_.startswith(prefix)), None)

    def batch_of(name):
        return B.get(name) or B.get(name.split(" (efSearch")[0]) or B.get(name.replace(" (exact)", "") + " (exact)")

    groups = [("dense", "ours dense", [("bare FAISS IndexFlatIP", "ours dense vs exact Flat"),
                                       ("bare FAISS HNSW32", "bare FAISS HNSW32 vs exact Flat")]),
              ("bm25", "ours bm25", [("bm25s (numba backend)", None), ("bm25s", None)]),
              ("sparse", "ours sparse", [("sparse, exhaustive TAAT", "ours sparse vs exhaustive TAAT")]),
              ("colbert", "ours colbert", [("colbert, exhaustive", "ours colbert vs exhaustive MaxSim")]),
              ("hybrid", "ours hybrid", [])]
    rows = []
    for ch, mine, anchors in groups:
        if mine not in S:
            continue
        m = S[mine]
        rec_key = {"dense": "ours dense vs exact Flat", "sparse": "ours sparse vs exhaustive TAAT",
                   "colbert": "ours colbert vs exhaustive MaxSim"}.get(ch)
        if ch == "bm25":
            rec = "; ".join(f"{v_:.3f} vs {k_.split(' vs ')[1].split(' (top')[0]}" for k_, v_ in R.items()
                            if k_.startswith("ours bm25 vs"))
        else:
            rec = None if rec_key is None else R.get(rec_key)
        rows.append([key, ch, "hybridsearch (" + mine.split()[1] + ")", m["p50"], m["p99"], batch_of(mine), rec, None])
        for prefix, rk in anchors:
            name = prefix if prefix in S else find(prefix)
            if name is None:
                continue
            a_ = S[name]
            if len(a_["p50s"]) == len(m["p50s"]) and a_["queries"] == m["queries"]:
                ratio = float(np.median(np.asarray(m["p50s"]) / np.asarray(a_["p50s"])))
            else:
                ratio = m["p50"] / a_["p50"]
            rec_a = R.get(rk) if rk and not rk.startswith("ours") else ("exact" if rk else None)
            rows.append([key, ch, name, a_["p50"], a_["p99"], batch_of(name), rec_a, ratio])
            if ratio > 1.0:
                losses.append(f"{key} docs (BGE-M3 shape), {ch} top-10: ours p50 {m['p50']:.3g} ms vs {name} "
                              f"{a_['p50']:.3g} ms ({ratio:.2f}x slower" + (", within noise)" if ratio < 1.1 else ")"))
            bo, ba = batch_of(mine), batch_of(name)
            if bo and ba and ba > bo:
                losses.append(f"{key} docs (BGE-M3 shape), batched {ch}: {name} {ba:,.0f} queries/s vs ours "
                              f"{bo:,.0f} ({ba / bo:.2f}x)")
    return rows


RAW_MARK = "<!-- scale_m3 raw records (read back by bench/suite/scale_m3.py) -->"


def read_records(md: Path) -> dict:
    """The raw records stored at the end of a previous ``scale_m3.md`` (``{}`` when absent or unreadable)."""
    try:
        if md.is_symlink() or md.stat().st_size > 16 << 20:
            return {}
        text = md.read_text(encoding="utf-8")
    except OSError:
        return {}
    m = re.search(re.escape(RAW_MARK) + r"\n```json\n(.*)\n```", text, re.S)
    try:
        recs = json.loads(m.group(1)) if m else {}
    except ValueError:
        return {}
    ok = isinstance(recs, dict) and all(isinstance(k, str) and k.isdigit() and isinstance(v, dict)
                                        and v.get("docs") == int(k) and isinstance(v.get("storage"), dict)
                                        for k, v in recs.items())
    return recs if ok else {}


def write_results(md: Path, new: dict, machine: str) -> tuple[str, list[str]]:
    """Merge ``new`` records (size -> record) into ``md``'s and rewrite it; returns (body, losses)."""
    recs = read_records(md)
    recs.update({str(k): v for k, v in new.items()})
    body, losses = render(recs)
    md.parent.mkdir(parents=True, exist_ok=True)
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(f"# {TITLE}\n\n{machine}\n\n{body}\n\n{RAW_MARK}\n```json\n"
                   f"{json.dumps(recs, indent=1, default=_jsonable)}\n```\n")
    os.replace(tmp, md)
    return body, losses


def recorded_section(md: Path):
    """The section as last recorded in ``md`` (for a RESULTS.md run that did not measure it), or None."""
    from suite.report import Section

    recs = read_records(md)
    if not recs:
        return None
    body, losses = render(recs)
    return Section(TITLE, f"Recorded by an earlier run (`{md.name}`); not measured in this run.\n\n{body}",
                   losses=[f"{x} (recorded earlier)" for x in losses])


def splice(results_md: Path, body: str) -> None:
    """Replace (or append) this section in a RESULTS.md written by bench/run.py."""
    if not results_md.exists():
        return
    text = results_md.read_text(encoding="utf-8")
    head = f"## {TITLE}"
    new = f"{head}\n\n{body}\n"
    i = text.find(head + "\n")
    if i < 0:
        text = text.rstrip("\n") + "\n\n" + new
    else:
        j = text.find("\n## ", i + len(head))
        text = text[:i] + new + (text[j:] if j >= 0 else "")
    results_md.write_text(text)


def run_all(o: Options, work: Path, results_md: Path, log):
    """Every size of ``o``; records merged into ``results_md``. Returns a :class:`Section`."""
    from common import machine_info

    from suite.report import Section

    recs = {}
    for n in sorted(o.sizes):
        t = time.perf_counter()
        recs[n] = run_size(n, o, work, log)
        log(f"scale_m3: {n:,} docs done in {time.perf_counter() - t:.0f} s")
        write_results(results_md, recs, machine_info())  # after each size: a long run keeps what it measured
    body, losses = write_results(results_md, recs, machine_info())
    return Section(TITLE, body, losses=losses, data={"scale_m3": recs, "latency_m3": latency_by_channel(recs)})


def latency_by_channel(recs: dict) -> dict:
    """``{channel: {system: {docs: p50 ms}}}`` from the anchors of each size (for the plot), plus
    our modes as the serving process measured them (the index alone in its process)."""
    out: dict = {}
    for n, rec in recs.items():
        for name, v in (rec.get("versus") or {}).get("systems", {}).items():
            low = name.lower()
            channel = next((c for c in ("hybrid", "colbert", "sparse", "bm25", "dense") if c in low),
                           "dense" if "faiss" in low else None)
            if channel is not None:
                out.setdefault(channel, {}).setdefault(name, {})[int(n)] = v["p50"]
        for mode, v in (rec.get("serve") or {}).get("modes", {}).items():
            if "p50" in v and mode != "colbert":  # its brute force is the anchor above
                out.setdefault(mode, {}).setdefault(f"ours {mode} (serving process, first pass after opening)", {})[int(n)] = v["p50"]
    return out


def run(cfg, tmp_root: Path, log):
    """bench/run.py's entry: sizes ``cfg.m3_docs`` (tiny mode: 300 documents of :data:`TINY`,
    recorded in ``scale_m3_tiny.md`` beside ``cfg.m3_results``)."""
    tiny = cfg.mode == "tiny"
    shape = TINY if tiny else Shape()
    reuse = {int(json.loads((Path(d) / "build.json").read_text())["docs"]): str(Path(d).resolve())
             for d in (getattr(cfg, "m3_reuse", None) or [])}
    sizes = sorted(reuse) or list(getattr(cfg, "m3_docs", None) or ([300] if tiny else [100_000]))
    cmd = f"bench/run.py --{cfg.mode} --sections scale_m3" + (
        " --m3-reuse " + " ".join(reuse.values()) if reuse else "")
    o = Options(sizes=sizes, shape=shape,
                create=dict(getattr(cfg, "m3_index", None) or {}), queries=20 if tiny else 100,
                commit=100 if tiny else 1000, colbert_queries=3, filter_queries=10 if tiny else 30,
                progress_s=5.0 if tiny else 30.0, command=cmd, reuse=reuse or None,
                compact=not reuse,  # never rewrite a kept index as a side effect of measuring it
                versus_queries=getattr(cfg, "m3_versus_queries", 30),
                colbert_exhaustive_queries=getattr(cfg, "m3_exhaustive_queries", 3),
                hnsw_max_docs=getattr(cfg, "hnsw_max", 1_000_000))
    if tiny:
        o.model = str(make_model(tmp_root / "m3-tiny", shape))
    results = Path(getattr(cfg, "m3_results", None) or BENCH / "results" / "scale_m3.md")
    if tiny:  # never mixed with the records of real sizes
        results = results.with_name("scale_m3_tiny.md")
    return run_all(o, tmp_root, results, log)


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
