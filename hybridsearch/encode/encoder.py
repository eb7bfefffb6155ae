"""BGE-M3 encoding: one forward pass gives dense, sparse and ColBERT representations.

:class:`BGEM3Encoder` has two faces:

* :meth:`BGEM3Encoder.encode_arrays` returns an :class:`~hybridsearch.representations.Encoded`
  (arrays only), which is what the engine uses;
* :meth:`BGEM3Encoder.encode`, :meth:`~BGEM3Encoder.compute_score` and friends reproduce
  FlagEmbedding's ``BGEM3FlagModel`` API and output formats for users who know it.

Texts are tokenised once, without shared mutable state (threads may encode at the same time with
different max lengths: see :mod:`.tokenize`), sorted by length so a batch holds texts of similar
length, run under ``torch.inference_mode`` (fp16 on CUDA by default), and put back in input order.

**Batches are sized by tokens, not texts.** A forward pass costs memory in proportion to its
padded tokens (rows x longest length: activations) and to its attention matrices (rows x heads x
length^2: eager attention materialises them). Each batch therefore obeys three caps: ``batch_size``
texts, ``max_batch_tokens`` (rows x padded length) and ``max_batch_attention`` (rows x padded
length^2, one head's attention matrix over the batch). Texts are sorted longest first, so the
first text of a batch sets its width; :func:`plan_batches` gives the batches for given lengths.
A single text over a cap still forms a batch of one. The defaults come from the device (see
:func:`default_batch_budgets`): on CUDA from its free memory at load time; on CPU and other
devices fixed, conservative values, so a batch of 8192-token BGE-M3 passages holds one text.
An out-of-memory error still halves the batch and retries.

**MCLS** (multiple CLS, from the BGE-M3 paper's long-document experiments; FlagEmbedding does
not implement it): ``BGEM3Encoder(..., mcls=True,
mcls_interval=256)`` inserts a CLS token before every further chunk of ``mcls_interval`` text
tokens, ``[CLS] t1..t256 [CLS] t257..t512 [CLS] ... [EOS]``, and the dense vector is the
L2-normalised mean of the last hidden states at every CLS position (the template's first one and
the inserted ones). It improves long-document retrieval without fine-tuning. See
:class:`BGEM3Encoder` for what the sparse and ColBERT outputs and queries get.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import torch

from ..errors import ModelFormatError
from ..representations import Encoded
from ..representations import colbert_score as _colbert_score
from ..representations import lexical_matching_score as _lexical_score
from . import heads as H
from .resolve import resolve_model
from .spec import ModelSpec, model_prefixes, read_max_seq_length, read_pooling
from .tokenize import SafeTokenizer

log = logging.getLogger(__name__)

Kind = Literal["query", "passage", "raw"]
M3_QUERY_MAX_LENGTH = 512
M3_PASSAGE_MAX_LENGTH = 8192


def check_texts(texts: Any, what: str = "texts") -> list[str]:
    """Validate a non-empty list of strings; return it as a list."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(f"{what} must be a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError(f"{what} is empty: pass at least one text")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{what}[{i}] is {type(t).__name__}, expected str")
    return list(texts)


def _distinct(texts: list[str]) -> tuple[list[str], np.ndarray]:
    """(distinct texts in order of first occurrence, position of each text among them)."""
    pos: dict[str, int] = {}
    inverse = np.fromiter((pos.setdefault(t, len(pos)) for t in texts), dtype=np.int64, count=len(texts))
    return list(pos), inverse


DEFAULT_MCLS_INTERVAL = 256
#: CPU (and any device without a free-memory query): attention memory a batch may plan for
CPU_ATTENTION_BYTES = 4 << 30
FALLBACK_BATCH_TOKENS = 64 * 512
FALLBACK_BATCH_ATTENTION = 8192 * 8192


