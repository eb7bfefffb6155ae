"""One immutable segment: a range of docnos with all their representations.

A segment folder ``seg-NNNNNN/`` holds (docs/ARCHITECTURE.md lists every file):

* the document store -- ids (with a hash lookup), texts and metadata, one record per row
  (:mod:`.docstore`), and typed metadata columns for filters (:mod:`.columns`);
* ``n_tokens.npy`` -- (n,) int64 tokens per document;
* the dense vectors in the index's storage kind (fp32 / fp16 / sq8, :mod:`..retrievers.dense_store`)
  (+ ``dense.faiss`` unless the segment's factory is Flat; ``"auto"`` picks it from the segment's
  row count when the segment is written or merged, :func:`..retrievers.dense.auto_factory`);
* ``sparse_*.npy`` -- the learned-sparse postings (models with a sparse head);
* ``colbert_*.npy`` -- float16 token vectors or codes of the index's codebook, + offsets;
* ``bm25_*`` -- BM25 postings of the texts (format-3 indexes, :mod:`..retrievers.bm25_postings`);
* ``docnos.npy`` -- only in a merged segment that dropped deleted rows: row r's docno.

Row ``r`` of a segment with entry ``first`` is docno ``first + r``, or ``docnos[r]`` when the
segment has ``docnos.npy``; the segment covers docnos ``[first, first + span)``.

It is written under ``seg-NNNNNN.tmp``, every file fsynced, then renamed: a folder without
``.tmp`` is complete. It only becomes part of the index when a manifest names it. Format-1
segments (``docs.msgpack``, float32 ``dense.npy``) are still read.

:func:`write_segment` writes a commit's documents; :func:`merge_segments` streams the kept rows
of adjacent segments into one (bounded memory: chunks of rows, memory-mapped outputs).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import IndexFormatError
from ..representations import Encoded
from ..retrievers.bm25_postings import Bm25Postings, merge_bm25
from ..retrievers.dense import (
    AUTO_MIN_RECALL,
    DenseIndex,
    gpu_available,
    is_auto,
    resolve_factory,
    self_recall,
)
from ..retrievers.dense_store import DenseStore, write_dense, write_dense_array
from ..retrievers.multivector import CodedColbertStore, ColbertStore, write_colbert
from ..retrievers.sparse import SparsePostings, merge_postings
from .columns import ColumnsWriter, SegmentColumns
from .docstore import Docstore, DocstoreWriter, LegacyDocstore
from .storage import (
    DOCNOS_FILE,
    check_segment_files,
    fsync_dir,
    load_npy,
    remove_entry,
    safe_child,
    save_npy,
    sha256_file,
)

log = logging.getLogger(__name__)

# Segments whose data passed the O(file size) checks, by (folder, files' identity): segments are
# immutable, so a reopen (every commit reloads the state) repeats only the header checks.
_CHECKED: set = set()
_CHECKED_MAX = 65536
_CHECKED_LOCK = threading.Lock()
# Rows per chunk when a merge streams documents (texts + metadata of this many in memory).
MERGE_CHUNK = 1 << 14


def _finish(tmp: Path, folder: Path, entry: dict) -> dict:
    """fsync every file of ``tmp``, record sizes and sha256, rename to ``folder``."""
    files = {}
    for p in sorted(tmp.iterdir()):
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        files[p.name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    fsync_dir(tmp)
    os.replace(tmp, folder)
    fsync_dir(folder.parent)
    entry["files"] = files
    return entry


def _start(folder: Path) -> Path:
    tmp = folder.with_name(folder.name + ".tmp")
    remove_entry(tmp.parent, tmp.name)  # a leftover (or a planted link: removed, not followed)
    tmp.mkdir(parents=True)
    return tmp


def _entry(folder: Path, count: int, first: int, span: int, factory, storage: str, colbert,
           codec, docnos: bool) -> dict:
    e = {"name": folder.name, "format": 2, "count": count, "first": first, "span": span,
         "dense_factory": factory, "dense_storage": storage, "docnos": docnos}
    if colbert is not None:
        e["colbert"] = colbert
        if colbert == "codes":
            e["colbert_codec"] = codec
    return e


def write_segment(folder: Path, ids: list[str], texts: list[str], metadata: list[dict],
                  enc: Encoded, dense_factory: str, *, first: int, dense_storage: str = "fp32",
                  codec=None, codec_name: str | None = None, bm25: bool = False) -> dict:
    """Write a complete segment at ``folder`` (atomically) for docnos ``first ..``; return its
    manifest entry. ``codec`` (a trained :class:`ColbertCodec`, named ``codec_name`` in the
    index) codes the ColBERT vectors; None stores them as float16. ``bm25``: write the BM25
    postings of ``texts``."""
    tmp = _start(folder)
    w = DocstoreWriter(tmp)
    w.append(ids, texts, metadata)
    w.finish()
    cw = ColumnsWriter(tmp)
    cw.append(metadata)
    cw.finish()
    save_npy(tmp / "n_tokens.npy", enc.n_tokens.astype(np.int64))
    factory = None
    if enc.dense is not None:
        write_dense_array(tmp, enc.dense, dense_storage)
        factory = resolve_factory(dense_factory, len(ids))
        if factory != "Flat":
            di = DenseIndex.build(enc.dense, factory)
            factory = _keep_ann(di, dense_factory, lambda: DenseStore.open(
                tmp, len(ids), enc.dense.shape[1], dense_storage))
            if factory != "Flat":
                di.save(tmp)
    if enc.sparse is not None:
        SparsePostings.from_csr(enc.sparse).save(tmp, "sparse")
    colbert = None
    if enc.colbert is not None:
        if codec is not None:
            CodedColbertStore.from_arrays(enc.colbert, enc.colbert_offsets, codec).save(tmp, "colbert")
            colbert = "codes"
        else:
            ColbertStore.from_arrays(enc.colbert, enc.colbert_offsets).save(tmp, "colbert")
            colbert = "fp16"
    if bm25:
        Bm25Postings.from_texts(texts).save(tmp)
    entry = _entry(folder, len(ids), first, len(ids), factory, dense_storage, colbert, codec_name, False)
    return _finish(tmp, folder, entry)


def _keep_ann(di: DenseIndex, dense_factory: str, store) -> str:
    """The factory a new segment keeps: ``di``'s, unless ``dense_factory`` is "auto" and the
    built structure finds under AUTO_MIN_RECALL of the rows' own nearest neighbours (then
    "Flat": the stored vectors are searched exactly). ``store()`` gives the segment's DenseStore."""
    if di.factory == "Flat" or not is_auto(dense_factory):
        return di.factory
    r = self_recall(di.index, store())
    if r < AUTO_MIN_RECALL:
        log.warning("dense_factory='auto': %s finds recall@10 %.2f of the segment's own neighbours "
                    "(under %.2f); the segment is searched exactly instead", di.factory, r, AUTO_MIN_RECALL)
        return "Flat"
    return di.factory


