"""Encoder throughput: hybridsearch's BGEM3Encoder against a bare transformers forward pass.

Same checkpoint, same texts, same batch size, measured interleaved in one run. The checkpoint is
a random XLM-RoBERTa in the exact bge-m3 layout (real weights are not reachable offline), sized
like a small production encoder by default. Three variants are timed:

* ours        -- encode_arrays(): tokenise, length-sort, forward, all three heads, back to order;
* bare sorted -- tokenise, length-sort, pad, forward only (the same work minus our heads and
  bookkeeping: the difference is the framework's overhead);
* bare input order -- tokenise and forward in input order (what sorting saves).

Usage: python bench/bench_encode.py [--n 512] [--hidden 384] [--layers 6] [--repeat 3]
Writes bench/results/encode.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info, table, timed  # noqa: E402

from hybridsearch import BGEM3Encoder  # noqa: E402
from hybridsearch.testing import DEFAULT_CORPUS, make_tiny_m3  # noqa: E402


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = " ".join(DEFAULT_CORPUS).split()
    return [" ".join(rng.choice(words, size=int(rng.integers(8, 200)))) for _ in range(n)]


def bare(model, tok, texts, batch_size, sort):
    ids = tok(texts, truncation=True, max_length=512)["input_ids"]
    order = np.argsort([-len(x) for x in ids], kind="stable") if sort else np.arange(len(ids))
    with torch.inference_mode():
        for s in range(0, len(ids), batch_size):
            batch = [{"input_ids": ids[i]} for i in order[s:s + batch_size]]
            enc = tok.pad(batch, padding=True, return_tensors="pt")
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "encode.md"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_m3(Path(tmp) / "m3", hidden=args.hidden, layers=args.layers, max_positions=512)
        enc = BGEM3Encoder(path, device="cpu", batch_size=args.batch_size, max_batch_tokens=10**9)
        texts = make_texts(args.n)
        n_tok = int(sum(len(x) for x in enc.tokenizer(texts, truncation=True, max_length=512)["input_ids"]))
        variants = {
            "ours (dense+sparse+colbert)": lambda: enc.encode_arrays(texts, sparse=True, colbert=True),
            "ours (dense only)": lambda: enc.encode_arrays(texts, sparse=False),
            "bare forward, length-sorted": lambda: bare(enc.model, enc.tokenizer, texts, args.batch_size, True),
            "bare forward, input order": lambda: bare(enc.model, enc.tokenizer, texts, args.batch_size, False),
        }
        bare(enc.model, enc.tokenizer, texts[:64], args.batch_size, True)  # warm-up
        times = {k: [] for k in variants}
        for _ in range(args.repeat):  # interleaved, so drift hits every variant alike
            for k, f in variants.items():
                times[k].append(timed(f)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["bare forward, length-sorted"]
    rows = [[k, med[k], args.n / med[k], n_tok / med[k], f"{(med[k] / base - 1) * 100:+.1f}%"] for k in variants]
    text = "\n\n".join([
        "# Encoder throughput",
        machine_info(),
        f"Random XLM-RoBERTa in the bge-m3 layout: hidden {args.hidden}, {args.layers} layers, "
        f"colbert dim {args.hidden}; {args.n} texts, {n_tok} tokens; batch size {args.batch_size}; "
        f"fp32 on CPU; median of {args.repeat} interleaved runs.",
        table(["variant", "median s", "texts/s", "tokens/s", "vs bare sorted"], rows),
        "Command: `python bench/bench_encode.py " + " ".join(sys.argv[1:]) + "`",
    ]) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
