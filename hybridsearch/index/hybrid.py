"""HybridIndex: add/upsert/delete documents, search every channel, fuse, persist atomically.

Data flow of a hybrid query::

    query --encode once--> dense vec, sparse weights, ColBERT vecs
      dense top-C (FAISS)  +  sparse top-C (inverted index)  +  BM25 top-C (tantivy)
      -> union U of docnos -> rescore U with every channel the model has (ColBERT MaxSim incl.)
      -> fuse (weighted sum or RRF) -> top-k hits

State is an immutable snapshot swapped by writers, so searches never see a half-made commit.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import threading
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._blas import search_scope
from ..errors import DiskFullError, IndexFormatError, ModelMismatchError
from ..fusion import CHANNELS, FusionConfig, fuse_terms, minmax
from ..representations import Encoded
from ..retrievers import bm25_postings
from ..retrievers.bm25 import BM25Index
from ..retrievers.colbert_codec import (
    INDEX_TRAINING,
    MAX_TRAIN_SAMPLE,
    ColbertCodec,
    default_k,
    parse_codec,
    pool_tokens,
)
from ..retrievers.dense import check_factory
from ..retrievers.multivector import FIRST_STAGE_CANDIDATES, maxsim_many, refine_depth
from . import locking
from . import storage as st
from .filters import check_filter
from .merge import MergePolicy, plan_merges
from .segment import Segment, merge_segments, write_segment

if TYPE_CHECKING:  # imported where a model is loaded: torch stays out of stats() and the CLI's
    from ..encode import BGEM3Encoder

log = logging.getLogger(__name__)

MODES = ("dense", "sparse", "colbert", "bm25", "hybrid")
# Fusion defaults (bench/results/fusion.md). Channels listed in *_NORMALIZE are z-scored over the
# query's candidate union and noise-gated (FusionConfig's defaults): no channel wins by its scale,
# and one that scores like noise for a query (an English-only model on Russian) is switched off.
# BGE-M3-style models keep the authors' formula on raw scores (compute_score, FusionConfig.m3_raw())
# until the scale-free fusion is measured on one (bench/bench_fusion.py runs on an M3 folder).
# BM25's weight for them is 0; a BM25 weight given to search() makes it a z-scored, gated addition
# to the raw sum (its z-scores reach ~10: weights of a few hundredths), or pass normalize=CHANNELS.
M3_WEIGHTS = {"dense": 0.4, "sparse": 0.2, "colbert": 0.4, "bm25": 0.0}
M3_NORMALIZE = ("bm25",)
# Dense-only models + BM25: one setting for all-MiniLM-L6-v2 and multilingual-e5-small alike,
# picked on SciFact *train* queries and 2-fold cross-validation over XQuAD-R de/es/ru queries
# (bench/bench_fusion.py); SciFact test is only used to report. Every channel scale-free.
DENSE_BM25_WEIGHTS = {"dense": 1.0, "bm25": 0.15}
DENSE_BM25_NORMALIZE = CHANNELS
# Hybrid first-stage depth per channel. Dense+BM25 gains from a deep union (cheap to rescore);
# with ColBERT every candidate costs a MaxSim, and BGE-M3's channels already agree closely.
DENSE_BM25_CANDIDATES = 1000
M3_CANDIDATES = 100
# A ColBERT codebook is trained once this many vectors are stored (float16 until then).
CODEC_TRAIN_TOKENS = 1 << 16


@dataclass
class Hit:
    """One search result. ``scores`` holds each channel's score, None where it did not see the doc.

    ``contributions`` (hybrid mode): each channel's term in the fused ``score`` (weight x gate x
    normalised score for the weighted sum, ``w / (k + rank)`` for RRF); they add up to ``score``.
    None in single-channel modes.
    """

    id: str
    score: float
    text: str
    metadata: dict
    scores: dict[str, float | None] = field(default_factory=dict)
    rerank_score: float | None = None
    contributions: dict[str, float] | None = None


@dataclass(frozen=True)
class _State:
    """One generation of the index, everything a search reads. Immutable: a commit makes a new
    one. While it is referenced, its lease keeps other processes from removing its files."""

    manifest: dict
    segments: tuple[Segment, ...]
    bases: np.ndarray  # (S,) int64 first docno of each segment's span
    alive: np.ndarray  # (next_docno,) bool: a live row holds this docno
    deleted: np.ndarray  # (n,) int64 sorted: docnos of rows still stored but deleted
    codecs: dict  # codebook name -> ColbertCodec
    # Indexes that keep BM25 in tantivy (written before format 3, until compacted): the BM25
    # folder's handle (shared by the states that use that folder) and the searcher taken when
    # this state was made. None with BM25 postings in the segments, or no BM25.
    bm25: BM25Index | None
    bm25_searcher: Any
    lease: locking.Lease | None

    @property
    def generation(self) -> int:
        return int(self.manifest["generation"])

    @property
    def has_bm25(self) -> bool:
        return bool(self.manifest["channels"]["bm25"])

    @property
    def all_alive(self) -> bool:
        return self.manifest["counts"]["deleted"] == 0

    @property
    def next_docno(self) -> int:
        return int(self.manifest["next_docno"])

    def locate(self, docnos: np.ndarray) -> np.ndarray:
        """Segment index of each docno."""
        return np.searchsorted(self.bases, docnos, side="right") - 1

    def __len__(self) -> int:
        return int(self.manifest["counts"]["documents"])

    def find(self, ids: Sequence[str]) -> np.ndarray:
        """Docno of the live document with each id, -1 where there is none (hash lookups per
        segment, newest first: an upserted id's older rows are dead)."""
        out = np.full(len(ids), -1, np.int64)
        # str subclasses (numpy's str_) look up as plain strings; anything else is never an id
        ids = [str.__str__(i) if isinstance(i, str) else None for i in ids]
        todo = np.array([i for i, x in enumerate(ids) if x is not None], np.int64)
        for s in reversed(self.segments):
            if not len(todo):
                break
            rows = s.store.find([ids[i] for i in todo])
            hit = rows >= 0
            if hit.any():
                d = s.docno_of(rows[hit])
                live = self.alive[d]
                out[todo[hit][live]] = d[live]
                done = np.zeros(len(todo), bool)
                done[np.flatnonzero(hit)[live]] = True
                todo = todo[~done]
        return out

    def filter_mask(self, flt: dict) -> np.ndarray:
        """(next_docno,) bool: live documents whose metadata passes ``flt`` (per-segment
        vectorised column masks, placed at their docnos)."""
        out = np.zeros(self.next_docno, bool)
        for s in self.segments:
            m = s.filter_mask(flt) & s.rows_mask(self.alive)
            if s.docnos is None:
                out[s.base:s.base + s.count] = m
            else:
                out[np.asarray(s.docnos)] = m
        return out

    def live_rows(self, s: Segment) -> np.ndarray:
        """Rows of segment ``s`` that are not deleted (ascending)."""
        m = s.rows_mask(self.alive)
        return np.flatnonzero(m) if m is not None else np.arange(s.count)


class HybridIndex:
    """A folder holding every representation of a document collection. See the module docstring."""

    def __init__(self, path: Path, encoder: BGEM3Encoder, manifest: dict | None = None, *,
                 lock_timeout: float = locking.DEFAULT_LOCK_TIMEOUT,
                 merge_policy: MergePolicy | None = MergePolicy()):
        self.path = path
        self._manifest_file = os.fspath(path / st.MANIFEST)  # stat'ed by every search
        self.encoder = encoder
        #: seconds a write waits for another process's writer lock before IndexLockedError
        self.lock_timeout = lock_timeout
        #: segments merged after each commit (index/merge.py); None: only compact() merges
        self.merge_policy = merge_policy
        self._write_lock = threading.RLock()  # one writing thread per object
        self._swap_lock = threading.Lock()  # guards _state / _manifest_key swaps (never held long)
        self._closed = False
        self._state: _State | None = None
        self._manifest_key = None
        self._reload()

    # ---------------------------------------------------------------- create / open

    @classmethod
    def create(cls, path: str | os.PathLike, model: str | BGEM3Encoder = "BAAI/bge-m3", *,
               dense_factory: str = "auto", dense_storage: str = "fp32", colbert_codec: str = "res1",
               codec_train_tokens: int = CODEC_TRAIN_TOKENS, train_codebook: bool = True, bm25: bool = True,
               exist_ok: bool = False, lock_timeout: float = locking.DEFAULT_LOCK_TIMEOUT,
               merge_policy: MergePolicy | None = MergePolicy()) -> HybridIndex:
        """Make a new, empty index folder for ``model`` (a name/path or a loaded encoder).
        An encoder made with ``mcls=True`` gives an MCLS index (``model.mcls`` in the manifest).

        Storage, chosen per index and recorded in the manifest:

        * ``dense_storage``: ``"fp32"`` (exact), ``"fp16"`` or ``"sq8"`` (1 byte a dimension:
          1M x 1024-d in 1 GB).
        * ``dense_factory``: ``"auto"`` (default) picks each segment's structure from its row
          count when it is written or merged: an exact scan of the stored vectors below 20,000
          rows, an HNSW graph over SQ8 codes below 200,000, an IVF over SQ8 codes above
          (``dense.faiss``); their hits are rescored from the stored vectors (recall@10 against
          exact: bench/results/dense_scale.md).
          ``"Flat"`` keeps every segment exact; any other FAISS factory string (``"HNSW32"``,
          ``"IVF4096,Flat"``...) is used for every segment. Filters and deletions never return a
          disallowed row, and an ANN segment falls back to the exact scan when few rows are
          allowed or its graph walk comes back short.
        * ``colbert_codec``: ``"res1"`` (default: centroid id + 1 bit a dimension on average,
          spent on the residual's principal axes, 130 bytes a token at d=1024), ``"res2"``,
          ``"res1-pool2"`` (token pooling by 2 first: ~65 bytes a token) or ``"fp16"``. The
          codebook is trained on the first ``codec_train_tokens`` ColBERT vectors; until then
          they are stored as float16 and coded when merged.
        * ``train_codebook``: ``False`` never trains a codebook here (recorded in the manifest):
          ColBERT vectors stay float16 until one is given with :meth:`install_codebook` (what
          the shards of a sharded index do, so that they all code with the same one).

        Safe against a concurrent ``create`` of the same folder: the folder is claimed under the
        writer lock, the loser then opens the winner's index (``exist_ok=True``) or raises
        ``FileExistsError``, and never removes what the winner wrote. A folder holding only the
        left-overs of a create that died before its first commit is reused.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{path} exists and is not a folder")
        if (path / st.MANIFEST).exists() and not exist_ok:
            raise FileExistsError(f"{path} already holds an index; use HybridIndex.open")
        if path.is_dir() and not (path / st.MANIFEST).exists():
            foreign = [p.name for p in path.iterdir() if not locking.owned_entry(p.name)]
            if foreign:
                raise FileExistsError(f"{path} exists and is not empty (e.g. {foreign[0]!r}); "
                                      "refusing to write an index there")
        from ..encode import BGEM3Encoder

        encoder = model if isinstance(model, BGEM3Encoder) else BGEM3Encoder(model)
        check_factory(dense_factory, encoder.spec.dim)  # ValueError unless reopening would accept it
        spec = encoder.spec
        if dense_storage not in st.DENSE_STORAGES:
            raise ValueError(f"unknown dense_storage {dense_storage!r}; use one of {st.DENSE_STORAGES}")
        parse_codec(colbert_codec)  # ValueError naming the valid codecs
        if isinstance(codec_train_tokens, bool) or not isinstance(codec_train_tokens, int) or codec_train_tokens < 1:
            raise ValueError(f"codec_train_tokens must be a positive integer, got {codec_train_tokens!r}")
        if not isinstance(train_codebook, bool):
            raise ValueError(f"train_codebook must be True or False, got {train_codebook!r}")
        model_info = {
            "name": spec.name, "fingerprint": st.model_fingerprint(spec.path), "dim": spec.dim,
            "colbert_dim": spec.colbert_dim, "vocab_size": spec.vocab_size, "pooling": spec.pooling,
            "outputs": list(spec.outputs), "mcls": spec.mcls,  # MCLS interval of the encoder, or null
        }
        channels = {"dense": {"factory": dense_factory, "storage": dense_storage}, "sparse": spec.has_sparse,
                    "colbert": spec.has_colbert, "bm25": bool(bm25)}
        if bm25:
            channels["bm25_store"] = "postings"  # per segment (format 3); tantivy before
        if spec.has_colbert:
            channels["colbert_codec"] = {"spec": colbert_codec, "codebook": None,
                                         "train_tokens": codec_train_tokens}
            if not train_codebook:  # absent: trained here (older manifests too)
                channels["colbert_codec"]["train"] = False
        path.mkdir(parents=True, exist_ok=True)
        with locking.WriterLock(path, lock_timeout):
            if (path / st.MANIFEST).exists():  # another process won the race
                if not exist_ok:
                    raise FileExistsError(f"{path} already holds an index; use HybridIndex.open")
                return cls.open(path, encoder, lock_timeout=lock_timeout, merge_policy=merge_policy)
            foreign = [p.name for p in path.iterdir() if not locking.owned_entry(p.name)]
            if foreign:
                raise FileExistsError(f"{path} exists and is not empty (e.g. {foreign[0]!r}); "
                                      "refusing to write an index there")
            # No manifest and the lock held: whatever is here is ours and was never committed.
            locking.collect(path, st.new_manifest(model_info, channels))
            m = st.new_manifest(model_info, channels)
            locking.write_lease(path, m)
            st.write_json_durable(path / st.MANIFEST, m)
            st.fsync_dir(path)
        return cls(path, encoder, lock_timeout=lock_timeout, merge_policy=merge_policy)

    @classmethod
    def open(cls, path: str | os.PathLike, model: str | BGEM3Encoder | None = None, *,
             lock_timeout: float = locking.DEFAULT_LOCK_TIMEOUT,
             merge_policy: MergePolicy | None = MergePolicy()) -> HybridIndex:
        """Open an existing index; ``model`` defaults to the one recorded in the manifest.

        Opening takes no lock and writes nothing, so an index on read-only media opens for
        searching. The object follows commits made by other processes (checked before every
        read, one ``stat`` of the manifest).
        """
        path = Path(path)
        m = st.read_manifest(path)
        # MCLS: queries and passages are encoded with the interval the index was built with
        # (absent in older manifests: off); a given encoder must agree.
        mcls = m["model"].get("mcls")
        if mcls is not None and (isinstance(mcls, bool) or not isinstance(mcls, int) or not 1 <= mcls <= 1 << 20):
            raise IndexFormatError(f"{path / st.MANIFEST}: model.mcls must be null or a positive integer"[:300])
        from ..encode import BGEM3Encoder

        encoder = model if isinstance(model, BGEM3Encoder) else BGEM3Encoder(
            model or m["model"]["name"], mcls=mcls is not None, mcls_interval=mcls or 256)
        fp = st.model_fingerprint(encoder.spec.path)
        want = m["model"]
        spec = encoder.spec
        if fp != want["fingerprint"] or spec.dim != want["dim"] or spec.vocab_size != want["vocab_size"] \
                or (spec.has_colbert and spec.colbert_dim != want["colbert_dim"]):
            raise ModelMismatchError(
                f"{path} was built with model {want['name']!r} (fingerprint {want['fingerprint']}, "
                f"dim {want['dim']}), but {encoder.spec.name!r} (fingerprint {fp}, dim "
                f"{encoder.spec.dim}) was given. Open it with the model that built it."
            )
        if spec.mcls != mcls:
            raise ModelMismatchError(f"{path} was built with mcls={mcls} (MCLS interval, null: off), but the given "
                                     f"encoder has mcls={spec.mcls}; pass BGEM3Encoder(..., mcls="
                                     f"{mcls is not None}{f', mcls_interval={mcls}' if mcls else ''})")
        return cls(path, encoder, lock_timeout=lock_timeout, merge_policy=merge_policy)

    @classmethod
    def open_without_model(cls, path: str | os.PathLike) -> HybridIndex:
        """Open an existing index for :meth:`stats`, ``len``, :meth:`ids`, :meth:`get` and
        :meth:`verify` only: no model is loaded (nor torch imported), so this is fast and works
        where the model is not available. Searching or writing through it raises RuntimeError;
        use :meth:`open` for those. Opening validates the folder as :meth:`open` does.
        """
        path = Path(path)
        m = st.read_manifest(path)
        return cls(path, _NoModel(str(m["model"]["name"])), merge_policy=None)

    def _load_state(self, m: dict, prev: _State | None) -> _State:
        """Open generation ``m``, reusing ``prev``'s immutable segments, codecs and BM25 handle.
        Cost: O(new segments) opens plus an O(next_docno) bool mask; nothing is read whole.

        Raises ``locking.LeaseGone`` when a writer collected that generation meanwhile."""
        lease = locking.Lease.take(self.path, int(m["generation"]))
        codecs = {}
        cc = m["channels"].get("colbert_codec")
        if cc is not None and cc.get("codebook"):
            name = cc["codebook"]
            if prev is not None and name in prev.codecs:
                codecs[name] = prev.codecs[name]
            else:
                codecs[name] = ColbertCodec.load(st.safe_child(self.path, name, "codec", want="dir"),
                                                 dim=m["model"]["colbert_dim"])
        reuse = {s.folder.name: s for s in prev.segments} if prev is not None else {}
        segs, bases = [], []
        for entry, (first, span) in zip(m["segments"], st.segment_ranges(m["segments"])):
            s = reuse.get(entry["name"])
            if s is None or s.base != first or s.count != int(entry["count"]) or s.span != span:
                s = Segment.open(self.path, entry, first, model=m["model"], channels=m["channels"],
                                 codecs=codecs)
            segs.append(s)
            bases.append(first)
        alive = np.zeros(int(m["next_docno"]), dtype=bool)
        for s in segs:
            if s.docnos is None:
                alive[s.base:s.base + s.count] = True
            else:
                alive[np.asarray(s.docnos)] = True
        dead = np.zeros(0, np.int64)
        if m["deleted"]:
            dead = np.asarray(st.load_deleted(self.path, m["deleted"], len(alive), m["counts"]["deleted"]))
            if not alive[dead].all():
                raise IndexFormatError(f"{self.path / m['deleted']}: lists docnos that no segment holds")
            alive[dead] = False
        bm25 = searcher = None
        if m["channels"]["bm25"] and not st.bm25_postings(m["channels"]):
            if prev is not None and prev.bm25 is not None and prev.bm25.folder.name == m["bm25"]:
                bm25 = prev.bm25
            else:
                try:
                    bm25 = BM25Index.open(st.safe_child(self.path, m["bm25"], "bm25", want="dir"))
                except Exception as e:
                    raise IndexFormatError(f"BM25 index {self.path / m['bm25']} cannot be opened: {e}") from e
            searcher = bm25.fresh_searcher()
        return _State(m, tuple(segs), np.array(bases, dtype=np.int64), alive, dead, codecs, bm25, searcher, lease)

    def _manifest_stat(self):
        try:
            r = os.stat(self._manifest_file)
        except OSError:
            return None
        return (r.st_ino, r.st_mtime_ns, r.st_size)

    def _install(self, state: _State, key) -> None:
        """Make ``state`` current unless one of its generation or newer already is.

        Readers and the writer race here; the first state made for a generation wins, so every
        search on one generation reads the same object (BM25 statistics included: tantivy's
        deletions land just after the manifest switch, and a reader may open the generation
        before them -- its deleted documents are masked, but still count in BM25's statistics)."""
        with self._swap_lock:
            cur = self._state
            if cur is None or state.generation > cur.generation:
                self._state = state
                self._manifest_key = key
            elif state.generation == cur.generation and self._manifest_key is None:
                self._manifest_key = key

    def _reload(self) -> None:
        """Load the generation the manifest on disk names, if it is not the current one."""
        for _ in range(50):
            key = self._manifest_stat()
            m = st.read_manifest(self.path)
            cur = self._state
            if cur is not None and m["generation"] == cur.generation:
                with self._swap_lock:
                    if self._state is cur:
                        self._manifest_key = key
                return
            try:
                state = self._load_state(m, cur)
            except locking.LeaseGone:
                continue  # a writer collected that generation meanwhile: read the manifest again
            except IndexFormatError:
                if st.read_manifest(self.path)["generation"] != m["generation"]:
                    continue  # its files were collected as we opened them (no lease): newer one
                raise
            self._install(state, key)
            return
        raise IndexFormatError(f"{self.path}: the manifest kept changing while it was being opened")

    def _current(self) -> _State:
        """The newest committed state: one ``stat`` of the manifest, a reload when it changed."""
        if self._closed:
            raise ValueError(f"index {self.path} is closed")
        key = self._manifest_stat()
        if key is not None and key != self._manifest_key:
            self._reload()
        return self._state

    # ---------------------------------------------------------------- writing

    @contextmanager
    def _writing(self):
        """Hold the in-process and the on-disk writer lock, on the newest committed state.

        Left-overs of a writer that died are removed first; on the way out BM25's writer (and
        tantivy's lock file) is released and files no reader can still use are collected."""
        if self._closed:
            raise ValueError(f"index {self.path} is closed")
        with self._write_lock, locking.WriterLock(self.path, self.lock_timeout):
            start = self._state
            try:
                self._reload()
                self._cleanup_uncommitted()
                yield
            except Exception as e:
                full = _disk_full(e, self.path)
                if full is not None:
                    raise full from e
                raise
            finally:
                for b in {id(x): x for x in (start.bm25, self._state.bm25) if x is not None}.values():
                    b.close()
                start = None
                self._collect()

    def _collect(self) -> None:
        """Remove files no reader can use any more (tidying only: a failure never fails a write)."""
        try:
            locking.collect(self.path, self._state.manifest)
        except OSError as e:
            log.warning("could not remove old files in %s: %s", self.path, e)

    def _cleanup_uncommitted(self) -> None:
        """Remove what a crashed writer left: unnamed files, BM25 docs past ``next_docno``."""
        state = self._state
        self._collect()
        if state.bm25 is not None and state.bm25.has_docnos_from(state.next_docno):
            state.bm25.delete_from(state.next_docno)
            state.bm25.commit()

    def add(self, docs: Sequence[Mapping[str, Any]], *, encoded: Encoded | None = None,
            batch_size: int | None = None, show_progress: bool | None = None) -> int:
        """Add documents ``{"id": str, "text": str, "metadata": dict (optional)}``; one commit.

        ``encoded`` supplies precomputed representations (in ``docs`` order) instead of running
        the model. Fails, writing nothing, on a duplicate or already-present id, empty text, bad
        metadata, or representations of the wrong shape. Returns the number added.
        """
        ids, texts, metas = _check_docs(docs)
        with self._writing():
            found = self._state.find(ids)
            present = [i for i, d in zip(ids, found) if d >= 0]
            if present:
                raise ValueError(f"{len(present)} id(s) already in the index (e.g. {present[:3]}); use upsert")
            enc = self._encode_docs(texts, encoded, batch_size, show_progress)
            self._commit(ids, texts, metas, enc, delete_docnos=np.zeros(0, np.int64))
        return len(ids)

    def upsert(self, docs: Sequence[Mapping[str, Any]], *, encoded: Encoded | None = None,
               batch_size: int | None = None, show_progress: bool | None = None) -> int:
        """Add documents, replacing any with the same id; one commit. Returns the number written."""
        ids, texts, metas = _check_docs(docs)
        with self._writing():
            enc = self._encode_docs(texts, encoded, batch_size, show_progress)
            found = self._state.find(ids)
            self._commit(ids, texts, metas, enc, delete_docnos=np.unique(found[found >= 0]))
        return len(ids)

    def delete(self, ids: Sequence[str]) -> int:
        """Delete documents by id; one commit. An unknown id is an error and nothing is deleted."""
        if isinstance(ids, str) or not isinstance(ids, Sequence):
            raise TypeError("delete() takes a list of ids")
        with self._writing():
            found = self._state.find(list(ids))
            unknown = [i for i, d in zip(ids, found) if d < 0]
            if unknown:
                raise KeyError(f"{len(unknown)} unknown id(s), nothing deleted: {unknown[:5]}")
            docnos = np.unique(found)
            self._commit([], [], [], None, delete_docnos=docnos)
        return len(docnos)

    def _encode_docs(self, texts, encoded, batch_size, show_progress) -> Encoded:
        spec = self.encoder.spec
        if encoded is None:
            return self.encoder.encode_arrays(texts, kind="passage", batch_size=batch_size,
                                              sparse=spec.has_sparse, colbert=spec.has_colbert,
                                              show_progress=show_progress)
        _check_encoded(encoded, len(texts), spec)
        return encoded

    def _commit(self, ids, texts, metas, enc: Encoded | None, delete_docnos: np.ndarray) -> None:
        """Write a new generation: segment, deletions, BM25, then switch the manifest; then
        merge segments as the merge policy asks (one generation per merge)."""
        old = self._state
        m = json.loads(json.dumps(old.manifest))  # deep copy
        gen = m["generation"] + 1
        m["generation"] = gen
        m["format_version"], m["library_version"] = st.FORMAT_VERSION, st.__version__
        base = m["next_docno"]
        if ids:
            name = f"seg-{gen:06d}"
            codec, codec_name = self._codec_for(m, old, enc, gen)
            entry = write_segment(self.path / name, ids, texts, metas, enc, m["channels"]["dense"]["factory"],
                                  first=base, dense_storage=m["channels"]["dense"].get("storage", "fp32"),
                                  codec=codec, codec_name=codec_name,
                                  bm25=st.bm25_postings(m["channels"]))
            m["segments"].append(entry)
            m["next_docno"] = base + len(ids)
            m["counts"]["tokens"] += int(enc.n_tokens.sum())
        dead = old.deleted
        if len(delete_docnos):
            dead = np.union1d(dead, delete_docnos)
            seg_of = old.locate(delete_docnos)
            for si in np.unique(seg_of):
                s = old.segments[si]
                rows = s.rows_of(delete_docnos[seg_of == si])
                m["counts"]["tokens"] -= int(np.asarray(s.n_tokens)[rows[rows >= 0]].sum())
        if len(dead) != int(old.manifest["counts"]["deleted"]):
            m["deleted"] = f"deleted-{gen:06d}.npy"
            tmp = self.path / (m["deleted"] + ".tmp")
            st.save_npy(tmp, dead)
            os.replace(tmp, self.path / m["deleted"])
        m["counts"]["deleted"] = len(dead)
        m["counts"]["documents"] = sum(int(e["count"]) for e in m["segments"]) - len(dead)
        if old.bm25 is not None and ids:
            old.bm25.add(np.arange(base, base + len(ids), dtype=np.int64), texts)
            old.bm25.commit()
        self._switch(m)
        # Committed. Tidy up: BM25 forgets deleted docs (searches filter them anyway).
        if old.bm25 is not None and len(delete_docnos):
            old.bm25.delete(delete_docnos)
            old.bm25.commit()
        self._install(self._load_state(m, old), self._manifest_stat())
        old = None
        self._merges()

    def _codec_for(self, m: dict, state: _State, enc: Encoded, gen: int):
        """The ColBERT codebook a new segment is coded with, training it (into ``codec-G/``,
        named in ``m``) once the float16 vectors stored so far plus this commit's reach the
        codec's ``train_tokens``. Returns ``(codec, name)``, ``(None, None)`` for float16."""
        cc = m["channels"].get("colbert_codec")
        if enc is None or enc.colbert is None or cc is None or cc["spec"] == "fp16":
            return None, None
        if cc["codebook"]:
            return state.codecs[cc["codebook"]], cc["codebook"]
        if not cc.get("train", True):  # the codebook comes from outside (install_codebook)
            return None, None
        fp16 = [s for s in state.segments if s.colbert_kind == "fp16"]
        have = len(enc.colbert) + sum(int(s.colbert.offsets[-1]) for s in fp16)
        if have < cc["train_tokens"]:
            return None, None
        opts = parse_codec(cc["spec"])
        how = INDEX_TRAINING[cc["spec"]]
        sample = _codec_sample(enc, [s.colbert for s in fp16], MAX_TRAIN_SAMPLE, opts["pool"])
        # PLAID's centroid count for the (pooled) vectors stored so far, capped per codec and by the sample
        k = min(default_k(have // opts["pool"]), how["k_max"], 1 << int(np.log2(max(len(sample) // 2, 1))))
        codec = ColbertCodec.train(sample, nbits=opts["nbits"], pool=opts["pool"], k=max(k, 1),
                                   renorm=how["renorm"], transform=how["transform"])
        name = self._save_codec(codec, gen)
        cc["codebook"] = name
        log.info("trained ColBERT codebook %s (%s, K=%d) on %d of %d vectors", name, cc["spec"],
                 codec.k, len(sample), have)
        return codec, name

    def _save_codec(self, codec: ColbertCodec, gen: int) -> str:
        """Write ``codec`` durably into ``codec-G/`` (through a temporary folder and a rename)."""
        name = f"codec-{gen:06d}"
        tmp = self.path / (name + ".tmp")
        st.remove_entry(self.path, tmp.name)
        tmp.mkdir()
        codec.save(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        st.fsync_dir(tmp)
        os.replace(tmp, self.path / name)
        st.fsync_dir(self.path)
        return name

    def codebook(self) -> ColbertCodec | None:
        """The ColBERT codebook new and merged segments are coded with (None: none yet, or a
        float16 index)."""
        state = self._current()
        cc = state.manifest["channels"].get("colbert_codec")
        return state.codecs.get(cc["codebook"]) if cc is not None and cc.get("codebook") else None

    def install_codebook(self, codec: ColbertCodec) -> str:
        """Code ColBERT vectors with ``codec``, an already-trained codebook, from the next write
        on: one commit whose manifest names a copy of it (``codec-G/``). Idempotent: installing
        the codebook the index already has (same ``codec.identity``) changes nothing. Raises
        ValueError for a different codebook (an index keeps its first one), a float16 index,
        or a codec of another kind (``res1``, ``res2``, ``res1-pool2`` must match the index's
        ``colbert_codec``) or dimension. Segments stored as float16 before it stay float16
        until merged (as with a codebook trained here). Returns the codebook's folder name.

        A sharded index trains one codebook and installs it on every shard, so every shard
        scores ColBERT as one index coded with it would."""
        if not isinstance(codec, ColbertCodec):
            raise TypeError(f"install_codebook() takes a ColbertCodec, got {type(codec).__name__}")
        with self._writing():
            old = self._state
            m = json.loads(json.dumps(old.manifest))
            cc = m["channels"].get("colbert_codec")
            if cc is None:
                raise ValueError(f"{self.path} has no ColBERT channel: there is nothing to code")
            if cc["spec"] == "fp16":
                raise ValueError(f"{self.path} stores ColBERT vectors as float16 (colbert_codec='fp16')")
            if codec.name != cc["spec"] or codec.dim != m["model"]["colbert_dim"]:
                raise ValueError(f"codebook {codec.name} of dimension {codec.dim} does not fit {self.path}: "
                                 f"it codes {cc['spec']} at dimension {m['model']['colbert_dim']}")
            if cc["codebook"]:
                if old.codecs[cc["codebook"]].identity == codec.identity:
                    return cc["codebook"]
                raise ValueError(f"{self.path} already codes with another codebook ({cc['codebook']}); "
                                 "an index keeps the codebook its segments are coded with")
            gen = m["generation"] + 1
            m["generation"] = gen
            m["format_version"], m["library_version"] = st.FORMAT_VERSION, st.__version__
            cc["codebook"] = self._save_codec(codec, gen)
            self._switch(m)
            self._install(self._load_state(m, old), self._manifest_stat())
            log.info("installed ColBERT codebook %s (%s, K=%d) in %s", cc["codebook"], cc["spec"], codec.k, self.path)
            return cc["codebook"]

    # ---------------------------------------------------------------- merging

    def _merges(self) -> None:
        """Run the merges the policy asks for, one generation each (writer lock held)."""
        state = self._state
        rows = sum(s.count for s in state.segments)
        if state.next_docno - rows > st.max_holes(rows) // 2:  # docnos far outnumber rows: renumber
            state = None
            self._compact()
            return
        if self.merge_policy is None:
            return
        while True:
            state = self._state
            live = np.array([len(state.live_rows(s)) for s in state.segments], np.int64)
            stored = np.array([s.count for s in state.segments], np.int64)
            plan = plan_merges(live, stored, self.merge_policy)
            state = None
            if plan is None:
                return
            self._merge_range(*plan)

    def _merge_range(self, i: int, j: int, renumber: bool = False, dense_factory: str | None = None) -> None:
        """Replace segments ``[i, j)`` by one holding their live rows. Docnos are kept (so BM25,
        deletion lists and concurrent readers need nothing), unless ``renumber`` (compaction of
        the whole index): then rows get docnos ``0..n-1``, and an index that kept BM25 in
        tantivy moves it to postings in the segment (format 3)."""
        old = self._state
        m = json.loads(json.dumps(old.manifest))
        gen = m["generation"] + 1
        m["generation"] = gen
        m["format_version"], m["library_version"] = st.FORMAT_VERSION, st.__version__
        segs = old.segments[i:j]
        sources = [(s, old.live_rows(s)) for s in segs]
        n_live = sum(len(r) for _, r in sources)
        cc = m["channels"].get("colbert_codec")
        codec_name = cc["codebook"] if cc is not None and cc["spec"] != "fp16" else None
        codec = old.codecs.get(codec_name) if codec_name else None
        first = 0 if renumber else int(old.bases[i])
        span = n_live if renumber else sum(s.span for s in segs)
        name = f"seg-{gen:06d}"
        if dense_factory is not None:  # compact(dense_factory=...): the index's structure from here on
            m["channels"]["dense"]["factory"] = dense_factory
        if renumber and m["channels"]["bm25"] and not st.bm25_postings(m["channels"]):
            m["channels"]["bm25_store"] = "postings"  # the tantivy folder is collected once unused
            m["bm25"] = None
        if n_live == 0 and renumber:
            m["segments"] = []
        elif segs:
            entry = merge_segments(self.path / name, sources, first=first, span=span,
                                   dense_factory=m["channels"]["dense"]["factory"],
                                   dense_storage=m["channels"]["dense"].get("storage", "fp32"),
                                   codec=codec, codec_name=codec_name if codec is not None else None,
                                   renumber=renumber, bm25=st.bm25_postings(m["channels"]))
            m["segments"][i:j] = [entry]
        if renumber:
            dead = np.zeros(0, np.int64)
            m["next_docno"] = n_live
        else:  # the merged rows are live: deletions inside the merged span are gone with them
            dead = old.deleted[(old.deleted < first) | (old.deleted >= first + span)]
        if len(dead) != int(old.manifest["counts"]["deleted"]) or renumber:
            m["deleted"] = None
            if len(dead):
                m["deleted"] = f"deleted-{gen:06d}.npy"
                tmp = self.path / (m["deleted"] + ".tmp")
                st.save_npy(tmp, dead.astype(np.int64))
                os.replace(tmp, self.path / m["deleted"])
        m["counts"]["deleted"] = len(dead)
        m["counts"]["documents"] = sum(int(e["count"]) for e in m["segments"]) - len(dead)
        segs = sources = None
        self._switch(m)
        self._install(self._load_state(m, old), self._manifest_stat())

    def _switch(self, m: dict) -> None:
        """The commit point: lease file of the new generation, then the manifest by rename."""
        locking.write_lease(self.path, m)
        st.write_json_durable(self.path / st.MANIFEST, m)
        st.fsync_dir(self.path)

    def compact(self, dense_factory: str | None = None) -> None:
        """Rewrite all live documents into one segment (BM25 postings included: an index that
        kept BM25 in tantivy moves to postings here); reclaims space (the old generation's files
        are removed as soon as no search, here or in another process, still reads them).

        ``dense_factory`` (optional) changes the index's dense structure from here on, as
        :meth:`create` takes it (``"auto"``, ``"Flat"`` or a FAISS factory string): the compacted
        segment is built with it and later segments follow it. An index created before ``"auto"``
        existed says ``"Flat"``; ``compact(dense_factory="auto")`` moves it to the default."""
        if dense_factory is not None:
            check_factory(dense_factory, self.encoder.spec.dim)
        with self._writing():
            self._compact(dense_factory)  # its locals (the old state) are gone before _writing collects

    def _compact(self, dense_factory: str | None = None) -> None:
        state = self._state
        n = len(state.segments)
        if n == 0 and state.next_docno == 0 and dense_factory is None:
            return
        state = None
        self._merge_range(0, n, renumber=True, **({} if dense_factory is None else {"dense_factory": dense_factory}))

    # ---------------------------------------------------------------- reading

    def __len__(self) -> int:
        return len(self._current())

    def __contains__(self, doc_id: str) -> bool:
        return isinstance(doc_id, str) and bool(self._current().find([doc_id])[0] >= 0)

    def ids(self) -> list[str]:
        """Ids of all live documents (in docno order)."""
        state = self._current()
        out = []
        for s in state.segments:
            out += s.store.ids(state.live_rows(s))
        return out

    def get(self, doc_id: str) -> dict:
        """The stored ``{"id", "text", "metadata"}`` of a live document."""
        state = self._current()
        d = state.find([doc_id])[0] if isinstance(doc_id, str) else -1
        if d < 0:
            raise KeyError(doc_id)
        return self._doc(state, int(d))

    @staticmethod
    def _doc(state: _State, docno: int) -> dict:
        return HybridIndex._docs(state, [docno])[0]

    @staticmethod
    def _docs(state: _State, docnos) -> list[dict]:
        """Stored documents for many docnos, segments located in one vectorised call."""
        docnos = np.asarray(docnos, np.int64)
        if len(state.segments) == 1:  # the usual compacted index: no grouping by segment
            s = state.segments[0]
            ids, texts, metas = s.docs_of(s.rows_of(docnos))
            return [{"id": i, "text": t, "metadata": md} for i, t, md in zip(ids, texts, metas)]
        seg_of = state.locate(docnos)
        out: list = [None] * len(docnos)
        for si in np.unique(seg_of):
            s = state.segments[si]
            pos = np.flatnonzero(seg_of == si)
            rows = s.rows_of(docnos[pos])
            ids, texts, metas = s.docs_of(rows)
            for p_, i, t, md in zip(pos.tolist(), ids, texts, metas):
                out[p_] = {"id": i, "text": t, "metadata": md}
        return out

    def default_fusion(self) -> FusionConfig:
        """Defaults by model: BGE-M3's own raw formula, or dense + BM25 z-scored and noise-gated."""
        return default_fusion_for(self.encoder.spec)

    def default_candidates(self) -> int:
        """Hybrid first-stage depth when ``search(candidates=None)``."""
        return default_candidates_for(self.encoder.spec)

    @property
    def channels(self) -> tuple[str, ...]:
        return _channels_of(self._current())

    def search(self, query: str, k: int = 10, mode: str = "hybrid", *,
               weights: Mapping[str, float] | None = None, filter: Mapping | None = None,
               candidates: int | None = None, fusion: str = "weighted", normalize: Sequence[str] | None = None,
               query_encoded: Encoded | None = None, reranker=None, rerank_top: int = 50,
               rerank_weight: float = 1.0, exhaustive: bool = False) -> list[Hit]:
        """Search one query string; returns its hits, best first (``list[Hit]``, at most ``k``).

        A list of queries goes to :meth:`search_batch` (same keywords); given one here, this
        raises ``TypeError``, so what ``search`` returns never depends on its input's type.

        Args:
            mode: ``dense``, ``sparse``, ``colbert``, ``bm25`` or ``hybrid``.
            weights: per-channel weights for hybrid, merged over :meth:`default_fusion`.
            filter: metadata filter, see :mod:`hybridsearch.index.filters`; applies to every channel.
            candidates: how many each first-stage channel contributes to the hybrid union
                (default :meth:`default_candidates`: 100 for BGE-M3, 1000 for dense-only models);
                in ``colbert`` mode, how many documents get the exact MaxSim after the centroid
                and refinement stages (default ``multivector.FIRST_STAGE_CANDIDATES``, 1024).
            fusion: ``"weighted"`` or ``"rrf"``.
            normalize: channels z-scored over the query's candidate union and noise-gated before
                the weighted sum (the others enter raw); default from :meth:`default_fusion`.
            query_encoded: the queries' representations, precomputed with
                ``encoder.encode_arrays(queries, kind="query", ...)``, to skip encoding.
            reranker: a :class:`hybridsearch.rerank.Reranker`; when given, the top ``rerank_top``
                fused hits are rescored by the cross-encoder and returned in its order, each
                with ``rerank_score`` set and ``score`` still the fused score.
            rerank_weight: 1.0 (default) orders the reranked hits by the cross-encoder alone;
                ``w`` < 1 orders them by ``w * minmax(rerank) + (1 - w) * minmax(fused)`` over
                the ``rerank_top`` hits of each query, which keeps the first stage's evidence
                (on SciFact a briefly fine-tuned cross-encoder hurt alone and helped at 0.5:
                bench/results/rerank_scifact.md).
            exhaustive: ``colbert`` mode only: exact MaxSim over every allowed document instead
                of the centroid first stage (segments without a codebook always are).
        """
        if not isinstance(query, str):
            if isinstance(query, Sequence) and not isinstance(query, (bytes, bytearray)):
                raise TypeError("search() takes one query string; use search_batch() for a list of queries")
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        return self._search_queries(
            [query], k, mode, weights=weights, filter=filter, candidates=candidates, fusion=fusion,
            normalize=normalize, query_encoded=query_encoded, reranker=reranker, rerank_top=rerank_top,
            rerank_weight=rerank_weight, exhaustive=exhaustive)[0]

    def search_batch(self, queries: Sequence[str], k: int = 10, mode: str = "hybrid", *,
                     weights: Mapping[str, float] | None = None, filter: Mapping | None = None,
                     candidates: int | None = None, fusion: str = "weighted",
                     normalize: Sequence[str] | None = None, query_encoded: Encoded | None = None,
                     reranker=None, rerank_top: int = 50, rerank_weight: float = 1.0,
                     exhaustive: bool = False) -> list[list[Hit]]:
        """Search a batch of query strings at once; returns one ``list[Hit]`` per query, in order.

        The keywords are :meth:`search`'s and apply to every query; ``query_encoded``, when
        given, holds one row per query. Encoding and the channels' kernels run over the whole
        batch, so this is faster than a loop of :meth:`search`. A single string is refused
        (``TypeError``): it is a sequence of characters, not of queries.
        """
        if isinstance(queries, str):
            raise TypeError("search_batch() takes a list of query strings; use search() for one query")
        if isinstance(queries, Mapping) or not isinstance(queries, Sequence):
            raise TypeError(f"queries must be a list of strings, got {type(queries).__name__}")
        queries = list(queries)
        if not queries or not all(isinstance(q, str) for q in queries):
            raise TypeError("queries must be a non-empty list of strings")
        return self._search_queries(
            queries, k, mode, weights=weights, filter=filter, candidates=candidates, fusion=fusion,
            normalize=normalize, query_encoded=query_encoded, reranker=reranker, rerank_top=rerank_top,
            rerank_weight=rerank_weight, exhaustive=exhaustive)

    def _search_queries(self, queries: list[str], k, mode, *, weights, filter, candidates, fusion,
                        normalize, query_encoded, reranker, rerank_top, rerank_weight,
                        exhaustive) -> list[list[Hit]]:
        """The checks and the search behind :meth:`search` and :meth:`search_batch`."""
        state = self._current()  # one generation (and one stat of the manifest) per search
        channels = _channels_of(state)
        _check_query_inputs(queries, weights, channels)  # before anything is encoded
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; modes are {MODES}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if mode != "hybrid" and mode not in channels:
            raise ValueError(f"this index has no {mode} channel (it has: {', '.join(channels)})")
        if fusion not in ("weighted", "rrf"):
            raise ValueError(f"unknown fusion {fusion!r}; use 'weighted' or 'rrf'")
        cfg = None
        if mode == "hybrid":  # single-channel modes skip building (and validating) a fusion config
            base = self.default_fusion()
            w = dict(base.weights)
            w.update(weights or {})
            cfg = FusionConfig(weights=w, method="rrf" if fusion == "rrf" else fusion,
                               normalize=tuple(normalize) if normalize is not None else base.normalize)
        flt = check_filter(filter)
        # None means "everything": channels then skip mask handling entirely.
        allowed = None if state.all_alive else state.alive
        if flt:
            allowed = state.filter_mask(flt)
        if query_encoded is not None and len(query_encoded) != len(queries):
            raise ValueError(f"query_encoded holds {len(query_encoded)} queries, {len(queries)} given")
        if reranker is not None and (not isinstance(rerank_top, int) or rerank_top < 1):
            raise ValueError(f"rerank_top must be a positive integer, got {rerank_top!r}")
        if isinstance(rerank_weight, bool) or not isinstance(rerank_weight, (int, float)) \
                or not 0.0 <= rerank_weight <= 1.0:
            raise ValueError(f"rerank_weight must be a number in [0, 1], got {rerank_weight!r}")
        depth = max(k, rerank_top) if reranker is not None else k
        if candidates is None:
            candidates = FIRST_STAGE_CANDIDATES if mode == "colbert" else self.default_candidates()
        if not isinstance(candidates, int) or candidates < 1:
            raise ValueError(f"candidates must be a positive integer, got {candidates!r}")
        with search_scope(mode, len(queries)):
            results = self._search(state, queries, depth, mode, cfg, allowed, max(candidates, depth),
                                   query_encoded, exhaustive=bool(exhaustive))
        if reranker is not None:
            results = [_rerank(reranker, q, hits, k, float(rerank_weight)) for q, hits in zip(queries, results)]
        return results

    def _search(self, state, queries, k, mode, cfg, allowed, C, q=None, exhaustive=False) -> list[list[Hit]]:
        spec = self.encoder.spec
        need_dense = mode in ("dense", "hybrid")
        need_sparse = spec.has_sparse and mode in ("sparse", "hybrid")
        need_colbert = spec.has_colbert and mode in ("colbert", "hybrid")
        if q is None and (need_dense or need_sparse or need_colbert):
            q = self.encoder.encode_arrays(queries, kind="query", dense=need_dense, sparse=need_sparse,
                                           colbert=need_colbert, show_progress=False)
        if mode == "dense":
            return self._hits(state, *self._dense_topk(state, q.dense, k, allowed), "dense")
        if mode == "sparse":
            return self._hits(state, *self._sparse_topk(state, q.sparse, k, allowed), "sparse")
        if mode == "colbert":
            rows = [self._colbert_topk(state, q.colbert_of(i), k, allowed, C, exhaustive) for i in range(len(queries))]
            return self._hits(state, np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]), "colbert")
        if mode == "bm25":
            return self._hits(state, *self._bm25_topk(state, queries, k, allowed), "bm25")
        return self._hybrid(state, queries, q, k, cfg, allowed, C)

    def _hybrid(self, state, queries, q, k, cfg, allowed, C) -> list[list[Hit]]:
        spec = self.encoder.spec
        firsts = [self._dense_topk(state, q.dense, C, allowed)]
        if spec.has_sparse:
            firsts.append(self._sparse_topk(state, q.sparse, C, allowed))
        bm = self._bm25_topk(state, queries, C, allowed) if state.has_bm25 else None
        if bm is not None:
            firsts.append(bm)
        out = []
        for j in range(len(queries)):
            union = np.unique(np.concatenate([ids[j][ids[j] >= 0] for _, ids in firsts]))
            if len(union) == 0:
                out.append([])
                continue
            scores = self._rescore(state, q, j, union)
            if bm is not None:
                b = np.full(len(union), np.nan, np.float32)
                ok = bm[1][j] >= 0
                b[np.searchsorted(union, bm[1][j][ok])] = bm[0][j][ok]
                scores["bm25"] = b
            fused, terms = fuse_terms(scores, cfg)
            top = np.argsort(-fused, kind="stable")[:k]
            hits = []
            for t, doc in zip(top, self._docs(state, union[top])):
                ch = {c: (None if np.isnan(s[t]) else float(s[t])) for c, s in scores.items()}
                hits.append(Hit(doc["id"], float(fused[t]), doc["text"], doc["metadata"], ch,
                                contributions={c: float(v[t]) for c, v in terms.items()}))
            out.append(hits)
        return out

    def _rescore(self, state, q: Encoded, j: int, union: np.ndarray) -> dict[str, np.ndarray]:
        """Every model channel's exact score for the docnos in ``union`` (sorted)."""
        spec = self.encoder.spec
        res = {"dense": np.empty(len(union), np.float32)}
        if spec.has_sparse:
            res["sparse"] = np.empty(len(union), np.float32)
            qi = q.sparse.indices[q.sparse.indptr[j]:q.sparse.indptr[j + 1]]
            qw = q.sparse.data[q.sparse.indptr[j]:q.sparse.indptr[j + 1]]
        if spec.has_colbert:
            res["colbert"] = np.empty(len(union), np.float32)
            qc = q.colbert_of(j)
        seg_of = state.locate(union)
        colbert_parts, colbert_sel = [], []
        for si in np.unique(seg_of):
            s = state.segments[si]
            sel = seg_of == si
            rows = s.rows_of(union[sel])
            res["dense"][sel] = s.dense_rows(rows) @ q.dense[j]
            if spec.has_sparse:
                res["sparse"][sel] = s.sparse.score(qi, qw, rows)
            if spec.has_colbert:
                colbert_parts.append((s.colbert, rows))
                colbert_sel.append(sel)
        if colbert_parts:
            # One parallel pass over every segment's candidates (not one per segment).
            for sel, scores in zip(colbert_sel, maxsim_many(qc, colbert_parts)):
                res["colbert"][sel] = scores
        return res

    # first-stage channels: each returns (scores (nq, k) float32, docnos (nq, k) int64, -1 = none)

    def _merge(self, parts, nq, k):
        if not parts:
            return np.zeros((nq, k), np.float32), np.full((nq, k), -1, np.int64)
        if len(parts) == 1 and parts[0][1].shape[1] == k:  # one segment: already sorted, nothing to merge
            sc, ids = parts[0]
            return np.where(ids >= 0, sc, 0).astype(np.float32, copy=False), ids
        s = np.concatenate([p[0] for p in parts], axis=1)
        i = np.concatenate([p[1] for p in parts], axis=1)
        s = np.where(i >= 0, s, -np.inf)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        s, i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
        s[i < 0] = 0
        if s.shape[1] < k:
            pad = k - s.shape[1]
            s = np.pad(s, ((0, 0), (0, pad)))
            i = np.pad(i, ((0, 0), (0, pad)), constant_values=-1)
        return s.astype(np.float32), i

    def _dense_topk(self, state, qd, k, allowed):
        parts = []
        for s in state.segments:
            sc, ids = s.dense_search(qd, k, s.rows_mask(allowed))
            parts.append((sc, _docnos(s, ids)))
        return self._merge(parts, len(qd), k)

    def _sparse_topk(self, state, qs, k, allowed):
        parts = []
        for s in state.segments:
            sc, ids = s.sparse.search(qs, k, s.rows_mask(allowed))
            parts.append((sc, _docnos(s, ids)))
        return self._merge(parts, qs.shape[0], k)

    def _colbert_topk(self, state, qc, k, allowed, C=FIRST_STAGE_CANDIDATES, exhaustive=False):
        """Exact MaxSim top-k of one query. Coded segments larger than ``C`` documents: the
        documents of best centroid score over all of them (one codebook: comparable scores),
        narrowed to ``C`` by the leading coded dimensions, are rescored in one parallel pass; the
        other segments are searched exhaustively."""
        parts, staged = [], []
        for s in state.segments:
            mask = s.rows_mask(allowed)
            staged_depth = refine_depth(C, s.count) if s.colbert_kind == "codes" and s.colbert._refines() else C
            if not exhaustive and s.colbert_kind == "codes" and s.colbert._has_first_stage() and staged_depth < s.count:
                staged.append((s, mask))
                continue
            sc, ids = s.colbert.search(qc, k, mask, exhaustive=True)
            parts.append((sc[None], _docnos(s, ids)[None]))
        if staged:
            parts.append(self._colbert_staged(staged, qc, k, C))
        sc, ids = self._merge(parts, 1, k)
        return sc[0], ids[0]

    @staticmethod
    def _colbert_first_stage(staged, qc, C):
        """The ``C`` best rows by centroid score over the coded segments ``staged`` (a list of
        ``(segment, row mask or None)``): ``(index into staged (c,), row (c,), score (c,))``.
        Also what a hybrid union can take ColBERT candidates from."""
        tables, segs, rows, approx = {}, [], [], []
        for si, (s, mask) in enumerate(staged):
            key = id(s.colbert.codec)
            if key not in tables:
                tables[key] = s.colbert.centroid_table(qc)
            r, a = s.colbert.first_stage(qc, C, mask, table=tables[key])
            segs.append(np.full(len(r), si, np.int64))
            rows.append(r)
            approx.append(a)
        segs, rows, approx = np.concatenate(segs), np.concatenate(rows), np.concatenate(approx)
        keep = np.lexsort((rows, segs, -approx))[:C]  # ties: lower segment, then lower row
        return segs[keep], rows[keep], approx[keep]

    def _colbert_staged(self, staged, qc, k, C):
        # as CodedColbertStore.search: refine_depth() by centroids, C of them by the leading
        # coded dimensions, exact MaxSim on those
        refine = all(s.colbert._refines() for s, _ in staged)
        n_allowed = sum(s.count if m is None else int(np.count_nonzero(m)) for s, m in staged)
        segs, rows, _ = self._colbert_first_stage(staged, qc, refine_depth(C, n_allowed) if refine else C)
        if len(rows) > C:
            part = np.empty(len(rows), np.float32)
            for si in np.unique(segs):
                sel = np.flatnonzero(segs == si)
                part[sel] = staged[si][0].colbert.partial_maxsim(qc, rows[sel])
            keep = np.lexsort((rows, segs, -part))[:C]
            segs, rows = segs[keep], rows[keep]
        docnos = np.empty(len(rows), np.int64)
        exact = np.empty(len(rows), np.float32)
        parts, sels = [], []
        for si in np.unique(segs):
            sel = np.flatnonzero(segs == si)
            r = np.sort(rows[sel])
            sel = sel[np.argsort(rows[sel], kind="stable")]
            parts.append((staged[si][0].colbert, r))
            sels.append(sel)
            docnos[sel] = staged[si][0].docno_of(r)
        for sel, sc in zip(sels, maxsim_many(qc, parts)):
            exact[sel] = sc
        top = np.lexsort((docnos, -exact))[:k]
        out_s = np.zeros((1, k), np.float32)
        out_i = np.full((1, k), -1, np.int64)
        out_s[0, :len(top)] = exact[top]
        out_i[0, :len(top)] = docnos[top]
        return out_s, out_i

    def _bm25_topk(self, state, queries, k, allowed):
        if state.bm25 is None:  # postings in the segments: statistics summed over all of them
            segs = state.segments
            masks = None if allowed is None else [s.rows_mask(allowed) for s in segs]
            parts = bm25_postings.search([s.bm25 for s in segs], queries, k, masks)
            return self._merge([(sc, _docnos(s, ids)) for s, (sc, ids) in zip(segs, parts)],
                               len(queries), k)
        bm25, searcher = state.bm25, state.bm25_searcher
        if allowed is not None:
            return bm25.search(queries, k, allowed, searcher=searcher)
        # BM25 may hold documents of a commit that crashed before its manifest switch (docno >=
        # next_docno) until the next writer removes them. Drop them; if that leaves a row short,
        # redo the search with an explicit mask (exact, and rare).
        s, d = bm25.search(queries, k, None, searcher=searcher)
        stray = d >= state.next_docno
        ok = (d >= 0) & ~stray
        stray[ok] = ~state.alive[d[ok]]  # a deletion tantivy has not applied yet
        if stray.any():
            return bm25.search(queries, k, state.alive, searcher=searcher)
        return s, d

    def _hits(self, state, scores, docnos, channel) -> list[list[Hit]]:
        out = []
        for srow, drow in zip(scores.tolist(), docnos):
            n = int(np.argmin(drow >= 0)) if (drow < 0).any() else len(drow)
            docs = self._docs(state, drow[:n].tolist())
            out.append([Hit(doc["id"], s, doc["text"], doc["metadata"], {channel: s})
                        for s, doc in zip(srow, docs)])
        return out

    # ---------------------------------------------------------------- shards (hybridsearch.distributed)

    def _bm25_collection_stats(self, queries: list[str]):
        """``(N, total length, df per term of bm25_postings.query_terms(queries))`` of this
        index, for a sharded index to sum over its shards. None without BM25 postings."""
        state = self._current()
        if not state.has_bm25 or state.bm25 is not None:
            return None
        return bm25_postings.collection_stats([s.bm25 for s in state.segments],
                                              bm25_postings.query_terms(queries))

    def _shard_candidates(self, queries: list[str], q: Encoded | None, mode: str, k: int, C: int, *,
                          filter=None, bm25_stats=None, exhaustive: bool = False):
        """What one shard of a sharded index answers: ``(state, per query dict)``. Single-channel
        modes: ``{"docnos", "scores"}``, this shard's exact top ``k`` (BM25 scored with the given
        global ``bm25_stats``). Hybrid: ``{"first": {channel: (scores, docnos)}}`` the first-stage
        top ``C`` of each channel, ``"union"`` their sorted docnos, and ``"rescored"`` every model
        channel's exact score over the union. The coordinator fuses; ``state`` serves
        :meth:`_docs` for the docnos it picks. Reuses the first-stage and rescoring methods."""
        state = self._current()
        flt = check_filter(filter)
        allowed = None if state.all_alive else state.alive
        if flt:
            allowed = state.filter_mask(flt)
        spec = self.encoder.spec
        nq = len(queries)

        def bm25(depth):
            if not state.has_bm25:
                return None
            if state.bm25 is not None:
                raise ValueError(f"{self.path} keeps BM25 in tantivy (made before format 3): "
                                 "compact() it before sharding")
            segs = state.segments
            masks = None if allowed is None else [s.rows_mask(allowed) for s in segs]
            parts = bm25_postings.search([s.bm25 for s in segs], queries, depth, masks, stats=bm25_stats)
            return self._merge([(sc, _docnos(s, ids)) for s, (sc, ids) in zip(segs, parts)], nq, depth)

        if mode != "hybrid":
            if mode == "dense":
                sc, ids = self._dense_topk(state, q.dense, k, allowed)
            elif mode == "sparse":
                sc, ids = self._sparse_topk(state, q.sparse, k, allowed)
            elif mode == "colbert":
                rows = [self._colbert_topk(state, q.colbert_of(i), k, allowed, C, exhaustive) for i in range(nq)]
                sc, ids = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
            else:
                sc, ids = bm25(k)
            return state, [{"scores": sc[j][ids[j] >= 0], "docnos": ids[j][ids[j] >= 0]} for j in range(nq)]
        firsts = {"dense": self._dense_topk(state, q.dense, C, allowed)}
        if spec.has_sparse:
            firsts["sparse"] = self._sparse_topk(state, q.sparse, C, allowed)
        bm = bm25(C)
        if bm is not None:
            firsts["bm25"] = bm
        out = []
        for j in range(nq):
            first = {c: (sc[j][ids[j] >= 0], ids[j][ids[j] >= 0]) for c, (sc, ids) in firsts.items()}
            union = np.unique(np.concatenate([ids for _, ids in first.values()]))
            rescored = self._rescore(state, q, j, union) if len(union) else {}
            out.append({"first": first, "union": union, "rescored": rescored})
        return state, out

    # ---------------------------------------------------------------- stats

    def stats(self) -> dict:
        """Documents, tokens, and bytes (total and per live document) for each channel."""
        state = self._current()
        m = state.manifest
        n = max(len(state), 1)
        per = {}
        prefixes = {"dense": ("dense",), "sparse": ("sparse_",), "colbert": ("colbert_",),
                    "docstore": ("docs", "ids", "n_tokens", "docnos"), "columns": ("col-", "columns")}
        for ch, pref in prefixes.items():
            b = sum(s.bytes_of(p) for s in state.segments for p in pref)
            per[ch] = {"bytes": b, "bytes_per_doc": b / n}
        if m["channels"]["colbert"]:
            # per token of the text (BGE-M3 keeps a vector for every token but the first), and per
            # stored vector (fewer with pooling)
            vectors = sum(int(s.colbert.offsets[-1]) for s in state.segments)
            tokens = sum(int(np.maximum(np.asarray(s.n_tokens) - 1, 0).sum()) for s in state.segments)
            cb = per["colbert"]
            cb.update(vectors=vectors, bytes_per_vector=cb["bytes"] / max(vectors, 1),
                      bytes_per_token=cb["bytes"] / max(tokens, 1),
                      codec=(m["channels"].get("colbert_codec") or {"spec": "fp16"})["spec"])
        per["dense"]["storage"] = m["channels"]["dense"].get("storage", "fp32")
        if state.bm25 is not None:
            b = state.bm25.disk_bytes()
            per["bm25"] = {"bytes": b, "bytes_per_doc": b / n}
        elif state.has_bm25:
            b = sum(s.bytes_of("bm25_") for s in state.segments)
            per["bm25"] = {"bytes": b, "bytes_per_doc": b / n}
        return {
            "path": str(self.path), "format_version": m["format_version"], "generation": m["generation"],
            "model": m["model"]["name"], "outputs": m["model"]["outputs"], "channels": list(self.channels),
            "documents": len(state), "deleted_pending_compaction": len(state.deleted),
            "segments": len(state.segments), "tokens": m["counts"]["tokens"], "channel_bytes": per,
        }

    def verify(self) -> None:
        """Check every segment file against its recorded sha256; raises IndexFormatError."""
        for s in self._current().segments:
            s.verify()

    def close(self) -> None:
        """Release the BM25 writer and this object's lease; later calls raise ValueError."""
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            state, self._state = self._state, None
            if state is not None and state.bm25 is not None:
                state.bm25.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return f"HybridIndex({str(self.path)!r}, closed)"
        return f"HybridIndex({str(self.path)!r}, documents={len(self)}, channels={self.channels})"


_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written|No space left on device|Disk quota exceeded")


class _NoModel:
    """The encoder of an index opened by :meth:`HybridIndex.open_without_model`: any use of it
    (searching, writing) raises a RuntimeError that says how to open the index with its model."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__"):  # copy, pickle and hasattr probes see an ordinary object
            raise AttributeError(attr)
        raise RuntimeError(f"this index was opened without its model ({self.name!r}; "
                           "HybridIndex.open_without_model): it can report stats, ids and documents; "
                           "open it with HybridIndex.open to search or write")

    def __repr__(self) -> str:
        return f"<model {self.name!r} not loaded>"


def _disk_full(e: BaseException, folder: Path) -> DiskFullError | None:
    """A DiskFullError naming ENOSPC and the path when ``e`` (or its cause) is a full disk:
    errno ENOSPC/EDQUOT, numpy's short-write message, or tantivy's/FAISS's text of it."""
    while e is not None:
        if isinstance(e, DiskFullError):
            return None
        no = getattr(e, "errno", None)
        if no in (errno.ENOSPC, errno.EDQUOT) or _SHORT_WRITE.search(str(e)):
            where = getattr(e, "filename", None) or folder
            name = "EDQUOT" if no == errno.EDQUOT else "ENOSPC"
            what = getattr(e, "strerror", None) or str(e)
            return DiskFullError(no or errno.ENOSPC, f"disk full ({name}) writing {where}: {what}; "
                                 "the index keeps its last commit, free space and rerun", str(where))
        e = e.__cause__ or e.__context__
    return None


def _codec_sample(enc: Encoded, stores, n: int, pool: int = 1, seed: int = 0) -> np.ndarray:
    """At most ``n`` vectors to train a codebook on, drawn evenly from a commit's ``enc`` and the
    float16 ``stores`` (bounded: only the drawn rows are read). With ``pool`` > 1, whole documents
    are drawn and pooled, so the codebook sees vectors like the ones it will code."""
    if pool > 1:
        return _pooled_sample(enc, stores, n, pool, seed)
    new = enc.colbert
    sizes = [len(new)] + [int(s.offsets[-1]) for s in stores]
    total = sum(sizes)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(total, size=min(n, total), replace=False))
    out, lo = [], 0
    for size, src in zip(sizes, [new] + [s.vectors for s in stores]):
        sel = pick[(pick >= lo) & (pick < lo + size)] - lo
        if len(sel):
            out.append(np.asarray(src[sel], dtype=np.float32))
        lo += size
    return np.concatenate(out)


def _pooled_sample(enc: Encoded, stores, n: int, pool: int, seed: int) -> np.ndarray:
    sources = [(enc.colbert, np.asarray(enc.colbert_offsets))] + [(s.vectors, np.asarray(s.offsets)) for s in stores]
    docs = np.concatenate([np.stack([np.full(len(off) - 1, i), np.arange(len(off) - 1)], 1)
                           for i, (_, off) in enumerate(sources)])
    rng = np.random.default_rng(seed)
    vecs, offs, total = [], [0], 0
    for i, r in docs[rng.permutation(len(docs))]:
        if total >= n:
            break
        v, off = sources[i]
        a, b = int(off[r]), int(off[r + 1])
        vecs.append(np.asarray(v[a:b], dtype=np.float32))
        total += b - a
        offs.append(total)
    pooled, _ = pool_tokens(np.concatenate(vecs), np.array(offs, np.int64), pool)
    return pooled[:n]


def default_fusion_for(spec) -> FusionConfig:
    """The fusion a model's index uses by default (``spec``: the encoder's spec)."""
    if spec.has_sparse or spec.has_colbert:
        return FusionConfig(weights=dict(M3_WEIGHTS), normalize=M3_NORMALIZE)
    return FusionConfig(weights=dict(DENSE_BM25_WEIGHTS), normalize=DENSE_BM25_NORMALIZE)


def default_candidates_for(spec) -> int:
    """The hybrid first-stage depth a model's index uses by default."""
    return M3_CANDIDATES if (spec.has_sparse or spec.has_colbert) else DENSE_BM25_CANDIDATES


def _rerank(reranker, query: str, hits: list[Hit], k: int, weight: float = 1.0) -> list[Hit]:
    """Rescore ``hits`` with a cross-encoder; best ``k`` by reranker score, or by
    ``weight * minmax(rerank) + (1 - weight) * minmax(fused)`` when ``weight < 1`` (fused score kept)."""
    if not hits:
        return hits
    scores = reranker.compute_score([(query, h.text) for h in hits])
    scores = [scores] if isinstance(scores, float) else scores
    for h, s in zip(hits, scores):
        h.rerank_score = float(s)
    if weight >= 1.0:
        return sorted(hits, key=lambda h: -h.rerank_score)[:k]
    key = weight * minmax(np.array([h.rerank_score for h in hits])) \
        + (1.0 - weight) * minmax(np.array([h.score for h in hits]))
    return [hits[i] for i in np.argsort(-key, kind="stable")[:k]]


def _docnos(s: Segment, ids: np.ndarray) -> np.ndarray:
    """Local row ids (-1 = none) of segment ``s`` as docnos (-1 kept)."""
    return np.where(ids >= 0, s.docno_of(np.maximum(ids, 0)), -1)


def _check_docs(docs) -> tuple[list[str], list[str], list[dict]]:
    """Validate documents before anything is encoded or written."""
    if isinstance(docs, (str, Mapping)) or not isinstance(docs, Sequence):
        raise TypeError("documents must be a list of {'id', 'text', 'metadata'} dicts")
    if not docs:
        raise ValueError("no documents given")
    ids, texts, metas = [], [], []
    for n, d in enumerate(docs):
        if not isinstance(d, Mapping):
            raise TypeError(f"document {n} is {type(d).__name__}, expected a dict with id and text")
        i, t, md = d.get("id"), d.get("text"), d.get("metadata") or {}
        if not isinstance(i, str) or not i:
            raise ValueError(f"document {n}: 'id' must be a non-empty string, got {i!r}")
        _check_unicode(i, f"document {n}: the id")
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"document {i!r}: 'text' must be a non-empty string")
        _check_unicode(t, f"document {i!r}: the text")
        if not isinstance(md, dict):
            raise ValueError(f"document {i!r}: 'metadata' must be a dict")
        _check_metadata(md, f"document {i!r}: metadata")
        try:
            json.dumps(md, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"document {i!r}: metadata is not JSON-serialisable ({e})") from e
        ids.append(str.__str__(i))  # numpy str_ and other subclasses stored as plain str
        texts.append(str.__str__(t))
        metas.append(md)
    seen, dups = set(), []
    for i in ids:
        if i in seen:
            dups.append(i)
        seen.add(i)
    if dups:
        raise ValueError(f"duplicate id(s) in one batch: {sorted(set(dups))[:5]}")
    return ids, texts, metas


def _check_encoded(enc: Encoded, n: int, spec) -> None:
    if not isinstance(enc, Encoded):
        raise TypeError("encoded must be a hybridsearch.Encoded")
    if len(enc) != n:
        raise ValueError(f"encoded holds {len(enc)} documents, but {n} were given")
    if enc.dense is None or enc.dense.shape != (n, spec.dim):
        got = None if enc.dense is None else enc.dense.shape
        raise ValueError(f"dense vectors must have shape ({n}, {spec.dim}) for model {spec.name}, got {got}")
    if not np.isfinite(enc.dense).all():
        raise ValueError("dense vectors contain NaN or infinity")
    if spec.has_sparse and (enc.sparse is None or enc.sparse.shape != (n, spec.vocab_size)):
        raise ValueError(f"sparse weights must be a ({n}, {spec.vocab_size}) CSR matrix")
    if spec.has_colbert:
        if enc.colbert is None or enc.colbert.ndim != 2 or enc.colbert.shape[1] != spec.colbert_dim:
            raise ValueError(f"ColBERT vectors must have {spec.colbert_dim} columns")
        if enc.colbert_offsets is None or len(enc.colbert_offsets) != n + 1:
            raise ValueError(f"colbert_offsets must have {n + 1} entries")


# ---------------------------------------------------------------- input checks (before any encoding)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _check_unicode(s: str, what: str) -> None:
    """Refuse a string holding a lone surrogate (e.g. JSON "\\ud800"): it cannot be encoded or stored."""
    if s.isascii():
        return
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} contains a lone surrogate (U+{ord(s[e.start]):04X}) at position "
                         f"{e.start}; texts must be valid Unicode") from None


