"""One immutable segment: a contiguous range of docnos with all their representations.

A segment folder ``seg-NNNNNN/`` holds (see docs/ARCHITECTURE.md for the full list):

* ``docs.msgpack``  -- ``{"ids": [...], "texts": [...], "metadata": [...]}`` in row order;
* ``n_tokens.npy``  -- (n,) int64 tokens per document;
* ``dense.npy``     -- (n, d) float32 L2-normalised vectors (+ ``dense.faiss`` unless Flat);
* ``sparse_*.npy``  -- the learned-sparse postings (models with a sparse head);
* ``colbert_*.npy`` -- float16 token vectors + offsets (models with a ColBERT head).

It is written under ``seg-NNNNNN.tmp``, every file fsynced, then renamed: a folder without
``.tmp`` is complete. It only becomes part of the index when a manifest names it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import msgpack
import numpy as np

from ..errors import IndexFormatError
from ..representations import Encoded
from ..retrievers.dense import DenseIndex
from ..retrievers.multivector import ColbertStore
from ..retrievers.sparse import SparsePostings
from .storage import (
    DOCS_FILE,
    check_segment_files,
    fsync_dir,
    load_npy,
    remove_entry,
    safe_child,
    save_npy,
    sha256_file,
)

# Segments whose data passed the O(file size) checks, by (folder, files' identity): segments are
# immutable, so a reopen (every commit reloads the state) repeats only the header checks.
_CHECKED: set = set()
_CHECKED_MAX = 65536
_CHECKED_LOCK = threading.Lock()


def _ext_hook(code, data):
    raise ValueError(f"msgpack extension type {code} is not allowed")


def write_segment(folder: Path, ids: list[str], texts: list[str], metadata: list[dict],
                  enc: Encoded, dense_factory: str) -> dict:
    """Write a complete segment at ``folder`` (atomically); return its manifest entry."""
    tmp = folder.with_name(folder.name + ".tmp")
    remove_entry(tmp.parent, tmp.name)  # a leftover (or a planted link: removed, not followed)
    tmp.mkdir(parents=True)
    with open(tmp / DOCS_FILE, "wb") as f:
        f.write(msgpack.packb({"ids": ids, "texts": texts, "metadata": metadata}, use_bin_type=True))
    save_npy(tmp / "n_tokens.npy", enc.n_tokens.astype(np.int64))
    factory = None
    if enc.dense is not None:
        save_npy(tmp / "dense.npy", enc.dense.astype(np.float32))
        di = DenseIndex.build(enc.dense, dense_factory)
        di.save(tmp)
        factory = di.factory
    if enc.sparse is not None:
        SparsePostings.from_csr(enc.sparse).save(tmp, "sparse")
    if enc.colbert is not None:
        ColbertStore.from_arrays(enc.colbert, enc.colbert_offsets).save(tmp, "colbert")
    files = {}
    for p in sorted(tmp.iterdir()):
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        files[p.name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    fsync_dir(tmp)
    os.replace(tmp, folder)
    fsync_dir(folder.parent)
    return {"name": folder.name, "count": len(ids), "dense_factory": factory, "files": files}


@dataclass
class Segment:
    """An opened segment. ``base`` is the docno of row 0; rows are ``docno - base``."""

    folder: Path
    base: int
    count: int
    files: dict
    dense_factory: str | None

    @classmethod
    def open(cls, root: Path, entry: dict, base: int, model: dict | None = None,
             channels: dict | None = None) -> Segment:
        """Open ``root / entry["name"]`` as untrusted data; IndexFormatError names the bad file.

        Every time (cheap): plain names, no links, exactly the expected files at their recorded
        sizes, ``.npy`` dtypes and shapes against the count (and ``model``'s dim / colbert_dim /
        vocab_size, and ``channels``, when given) -- :func:`storage.check_segment_files`.
        Once per process for a given set of files (O(file size) passes, cached): the sparse
        postings (doc ids in range, ascending per term, finite non-negative weights) and the
        ColBERT offsets. The sparse and ColBERT stores are opened (memory-mapped) here.
        """
        if not isinstance(entry, dict):
            raise IndexFormatError(f"{root}: segment entry is not an object")
        root = Path(root)
        check_segment_files(root, entry, model, channels)
        folder = safe_child(root, entry["name"], "segment", want="dir")
        seg = cls(folder, base, int(entry["count"]), entry["files"], entry.get("dense_factory"))
        key = seg._identity(model)
        with _CHECKED_LOCK:
            deep = key not in _CHECKED
        vocab = model.get("vocab_size") if model else None
        cdim = model.get("colbert_dim") if model else None
        if "sparse_indptr.npy" in seg.files:
            seg.__dict__["sparse"] = SparsePostings.load(folder, "sparse", mmap=True, vocab_size=vocab,
                                                         n_docs=seg.count, check_postings=deep)
        if "colbert_vectors.npy" in seg.files:
            seg.__dict__["colbert"] = ColbertStore.load(folder, "colbert", mmap=True, dim=cdim, n_docs=seg.count)
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

    @cached_property
    def docs(self) -> dict:
        """``{"ids": [str], "texts": [str], "metadata": [dict]}``, each of length ``count``."""
        p = self._file(DOCS_FILE)
        try:
            raw = p.read_bytes()
            # Every declared length is bounded by the buffer (a list or string cannot hold more
            # items than bytes); no extension types, map keys must be strings.
            n = len(raw)
            d = msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=_ext_hook,
                                max_str_len=n, max_bin_len=n, max_array_len=n, max_map_len=n,
                                max_ext_len=0)
        except Exception as e:
            raise IndexFormatError(f"index file corrupted: {p} ({type(e).__name__}: {e})"[:500]) from e
        if not isinstance(d, dict) or set(d) != {"ids", "texts", "metadata"}:
            raise IndexFormatError(f"index file corrupted: {p} is not a dict of ids, texts and metadata")
        for key, typ in (("ids", str), ("texts", str), ("metadata", dict)):
            col = d[key]
            if not isinstance(col, list) or len(col) != self.count:
                got = len(col) if isinstance(col, list) else type(col).__name__
                raise IndexFormatError(f"index file corrupted: {p}: {key} must be a list of "
                                       f"{self.count} entries, got {got}")
            if not all(type(x) is typ for x in col):
                raise IndexFormatError(f"index file corrupted: {p}: every entry of {key} must be "
                                       f"a {typ.__name__}")
        return d

    @cached_property
    def n_tokens(self) -> np.ndarray:
        return load_npy(self._file("n_tokens.npy"), dtype=np.int64, shape=(self.count,))

    @cached_property
    def dense(self) -> np.ndarray | None:
        if "dense.npy" not in self.files:
            return None
        return load_npy(self._file("dense.npy"), dtype=np.float32, shape=(self.count, None))

    @cached_property
    def dense_index(self) -> DenseIndex | None:
        if self.dense is None:
            return None
        factory = self.dense_factory or "Flat"
        if factory != "Flat" and "dense.faiss" in self.files:
            self._file("dense.faiss")  # a plain file, not a link
        return DenseIndex.load(self.folder, np.asarray(self.dense), factory)

    @cached_property
    def sparse(self) -> SparsePostings | None:
        if "sparse_indptr.npy" not in self.files:
            return None
        return SparsePostings.load(self.folder, "sparse", mmap=True, n_docs=self.count)

    @cached_property
    def colbert(self) -> ColbertStore | None:
        if "colbert_vectors.npy" not in self.files:
            return None
        return ColbertStore.load(self.folder, "colbert", mmap=True, n_docs=self.count)

    def bytes_of(self, prefix: str) -> int:
        return sum(i["bytes"] for n, i in self.files.items() if n.startswith(prefix))