def merge_segments(folder: Path, sources: list, *, first: int, span: int, dense_factory: str,
                   dense_storage: str, codec=None, codec_name: str | None = None,
                   renumber: bool = False, bm25: bool = False) -> dict:
    """Write one segment at ``folder`` holding, in order, rows ``rows`` of each ``(Segment,
    rows)`` in ``sources`` (adjacent segments, ascending rows). Every channel streams: codes are
    copied when the codec is the same, float16 ColBERT vectors are coded with ``codec``. Returns
    the manifest entry, covering docnos ``[first, first + span)``. With ``renumber`` the rows
    get docnos ``first, first + 1, ...`` (compaction), else they keep theirs. ``bm25``: write
    BM25 postings, merged from the sources' or, where they have none (an index moving from
    tantivy), built from the texts."""
    tmp = _start(folder)
    w, cw = DocstoreWriter(tmp), ColumnsWriter(tmp)
    docnos, ntok = [], []
    for seg, rows in sources:
        for lo in range(0, len(rows), MERGE_CHUNK):
            r = rows[lo:lo + MERGE_CHUNK]
            ids, texts, metas = seg.docs_of(r)
            w.append(ids, texts, metas)
            cw.append(metas)
        docnos.append(seg.docno_of(rows))
        ntok.append(np.asarray(seg.n_tokens)[rows])
    w.finish()
    cw.finish()
    docnos = np.concatenate(docnos).astype(np.int64) if docnos else np.zeros(0, np.int64)
    count = len(docnos)
    has_docnos = not renumber and not np.array_equal(docnos, np.arange(first, first + count))
    if has_docnos:
        save_npy(tmp / DOCNOS_FILE, docnos)
    save_npy(tmp / "n_tokens.npy", np.concatenate(ntok).astype(np.int64))
    factory = None
    if sources[0][0].dense_store is not None:
        write_dense(tmp, [(s.dense_store, r) for s, r in sources], dense_storage)
        factory = resolve_factory(dense_factory, count)
        if factory != "Flat":
            store = DenseStore.open(tmp, count, sources[0][0].dense_store.dim, dense_storage)
            di = DenseIndex.build_from(store, factory)
            factory = _keep_ann(di, dense_factory, lambda: store)
            if factory != "Flat":
                di.save(tmp)
            del store
    if sources[0][0].sparse is not None:
        merge_postings(tmp, "sparse", [(s.sparse, r) for s, r in sources])
    colbert = None
    if sources[0][0].colbert is not None:
        write_colbert(tmp, "colbert", [(s.colbert, r) for s, r in sources], codec)
        colbert = "codes" if codec is not None else "fp16"
    if bm25 and all(s.bm25 is not None for s, _ in sources):
        merge_bm25(tmp, [(s.bm25, r) for s, r in sources])
    elif bm25:
        Bm25Postings.from_texts(t for s, rows in sources for lo in range(0, len(rows), MERGE_CHUNK)
                                for t in s.docs_of(rows[lo:lo + MERGE_CHUNK])[1]).save(tmp)
    entry = _entry(folder, count, first, span, factory, dense_storage, colbert, codec_name, has_docnos)
    return _finish(tmp, folder, entry)


