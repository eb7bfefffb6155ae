"""Memory an open index costs while it answers queries, measured in a fresh process so that
nothing else the benchmark allocated is counted:

    python serve_rss.py ours INDEX_DIR MODEL_DIR N_QUERIES COLBERT(0|1)
    python serve_rss.py milvus DB_FOLDER N_QUERIES COLBERT(0|1)

Prints one JSON line: ``{"rss_mib": RSS after opening and answering the queries minus RSS
before opening}``. Queries are ``bench_index_scale.query_set`` (seed 7), as in the scale section:
dense, BM25 and hybrid (plus learned sparse when the index has it).
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_index_scale import _row, query_set  # noqa: E402

from suite.report import rss_mib  # noqa: E402


def ours(index_dir: str, model_dir: str, nq: int, colbert: bool) -> float:
    from hybridsearch import BGEM3Encoder, HybridIndex

    enc = BGEM3Encoder(model_dir, device="cpu")
    qenc, qtexts = query_set(nq, np.random.default_rng(7), colbert)
    r0 = rss_mib()
    idx = HybridIndex.open(index_dir, enc)
    for mode in ("dense", "bm25", "hybrid") + (("sparse",) if colbert else ()):
        for i in range(nq):
            idx.search(qtexts[i], k=10, mode=mode, query_encoded=_row(qenc, i))
    return rss_mib() - r0


def milvus(folder: str, nq: int, colbert: bool) -> float:
    from suite.milvus import MilvusLite, _sparse_row

    qenc, qtexts = query_set(nq, np.random.default_rng(7), colbert)
    r0 = rss_mib()
    m = MilvusLite.reopen(folder)
    chans = ["dense", "bm25"] + (["sparse"] if colbert else [])
    for i in range(nq):
        sp = _sparse_row(qenc.sparse, i) if colbert else None
        m.search("dense", dense=qenc.dense[i])
        m.search("bm25", text=qtexts[i])
        m.hybrid(chans, dense=qenc.dense[i], sparse=sp, text=qtexts[i], weights=[1 / len(chans)] * len(chans))
    return rss_mib() - r0


if __name__ == "__main__":
    kind, *a = sys.argv[1:]
    if kind == "ours":
        mib = ours(a[0], a[1], int(a[2]), a[3] == "1")
    else:
        mib = milvus(a[0], int(a[1]), a[2] == "1")
    print(json.dumps({"rss_mib": mib}))
