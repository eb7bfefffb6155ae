"""Loading and applying the BGE-M3 heads (``sparse_linear.pt``, ``colbert_linear.pt``).

Formulas, with ``H`` the last hidden state ``(b, L, h)`` and ``M`` the attention mask ``(b, L)``:

* dense   = normalize(H[:, 0])            (or masked mean for mean-pooling models)
* MCLS dense = normalize(mean of H[:, p] over every CLS position p)  (CLS every N tokens)
* sparse  = relu(sparse_linear(H))[..., 0]  one weight per token
* colbert = normalize(colbert_linear(H[:, 1:]) * M[:, 1:, None])
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ModelFormatError

SPARSE_FILE = "sparse_linear.pt"
COLBERT_FILE = "colbert_linear.pt"


def load_linear(path: Path, hidden: int, out_features: int | None = None) -> torch.nn.Linear:
    """Load a ``Linear(hidden -> out)`` state dict saved with ``torch.save`` (no pickle of code)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelFormatError(f"{path}: cannot read head weights ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict) or set(sd) != {"weight", "bias"}:
        keys = sorted(sd) if isinstance(sd, dict) else type(sd).__name__
        raise ModelFormatError(
            f"{path}: expected the state dict of a Linear layer with keys weight and bias, got {keys}"
        )
    w, b = sd["weight"], sd["bias"]
    if w.ndim != 2 or w.shape[1] != hidden or b.shape != (w.shape[0],):
        raise ModelFormatError(
            f"{path}: weight {tuple(w.shape)} / bias {tuple(b.shape)} do not fit hidden size {hidden}"
        )
    if out_features is not None and w.shape[0] != out_features:
        raise ModelFormatError(f"{path}: expected {out_features} output(s), found {w.shape[0]}")
    lin = torch.nn.Linear(hidden, w.shape[0])
    lin.load_state_dict({"weight": w.float(), "bias": b.float()})
    return lin.eval()


def load_heads(path: Path, hidden: int) -> tuple[torch.nn.Linear | None, torch.nn.Linear | None]:
    """Return ``(sparse_linear, colbert_linear)``; both None for a plain encoder folder."""
    sp, cb = path / SPARSE_FILE, path / COLBERT_FILE
    if sp.exists() != cb.exists():
        have, miss = (sp, cb) if sp.exists() else (cb, sp)
        raise ModelFormatError(
            f"{path} has {have.name} but not {miss.name}: a BGE-M3 checkpoint needs both head files"
        )
    if not sp.exists():
        return None, None
    return load_linear(sp, hidden, 1), load_linear(cb, hidden)


def pool_dense(h: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``(b, L, h)`` -> ``(b, h)`` L2-normalised sentence vectors."""
    if pooling == "cls":
        v = h[:, 0]
    elif pooling == "mean":
        m = mask.unsqueeze(-1).to(h.dtype)
        v = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    else:
        raise ValueError(f"unknown pooling {pooling!r}")
    return F.normalize(v, dim=-1)


def pool_mcls(h: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """MCLS: ``(b, L, h)`` -> ``(b, h)`` float32 L2-normalised mean of the hidden states at each
    row's CLS positions. ``positions`` ``(b, K)`` (long) lists them, ``valid`` ``(b, K)`` (bool)
    says which entries of a row are real (rows with fewer CLS tokens are filled with any index)."""
    rows = torch.arange(h.shape[0], device=h.device).unsqueeze(1)
    w = valid.to(torch.float32).unsqueeze(-1)
    v = (h[rows, positions].float() * w).sum(1) / w.sum(1).clamp(min=1.0)
    return F.normalize(v, dim=-1)


def token_weights(h: torch.Tensor, sparse_linear: torch.nn.Linear) -> torch.Tensor:
    """``(b, L, h)`` -> ``(b, L)`` non-negative lexical weight per token."""
    return torch.relu(sparse_linear(h)).squeeze(-1)


def colbert_vectors(h: torch.Tensor, mask: torch.Tensor, colbert_linear: torch.nn.Linear) -> torch.Tensor:
    """``(b, L, h)`` -> ``(b, L-1, d)``: CLS dropped, padding zeroed, rows L2-normalised."""
    v = colbert_linear(h[:, 1:]) * mask[:, 1:, None].to(h.dtype)
    return F.normalize(v, dim=-1)
