"""Every setting of the HTTP server, in one frozen dataclass (documented in the README's server section).

Keys come from files (``--api-key-file``) or environment variables, never from the command line
(a command line is visible to every user of the machine in ``ps``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
MIN_KEY_CHARS = 16
API_KEY_ENV = "HYBRIDSEARCH_API_KEY"
READ_KEY_ENV = "HYBRIDSEARCH_READ_KEY"


@dataclass(frozen=True)
class Settings:
    """How the server listens, whom it answers, and what a request may ask for.

    Attributes:
        host, port: address to bind (port 0 picks a free one).
        workers: processes serving the same index folder (each opens it; they share the socket).
        api_key: the write key (may do everything); None with no read key: no authentication.
        read_key: optional key that may only search, read stats and metrics.
        insecure: allow binding a non-loopback address without a key.
        cors_origins: origins allowed to call the API from a browser (empty: CORS off).
        max_body_bytes: larger bodies get 413, decided from Content-Length before reading.
        max_search_body_bytes: larger /search bodies get 413, unread (queries are short).
        max_query_chars: longest query, in characters (400 beyond).
        max_query_tokens: longest query, in tokens of the index's tokenizer (400 beyond).
        max_queries: queries in one batched search.
        max_k: hits per query.
        max_batch_hits: number of queries x k in one request.
        max_candidates: first-stage candidates per channel.
        request_timeout_s: a request's line, headers and body must all arrive within this many
            seconds of its first byte (slow clients are disconnected).
        keep_alive_s: an idle keep-alive connection is closed after this many seconds.
        backlog: listen queue length (connections waiting to be accepted).
        search_threads: searches running at once (a thread pool; the event loop never searches).
        graceful_timeout_s: on SIGTERM, how long requests in progress may take to finish.
        access_log: one JSON line per request on stderr.
        log_queries: put the query text in the access log (off: queries can be personal data).
    """

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    api_key: str | None = field(default=None, repr=False)
    read_key: str | None = field(default=None, repr=False)
    insecure: bool = False
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_search_body_bytes: int = 1024 * 1024
    max_query_chars: int = 8192
    max_query_tokens: int = 1024
    max_queries: int = 64
    max_k: int = 1000
    max_batch_hits: int = 20_000
    max_candidates: int = 10_000
    request_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    backlog: int = 2048
    search_threads: int = 8
    graceful_timeout_s: float = 60.0
    access_log: bool = True
    log_queries: bool = False

    def __post_init__(self) -> None:
        for name in ("port",):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 65535:
                raise ValueError(f"{name} must be an integer from 0 to 65535, got {v!r}")
        for name in ("workers", "max_body_bytes", "max_search_body_bytes", "max_query_chars", "max_query_tokens", "max_queries",
                     "max_k", "max_batch_hits", "max_candidates", "backlog", "search_threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("request_timeout_s", "keep_alive_s", "graceful_timeout_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")
        for name in ("api_key", "read_key"):
            v = getattr(self, name)
            if v is not None:
                _check_key(v, name.replace("_", " "))
        if self.read_key is not None and self.api_key is None:
            raise ValueError("a read key needs a write key too (--api-key-file or $HYBRIDSEARCH_API_KEY); "
                             "without one, writes would be open while searches need a key")
        if self.read_key is not None and self.read_key == self.api_key:
            raise ValueError("the read key and the write key must differ")
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        for o in self.cors_origins:
            if not isinstance(o, str) or not (o == "*" or o.startswith(("http://", "https://"))):
                raise ValueError(f"a CORS origin is '*' or starts with http:// or https://, got {o!r}")

    @property
    def auth(self) -> bool:
        return self.api_key is not None

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)

    def check_bind(self) -> None:
        """Refuse to listen beyond loopback without a key (unless ``insecure``): ValueError."""
        if self.auth or self.insecure or is_loopback(self.host):
            return
        raise ValueError(
            f"refusing to serve on {self.host} without an API key: anyone who can reach it could add and "
            f"delete documents. Give a key (--api-key-file FILE or ${API_KEY_ENV}), bind 127.0.0.1, or "
            "pass --insecure if something in front of the server authenticates")


def _check_key(key: str, what: str) -> None:
    if not isinstance(key, str):
        raise ValueError(f"the {what} must be a string")
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(f"the {what} is too short ({len(key)} characters; use at least {MIN_KEY_CHARS}, "
                         "e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise ValueError(f"the {what} must be printable ASCII without spaces (it travels in an HTTP header)")


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_key_file(path: str | os.PathLike, what: str) -> str:
    """The key in ``path`` (surrounding whitespace dropped); ValueError naming the file when unusable."""
    p = Path(path)
    try:
        key = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the {what} file {p}: {e}") from e
    if not key:
        raise ValueError(f"the {what} file {p} is empty")
    try:
        _check_key(key, what)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from e
    return key


def keys_from(api_key_file=None, read_key_file_=None, environ=None) -> tuple[str | None, str | None]:
    """(write key, read key) from the files given, else from the environment variables."""
    env = os.environ if environ is None else environ
    api = read_key_file(api_key_file, "API key") if api_key_file else (env.get(API_KEY_ENV) or "").strip() or None
    read = (read_key_file(read_key_file_, "read key") if read_key_file_
            else (env.get(READ_KEY_ENV) or "").strip() or None)
    return api, read
