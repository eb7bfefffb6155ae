"""RetroMAE stage-1 pretraining (retrieval-oriented masked auto-encoding).

* The **encoder** reads a lightly masked passage (``encoder_mask_ratio``, default 30%) and
  predicts its masked tokens with its MLM head; its CLS state is the sentence vector.
* A one-layer **decoder** (a standard transformer layer) reads a heavily masked copy of the same
  passage (``decoder_mask_ratio``, default 50%) embedded with the encoder's embeddings, whose
  first position is replaced by the sentence vector, and predicts the masked tokens with the same
  MLM head. Little is left to read, so the sentence vector has to carry the passage.

``L = MLM_encoder + MLM_decoder`` (:func:`~hybridsearch.train.losses.retromae_loss`). The saved
folder holds the encoder only (``save_pretrained`` + tokenizer, no M3 heads) for stage 2
(:func:`hybridsearch.train.embedder.train_embedder`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import losses as L
from .embedder import TrainResult, _autocast, linear_schedule


class RetroMAE(torch.nn.Module):
    """Encoder with MLM head + one-layer decoder sharing the embeddings and the MLM head."""

    def __init__(self, mlm_model, tokenizer, encoder_mask_ratio: float = 0.3,
                 decoder_mask_ratio: float = 0.5) -> None:
        super().__init__()
        self.mlm = mlm_model
        self.tokenizer = tokenizer
        cfg = mlm_model.config
        h = int(cfg.hidden_size)
        self.decoder = torch.nn.TransformerEncoderLayer(
            d_model=h, nhead=int(cfg.num_attention_heads), dim_feedforward=int(cfg.intermediate_size),
            dropout=float(getattr(cfg, "hidden_dropout_prob", 0.1)), activation="gelu",
            batch_first=True, norm_first=False,
        )
        self.encoder_mask_ratio = encoder_mask_ratio
        self.decoder_mask_ratio = decoder_mask_ratio
        if tokenizer.mask_token_id is None:
            raise ValueError("RetroMAE needs a tokenizer with a mask token")
        self.special_ids = sorted(set(tokenizer.all_special_ids))

    @property
    def base(self):
        return self.mlm.base_model

    def lm_head(self, states: torch.Tensor) -> torch.Tensor:
        for name in ("lm_head", "cls", "predictions"):
            head = getattr(self.mlm, name, None)
            if head is not None:
                return head(states)
        raise ValueError(f"cannot find the MLM head of {type(self.mlm).__name__}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        mask_id = self.tokenizer.mask_token_id
        enc_ids, enc_labels = L.mask_tokens(input_ids, attention_mask, self.encoder_mask_ratio, mask_id,
                                            self.special_ids, generator)
        dec_ids, dec_labels = L.mask_tokens(input_ids, attention_mask, self.decoder_mask_ratio, mask_id,
                                            self.special_ids, generator)
        dev = next(self.parameters()).device
        enc_ids, enc_labels, dec_ids, dec_labels, am = (t.to(dev) for t in (enc_ids, enc_labels, dec_ids, dec_labels, attention_mask))
        hs = self.base(input_ids=enc_ids, attention_mask=am, return_dict=True).last_hidden_state
        enc_logits = self.lm_head(hs)
        sent = hs[:, :1]  # CLS sentence vector
        emb = self.base.embeddings(input_ids=dec_ids)
        x = torch.cat([sent.to(emb.dtype), emb[:, 1:]], dim=1)
        dec = self.decoder(x, src_key_padding_mask=am == 0)
        dec_logits = self.lm_head(dec)
        enc_l = L.mlm_loss(enc_logits, enc_labels)
        dec_l = L.mlm_loss(dec_logits, dec_labels)
        return enc_l + dec_l, {"encoder_mlm": float(enc_l.detach()), "decoder_mlm": float(dec_l.detach())}

    def save_encoder(self, out: str | os.PathLike, source: Path | None = None) -> Path:
        """Encoder only (bge layout, no heads) + tokenizer (+ the source's pooling files)."""
        from transformers import AutoModel

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        enc = self.base
        if source is not None:
            # the plain encoder class (with its pooler, which MLM models lack) and the trained weights
            enc = AutoModel.from_pretrained(str(source))
            enc.load_state_dict(self.base.state_dict(), strict=False)
        enc.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        if source is not None and (Path(source) / "1_Pooling").is_dir() and Path(source).resolve() != out.resolve():
            shutil.copytree(Path(source) / "1_Pooling", out / "1_Pooling", dirs_exist_ok=True)
        return out


def read_texts(data: Any) -> list[str]:
    """Pretraining texts: a list of strings, or a file (``.jsonl`` with ``text``/``content``
    fields or training records whose ``query``/``pos``/``neg`` are used; else one text a line)."""
    if isinstance(data, (str, os.PathLike)):
        p = Path(data)
        if not p.is_file():
            raise FileNotFoundError(f"pretraining data {p} not found")
        out: list[str] = []
        with p.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if p.suffix == ".jsonl":
                    try:
                        obj = json.loads(line)
                    except ValueError as e:
                        raise ValueError(f"{p}:{lineno}: not valid JSON ({e})") from None
                    if not isinstance(obj, dict):
                        raise ValueError(f"{p}:{lineno}: expected a JSON object")
                    if isinstance(obj.get("text"), str) or isinstance(obj.get("content"), str):
                        t = (obj.get("title", "") + " " + (obj.get("text") or obj.get("content"))).strip()
                        out.append(t)
                    elif "pos" in obj:
                        out.extend(x for x in obj.get("pos", []) + obj.get("neg", []) if isinstance(x, str))
                    else:
                        raise ValueError(f"{p}:{lineno}: no 'text', 'content' or 'pos' field")
                else:
                    out.append(line.rstrip("\n"))
        data = out
    texts = [t for t in data if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("no pretraining texts")
    return texts


def pretrain_retromae(model_path: str | os.PathLike, data: Any, out_dir: str | os.PathLike, *,
                      encoder_mask_ratio: float = 0.3, decoder_mask_ratio: float = 0.5,
                      batch_size: int = 16, lr: float = 1e-4, weight_decay: float = 0.01,
                      warmup_ratio: float = 0.1, epochs: int = 1, max_steps: int | None = None,
                      max_length: int = 256, seed: int = 0, bf16: bool = False, fp16: bool = False,
                      device: str | None = None, show_progress: bool = True) -> TrainResult:
    """RetroMAE pretraining of ``model_path`` on ``data`` (texts); the encoder goes to ``out_dir``."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from ..encode.resolve import resolve_model

    texts = read_texts(data)
    torch.manual_seed(seed)
    path = resolve_model(model_path)
    tok = AutoTokenizer.from_pretrained(str(path))
    mlm = AutoModelForMaskedLM.from_pretrained(str(path))
    model = RetroMAE(mlm, tok, encoder_mask_ratio, decoder_mask_ratio)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev).train()
    per_epoch = (len(texts) + batch_size - 1) // batch_size
    total = max_steps if max_steps is not None else per_epoch * epochs
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = linear_schedule(opt, int(total * warmup_ratio), total)
    gen = torch.Generator().manual_seed(seed)
    result = TrainResult(Path(out_dir), 0)
    bar = tqdm(total=total, desc="retromae", unit="step", disable=not show_progress)
    step, epoch, t0, seen = 0, 0, time.perf_counter(), 0
    while step < total:
        order = np.random.default_rng([seed, epoch]).permutation(len(texts))
        for s in range(0, len(order), batch_size):
            if step >= total:
                break
            chunk = [texts[i] for i in order[s : s + batch_size]]
            enc = tok(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            with _autocast(dev, bf16, fp16):
                loss, parts = model(enc["input_ids"], enc["attention_mask"], generator=gen)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            seen += len(chunk)
            result.losses.append(float(loss.detach()))
            result.parts.append(parts)
            bar.set_postfix(loss=f"{result.losses[-1]:.4f}", qps=f"{seen / max(time.perf_counter() - t0, 1e-9):.1f}")
            bar.update(1)
        epoch += 1
    bar.close()
    model.eval()
    model.save_encoder(out_dir, source=path)
    result.step = step
    return result
