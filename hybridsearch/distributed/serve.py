"""``hybridsearch serve DIR --ray ADDRESS``: the HTTP API (hybridsearch.server) in front of a
sharded index. One server process (the coordinator); the shard actors run on the cluster."""

from __future__ import annotations

import sys


def serve_sharded(index_dir: str, settings, *, model: str | None = None, address: str | None = "auto",
                  timeout: float | None = None) -> None:
    """Open the sharded index in ``index_dir`` on the Ray cluster at ``address`` and serve it
    until SIGTERM or Ctrl-C. ``settings.workers`` must be 1: each worker process would start its
    own shard actors."""
    import uvicorn

    from ..server.app import create_app
    from ..server.run import _banner, _config, _signals_end_quietly, bind_socket, url_of
    from .sharded import DEFAULT_TIMEOUT, ShardedIndex

    if settings.workers != 1:
        raise ValueError("--ray serves from one process (the coordinator); drop --workers")
    settings.check_bind()
    sock = bind_socket(settings.host, settings.port, settings.backlog)
    url = url_of(sock)
    try:
        index = ShardedIndex.open(index_dir, model, address=address, timeout=timeout or DEFAULT_TIMEOUT)
        try:
            app = create_app(index, settings)
            _banner(url, f"{index_dir} ({index.n_shards} shards x {index.n_replicas}, {len(index)} documents, "
                         f"model {index.encoder.spec.name}, Ray)", settings)
            with _signals_end_quietly():
                uvicorn.Server(_config(app, settings)).run(sockets=[sock])
        finally:
            index.close()
    finally:
        sock.close()
    print("hybridsearch: server stopped", file=sys.stderr, flush=True)
