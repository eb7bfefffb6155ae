"""The three BGE-M3 representations of a batch of texts, as arrays.

Inside the engine nothing uses dicts: sparse weights are a CSR matrix over the vocabulary and
ColBERT vectors are one matrix plus offsets. The FlagEmbedding dict/list formats are produced only
by :meth:`Encoded.lexical_dicts` and :meth:`Encoded.colbert_list`, at the compatible edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class Encoded:
    """Encoder output for ``n`` texts, in input order.

    Attributes:
        dense: ``(n, d)`` float32, L2-normalised rows; ``None`` if not computed.
        sparse: ``(n, vocab_size)`` float32 CSR with sorted indices and only positive weights
            (one entry per distinct token id, holding its maximum weight); ``None`` if not computed.
        colbert: ``(total_tokens, d_colbert)`` float32, L2-normalised rows; ``None`` if not computed.
        colbert_offsets: ``(n + 1,)`` int64; text ``i`` owns rows
            ``colbert[colbert_offsets[i]:colbert_offsets[i + 1]]``.
        n_tokens: ``(n,)`` int64, tokens per text after truncation, special tokens included.
    """

    dense: np.ndarray | None
    sparse: sp.csr_matrix | None
    colbert: np.ndarray | None
    colbert_offsets: np.ndarray | None
    n_tokens: np.ndarray

    def __len__(self) -> int:
        return int(self.n_tokens.shape[0])

    def colbert_of(self, i: int) -> np.ndarray:
        """ColBERT vectors of text ``i``: ``(n_tokens[i] - 1, d)`` float32 view."""
        if self.colbert is None:
            raise ValueError("ColBERT vectors were not computed for this batch")
        return self.colbert[self.colbert_offsets[i] : self.colbert_offsets[i + 1]]

    def lexical_dicts(self) -> list[dict[str, float]]:
        """FlagEmbedding's ``lexical_weights`` format: one ``{str(token_id): weight}`` per text."""
        if self.sparse is None:
            raise ValueError("sparse weights were not computed for this batch")
        m = self.sparse
        out = []
        for i in range(m.shape[0]):
            lo, hi = m.indptr[i], m.indptr[i + 1]
            out.append({str(int(t)): w for t, w in zip(m.indices[lo:hi], m.data[lo:hi])})
        return out

    def colbert_list(self) -> list[np.ndarray]:
        """FlagEmbedding's ``colbert_vecs`` format: one ``(n_i, d)`` float32 array per text."""
        return [self.colbert_of(i) for i in range(len(self))]


def lexical_matching_score(a: dict[str, float], b: dict[str, float]) -> float:
    """Sum over token ids present in both of ``a[t] * b[t]`` (FlagEmbedding's definition)."""
    if len(b) < len(a):
        a, b = b, a
    return float(sum(w * b[t] for t, w in a.items() if t in b))


def colbert_score(q: np.ndarray, p: np.ndarray) -> float:
    """Late-interaction score: mean over query vectors of the best dot product against ``p``.

    ``q``: ``(m, d)``; ``p``: ``(n, d)``. Returns a Python float.
    """
    q = np.asarray(q, dtype=np.float32)
    p = np.asarray(p, dtype=np.float32)
    if q.ndim != 2 or p.ndim != 2 or q.shape[1] != p.shape[1]:
        raise ValueError(f"colbert_score needs (m, d) and (n, d) arrays, got {q.shape} and {p.shape}")
    if q.shape[0] == 0 or p.shape[0] == 0:
        return 0.0
    return float((q @ p.T).max(axis=1).sum() / q.shape[0])
