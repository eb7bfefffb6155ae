"""Ray: encoding throughput on 1, 2, 3 local nodes, fan-out + merge overhead of a sharded index,
and a paper model of 100M passages on a cluster. Writes bench/results/ray.md.

    python bench/bench_ray.py [--passages 240] [--block 30] [--docs 20000] [--queries 40] [--rounds 3]

Everything runs on one loopback cluster (``ray.cluster_utils.Cluster``: a head and 2 worker
nodes on 127.0.0.1, 1 CPU each). Timings are interleaved rounds, medians, in one run.

* Encoding: the same commit blocks encoded (a) in this process, one thread, as
  ``hybridsearch index`` does, (b) by the run-long ``EncoderPool`` that ``index --ray`` uses,
  with 1, 2 and 3 encoder actors (1 CPU each, so one per node), and (c) by Ray Data jobs
  (``encode_blocks``) with 2 actors: one job, and one job per 2 blocks (the per-window cost of
  earlier versions). Every Ray figure includes actor start and model load.
* Fan-out: one HybridIndex in this process against a ShardedIndex of 3 shards (one actor per
  node) over the same documents, queries precomputed (``query_encoded=``) so no model runs;
  the difference is what the coordinator adds: the round trips and the global merge + fusion.
  The sharded index runs three ways, interleaved: "3 rounds" (every query asks the BM25
  statistics, the candidates, then the documents: how it worked before), "new terms" (the
  statistics cache emptied before each query: statistics round + candidates with the documents
  along) and "terms seen" (the cache holds the query's terms at the shards' generations: one
  round). With res1 the single index is given the sharded index's codebook (the same codes).
  "same top-10": identical id lists; "tie-aware": the same scores in order and, where ids
  differ, the single index's score of the sharded hit (from its top 40) equal (ties broken by
  docno in one index, by shard then docno across shards).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))



def corpus(n, seed=0, lo=40, hi=120):
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(3000)] + "retrieval dense sparse colbert fusion index shard query".split()
    return [" ".join(rng.choice(vocab) if rng.random() < .7 else rng.choice(vocab[:200])
                     for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def bench_encode(args, out):
    import torch

    from hybridsearch import BGEM3Encoder
    from hybridsearch.distributed.encode import EncoderPool, encode_blocks

    torch.set_num_threads(1)
    model = args.encode_model
    enc = BGEM3Encoder(model, device="cpu")
    texts = corpus(args.passages, seed=1)
    bs = args.block
    blocks = [([f"p{i}" for i in range(lo, min(lo + bs, len(texts)))], texts[lo:lo + bs])
              for lo in range(0, len(texts), bs)]
    path = str(enc.spec.path)
    # "Ray Data": encode_blocks, one map_batches job; "windows of 2": one job per 2 blocks (what
    # index --ray ran before the run-long pool, a model load per window per actor); "pool": the
    # EncoderPool index --ray runs now (started once, 4 blocks a actor in flight)
    configs = (["one process"] + [f"Ray pool, {a} actor(s)" for a in (1, 2, 3)]
               + ["Ray Data, 2 actor(s), one job", "Ray Data, 2 actor(s), one job per 2 blocks"])
    times = {c: [] for c in configs}
    for r in range(args.rounds):
        for c in (configs if r % 2 == 0 else configs[::-1]):
            t = time.perf_counter()
            if c == "one process":
                for ids, tx in blocks:
                    enc.encode_arrays(tx, kind="passage", sparse=enc.spec.has_sparse, colbert=enc.spec.has_colbert)
            elif c.startswith("Ray pool"):
                a = int(c.split()[2])
                pool = EncoderPool(path, actors=a, gpus=False)
                try:
                    n = sum(len(e) for _, e in pool.encode_all(blocks, window=4 * a))
                finally:
                    pool.close()
                assert n == len(texts)
            else:
                step = 2 if c.endswith("2 blocks") else len(blocks)
                n = sum(len(e) for lo in range(0, len(blocks), step)
                        for _, e in encode_blocks(blocks[lo:lo + step], path, actors=2, gpus=False))
                assert n == len(texts)
            times[c].append(time.perf_counter() - t)
            print(f"encode {c}: {times[c][-1]:.1f} s", flush=True)
    base = statistics.median(times["one process"])
    rows = []
    for c in configs:
        m = statistics.median(times[c])
        rows.append((c, m, len(texts) / m, base / m))
    out["encode"] = {"model": enc.spec.name, "passages": len(texts), "block": bs, "rounds": args.rounds,
                     "rows": rows, "raw": times}


def bench_fanout(args, out):
    out["fanout"] = {}
    for codec in args.codecs:
        out["fanout"][codec] = _fanout_one(args, codec)


def _fanout_one(args, codec):
    from hybridsearch import BGEM3Encoder, HybridIndex
    from hybridsearch.distributed import ShardedIndex
    from hybridsearch.testing import make_tiny_m3

    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    model = make_tiny_m3(work / "model", seed=0, hidden=64, colbert_dim=64, layers=2)
    enc = BGEM3Encoder(model, device="cpu")
    texts = corpus(args.docs, seed=2, lo=10, hi=60)
    one = HybridIndex.create(work / "one", enc, colbert_codec=codec, train_codebook=False)
    many = ShardedIndex.create(work / "sharded", enc, shards=3, timeout=600, colbert_codec=codec,
                               actor_options={"num_cpus": 1})
    t0 = time.perf_counter()
    for lo in range(0, len(texts), 5000):
        docs = [{"id": f"d{i}", "text": texts[i], "metadata": {"g": i % 10}} for i in range(lo, min(lo + 5000, len(texts)))]
        e = enc.encode_arrays([d["text"] for d in docs], kind="passage", sparse=True, colbert=True)
        many.add(docs, encoded=e)
        if many.codebook is not None and one.codebook() is None:
            one.install_codebook(many.codebook)  # the codebook the shards share, from the same write on
        one.add(docs, encoded=e)
    build = time.perf_counter() - t0
    qs = [" ".join(t.split()[:6]) for t in corpus(args.queries, seed=3, lo=6, hi=6)]
    qe = enc.encode_arrays(qs, kind="query", sparse=True, colbert=True)
    from hybridsearch.distributed.sharded import take

    modes = ("hybrid", "dense", "bm25")
    systems = ("one index", "3 shards, 3 rounds", "3 shards, new terms", "3 shards, terms seen")
    res = {(m, s): [] for m in modes for s in systems}
    same = {m: 0 for m in modes}
    same_ties = {m: 0 for m in modes}
    overlap = {m: [] for m in modes}
    trips = {s: [] for s in systems[1:]}

    warm = {}

    def prepare(s):  # outside the timing: the statistics cache each way starts from
        many._lean_rounds = s != "3 shards, 3 rounds"
        if s == "3 shards, new terms":
            many._stats_cache.clear()
        elif s == "3 shards, terms seen":
            many._stats_cache.clear()
            many._stats_cache.update(warm)

    def run(s, q, m, qj):
        if s == "one index":
            return one.search(q, k=10, mode=m, query_encoded=qj)
        return many.search(q, k=10, mode=m, query_encoded=qj)

    calls = []
    real = many._fanout

    def counted(method, *a, **kw):
        calls.append(method)
        return real(method, *a, **kw)

    many._fanout = counted
    many._stats_cache.clear()
    for m in modes:  # warm-up: Numba kernels compile once per process; fills the statistics cache
        for j, q in enumerate(qs):
            run("3 shards, terms seen", q, m, take(qe, [j]))
        one.search(qs[0], k=10, mode=m, query_encoded=take(qe, [0]))
    warm.update(many._stats_cache)
    for r in range(args.rounds):
        for m in modes:
            for s in (systems if r % 2 == 0 else systems[::-1]):
                lat = []
                for j, q in enumerate(qs):
                    qj = take(qe, [j])
                    if s != "one index":
                        prepare(s)
                    calls.clear()
                    t = time.perf_counter()
                    hits = run(s, q, m, qj)
                    lat.append((time.perf_counter() - t) * 1e3)
                    if s != "one index":
                        trips[s].append(len(calls))
                    if r == 0 and s == "3 shards, terms seen":
                        want = one.search(q, k=10, mode=m, query_encoded=qj)
                        same[m] += [h.id for h in hits] == [h.id for h in want]
                        same_ties[m] += _same_tie_aware(hits, want, one, q, m, qj)
                        overlap[m].append(len({h.id for h in hits} & {h.id for h in want}) / max(len(want), 1))
                res[(m, s)].append(float(np.median(lat)))
    many._fanout = real
    rows = []
    for m in modes:
        base = res[(m, "one index")]
        row = [m, statistics.median(base)]
        for s in systems[1:]:
            row += [statistics.median(res[(m, s)]), statistics.median([y / x for x, y in zip(base, res[(m, s)])])]
        rows.append(row + [same[m], same_ties[m], float(np.mean(overlap[m]))])
    before_after = {m: statistics.median([b / a for a, b in zip(res[(m, "3 shards, terms seen")],
                                                              res[(m, "3 shards, 3 rounds")])]) for m in modes}
    # The coordinator's own work: the global merge + fusion of one hybrid query, timed alone.
    got, _ = many._fanout("candidates", lambda s: (qs[:1], take(qe, [0]), "hybrid", 10, 100, None, None, False),
                          [0, 1, 2], timeout=60, partial=False)
    cfg = many.default_fusion()
    t = time.perf_counter()
    for _ in range(200):
        many._merge_one(got, 0, "hybrid", 10, 100, cfg)
    merge_ms = (time.perf_counter() - t) / 200 * 1e3
    many.close()
    one.close()
    return {"docs": len(texts), "queries": len(qs), "rounds": args.rounds, "rows": rows, "codec": codec,
            "systems": systems, "round_trips": {s: float(np.mean(v)) for s, v in trips.items()},
            "before_over_after": before_after,
            "merge_ms": merge_ms, "build_s": build, "raw": {f"{m}|{s}": v for (m, s), v in res.items()}}


def _same_tie_aware(got, want, one, q, m, qj, tol=1e-5):
    """The same scores in order, and where the ids differ, the sharded hit is in the single
    index's top 40 with that score (a tie broken the other way)."""
    if len(got) != len(want):
        return False
    if any(abs(a.score - b.score) > tol + 1e-4 * abs(b.score) for a, b in zip(got, want)):
        return False
    if [h.id for h in got] == [h.id for h in want]:
        return True
    deeper = {h.id: h.score for h in one.search(q, k=40, mode=m, query_encoded=qj)}
    return all(a.id == b.id or (a.id in deeper and abs(deeper[a.id] - a.score) <= tol + 1e-4 * abs(a.score))
               for a, b in zip(got, want)) and len({h.id for h in got}) == len(got)


