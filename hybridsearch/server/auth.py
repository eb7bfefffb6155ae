"""API keys: ``Authorization: Bearer <key>``, compared in constant time.

The write key may do everything; the optional read key may search and read stats and metrics.
``/health``, ``/ready``, ``/openapi.json`` and the search page need no key.
"""

from __future__ import annotations

import hmac

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import ApiError
from .settings import Settings

_bearer = HTTPBearer(auto_error=False, description="the API key (write key, or the read key for reads)")
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="hybridsearch"'}


def _same(given: str, key: str | None) -> bool:
    return key is not None and hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                                                   key.encode("utf-8"))


def dependencies(settings: Settings, write: bool) -> list:
    """FastAPI dependencies of a route: none without keys, else a bearer check (read or write)."""
    if not settings.auth:
        return []

    def check(creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        if creds is None:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           headers=_CHALLENGE)
        given = creds.credentials
        if _same(given, settings.api_key):
            return
        if _same(given, settings.read_key):
            if write:
                raise ApiError(403, "this key may only read (search, stats, metrics); writes need the write key")
            return
        raise ApiError(401, "wrong API key", headers={"WWW-Authenticate": 'Bearer realm="hybridsearch", '
                                                                            'error="invalid_token"'})

    return [Depends(check)]
