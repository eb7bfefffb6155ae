"""What a worker process of ``serve --workers N`` runs first.

uvicorn's supervisor pickles the app factory into each spawned worker and pings the worker while
it starts; this module is light (no numpy, torch or FAISS at import), so the worker answers those
pings at once and the heavy imports happen after, while it builds the app.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from .settings import Settings


def make_app(index_dir: str, model: str | None, settings: Settings):
    """App factory a spawned worker calls: the app over ``index_dir``, plus a watchdog that stops
    this worker gracefully (SIGTERM to itself) if the supervising parent dies, so no worker is
    left serving on its own."""
    from .app import create_app

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="hybridsearch-parent-watch", daemon=True).start()
    return create_app(index_dir, settings, model=model)
