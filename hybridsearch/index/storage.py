"""Durable file primitives and the versioned manifest.

Every write goes to a temporary name, is fsynced, and is renamed into place; the manifest is
switched last, so a process killed at any moment leaves the previous manifest -- and everything it
names -- intact. The full list of files an index writes is in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .._version import __version__
from ..errors import IndexFormatError

FORMAT_NAME = "hybridsearch-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = "LOCK"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_durable(path: Path, obj) -> None:
    write_bytes_durable(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def save_npy(path: Path, arr: np.ndarray) -> None:
    """``np.save`` (never pickled) + fsync; the caller renames the containing folder into place."""
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    """``np.load`` with a clear error naming the file when it is missing or unreadable."""
    if not path.is_file():
        raise IndexFormatError(f"index file missing: {path}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as e:
        raise IndexFormatError(f"index file corrupted: {path} ({type(e).__name__}: {e})") from e


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(model_dir: str | Path) -> str:
    """Hash of a model's config, head files, tokenizer and a sample of its weights.

    Cheap enough for every open (the weights contribute their size and first/last MiB).
    """
    d = Path(model_dir)
    h = hashlib.sha256()
    for name in ("config.json", "sparse_linear.pt", "colbert_linear.pt", "tokenizer.json",
                 "1_Pooling/config.json"):
        p = d / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes())
    for name in ("model.safetensors", "pytorch_model.bin"):
        p = d / name
        if p.is_file():
            size = p.stat().st_size
            with open(p, "rb") as f:
                h.update(name.encode() + str(size).encode() + f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                h.update(f.read())
            break
    return h.hexdigest()[:32]


def new_manifest(model: dict, channels: dict) -> dict:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "generation": 0,
        "model": model,
        "channels": channels,
        "segments": [],
        "next_docno": 0,
        "deleted": None,
        "bm25": None,
        "counts": {"documents": 0, "deleted": 0, "tokens": 0},
    }


def read_manifest(folder: Path) -> dict:
    """Read and check ``manifest.json``: present, parseable, our format, a version we support."""
    if not folder.is_dir():
        raise IndexFormatError(f"index folder {folder} does not exist")
    path = folder / MANIFEST
    if not path.is_file():
        raise IndexFormatError(f"{folder} is not a hybridsearch index: {MANIFEST} is missing")
    try:
        m = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise IndexFormatError(f"{path} is corrupted: {e}") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise IndexFormatError(f"{path} is not a hybridsearch manifest")
    v = m.get("format_version")
    if not isinstance(v, int) or v < 1:
        raise IndexFormatError(f"{path}: invalid format_version {v!r}")
    if v > FORMAT_VERSION:
        raise IndexFormatError(
            f"{folder} was written in index format version {v} (by hybridsearch "
            f"{m.get('library_version', '?')}); this hybridsearch {__version__} reads up to version "
            f"{FORMAT_VERSION}. Upgrade hybridsearch to open it."
        )
    return m
