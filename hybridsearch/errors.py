"""Exceptions raised by hybridsearch. Every one says what went wrong and what to do."""


class HybridSearchError(Exception):
    """Base class of every error hybridsearch raises on purpose."""


class ModelNotFoundError(HybridSearchError):
    """A model name or path could not be resolved to a local folder."""


class ModelFormatError(HybridSearchError):
    """A folder exists but is not a usable model (missing or malformed files)."""


class IndexFormatError(HybridSearchError):
    """An index folder is missing files, is corrupted, or has an unsupported format version."""


class ModelMismatchError(HybridSearchError):
    """An index was opened with a different model than the one that built it."""


class IndexLockedError(HybridSearchError):
    """Another process holds an index's writer lock for longer than the caller would wait."""


class DiskFullError(HybridSearchError, OSError):
    """A write failed because the disk is full (ENOSPC); the previous commit is intact."""