def paper_model(out):
    """100M passages. Inputs: bytes per document from bench/results/scale_m3_1m.md (1M BGE-M3-
    shaped docs, dense sq8 + ColBERT res1), hybrid latency at 1M (same file), our measured
    fan-out overhead, and a GPU rate derived from cited peak FLOPs (marked)."""
    n = 100_000_000
    per_doc = {"dense (sq8)": 1024, "sparse": 478, "colbert (res1, ~100 vectors)": 13016, "docstore": 423,
               "columns": 17, "bm25": 115}
    total_b = sum(per_doc.values())
    shard_docs = 1_000_000  # the size every 1M figure was measured at
    shards = n // shard_docs
    shard_bytes = total_b * shard_docs
    node_ram = 256 << 30
    # a shard's files in page cache (all of it, ColBERT codes included: the hybrid query rescores
    # with them) + ~1 GiB of process (scale_m3_1m.md: 0.5-1 GiB RSS before queries)
    per_shard_mem = shard_bytes + (1 << 30)
    shards_per_node = int((node_ram * 0.8) // per_shard_mem)
    nodes = -(-shards // shards_per_node)
    # query: fan-out + the slowest shard (~ a shard's p99): SHARD_P50_MS / SHARD_P99_MS
    fan = next(iter(out.get("fanout", {}).values()), {})
    # what a query with terms not seen before adds (statistics + candidates rounds)
    over = {r[0]: r[4] - r[1] for r in fan.get("rows", [])}.get("hybrid")
    merge_ms = fan.get("merge_ms")
    # XLM-R large (BGE-M3): ~304M non-embedding parameters -> ~2 x 304M = 0.61 GFLOP a token,
    # + attention ~4 x 24 x 1024 x L; a 256-token passage ~ 0.63 GFLOP x 256.
    tokens = 256
    flop_passage = (2 * 304e6 + 4 * 24 * 1024 * tokens) * tokens
    gpus = {"A100 (312 TFLOPS fp16 dense, NVIDIA A100 datasheet)": 312e12,
            "H100 SXM (989 TFLOPS bf16/fp16 dense, NVIDIA H100 datasheet)": 989e12}
    mfu = 0.40
    rates = {g: peak * mfu / flop_passage for g, peak in gpus.items()}
    out["model"] = {"passages": n, "bytes_per_doc": per_doc, "total_bytes_per_doc": total_b,
                    "shard_docs": shard_docs, "shards": shards, "shard_bytes": shard_bytes,
                    "node_ram": node_ram, "shards_per_node": shards_per_node, "nodes": nodes,
                    "fanout_overhead_ms": over, "merge_ms": merge_ms, "tokens": tokens,
                    "flop_passage": flop_passage, "mfu": mfu, "gpu_rates": rates}


def write(out, path: Path):
    L = []
    L.append("# Ray: distributed encoding, sharded index, 100M model\n")
    L.append(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with "
             f"other jobs during the run (load average {out.get('load', '?')} at the start and end of each "
             "section), so absolute figures are noisy; ratios come from interleaved rounds in one run. Python " + platform.python_version() + ", ray "
             + __import__("ray").__version__ + f". Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n")
    L.append("Command: `" + " ".join(["python bench/bench_ray.py", *sys.argv[1:]]) + "`. One loopback "
             "cluster (`ray.cluster_utils.Cluster`, head + 2 nodes, 1 CPU each, 127.0.0.1).\n")
    e = out.get("encode")
    if e:
        L.append(f"## Encoding throughput ({e['model']}, {e['passages']} passages of 40-120 words, "
                 f"blocks of {e['block']}, medians of {e['rounds']} interleaved rounds)\n")
        if out.get("encode_reused_from"):
            L.append(f"(From the run of {out['encode_reused_from']}: `{out.get('encode_command', '')}`.)\n")
        L.append("Every Ray row includes actor start and model load. 'Ray pool' is what `index --ray` runs now: "
                 "one `EncoderPool` for the whole run (4 blocks an actor in flight). 'Ray Data, one job' is "
                 "`encode_blocks` over every block; 'one job per 2 blocks' is what each `--ray-window` of 2 "
                 "blocks cost before the pool (a fresh actor pool and model load per window). 'one process' "
                 "is `encode_arrays` on the same blocks in the driver, one thread.\n")
        L.append("| configuration | wall s | passages/s | speed-up vs one process |")
        L.append("|---|---|---|---|")
        for c, m, pps, x in e["rows"]:
            L.append(f"| {c} | {m:.1f} | {pps:.0f} | {x:.2f}x |")
        L.append("")
    for codec, f in (out.get("fanout") or {}).items():
        L.append(f"## Fan-out and merge overhead, ColBERT codec {codec} ({f['docs']:,} docs, tiny M3-layout "
                 f"model with all four channels, {f['queries']} queries precomputed, k=10, medians of per-round "
                 f"p50s, {f['rounds']} rounds)\n")
        L.append("p50 ms (ratio to one index, median over rounds). The three sharded columns are the same "
                 "index asked three ways (module docstring): every query making 3 rounds (as before), a query "
                 "whose BM25 terms the coordinator has not seen (statistics + candidates with the documents "
                 "along), and one whose terms it has (candidates only). Exactness columns: 'terms seen' "
                 "against one index.\n")
        L.append("| mode | one index | 3 shards, 3 rounds | 3 shards, new terms | 3 shards, terms seen | "
                 "3 rounds / terms seen | same top-10 list | same, tie-aware | top-10 overlap |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        ba = f.get("before_over_after", {})
        for m, a, b3, r3, bn, rn, bs, rs, same, same_t, ov in f["rows"]:
            L.append(f"| {m} | {a:.2f} | {b3:.2f} ({r3:.1f}x) | {bn:.2f} ({rn:.1f}x) | {bs:.2f} ({rs:.1f}x) | "
                     f"{ba.get(m, float('nan')):.2f}x | {same}/{f['queries']} | {same_t}/{f['queries']} | {ov:.3f} |")
        rt = f.get("round_trips", {})
        L.append("\nFan-outs per query (mean over modes): " + ", ".join(f"{s} {v:.2f}" for s, v in rt.items())
                 + f". The coordinator's global merge + fusion of one hybrid query (3 shards x 3 channels x "
                 f"C=100 candidates), timed alone: {f['merge_ms']:.2f} ms; the rest of the added time is Ray "
                 "round trips.\n")
    m = out.get("model")
    if m:
        GiB = 1 << 30
        L.append("## Paper model: 100M passages\n")
        L.append("Inputs: bytes per document measured at 1M BGE-M3-shaped documents "
                 "(`bench/results/scale_m3_1m.md`: dense sq8, ColBERT res1 at ~100 vectors a document); "
                 f"per-shard hybrid latency at 1M from `bench/results/query_speed_1m.md` (evening run on the "
                 f"idle machine, 32-vector queries: p50 {SHARD_P50_MS} ms, p99 {SHARD_P99_MS} ms, the larger "
                 f"of its two runs' figures); "
                 "the fan-out overhead measured above; GPU encoding rates **derived from cited peak "
                 "FLOPs** (not measured here: this machine has no GPU).\n")
        L.append("| quantity | value |")
        L.append("|---|---|")
        L.append(f"| bytes per passage, all channels | {m['total_bytes_per_doc']:,} "
                 f"({', '.join(f'{k} {v:,}' for k, v in m['bytes_per_doc'].items())}) |")
        L.append(f"| index on disk, 100M | {m['total_bytes_per_doc'] * m['passages'] / 1e12:.2f} TB |")
        L.append(f"| shards (1M passages each, the measured size) | {m['shards']} |")
        L.append(f"| one shard on disk | {m['shard_bytes'] / GiB:.1f} GiB |")
        L.append(f"| shards per 256 GiB node (files in page cache + 1 GiB process, 80% of RAM) | {m['shards_per_node']} |")
        L.append(f"| nodes (one replica) | {m['nodes']} |")
        L.append(f"| nodes with 2 replicas | {2 * m['nodes']} |")
        over = m["fanout_overhead_ms"]
        L.append("| query p50 ~ fan-out + slowest of 100 shards (~ a shard's p99) | "
                 + (f"{over:.1f} ms fan-out (measured, 3 shards, terms not seen before) + {SHARD_P99_MS} ms (a "
                    f"shard's p99) = ~{over + SHARD_P99_MS:.0f} ms (~{over + SHARD_P50_MS:.0f} ms if every shard "
                    f"answered at its p50); the merge grows "
                    f"with shards x C: {m['merge_ms']:.2f} ms at 3 shards -> ~{m['merge_ms'] * 100 / 3:.0f} ms at 100 "
                    "if linear (a tree of coordinators, one per node, keeps it per node) |"
                    if over is not None else "not measured |"))
        L.append("| a shard's threads | one query thread per shard: with 8 shards a node and 16+ cores, "
                 "the fan-out runs in parallel on a node |")
        L.append(f"| encoding cost model | {m['flop_passage'] / 1e9:.0f} GFLOP a {m['tokens']}-token passage "
                 "(XLM-R large: ~304M non-embedding parameters x 2 FLOP + attention) |")
        for g, rate in m["gpu_rates"].items():
            hours = {n: m["passages"] / (rate * n) / 3600 for n in (8, 32, 128)}
            L.append(f"| {g}, at an assumed {m['mfu']:.0%} utilisation | ~{rate:,.0f} passages/s a GPU; "
                     f"100M in {hours[8]:.1f} h on 8, {hours[32]:.1f} h on 32, {hours[128]:.2f} h on 128 GPUs |")
        L.append("")
        L.append("The GPU rows are a model: peak FLOPs from NVIDIA's datasheets (cited), utilisation assumed; "
                 "measure `bench/suite/encoder` on the GPU you have before planning on them.\n")
    L.append("```json\n" + json.dumps(out, indent=1, default=str) + "\n```\n")
    path.write_text("\n".join(L))


# A 1M-document shard's hybrid query (bench/results/query_speed_1m.md, evening of 2026-12-07,
# idle machine, 32-vector queries; two runs: p50 25.5 / 27.6 ms, p99 32.6 / 34.4 ms).
SHARD_P50_MS = 27.6
SHARD_P99_MS = 34.4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--passages", type=int, default=1200)
    ap.add_argument("--block", type=int, default=100)
    ap.add_argument("--encode-model", default="sentence-transformers/all-MiniLM-L6-v2")
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-encode", action="store_true")
    ap.add_argument("--skip-fanout", action="store_true")
    ap.add_argument("--codecs", nargs="+", default=["res1", "fp16"], help="ColBERT codecs of the fan-out runs")
    ap.add_argument("--reuse-encode", action="store_true",
                    help="with --skip-encode: keep the encoding figures of the last run (bench/results/ray.json)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ray.md"))
    args = ap.parse_args()
    from hybridsearch.distributed.cluster import local_cluster

    out = {}
    loads = []
    with local_cluster(nodes=3, cpus_per_node=1, object_store_mb=300):
        if not args.skip_encode:
            loads.append(os.getloadavg()[0])
            bench_encode(args, out)
            loads.append(os.getloadavg()[0])
        if not args.skip_fanout:
            loads.append(os.getloadavg()[0])
            bench_fanout(args, out)
            loads.append(os.getloadavg()[0])
    out["load"] = " / ".join(f"{x:.1f}" for x in loads)
    js = Path(args.out).with_suffix(".json")
    if args.skip_encode and args.reuse_encode and js.exists():
        out["encode"] = json.loads(js.read_text()).get("encode")
        out["encode_reused_from"] = json.loads(js.read_text()).get("date")
        out["encode_command"] = json.loads(js.read_text()).get("command")
    out["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out["command"] = " ".join(["python bench/bench_ray.py", *sys.argv[1:]])
    paper_model(out)
    js.write_text(json.dumps(out, indent=1, default=str))
    write(out, Path(args.out))
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
