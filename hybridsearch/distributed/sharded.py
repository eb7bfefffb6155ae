"""A sharded hybrid index on Ray: N shard actors, each a full HybridIndex in its own folder.

Layout: ``DIR/sharding.json`` (format, shard and replica counts, model, routing) and one index
folder per shard copy: ``DIR/shard-00``, ``DIR/shard-01``... (replica 0) and
``DIR/shard-00-r1``... (further replicas). A document goes to shard ``hash_ids([id]) % N`` (the
docstore's 64-bit id hash: stable across processes and machines), so an upsert or a delete
reaches the shard that holds the id. Writes go to every replica of a shard and are acknowledged
when all of them committed; reads go to one replica, round robin.

A query is encoded once by the coordinator (this object, in the driver) and fans out:

1. BM25 statistics: every shard reports ``N``, total length and ``df`` of the query terms; the
   coordinator sums them (Elasticsearch's ``dfs_query_then_fetch``, Milvus's IDF oracle), so a
   shard scores BM25 as the single index would.
2. Candidates: each shard returns, per channel, its top ``C`` with raw scores, and every model
   channel's exact score over its local union (``HybridIndex._shard_candidates``). The global
   top ``C`` of a channel is among the shards' top ``C``; the coordinator takes it, unions,
   normalises and weighs once (``fusion.fuse``), exactly as one index fuses its union.
3. Documents: the shards that own the final top ``k`` return their text and metadata, from the
   same snapshot that answered step 2.

ColBERT codebook (``res1``, ``res2``, ``res1-pool2``): one for all shards, so every shard codes
and scores ColBERT as one index coded with it. Shards are made with ``train_codebook=False``
(recorded in their manifests: they never train one). The coordinator trains it once, in the
write that brings the stored float16 vectors plus the write in hand to ``codec_train_tokens``
(as one index does), on a sample of the write and of the shards' float16 vectors; it saves it as
``DIR/codebook-NNNNNN/`` (fsync, rename), names it in ``sharding.json`` (with its identity),
installs it on every replica (``HybridIndex.install_codebook``: one commit), then writes.
``open`` installs the named codebook on every replica that lacks it (a coordinator that died
between these steps) and refuses a replica coded with another one.

Faults: shard actors run with ``max_restarts=-1``; a restarted actor reopens its folder at the
last commit. A call that fails because the actor died is retried (another replica first) until
``timeout``; then the query raises :class:`ShardUnavailableError`, or with ``partial=True``
returns what the live shards answered, marked ``partial`` with the ``missing`` shards named.
Writes are idempotent per shard (upsert; delete of what is there), so a write interrupted by a
death is retried until it commits on every replica, and only then acknowledged.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    GetTimeoutError,
    RayActorError,
    RayTaskError,
)

from ..errors import HybridSearchError, IndexFormatError
from ..fusion import FusionConfig, fuse_terms
from ..index import locking
from ..index.docstore import hash_ids
from ..index.filters import check_filter
from ..index.hybrid import (
    CODEC_TRAIN_TOKENS,
    MODES,
    Hit,
    _check_docs,
    _check_encoded,
    _check_query_inputs,
    _codec_sample,
    _rerank,
    default_candidates_for,
    default_fusion_for,
)
from ..index.storage import fsync_dir
from ..representations import Encoded
from ..retrievers import bm25_postings
from ..retrievers.colbert_codec import (
    CODECS,
    INDEX_TRAINING,
    MAX_TRAIN_SAMPLE,
    ColbertCodec,
    default_k,
    parse_codec,
)

LAYOUT_FILE = "sharding.json"
LAYOUT_FORMAT = "hybridsearch-sharded"
# 2: the shards share one ColBERT codebook (``colbert_codec`` in the layout). 1 (read): each
# shard trained its own (ColBERT scores then differ from one index's).
LAYOUT_VERSION = 2
LAYOUT_VERSIONS = (1, 2)
CODEBOOK_RE = re.compile(r"codebook-[0-9]{6}")
DEFAULT_TIMEOUT = 120.0
_DEAD = (RayActorError, ActorDiedError, ActorUnavailableError)


class ShardUnavailableError(HybridSearchError):
    """A shard had no live replica within the timeout. ``missing``: the shard numbers."""

    def __init__(self, missing: Sequence[int], timeout: float):
        self.missing = list(missing)
        super().__init__(f"shard(s) {self.missing} unavailable for {timeout:g} s "
                         "(actor dead or restarting); pass partial=True to get the other shards' hits")


class SearchResult(list):
    """A list of hits, plus ``partial`` (some shard did not answer) and ``missing`` (which)."""

    partial: bool = False
    missing: tuple[int, ...] = ()

    def __init__(self, hits=(), missing: Sequence[int] = ()):
        super().__init__(hits)
        self.missing = tuple(missing)
        self.partial = bool(self.missing)


def shard_of(ids: Sequence[str], n_shards: int) -> np.ndarray:
    """Shard number of each id: the docstore's 64-bit id hash modulo the shard count."""
    return (hash_ids(list(ids)) % np.uint64(n_shards)).astype(np.int64)


def shard_folder(root: Path, shard: int, replica: int = 0) -> Path:
    return root / (f"shard-{shard:02d}" if replica == 0 else f"shard-{shard:02d}-r{replica}")


def take(enc: Encoded, rows) -> Encoded:
    """The representations of ``rows`` (in that order) of a batch."""
    rows = np.asarray(rows, np.int64)
    colbert = offsets = None
    if enc.colbert is not None:
        o = enc.colbert_offsets
        lens = o[rows + 1] - o[rows]
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        colbert = np.concatenate([enc.colbert[o[r]:o[r + 1]] for r in rows]) if len(rows) else enc.colbert[:0]
    sparse = None
    if enc.sparse is not None:
        sparse = enc.sparse[rows]
        sparse.sort_indices()
    return Encoded(dense=None if enc.dense is None else np.ascontiguousarray(enc.dense[rows]), sparse=sparse,
                   colbert=colbert, colbert_offsets=offsets, n_tokens=enc.n_tokens[rows])