def _short_int(v: int) -> str:
    """An integer for an error message: in full when short, else its sign and about how many digits."""
    if -10**30 < v < 10**30:
        return str(v)
    n = v.bit_length() * 30103 // 100000 + 1  # about the number of decimal digits, cheaply
    return f"{'-' if v < 0 else ''}(about {n} digits)"


def _check_metadata(md, what: str) -> None:
    """Metadata values must be storable: integers within int64, finite floats, valid Unicode."""
    import math

    stack = [(md, what)]
    while stack:
        v, where = stack.pop()
        if isinstance(v, str):
            _check_unicode(v, where)
        elif isinstance(v, bool) or v is None:
            pass
        elif isinstance(v, int):
            if not INT64_MIN <= v <= INT64_MAX:
                raise ValueError(f"{where}: integer {_short_int(v)} is outside the 64-bit range "
                                 f"[-2**63, 2**63-1]; store it as a string")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise ValueError(f"{where}: {v!r} is not a finite number")
        elif isinstance(v, Mapping):
            for key, x in v.items():
                if not isinstance(key, str):
                    raise ValueError(f"{where}: metadata keys must be strings, got {key!r}"[:300])
                _check_unicode(key, f"{where}: a field name")
                stack.append((x, f"{where}[{key!r}]"))
        elif isinstance(v, (list, tuple)):
            stack.extend((x, f"{where}[{j}]") for j, x in enumerate(v))


