"""Command-line entry points: ``train embedder|reranker|pretrain`` and ``mine``.

The main CLI wires them with::

    from .train.cli import add_train_parser
    add_train_parser(subparsers)

and ``python -m hybridsearch.train.cli ...`` runs them standalone. Each sub-command sets
``func`` (called with the parsed args; returns an exit code).
"""

from __future__ import annotations

import argparse
import json
import sys


def _common(s: argparse.ArgumentParser, *, lr: float, batch_size: int) -> None:
    s.add_argument("model", help="model name or folder to start from")
    s.add_argument("data", help="training data: JSONL file or folder of JSONL files")
    s.add_argument("out", help="output folder")
    s.add_argument("--lr", type=float, default=lr)
    s.add_argument("--batch-size", type=int, default=batch_size)
    s.add_argument("--epochs", type=int, default=1)
    s.add_argument("--max-steps", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None)
    s.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    s.add_argument("--fp16", action="store_true", help="fp16 autocast + grad scaling (CUDA only)")
    s.add_argument("--no-progress", action="store_true")


def add_train_parser(subparsers) -> None:
    """Register ``train`` (with ``embedder``, ``reranker``, ``pretrain``) and ``mine``."""
    t = subparsers.add_parser("train", help="fine-tune an embedder or reranker, or pretrain (RetroMAE)",
                              description="Training commands.")
    tsub = t.add_subparsers(dest="train_command", metavar="WHAT")
    t.set_defaults(func=lambda a: (t.print_help(), 2)[1])

    e = tsub.add_parser("embedder", help="BGE-M3 unified fine-tuning (dense + sparse + ColBERT)")
    _common(e, lr=1e-5, batch_size=8)
    e.add_argument("--dense-only", action="store_true", help="dense InfoNCE only (no M3 heads trained)")
    e.add_argument("--no-self-distill", action="store_true")
    e.add_argument("--self-distill-start-step", type=int, default=0)
    e.add_argument("--fix-encoder", action="store_true", help="train the heads only")
    e.add_argument("--cache-hidden", action="store_true",
                   help="with --fix-encoder: encode each distinct text once, reuse its hidden states")
    e.add_argument("--colbert-dim", type=int, default=None)
    e.add_argument("--group-size", type=int, default=4)
    e.add_argument("--sub-batch-size", type=int, default=None, help="GradCache chunk size")
    e.add_argument("--temperature", type=float, default=0.02)
    e.add_argument("--no-in-batch-negatives", action="store_true")
    e.add_argument("--query-max-len", type=int, default=64)
    e.add_argument("--passage-max-len", type=int, default=256)
    e.add_argument("--gradient-checkpointing", action="store_true")
    e.add_argument("--save-steps", type=int, default=None)
    e.add_argument("--resume-from", default=None)
    e.set_defaults(func=cmd_train_embedder)

    r = tsub.add_parser("reranker", help="cross-encoder fine-tuning (group-wise cross-entropy)")
    _common(r, lr=2e-5, batch_size=4)
    r.add_argument("--group-size", type=int, default=4)
    r.add_argument("--max-length", type=int, default=256)
    r.add_argument("--query-max-length", type=int, default=None)
    r.add_argument("--save-steps", type=int, default=None)
    r.add_argument("--resume-from", default=None)
    r.add_argument("--gradient-checkpointing", action="store_true")
    r.set_defaults(func=cmd_train_reranker)

    p = tsub.add_parser("pretrain", help="RetroMAE pretraining; data: texts (.txt) or JSONL")
    _common(p, lr=1e-4, batch_size=16)
    p.add_argument("--encoder-mask-ratio", type=float, default=0.3)
    p.add_argument("--decoder-mask-ratio", type=float, default=0.5)
    p.add_argument("--max-length", type=int, default=256)
    p.set_defaults(func=cmd_pretrain)

    m = subparsers.add_parser("mine", help="mine hard negatives for training data with an index")
    m.add_argument("index", help="index folder (built from the corpus negatives come from)")
    m.add_argument("data", help="input JSONL (query/pos[/pos_ids]) or a BEIR folder with --beir-split")
    m.add_argument("out", help="output JSONL")
    m.add_argument("--beir-split", default=None, help="read DATA as a BEIR folder, this qrels split")
    m.add_argument("--mode", default="hybrid", choices=["dense", "sparse", "colbert", "bm25", "hybrid"])
    m.add_argument("--range", default="10-100", help="rank window lo-hi to sample from (default 10-100)")
    m.add_argument("--n-neg", type=int, default=7)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--reranker", default=None, help="reranker model: add pos_scores/neg_scores")
    m.add_argument("--model", default=None, help="encoder for the index (default: the manifest's)")
    m.set_defaults(func=cmd_mine)


