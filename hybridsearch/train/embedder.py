"""BGE-M3 style embedder fine-tuning: unified dense + sparse + ColBERT training with
self-distillation, in-batch negatives and gradient caching, in a plain torch loop.

:class:`M3Model` holds an encoder and the two M3 heads (added when the checkpoint has none:
``sparse_linear = Linear(h, 1)``, ``colbert_linear = Linear(h, colbert_dim or h)``) and computes
the same representations as :class:`hybridsearch.encode.BGEM3Encoder`. :func:`train_embedder`
trains it and saves checkpoints in the ``BAAI/bge-m3`` layout (encoder ``save_pretrained`` +
tokenizer + ``colbert_linear.pt`` + ``sparse_linear.pt`` + ``1_Pooling/config.json``), each with
a ``trainer_state.pt`` (optimizer, scheduler, step, RNG; loaded with ``weights_only=True``) so
``resume_from`` continues.

Loss per step (``s`` are ``(B, B*G)`` score matrices with in-batch negatives, or ``(B, G)``):
``unified``: :func:`~hybridsearch.train.losses.m3_unified_loss` (self-distillation from step
``self_distill_start_step``); otherwise dense InfoNCE. When every record of a batch carries
teacher scores (``pos_scores``/``neg_scores``), ``L = (L + KD) / 2`` with ``KD`` the group-wise
:func:`~hybridsearch.train.losses.distill_loss` of each channel (``(dense + 0.1 sparse +
colbert) / 3`` in unified mode).

GradCache (``sub_batch_size``): representations of the whole batch are computed in chunks
without gradients, the loss is taken on them (every in-batch negative present), its gradients
with respect to the representations are kept, and each chunk is re-encoded with gradients and
back-propagated with those cached gradients (dropout replayed with the saved RNG state). The
parameter gradients equal a full-batch step; memory is that of one chunk.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import losses as L
from .data import GroupCollator, Record, batch_order, load_records

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"


# ============================================================================ model


class M3Model(torch.nn.Module):
    """Encoder + M3 heads, producing training representations (differentiable)."""

    def __init__(self, encoder, tokenizer, sparse_linear: torch.nn.Linear,
                 colbert_linear: torch.nn.Linear, pooling: str, source: Path | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.sparse_linear = sparse_linear
        self.colbert_linear = colbert_linear
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.source = source
        self.query_prefix = self.passage_prefix = ""
        self.trunk_cache: FrozenTrunkCache | None = None  # set when the encoder is frozen and cached
        self.vocab_size = max(len(tokenizer), int(encoder.config.vocab_size))
        tok = tokenizer
        self.unused_ids = sorted({i for i in (tok.cls_token_id, tok.eos_token_id, tok.pad_token_id,
                                              tok.unk_token_id) if i is not None})

    @classmethod
    def from_pretrained(cls, model_name_or_path: str | os.PathLike, colbert_dim: int | None = None,
                        cache_dir: str | None = None) -> M3Model:
        """Load an encoder folder; read its M3 heads or add fresh ones.

        Fresh heads: ``sparse_linear`` with zero weight and bias 0.1, so every token starts with
        weight 0.1 (the sparse score starts as a scaled count of shared tokens);
        ``colbert_linear`` the identity when ``colbert_dim == h`` (ColBERT vectors start as the
        normalised token states), else a random semi-orthogonal projection; zero bias.
        """
        from transformers import AutoModel, AutoTokenizer

        from ..encode import heads as H
        from ..encode.resolve import resolve_model
        from ..encode.spec import model_prefixes, read_pooling

        path = resolve_model(model_name_or_path, cache_dir=cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        encoder = AutoModel.from_pretrained(str(path))
        h = int(encoder.config.hidden_size)
        sparse, colbert = H.load_heads(path, h)
        is_m3 = sparse is not None
        pooling = read_pooling(path, is_m3)
        if colbert is not None and colbert_dim is not None and colbert.out_features != colbert_dim:
            raise ValueError(f"{path} has a ColBERT head of dim {colbert.out_features}, not {colbert_dim}")
        if sparse is None:
            sparse = torch.nn.Linear(h, 1)
            colbert = torch.nn.Linear(h, colbert_dim or h)
            with torch.no_grad():
                sparse.weight.zero_()
                sparse.bias.fill_(0.1)
                if colbert.out_features == h:
                    colbert.weight.copy_(torch.eye(h))
                else:
                    torch.nn.init.orthogonal_(colbert.weight)
                colbert.bias.zero_()
        model = cls(encoder, tokenizer, sparse.float(), colbert.float(), pooling, source=path)
        # trained with the instructions the encoder will use (E5: "query: " / "passage: ")
        model.query_prefix, model.passage_prefix = model_prefixes(path, str(model_name_or_path))
        return model

    def tokenize(self, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), truncation=True, max_length=max_length, padding=True,
                             return_token_type_ids=False, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                sparse: bool = True, colbert: bool = True) -> dict[str, torch.Tensor]:
        """``{"dense": (b, h), "sparse": (b, V), "colbert": (b, L-1, d), "mask": (b, L-1)}``."""
        from ..encode import heads as H

        trunk = self.trunk_cache or self.encoder
        hs = trunk(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
        hs = hs.float()
        out = {"dense": H.pool_dense(hs, attention_mask, self.pooling)}
        if sparse:
            w = H.token_weights(hs, self.sparse_linear)
            out["sparse"] = L.sparse_vectors(w, input_ids, self.vocab_size, self.unused_ids, attention_mask)
        if colbert:
            out["colbert"] = H.colbert_vectors(hs, attention_mask, self.colbert_linear)
            out["mask"] = attention_mask[:, 1:]
        return out

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write the ``BAAI/bge-m3`` layout to ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        torch.save({k: v.detach().float().cpu().contiguous() for k, v in self.colbert_linear.state_dict().items()},
                   out / "colbert_linear.pt")
        torch.save({k: v.detach().float().cpu().contiguous() for k, v in self.sparse_linear.state_dict().items()},
                   out / "sparse_linear.pt")
        write_pooling(out, self.pooling, int(self.encoder.config.hidden_size), self.source)
        return out


class FrozenTrunkCache:
    """Last hidden states of a frozen encoder, computed once per distinct token sequence.

    With ``fix_encoder`` only the heads learn, so the encoder's output for a text never changes:
    each (query or passage) text is run through it once (in eval mode, no dropout) and its
    states are kept in float16 on the CPU; later epochs only run the heads. Right padding is
    assumed (the tokenizers we load pad on the right); padded positions come back as zeros.
    """

    def __init__(self, encoder: torch.nn.Module):
        self.encoder = encoder
        self.states: dict[bytes, torch.Tensor] = {}

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, return_dict: bool = True):
        from types import SimpleNamespace

        lens = attention_mask.sum(1).tolist()
        ids = input_ids.cpu().numpy()
        keys = [ids[i, :n].tobytes() for i, n in enumerate(lens)]
        missing = [i for i, k in enumerate(keys) if k not in self.states]
        if missing:
            width = max(lens[i] for i in missing)
            was = self.encoder.training
            self.encoder.eval()
            with torch.no_grad():
                hs = self.encoder(input_ids=input_ids[missing, :width], attention_mask=attention_mask[missing, :width],
                                  return_dict=True).last_hidden_state
            self.encoder.train(was)
            for j, i in enumerate(missing):
                self.states[keys[i]] = hs[j, :lens[i]].to("cpu", torch.float16)
        out = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.encoder.config.hidden_size)
        for i, k in enumerate(keys):
            out[i, :lens[i]] = self.states[k].float()
        return SimpleNamespace(last_hidden_state=out.to(input_ids.device))


def write_pooling(out: Path, pooling: str, hidden: int, source: Path | None = None) -> None:
    """Keep the model's pooling: copy the source's ``1_Pooling/`` (and sentence-transformers
    side files) or write a ``1_Pooling/config.json`` declaring ``pooling``."""
    dst = out / "1_Pooling"
    if source is not None and (Path(source) / "1_Pooling" / "config.json").is_file():
        if Path(source).resolve() != out.resolve():
            shutil.copytree(Path(source) / "1_Pooling", dst, dirs_exist_ok=True)
            for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
                if (Path(source) / name).is_file():
                    shutil.copy2(Path(source) / name, out / name)
        return
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }, indent=2))


# ============================================================================ loss on representations


def batch_loss(q: dict[str, torch.Tensor], p: dict[str, torch.Tensor], group_size: int, *,
               unified: bool, self_distill: bool, temperature: float, in_batch: bool = True,
               teacher: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss from query reps (B rows) and passage reps (B*G rows, positive first)."""
    B = q["dense"].shape[0]
    target = L.in_batch_target(B, group_size, q["dense"].device)

    def view(s):
        return s if in_batch else L.group_scores(s, group_size)

    if not in_batch:
        target = torch.zeros(B, dtype=torch.long, device=q["dense"].device)
    dense = view(L.dense_scores(q["dense"], p["dense"]))
    parts: dict[str, torch.Tensor]
    if unified:
        sparse = view(L.sparse_scores(q["sparse"], p["sparse"]))
        colbert = view(L.colbert_scores(q["colbert"], p["colbert"], q["mask"], p["mask"]))
        loss, parts = L.m3_unified_loss(dense, sparse, colbert, target, temperature, self_distill)
    else:
        loss = L.info_nce(dense, target, temperature)
        parts = {"dense": loss.detach()}
    if teacher is not None:
        t = teacher.to(dense.device)
        g = (lambda s: s) if not in_batch else (lambda s: L.group_scores(s, group_size))
        kd = L.distill_loss(g(dense), t, temperature)
        if unified:
            kd = (kd + 0.1 * L.distill_loss(g(sparse), t, temperature) + L.distill_loss(g(colbert), t, temperature)) / 3
        parts["teacher_kd"] = kd.detach()
        loss = (loss + kd) / 2
    return loss, {k: float(v) for k, v in parts.items()}


