"""What a section hands back to ``bench/run.py``, and the timing protocol every section shares."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata

import numpy as np


@dataclass
class Section:
    title: str
    body: str
    figures: list[str] = field(default_factory=list)   # PNG paths relative to RESULTS.md
    losses: list[str] = field(default_factory=list)    # one line per figure where a peer beats us
    data: dict = field(default_factory=dict)           # raw numbers, for plots and the JSON dump


def version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def rss_mib() -> float:
    """Resident set size of this process, MiB (Linux /proc; NaN elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def dir_bytes(path: str | os.PathLike) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


@dataclass
class Latency:
    """Per-round p50/p99 (ms) of one system; the reported figure is the median over rounds."""
    p50s: list[float] = field(default_factory=list)
    p99s: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return float(np.median(self.p50s))

    @property
    def p99(self) -> float:
        return float(np.median(self.p99s))


def interleaved(systems: dict[str, tuple[Callable[[int], object], int]], rounds: int) -> dict[str, Latency]:
    """Time ``fn(i)`` for ``i < n`` for every ``name: (fn, n)``, system after system, ``rounds``
    times over, so that drift on a shared machine hits every system alike. Each system gets one
    untimed warm-up call first."""
    out = {name: Latency() for name in systems}
    for fn, _ in systems.values():
        fn(0)
    for _ in range(rounds):
        for name, (fn, n) in systems.items():
            ts = np.empty(n)
            for i in range(n):
                t = time.perf_counter()
                fn(i)
                ts[i] = time.perf_counter() - t
            out[name].p50s.append(1000 * float(np.percentile(ts, 50)))
            out[name].p99s.append(1000 * float(np.percentile(ts, 99)))
    return out


def ratio(a: Latency, b: Latency) -> float:
    """Median over rounds of a's p50 / b's p50 (both measured in the same rounds)."""
    return float(np.median(np.asarray(a.p50s) / np.asarray(b.p50s)))
