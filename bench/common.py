"""Helpers shared by the benchmarks: machine description, timing, markdown tables."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from importlib import metadata


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
