"""HybridIndex at BGE-M3's shapes, 100k and 1M documents with all four channels (the section
``bench/suite/scale_m3.py`` describes what is measured and how).

    python bench/bench_scale_m3.py --docs 100000 [--colbert-codec res1] [--dense-storage sq8]
    python bench/bench_scale_m3.py --docs 1000000 --work /big/disk --no-milvus

Writes bench/results/scale_m3.md (the records of earlier runs at other sizes are kept) and
replaces the section of the same title in bench/RESULTS.md. The disk estimate is printed first;
a run whose ColBERT storage would not fit the free disk is refused before anything is written.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from suite import scale_m3 as m3  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, nargs="+", default=[100_000], help="sizes (default 100000)")
    ap.add_argument("--dense-factory", default=None, help="HybridIndex.create(dense_factory=); default: the index's")
    ap.add_argument("--dense-storage", default=None, help="fp32 | fp16 | sq8 (when the index has the option)")
    ap.add_argument("--colbert-codec", default=None, help="e.g. res1 | fp16 (when the index has the option)")
    ap.add_argument("--queries", type=int, default=100, help="single queries per mode (default 100)")
    ap.add_argument("--commit", type=int, default=1000, help="documents per commit (default 1000, as the CLI)")
    ap.add_argument("--colbert-max-docs", type=int, default=100_000,
                    help="time brute-force colbert mode only up to this size (default 100000)")
    ap.add_argument("--colbert-queries", type=int, default=3, help="brute-force colbert queries (default 3)")
    ap.add_argument("--milvus-max-docs", type=int, default=100_000, help="Milvus Lite only up to this size")
    ap.add_argument("--no-milvus", action="store_true")
    ap.add_argument("--no-compact", action="store_true", help="skip the compact() process")
    ap.add_argument("--rss-cap-gib", type=float, default=0.0,
                    help="kill a worker above this RSS (default: 70%% of available memory, at most 16)")
    ap.add_argument("--work", default=None, help="folder for the index (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the index folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", default=None, help="a run folder kept with --keep (index/, queries/, build.json): "
                    "serve and compare it without building (one size only)")
    ap.add_argument("--compact-first", action="store_true",
                    help="compact() before serving (rewrites an older index in this version's format)")
    ap.add_argument("--compact-dense-factory", default=None,
                    help="with --compact-first: compact(dense_factory=...), e.g. auto for an index made Flat")
    ap.add_argument("--no-versus", action="store_true", help="skip the per-channel anchors (FAISS, bm25s, exhaustive)")
    ap.add_argument("--no-serve", action="store_true", help="skip the serving process (memory, modes, filters)")
    ap.add_argument("--versus-queries", type=int, default=30, help="queries per system against the anchors (default 30)")
    ap.add_argument("--versus-hnsw-max-docs", type=int, default=1_000_000,
                    help="build the bare FAISS HNSW32 anchor up to this size (default 1000000)")
    ap.add_argument("--colbert-exhaustive-queries", type=int, default=3,
                    help="exhaustive ColBERT MaxSim queries in the anchors (default 3; ~1 min each at 1M)")
    ap.add_argument("--out", default=str(HERE / "results" / "scale_m3.md"))
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"), help="RESULTS.md whose section is replaced")
    args = ap.parse_args(argv)
    if min(args.docs) < 1 or args.commit < 1 or args.queries < 1:
        ap.error("--docs, --commit and --queries must be positive")
    if args.reuse and len(args.docs) != 1:
        ap.error("--reuse serves one kept index: give its size as the one --docs")
    create = m3.index_kwargs(args.dense_factory, args.dense_storage, args.colbert_codec)
    o = m3.Options(sizes=sorted(args.docs), create=create, queries=args.queries, commit=args.commit, seed=args.seed,
                   colbert_max_docs=args.colbert_max_docs, colbert_queries=args.colbert_queries,
                   milvus_max_docs=0 if args.no_milvus else args.milvus_max_docs, compact=not args.no_compact,
                   rss_cap_mib=args.rss_cap_gib * 1024, work=args.work, keep=args.keep, reuse=args.reuse,
                   compact_first=args.compact_first, compact_dense_factory=args.compact_dense_factory,
                   versus=not args.no_versus, serve=not args.no_serve, versus_queries=args.versus_queries,
                   hnsw_max_docs=args.versus_hnsw_max_docs, colbert_exhaustive_queries=args.colbert_exhaustive_queries,
                   command="python bench/bench_scale_m3.py " + shlex.join(argv if argv is not None else sys.argv[1:]))
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", file=sys.stderr, flush=True)

    work = Path(args.work) if args.work else Path(tempfile.gettempdir())
    work.mkdir(parents=True, exist_ok=True)
    for n in ([] if args.reuse else o.sizes):  # refuse up front, before hours of smaller sizes
        m3.check_disk(work, n, o.shape, m3.effective(create), o.commit, n <= o.milvus_max_docs, log)
    section = m3.run_all(o, work, Path(args.out), log)
    m3.splice(Path(args.results), section.body)
    log(f"wrote {args.out} and the section in {args.results}")
    print(section.body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
