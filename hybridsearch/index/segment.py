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
import shutil
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
from .storage import fsync_dir, load_npy, save_npy, sha256_file

DOCS_FILE = "docs.msgpack"


def write_segment(folder: Path, ids: list[str], texts: list[str], metadata: list[dict],
                  enc: Encoded, dense_factory: str) -> dict:
    """Write a complete segment at ``folder`` (atomically); return its manifest entry."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
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
    def open(cls, root: Path, entry: dict, base: int) -> Segment:
        folder = root / entry["name"]
        if not folder.is_dir():
            raise IndexFormatError(f"segment folder missing: {folder}")
        for name, info in entry["files"].items():
            p = folder / name
            if not p.is_file():
                raise IndexFormatError(f"index file missing: {p}")
            if p.stat().st_size != info["bytes"]:
                raise IndexFormatError(
                    f"index file corrupted: {p} has {p.stat().st_size} bytes, the manifest says {info['bytes']}"
                )
        return cls(folder, base, int(entry["count"]), entry["files"], entry.get("dense_factory"))

    def verify(self) -> None:
        """Recompute every file's sha256 against the manifest (reads everything)."""
        for name, info in self.files.items():
            if sha256_file(self.folder / name) != info["sha256"]:
                raise IndexFormatError(f"index file corrupted: {self.folder / name} (checksum mismatch)")

    @cached_property
    def docs(self) -> dict:
        p = self.folder / DOCS_FILE
        try:
            d = msgpack.unpackb(p.read_bytes(), raw=False)
            assert len(d["ids"]) == len(d["texts"]) == len(d["metadata"]) == self.count
        except Exception as e:
            raise IndexFormatError(f"index file corrupted: {p} ({type(e).__name__})") from e
        return d

    @cached_property
    def n_tokens(self) -> np.ndarray:
        return load_npy(self.folder / "n_tokens.npy")

    @cached_property
    def dense(self) -> np.ndarray | None:
        return load_npy(self.folder / "dense.npy") if "dense.npy" in self.files else None

    @cached_property
    def dense_index(self) -> DenseIndex | None:
        if self.dense is None:
            return None
        return DenseIndex.load(self.folder, np.asarray(self.dense), self.dense_factory or "Flat")

    @cached_property
    def sparse(self) -> SparsePostings | None:
        if "sparse_indptr.npy" not in self.files:
            return None
        try:
            return SparsePostings.load(self.folder, "sparse", mmap=True)
        except (ValueError, OSError) as e:
            raise IndexFormatError(f"index files corrupted: {self.folder}/sparse_* ({e})") from e

    @cached_property
    def colbert(self) -> ColbertStore | None:
        if "colbert_vectors.npy" not in self.files:
            return None
        try:
            return ColbertStore.load(self.folder, "colbert", mmap=True)
        except (ValueError, OSError) as e:
            raise IndexFormatError(f"index files corrupted: {self.folder}/colbert_* ({e})") from e

    def bytes_of(self, prefix: str) -> int:
        return sum(i["bytes"] for n, i in self.files.items() if n.startswith(prefix))
