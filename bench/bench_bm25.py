"""BM25 channel vs the ``bm25s`` package on a BEIR data set, side by side in one run.

Usage::

    python bench/bench_bm25.py /path/to/beir/scifact [--split test] [--repeats 3] [--out FILE]

Documents are ``title + " " + text``. Measured for each system: nDCG@10 and Recall@100 on the
split, index build time, single-query latency (p50/p99, one query per call, query analysis
included) and batched throughput (all queries in one call), each the median over ``--repeats``.
bm25s runs as configured for BEIR-style baselines: method "lucene", k1 1.5, b 0.75, English
stopwords, PyStemmer English stemmer; its default numpy backend and, when numba is installed, its
numba backend too. The markdown table goes to stdout and to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

K = 100  # hits retrieved per query everywhere (Recall@100 needs 100)


def machine_info() -> str:
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    vers = []
    for p in ("hybridsearch", "tantivy", "bm25s", "PyStemmer", "numpy", "numba"):
        try:
            vers.append(f"{p} {metadata.version(p)}")
        except metadata.PackageNotFoundError:
            pass
    return (
        f"{cpu}, os.cpu_count() = {os.cpu_count()}; Python {platform.python_version()}; "
        f"{', '.join(vers)}; {dt.datetime.now().isoformat(timespec='minutes')}"
    )


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def latency_stats(search_one, queries: list[str]) -> tuple[float, float]:
    """(p50, p99) milliseconds of one-query calls over all queries."""
    times = []
    for q in queries:
        t = time.perf_counter()
        search_one(q)
        times.append(time.perf_counter() - t)
    ms = np.asarray(times) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


class Ours:
    def __init__(self, threads: int = 1):
        self.threads = threads
        self.name = "hybridsearch BM25Index (tantivy)"
        if threads > 1:
            self.name += f", batch over {threads} threads"

    def build(self, texts: list[str], folder: Path) -> None:
        from hybridsearch.retrievers.bm25 import BM25Index

        self.ix = BM25Index.create(folder)
        self.ix.add(np.arange(len(texts), dtype=np.int64), texts)
        self.ix.commit()
        self.ix.close()  # waits for merges, so the build time includes them
        self.folder = folder

    def disk_bytes(self) -> int:
        return self.ix.disk_bytes()

    def search(self, queries: list[str], k: int) -> np.ndarray:
        return self.ix.search(queries, k, threads=self.threads)[1]

    def search_one(self, query: str) -> None:
        self.ix.search([query], K)

    def tantivy_only_ms(self, queries: list[str]) -> float:
        """Mean ms per query of the bare tantivy call (private API: for this breakdown only)."""
        qs = [self.ix._query(q) for q in queries]
        qs = [q for q in qs if q is not None]
        searcher = self.ix._searcher
        t = time.perf_counter()
        for q in qs:
            searcher.search(q, limit=K, count=False)
        return (time.perf_counter() - t) / len(qs) * 1e3


class Bm25s:
    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"bm25s ({backend} backend)"

    def _tok(self, texts: list[str]):
        import bm25s

        return bm25s.tokenize(texts, stopwords="en", stemmer=self.stemmer, show_progress=False)

    def build(self, texts: list[str], folder: Path) -> None:
        import bm25s
        import Stemmer

        self.stemmer = Stemmer.Stemmer("english")
        self.model = bm25s.BM25(method="lucene", k1=1.5, b=0.75, backend=self.backend)
        self.model.index(self._tok(texts), show_progress=False)
        self.folder = folder

    def disk_bytes(self) -> int:
        self.model.save(str(self.folder))
        return dir_bytes(self.folder)

    def search(self, queries: list[str], k: int) -> np.ndarray:
        docs, _scores = self.model.retrieve(self._tok(queries), k=k, show_progress=False)
        return np.asarray(docs)

    def search_one(self, query: str) -> None:
        self.model.retrieve(self._tok([query]), k=K, show_progress=False)


def run_system(system, texts, doc_ids, qids, qtexts, qrels, repeats, tmp: Path) -> dict:
    from hybridsearch.evaluation import evaluate

    builds, p50s, p99s, qps, raw = [], [], [], [], []
    for r in range(repeats):
        folder = Path(tempfile.mkdtemp(dir=tmp))
        t = time.perf_counter()
        system.build(texts, folder)
        builds.append(time.perf_counter() - t)
        if r == 0:  # quality is deterministic: measured once; also warms caches and JITs
            ids = system.search(qtexts, K)
            run = {q: [doc_ids[i] for i in row if i >= 0] for q, row in zip(qids, ids)}
            quality = evaluate(run, qrels, ks=(10, 100))
            size = system.disk_bytes()
            system.search_one(qtexts[0])
        p50, p99 = latency_stats(system.search_one, qtexts)
        p50s.append(p50)
        p99s.append(p99)
        t = time.perf_counter()
        system.search(qtexts, K)
        qps.append(len(qtexts) / (time.perf_counter() - t))
        if isinstance(system, Ours):
            raw.append(system.tantivy_only_ms(qtexts))
    return {
        "name": system.name,
        "ndcg@10": quality["ndcg@10"],
        "recall@100": quality["recall@100"],
        "build_s": statistics.median(builds),
        "p50_ms": statistics.median(p50s),
        "p99_ms": statistics.median(p99s),
        "qps": statistics.median(qps),
        "disk_mb": size / 2**20,
        "tantivy_ms": statistics.median(raw) if raw else None,
    }


def table(rows: list[dict]) -> str:
    head = (
        "| system | nDCG@10 | Recall@100 | build (s) | latency p50 (ms) | latency p99 (ms) "
        "| batched (queries/s) | index on disk (MiB) |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['ndcg@10']:.3f} | {r['recall@100']:.3f} | {r['build_s']:.2f} "
            f"| {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['qps']:,.0f} | {r['disk_mb']:.1f} |"
        )
    return "\n".join(lines)


def notes(rows: list[dict]) -> list[str]:
    ours = rows[0]
    ref = next(r for r in rows if r["name"].startswith("bm25s"))
    out = []
    d = ours["ndcg@10"] - ref["ndcg@10"]
    out.append(
        f"Quality: nDCG@10 {ours['ndcg@10']:.3f} vs bm25s {ref['ndcg@10']:.3f} ({d:+.3f}); "
        f"Recall@100 {ours['recall@100']:.3f} vs {ref['recall@100']:.3f}. The two differ in "
        "BM25 parameters (tantivy k1 1.2 vs bm25s k1 1.5, both b 0.75), tokenisation (bm25s "
        "drops one-character tokens, ours keeps them) and idf details."
    )
    for key, what, better in (
        ("p50_ms", "single-query latency (p50)", "lower"),
        ("qps", "batched throughput", "higher"),
        ("build_s", "build time", "lower"),
    ):
        sign = 1 if better == "lower" else -1
        # The threads option changes only batched search: compare the other figures on row 0.
        mine = [r for r in rows if r["name"].startswith("hybridsearch")] if key == "qps" else [ours]
        best_ours = min(mine, key=lambda r: sign * r[key])
        others = [r for r in rows if r["name"].startswith("bm25s")]
        fastest = min([best_ours, *others], key=lambda r: sign * r[key])
        if fastest is best_ours:
            out.append(f"{what}: ours ({best_ours['name']}) is the fastest here.")
        else:
            a, b = best_ours[key], fastest[key]
            ratio = a / b if better == "lower" else b / a
            out.append(
                f"{what}: ours ({best_ours['name']}) is {ratio:.1f}x slower than {fastest['name']}."
            )
    out.append(
        "Why ours is slower per query where it is: tantivy-py has no multi-query search call, "
        "so a batch is a Python loop of one tantivy call per query, and each call converts its "
        "hits to Python objects (a score and a DocAddress per hit) before the docnos are read "
        "from the fast field. The bare tantivy call (search + hit conversion) takes "
        f"{ours['tantivy_ms']:.3f} ms of the {ours['p50_ms']:.3f} ms p50 here; the rest is query "
        "analysis and result assembly in Python. bm25s scores a whole batch "
        "with numpy/numba over a precomputed sparse score matrix and never leaves Python's "
        "numeric arrays. Already applied: one searcher reused until the next commit, count=False "
        "(no match counting), docnos read from a fast field instead of stored documents, and "
        "the `threads` option (tantivy releases the GIL while it searches), which can only help "
        "when cores are idle. The two rows of ours differ only in batched search; their other "
        "columns are separate measurements of the same code, so their spread shows the noise."
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("beir_folder", type=Path)
    ap.add_argument("--split", default="test")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "bm25_scifact.md"
    )
    args = ap.parse_args(argv)

    from hybridsearch.evaluation import load_beir

    corpus, queries, qrels = load_beir(args.beir_folder, args.split)
    doc_ids = list(corpus)
    texts = [corpus[d]["title"] + " " + corpus[d]["text"] for d in doc_ids]
    qids = [q for q in qrels if q in queries]
    qtexts = [queries[q] for q in qids]
    print(f"{len(texts)} documents, {len(qids)} {args.split} queries", file=sys.stderr)

    systems = [Ours()]
    if (os.cpu_count() or 1) > 1:
        systems.append(Ours(threads=os.cpu_count()))
    systems.append(Bm25s("numpy"))
    try:
        import numba  # noqa: F401

        systems.append(Bm25s("numba"))
    except ImportError:
        pass
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for s in systems:
            print(f"running {s.name} ...", file=sys.stderr)
            rows.append(run_system(s, texts, doc_ids, qids, qtexts, qrels, args.repeats, Path(tmp)))

    md = [
        f"# BM25: hybridsearch vs bm25s on {args.beir_folder.name} ({args.split} split)",
        "",
        (
            f"Machine: {machine_info()}. 1-minute load average {load_before:.1f} before the run, "
            f"{os.getloadavg()[0]:.1f} after (other work shares this machine: timings are noisy)."
        ),
        "",
        (
            f"{len(texts)} documents (title + text), {len(qids)} queries, k = {K}. Times are "
            f"medians over {args.repeats} repeats; latency is one query per call including query "
            "analysis; batched is all queries in one call. Build includes tokenisation (and, for "
            "ours, writing the index to disk and waiting for merges)."
        ),
        "",
        table(rows),
        "",
        *[f"- {n}" for n in notes(rows)],
        "",
    ]
    text = "\n".join(md)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
