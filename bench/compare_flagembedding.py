"""Check that BGEM3Encoder's outputs equal FlagEmbedding's BGEM3FlagModel on one checkpoint.

FlagEmbedding 1.4 needs transformers < 5, so it runs in its own venv, given by --fe-python:

    python3 -m venv /tmp/fe && /tmp/fe/bin/pip install torch==2.13.0 "FlagEmbedding==1.4.*" "transformers>=4.56,<5"
    python bench/compare_flagembedding.py --fe-python /tmp/fe/bin/python [--model DIR]

Without --model a random checkpoint in the bge-m3 layout is made. Writes
bench/results/flagembedding_compat.md with the largest absolute difference of every output.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info, table  # noqa: E402

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "fox fox fox fox dog",
    "dense",
    "sparse retrieval scores shared tokens with learned weights and colbert compares tokens",
    "数据检索 混合搜索 Ω€ unknown chars",
    "le renard brun saute par dessus le chien paresseux",
    "bm25 is a classic lexical ranking function from information retrieval bm25 bm25",
]
PAIRS = [(0, 1), (2, 3), (4, 5), (1, 6)]
WEIGHTS = [0.4, 0.2, 0.4]

FE_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from FlagEmbedding import BGEM3FlagModel
    path, texts_file, out = sys.argv[1:4]
    texts = open(texts_file).read().split("\\n")
    pairs = [(texts[i], texts[j]) for i, j in %r]
    m = BGEM3FlagModel(path, use_fp16=False, devices="cpu")
    o = m.encode(texts, batch_size=3, max_length=128, return_dense=True, return_sparse=True,
                 return_colbert_vecs=True)
    sc = m.compute_score(pairs, batch_size=4, max_query_length=128, max_passage_length=128,
                         weights_for_different_modes=%r)
    np.savez(out, dense=o["dense_vecs"], colbert=np.concatenate(o["colbert_vecs"]),
             clen=np.array([len(c) for c in o["colbert_vecs"]]),
             lex=np.array([repr({k: float(v) for k, v in d.items()}) for d in o["lexical_weights"]]),
             **{"score_" + k: np.array(v) for k, v in sc.items()})
""") % (PAIRS, WEIGHTS)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fe-python", required=True, help="python of a venv with FlagEmbedding 1.4")
    ap.add_argument("--model", help="checkpoint folder in the bge-m3 layout (default: a random one)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "flagembedding_compat.md"))
    args = ap.parse_args()
    from hybridsearch import BGEM3Encoder
    from hybridsearch.testing import make_tiny_m3

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(make_tiny_m3(Path(tmp) / "ckpt", seed=7, hidden=64, layers=3))
        (Path(tmp) / "texts.txt").write_text("\n".join(TEXTS))
        (Path(tmp) / "fe.py").write_text(FE_SCRIPT)
        subprocess.run([args.fe_python, str(Path(tmp) / "fe.py"), model, str(Path(tmp) / "texts.txt"),
                        str(Path(tmp) / "fe.npz")], check=True, capture_output=True)
        ref = dict(np.load(Path(tmp) / "fe.npz"))
        fe_version = subprocess.run([args.fe_python, "-c", "import importlib.metadata as m; print(m.version('FlagEmbedding'))"],
                                    capture_output=True, text=True).stdout.strip()
        enc = BGEM3Encoder(model, device="cpu")
        out = enc.encode(TEXTS, batch_size=3, max_length=128, return_colbert_vecs=True)
        sc = enc.compute_score([(TEXTS[i], TEXTS[j]) for i, j in PAIRS], batch_size=4, max_query_length=128,
                               max_passage_length=128, weights_for_different_modes=WEIGHTS)
    rows = [["dense_vecs", float(np.abs(out["dense_vecs"] - ref["dense"]).max())]]
    assert [len(c) for c in out["colbert_vecs"]] == ref["clen"].tolist(), "ColBERT lengths differ"
    rows.append(["colbert_vecs", float(np.abs(np.concatenate(out["colbert_vecs"]) - ref["colbert"]).max())])
    lex_diff = 0.0
    for ours, theirs in zip(out["lexical_weights"], ref["lex"]):
        theirs = ast.literal_eval(str(theirs))
        assert set(ours) == set(theirs), "lexical token ids differ"
        lex_diff = max([lex_diff] + [abs(float(ours[k]) - theirs[k]) for k in ours])
    rows.append(["lexical_weights (same token ids)", lex_diff])
    for k, v in sc.items():
        rows.append([f"compute_score[{k}]", float(np.abs(np.array(v) - ref["score_" + k]).max())])
    worst = max(r[1] for r in rows)
    text = "\n\n".join([
        "# Output equality with FlagEmbedding", machine_info(),
        f"FlagEmbedding {fe_version} (own venv) vs hybridsearch, fp32 on CPU, checkpoint "
        f"{'`' + args.model + '`' if args.model else 'random bge-m3 layout, hidden 64, 3 layers'}; "
        f"{len(TEXTS)} texts (repeated ids, unknown characters, CJK), {len(PAIRS)} pairs.",
        table(["output", "max abs difference"], [[r[0], f"{r[1]:.2e}"] for r in rows]),
        f"Worst: {worst:.2e} ({'within' if worst <= 1e-5 else 'OVER'} the 1e-5 target).",
    ]) + "\n"
    print(text)
    Path(args.out).write_text(text)
    sys.exit(0 if worst <= 1e-5 else 1)


if __name__ == "__main__":
    main()
