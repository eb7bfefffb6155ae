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
