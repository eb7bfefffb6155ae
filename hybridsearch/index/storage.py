"""Durable file primitives and the versioned manifest.

Every write goes to a temporary name, is fsynced, and is renamed into place; the manifest is
switched last, so a process killed at any moment leaves the previous manifest -- and everything it
names -- intact. The full list of files an index writes is in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from pathlib import Path

import numpy as np

from .._version import __version__
from ..errors import IndexFormatError

FORMAT_NAME = "hybridsearch-index"
# 2: docstore + typed columns, dense storage kinds, coded ColBERT, merged segments;
# 3: BM25 postings per segment (channels.bm25_store "postings") instead of a tantivy folder
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
LOCK = "LOCK"
DOCS_FILE = "docs.msgpack"
FAISS_FILE = "dense.faiss"
SPARSE_FILES = ("sparse_indptr.npy", "sparse_docs.npy", "sparse_weights.npy", "sparse_term_max.npy",
                "sparse_n_docs.npy")
COLBERT_FILES = ("colbert_vectors.npy", "colbert_offsets.npy")
# Format 2 segments: the row-addressable docstore and the typed metadata columns
# (index/docstore.py, index/columns.py), docnos of merged segments, dense storage kinds
# (retrievers/dense_store.py) and coded ColBERT (retrievers/multivector.py).
DOCSTORE_FILES = ("docs.bin", "docs_offsets.npy", "ids.bin", "ids_offsets.npy", "ids_hash.npy", "ids_order.npy")
COLUMNS_FILE = "columns.json"
COLUMN_FILE = re.compile(r"col-[0-9]{4}-[a-z0-9_]{1,16}\.(npy|bin)")
DOCNOS_FILE = "docnos.npy"
DENSE_FILES = {"fp32": ("dense.npy",), "fp16": ("dense.npy",), "sq8": ("dense_sq8.npy", "dense_sq8_params.npy")}
DENSE_STORAGES = tuple(DENSE_FILES)
COLBERT_CODE_FILES = ("colbert_codes.npy", "colbert_residuals.npy", "colbert_offsets.npy")
# Format 3: BM25 postings of the segment (retrievers/bm25_postings.py), when channels.bm25_store
# is "postings".
BM25_FILES = ("bm25_terms.bin", "bm25_term_offsets.npy", "bm25_term_hash.npy", "bm25_indptr.npy",
              "bm25_docs.npy", "bm25_tf.npy", "bm25_impact.npy", "bm25_lengths.npy",
              "bm25_term_bound.npy")
BM25_STORES = ("tantivy", "postings")
# Every file a segment folder may hold; anything else named in a manifest is refused.
SEGMENT_FILES = frozenset((DOCS_FILE, "n_tokens.npy", "dense.npy", FAISS_FILE, COLUMNS_FILE, DOCNOS_FILE)
                          + SPARSE_FILES + COLBERT_FILES + DOCSTORE_FILES + COLBERT_CODE_FILES
                          + DENSE_FILES["sq8"] + BM25_FILES)
# The names a manifest may give, by kind: plain child names of the index folder, never a path.
NAME_PATTERNS = {
    "segment": re.compile(r"seg-[0-9]{6,}"),
    "deleted": re.compile(r"deleted-[0-9]{6,}\.npy"),
    "bm25": re.compile(r"bm25-[0-9]{6,}"),
    "codec": re.compile(r"codec-[0-9]{6,}"),
    "segment file": re.compile("|".join([re.escape(n) for n in sorted(SEGMENT_FILES)] + [COLUMN_FILE.pattern])),
    "manifest": re.compile(re.escape(MANIFEST)),
    "lock": re.compile(re.escape(LOCK)),
}
# Generous bounds on what a manifest may declare (far above any real model or segment).
MAX_DIM = 1 << 16
MAX_VOCAB = (1 << 31) - 1
MAX_SEGMENT_DOCS = (1 << 31) - 1  # sparse rows are int32
MAX_MANIFEST_BYTES = 256 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_new(path: Path) -> int:
    """Create ``path`` for writing without following a link planted there: whatever entry holds
    the name is unlinked first (the link, never its target), then the file is made O_EXCL."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


