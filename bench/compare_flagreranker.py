"""Check that Reranker.compute_score equals FlagEmbedding's FlagReranker on one checkpoint.

FlagEmbedding 1.4 needs transformers < 5, so it runs in its own venv, given by --fe-python:

    python3 -m venv /tmp/fe && /tmp/fe/bin/pip install torch==2.13.0 "FlagEmbedding==1.4.*" "transformers>=4.56,<5"
    python bench/compare_flagreranker.py --fe-python /tmp/fe/bin/python [--model DIR]

Without --model a random checkpoint in the bge-reranker-v2-m3 layout is made (128 positions, so
every setting below keeps pairs within 128 tokens). For each setting the script compares the
scores and the token ids FlagReranker feeds its model (recorded from the model's forward) with
ours. Writes bench/results/flagreranker_compat.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info, table

LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 30)
PAIRS = [
    ["the quick brown fox", "the lazy dog"],
    ["dense retrieval", "sparse retrieval scores shared tokens with learned weights"],
    ["hybrid search", "bm25 is a classic lexical ranking function from information retrieval"],
    ["fox", "el zorro marrón salta sobre el perro perezoso"],
    ["数据检索 Ω€", "混合搜索 向量 稀疏 词元 unknown ✓ chars"],
    ["colbert token vectors", LONG],
    [LONG, "a passage after a very long query"],
    [LONG, LONG],
    ["", "an empty query"],
    ["an empty passage", ""],
    ["le renard brun", "le renard brun saute par dessus le chien paresseux"],
    ["vectors faiss", "vectors are stored in faiss and token matrices are memory mapped"],
]
# (label, compute_score keyword arguments); batch sizes differ between the two on purpose.
SETTINGS = [
    ("max_length=128", {"max_length": 128}),
    ("max_length=128, normalize", {"max_length": 128, "normalize": True}),
    ("max_length=48", {"max_length": 48}),
    ("max_length=64, query_max_length=16", {"max_length": 64, "query_max_length": 16}),
    ("max_length=24", {"max_length": 24}),
]
FE_BATCH, OUR_BATCH = 5, 3

FE_SCRIPT = textwrap.dedent("""
    import json, sys
    from FlagEmbedding import FlagReranker
    path, inp, out = sys.argv[1:4]
    job = json.load(open(inp))
    m = FlagReranker(path, use_fp16=False, devices="cpu", batch_size=job["batch"])
    seen = []
    forward = m.model.forward
    def recording_forward(*a, **kw):
        ids, mask = kw["input_ids"], kw["attention_mask"]
        for row, mrow in zip(ids.tolist(), mask.tolist()):
            seen.append(row[: sum(mrow)])
        return forward(*a, **kw)
    m.model.forward = recording_forward
    res = []
    for label, kw in job["settings"]:
        seen.clear()
        scores = m.compute_score(job["pairs"], **kw)
        res.append({"label": label, "scores": [float(x) for x in scores],
                    "ids": sorted(set(map(tuple, seen)))})
    single = m.compute_score(job["pairs"][0], max_length=128)
    json.dump({"results": res, "single": repr(single)}, open(out, "w"))
""")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fe-python", required=True, help="python of a venv with FlagEmbedding 1.4")
    ap.add_argument("--model", help="reranker folder (default: a random one)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "flagreranker_compat.md"))
    args = ap.parse_args()
    from hybridsearch.rerank import Reranker
    from hybridsearch.testing import make_tiny_reranker

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or str(make_tiny_reranker(tmp / "ckpt", seed=7, hidden=64, layers=3))
        (tmp / "job.json").write_text(json.dumps({"pairs": PAIRS, "settings": SETTINGS, "batch": FE_BATCH}))
        (tmp / "fe.py").write_text(FE_SCRIPT)
        r = subprocess.run([args.fe_python, str(tmp / "fe.py"), model, str(tmp / "job.json"), str(tmp / "fe.json")],
                           check=False, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"FlagEmbedding run failed:\n{r.stderr[-3000:]}")
        ref = json.loads((tmp / "fe.json").read_text())
        fe_version = subprocess.run(
            [args.fe_python, "-c", "import importlib.metadata as m; print(m.version('FlagEmbedding'), m.version('transformers'))"],
            check=False, capture_output=True, text=True).stdout.strip()
        rr = Reranker(model, device="cpu", batch_size=OUR_BATCH)
        rows, worst, all_ids_equal = [], 0.0, True
        for (label, kw), theirs in zip(SETTINGS, ref["results"]):
            ours = rr.compute_score(PAIRS, **kw)
            ids = rr.tokenize_pairs(PAIRS, max_length=kw["max_length"], query_max_length=kw.get("query_max_length"))
            same_ids = sorted(set(map(tuple, ids))) == [tuple(x) for x in theirs["ids"]]
            all_ids_equal &= same_ids
            diff = float(np.abs(np.array(ours) - np.array(theirs["scores"])).max())
            worst = max(worst, diff)
            longest = max(len(x) for x in ids)
            rows.append([label, f"{diff:.2e}", "yes" if same_ids else "NO", longest,
                         f"{np.ptp(theirs['scores']):.3f}"])
        our_single = rr.compute_score(PAIRS[0], max_length=128)
    ok = worst <= 1e-5 and all_ids_equal
    text = "\n\n".join([
        "# Reranker: output equality with FlagEmbedding's FlagReranker", machine_info(),
        (f"FlagEmbedding/transformers {fe_version} (own venv; transformers 4's `prepare_for_model` "
        f"path) vs hybridsearch `Reranker`, fp32 on CPU, checkpoint "
        f"{'`' + args.model + '`' if args.model else 'random XLMRobertaForSequenceClassification (num_labels=1), hidden 64, 3 layers, 128 positions'}; "
        f"{len(PAIRS)} pairs (long passages and long queries that force truncation, empty query and "
        f"passage, CJK and unknown characters); FlagReranker batch size {FE_BATCH}, ours {OUR_BATCH}."),
        table(["setting", "max abs score difference", "same token ids", "longest pair (tokens)",
               "score range (FE)"], rows),
        (f"Worst: {worst:.2e} ({'within' if worst <= 1e-5 else 'OVER'} the 1e-5 target); token ids "
        f"{'identical in every setting' if all_ids_equal else 'DIFFER'}."),
        (f"Single pair: FlagReranker 1.4 returns `{ref['single']}` (a one-element list); "
        f"hybridsearch returns a float, `{our_single!r}`, as FlagReranker 1.2 did."),
    ]) + "\n"
    print(text)
    Path(args.out).write_text(text)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