def _channels_of(state: _State) -> tuple[str, ...]:
    c = state.manifest["channels"]
    return tuple(x for x in CHANNELS if (c[x] if x != "dense" else True))


def _check_query_inputs(queries, weights, channels) -> None:
    """Validate search inputs before the query is encoded; raises TypeError / ValueError.

    ``queries``: a string or a sequence of strings, none blank or holding a lone surrogate.
    ``weights``: None or channel -> finite number >= 0, every channel one of ``channels`` (the index's).
    """
    import math

    qs = [queries] if isinstance(queries, str) else queries
    if isinstance(qs, Mapping) or not isinstance(qs, Sequence) or not qs \
            or not all(isinstance(q, str) for q in qs):
        raise TypeError("query must be a string or a non-empty list of strings")
    for n, q in enumerate(qs):
        what = "the query" if len(qs) == 1 else f"query {n}"
        if not q.strip():
            raise ValueError(f"{what} is empty or blank")
        _check_unicode(q, what)
    if weights is None:
        return
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a dict of channel -> number, got {type(weights).__name__}")
    channels = tuple(channels)
    for c, w in weights.items():
        if c not in CHANNELS:
            raise ValueError(f"weights: unknown channel {c!r}; channels are {', '.join(CHANNELS)}")
        if c not in channels:
            raise ValueError(f"weights: this index has no {c} channel (it has: {', '.join(channels)})")
        ok = not isinstance(w, bool) and isinstance(w, (int, float, np.integer, np.floating))
        try:
            ok = ok and math.isfinite(w) and w >= 0
        except OverflowError:  # an int too large for a float
            ok = False
        if not ok:
            got = _short_int(w) if isinstance(w, int) and not isinstance(w, bool) else repr(w)
            raise ValueError(f"weights: the weight of {c!r} must be a finite number >= 0, got {got}")