# ============================================================================ trainer


@dataclass
class TrainResult:
    """What a training run did: the output folder, the last step and the loss of every step."""

    out_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)
    parts: list[dict[str, float]] = field(default_factory=list)


def _autocast(device: torch.device, bf16: bool, fp16: bool):
    import contextlib

    if device.type == "cuda" and (bf16 or fp16):
        return torch.autocast("cuda", dtype=torch.bfloat16 if bf16 else torch.float16)
    return contextlib.nullcontext()


def linear_schedule(optimizer, warmup: int, total: int):
    """Linear warm-up for ``warmup`` steps, then linear decay to 0 at ``total``."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def save_trainer_state(folder: Path, step: int, optimizer, scheduler, scaler=None, **extra) -> None:
    """Write ``trainer_state.pt``: step, CPU RNG, optimizer, schedule (and AMP scaler) state."""
    state = {"step": int(step), "rng_cpu": torch.get_rng_state(), **extra}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
        state["scheduler"] = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    torch.save(state, Path(folder) / STATE_FILE)


def load_trainer_state(folder: str | os.PathLike, optimizer, scheduler, scaler=None, what: str = "") -> dict:
    """Read a folder's ``trainer_state.pt`` into the optimizer, schedule, scaler and CPU RNG;
    returns the state (``step`` and any extras). FileNotFoundError names a folder without one."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not a resumable {what}checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "optimizer" in state and optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
        sd = scheduler.state_dict()
        sd.update(state["scheduler"])
        scheduler.load_state_dict(sd)
    if "scaler" in state and scaler is not None:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    return state


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    s = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def _set_rng_state(s: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(s["cpu"])
    if "cuda" in s and device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], device)


