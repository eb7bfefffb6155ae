"""FlagEmbedding side of the encoder section, run in FlagEmbedding's own venv (it needs
transformers < 5). Reads one JSON command per line on stdin and answers one JSON line:

  {"cmd": "load", "model": DIR}                        -> {"ok": true, "version": ...}
  {"cmd": "encode", "texts": FILE, "batch_size": B}    -> {"seconds": s}   (dense+sparse+ColBERT)
  {"cmd": "corpus", "texts": FILE}                     -> {"seconds": s}   (encodes and keeps)
  {"cmd": "score", "texts": FILE, "k": K, "weights": [wd, ws, wc]}
        -> {"seconds": [per query], "top": [[doc index, ...], ...]}

``score`` is the brute-force hybrid scoring FlagEmbedding offers: every document scored with
dense dot products, ``compute_lexical_matching_score`` and ``colbert_score``, weighted sum.
Only numpy, torch and FlagEmbedding are imported here.
"""

import json
import sys
import time

import numpy as np


def main():
    from importlib import metadata

    from FlagEmbedding import BGEM3FlagModel

    model, corpus = None, None
    for line in sys.stdin:
        c = json.loads(line)
        if c["cmd"] == "load":
            model = BGEM3FlagModel(c["model"], use_fp16=False, devices="cpu")
            out = {"ok": True, "version": metadata.version("FlagEmbedding"),
                   "transformers": metadata.version("transformers"), "torch": metadata.version("torch")}
        elif c["cmd"] in ("encode", "corpus"):
            texts = json.load(open(c["texts"]))
            t = time.perf_counter()
            o = model.encode(texts, batch_size=c.get("batch_size", 32), max_length=512, return_dense=True,
                             return_sparse=True, return_colbert_vecs=True)
            out = {"seconds": time.perf_counter() - t}
            if c["cmd"] == "corpus":
                corpus = o
        elif c["cmd"] == "score":
            texts = json.load(open(c["texts"]))
            wd, ws, wc = c["weights"]
            q = model.encode(texts, batch_size=32, max_length=512, return_dense=True, return_sparse=True,
                             return_colbert_vecs=True)
            secs, tops = [], []
            dd = np.asarray(corpus["dense_vecs"])
            for i in range(len(texts)):
                t = time.perf_counter()
                dense = dd @ q["dense_vecs"][i]
                sparse = np.array([model.compute_lexical_matching_score(q["lexical_weights"][i], lw)
                                   for lw in corpus["lexical_weights"]])
                colb = np.array([float(model.colbert_score(q["colbert_vecs"][i], cv))
                                 for cv in corpus["colbert_vecs"]])
                s = wd * dense + ws * sparse + wc * colb
                top = np.argsort(-s, kind="stable")[: c["k"]]
                secs.append(time.perf_counter() - t)
                tops.append(top.tolist())
            out = {"seconds": secs, "top": tops}
        else:
            out = {"error": f"unknown command {c['cmd']!r}"}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
