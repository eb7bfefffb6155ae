"""Training losses and score functions: pure functions on tensors.

Shapes: ``B`` queries, each with a group of ``G`` passages (positive first), ``N = B * G``
passages in the batch. Score matrices are ``(B, N)`` with in-batch negatives (query ``i``'s
positive at column ``i * G``) or ``(B, G)`` without (positive at column 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- targets / views


def in_batch_target(batch: int, group_size: int, device=None) -> torch.Tensor:
    """Targets for a ``(B, B*G)`` score matrix: ``target[i] = i * G``."""
    return torch.arange(batch, device=device) * group_size


def group_scores(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(B, B*G)`` in-batch scores -> ``(B, G)``: each query against its own group only."""
    B = scores.shape[0]
    if scores.shape[1] != B * group_size:
        raise ValueError(f"scores have {scores.shape[1]} columns, expected {B} x {group_size}")
    v = scores.view(B, B, group_size)
    i = torch.arange(B, device=scores.device)
    return v[i, i]


# ----------------------------------------------------------------------------- contrastive


def info_nce(scores: torch.Tensor, target: torch.Tensor, temperature: float = 0.02) -> torch.Tensor:
    """InfoNCE with in-batch negatives.

    ``L = mean_i [ -log( exp(s[i, t_i] / tau) / sum_j exp(s[i, j] / tau) ) ]`` with ``s`` the
    ``(B, N)`` scores of each query against every passage of the batch and ``t_i = i * G`` the
    column of query ``i``'s positive (:func:`in_batch_target`).
    """
    return F.cross_entropy(scores / temperature, target)


def info_nce_group(scores: torch.Tensor, temperature: float = 0.02) -> torch.Tensor:
    """InfoNCE without in-batch negatives: ``(B, G)`` scores against the query's own group only.

    ``L = mean_i [ -log( exp(s[i, 0] / tau) / sum_g exp(s[i, g] / tau) ) ]`` (positive at 0).
    """
    target = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return F.cross_entropy(scores / temperature, target)


# ----------------------------------------------------------------------------- score functions


