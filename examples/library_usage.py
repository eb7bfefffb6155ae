"""The plain Python API, offline: create an index, add documents with metadata, search in every
mode the model supports, filter, delete, and read the statistics.

Uses sentence-transformers/all-MiniLM-L6-v2 (dense only) plus BM25, so the modes here are
dense, bm25 and hybrid; with BAAI/bge-m3 the sparse and colbert modes work the same way.
Everything happens in a temporary folder.

Run: python examples/library_usage.py
"""

import tempfile
from pathlib import Path

from hybridsearch import HybridIndex

DOCS = [
    {"id": "faiss", "text": "FAISS searches dense vectors with exact or approximate indexes.",
     "metadata": {"topic": "dense", "year": 2017}},
    {"id": "bm25", "text": "BM25 ranks documents by term frequency, inverse document frequency and length.",
     "metadata": {"topic": "lexical", "year": 1994}},
    {"id": "splade", "text": "SPLADE learns sparse term weights with a masked language model head.",
     "metadata": {"topic": "sparse", "year": 2021}},
    {"id": "colbert", "text": "ColBERT compares every query token with every passage token (late interaction).",
     "metadata": {"topic": "multi-vector", "year": 2020}},
    {"id": "m3", "text": "BGE-M3 produces dense, sparse and multi-vector representations in one pass.",
     "metadata": {"topic": "dense", "year": 2024, "lang": ["en", "zh"]}},
]


def show(title, hits):
    print(f"  {title}")
    for h in hits:
        channels = ", ".join(f"{c}={s:.3f}" for c, s in h.scores.items() if s is not None)
        print(f"    {h.id:<8} score={h.score:.3f}  [{channels}]  {h.metadata}")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        index = HybridIndex.create(Path(tmp) / "demo", "sentence-transformers/all-MiniLM-L6-v2")
        print(f"created {index}; channels: {index.channels}")

        print(f"added {index.add(DOCS)} documents (one atomic commit)")
        query = "which method scores tokens against each other?"
        print(f"\nquery: {query!r}")
        for mode in (*index.channels, "hybrid"):
            show(f"mode={mode}", index.search(query, k=3, mode=mode))

        show("hybrid with RRF fusion", index.search(query, k=3, fusion="rrf"))
        show("hybrid, BM25 weighted up", index.search(query, k=3, weights={"bm25": 1.0}))

        print("\nfilters apply to every channel:")
        show("year >= 2020", index.search("representations", k=5, filter={"year": {"gte": 2020}}))
        show("topic in [dense, sparse], not 2024",
             index.search("representations", k=5, filter={"topic": {"in": ["dense", "sparse"]},
                                                          "year": {"ne": 2024}}))

        batch = index.search_batch(["lexical ranking", "vector search"], k=1)
        print("\nbatch of two queries -> " + ", ".join(hits[0].id for hits in batch))

        index.upsert([{"id": "bm25", "text": "Okapi BM25: a probabilistic lexical ranking function.",
                       "metadata": {"topic": "lexical", "year": 1994}}])
        print(f"\nupserted 'bm25': {index.get('bm25')['text']!r}")
        print(f"deleted {index.delete(['splade'])} document; 'splade' in index: {'splade' in index}")

        stats = index.stats()
        print(f"\nstats: {stats['documents']} documents, {stats['deleted_pending_compaction']} deleted "
              f"pending compaction, {stats['segments']} segments, {stats['tokens']} tokens")
        for ch, b in stats["channel_bytes"].items():
            print(f"  {ch:<9} {b['bytes']:>9} bytes  ({b['bytes_per_doc']:.0f} per document)")
        index.compact()
        print(f"after compact(): {index.stats()['segments']} segment, "
              f"{index.stats()['deleted_pending_compaction']} deleted pending")
        index.close()


if __name__ == "__main__":
    main()
