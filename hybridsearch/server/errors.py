"""Errors the server answers, and how an exception a request raised becomes ``(status, message)``.

Standard library only: the CLI imports the disk-full helpers without the server extra.
"""

from __future__ import annotations

import errno

from ..errors import DiskFullError, HybridSearchError, IndexLockedError

LOCKED_RETRY_AFTER_S = 1  # Retry-After of a 503 when the index's writer lock was busy


class ApiError(Exception):
    """An error answered to the client as ``{"error": message}`` with an HTTP status."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.headers = dict(headers or {})


def error_answer(e: BaseException) -> tuple[int, str, dict[str, str], bool]:
    """(status, message, headers, unexpected) for an exception a request raised.

    ``unexpected`` asks the caller to log the traceback (500s)."""
    if isinstance(e, ApiError):
        return e.status, e.message, e.headers, False
    if isinstance(e, IndexLockedError):  # another writer held the lock for too long
        return 503, str(e) or "the index is locked by another writer", \
            {"Retry-After": str(LOCKED_RETRY_AFTER_S)}, False
    full = disk_full_error(e)
    if full is not None:  # DiskFullError, or ENOSPC / EDQUOT however it was wrapped
        return 507, disk_full_message(full), {}, False
    if isinstance(e, KeyError):
        return 404, str(e.args[0]) if e.args else "not found", {}, False
    if isinstance(e, (ValueError, TypeError)):
        return 400, str(e), {}, False
    if isinstance(e, HybridSearchError):  # e.g. IndexFormatError: the message says what to do
        return 500, str(e), {}, True
    return 500, f"internal error ({type(e).__name__}); see the server log", {}, True


_DISK_FULL_ERRNOS = frozenset(x for x in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if x is not None)


def disk_full_error(e: BaseException) -> OSError | None:
    """The disk-full error behind ``e`` -- a DiskFullError, or an OSError with errno ENOSPC or
    EDQUOT, ``e`` itself or one of its causes -- or None."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DiskFullError) or (isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS):
            return e
        e = e.__cause__ or e.__context__
    return None


def disk_full_message(e: OSError) -> str:
    """``disk full (ENOSPC) writing PATH: detail`` for a disk-full error (the CLI prints the same)."""
    code = errno.errorcode.get(e.errno, "ENOSPC") if isinstance(e.errno, int) else "ENOSPC"
    path, cause, seen = e.filename, e, set()
    while path is None and cause is not None and id(cause) not in seen:  # a cause may know the file
        seen.add(id(cause))
        path = getattr(cause, "filename", None)
        cause = cause.__cause__ or cause.__context__
    detail = " ".join((e.strerror or str(e) or "No space left on device").split())
    if detail.startswith("disk full"):  # already a complete message
        return detail
    return f"disk full ({code}) writing {path}: {detail}" if path else f"disk full ({code}): {detail}"