def dense_scores(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``s[i, j] = q_i . p_j`` for ``q (B, d)`` and ``p (N, d)`` (both L2-normalised) -> ``(B, N)``."""
    return q @ p.T


def sparse_vectors(weights: torch.Tensor, input_ids: torch.Tensor, vocab_size: int,
                   unused_ids: Sequence[int] | torch.Tensor = (), mask: torch.Tensor | None = None) -> torch.Tensor:
    """Max-pool per-token weights into vocabulary vectors.

    ``v[b, t] = max over positions k with input_ids[b, k] == t of w[b, k]`` (0 where absent),
    with ``w = relu(sparse_linear(H))[..., 0]`` (``weights``, ``(b, L)``), padding positions
    (``mask == 0``) zeroed, and the special ids in ``unused_ids`` (CLS, EOS, PAD, UNK) set to 0,
    as the encoder's lexical weights. Returns ``(b, V)``.
    """
    w = weights if mask is None else weights * mask.to(weights.dtype)
    v = torch.zeros(w.shape[0], vocab_size, dtype=w.dtype, device=w.device)
    v = v.scatter_reduce(1, input_ids, w, reduce="amax", include_self=True)
    if len(unused_ids):
        keep = torch.ones(vocab_size, dtype=w.dtype, device=w.device)
        keep[torch.as_tensor(unused_ids, device=w.device, dtype=torch.long)] = 0
        v = v * keep
    return v


def sparse_scores(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``s[i, j] = sum_t q[i, t] * p[j, t]``: dot of max-pooled vocabulary vectors -> ``(B, N)``."""
    return q @ p.T


def colbert_scores(q: torch.Tensor, p: torch.Tensor, q_mask: torch.Tensor,
                   p_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Late interaction: ``s[i, j] = (1 / n_i) * sum_a q_mask[i, a] * max_b q[i, a] . p[j, b]``.

    ``q (B, Lq, d)`` and ``p (N, Lp, d)`` are the ColBERT vectors with CLS already dropped (as in
    the encoder: ``colbert_linear(H[:, 1:])``, normalised); ``q_mask``/``p_mask`` are the matching
    attention masks ``(B, Lq)``/``(N, Lp)`` (i.e. ``mask[:, 1:]``); ``n_i`` is query ``i``'s token
    count. Padded passage positions are excluded from the max. Returns ``(B, N)``.
    """
    tok = torch.einsum("iad,jbd->ijab", q, p)
    if p_mask is not None:
        tok = tok.masked_fill(p_mask[None, :, None, :] == 0, torch.finfo(tok.dtype).min)
    best = tok.max(-1).values  # (B, N, Lq)
    qm = q_mask.to(best.dtype)
    return (best * qm[:, None, :]).sum(-1) / qm.sum(-1).clamp(min=1)[:, None]


# ----------------------------------------------------------------------------- distillation


def kd_loss(student: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 0.02) -> torch.Tensor:
    """Soft cross-entropy ``mean_i [ -sum_j p_ij * log_softmax(student_i / tau)_j ]``."""
    return -(teacher_probs * F.log_softmax(student / temperature, dim=-1)).sum(-1).mean()


def distill_loss(student_scores: torch.Tensor, teacher_scores: torch.Tensor,
                 temperature: float = 0.02, teacher_temperature: float = 1.0) -> torch.Tensor:
    """Distillation from teacher scores over each group, ``(B, G)`` both.

    ``p = softmax(teacher / teacher_temperature)`` over the group (e.g. reranker logits),
    ``L = mean_i [ -sum_g p_ig * log_softmax(student_i / tau)_g ]``.
    """
    p = F.softmax(teacher_scores.float() / teacher_temperature, dim=-1)
    return kd_loss(student_scores, p, temperature)


def m3_unified_loss(dense: torch.Tensor, sparse: torch.Tensor, colbert: torch.Tensor,
                    target: torch.Tensor, temperature: float = 0.02,
                    self_distill: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BGE-M3's unified fine-tuning loss over three score matrices of the same shape.

    With ``CE(s) = info_nce(s, target, tau)``, ``ens = dense + 0.3 * sparse + colbert``:

    ``L = (CE(dense) + CE(ens) + 0.1 * CE(sparse) + CE(colbert)) / 4``

    and with self-distillation, teacher ``p = softmax(ens.detach() / tau)`` over the whole row
    and ``KD(s) = mean_i [ -sum_j p_ij * log_softmax(s_i / tau)_j ]``:

    ``L = (L + (KD(dense) + 0.1 * KD(sparse) + KD(colbert)) / 3) / 2``.

    Returns ``(L, parts)`` with every term in ``parts`` (detached).
    """
    ens = dense + 0.3 * sparse + colbert
    parts = {
        "dense": info_nce(dense, target, temperature),
        "sparse": info_nce(sparse, target, temperature),
        "colbert": info_nce(colbert, target, temperature),
        "ensemble": info_nce(ens, target, temperature),
    }
    loss = (parts["dense"] + parts["ensemble"] + 0.1 * parts["sparse"] + parts["colbert"]) / 4
    if self_distill:
        teacher = F.softmax(ens.detach() / temperature, dim=-1)
        kd = (kd_loss(dense, teacher, temperature) + 0.1 * kd_loss(sparse, teacher, temperature)
              + kd_loss(colbert, teacher, temperature)) / 3
        parts["self_distill"] = kd
        loss = (loss + kd) / 2
    return loss, {k: v.detach() for k, v in parts.items()}


# ----------------------------------------------------------------------------- reranker


def reranker_group_ce(logits: torch.Tensor) -> torch.Tensor:
    """Group-wise cross-entropy for a cross-encoder, ``logits (B, G)``, positive at index 0.

    ``L = mean_i [ -log( exp(l[i, 0]) / sum_g exp(l[i, g]) ) ]``.
    """
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits.float(), target)


# ----------------------------------------------------------------------------- RetroMAE


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, ratio: float, mask_id: int,
                special_ids: Sequence[int], generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a ``ratio`` of the maskable tokens (real, non-special) by ``mask_id``.

    Each row gets ``max(1, round(ratio * n_maskable))`` masked positions chosen uniformly.
    Returns ``(masked_ids, labels)`` with ``labels = input_ids`` at masked positions and -100
    elsewhere (ignored by the loss).
    """
    maskable = attention_mask.bool() & ~torch.isin(input_ids, torch.as_tensor(list(special_ids), dtype=input_ids.dtype))
    noise = torch.rand(input_ids.shape, generator=generator)
    noise = noise.masked_fill(~maskable, 2.0)  # never picked
    n = maskable.sum(1)
    k = torch.clamp((n.float() * ratio).round().long(), min=1)
    k = torch.minimum(k, n)
    rank = noise.argsort(1).argsort(1)
    chosen = (rank < k[:, None]) & maskable
    masked = input_ids.masked_fill(chosen, mask_id)
    labels = input_ids.masked_fill(~chosen, -100)
    return masked, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Masked-LM cross-entropy ``mean over positions with labels != -100 of -log p(label)``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def retromae_loss(encoder_logits: torch.Tensor, encoder_labels: torch.Tensor,
                  decoder_logits: torch.Tensor, decoder_labels: torch.Tensor) -> torch.Tensor:
    """RetroMAE: ``L = MLM(encoder on the lightly masked text) + MLM(decoder on the heavily
    masked copy, conditioned on the encoder's sentence vector)``."""
    return mlm_loss(encoder_logits, encoder_labels) + mlm_loss(decoder_logits, decoder_labels)
