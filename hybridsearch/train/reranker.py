"""Cross-encoder fine-tuning with group-wise cross-entropy (1 positive vs G-1 negatives).

Each query's group is scored as ``(query, passage)`` pairs by a sequence-classification model
with one label; the loss is :func:`~hybridsearch.train.losses.reranker_group_ce` over the
``(B, G)`` logits (plus, when every record of a batch has teacher scores, the group-wise
:func:`~hybridsearch.train.losses.distill_loss` with temperature 1, averaged with it). The saved
folder (``save_pretrained`` + tokenizer) loads in :class:`hybridsearch.rerank.Reranker`.
Every saved folder also holds ``trainer_state.pt`` (step, optimizer, scheduler, RNG), so
``resume_from`` continues a stopped run where it left off.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import losses as L
from .data import GroupCollator, batch_order, load_records
from .embedder import (
    STATE_FILE,
    TrainResult,
    _autocast,
    linear_schedule,
    load_trainer_state,
    save_trainer_state,
)


def load_cross_encoder(model_name_or_path: str | os.PathLike, cache_dir: str | None = None):
    """(model, tokenizer): a one-label sequence-classification model; a plain encoder gets a
    freshly initialised classification head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..encode.resolve import resolve_model

    path = resolve_model(model_name_or_path, cache_dir=cache_dir)
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1)
    return model, tok


def tokenize_pairs(tokenizer, queries: Sequence[str], passages: Sequence[str], max_length: int,
                   query_max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Pairs as the model sees them: the tokenizer's pair template, query cut to
    ``query_max_length`` (default ``3/4`` of ``max_length``), then the passage cut to fit."""
    qmax = query_max_length or max_length * 3 // 4
    q_ids = tokenizer(list(queries), add_special_tokens=False, truncation=True, max_length=qmax)["input_ids"]
    q_txt = tokenizer.batch_decode(q_ids)
    enc = tokenizer(q_txt, list(passages), truncation="longest_first", max_length=max_length,
                    padding=True, return_tensors="pt")
    return dict(enc)


def train_reranker(model_path: str | os.PathLike, data: Any, out_dir: str | os.PathLike, *,
                   group_size: int = 4, batch_size: int = 4, lr: float = 2e-5, weight_decay: float = 0.01,
                   warmup_ratio: float = 0.1, epochs: int = 1, max_steps: int | None = None,
                   max_length: int = 256, query_max_length: int | None = None, seed: int = 0,
                   save_steps: int | None = None, bf16: bool = False, fp16: bool = False,
                   gradient_checkpointing: bool = False, device: str | None = None,
                   show_progress: bool = True, max_grad_norm: float | None = 1.0,
                   resume_from: str | os.PathLike | None = None) -> TrainResult:
    """Fine-tune a cross-encoder; save it (and ``checkpoint-N`` every ``save_steps``) to ``out_dir``.

    ``resume_from``: a folder this function saved (``checkpoint-N`` or ``out_dir``); its weights,
    optimizer, schedule, RNG and step are restored and training goes on with the same batches it
    would have seen. Pass the same data and arguments as the first run.
    """
    from tqdm.auto import tqdm

    records = load_records(data)
    if resume_from is not None:
        if not (Path(resume_from) / STATE_FILE).is_file():  # before loading any model
            raise FileNotFoundError(f"{Path(resume_from) / STATE_FILE} not found: {resume_from} is not a "
                                    "resumable reranker checkpoint")
        model_path = resume_from
    torch.manual_seed(seed)
    model, tok = load_cross_encoder(model_path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev).train()
    if gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    collator = GroupCollator(group_size, seed)
    per_epoch = len(batch_order(records, batch_size, seed, 0))
    total = max_steps if max_steps is not None else per_epoch * epochs
    if total < 1:
        raise ValueError("nothing to train: max_steps/epochs give zero steps")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    sched = linear_schedule(opt, int(total * warmup_ratio), total)
    scaler = torch.amp.GradScaler("cuda") if fp16 and dev.type == "cuda" else None
    step = 0
    if resume_from is not None:
        step = int(load_trainer_state(resume_from, opt, sched, scaler, "reranker ")["step"])
    out_dir = Path(out_dir)
    result = TrainResult(out_dir, step)

    def save(folder: Path) -> None:
        _save(model, tok, folder)
        save_trainer_state(folder, step, opt, sched, scaler)

    bar = tqdm(total=total, initial=step, desc="train reranker", unit="step", disable=not show_progress)
    epoch, t0, seen = step // per_epoch, time.perf_counter(), 0
    while step < total:
        for b in batch_order(records, batch_size, seed, epoch)[step - epoch * per_epoch:]:
            if step >= total:
                break
            batch = collator([records[i] for i in b], step=step)
            G = group_size
            qs = [q for q in batch["queries"] for _ in range(G)]
            enc = {k: v.to(dev) for k, v in tokenize_pairs(tok, qs, batch["passages"], max_length,
                                                              query_max_length).items()}
            with _autocast(dev, bf16, fp16):
                logits = model(**enc, return_dict=True).logits[:, 0].float().view(len(b), G)
            loss = L.reranker_group_ce(logits)
            if batch["teacher"] is not None:
                loss = (loss + L.distill_loss(logits, torch.as_tensor(batch["teacher"], device=dev), 1.0)) / 2
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(opt)
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            seen += len(b)
            result.losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}", qps=f"{seen / max(time.perf_counter() - t0, 1e-9):.1f}")
            bar.update(1)
            if save_steps and step % save_steps == 0 and step < total:
                save(out_dir / f"checkpoint-{step}")
        epoch += 1
    bar.close()
    model.eval()
    save(out_dir)
    result.step = step
    return result


def _save(model, tok, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