class _Shard:
    """The body of a shard actor: one HybridIndex over one folder, opened (or created) at start,
    so a restarted actor serves the folder's last commit."""

    def __init__(self, path: str, model: str, create: dict | None, lock_timeout: float):
        import torch

        from ..encode import BGEM3Encoder
        from ..index.hybrid import HybridIndex

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        encoder = BGEM3Encoder(model, device="cpu")  # opening checks the model; shards never encode
        if create is not None:
            self.index = HybridIndex.create(path, encoder, exist_ok=True, lock_timeout=lock_timeout, **create)
        else:
            self.index = HybridIndex.open(path, encoder, lock_timeout=lock_timeout)
        self._states: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def pid(self) -> int:
        return os.getpid()

    def generation(self) -> int:
        return int(self.index._current().generation)

    def bm25_stats(self, queries):
        """``(generation, (N, total length, df of query_terms(queries)))`` of one committed
        state (None instead of the statistics without BM25 postings)."""
        from ..retrievers import bm25_postings

        state = self.index._current()
        if not state.has_bm25 or state.bm25 is not None:
            return state.generation, None
        return state.generation, bm25_postings.collection_stats([s.bm25 for s in state.segments],
                                                                bm25_postings.query_terms(queries))

    def candidates(self, queries, q, mode, k, C, flt, stats, exhaustive, cfg=None, send_docs=True):
        """``(generation, per query candidates, {docno: document})``. The documents are those
        of this shard's own top ``k`` (hybrid: fused over its union with ``cfg``), sent along
        so the coordinator seldom needs the documents round: exact in single-channel modes (the
        global top ``k`` is among the shards' top ``k``), a guess in hybrid mode (the global
        normalisation may rank otherwise; the coordinator asks :meth:`docs` for what it lacks)."""
        from .._blas import search_scope
        from ..index.hybrid import HybridIndex

        with search_scope(mode, len(queries)):
            state, out = self.index._shard_candidates(queries, q, mode, k, C, filter=flt, bm25_stats=stats,
                                                      exhaustive=exhaustive)
        with self._lock:  # keep the snapshot for docs(): a few recent generations
            self._states[state.generation] = state
            self._states.move_to_end(state.generation)
            while len(self._states) > 4:
                self._states.popitem(last=False)
        want = set()
        for r in (out if send_docs else ()):
            if mode != "hybrid":
                want.update(np.asarray(r["docnos"][:k]).tolist())
            elif len(r["union"]) and cfg is not None:
                want.update(np.asarray(r["union"])[_local_top(r, k, cfg)].tolist())
        want = sorted(want)
        return state.generation, out, dict(zip(want, HybridIndex._docs(state, want)))

    def docs(self, generation, docnos):
        from ..index.hybrid import HybridIndex

        state = self._states.get(generation)
        if state is None:
            return None  # the coordinator asks again from the start
        return HybridIndex._docs(state, docnos)

    def codec_info(self):
        """``(identity of the installed codebook or None, ColBERT vectors stored as float16)``."""
        state = self.index._current()
        codec = self.index.codebook()
        fp16 = sum(int(s.colbert.offsets[-1]) for s in state.segments if s.colbert_kind == "fp16")
        return (None if codec is None else codec.identity), fp16

    def codec_sample(self, n: int, pool: int, seed: int):
        """At most ``n`` of this shard's float16 ColBERT vectors (pooled by ``pool``, as the
        codebook will code them), drawn evenly; float16, bounded by ``n``."""
        from types import SimpleNamespace

        state = self.index._current()
        stores = [s.colbert for s in state.segments if s.colbert_kind == "fp16"]
        dim = self.index.encoder.spec.colbert_dim
        if n <= 0 or not stores:
            return np.zeros((0, dim), np.float16)
        empty = SimpleNamespace(colbert=np.zeros((0, dim), np.float16), colbert_offsets=np.zeros(1, np.int64))
        return _codec_sample(empty, stores, n, pool, seed).astype(np.float16)

    def install_codebook(self, codec):
        return self.index.install_codebook(codec)

    def upsert(self, docs, encoded):
        return self.index.upsert(docs, encoded=encoded)

    def delete(self, ids):
        present = [i for i in ids if i in self.index]  # idempotent: a retry deletes what is left
        return self.index.delete(present) if present else 0

    def contains(self, ids):
        return (self.index._current().find(list(ids)) >= 0).tolist()

    def stats(self):
        return self.index.stats()

    def count(self) -> int:
        return len(self.index)

    def compact(self):
        self.index.compact()

    def close(self):
        self.index.close()


def _local_top(r: dict, k: int, cfg: FusionConfig) -> np.ndarray:
    """Positions in ``r["union"]`` of a shard's own fused top ``k`` (its union only: a guess
    at which of its documents the global fusion picks)."""
    scores = dict(r["rescored"])
    if "bm25" in r["first"]:
        sc, dn = r["first"]["bm25"]
        b = np.full(len(r["union"]), np.nan, np.float32)
        b[np.searchsorted(r["union"], dn)] = sc
        scores["bm25"] = b
    scores = {c: scores[c] for c in ("dense", "sparse", "colbert", "bm25") if c in scores}
    fused, _ = fuse_terms(scores, cfg)
    return np.argsort(-fused, kind="stable")[:k]


def _actor_class():
    return ray.remote(_Shard)


