"""HTTP server for one index: FastAPI + pydantic + uvicorn (``pip install 'hybridsearch[server]'``).

Modules: ``settings`` (every setting, one dataclass), ``schemas`` (request/response models: the
only source of validation and of /openapi.json), ``app`` (routes), ``parsing`` (strict JSON,
400 messages), ``runtime`` (index, log, limiters), ``auth`` (API keys),
``metrics`` (Prometheus), ``guard`` (header checks, access log), ``protocol`` (request deadline,
JSON 400s), ``run`` (uvicorn, workers, signals), ``errors`` (status of an exception; stdlib only).

The names below that need the extra are imported on first use, so ``errors`` and ``settings``
(used by the CLI) import without it.
"""

from .errors import disk_full_error, disk_full_message
from .settings import DEFAULT_MAX_BODY_BYTES, Settings

__all__ = ["DEFAULT_MAX_BODY_BYTES", "Settings", "create_app", "disk_full_error", "disk_full_message",
           "serve", "start"]

_LAZY = {"create_app": "app", "serve": "run", "start": "run"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
