"""Running the app under uvicorn: one process, N worker processes, or a thread (tests, embedding).

* The listening socket is made here, with ``settings.backlog`` (a burst of connections waits in
  the kernel's queue instead of being reset), and shared by every worker.
* ``--workers N``: uvicorn's supervisor spawns N processes that each open the folder. Readers
  follow commits and writers serialise through the index's own file lock, so any worker sees
  every worker's writes (see docs/ARCHITECTURE.md, "Threads and processes"). Prometheus runs in
  multiprocess mode over a temporary folder the parent creates and removes.
* SIGTERM / Ctrl-C: uvicorn stops accepting, answers the requests in progress (up to
  ``graceful_timeout_s``), closes idle connections, and the index is closed.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass

import uvicorn

from .._version import __version__
from .app import create_app
from .metrics import MULTIPROC_ENV
from .protocol import Protocol
from .settings import Settings
from .worker import make_app

WORKER_HEALTHCHECK_S = 60


def bind_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket on (host, port) with the given backlog."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(backlog)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _config(app, settings: Settings, **kw) -> uvicorn.Config:
    return uvicorn.Config(app, http=Protocol, lifespan="on", loop="asyncio", access_log=False,
                          log_level="warning", server_header=False, backlog=settings.backlog,
                          timeout_keep_alive=settings.keep_alive_s,
                          timeout_graceful_shutdown=settings.graceful_timeout_s, **kw)


def serve(index_dir: str, settings: Settings | None = None, *, model: str | None = None) -> None:
    """Serve the index in ``index_dir`` until SIGTERM or Ctrl-C (blocking).

    Refuses (ValueError) to bind a non-loopback address without a key unless ``settings.insecure``.
    """
    settings = settings or Settings()
    settings.check_bind()
    sock = bind_socket(settings.host, settings.port, settings.backlog)
    url = url_of(sock)
    try:
        if settings.workers == 1:
            _serve_one(index_dir, model, settings, sock, url)
        else:
            _serve_many(index_dir, model, settings, sock, url)
    finally:
        sock.close()
    print("hybridsearch: server stopped", file=sys.stderr, flush=True)


def _banner(url: str, what: str, settings: Settings) -> None:
    keys = "write + read keys" if settings.read_key else ("an API key" if settings.auth else "no key")
    print(f"hybridsearch {__version__}: serving {what} on {url}  (API: {url}/openapi.json, page: {url}/; "
          f"{keys})", file=sys.stderr, flush=True)


def _serve_one(index_dir: str, model: str | None, settings: Settings, sock: socket.socket, url: str) -> None:
    from ..index.hybrid import HybridIndex

    index = HybridIndex.open(index_dir, model)
    try:
        app = create_app(index, settings)
        _banner(url, f"{index_dir} ({len(index)} documents, model {index.encoder.spec.name})", settings)
        with _signals_end_quietly():
            uvicorn.Server(_config(app, settings)).run(sockets=[sock])
    finally:
        index.close()


@contextlib.contextmanager
def _signals_end_quietly():
    """uvicorn re-raises SIGTERM / SIGINT after its graceful shutdown, for the handler it found;
    with these no-op handlers, that ends here and ``serve`` returns (the index is closed, exit 0)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _serve_many(index_dir: str, model: str | None, settings: Settings, sock: socket.socket, url: str) -> None:
    from uvicorn.supervisors import Multiprocess

    metrics_dir = tempfile.mkdtemp(prefix="hybridsearch-metrics-")
    old = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = metrics_dir  # the spawned workers inherit it
    try:
        factory = functools.partial(make_app, index_dir, model, settings)  # pickles light: see worker.py
        # a worker loading its model on a busy machine may take a while to answer the supervisor
        config = _config(factory, settings, factory=True, workers=settings.workers,
                         timeout_worker_healthcheck=WORKER_HEALTHCHECK_S)
        _banner(url, f"{index_dir} with {settings.workers} worker processes", settings)
        Multiprocess(config, sockets=[sock]).run()
    finally:
        if old is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = old
        shutil.rmtree(metrics_dir, ignore_errors=True)


@dataclass
class RunningServer:
    """A server running in a thread of this process (see :func:`start`)."""

    server: uvicorn.Server
    thread: threading.Thread
    sock: socket.socket
    app: object

    @property
    def url(self) -> str:
        return url_of(self.sock)

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    @property
    def runtime(self):
        return self.app.runtime

    def stop(self, timeout: float = 30) -> None:
        """Graceful stop: requests in progress finish; then the socket is closed."""
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()


def start(app, settings: Settings | None = None, *, ready_timeout: float = 60) -> RunningServer:
    """Serve ``app`` (from :func:`create_app`) in a daemon thread; returns once it accepts requests."""
    settings = settings or app.runtime.settings
    settings.check_bind()
    sock = bind_socket(settings.host, settings.port, settings.backlog)
    server = uvicorn.Server(_config(app, settings))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="hybridsearch-server", daemon=True)
    t.start()
    deadline = threading.Event()
    waited = 0.0
    while not server.started:
        if not t.is_alive():
            sock.close()
            raise RuntimeError("the server thread stopped during startup")
        deadline.wait(0.01)
        waited += 0.01
        if waited > ready_timeout:
            server.should_exit = True
            raise TimeoutError("the server did not start in time")
    return RunningServer(server, t, sock, app)
