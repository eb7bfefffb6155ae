"""The main job, offline: encode the example corpus with all-MiniLM-L6-v2 and answer questions.

Run: python examples/quickstart.py
"""

import json
from pathlib import Path

from hybridsearch import BGEM3Encoder

DATA = Path(__file__).parent / "data" / "mini_corpus.jsonl"
QUESTIONS = ["How does late interaction score a passage?", "What do plants make from light?"]


def main():
    docs = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    enc = BGEM3Encoder("sentence-transformers/all-MiniLM-L6-v2")
    print(enc)
    doc_vecs = enc.encode_arrays([d["title"] + ". " + d["text"] for d in docs], kind="passage").dense
    q_vecs = enc.encode_arrays(QUESTIONS, kind="query").dense
    for q, scores in zip(QUESTIONS, q_vecs @ doc_vecs.T):
        print(f"\n{q}")
        for i in scores.argsort()[::-1][:3]:
            print(f"  {scores[i]:.3f}  {docs[i]['_id']}  {docs[i]['title']}")


if __name__ == "__main__":
    main()