def batch_rows(width: int, remaining: int, batch_size: int, max_tokens: int, max_attention: int) -> int:
    """Texts in the next batch when its longest text has ``width`` tokens (texts sorted longest
    first): as many as ``batch_size``, ``max_tokens`` (rows x width) and ``max_attention``
    (rows x width^2) allow, and at least one."""
    w = max(int(width), 1)
    return max(1, min(int(batch_size), int(remaining), int(max_tokens) // w, int(max_attention) // (w * w)))


def plan_batches(lengths: Sequence[int] | np.ndarray, batch_size: int, max_tokens: int,
                 max_attention: int) -> list[np.ndarray]:
    """The batches :meth:`BGEM3Encoder.encode_arrays` forms (when nothing runs out of memory) for
    token sequences of these lengths: arrays of input positions, longest texts first. Every batch
    of more than one text keeps ``rows <= batch_size``, ``rows x width <= max_tokens`` and
    ``rows x width^2 <= max_attention``, with ``width`` its longest length."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    out, start = [], 0
    while start < len(order):
        b = batch_rows(int(lengths[order[start]]), len(order) - start, batch_size, max_tokens, max_attention)
        out.append(order[start : start + b])
        start += b
    return out


def default_batch_budgets(device: torch.device, config, dtype: torch.dtype) -> tuple[int, int]:
    """``(max_batch_tokens, max_batch_attention)`` for a model on ``device``.

    Bytes per padded token ~ ``elem x (8 x hidden + 2 x intermediate)`` (a layer's live
    activations); bytes per attention cell (rows x length^2) ~ ``elem x (3 x heads + 1)`` (scores,
    probabilities, a copy, and the expanded mask), i.e. as if attention were materialised (eager;
    SDPA kernels need less). On CUDA, half the device's free memory (after loading the model) is
    planned for: 30 % for tokens, 70 % for attention. Without a free-memory figure (other
    accelerators, or the query fails): ``64 x 512`` tokens and ``8192^2`` cells. On CPU:
    ``64 x 512`` tokens and :data:`CPU_ATTENTION_BYTES` of attention (one 8192-token BGE-M3
    passage per batch; a 2048-token one, 5).
    """
    elem = torch.finfo(dtype).bits // 8
    hidden = int(getattr(config, "hidden_size", 1024) or 1024)
    inter = int(getattr(config, "intermediate_size", 4 * hidden) or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", 16) or 16)
    per_token = elem * (8 * hidden + 2 * inter)
    per_cell = elem * (3 * heads + 1)
    if device.type == "cpu":
        return FALLBACK_BATCH_TOKENS, max(1, CPU_ATTENTION_BYTES // per_cell)
    if device.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device)
        except Exception:  # noqa: BLE001 - no figure: conservative defaults
            free = 0
        if free > 0:
            usable = free // 2
            return max(1, int(usable * 0.3) // per_token), max(1, int(usable * 0.7) // per_cell)
    return FALLBACK_BATCH_TOKENS, FALLBACK_BATCH_ATTENTION


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


class BGEM3Encoder:
    """Encoder for BGE-M3 checkpoints and plain Hugging Face encoders.

    Args:
        model_name_or_path: hub id (``"BAAI/bge-m3"``), or a local folder in the bge-m3 layout
            (encoder weights, tokenizer, ``colbert_linear.pt``, ``sparse_linear.pt``), or any
            encoder folder without those heads (then only dense output exists).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available.
        dtype: ``"fp32"``, ``"fp16"`` or ``"bf16"``; default fp16 on CUDA and fp32 on CPU.
        pooling: override the pooling read from the model files (``"cls"``/``"mean"``).
        query_instruction, passage_instruction: prefixes; default from the model name
            (none for BGE-M3).
        query_max_length, passage_max_length: default truncation lengths.
        batch_size: texts per forward pass (at most; long texts also obey the two caps below).
        max_batch_tokens: cap on ``batch rows x padded length`` per forward pass; default from
            the device (:func:`default_batch_budgets`).
        max_batch_attention: cap on ``batch rows x padded length^2`` per forward pass (attention
            memory grows with the square of the length); default from the device.
        mcls: MCLS for the dense output (off by default; CLS-pooling models such as BGE-M3 only,
            a ``ValueError`` for mean-pooling ones). A CLS token is inserted before every further
            chunk of ``mcls_interval`` text tokens and the dense vector is the L2-normalised mean
            of the last hidden states at every CLS position, the template's first one included.
            It applies to every text this encoder encodes, queries as well as passages, so an
            index encodes both the same way: a text of at most ``mcls_interval`` tokens gets no
            inserted token and the same vectors as without MCLS (within float rounding), which
            covers nearly every query. The inserted tokens take positions, so they count against
            the max length: the text is cut so that text + inserted CLS + special tokens fit.
            One forward pass still gives every output: the sparse and ColBERT outputs leave the
            inserted positions out, so they have exactly the tokens they have without MCLS for
            the same (possibly shorter-cut) text, and ``n_tokens`` does not count the inserted
            tokens; their hidden states did attend to the inserted CLS tokens, so the values
            differ slightly from a pass without MCLS. Recorded in ``spec.mcls`` (the interval, or
            ``None``) and in an index's manifest.
        mcls_interval: text tokens per CLS with ``mcls`` (BGE-M3 paper: 256).
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike = "BAAI/bge-m3",
        *,
        device: str | None = None,
        dtype: str | None = None,
        pooling: str | None = None,
        query_instruction: str | None = None,
        passage_instruction: str | None = None,
        query_max_length: int | None = None,
        passage_max_length: int | None = None,
        batch_size: int = 64,
        max_batch_tokens: int | None = None,
        max_batch_attention: int | None = None,
        mcls: bool = False,
        mcls_interval: int = DEFAULT_MCLS_INTERVAL,
        cache_dir: str | None = None,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        if batch_size < 1 or (max_batch_tokens is not None and max_batch_tokens < 1) \
                or (max_batch_attention is not None and max_batch_attention < 1):
            raise ValueError("batch_size, max_batch_tokens and max_batch_attention must be positive")
        if not isinstance(mcls, bool):
            raise TypeError(f"mcls must be True or False, got {mcls!r} (the interval is mcls_interval)")
        if mcls and (isinstance(mcls_interval, bool) or not isinstance(mcls_interval, int) or mcls_interval < 1):
            raise ValueError(f"mcls_interval must be a positive integer, got {mcls_interval!r}")
        path = resolve_model(model_name_or_path, cache_dir=cache_dir)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            model = AutoModel.from_pretrained(str(path))
        except Exception as e:
            raise ModelFormatError(f"cannot load the encoder in {path}: {type(e).__name__}: {e}") from e
        hidden = int(model.config.hidden_size)
        sparse_linear, colbert_linear = H.load_heads(path, hidden)
        is_m3 = sparse_linear is not None

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = "fp16" if self.device.type == "cuda" else "fp32"
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        if dtype not in dtypes:
            raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
        self.dtype = dtypes[dtype]
        self.model = model.eval().to(self.device, self.dtype)
        self.sparse_linear = sparse_linear.to(self.device, self.dtype) if is_m3 else None
        self.colbert_linear = colbert_linear.to(self.device, self.dtype) if is_m3 else None

        limit = self._position_limit(model.config)
        st_len = read_max_seq_length(path)
        q_default = M3_QUERY_MAX_LENGTH if is_m3 else (st_len or 512)
        p_default = M3_PASSAGE_MAX_LENGTH if is_m3 else (st_len or 512)
        kq, kp = model_prefixes(path, str(model_name_or_path))
        pool = pooling or read_pooling(path, is_m3)
        if pool not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pool!r}")
        if mcls and pool != "cls":
            raise ValueError(f"mcls averages CLS hidden states, so it needs a CLS-pooling model such as "
                             f"BGE-M3; {model_name_or_path} uses {pool} pooling")
        self.spec = ModelSpec(
            name=str(model_name_or_path),
            path=str(path),
            pooling=pool,
            has_sparse=is_m3,
            has_colbert=is_m3,
            dim=hidden,
            colbert_dim=int(colbert_linear.out_features) if is_m3 else 0,
            vocab_size=max(len(self.tokenizer), int(model.config.vocab_size)),
            query_prefix=kq if query_instruction is None else query_instruction,
            passage_prefix=kp if passage_instruction is None else passage_instruction,
            query_max_length=min(query_max_length or q_default, limit),
            passage_max_length=min(passage_max_length or p_default, limit),
            mcls=mcls_interval if mcls else None,
        )
        d_tokens, d_attention = default_batch_budgets(self.device, model.config, self.dtype)
        self.batch_size = batch_size
        #: cap on rows x padded length per forward pass
        self.max_batch_tokens = d_tokens if max_batch_tokens is None else max_batch_tokens
        #: cap on rows x padded length^2 per forward pass
        self.max_batch_attention = d_attention if max_batch_attention is None else max_batch_attention
        tok = self.tokenizer
        self._tok = SafeTokenizer(tok)  # thread-safe ids; self.tokenizer is left as loaded
        self._cls_id = tok.cls_token_id
        if mcls and (self._cls_id is None or not self._tok.prefix or self._tok.prefix[0] != self._cls_id):
            raise ValueError(f"mcls needs a tokenizer that starts every text with its CLS token; "
                             f"the one of {model_name_or_path} does not")
        self._pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        # FlagEmbedding drops these ids from lexical weights.
        self._unused_ids = np.array(
            sorted({i for i in (tok.cls_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) if i is not None}),
            dtype=np.int64,
        )

    @staticmethod
    def _position_limit(config) -> int:
        n = int(getattr(config, "max_position_embeddings", 512) or 512)
        # RoBERTa-family models offset positions by padding_idx + 1.
        if getattr(config, "model_type", "") in {"xlm-roberta", "roberta", "camembert", "xlm-roberta-xl"}:
            n -= int(getattr(config, "pad_token_id", 1) or 0) + 1
        return max(n, 2)

    # ------------------------------------------------------------------ engine API

    @property
    def outputs(self) -> tuple[str, ...]:
        """Representations this model has: ``("dense",)`` or ``("dense", "sparse", "colbert")``."""
        return self.spec.outputs

    def encode_arrays(
        self,
        texts: Sequence[str],
        *,
        kind: Kind = "passage",
        batch_size: int | None = None,
        max_length: int | None = None,
        dense: bool = True,
        sparse: bool | None = None,
        colbert: bool = False,
        show_progress: bool | None = None,
    ) -> Encoded:
        """Encode ``texts`` into arrays, in input order.

        Args:
            kind: ``"query"`` or ``"passage"`` pick the instruction prefix and default max length;
                ``"raw"`` adds no prefix and uses the passage length.
            sparse: default ``True`` when the model has a sparse head.

        With MCLS on (``BGEM3Encoder(..., mcls=True)``), every kind is encoded with it and
        ``max_length`` includes the inserted CLS tokens; ``n_tokens`` and the ColBERT rows do not.
        """
        texts = check_texts(texts)
        if kind not in ("query", "passage", "raw"):
            raise ValueError(f"kind must be 'query', 'passage' or 'raw', got {kind!r}")
        sparse = self.spec.has_sparse if sparse is None else sparse
        for want, have, name in ((sparse, self.spec.has_sparse, "sparse"), (colbert, self.spec.has_colbert, "colbert")):
            if want and not have:
                raise ValueError(
                    f"model {self.spec.name} has no {name} head (it provides: {', '.join(self.outputs)})"
                )
        if not (dense or sparse or colbert):
            raise ValueError("nothing to compute: set at least one of dense, sparse, colbert")
        prefix = {"query": self.spec.query_prefix, "passage": self.spec.passage_prefix, "raw": ""}[kind]
        if max_length is None:
            max_length = self.spec.query_max_length if kind == "query" else self.spec.passage_max_length
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        if prefix:
            texts = [prefix + t for t in texts]
        # Not self.tokenizer(..., truncation=True): that rewrites state shared by every thread.
        inserted = None
        if self.spec.mcls:
            ids, inserted = self._tok.encode_mcls(texts, max_length, self.spec.mcls, self._cls_id)
        else:
            ids = self._tok.encode(texts, max_length)
        seq_lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        lengths = seq_lens if inserted is None else seq_lens - np.array([len(p) for p in inserted], dtype=np.int64)
        if show_progress is None:
            show_progress = len(texts) >= 256
        out = self._run(ids, lengths, seq_lens, inserted, batch_size or self.batch_size, dense, sparse, colbert,
                        show_progress)
        return out

    def _run(self, ids, lengths, seq_lens, inserted, batch_size, want_dense, want_sparse, want_colbert,
             show_progress) -> Encoded:
        """``lengths``: tokens per text as output (``n_tokens``); ``seq_lens``: the sequences'
        lengths, with MCLS's inserted CLS tokens (at positions ``inserted[i]``), which batching
        and padding go by."""
        from tqdm.auto import tqdm

        n = len(ids)
        order = np.argsort(-seq_lens, kind="stable")
        dense_out = np.zeros((n, self.spec.dim), dtype=np.float32) if want_dense else None
        sp_rows, sp_cols, sp_vals = [], [], []
        cb_chunks: list[np.ndarray | None] = [None] * n if want_colbert else []
        bar = tqdm(total=n, desc="encode", unit="text", disable=not show_progress)
        start = 0
        with torch.inference_mode():
            while start < n:
                width = int(seq_lens[order[start]])  # longest in this batch: sorted descending
                b = batch_rows(width, n - start, batch_size, self.max_batch_tokens, self.max_batch_attention)
                idx = order[start : start + b]
                try:
                    d, s, c = self._forward_batch([ids[i] for i in idx], width, want_dense, want_sparse, want_colbert,
                                                  None if inserted is None else [inserted[i] for i in idx])
                except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
                    if not _is_oom(e):
                        raise
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    if b == 1:
                        raise torch.OutOfMemoryError(
                            f"out of memory encoding a single text of {width} tokens on {self.device} "
                            f"({str(self.dtype).replace('torch.', '')}): no smaller batch is left to try. "
                            "Pass a smaller max_length (or passage_max_length / query_max_length to "
                            "BGEM3Encoder), free memory on the device, or use dtype='fp16'. "
                            f"Cause: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                        ) from e
                    batch_size = max(1, b // 2)
                    log.warning("out of memory on a batch of %d; retrying with %d", b, batch_size)
                    continue
                if d is not None:
                    dense_out[idx] = d
                if s is not None:
                    r, t, w = s
                    sp_rows.append(idx[r])
                    sp_cols.append(t)
                    sp_vals.append(w)
                if c is not None:
                    ends = np.cumsum(lengths[idx] - 1)
                    for j, piece in enumerate(np.split(c, ends[:-1])):
                        cb_chunks[idx[j]] = piece
                start += b
                bar.update(b)
        bar.close()
        sparse_out = self._build_csr(sp_rows, sp_cols, sp_vals, n) if want_sparse else None
        cb, offs = None, None
        if want_colbert:
            offs = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(lengths - 1, out=offs[1:])
            cb = np.concatenate(cb_chunks, axis=0) if n else np.zeros((0, self.spec.colbert_dim), np.float32)
        return Encoded(dense=dense_out, sparse=sparse_out, colbert=cb, colbert_offsets=offs, n_tokens=lengths)

    def _forward_batch(self, batch_ids, width, want_dense, want_sparse, want_colbert, inserted=None):
        """One forward pass. ``inserted`` (MCLS): per row, the positions of the inserted CLS
        tokens: the dense vector averages them with position 0; sparse and ColBERT skip them."""
        b = len(batch_ids)
        input_ids = np.full((b, width), self._pad_id, dtype=np.int64)
        mask = np.zeros((b, width), dtype=np.int64)
        for j, row in enumerate(batch_ids):
            input_ids[j, : len(row)] = row
            mask[j, : len(row)] = 1
        t_ids = torch.from_numpy(input_ids).to(self.device)
        t_mask = torch.from_numpy(mask).to(self.device)
        h = self.model(input_ids=t_ids, attention_mask=t_mask, return_dict=True).last_hidden_state
        keep, t_keep = mask, t_mask  # the positions sparse and ColBERT report
        if inserted is not None:
            keep = mask.copy()
            for j, pos in enumerate(inserted):
                keep[j, pos] = 0
            t_keep = torch.from_numpy(keep).to(self.device)
        d = s = c = None
        if want_dense:
            if inserted is None:
                d = H.pool_dense(h, t_mask, self.spec.pooling).float().cpu().numpy()
            else:
                k = 1 + max(len(p) for p in inserted)
                pos = np.zeros((b, k), dtype=np.int64)  # row j: 0, then its inserted CLS positions
                valid = np.zeros((b, k), dtype=bool)
                for j, p in enumerate(inserted):
                    pos[j, 1 : 1 + len(p)] = p
                    valid[j, : 1 + len(p)] = True
                d = H.pool_mcls(h, torch.from_numpy(pos).to(self.device),
                                torch.from_numpy(valid).to(self.device)).cpu().numpy()
        if want_sparse:
            w = H.token_weights(h, self.sparse_linear).float().cpu().numpy()
            nz = (keep == 1) & (w > 0) & ~np.isin(input_ids, self._unused_ids)
            r, p = np.nonzero(nz)
            s = (r, input_ids[r, p], w[r, p])
        if want_colbert:
            v = H.colbert_vectors(h, t_keep, self.colbert_linear).float().cpu().numpy()
            c = v[keep[:, 1:] == 1]  # row-major: each text's n-1 vectors, texts in batch order
        return d, s, c

    def _build_csr(self, rows, cols, vals, n) -> sp.csr_matrix:
        """COO pieces -> CSR, keeping the maximum weight of a token id repeated in one text."""
        V = self.spec.vocab_size
        if rows:
            r = np.concatenate(rows).astype(np.int64)
            t = np.concatenate(cols).astype(np.int64)
            w = np.concatenate(vals).astype(np.float32)
        else:
            r = t = np.zeros(0, np.int64)
            w = np.zeros(0, np.float32)
        key = r * V + t
        o = np.argsort(key, kind="stable")
        key, w = key[o], w[o]
        first = np.ones(len(key), dtype=bool)
        first[1:] = key[1:] != key[:-1]
        starts = np.flatnonzero(first)
        ukey = key[starts]
        uw = np.maximum.reduceat(w, starts) if len(w) else w
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.add.at(indptr, (ukey // V) + 1, 1)
        np.cumsum(indptr, out=indptr)
        return sp.csr_matrix((uw, (ukey % V).astype(np.int32), indptr), shape=(n, V))

    # ------------------------------------------------------- FlagEmbedding-compatible API

    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool = True,
        return_sparse: bool | None = None,
        return_colbert_vecs: bool = False,
        *,
        kind: Kind = "raw",
    ) -> dict[str, Any]:
        """FlagEmbedding ``BGEM3FlagModel.encode``.

        Returns ``{"dense_vecs": (n, d) float32, "lexical_weights": [{str(id): w}], "colbert_vecs":
        [(n_i, d) float32]}``; an output not asked for is ``None``. As in FlagEmbedding, a single
        string gives a single result (a 1-D vector, one dict, one array). ``return_sparse``
        defaults to whether the model has a sparse head.
        """
        single = isinstance(sentences, str)
        texts = [sentences] if single else sentences
        enc = self.encode_arrays(
            texts, kind=kind, batch_size=batch_size, max_length=max_length,
            dense=return_dense, sparse=return_sparse, colbert=return_colbert_vecs,
        )
        out: dict[str, Any] = {
            "dense_vecs": enc.dense,
            "lexical_weights": enc.lexical_dicts() if enc.sparse is not None else None,
            "colbert_vecs": enc.colbert_list() if enc.colbert is not None else None,
        }
        if single:
            out = {k: (v[0] if v is not None else None) for k, v in out.items()}
        return out

    def encode_queries(self, queries, batch_size=None, max_length=None, return_dense=True,
                       return_sparse=None, return_colbert_vecs=False):
        """:meth:`encode` with the query instruction and the query max length."""
        return self.encode(queries, batch_size, max_length, return_dense, return_sparse,
                           return_colbert_vecs, kind="query")

    def encode_corpus(self, corpus, batch_size=None, max_length=None, return_dense=True,
                      return_sparse=None, return_colbert_vecs=False):
        """:meth:`encode` with the passage instruction and the passage max length."""
        return self.encode(corpus, batch_size, max_length, return_dense, return_sparse,
                           return_colbert_vecs, kind="passage")

    @staticmethod
    def compute_lexical_matching_score(lexical_weights_1, lexical_weights_2):
        """Sum of ``w1 * w2`` over shared token ids. Two dicts give a float; two lists a matrix."""
        if isinstance(lexical_weights_1, dict) and isinstance(lexical_weights_2, dict):
            return _lexical_score(lexical_weights_1, lexical_weights_2)
        if isinstance(lexical_weights_1, list) and isinstance(lexical_weights_2, list):
            return np.array([[_lexical_score(a, b) for b in lexical_weights_2] for a in lexical_weights_1])
        raise TypeError("lexical weights must be two dicts or two lists of dicts")

    @staticmethod
    def colbert_score(q_reps: np.ndarray, p_reps: np.ndarray) -> float:
        """Mean over query vectors of the best dot product against the passage vectors."""
        return _colbert_score(q_reps, p_reps)

    def compute_score(
        self,
        sentence_pairs,
        batch_size: int | None = None,
        max_query_length: int | None = None,
        max_passage_length: int | None = None,
        weights_for_different_modes: Sequence[float] | None = None,
    ) -> dict[str, Any]:
        """Score (query, passage) pairs with every channel, as FlagEmbedding's ``compute_score``.

        Returns ``{"colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense"}`` -> list
        of floats (one pair: floats). Weights are ``[dense, sparse, colbert]``, default all 1.

        Per pair: dense = q . p; sparse = sum over shared token ids of q_w * p_w; colbert = mean
        over the query's vectors of the best dot product with the passage's vectors. Each distinct
        query and passage is encoded once (as :meth:`encode_arrays` does, ``batch_size`` texts per
        forward pass at most) and each distinct pair scored once, so a pair's scores depend
        neither on the other pairs nor on its position, and equal pairs get exactly equal scores.
        (FlagEmbedding pads a batch's passages with zero vectors that take part in the ColBERT
        max; they change a score only where every real dot product of a query vector is
        negative, and then by how the batch happened to be padded. Here only real tokens count.)
        """
        if not (self.spec.has_sparse and self.spec.has_colbert):
            raise ValueError(f"compute_score needs the BGE-M3 heads; {self.spec.name} only has: {', '.join(self.outputs)}")
        single = (isinstance(sentence_pairs, (tuple, list)) and len(sentence_pairs) == 2
                  and all(isinstance(x, str) for x in sentence_pairs))
        pairs = [tuple(sentence_pairs)] if single else list(sentence_pairs)
        if not pairs:
            raise ValueError("sentence_pairs is empty")
        for i, p in enumerate(pairs):
            if not (isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(x, str) for x in p)):
                raise TypeError(f"sentence_pairs[{i}] must be a (query, passage) pair of strings")
        w = [1.0, 1.0, 1.0] if weights_for_different_modes is None else [float(x) for x in weights_for_different_modes]
        if len(w) != 3:
            raise ValueError("weights_for_different_modes must be [dense, sparse, colbert]")
        queries, q_of = _distinct([a for a, _ in pairs])
        passages, p_of = _distinct([b for _, b in pairs])
        keep, pair_of = np.unique(q_of * len(passages) + p_of, return_inverse=True)
        qi, pi = keep // len(passages), keep % len(passages)
        kw = {"batch_size": batch_size, "dense": True, "sparse": True, "colbert": True, "show_progress": False}
        q = self.encode_arrays(queries, kind="query", max_length=max_query_length, **kw)
        p = self.encode_arrays(passages, kind="passage", max_length=max_passage_length, **kw)
        dense = np.einsum("ij,ij->i", q.dense[qi], p.dense[pi]).astype(np.float32)
        sparse = np.asarray(q.sparse[qi].multiply(p.sparse[pi]).sum(axis=1), dtype=np.float32).reshape(-1)
        colbert = np.array([(q.colbert_of(a) @ p.colbert_of(b).T).max(axis=1).mean()
                            for a, b in zip(qi.tolist(), pi.tolist())], dtype=np.float32)
        both = (sparse * np.float32(w[1]) + dense * np.float32(w[0])) / np.float32(w[0] + w[1])
        every = (colbert * np.float32(w[2]) + sparse * np.float32(w[1]) + dense * np.float32(w[0])) / np.float32(sum(w))
        res = {"colbert": colbert, "sparse": sparse, "dense": dense, "sparse+dense": both,
               "colbert+sparse+dense": every}
        res = {k: v[pair_of].tolist() for k, v in res.items()}
        if single:
            return {k: v[0] for k, v in res.items()}
        return res

    def __repr__(self) -> str:
        extra = f", mcls={self.spec.mcls}" if self.spec.mcls else ""
        return f"BGEM3Encoder({self.spec.name!r}, outputs={self.outputs}, device={self.device}{extra})"
