"""Milvus Lite (``milvus-lite`` + ``pymilvus``) as a user would set it up for hybrid search:
one collection with a dense FLOAT_VECTOR (FLAT, inner product), optionally a learned-sparse
SPARSE_FLOAT_VECTOR (inverted index, inner product) and a BM25 function over the text field
(standard tokenizer, lowercase, English stopwords), queried
with ``search`` per channel and ``hybrid_search`` with ``WeightedRanker`` or ``RRFRanker``.

Milvus Lite 3.2's analyzer is a pure-Python ``\w+`` tokenizer with lowercase and an optional
explicit stopword list: it ignores stemmer filters and does not expand ``_english_``. So the
collection gets the standard tokenizer with the same English stopword list as our BM25 channel,
and no stemming (ours stems: the quality section says so next to the figures).

Milvus Lite returns BM25 scores negated in ``distance``; :meth:`MilvusLite.search` flips them.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np


def english() -> dict:
    from hybridsearch.retrievers.bm25 import ENGLISH_STOPWORDS

    return {"tokenizer": "standard", "filter": ["lowercase", {"type": "stop", "stop_words": list(ENGLISH_STOPWORDS)}]}


def available() -> bool:
    try:
        import milvus_lite  # noqa: F401
        import pymilvus  # noqa: F401
    except ImportError:
        return False
    return True


def _sparse_row(csr, i: int) -> dict[int, float]:
    a, b = csr.indptr[i], csr.indptr[i + 1]
    return dict(zip(csr.indices[a:b].tolist(), csr.data[a:b].tolist()))


class MilvusLite:
    def __init__(self, folder: str | Path, dim: int, sparse: bool, bm25: bool, analyzer: dict | None = None):
        from pymilvus import DataType, Function, FunctionType, MilvusClient

        self.folder = Path(folder)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.client = MilvusClient(str(self.folder / "milvus.db"))
        s = self.client.create_schema(auto_id=False)
        s.add_field("id", DataType.INT64, is_primary=True)
        s.add_field("text", DataType.VARCHAR, max_length=65535, enable_analyzer=bm25,
                    **({"analyzer_params": analyzer or english()} if bm25 else {}))
        s.add_field("dense", DataType.FLOAT_VECTOR, dim=dim)
        ip = self.client.prepare_index_params()
        ip.add_index("dense", index_type="FLAT", metric_type="IP")
        self.channels = ["dense"]
        if sparse:
            s.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
            ip.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
            self.channels.append("sparse")
        if bm25:
            s.add_field("bm25", DataType.SPARSE_FLOAT_VECTOR)
            s.add_function(Function(name="bm25fn", function_type=FunctionType.BM25,
                                    input_field_names=["text"], output_field_names=["bm25"]))
            ip.add_index("bm25", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
            self.channels.append("bm25")
        self.client.create_collection("c", schema=s, index_params=ip)

    @classmethod
    def reopen(cls, folder: str | Path) -> MilvusLite:
        """The collection a previous process built in ``folder``, loaded for search."""
        self = cls.__new__(cls)
        from pymilvus import MilvusClient

        self.folder = Path(folder)
        self.client = MilvusClient(str(self.folder / "milvus.db"))
        self.client.load_collection("c")
        fields = {f["name"] for f in self.client.describe_collection("c")["fields"]}
        self.channels = [c for c in ("dense", "sparse", "bm25") if c in fields]
        return self

    def insert(self, dense: np.ndarray, texts: list[str], sparse=None, chunk: int = 2000, base: int = 0) -> float:
        """Insert in chunks, then flush (so searches hit sealed, indexed segments). Seconds."""
        t = time.perf_counter()
        for a in range(0, len(texts), chunk):
            rows = []
            for i in range(a, min(len(texts), a + chunk)):
                r = {"id": base + i, "text": texts[i], "dense": dense[i]}
                if "sparse" in self.channels:
                    r["sparse"] = _sparse_row(sparse, i)
                rows.append(r)
            self.client.insert("c", rows)
        self.client.flush("c")
        return time.perf_counter() - t

    def disk_bytes(self) -> int:
        from .report import dir_bytes

        return dir_bytes(self.folder)

    def _req(self, channel, dense, sparse, text, limit):
        from pymilvus import AnnSearchRequest

        data = {"dense": dense, "sparse": sparse, "bm25": text}[channel]
        return AnnSearchRequest(data=[data], anns_field=channel, param={}, limit=limit)

    def search(self, channel: str, dense=None, sparse=None, text=None, k: int = 10) -> tuple[list[int], list[float]]:
        data = {"dense": dense, "sparse": sparse, "bm25": text}[channel]
        res = self.client.search("c", data=[data], anns_field=channel, limit=k, output_fields=["id"])[0]
        sign = -1.0 if channel == "bm25" else 1.0
        return [h["id"] for h in res], [sign * h["distance"] for h in res]

    def hybrid(self, channels: list[str], dense=None, sparse=None, text=None, k: int = 10,
               per_route: int = 100, weights: list[float] | None = None, rrf_k: int | None = None) -> list[int]:
        from pymilvus import RRFRanker, WeightedRanker

        reqs = [self._req(c, dense, sparse, text, per_route) for c in channels]
        ranker = RRFRanker(rrf_k) if rrf_k is not None else WeightedRanker(*weights)
        res = self.client.hybrid_search("c", reqs, ranker=ranker, limit=k, output_fields=["id"])[0]
        return [h["id"] for h in res]

    def close(self) -> None:
        """Close the client and stop Milvus Lite's in-process server for this file, which
        otherwise keeps the database locked against other processes."""
        try:
            self.client.close()
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(str(self.folder / "milvus.db"))
        except Exception:  # noqa: BLE001 -- closing is best effort
            pass