class EmbedderTrainer:
    """Fine-tunes an :class:`M3Model`. See :func:`train_embedder` for the arguments."""

    def __init__(self, model: M3Model, *, unified: bool = True, self_distill: bool = True,
                 self_distill_start_step: int = 0, fix_encoder: bool = False, group_size: int = 4,
                 batch_size: int = 8, sub_batch_size: int | None = None, temperature: float = 0.02,
                 in_batch_negatives: bool = True, lr: float = 1e-5, weight_decay: float = 0.01,
                 warmup_ratio: float = 0.1, query_max_len: int = 64, passage_max_len: int = 256,
                 gradient_checkpointing: bool = False, bf16: bool = False, fp16: bool = False,
                 device: str | None = None, seed: int = 0, max_grad_norm: float | None = 1.0,
                 cache_hidden: bool = False) -> None:
        if batch_size < 1 or group_size < 1:
            raise ValueError("batch_size and group_size must be positive")
        if sub_batch_size is not None and sub_batch_size < 1:
            raise ValueError(f"sub_batch_size must be positive, got {sub_batch_size}")
        self.model = model
        self.unified = unified
        self.self_distill = self_distill
        self.self_distill_start_step = self_distill_start_step
        self.group_size = group_size
        self.batch_size = batch_size
        self.sub_batch_size = sub_batch_size
        self.temperature = temperature
        self.in_batch = in_batch_negatives
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.query_max_len = query_max_len
        self.passage_max_len = passage_max_len
        self.bf16, self.fp16 = bf16, fp16
        self.seed = seed
        self.max_grad_norm = max_grad_norm
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        if fix_encoder:
            for p in self.model.encoder.parameters():
                p.requires_grad_(False)
        if cache_hidden:
            if not fix_encoder:
                raise ValueError("cache_hidden needs fix_encoder: a trained encoder's states change")
            self.model.trunk_cache = FrozenTrunkCache(self.model.encoder)
        if gradient_checkpointing and hasattr(self.model.encoder, "gradient_checkpointing_enable"):
            self.model.encoder.gradient_checkpointing_enable()
        self.collator = GroupCollator(group_size, seed)
        self.step = 0
        self.optimizer = None
        self.scheduler = None
        self.scaler = None

    # ------------------------------------------------------------------ one step

    def _encode(self, batch: dict[str, torch.Tensor], rows: slice | None = None) -> dict[str, torch.Tensor]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if rows is not None:
            ids, mask = ids[rows], mask[rows]
        with _autocast(self.device, self.bf16, self.fp16):
            return self.model(ids.to(self.device), mask.to(self.device), sparse=self.unified, colbert=self.unified)

    def _self_distill_now(self) -> bool:
        return self.self_distill and self.step >= self.self_distill_start_step

    def compute_gradients(self, queries: Sequence[str], passages: Sequence[str],
                          teacher: Any = None) -> tuple[float, dict[str, float]]:
        """Forward + backward for one batch (gradients accumulate in ``.grad``); returns the loss."""
        m = self.model
        q_tok = m.tokenize([m.query_prefix + q for q in queries], self.query_max_len)
        p_tok = m.tokenize([m.passage_prefix + p for p in passages], self.passage_max_len)
        t = torch.as_tensor(teacher, dtype=torch.float32) if teacher is not None else None
        kw = {"unified": self.unified, "self_distill": self._self_distill_now(), "temperature": self.temperature,
                  "in_batch": self.in_batch, "teacher": t}
        chunk = self.sub_batch_size
        if chunk is None or (chunk >= len(queries) and chunk >= len(passages)):
            q = self._encode(q_tok)
            p = self._encode(p_tok)
            loss, parts = batch_loss(q, p, self.group_size, **kw)
            self._backward(loss)
            return float(loss.detach()), parts
        return self._grad_cache(q_tok, p_tok, chunk, kw)

    def _grad_cache(self, q_tok, p_tok, chunk, kw):
        reps, states = {}, {}
        for name, tok in (("q", q_tok), ("p", p_tok)):
            n = tok["input_ids"].shape[0]
            pieces, st = [], []
            with torch.no_grad():
                for s in range(0, n, chunk):
                    st.append(_rng_state(self.device))
                    pieces.append(self._encode(tok, slice(s, s + chunk)))
            reps[name] = {k: torch.cat([x[k] for x in pieces]).detach() for k in pieces[0]}
            for k, v in reps[name].items():
                if v.is_floating_point():
                    v.requires_grad_(True)
            states[name] = st
        loss, parts = batch_loss(reps["q"], reps["p"], self.group_size, **kw)
        self._backward(loss)  # gradients w.r.t. the cached representations
        after = _rng_state(self.device)
        for name, tok in (("q", q_tok), ("p", p_tok)):
            n = tok["input_ids"].shape[0]
            for j, s in enumerate(range(0, n, chunk)):
                _set_rng_state(states[name][j], self.device)
                out = self._encode(tok, slice(s, s + chunk))
                surrogate = 0.0
                for k, v in out.items():
                    g = reps[name][k].grad if v.is_floating_point() else None
                    if g is not None:
                        surrogate = surrogate + (v * g[s : s + chunk].to(v.dtype)).sum()
                if torch.is_tensor(surrogate) and surrogate.requires_grad:
                    # the loss was already scaled (fp16); the cached grads carry that scale
                    surrogate.backward()
        _set_rng_state(after, self.device)
        return float(loss.detach()), parts

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    # ------------------------------------------------------------------ optimiser

    def _trainable(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def setup_optimizer(self, total_steps: int) -> None:
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n else decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
        )
        self.scheduler = linear_schedule(self.optimizer, int(total_steps * self.warmup_ratio), total_steps)
        if self.fp16 and self.device.type == "cuda":
            self.scaler = torch.amp.GradScaler("cuda")

    def optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self._trainable(), self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    # ------------------------------------------------------------------ checkpoints

    def save(self, out_dir: str | os.PathLike, epoch: int = 0) -> Path:
        out = self.model.save(out_dir)
        save_trainer_state(out, self.step, self.optimizer, self.scheduler, self.scaler, epoch=int(epoch))
        return out

    def load_state(self, folder: str | os.PathLike) -> dict:
        state = load_trainer_state(folder, self.optimizer, self.scheduler, self.scaler)
        self.step = int(state["step"])
        return state

    # ------------------------------------------------------------------ loop

    def train(self, records: Sequence[Record], out_dir: str | os.PathLike, *, epochs: int = 1,
              max_steps: int | None = None, save_steps: int | None = None,
              resume_from: str | os.PathLike | None = None, group_by_length: bool = True,
              show_progress: bool = True) -> TrainResult:
        from tqdm.auto import tqdm

        out_dir = Path(out_dir)
        per_epoch = len(batch_order(records, self.batch_size, self.seed, 0, group_by_length))
        total = max_steps if max_steps is not None else per_epoch * epochs
        if total < 1:
            raise ValueError("nothing to train: max_steps/epochs give zero steps")
        self.setup_optimizer(total)
        if resume_from is not None:
            self.load_state(resume_from)  # restores the RNG too: dropout continues as if never stopped
        else:
            torch.manual_seed(self.seed)
        self.model.train()
        result = TrainResult(out_dir, self.step)
        bar = tqdm(total=total, initial=self.step, desc="train", unit="step", disable=not show_progress)
        t0, seen = time.perf_counter(), 0
        epoch = self.step // per_epoch
        while self.step < total:
            order = batch_order(records, self.batch_size, self.seed, epoch, group_by_length)
            start = self.step - epoch * per_epoch
            for b in order[start:]:
                if self.step >= total:
                    break
                batch = self.collator([records[i] for i in b], step=self.step)
                loss, parts = self.compute_gradients(batch["queries"], batch["passages"], batch["teacher"])
                self.optimizer_step()
                result.losses.append(loss)
                result.parts.append(parts)
                seen += len(b)
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{loss:.4f}", qps=f"{rate:.1f}")
                bar.update(1)
                if save_steps and self.step % save_steps == 0 and self.step < total:
                    self.save(out_dir / f"checkpoint-{self.step}", epoch)
            epoch += 1
        bar.close()
        self.model.eval()
        self.save(out_dir, epoch)
        result.step = self.step
        return result