@dataclass
class Segment:
    """An opened segment. Its rows are docnos ``first + r`` (or ``docnos[r]``), all in
    ``[first, first + span)``."""

    folder: Path
    base: int
    count: int
    span: int
    files: dict
    dense_factory: str | None
    format: int
    dense_storage: str
    colbert_kind: str | None
    dim: int | None

    @classmethod
    def open(cls, root: Path, entry: dict, base: int, model: dict | None = None,
             channels: dict | None = None, codecs: dict | None = None) -> Segment:
        """Open ``root / entry["name"]`` as untrusted data; IndexFormatError names the bad file.

        Every time (cheap): plain names, no links, exactly the expected files at their recorded
        sizes, ``.npy`` dtypes and shapes against the count (and ``model``'s dim / colbert_dim /
        vocab_size, and ``channels``, when given) -- :func:`storage.check_segment_files`.
        Once per process for a given set of files (O(file size) passes, cached): the sparse
        postings, the ColBERT offsets and codes, the docstore offsets and hash table, the
        metadata columns. Every store is memory-mapped, nothing is read whole.
        ``codecs`` maps codebook names to loaded :class:`ColbertCodec` objects.
        """
        if not isinstance(entry, dict):
            raise IndexFormatError(f"{root}: segment entry is not an object")
        root = Path(root)
        check_segment_files(root, entry, model, channels)
        folder = safe_child(root, entry["name"], "segment", want="dir")
        fmt = entry.get("format", 1)
        seg = cls(folder, base, int(entry["count"]), int(entry.get("span", entry["count"])), entry["files"],
                  entry.get("dense_factory"), fmt, entry.get("dense_storage", "fp32"),
                  entry.get("colbert", "fp16" if "colbert_vectors.npy" in entry["files"] else None),
                  (model or {}).get("dim"))
        key = seg._identity(model)
        with _CHECKED_LOCK:
            deep = key not in _CHECKED
        vocab = model.get("vocab_size") if model else None
        cdim = model.get("colbert_dim") if model else None
        if fmt == 2:
            seg.__dict__["store"] = Docstore.open(folder, seg.count, deep=deep)
            seg.__dict__["columns"] = SegmentColumns.open(folder, seg.count, deep=deep)
            if entry.get("docnos"):
                d = load_npy(seg._file(DOCNOS_FILE), dtype=np.int64, shape=(seg.count,))
                a = np.asarray(d)
                if deep and seg.count and not (a[0] >= base and a[-1] < base + seg.span
                                               and bool((a[1:] > a[:-1]).all())):
                    raise IndexFormatError(f"index file corrupted: {folder / DOCNOS_FILE} must ascend "
                                           f"strictly within [{base}, {base + seg.span})")
                seg.__dict__["docnos"] = d
        if "sparse_indptr.npy" in seg.files:
            seg.__dict__["sparse"] = SparsePostings.load(folder, "sparse", mmap=True, vocab_size=vocab,
                                                         n_docs=seg.count, check_postings=deep)
        if "bm25_indptr.npy" in seg.files:
            seg.__dict__["bm25"] = Bm25Postings.load(folder, mmap=True, n_docs=seg.count,
                                                     check_postings=deep)
        if seg.colbert_kind == "fp16":
            seg.__dict__["colbert"] = ColbertStore.load(folder, "colbert", mmap=True, dim=cdim, n_docs=seg.count)
        elif seg.colbert_kind == "codes":
            codec = (codecs or {}).get(entry["colbert_codec"])
            if codec is None:
                raise IndexFormatError(f"{folder}: coded with {entry['colbert_codec']}, which is not loaded")
            seg.__dict__["colbert"] = CodedColbertStore.load(folder, "colbert", mmap=True, dim=cdim,
                                                             n_docs=seg.count, codec=codec, check=deep)
        if seg.dim is not None and ("dense.npy" in seg.files or "dense_sq8.npy" in seg.files):
            seg.__dict__["dense_store"] = DenseStore.open(folder, seg.count, seg.dim, seg.dense_storage, deep=deep)
        if deep:
            with _CHECKED_LOCK:
                if len(_CHECKED) >= _CHECKED_MAX:
                    _CHECKED.clear()
                _CHECKED.add(key)
        return seg

    def _identity(self, model: dict | None) -> tuple:
        ids = []
        for name in sorted(self.files):
            st_ = os.lstat(self.folder / name)
            ids.append((name, st_.st_dev, st_.st_ino, st_.st_size, st_.st_mtime_ns))
        dims = tuple((model or {}).get(k) for k in ("dim", "colbert_dim", "vocab_size"))
        return (os.path.realpath(self.folder), self.count, dims, tuple(ids))

    def _file(self, name: str) -> Path:
        return safe_child(self.folder, name, "segment file", want="file")

    def verify(self) -> None:
        """Recompute every file's sha256 against the manifest (reads everything)."""
        for name, info in self.files.items():
            if sha256_file(self._file(name)) != info["sha256"]:
                raise IndexFormatError(f"index file corrupted: {self.folder / name} (checksum mismatch)")

    # ------------------------------------------------------------------ rows <-> docnos

    @cached_property
    def docnos(self) -> np.ndarray | None:
        """(count,) int64 docno of each row, or None when row r is docno ``base + r``."""
        return None

    def docno_of(self, rows) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        return rows + self.base if self.docnos is None else np.asarray(self.docnos)[rows]

    def rows_of(self, docnos) -> np.ndarray:
        """Row of each docno (which must lie in this segment's span); -1 where it has none."""
        docnos = np.asarray(docnos, np.int64)
        if self.docnos is None:
            r = docnos - self.base
            return np.where((r >= 0) & (r < self.count), r, -1)
        d = np.asarray(self.docnos)
        r = np.searchsorted(d, docnos)
        ok = r < self.count
        ok[ok] = d[r[ok]] == docnos[ok]
        return np.where(ok, r, -1)

    def rows_mask(self, by_docno: np.ndarray | None) -> np.ndarray | None:
        """A mask over docnos (or None) as a mask over this segment's rows."""
        if by_docno is None:
            return None
        if self.docnos is None:
            return by_docno[self.base:self.base + self.count]
        return by_docno[np.asarray(self.docnos)]

    # ------------------------------------------------------------------ stores

    @cached_property
    def store(self):
        """The document store (ids, texts, metadata by row)."""
        return LegacyDocstore.open(self.folder, self.count, deep=True)

    def docs_of(self, rows) -> tuple[list[str], list[str], list[dict]]:
        """``(ids, texts, metadata)`` of ``rows``."""
        return self.store.chunk(np.asarray(rows, np.int64))

    @cached_property
    def columns(self):
        """Typed metadata columns (format 2); format-1 segments filter from the docstore."""
        return None

    @cached_property
    def n_tokens(self) -> np.ndarray:
        return load_npy(self._file("n_tokens.npy"), dtype=np.int64, shape=(self.count,))

    @cached_property
    def dense_store(self) -> DenseStore | None:
        return None

    @cached_property
    def dense_index(self) -> DenseIndex | None:
        """The FAISS index of a non-Flat factory, or a GPU copy of a float32 Flat store."""
        if self.dense_store is None:
            return None
        factory = self.dense_factory or "Flat"
        if factory != "Flat":
            self._file("dense.faiss")  # a plain file, not a link
            return DenseIndex.load(self.folder, self.dense_store, factory)
        if gpu_available() and self.dense_storage == "fp32":
            return DenseIndex.load(self.folder, self.dense_store, "Flat")
        return None

    def dense_search(self, q: np.ndarray, k: int, allowed_rows: np.ndarray | None):
        """Top-k rows by inner product: FAISS for ANN factories (and GPU; small allowed sets and
        short answers fall back to the exact scan, hits are rescored from the stored vectors,
        :meth:`DenseIndex.search`), else exact over the stored vectors (memory-mapped, never
        copied)."""
        di = self.dense_index
        if di is not None:
            return di.search(q, k, allowed_rows)
        return self.dense_store.search(q, k, allowed_rows)

    def dense_rows(self, rows) -> np.ndarray:
        return self.dense_store.rows(np.asarray(rows, np.int64))

    @cached_property
    def sparse(self) -> SparsePostings | None:
        return None

    @cached_property
    def colbert(self):
        return None

    @cached_property
    def bm25(self) -> Bm25Postings | None:
        return None

    def filter_mask(self, flt: dict) -> np.ndarray:
        """(count,) bool: the rows whose metadata passes ``flt`` (vectorised on format 2)."""
        from .filters import mask_reference

        if self.columns is None:
            return mask_reference(self.store.metadata(), flt, self.count)
        return self.columns.mask(flt, self.store.metadata)

    def bytes_of(self, prefix: str) -> int:
        return sum(i["bytes"] for n, i in self.files.items() if n.startswith(prefix))
