"""Coded ColBERT MaxSim: whole-token decode against the split kernel (base by BLAS + nibble tables).

    python bench/bench_coded_maxsim.py bench/.cache/m3small1024/enc/corpus_colbert.npy

Takes real token vectors (a ``(T, d)`` float16 ``.npy``, e.g. the SciFact encodings cached by
``build_m3_small_1024.py``): codebooks (K=256, 1 bit a dimension) are trained on 40,000 tokens,
50,000 other tokens are coded as 500 documents of 100 tokens, and a 32-token query is scored
against all 500 by both kernels of ``multivector``:

* ``full``: ``_coded_range``, every token decoded whole (centroid + residual, ``d`` floats) and
  multiplied on all ``d`` axes (the kernel used before, and still for renormalising codecs);
* ``split``: ``CodedColbertStore.maxsim``, the query against each centroid's base by BLAS once,
  then the coded axes summed from the query's nibble tables (``_nibbles``; since 2026-12-07
  night: before, the coded axes were decoded and multiplied).

For the uniform layout and the transform layout. One thread, the two kernels interleaved, median
of ``--rounds``; scores are checked equal (to float32 rounding). Writes
bench/results/coded_maxsim.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine_info, token_args, token_sample  # noqa: E402


def main() -> None:
    a = token_args(__doc__, 110_000, 15, "coded_maxsim.md")

    from hybridsearch.retrievers import multivector as mv
    from hybridsearch.retrievers.colbert_codec import ColbertCodec

    shape, v = token_sample(a.vectors, 110_000)
    q = v[100_000:100_032]
    offsets = np.arange(0, 50_001, 100)
    rows = []
    for transform in (False, True):
        codec = ColbertCodec.train(v[60_000:100_000], nbits=1, k=256, transform=transform)
        store = mv.CodedColbertStore.from_arrays(v[:50_000], offsets, codec)
        cand = mv._readonly(np.arange(500, dtype=np.int64))
        q4, q_off4, q_len = mv._pad_queries(codec.rotate(q), np.array([0, q.shape[0]]))
        owner = mv._readonly(np.zeros(500, np.int64))
        out = np.zeros(500, np.float32)

        def full():
            mv._coded_range(mv._readonly(q4), mv._readonly(q_off4), mv._readonly(q_len), owner,
                            store.codes, store.residuals, *codec.kernel_tables(), store.offsets,
                            cand, 0, 500, out)
            return out.copy()

        def split():
            return store.maxsim(q, cand)

        diff = float(np.abs(full() - split()).max())
        t_full, t_split = [], []
        for _ in range(a.rounds):
            for fn, acc in ((full, t_full), (split, t_split)):
                t0 = time.perf_counter()
                fn()
                acc.append(1000 * (time.perf_counter() - t0))
        f, s = float(np.median(t_full)), float(np.median(t_split))
        rows.append(("transform" if transform else "uniform", codec.sections, codec.n_coded, f, s, f / s, diff))
        print(rows[-1], flush=True)
    lines = [
        "# Coded ColBERT MaxSim: whole-token decode vs split kernel (nibble tables)", "",
        f"Machine: {machine_info()}. Command: `python bench/bench_coded_maxsim.py {a.vectors} "
        f"--rounds {a.rounds}`. One thread; 500 documents x 100 tokens, {shape[1]}-d, a "
        "32-token query; median ms of interleaved rounds.", "",
        "| layout | sections (4/2/1-bit axes) | coded axes | full decode ms | split ms | speed-up | max score diff |",
        "|---|---|---|---|---|---|---|",
    ] + [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.2f}x | {r[6]:.1e} |" for r in rows] + [""]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