def _progress(a) -> bool:
    return not a.no_progress


def _report(res) -> int:
    print(json.dumps({"out": str(res.out_dir), "steps": res.step,
                      "first_loss": res.losses[0] if res.losses else None,
                      "last_loss": res.losses[-1] if res.losses else None}))
    return 0


def cmd_train_embedder(a) -> int:
    from .embedder import train_embedder

    return _report(train_embedder(
        a.model, a.data, a.out, unified=not a.dense_only, self_distill=not a.no_self_distill,
        self_distill_start_step=a.self_distill_start_step, fix_encoder=a.fix_encoder, cache_hidden=a.cache_hidden,
        colbert_dim=a.colbert_dim, group_size=a.group_size, batch_size=a.batch_size,
        sub_batch_size=a.sub_batch_size, temperature=a.temperature,
        in_batch_negatives=not a.no_in_batch_negatives, lr=a.lr, epochs=a.epochs,
        max_steps=a.max_steps, query_max_len=a.query_max_len, passage_max_len=a.passage_max_len,
        gradient_checkpointing=a.gradient_checkpointing, bf16=a.bf16, fp16=a.fp16, seed=a.seed,
        save_steps=a.save_steps, resume_from=a.resume_from, device=a.device,
        show_progress=_progress(a)))


def cmd_train_reranker(a) -> int:
    from .reranker import train_reranker

    return _report(train_reranker(
        a.model, a.data, a.out, group_size=a.group_size, batch_size=a.batch_size, lr=a.lr,
        epochs=a.epochs, max_steps=a.max_steps, max_length=a.max_length,
        query_max_length=a.query_max_length, seed=a.seed, save_steps=a.save_steps, bf16=a.bf16,
        fp16=a.fp16, gradient_checkpointing=a.gradient_checkpointing, device=a.device,
        show_progress=_progress(a), resume_from=a.resume_from))


def cmd_pretrain(a) -> int:
    from .pretrain import pretrain_retromae

    return _report(pretrain_retromae(
        a.model, a.data, a.out, encoder_mask_ratio=a.encoder_mask_ratio,
        decoder_mask_ratio=a.decoder_mask_ratio, batch_size=a.batch_size, lr=a.lr, epochs=a.epochs,
        max_steps=a.max_steps, max_length=a.max_length, seed=a.seed, bf16=a.bf16, fp16=a.fp16,
        device=a.device, show_progress=_progress(a)))


def cmd_mine(a) -> int:
    from ..index.hybrid import HybridIndex
    from .data import from_beir, load_records, write_jsonl
    from .mining import mine_hard_negatives

    try:
        lo, hi = (int(x) for x in a.range.split("-"))
    except ValueError:
        print(f"error: --range must look like 10-100, got {a.range!r}", file=sys.stderr)
        return 2
    records = from_beir(a.data, a.beir_split) if a.beir_split else load_records(a.data)
    reranker = None
    if a.reranker:
        from ..rerank import Reranker

        reranker = Reranker(a.reranker)
    index = HybridIndex.open(a.index, a.model)
    try:
        out = mine_hard_negatives(index, records, mode=a.mode, range_=(lo, hi), n_neg=a.n_neg,
                                  seed=a.seed, reranker=reranker, show_progress=True)
    finally:
        index.close()
    write_jsonl(out, a.out)
    print(json.dumps({"out": a.out, "records": len(out),
                      "negatives": sum(len(r["neg"]) for r in out)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybridsearch.train.cli",
                                     description="hybridsearch training commands")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train_parser(sub)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