def write_bytes_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with os.fdopen(_open_new(tmp), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_durable(path: Path, obj) -> None:
    write_bytes_durable(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def save_npy(path: Path, arr: np.ndarray) -> None:
    """``np.save`` (never pickled) + fsync; the caller renames the containing folder into place."""
    with os.fdopen(_open_new(Path(path)), "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------- untrusted folders


def check_name(name, kind: str, where: str | os.PathLike = "") -> str:
    """``name`` if it is a plain child name of kind ``kind`` (see NAME_PATTERNS), else
    IndexFormatError: never ``..``, a separator, an absolute path or anything off-pattern."""
    pattern = NAME_PATTERNS[kind]
    if (not isinstance(name, str) or not name or len(name) > 255 or name in (".", "..")
            or "/" in name or "\\" in name or "\0" in name or os.path.isabs(name)
            or not pattern.fullmatch(name)):
        raise IndexFormatError(f"{where or 'manifest'}: invalid {kind} name {name!r} "
                               f"(must be a plain name matching {pattern.pattern})")
    return name


def safe_child(folder: str | os.PathLike, name, kind: str, *, want: str | None = None,
               must_exist: bool = False) -> Path:
    """``folder / name``, refusing anything that could lead outside ``folder``.

    ``name`` must be a plain child name of ``kind`` (:func:`check_name`); the entry must not be
    a symbolic link and must resolve inside ``folder``. ``want`` is ``"file"`` or ``"dir"`` to
    require a regular file or a directory (which then must exist); with neither, a missing
    entry is returned as is (for writers) unless ``must_exist``.
    """
    folder = Path(folder)
    check_name(name, kind, folder)
    p = folder / name
    try:
        st_ = os.lstat(p)
    except FileNotFoundError:
        if want or must_exist:
            what = {"file": "index file", "dir": f"{kind} folder"}.get(want, kind)
            raise IndexFormatError(f"{what} missing: {p}") from None
        return p
    except OSError as e:
        raise IndexFormatError(f"cannot inspect {p}: {e}") from e
    if stat.S_ISLNK(st_.st_mode):
        raise IndexFormatError(f"{p} is a symbolic link; an index folder may not contain links")
    if os.path.dirname(os.path.realpath(p)) != os.path.realpath(folder):
        raise IndexFormatError(f"{p} resolves outside {folder}")
    if want == "file" and not stat.S_ISREG(st_.st_mode):
        raise IndexFormatError(f"index file corrupted: {p} is not a regular file")
    if want == "dir" and not stat.S_ISDIR(st_.st_mode):
        raise IndexFormatError(f"index folder corrupted: {p} is not a folder")
    return p


def check_no_links(folder: str | os.PathLike) -> None:
    """IndexFormatError if any direct entry of ``folder`` is a symbolic link (one scandir)."""
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.is_symlink():
                    raise IndexFormatError(
                        f"{Path(folder) / e.name} is a symbolic link; an index folder may not contain links")
    except OSError as e:
        raise IndexFormatError(f"cannot list {folder}: {e}") from e


def remove_entry(folder: str | os.PathLike, name: str) -> None:
    """Delete the direct entry ``folder/name`` (orphan clean-up): a link or file is unlinked
    (never its target), a real folder removed recursively. Missing is fine."""
    import shutil

    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise ValueError(f"not a plain name: {name!r}")
    p = Path(folder) / name
    try:
        st_ = os.lstat(p)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st_.st_mode):
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def _open_nofollow(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise IndexFormatError(f"index file missing: {path}") from None
    except OSError as e:  # ELOOP: a link
        raise IndexFormatError(f"index file {path} cannot be opened ({e}); links are refused") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IndexFormatError(f"index file corrupted: {path} is not a regular file")
    return os.fdopen(fd, "rb")


def _read_header(f, path: Path) -> tuple[tuple, np.dtype, int]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as e:
        raise IndexFormatError(f"index file corrupted: {path} ({type(e).__name__}: {e})") from e
    if fortran and len(shape) > 1:
        raise IndexFormatError(f"index file corrupted: {path} is Fortran-ordered")
    if dtype.hasobject or dtype.itemsize == 0:
        raise IndexFormatError(f"index file corrupted: {path} has dtype {dtype}")
    return tuple(shape), dtype, f.tell()


def read_npy_header(path: str | os.PathLike, dtype=None, shape=None) -> tuple[tuple, np.dtype, int]:
    """``(shape, dtype, data offset)`` of a ``.npy`` file, reading only its header.

    Checks, before anything is allocated from it: a regular file (no link), a parseable header,
    no object dtype, ``dtype`` (exact, byte order included) and ``shape`` when given (``None``
    entries match any length), and a file size equal to header + data.
    """
    path = Path(path)
    with _open_nofollow(path) as f:
        got_shape, got_dtype, offset = _read_header(f, path)
        size = os.fstat(f.fileno()).st_size
    _check_header(path, got_shape, got_dtype, dtype, shape)
    want = offset + math.prod(got_shape) * got_dtype.itemsize
    if size != want:
        raise IndexFormatError(f"index file corrupted: {path} has {size} bytes, its header "
                               f"{got_dtype} {got_shape} needs {want}")
    return got_shape, got_dtype, offset


def _check_header(path, got_shape, got_dtype, dtype, shape) -> None:
    if dtype is not None and got_dtype != np.dtype(dtype):
        raise IndexFormatError(f"index file corrupted: {path} has dtype {got_dtype}, "
                               f"expected {np.dtype(dtype)}")
    if shape is not None and (len(got_shape) != len(shape) or any(
            w is not None and g != w for g, w in zip(got_shape, shape))):
        want = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ("," if len(shape) == 1 else "") + ")"
        raise IndexFormatError(f"index file corrupted: {path} has shape {got_shape}, expected {want}")


def load_npy(path: Path, mmap: bool = True, dtype=None, shape=None) -> np.ndarray:
    """A checked ``.npy`` (see :func:`read_npy_header`): memory-mapped read-only, or read.

    Nothing is allocated before the header has been checked against the file's size, and the
    file is opened without following links.
    """
    path = Path(path)
    got_shape, got_dtype, offset = read_npy_header(path, dtype, shape)
    with _open_nofollow(path) as f:
        try:
            if mmap and math.prod(got_shape):
                return np.memmap(f, dtype=got_dtype, mode="r", offset=offset, shape=got_shape)
            f.seek(offset)
            n = math.prod(got_shape)
            a = np.fromfile(f, dtype=got_dtype, count=n) if n else np.zeros(0, got_dtype)
        except Exception as e:
            raise IndexFormatError(f"index file corrupted: {path} ({type(e).__name__}: {e})") from e
    if a.size != math.prod(got_shape):
        raise IndexFormatError(f"index file corrupted: {path} is shorter than its header says")
    return a.reshape(got_shape)


def npy_chunks(path: str | os.PathLike, dtype, chunk: int = 1 << 22):
    """Yield a 1-d ``.npy`` file's values ``chunk`` at a time, read (not mapped): one pass over
    the file that leaves no mapped pages behind."""
    path = Path(path)
    shape, got, offset = read_npy_header(path, dtype, (None,))
    with _open_nofollow(path) as f:
        f.seek(offset)
        left = shape[0]
        while left:
            a = np.fromfile(f, dtype=got, count=min(chunk, left))
            if a.size == 0:
                raise IndexFormatError(f"index file corrupted: {path} is shorter than its header says")
            left -= a.size
            yield a


def load_deleted(folder: str | os.PathLike, name: str, next_docno: int, count: int | None = None) -> np.ndarray:
    """The tombstones file ``folder/name`` (``deleted-NNNNNN.npy``), checked: a plain child and
    no link, ``(k,)`` int64 with ``k <= next_docno`` (and ``== count`` when given) before it is
    read, then strictly increasing docnos in ``[0, next_docno)``."""
    p = safe_child(folder, name, "deleted", want="file")
    shape, _, _ = read_npy_header(p, np.int64, (None,))
    if shape[0] > next_docno or (count is not None and shape[0] != count):
        raise IndexFormatError(f"index file corrupted: {p} holds {shape[0]} tombstones, the manifest "
                               f"says {count if count is not None else f'at most {next_docno}'}")
    dead = load_npy(p, mmap=False, dtype=np.int64, shape=(None,))
    if dead.size and (dead[0] < 0 or dead[-1] >= next_docno or not bool((dead[1:] > dead[:-1]).all())):
        raise IndexFormatError(f"index file corrupted: {p} must hold strictly increasing docnos "
                               f"in [0, {next_docno})")
    return dead


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sample(h, name: str, p: Path) -> None:
    size = p.stat().st_size
    with open(p, "rb") as f:
        h.update(name.encode() + str(size).encode() + f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read())


def model_fingerprint(model_dir: str | Path) -> str:
    """Hash of a model's config, head files, tokenizer and a sample of its weights.

    Cheap enough for every open (each weight file contributes its size and first/last MiB).
    Sharded checkpoints (``model-0000x-of-0000y.safetensors``, ``pytorch_model-0000x-of-0000y.bin``
    and their ``*.index.json``) add every shard; a folder with one ``model.safetensors`` or
    ``pytorch_model.bin`` and no shards hashes exactly as before shards were covered, so existing
    indexes keep opening.
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
            _sample(h, name, p)
            break
    shards = sorted({p.name for pat in ("model-*.safetensors", "pytorch_model-*.bin") for p in d.glob(pat)
                     if p.is_file()})
    indexes = [n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json") if (d / n).is_file()]
    if shards or indexes:
        h.update(b"\0shards\0")
        for name in indexes:
            h.update(name.encode() + b"\0" + (d / name).read_bytes())
        for name in shards:
            _sample(h, name, d / name)
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


def _int(v, what: str, lo: int = 0, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise IndexFormatError(f"{what} must be an integer {rng}, got {v!r}")
    return v


def _get(d: dict, key: str, types, what: str):
    v = d.get(key) if isinstance(d, dict) else None
    if not isinstance(v, types):
        raise IndexFormatError(f"{what}: {key!r} must be {getattr(types, '__name__', types)}, got {v!r}"[:300])
    return v


def segment_ranges(segments: list) -> list[tuple[int, int]]:
    """``(first docno, span)`` of each segment entry. Format-1 entries hold ``count`` docnos
    right after the previous entry's; format-2 entries say ``first`` and ``span`` (a merged
    segment may have dropped deleted rows: ``span >= count``, its rows' docnos in docnos.npy)."""
    out, end = [], 0
    for e in segments:
        first = e.get("first", end)
        span = e.get("span", e.get("count"))
        out.append((first, span))
        end = first + span
    return out


def expected_segment_files(entry: dict, channels: dict | None = None) -> set[str]:
    """The exact set of fixed-name files a segment entry must list (typed metadata columns,
    ``col-NNNN-*``, come on top, named by ``columns.json``).

    Format 1: docs.msgpack, n_tokens and dense.npy always. Format 2: the docstore files and
    columns.json, docnos.npy iff the entry says ``docnos`` (a merged segment that dropped
    rows: row r holds docnos[r], else first + r), the dense files
    of its storage kind. Both: ``dense.faiss`` iff its factory is not Flat, the sparse and
    ColBERT files (float16 or codes) iff the channel is on, the BM25 postings iff the BM25
    channel is on and stored as postings (without ``channels``: iff any of them is listed)."""
    files = entry.get("files") or {}
    if entry.get("format", 1) == 1:
        want = {DOCS_FILE, "n_tokens.npy", "dense.npy"}
        colbert_files = COLBERT_FILES
    else:
        want = set(DOCSTORE_FILES) | {COLUMNS_FILE, "n_tokens.npy"}
        want.update(DENSE_FILES.get(entry.get("dense_storage"), ()))
        if entry.get("docnos") is True:
            want.add(DOCNOS_FILE)
        colbert_files = COLBERT_CODE_FILES if entry.get("colbert") == "codes" else COLBERT_FILES
    if entry.get("dense_factory") not in (None, "Flat"):
        want.add(FAISS_FILE)
    for ch, group in (("sparse", SPARSE_FILES), ("colbert", colbert_files), ("bm25", BM25_FILES)):
        if channels is None:
            on = any(n in files for n in group)
        elif ch == "bm25":
            on = bm25_postings(channels)
        else:
            on = channels[ch]
        if on:
            want.update(group)
    return want


def bm25_postings(channels: dict) -> bool:
    """Whether BM25 is stored as postings in every segment (format 3), not in a tantivy folder."""
    return bool(channels.get("bm25")) and channels.get("bm25_store", "tantivy") == "postings"


def check_segment_files(root: str | os.PathLike, entry: dict, model: dict | None = None,
                        channels: dict | None = None) -> dict[str, tuple]:
    """Check one segment entry against its folder without reading any data: the folder is a
    plain child (no link), it lists exactly the expected files (:func:`expected_segment_files`,
    plus column files), each a regular file (no link) of the recorded size, and every ``.npy``
    header of a fixed-name file has the dtype and shape the entry's ``count`` and the ``model``
    dims (dim, colbert_dim, vocab_size) imply. Returns ``{file name: (shape, dtype)}`` of those
    ``.npy`` files."""
    root = Path(root)
    folder = safe_child(root, entry.get("name"), "segment", want="dir")
    n = _int(entry.get("count"), f"{root / MANIFEST}: segment {folder.name} count", 0, MAX_SEGMENT_DOCS)
    files = entry.get("files")
    if not isinstance(files, dict):
        raise IndexFormatError(f"{root / MANIFEST}: segment {folder.name} has no file list")
    want = expected_segment_files(entry, channels)
    v2 = entry.get("format", 1) == 2
    extra_ok = {f for f in files if v2 and COLUMN_FILE.fullmatch(f)}
    if set(files) - extra_ok != want:
        missing, extra = sorted(want - set(files)), sorted(set(files) - want - extra_ok)
        raise IndexFormatError(f"{root / MANIFEST}: segment {folder.name} lists the wrong files"
                               + (f" (missing: {', '.join(missing)})" if missing else "")
                               + (f" (unexpected: {', '.join(map(repr, extra))})" if extra else ""))
    for name, info in files.items():
        p = safe_child(folder, name, "segment file", want="file")
        if not isinstance(info, dict):
            raise IndexFormatError(f"{root / MANIFEST}: segment {folder.name} file {name}: bad record")
        _int(info.get("bytes"), f"{root / MANIFEST}: segment {folder.name} file {name} bytes")
        size = os.lstat(p).st_size
        if size != info["bytes"]:
            raise IndexFormatError(f"index file corrupted: {p} has {size} bytes, the manifest says {info['bytes']}")
    if not v2 and files[DOCS_FILE]["bytes"] < 3 * n:  # each document is at least 3 msgpack bytes
        raise IndexFormatError(f"index file corrupted: {folder / DOCS_FILE} is too small for {n} documents")
    model = model or {}
    dim, cdim, vocab = model.get("dim"), model.get("colbert_dim"), model.get("vocab_size")
    dense_dtype = np.float16 if entry.get("dense_storage") == "fp16" else np.float32
    shapes = {"n_tokens.npy": (np.int64, (n,)), "dense.npy": (dense_dtype, (n, dim)),
              "dense_sq8.npy": (np.uint8, (n, dim)), "dense_sq8_params.npy": (np.float32, (2, dim)),
              DOCNOS_FILE: (np.int64, (n,)),
              "docs_offsets.npy": (np.int64, (n + 1,)), "ids_offsets.npy": (np.int64, (n + 1,)),
              "ids_hash.npy": (np.uint64, (n,)), "ids_order.npy": (np.int64, (n,)),
              "sparse_indptr.npy": (np.int64, (None if vocab is None else vocab + 1,)),
              "sparse_docs.npy": (np.int32, (None,)), "sparse_weights.npy": (np.float32, (None,)),
              "sparse_term_max.npy": (np.float32, (vocab,)), "sparse_n_docs.npy": (np.int64, ()),
              "colbert_vectors.npy": (np.float16, (None, cdim)), "colbert_offsets.npy": (np.int64, (n + 1,)),
              "colbert_codes.npy": (np.uint16, (None,)), "colbert_residuals.npy": (np.uint8, (None, None)),
              "bm25_term_offsets.npy": (np.int64, (None,)), "bm25_term_hash.npy": (np.uint64, (None,)),
              "bm25_indptr.npy": (np.int64, (None,)), "bm25_docs.npy": (np.int32, (None,)),
              "bm25_tf.npy": (np.int32, (None,)), "bm25_impact.npy": (np.uint16, (None,)),
              "bm25_lengths.npy": (np.int32, (n,)), "bm25_term_bound.npy": (np.int32, (None, 2))}
    out = {}
    for name in files:
        if name in shapes:
            dtype, shape = shapes[name]
            shape_, dtype_, _ = read_npy_header(folder / name, dtype, shape)
            out[name] = (shape_, dtype_)
    if "sparse_indptr.npy" in out:
        v1, nnz = out["sparse_indptr.npy"][0][0], out["sparse_docs.npy"][0][0]
        if v1 < 1 or out["sparse_term_max.npy"][0] != (v1 - 1,) or out["sparse_weights.npy"][0] != (nnz,):
            raise IndexFormatError(f"sparse files under {folder} are inconsistent "
                                   f"(indptr, term_max, docs and weights lengths disagree)")
    if "colbert_codes.npy" in out and out["colbert_residuals.npy"][0][0] != out["colbert_codes.npy"][0][0]:
        raise IndexFormatError(f"ColBERT files under {folder} are inconsistent (codes and residuals "
                               "hold different numbers of tokens)")
    return out


def max_holes(rows: int) -> int:
    """Most docnos without a row (dropped by merges) an index may have: readers allocate one
    byte per docno. Writers renumber (compact) at half of this."""
    return 3 * rows + (1 << 20)


def _check_segment_entry(e: dict, name: str, where, model: dict) -> None:
    """Format-2 fields of a segment entry (types and ranges; the files are checked later)."""
    fmt = e.get("format", 1)
    if fmt not in (1, 2) or isinstance(fmt, bool):
        raise IndexFormatError(f"{where}: segment {name} has an unknown format {fmt!r}")
    if fmt == 1:
        for key in ("first", "span", "dense_storage", "colbert", "colbert_codec", "docnos"):
            if key in e:
                raise IndexFormatError(f"{where}: format-1 segment {name} must not have {key!r}")
        return
    _int(e.get("first"), f"{where}: segment {name} first")
    span = _int(e.get("span"), f"{where}: segment {name} span", 0, 1 << 62)
    if span < e["count"]:
        raise IndexFormatError(f"{where}: segment {name} holds {e['count']} rows in a span of {span} docnos")
    if not isinstance(e.get("docnos", False), bool):
        raise IndexFormatError(f"{where}: segment {name} docnos must be a boolean")
    if e.get("dense_storage") not in DENSE_STORAGES:
        raise IndexFormatError(f"{where}: segment {name} dense_storage must be one of {DENSE_STORAGES}")
    cb = e.get("colbert")
    if cb not in (None, "fp16", "codes"):
        raise IndexFormatError(f"{where}: segment {name} colbert must be null, 'fp16' or 'codes'")
    if cb == "codes":
        check_name(e.get("colbert_codec"), "codec", where)
    elif "colbert_codec" in e:
        raise IndexFormatError(f"{where}: segment {name} names a ColBERT codec without coded vectors")


def validate_manifest(m, folder: str | os.PathLike) -> dict:
    """Check a manifest read from ``folder`` as untrusted data; returns it or raises
    IndexFormatError naming the file.

    Types of every field; every name it gives is a plain child name of its kind (``seg-NNNNNN``,
    ``deleted-NNNNNN.npy``, ``bm25-NNNNNN``, known segment file names), never a path; counts are
    non-negative and add up (segments to ``next_docno``, documents + deleted to ``next_docno``);
    declared sizes can hold the declared counts; then, on disk, without reading data: no entry
    of the folder is a link, every segment passes :func:`check_segment_files` (sizes and
    ``.npy`` headers against the counts and model dims), the deletion file's header holds
    ``counts.deleted`` int64 docnos, the BM25 folder is a real folder. O(segments) stats and
    header reads: cheap enough for every open and reload.
    """
    folder = Path(folder)
    where = folder / MANIFEST
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise IndexFormatError(f"{where} is not a hybridsearch manifest")
    v = m.get("format_version")
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise IndexFormatError(f"{where}: invalid format_version {v!r}")
    if v > FORMAT_VERSION:
        raise IndexFormatError(
            f"{folder} was written in index format version {v} (by hybridsearch "
            f"{m.get('library_version', '?')}); this hybridsearch {__version__} reads up to version "
            f"{FORMAT_VERSION}. Upgrade hybridsearch to open it."
        )
    _get(m, "library_version", str, str(where))
    _int(m.get("generation"), f"{where}: generation")
    model = _get(m, "model", dict, str(where))
    for key in ("name", "fingerprint", "pooling"):
        _get(model, key, str, f"{where}: model")
    _int(model.get("dim"), f"{where}: model.dim", 1, MAX_DIM)
    _int(model.get("colbert_dim"), f"{where}: model.colbert_dim", 0, MAX_DIM)
    _int(model.get("vocab_size"), f"{where}: model.vocab_size", 0, MAX_VOCAB)
    outputs = _get(model, "outputs", list, f"{where}: model")
    if not all(o in ("dense", "sparse", "colbert") for o in outputs):
        raise IndexFormatError(f"{where}: model.outputs {outputs!r} holds an unknown output"[:300])
    channels = _get(m, "channels", dict, str(where))
    _get(_get(channels, "dense", dict, f"{where}: channels"), "factory", str, f"{where}: channels.dense")
    for ch in ("sparse", "colbert", "bm25"):
        _get(channels, ch, bool, f"{where}: channels")
    store = channels.get("bm25_store", "tantivy")
    if store not in BM25_STORES or (store == "postings" and v < 3):
        raise IndexFormatError(f"{where}: channels.bm25_store must be one of {BM25_STORES} "
                               f"(postings from format version 3), got {store!r}"[:300])
    if channels["sparse"] and model["vocab_size"] < 1:
        raise IndexFormatError(f"{where}: a sparse channel needs model.vocab_size >= 1")
    if channels["colbert"] and model["colbert_dim"] < 1:
        raise IndexFormatError(f"{where}: a ColBERT channel needs model.colbert_dim >= 1")
    storage = channels["dense"].get("storage", "fp32")
    if storage not in DENSE_STORAGES:
        raise IndexFormatError(f"{where}: channels.dense.storage must be one of {DENSE_STORAGES}")
    codec = channels.get("colbert_codec")
    if codec is not None:
        _get(codec, "spec", str, f"{where}: channels.colbert_codec")
        _int(codec.get("train_tokens"), f"{where}: channels.colbert_codec.train_tokens", 1, 1 << 40)
        if not isinstance(codec.get("train", True), bool):
            raise IndexFormatError(f"{where}: channels.colbert_codec.train must be true or false")
        if codec.get("codebook") is not None:
            check_name(codec["codebook"], "codec", where)
    segments = _get(m, "segments", list, str(where))
    next_docno = _int(m.get("next_docno"), f"{where}: next_docno", 0, 1 << 62)
    rows, end, names = 0, 0, set()
    for i, e in enumerate(segments):
        if not isinstance(e, dict):
            raise IndexFormatError(f"{where}: segment {i} is not an object")
        name = check_name(e.get("name"), "segment", where)
        if name in names:
            raise IndexFormatError(f"{where}: segment {name} is listed twice")
        names.add(name)
        n = _int(e.get("count"), f"{where}: segment {name} count", 0, MAX_SEGMENT_DOCS)
        _check_segment_entry(e, name, where, model)
        first, span = e.get("first", end), e.get("span", n)
        if first != end:
            raise IndexFormatError(f"{where}: segment {name} starts at docno {first}, not where the "
                                   f"previous one ends ({end})")
        end = first + span
        df = e.get("dense_factory")
        if df is not None and not isinstance(df, str):
            raise IndexFormatError(f"{where}: segment {name} dense_factory must be a string or null")
        files = _get(e, "files", dict, f"{where}: segment {name}")
        for fname, info in files.items():
            check_name(fname, "segment file", f"{where}: segment {name}")
            if not isinstance(info, dict) or not isinstance(info.get("sha256"), str) \
                    or not _SHA256.fullmatch(info["sha256"]):
                raise IndexFormatError(f"{where}: segment {name} file {fname}: bad size/sha256 record")
            _int(info.get("bytes"), f"{where}: segment {name} file {fname} bytes")
        # Declared sizes must be able to hold the declared rows (nothing read yet).
        width = {"fp16": 2, "sq8": 1}.get(e.get("dense_storage"), 4)
        need = {"n_tokens.npy": 8 * n, "dense.npy": width * n * model["dim"], "dense_sq8.npy": n * model["dim"],
                DOCS_FILE: 3 * n, "colbert_offsets.npy": 8 * (n + 1), "docs_offsets.npy": 8 * (n + 1),
                "ids_offsets.npy": 8 * (n + 1), "ids_hash.npy": 8 * n, "ids_order.npy": 8 * n,
                DOCNOS_FILE: 8 * n, "bm25_lengths.npy": 4 * n}
        for fname, b in need.items():
            if fname in files and files[fname]["bytes"] < b:
                raise IndexFormatError(f"{where}: segment {name} declares {n} documents, but its "
                                       f"{fname} has only {files[fname]['bytes']} bytes")
        rows += n
    if end != next_docno:
        raise IndexFormatError(f"{where}: segments cover docnos up to {end}, but next_docno is {next_docno}")
    if next_docno - rows > max_holes(rows):
        raise IndexFormatError(f"{where}: {next_docno - rows} docnos without a row for {rows} rows "
                               f"(at most {max_holes(rows)}; a writer renumbers before that)")
    deleted = m.get("deleted")
    if deleted is not None:
        check_name(deleted, "deleted", where)
    bm25 = m.get("bm25")
    if bm25 is not None:
        check_name(bm25, "bm25", where)
    if (channels["bm25"] and not bm25_postings(channels)) != (bm25 is not None):
        raise IndexFormatError(f"{where}: channels.bm25 is {channels['bm25']} (stored in "
                               f"{channels.get('bm25_store', 'tantivy')}) but bm25 is {bm25!r}")
    if bm25_postings(channels) and any(e.get("format", 1) != 2 for e in segments):
        raise IndexFormatError(f"{where}: BM25 postings need format-2 segments")
    counts = _get(m, "counts", dict, str(where))
    for key in ("documents", "deleted", "tokens"):
        _int(counts.get(key), f"{where}: counts.{key}")
    if counts["documents"] + counts["deleted"] != rows or (deleted is None and counts["deleted"]):
        raise IndexFormatError(f"{where}: counts {counts['documents']} documents + {counts['deleted']} "
                               f"deleted do not match the segments' {rows} rows / the deletion file")
    # On disk: headers and sizes only.
    check_no_links(folder)
    for e in segments:
        check_segment_files(folder, e, model, channels)
    if deleted is not None:
        p = safe_child(folder, deleted, "deleted", want="file")
        read_npy_header(p, np.int64, (counts["deleted"],))
    if bm25 is not None:
        safe_child(folder, bm25, "bm25", want="dir")
    if codec is not None and codec.get("codebook") is not None:
        safe_child(folder, codec["codebook"], "codec", want="dir")
    for e in segments:
        if e.get("colbert") == "codes" and (codec is None or e["colbert_codec"] != codec.get("codebook")):
            raise IndexFormatError(f"{where}: segment {e['name']} is coded with {e['colbert_codec']}, "
                                   "which is not the index's ColBERT codebook")
    return m


def read_manifest(folder: Path) -> dict:
    """Read ``manifest.json`` and check it as untrusted data (:func:`validate_manifest`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IndexFormatError(f"index folder {folder} does not exist")
    path = folder / MANIFEST
    try:
        os.lstat(path)
    except FileNotFoundError:
        raise IndexFormatError(f"{folder} is not a hybridsearch index: {MANIFEST} is missing") from None
    with _open_nofollow(path) as f:
        if os.fstat(f.fileno()).st_size > MAX_MANIFEST_BYTES:
            raise IndexFormatError(f"{path} is corrupted: larger than {MAX_MANIFEST_BYTES} bytes")
        raw = f.read()
    try:
        m = json.loads(raw.decode())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise IndexFormatError(f"{path} is corrupted: {e}") from e
    return validate_manifest(m, folder)
