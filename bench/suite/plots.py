"""PNG figures for RESULTS.md, drawn with matplotlib (Agg backend) from the sections' data."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _loglog(ax, title: str, ylabel: str, legend_size: int) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("documents")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)


def _save(plt, fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def latency_curves(data: dict, out: Path) -> Path | None:
    """p50 latency against corpus size, one line per system (log-log)."""
    lat = data.get("latency", {})
    if not lat:
        return None
    plt = _plt()
    groups = [("dense", ("hybridsearch dense", "bare FAISS dense (1 thread)", "bare FAISS HNSW32 (1 thread)",
                         "Milvus Lite dense")),
              ("BM25", ("hybridsearch bm25", "bm25s BM25", "bm25s BM25 (numba backend)", "Milvus Lite BM25")),
              ("learned sparse", ("hybridsearch sparse", "sparse, exhaustive term-at-a-time kernel",
                                  "Milvus Lite sparse")),
              ("ColBERT", ("hybridsearch colbert", "ColBERT, exhaustive MaxSim over every token")),
              ("hybrid", ("hybridsearch hybrid", "Milvus Lite hybrid (weighted)", "Milvus Lite hybrid (RRF)"))]
    groups = [g for g in groups if any(name in lat for name in g[1])]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4.2), squeeze=False)
    axes = axes[0]
    for ax, (title, names) in zip(axes, groups):
        for name in names:
            if name in lat:
                xs = sorted(lat[name])
                ax.plot(xs, [lat[name][x] for x in xs], marker="o", label=name)
        _loglog(ax, f"{title}: p50 latency, top 10", "ms", 7)
    return _save(plt, fig, out)


def latency_m3(data: dict, out: Path) -> Path | None:
    """BGE-M3-shaped corpora: p50 latency against size per channel, ours and each anchor (log-log);
    ``data["latency_m3"]`` is ``{channel: {system: {docs: ms}}}``."""
    lat = data.get("latency_m3", {})
    if not lat:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(lat), figsize=(4.5 * len(lat), 4.2), squeeze=False)
    for ax, (channel, systems) in zip(axes[0], lat.items()):
        for name, pts in systems.items():
            xs = sorted(pts)
            ax.plot(xs, [pts[x] for x in xs], marker="o", label=name)
        _loglog(ax, f"{channel}: p50, top 10 (BGE-M3 shape)", "ms", 7)
    return _save(plt, fig, out)


def build_rates(data: dict, out: Path) -> Path | None:
    build, sizes = data.get("build", {}), data.get("sizes", [])
    if not build:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, vals in build.items():
        ax.plot(sizes[:len(vals)], vals, marker="o", label=name)
    _loglog(ax, "build rate", "documents / s", 8)
    return _save(plt, fig, out)


def quality_bars(data: dict, out: Path) -> Path | None:
    nd = data.get("ndcg@10", {})
    if not nd:
        return None
    plt = _plt()
    labels = list(nd)
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(labels) + 1))
    colors = ["tab:blue" if lbl.startswith("hybridsearch") else "tab:gray" for lbl in labels]
    ax.barh(range(len(labels)), [nd[lbl] for lbl in labels], color=colors)
    ax.set_yticks(range(len(labels)), [lbl if len(lbl) <= 52 else lbl[:50] + "..." for lbl in labels], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("nDCG@10, SciFact test")
    lo = min(nd.values())
    ax.set_xlim(max(0.0, lo - 0.1), min(1.0, max(nd.values()) + 0.03))
    for i, lbl in enumerate(labels):
        ax.text(nd[lbl], i, f" {nd[lbl]:.3f}", va="center", fontsize=7)
    return _save(plt, fig, out)


def stage_bars(data: dict, out: Path) -> Path | None:
    st = {k: v for k, v in data.get("stages_ms", {}).items() if not k.startswith(("sum", "search()"))}
    if not st:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(st) + 1))
    ax.barh(range(len(st)), list(st.values()), color="tab:blue")
    ax.set_yticks(range(len(st)), list(st), fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median ms (log scale)")
    ax.set_title("one hybrid query, stage by stage")
    return _save(plt, fig, out)