class ShardedIndex:
    """N shards (R replicas each) of a hybrid index on Ray; the surface of
    :class:`~hybridsearch.HybridIndex` that the HTTP server uses: ``search``, ``search_batch``,
    ``add``, ``upsert``, ``delete``, ``stats``, ``compact``, ``channels``, ``encoder``,
    ``close``. Make one with :meth:`create` or :meth:`open`; Ray must be initialised (or pass
    ``address``)."""

    def __init__(self, path: Path, encoder, layout: dict, actors: list[list[Any]], *, timeout: float):
        self.path = path
        self.encoder = encoder
        self.layout = layout
        self.n_shards = int(layout["shards"])
        self.n_replicas = int(layout["replicas"])
        self._actors = actors
        self.timeout = float(timeout)
        self._rr = itertools.count()
        self._closed = False
        self._codebook: ColbertCodec | None = None
        # BM25 statistics per shard copy, valid while its generation is the one recorded:
        # {(shard, replica): (generation, N, total length, {term: df})}. A query whose terms are
        # all here skips the statistics round; a candidates reply of another generation (a
        # write landed) is discarded and the query asks again.
        self._stats_cache: dict = {}
        self._stats_lock = threading.Lock()
        # False: the three rounds of every query (statistics, candidates, documents), without
        # the cache or the documents sent along; for bench/bench_ray.py's side-by-side figures.
        self._lean_rounds = True

    # ------------------------------------------------------------------ making one

    @classmethod
    def create(cls, path: str | os.PathLike, model="BAAI/bge-m3", *, shards: int = 3, replicas: int = 1,
               address: str | None = None, device: str | None = None, timeout: float = DEFAULT_TIMEOUT,
               actor_options: Mapping | None = None, exist_ok: bool = False, **index_kwargs) -> ShardedIndex:
        """Make (or with ``exist_ok`` reopen) a sharded index in folder ``path``.

        ``index_kwargs`` go to every shard's ``HybridIndex.create`` (``dense_factory``,
        ``dense_storage``, ``colbert_codec``, ``merge_policy``...). ``model``: a name or folder
        every node can load (the coordinator loads it too, to encode queries and documents).
        ``actor_options``: Ray options of the shard actors (default ``num_cpus=0``, spread over
        the nodes; ``max_restarts=-1`` is always set)."""
        if not isinstance(shards, int) or shards < 1 or not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"shards and replicas must be positive integers, got {shards!r}, {replicas!r}")
        if "train_codebook" in index_kwargs:
            raise ValueError("train_codebook is the coordinator's: the shards of a sharded index share one codebook")
        path = Path(path)
        encoder = _encoder(model, device)
        layout = {"format": LAYOUT_FORMAT, "version": LAYOUT_VERSION, "shards": shards, "replicas": replicas,
                  "model": str(encoder.spec.path), "model_name": encoder.spec.name,
                  "routing": "docstore.hash_ids(id) % shards"}
        if encoder.spec.has_colbert:
            spec = index_kwargs.get("colbert_codec", "res1")
            parse_codec(spec)  # ValueError naming the valid codecs
            tokens = index_kwargs.get("codec_train_tokens", CODEC_TRAIN_TOKENS)
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
                raise ValueError(f"codec_train_tokens must be a positive integer, got {tokens!r}")
            layout["colbert_codec"] = {"spec": spec, "train_tokens": tokens, "codebook": None, "identity": None}
            index_kwargs = {**index_kwargs, "train_codebook": False}
        f = path / LAYOUT_FILE
        if f.exists():
            have = _read_layout(path)
            if not exist_ok:
                raise FileExistsError(f"{path} already holds a sharded index; use ShardedIndex.open")
            if (have["shards"], have["replicas"]) != (shards, replicas):
                raise ValueError(f"{path} has {have['shards']} shards x {have['replicas']} replicas, "
                                 f"not {shards} x {replicas}")
            layout = have
        else:
            path.mkdir(parents=True, exist_ok=True)
            _write_layout(path, layout)
        return cls._start(path, encoder, layout, index_kwargs, address, timeout, actor_options)

    @classmethod
    def open(cls, path: str | os.PathLike, model=None, *, address: str | None = None, device: str | None = None,
             timeout: float = DEFAULT_TIMEOUT, actor_options: Mapping | None = None) -> ShardedIndex:
        """Open the sharded index in ``path``; ``model`` defaults to the one it was made with."""
        path = Path(path)
        layout = _read_layout(path)
        encoder = _encoder(model or layout["model"], device)
        return cls._start(path, encoder, layout, None, address, timeout, actor_options)

    @classmethod
    def _start(cls, path, encoder, layout, create, address, timeout, actor_options):
        from .cluster import connect

        connect(address)
        opts = {"num_cpus": 0, "scheduling_strategy": "SPREAD", **(actor_options or {})}
        opts.update(max_restarts=-1, max_task_retries=0)
        Actor = _actor_class().options(**opts)
        model = str(encoder.spec.path)
        actors = [[Actor.remote(str(shard_folder(path, s, r)), model, create, 60.0)
                   for r in range(int(layout["replicas"]))] for s in range(int(layout["shards"]))]
        self = cls(path, encoder, layout, actors, timeout=timeout)
        try:
            codec = self._load_codebook(layout)  # a bad codebook folder fails before the wait
            # Wait for every copy to open (a bad folder fails here, with its own error).
            self._each_replica("generation", timeout=max(timeout, 120.0))
            self._channels = tuple(self._shard_stats(timeout)[0]["channels"])
            self._sync_codebook(layout, codec)
        except BaseException:
            self._closed = True  # no actor outlives a failed open (nothing was written: no close needed)
            for row in actors:
                for a in row:
                    ray.kill(a, no_restart=True)
            raise
        return self

    # ------------------------------------------------------------------ the shared codebook

    @property
    def codebook(self) -> ColbertCodec | None:
        """The ColBERT codebook every shard codes with (None: not trained yet, float16, or a
        version-1 layout whose shards trained their own)."""
        return self._codebook

    def _load_codebook(self, layout: dict) -> ColbertCodec | None:
        cc = layout.get("colbert_codec")
        if cc is None or cc["codebook"] is None:
            return None
        folder = self.path / cc["codebook"]
        if folder.is_symlink() or not folder.is_dir():
            raise IndexFormatError(f"{self.path / LAYOUT_FILE}: codebook {cc['codebook']} is not a folder here")
        codec = ColbertCodec.load(folder, dim=self.encoder.spec.colbert_dim)
        if codec.identity != cc["identity"] or codec.name != cc["spec"]:
            raise IndexFormatError(f"{folder}: not the codebook {LAYOUT_FILE} names (identity or kind differ)")
        return codec

    def _sync_codebook(self, layout: dict, codec: ColbertCodec | None = None) -> None:
        """Check every replica against the layout's codebook (``codec``: already loaded) and
        install it where it is missing (a coordinator died after naming it); a replica coded
        with another one is an error."""
        cc = layout.get("colbert_codec")
        if cc is None:
            return
        if codec is None:
            codec = self._load_codebook(layout)
        infos = self._each_replica("codec_info")
        want = None if codec is None else codec.identity
        wrong = sorted(sr for sr, (ident, _) in infos.items() if ident is not None and ident != want)
        if wrong:
            raise IndexFormatError(f"{self.path}: shard copies {wrong} code ColBERT with another codebook than "
                                   f"the one {LAYOUT_FILE} names ({cc['codebook']})")
        lacking = {s for (s, _), (ident, _) in infos.items() if ident is None}
        if codec is not None and lacking:
            ref = ray.put(codec)
            self._each_replica("install_codebook", shard_args={s: (ref,) for s in sorted(lacking)})
        self.layout, self._codebook = layout, codec

    def _ensure_codebook(self, encoded: Encoded) -> None:
        """Before a write: train the shared codebook if the float16 vectors stored so far plus
        this write's reach ``codec_train_tokens`` (as one index does), then save, name and
        install it. Under the sharded folder's writer lock, so two coordinators train one."""
        cc = self.layout.get("colbert_codec")
        if cc is None or cc["spec"] == "fp16" or self._codebook is not None or encoded.colbert is None:
            return
        with locking.WriterLock(self.path, 60.0):
            layout = _read_layout(self.path)
            if layout["colbert_codec"]["codebook"] is not None:  # another coordinator trained it
                self._sync_codebook(layout)
                return
            got, _ = self._fanout("codec_info", lambda s: (), list(range(self.n_shards)), timeout=self.timeout,
                                  partial=False)
            stored = {s: int(r[1]) for s, (_, r) in got.items()}
            have = len(encoded.colbert) + sum(stored.values())
            if have < cc["train_tokens"]:
                return
            opts = parse_codec(cc["spec"])
            how = INDEX_TRAINING[cc["spec"]]
            n = min(MAX_TRAIN_SAMPLE, have)
            quota = {s: int(round(n * t / have)) for s, t in stored.items() if t}
            parts = []
            if quota:
                got, _ = self._fanout("codec_sample", lambda s: (quota[s], opts["pool"], s), sorted(quota),
                                      timeout=self.timeout, partial=False)
                parts = [np.asarray(r, np.float32) for _, (_, r) in sorted(got.items())]
            own = n - sum(quota.values())
            if own > 0:
                parts.append(_codec_sample(encoded, [], own, opts["pool"]))
            sample = np.concatenate(parts)[:MAX_TRAIN_SAMPLE]
            k = min(default_k(have // opts["pool"]), how["k_max"], 1 << int(np.log2(max(len(sample) // 2, 1))))
            codec = ColbertCodec.train(sample, nbits=opts["nbits"], pool=opts["pool"], k=max(k, 1),
                                       renorm=how["renorm"], transform=how["transform"])
            name = _save_codebook(self.path, codec)
            layout["colbert_codec"] = {**layout["colbert_codec"], "codebook": name, "identity": codec.identity}
            _write_layout(self.path, layout)  # from here on, open() completes the install
            self._sync_codebook(layout)

    # ------------------------------------------------------------------ calls

    def _check_open(self):
        if self._closed:
            raise ValueError("this ShardedIndex is closed")

    @staticmethod
    def _raise_cause(e: RayTaskError):
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise e

    def _fanout(self, method: str, args_of, shards: Sequence[int], *, timeout: float, partial: bool,
                replica_of: Mapping[int, int] | None = None, failover: bool = False):
        """Call ``method(*args_of(shard))`` on one replica of each of ``shards``. Returns
        ``({shard: (replica, result)}, missing)``. A dead or restarting replica is retried, the
        next replica first, until ``timeout``; then ``missing`` names the shards without an
        answer (``partial``) or ShardUnavailableError is raised. ``replica_of`` pins replicas
        (retried on the same one unless ``failover``: then it is only where to start)."""
        deadline = time.monotonic() + timeout
        start = next(self._rr)
        tries = {s: (replica_of[s] if replica_of else start + s) for s in shards}
        done: dict[int, tuple[int, Any]] = {}
        refs: dict[Any, int] = {}

        def submit(s):
            r = tries[s] % self.n_replicas
            refs[getattr(self._actors[s][r], method).remote(*args_of(s))] = s

        for s in shards:
            submit(s)
        retry_at: dict[int, float] = {}
        while refs or retry_at:
            now = time.monotonic()
            for s, t in list(retry_at.items()):
                if t <= now:
                    del retry_at[s]
                    submit(s)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not refs:
                time.sleep(max(0.0, min(left, min(retry_at.values()) - time.monotonic(), 0.05)))
                continue
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=min(left, 0.05 if retry_at else left))
            for ref in ready:
                s = refs.pop(ref)
                try:
                    done[s] = (tries[s] % self.n_replicas, ray.get(ref))
                except _DEAD:
                    moves = replica_of is None or failover
                    if moves:
                        tries[s] += 1  # the next replica; round and round while they restart
                    retry_at[s] = time.monotonic() + (0.0 if self.n_replicas > 1 and moves else 0.1)
                except RayTaskError as e:
                    for r in refs:
                        ray.cancel(r)
                    self._raise_cause(e)
        missing = sorted(set(shards) - set(done))
        if missing and not partial:
            raise ShardUnavailableError(missing, timeout)
        return done, missing

    def _each_replica(self, method: str, *args, timeout: float | None = None, shard_args=None):
        """Call ``method`` on every replica of every shard (or of the shards in ``shard_args``:
        ``{shard: args}``); a copy that dies is called again until it answers or ``timeout``
        (then ShardUnavailableError: the write is not acknowledged). Returns ``{(s, r): result}``."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        targets = [(s, r) for s in (shard_args if shard_args is not None else range(self.n_shards))
                   for r in range(self.n_replicas)]

        def call(s, r):
            a = shard_args[s] if shard_args is not None else args
            return getattr(self._actors[s][r], method).remote(*a)

        refs = {call(s, r): (s, r) for s, r in targets}
        out = {}
        while refs:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ShardUnavailableError(sorted({s for s, _ in refs.values()}), timeout)
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=left)
            for ref in ready:
                s, r = refs.pop(ref)
                try:
                    out[(s, r)] = ray.get(ref)
                except _DEAD:
                    time.sleep(0.1)
                    refs[call(s, r)] = (s, r)
                except RayTaskError as e:
                    self._raise_cause(e)
        return out

    # ------------------------------------------------------------------ reading

    def default_fusion(self) -> FusionConfig:
        return default_fusion_for(self.encoder.spec)

    def default_candidates(self) -> int:
        return default_candidates_for(self.encoder.spec)

    @property
    def channels(self) -> tuple[str, ...]:
        return self._channels

    def search(self, query: str, k: int = 10, mode: str = "hybrid", **kw) -> SearchResult:
        """One query; the keywords of :meth:`search_batch`. Returns a :class:`SearchResult`."""
        if not isinstance(query, str):
            raise TypeError("search() takes one query string; use search_batch() for a list")
        return self.search_batch([query], k, mode, **kw)[0]

    def search_batch(self, queries: Sequence[str], k: int = 10, mode: str = "hybrid", *,
                     weights: Mapping[str, float] | None = None, filter: Mapping | None = None,
                     candidates: int | None = None, fusion: str = "weighted",
                     normalize: Sequence[str] | None = None, query_encoded: Encoded | None = None,
                     exhaustive: bool = False, reranker=None, rerank_top: int = 50,
                     rerank_weight: float = 1.0, timeout: float | None = None,
                     partial: bool = False) -> list[SearchResult]:
        """Search every shard and fuse globally: the hits one index over all the documents gives
        (same ids and scores; see the module docstring). Keywords as ``HybridIndex.search``,
        plus ``timeout`` (seconds to wait for a dead or restarting shard, default the index's)
        and ``partial`` (at the timeout, return the other shards' hits marked ``partial``
        instead of raising :class:`ShardUnavailableError`)."""
        self._check_open()
        if isinstance(queries, str) or not isinstance(queries, Sequence):
            raise TypeError("search_batch() takes a list of query strings")
        queries = list(queries)
        if not queries or not all(isinstance(q, str) for q in queries):
            raise TypeError("queries must be a non-empty list of strings")
        channels = self._channels
        _check_query_inputs(queries, weights, channels)
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; modes are {MODES}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if mode != "hybrid" and mode not in channels:
            raise ValueError(f"this index has no {mode} channel (it has: {', '.join(channels)})")
        if fusion not in ("weighted", "rrf"):
            raise ValueError(f"unknown fusion {fusion!r}; use 'weighted' or 'rrf'")
        flt = check_filter(filter)
        if reranker is not None and (isinstance(rerank_top, bool) or not isinstance(rerank_top, int) or rerank_top < 1):
            raise ValueError(f"rerank_top must be a positive integer, got {rerank_top!r}")
        if isinstance(rerank_weight, bool) or not isinstance(rerank_weight, (int, float)) \
                or not 0.0 <= rerank_weight <= 1.0:
            raise ValueError(f"rerank_weight must be a number in [0, 1], got {rerank_weight!r}")
        final_k = k
        if reranker is not None:
            k = max(k, rerank_top)
        cfg = None
        if mode == "hybrid":
            base = self.default_fusion()
            w = dict(base.weights)
            w.update(weights or {})
            cfg = FusionConfig(weights=w, method=fusion,
                               normalize=tuple(normalize) if normalize is not None else base.normalize)
        if candidates is None:
            from ..retrievers.multivector import FIRST_STAGE_CANDIDATES

            candidates = FIRST_STAGE_CANDIDATES if mode == "colbert" else self.default_candidates()
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise ValueError(f"candidates must be a positive integer, got {candidates!r}")
        C = max(candidates, k)
        spec = self.encoder.spec
        q = query_encoded
        if q is not None and len(q) != len(queries):
            raise ValueError(f"query_encoded holds {len(q)} queries, {len(queries)} given")
        need = {"dense": mode in ("dense", "hybrid"), "sparse": spec.has_sparse and mode in ("sparse", "hybrid"),
                "colbert": spec.has_colbert and mode in ("colbert", "hybrid")}
        if q is None and any(need.values()):
            q = self.encoder.encode_arrays(queries, kind="query", dense=need["dense"], sparse=need["sparse"],
                                           colbert=need["colbert"], show_progress=False)
        timeout = self.timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + timeout
        shards = list(range(self.n_shards))
        need_bm25 = mode in ("bm25", "hybrid") and "bm25" in channels
        terms = bm25_postings.query_terms(queries) if need_bm25 else []
        lean = self._lean_rounds
        stale = []
        for _ in range(4):  # a write or a restart between the rounds: ask again (rare)
            if not lean:
                with self._stats_lock:
                    self._stats_cache.clear()
            start = next(self._rr)
            pick = {s: (start + s) % self.n_replicas for s in shards}
            stats, expect, miss = None, {}, []
            if need_bm25:
                stats, expect, miss = self._bm25_stats(queries, terms, shards, pick, deadline, partial)
            ask = [s for s in shards if s not in miss]
            left = max(0.0, deadline - time.monotonic())
            got, missing = self._fanout(
                "candidates", lambda s: (queries, q, mode, k, C, flt, stats, bool(exhaustive), cfg, lean), ask,
                timeout=left, partial=partial, replica_of=pick, failover=True)
            stale = [(s, r) for s, (r, res) in got.items() if need_bm25 and expect.get((s, r)) != res[0]]
            if stale:  # scored with statistics of another generation: forget them, ask again
                with self._stats_lock:
                    for sr in stale:
                        self._stats_cache.pop(sr, None)
                continue
            missing = sorted(set(missing) | set(miss))
            picks = [self._merge_one(got, j, mode, k, C, cfg) for j in range(len(queries))]
            docs = self._fetch(got, picks, deadline, partial)
            if docs is not None:
                break
        else:
            if stale:
                raise HybridSearchError(f"shard copies {sorted(stale)} committed writes during each of 4 tries "
                                        "of this query; ask again")
            raise ShardUnavailableError(shards, timeout)
        docs, lost = docs
        missing = sorted(set(missing) | lost)
        out = []
        for j, pick in enumerate(picks):
            hits = []
            for (s, docno, score, chans, contrib) in pick:
                d = docs.get((s, docno))
                if d is None:
                    continue
                hits.append(Hit(d["id"], score, d["text"], d["metadata"], chans, contributions=contrib))
            if reranker is not None:  # the cross-encoder reorders the global top, as one index does
                hits = _rerank(reranker, queries[j], hits, final_k, float(rerank_weight))
            out.append(SearchResult(hits, missing))
        return out

    def _bm25_stats(self, queries, terms, shards, pick, deadline, partial):
        """The global BM25 statistics of ``terms``: ``(stats, {(shard, replica): generation
        they hold for}, shards without an answer)``. From the cache where every term of a copy
        is there; a statistics round (pinned to the copies in ``pick``, which follow a
        failover) for the others. ``pick`` is updated to the copies that answered."""
        with self._stats_lock:
            cached = {s: self._stats_cache.get((s, pick[s])) for s in shards}
        ask = [s for s in shards if cached[s] is None or not all(t in cached[s][3] for t in terms)]
        miss = []
        if ask:
            left = max(0.0, deadline - time.monotonic())
            got, miss = self._fanout("bm25_stats", lambda s: (queries,), ask, timeout=left, partial=partial,
                                     replica_of=pick, failover=True)
            for s, (r, (gen, st_)) in got.items():
                pick[s] = r
                if st_ is None:
                    cached[s] = None
                    continue
                entry = (gen, int(st_[0]), int(st_[1]), dict(zip(terms, np.asarray(st_[2]).tolist())))
                with self._stats_lock:
                    old = self._stats_cache.get((s, r))
                    if old is not None and old[0] == gen and len(old[3]) < 1 << 16:
                        entry = (gen, entry[1], entry[2], {**old[3], **entry[3]})
                    self._stats_cache[(s, r)] = entry
                cached[s] = entry
        have = [s for s in shards if s not in miss and cached.get(s) is not None]
        if not have:
            return None, {}, miss
        n = sum(cached[s][1] for s in have)
        total = sum(cached[s][2] for s in have)
        df = np.array([sum(cached[s][3][t] for s in have) for t in terms], np.int64)
        return (n, total, df), {(s, pick[s]): cached[s][0] for s in have}, miss

    @staticmethod
    def _merge_one(got, j, mode, k, C, cfg):
        """``[(shard, docno, score, channel scores)]``: the global top ``k`` of query ``j``."""
        if mode != "hybrid":
            sc, sh, dn = [], [], []
            for s, (_, (_, res, _)) in sorted(got.items()):
                r = res[j]
                sc.append(np.asarray(r["scores"], np.float32))
                dn.append(np.asarray(r["docnos"], np.int64))
                sh.append(np.full(len(r["docnos"]), s, np.int64))
            if not sc:
                return []
            sc, sh, dn = np.concatenate(sc), np.concatenate(sh), np.concatenate(dn)
            top = np.lexsort((dn, sh, -sc))[:k]
            return [(int(sh[t]), int(dn[t]), float(sc[t]), {mode: float(sc[t])}, None) for t in top]
        shards = sorted(got)
        per = {s: got[s][1][1][j] for s in shards}
        channels = sorted({c for r in per.values() for c in r["first"]})
        # The global first stage: each channel's top C over every shard's top C.
        chosen = []  # (shard, docno) of the union
        bm25 = {}
        for c in channels:
            sc = [np.asarray(per[s]["first"][c][0], np.float32) for s in shards if c in per[s]["first"]]
            dn = [np.asarray(per[s]["first"][c][1], np.int64) for s in shards if c in per[s]["first"]]
            sh = [np.full(len(per[s]["first"][c][1]), s, np.int64) for s in shards if c in per[s]["first"]]
            if not sc:
                continue
            sc, dn, sh = np.concatenate(sc), np.concatenate(dn), np.concatenate(sh)
            top = np.lexsort((dn, sh, -sc))[:C]
            chosen += list(zip(sh[top].tolist(), dn[top].tolist()))
            if c == "bm25":
                bm25 = {(int(a), int(b)): float(x) for a, b, x in zip(sh[top], dn[top], sc[top])}
        union = sorted(set(chosen))
        if not union:
            return []
        model_channels = sorted({c for r in per.values() for c in r["rescored"]})
        scores = {c: np.full(len(union), np.nan, np.float32) for c in model_channels}
        for i, (s, d) in enumerate(union):
            r = per[s]
            pos = int(np.searchsorted(r["union"], d))
            for c in model_channels:
                scores[c][i] = r["rescored"][c][pos]
        if "bm25" in channels:
            scores["bm25"] = np.array([bm25.get(u, np.nan) for u in union], np.float32)
        # same channel order as HybridIndex._rescore + bm25
        order = [c for c in ("dense", "sparse", "colbert", "bm25") if c in scores]
        scores = {c: scores[c] for c in order}
        fused, terms = fuse_terms(scores, cfg)
        top = np.argsort(-fused, kind="stable")[:k]
        return [(union[t][0], union[t][1], float(fused[t]),
                 {c: (None if np.isnan(v[t]) else float(v[t])) for c, v in scores.items()},
                 {c: float(v[t]) for c, v in terms.items()}) for t in top]

    def _fetch(self, got, picks, deadline, partial):
        """Text and metadata of the picked docnos: those the candidates replies carried, the
        others from the replica (and snapshot) that found them. None when a shard lost its
        snapshot (restarted): the caller asks again."""
        out = {}
        want: dict[int, list[int]] = {}
        for pick in picks:
            for s, d, *_ in pick:
                doc = got[s][1][2].get(d)
                if doc is not None:
                    out[(s, d)] = doc
                else:
                    want.setdefault(s, []).append(d)
        if not want:
            return out, set()
        want = {s: sorted(set(d)) for s, d in want.items()}
        replica_of = {s: got[s][0] for s in want}
        try:
            res, missing = self._fanout("docs", lambda s: (got[s][1][0], want[s]), list(want),
                                        timeout=max(0.0, deadline - time.monotonic()), partial=True,
                                        replica_of=replica_of)
        except ShardUnavailableError:
            return None
        if missing and not partial:
            return None
        for s, (_, docs) in res.items():
            if docs is None:
                return None
            out.update({(s, d): doc for d, doc in zip(want[s], docs)})
        return out, set(missing)

    def _shard_stats(self, timeout):
        got, _ = self._fanout("stats", lambda s: (), list(range(self.n_shards)), timeout=timeout, partial=False)
        return [got[s][1] for s in range(self.n_shards)]

    def stats(self) -> dict:
        """Totals over the shards (documents, tokens, bytes per channel) and each shard's stats."""
        self._check_open()
        per = self._shard_stats(self.timeout)
        chb: dict = {}
        for st in per:
            for c, v in st["channel_bytes"].items():
                chb.setdefault(c, {"bytes": 0})["bytes"] += v["bytes"]
        n = sum(st["documents"] for st in per)
        for v in chb.values():
            v["bytes_per_doc"] = v["bytes"] / max(n, 1)
        return {"path": str(self.path), "sharded": True, "shards": self.n_shards, "replicas": self.n_replicas,
                # every write moves at least one shard's generation: the sum only grows
                "generation": sum(st["generation"] for st in per), "generations": [st["generation"] for st in per],
                "format_version": per[0]["format_version"],
                "model": per[0]["model"], "outputs": per[0]["outputs"], "channels": per[0]["channels"],
                "documents": n, "deleted_pending_compaction": sum(st["deleted_pending_compaction"] for st in per),
                "segments": sum(st["segments"] for st in per), "tokens": sum(st["tokens"] for st in per),
                "channel_bytes": chb, "per_shard": per}

    def __len__(self) -> int:
        self._check_open()
        got, _ = self._fanout("count", lambda s: (), list(range(self.n_shards)), timeout=self.timeout, partial=False)
        return sum(r for _, r in got.values())

    def contains(self, ids: Sequence[str]) -> list[bool]:
        """Whether each id is in the index (asked of the shard that owns it)."""
        ids = list(ids)
        route = shard_of(ids, self.n_shards)
        out = [False] * len(ids)
        by = {s: np.flatnonzero(route == s) for s in np.unique(route).tolist()}
        got, _ = self._fanout("contains", lambda s: ([ids[i] for i in by[s]],), list(by),
                              timeout=self.timeout, partial=False)
        for s, (_, flags) in got.items():
            for i, f in zip(by[s], flags):
                out[i] = bool(f)
        return out

    def __contains__(self, doc_id) -> bool:
        return isinstance(doc_id, str) and self.contains([doc_id])[0]

    # ------------------------------------------------------------------ writing

    def add(self, docs: Sequence[Mapping[str, Any]], *, encoded: Encoded | None = None,
            batch_size: int | None = None) -> int:
        """Add new documents (an id already present is an error and nothing is written); one
        commit per shard copy touched. Acknowledged (returns) once every copy committed."""
        self._check_open()
        ids, _, _ = _check_docs(docs)
        present = [i for i, f in zip(ids, self.contains(ids)) if f]
        if present:
            raise ValueError(f"{len(present)} id(s) already in the index (e.g. {present[:3]}); use upsert")
        return self.upsert(docs, encoded=encoded, batch_size=batch_size)

    def upsert(self, docs: Sequence[Mapping[str, Any]], *, encoded: Encoded | None = None,
               batch_size: int | None = None) -> int:
        """Add or replace documents: encoded once here, routed by id, written to every replica
        of each shard touched (retried on a restarting copy until ``timeout``)."""
        self._check_open()
        ids, texts, metas = _check_docs(docs)
        spec = self.encoder.spec
        if encoded is None:
            encoded = self.encoder.encode_arrays(texts, kind="passage", batch_size=batch_size,
                                                 sparse=spec.has_sparse, colbert=spec.has_colbert)
        _check_encoded(encoded, len(texts), spec)
        self._ensure_codebook(encoded)
        route = shard_of(ids, self.n_shards)
        args = {}
        for s in np.unique(route).tolist():
            rows = np.flatnonzero(route == s)
            sub = [{"id": ids[i], "text": texts[i], "metadata": metas[i]} for i in rows]
            args[s] = (sub, take(encoded, rows))
        self._each_replica("upsert", shard_args=args)
        return len(ids)

    def delete(self, ids: Sequence[str]) -> int:
        """Delete documents by id (an unknown id is an error and nothing is deleted)."""
        self._check_open()
        if isinstance(ids, str) or not isinstance(ids, Sequence):
            raise TypeError("delete() takes a list of ids")
        ids = list(dict.fromkeys(ids))
        unknown = [i for i, f in zip(ids, self.contains(ids)) if not f]
        if unknown:
            raise KeyError(f"{len(unknown)} unknown id(s), nothing deleted: {unknown[:5]}")
        route = shard_of(ids, self.n_shards)
        args = {s: ([ids[i] for i in np.flatnonzero(route == s)],) for s in np.unique(route).tolist()}
        self._each_replica("delete", shard_args=args)
        return len(ids)

    def compact(self) -> None:
        self._check_open()
        self._each_replica("compact", timeout=max(self.timeout, 600.0))

    # ------------------------------------------------------------------ faults, lifetime

    def shard_pids(self) -> list[list[int]]:
        """Process id of every shard copy (``[shard][replica]``), for operators and tests."""
        out = self._each_replica("pid")
        return [[out[(s, r)] for r in range(self.n_replicas)] for s in range(self.n_shards)]

    def close(self) -> None:
        """Close every shard's index and stop its actor."""
        if self._closed:
            return
        self._closed = True
        for row in self._actors:
            for a in row:
                try:
                    ray.get(a.close.remote(), timeout=30)
                except (GetTimeoutError, *_DEAD, RayTaskError):
                    pass
                ray.kill(a, no_restart=True)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"ShardedIndex({str(self.path)!r}, shards={self.n_shards}, replicas={self.n_replicas})"


def _encoder(model, device):
    from ..encode import BGEM3Encoder

    return model if isinstance(model, BGEM3Encoder) else BGEM3Encoder(model, device=device)


def _write_layout(path: Path, layout: dict) -> None:
    """``sharding.json``, atomically: a temporary file, fsync, rename, fsync of the folder."""
    tmp = path / (LAYOUT_FILE + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(layout, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path / LAYOUT_FILE)
    fsync_dir(path)


def _save_codebook(path: Path, codec: ColbertCodec) -> str:
    """Write ``codec`` as ``path/codebook-000001`` through a temporary
    folder, every file and both folders fsynced; codebooks no layout names (left by a
    coordinator that died before naming one) are removed first. Writer lock held."""
    import shutil

    for p in path.iterdir():
        if (CODEBOOK_RE.fullmatch(p.name) or (p.name.startswith("codebook-") and p.name.endswith(".tmp"))) \
                and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
    name = "codebook-000001"
    tmp = path / (name + ".tmp")
    codec.save(tmp)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(tmp)
    os.replace(tmp, path / name)
    fsync_dir(path)
    return name


def _read_layout(path: Path) -> dict:
    f = path / LAYOUT_FILE
    try:
        raw = f.read_bytes()
        if len(raw) > 1 << 20:
            raise ValueError("larger than 1 MiB")
        layout = json.loads(raw)
        ok = (isinstance(layout, dict) and layout.get("format") == LAYOUT_FORMAT
              and isinstance(layout.get("shards"), int) and isinstance(layout.get("replicas"), int)
              and 1 <= layout["shards"] <= 4096 and 1 <= layout["replicas"] <= 64
              and isinstance(layout.get("model"), str))
    except FileNotFoundError:
        raise IndexFormatError(f"{path} is not a sharded index (no {LAYOUT_FILE})") from None
    except ValueError as e:
        raise IndexFormatError(f"{f}: {e}") from None
    if not ok:
        raise IndexFormatError(f"{f}: not a {LAYOUT_FORMAT} layout (format, shards 1-4096, replicas 1-64, model)")
    if layout.get("version") not in LAYOUT_VERSIONS:
        raise IndexFormatError(f"{f}: layout version {layout.get('version')!r}; this library reads {LAYOUT_VERSIONS}")
    cc = layout.get("colbert_codec")
    if cc is not None or layout["version"] >= 2:
        ok = cc is None or (
            isinstance(cc, dict) and isinstance(cc.get("spec"), str) and cc["spec"] in CODECS
            and isinstance(cc.get("train_tokens"), int) and not isinstance(cc["train_tokens"], bool)
            and 1 <= cc["train_tokens"] <= 1 << 40
            and ((cc.get("codebook") is None and cc.get("identity") is None)
                 or (isinstance(cc.get("codebook"), str) and CODEBOOK_RE.fullmatch(cc["codebook"]) is not None
                     and isinstance(cc.get("identity"), str) and re.fullmatch(r"[0-9a-f]{64}", cc["identity"]))))
        if not ok or (layout["version"] < 2 and cc is not None):
            raise IndexFormatError(f"{f}: colbert_codec must be null or {{spec, train_tokens 1-2^40, codebook "
                                   "(null or codebook-NNNNNN), identity (null or 64 hex digits)}} (layout version 2)")
    return layout
