"""Helpers shared by the benchmarks: machine description, timing, markdown tables."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from importlib import metadata
from pathlib import Path


def machine_info(packages=("hybridsearch", "torch", "transformers", "numpy", "numba", "faiss-cpu", "tantivy")) -> str:
    """One markdown paragraph: CPU, cores, memory, Python and package versions, date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = ""
    try:
        mem = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        pass
    vers = []
    for p in packages:
        try:
            vers.append(f"{p} {metadata.version(p)}")
        except metadata.PackageNotFoundError:
            pass
    return (f"Machine: {cpu}, {os.cpu_count()} cores{mem}; Python {platform.python_version()}; "
            f"{', '.join(vers)}. Date: {_dt.date.today().isoformat()}.")


def timed(fn, *args, **kwargs):
    """(seconds, result) of one call."""
    t = time.perf_counter()
    r = fn(*args, **kwargs)
    return time.perf_counter() - t, r


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats printed with 3 significant decimals."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def token_args(doc: str, need: int, rounds: int, out: str):
    """Arguments of a bench on a ``(T, d)`` .npy of token vectors (``vectors``, ``--rounds``,
    ``--out``: bench/results/``out`` by default)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("vectors", help=f"(T, d) float .npy of token vectors, T >= {need:,}")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / out))
    return ap.parse_args()


def token_sample(path: str, need: int):
    """``(T, d)`` of the file and its first ``need`` rows as float32 (exits when it has fewer);
    Numba is set to one thread, as these benches time one."""
    import numba
    import numpy as np

    numba.set_num_threads(1)
    x = np.load(path, mmap_mode="r")
    if x.ndim != 2 or x.shape[0] < need:
        raise SystemExit(f"need a (T >= {need}, d) array, got {x.shape}")
    return x.shape, np.asarray(x[:need], np.float32)
