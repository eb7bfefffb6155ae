"""Many processes, one index folder: the writer lock, reader leases, and garbage collection.

* **Writer lock.** Every write holds an exclusive ``fcntl`` lock on ``LOCK`` (opened with
  ``O_NOFOLLOW``). A second writer waits up to its timeout, then fails with
  :class:`IndexLockedError` naming the lock file and the pid written into it by the holder.
* **Reader leases.** Before the manifest of generation G is switched in, the writer writes
  ``lease-G.json``: the names of every file and folder generation G uses. A process that opens a
  snapshot of generation G holds a shared lock on that file for as long as the snapshot is in use
  (the lock is released when the snapshot object is garbage-collected, i.e. when the last search
  that read it has returned).
* **Collection.** A writer removes an older generation's files only when it can take an exclusive
  lock on that generation's lease without waiting, i.e. when no process holds a snapshot of it.
  Everything the current manifest or a held lease names is kept; other ``seg-*``, ``deleted-*``,
  ``bm25-*``, ``lease-*`` and ``*.tmp`` entries are left-overs of finished generations or of a
  writer that died before its manifest switch, and are removed. Nothing outside the folder is
  ever touched: entries are removed by name, and a symlink is unlinked, never followed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
import time
from pathlib import Path

from ..errors import IndexFormatError, IndexLockedError
from .storage import LOCK, MANIFEST, remove_entry, write_json_durable

LEASE_RE = re.compile(r"lease-(\d{6,})\.json\Z")
# Entries a writer may create; anything else in the folder is never touched.
_OWNED_RE = re.compile(r"(seg-\d{6,}|deleted-\d{6,}\.npy|bm25-\d{6,}|codec-\d{6,}|lease-\d{6,}\.json)(\.tmp)?\Z"
                       r"|manifest\.json\.tmp\Z")
DEFAULT_LOCK_TIMEOUT = 60.0


def lease_name(generation: int) -> str:
    return f"lease-{generation:06d}.json"


def generation_names(manifest: dict) -> set[str]:
    """Every top-level entry generation ``manifest`` reads."""
    names = {e["name"] for e in manifest["segments"]}
    names.update(n for n in (manifest.get("deleted"), manifest.get("bm25")) if n)
    codec = manifest["channels"].get("colbert_codec")
    if codec is not None and codec.get("codebook"):
        names.add(codec["codebook"])
    return names


def owned_entry(name: str) -> bool:
    """True for names only hybridsearch writes (uncommitted ones are safe to remove under the lock)."""
    return name == LOCK or bool(_OWNED_RE.match(name))


# ----------------------------------------------------------------------------- writer lock

class WriterLock:
    """Exclusive ``fcntl`` lock on ``folder/LOCK``; waits up to ``timeout`` seconds."""

    def __init__(self, folder: Path, timeout: float = DEFAULT_LOCK_TIMEOUT):
        self.path = Path(folder) / LOCK
        self.timeout = float(timeout)
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise IndexFormatError(f"{self.path} is a symlink; refusing to follow it") from e
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise PermissionError(
                    e.errno, f"cannot write to index {self.path.parent} (read-only media or no "
                    f"permission); it can still be opened for searching", str(self.path)) from e
            raise
        deadline = time.monotonic() + self.timeout
        delay = 0.01
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_pid(fd)
                    os.close(fd)
                    raise IndexLockedError(
                        f"index {self.path.parent} is being written by another process "
                        f"(lock {self.path} held by pid {holder}); gave up after "
                        f"{self.timeout:g} s. Retry when it has finished."
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise IndexFormatError(f"{self.path} is not a regular file")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    try:
        txt = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return txt if txt.isdigit() else "unknown"


# ----------------------------------------------------------------------------- reader leases

class LeaseGone(Exception):
    """The lease file vanished between reading the manifest and locking it: re-read the manifest."""


class Lease:
    """A shared lock on ``lease-G.json``, held while a snapshot of generation G is alive."""

    def __init__(self, fd: int):
        self._fd = fd

    @classmethod
    def take(cls, folder: Path, generation: int) -> Lease | None:
        """Lock generation ``generation``'s lease; None when it has no lease file (an index
        written before leases existed, whose files are then only protected while current)."""
        path = Path(folder) / lease_name(generation)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise IndexFormatError(f"{path} is a symlink; refusing to follow it") from e
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IndexFormatError(f"{path} is not a regular file")
            fcntl.flock(fd, fcntl.LOCK_SH)
            if os.fstat(fd).st_nlink == 0:  # collected while we waited for the lock
                raise LeaseGone(str(path))
        except BaseException:
            os.close(fd)
            raise
        return cls(fd)

    def release(self, _close=os.close) -> None:
        # os.close bound at definition: __del__ may run at interpreter exit, after os is gone
        fd, self._fd = self._fd, None
        if fd is not None:
            _close(fd)  # closing drops the flock

    def __del__(self):
        self.release()


def write_lease(folder: Path, manifest: dict) -> None:
    """Write (durably) the lease file of ``manifest``'s generation, before it is switched in."""
    gen = int(manifest["generation"])
    write_json_durable(Path(folder) / lease_name(gen),
                       {"generation": gen, "files": sorted(generation_names(manifest))})


# ----------------------------------------------------------------------------- collection

def collect(folder: Path, manifest: dict) -> list[str]:
    """Remove what no process can still read (module docstring). Call with the writer lock held.
    Returns the names removed."""
    folder = Path(folder)
    current = int(manifest["generation"])
    keep = generation_names(manifest) | {MANIFEST, LOCK, lease_name(current)}
    entries = sorted(os.listdir(folder))
    stale: list[str] = []
    for name in entries:
        m = LEASE_RE.match(name)
        if not m or name in keep:
            continue
        gen = int(m.group(1))
        if gen > current:  # written by a writer that died before its manifest switch
            stale.append(name)
            continue
        held = _take_or_read(folder / name)
        if held is None:
            stale.append(name)
        else:
            keep |= held | {name}
    removed = list(stale)
    for name in entries:
        if name in keep or name in removed or not owned_entry(name) or LEASE_RE.match(name):
            continue
        remove_entry(folder, name)
        removed.append(name)
    return removed


def _take_or_read(path: Path) -> set[str] | None:
    """The names a lease protects while some process holds it. When nobody holds it, unlink it
    under an exclusive lock (a reader that was waiting then sees it gone) and return None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:  # a symlink or something odd: not a lease of ours, protects nothing
        remove_entry(path.parent, path.name)
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                files = json.loads(os.pread(fd, 1 << 20, 0))["files"]
                return {f for f in files if isinstance(f, str) and owned_entry(f)}
            except (ValueError, KeyError, TypeError):
                return set(os.listdir(path.parent))  # unreadable but held: keep everything
        path.unlink(missing_ok=True)  # still holding the exclusive lock
        return None
    finally:
        os.close(fd)
