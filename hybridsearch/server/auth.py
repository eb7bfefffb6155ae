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


#: (method, path) -> needs the write key (True) or any key (False). The guard checks these from
#: the headers before a body is read; the routes declare the same through :func:`dependencies`.
PROTECTED = {("POST", "/search"): False, ("GET", "/stats"): False, ("GET", "/metrics"): False,
             ("POST", "/add"): True, ("POST", "/delete"): True, ("POST", "/compact"): True}


def check(settings: Settings, authorization: str | None, write: bool) -> None:
    """Raise ApiError 401 / 403 unless ``authorization`` (the header's value) carries a key that
    may do this; nothing when the server has no keys."""
    if not settings.auth:
        return
    scheme, _, given = (authorization or "").strip().partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'", headers=_CHALLENGE)
    if _same(given, settings.api_key):
        return
    if _same(given, settings.read_key):
        if write:
            raise ApiError(403, "this key may only read (search, stats, metrics); writes need the write key")
        return
    raise ApiError(401, "wrong API key", headers={"WWW-Authenticate": 'Bearer realm="hybridsearch", '
                                                                        'error="invalid_token"'})


def dependencies(settings: Settings, write: bool) -> list:
    """FastAPI dependencies of a route: none without keys, else the bearer check (it documents the
    scheme in /openapi.json; the guard has already made the same check before the body was read)."""
    if not settings.auth:
        return []

    def bearer(creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        check(settings, None if creds is None else f"{creds.scheme} {creds.credentials}", write)

    return [Depends(bearer)]