def train_embedder(model_path: str | os.PathLike, data: Any, out_dir: str | os.PathLike, *,
                   unified: bool = True, self_distill: bool = True, self_distill_start_step: int = 0,
                   fix_encoder: bool = False, colbert_dim: int | None = None, group_size: int = 4,
                   batch_size: int = 8, sub_batch_size: int | None = None, temperature: float = 0.02,
                   in_batch_negatives: bool = True, lr: float = 1e-5, weight_decay: float = 0.01,
                   warmup_ratio: float = 0.1, epochs: int = 1, max_steps: int | None = None,
                   query_max_len: int = 64, passage_max_len: int = 256,
                   gradient_checkpointing: bool = False, bf16: bool = False, fp16: bool = False,
                   group_by_length: bool = True, seed: int = 0, save_steps: int | None = None,
                   resume_from: str | os.PathLike | None = None, device: str | None = None,
                   show_progress: bool = True, cache_hidden: bool = False) -> TrainResult:
    """Fine-tune an embedder into a BGE-M3 style model and save it to ``out_dir``.

    Args:
        model_path: hub id or folder; with or without M3 heads (fresh ones are added).
        data: JSONL path / folder of JSONL files / list of records (see :mod:`.data`).
        unified: train dense, sparse and ColBERT together (else dense InfoNCE only).
        self_distill: add self-distillation from the ensemble from ``self_distill_start_step``.
        fix_encoder: freeze the encoder; train only the heads.
        cache_hidden: with ``fix_encoder``, run each distinct text through the encoder once and
            reuse its hidden states (:class:`FrozenTrunkCache`): after the first epoch a step
            costs the heads only.
        colbert_dim: ColBERT head width when heads are added (default hidden size).
        group_size: passages per query (1 positive + G-1 negatives).
        batch_size: queries per step; sub_batch_size: GradCache chunk (None: one pass).
        bf16/fp16: autocast on CUDA only (ignored on CPU).
        resume_from: a checkpoint folder written by this function (``checkpoint-N`` or ``out_dir``).
    """
    records = load_records(data)
    src = resume_from if resume_from is not None else model_path
    model = M3Model.from_pretrained(src, colbert_dim=colbert_dim)
    if resume_from is not None:
        # keep the original model's side files (pooling) if the checkpoint folder has them
        model.source = Path(resume_from)
    torch.manual_seed(seed)
    trainer = EmbedderTrainer(
        model, unified=unified, self_distill=self_distill, self_distill_start_step=self_distill_start_step,
        fix_encoder=fix_encoder, group_size=group_size, batch_size=batch_size, sub_batch_size=sub_batch_size,
        temperature=temperature, in_batch_negatives=in_batch_negatives, lr=lr, weight_decay=weight_decay,
        warmup_ratio=warmup_ratio, query_max_len=query_max_len, passage_max_len=passage_max_len,
        gradient_checkpointing=gradient_checkpointing, bf16=bf16, fp16=fp16, device=device, seed=seed,
        cache_hidden=cache_hidden,
    )
    return trainer.train(records, out_dir, epochs=epochs, max_steps=max_steps, save_steps=save_steps,
                         resume_from=resume_from, group_by_length=group_by_length, show_progress=show_progress)
