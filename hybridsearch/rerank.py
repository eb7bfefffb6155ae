"""Cross-encoder reranking in the BGE-reranker layout (``BAAI/bge-reranker-v2-m3``).

A reranker is a sequence-classification model with one output: it reads a (query, passage) pair
as one sequence and returns a relevance logit. :class:`Reranker` reproduces FlagEmbedding's
``FlagReranker.compute_score``:

* the query and the passage are tokenised separately without special tokens, the query
  truncated to ``query_max_length`` (default ``max_length * 3 // 4``) and the passage to
  ``max_length``;
* the two are joined with the tokenizer's pair template (``<s> q </s></s> p </s>`` for XLM-R);
  when the pair is longer than ``max_length`` only the passage is cut (``only_second``);
* the score is ``logits[:, 0]`` in float32, passed through a sigmoid with ``normalize=True``.

Each distinct pair is scored once and every copy gets that score, so equal pairs get exactly equal
scores (a batched forward pass rounds differently at different rows). Pairs are sorted by tokenised
length so a batch holds pairs of similar length, padded by hand,
run under ``torch.inference_mode`` (fp16 on CUDA by default) and put back in input order; a batch
that runs out of memory is retried at half the size.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .encode.resolve import resolve_model
from .encode.tokenize import SafeTokenizer
from .errors import ModelFormatError

log = logging.getLogger(__name__)

DEFAULT_RERANKER = "BAAI/bge-reranker-v2-m3"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _position_limit(config) -> int | None:
    """Longest sequence the model's position embeddings allow (None if it has no such limit)."""
    n = getattr(config, "max_position_embeddings", None)
    if not n:
        return None
    n = int(n)
    # RoBERTa-family models offset positions by padding_idx + 1.
    if getattr(config, "model_type", "") in {"xlm-roberta", "roberta", "camembert", "xlm-roberta-xl"}:
        n -= int(getattr(config, "pad_token_id", 1) or 0) + 1
    return max(n, 2)


class _PairTemplate:
    """The tokenizer's template for a pair of sequences, read off the tokenizer itself.

    transformers 5 removed ``prepare_for_model``/``build_inputs_with_special_tokens``, so the
    template (special tokens before, between and after the two sequences, and their token type
    ids) is found by tokenising one probe pair with and without special tokens.
    """

    def __init__(self, tokenizer) -> None:
        want_types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
        probe_a, probe_b = "first words here", "second text"
        a = tokenizer(probe_a, add_special_tokens=False)["input_ids"]
        b = tokenizer(probe_b, add_special_tokens=False)["input_ids"]
        full = tokenizer(probe_a, probe_b, add_special_tokens=True, return_token_type_ids=want_types)
        ids = list(full["input_ids"])
        types = list(full["token_type_ids"]) if want_types and "token_type_ids" in full else None
        special = set(tokenizer.all_special_ids)
        found = None
        for i in range(len(ids) - len(a) - len(b) + 1):
            if ids[i : i + len(a)] != a or not set(ids[:i]) <= special:
                continue
            for j in range(i + len(a), len(ids) - len(b) + 1):
                if (ids[j : j + len(b)] == b and set(ids[i + len(a) : j]) <= special
                        and set(ids[j + len(b) :]) <= special):
                    found = (i, j)
                    break
            if found:
                break
        if not a or not b or found is None:
            raise ModelFormatError(
                f"cannot find the pair template of tokenizer {type(tokenizer).__name__}: "
                f"{probe_a!r} + {probe_b!r} gave {ids}"
            )
        i, j = found
        self.prefix = ids[:i]
        self.middle = ids[i + len(a) : j]
        self.suffix = ids[j + len(b) :]
        self.n_special = len(self.prefix) + len(self.middle) + len(self.suffix)
        if types is not None:
            self.types = (types[:i], types[i] if a else 0, types[i + len(a) : j],
                          types[j] if b else 0, types[j + len(b) :])
        else:
            self.types = None

    def build(self, q: list[int], p: list[int]) -> tuple[list[int], list[int] | None]:
        ids = self.prefix + q + self.middle + p + self.suffix
        if self.types is None:
            return ids, None
        t_pre, t_a, t_mid, t_b, t_suf = self.types
        return ids, t_pre + [t_a] * len(q) + t_mid + [t_b] * len(p) + t_suf


def _check_pairs(sentence_pairs: Any) -> tuple[list[tuple[str, str]], bool]:
    """Validate ``sentence_pairs``; return (list of pairs, whether a single pair was passed)."""
    if isinstance(sentence_pairs, (str, bytes)) or not isinstance(sentence_pairs, Sequence):
        raise TypeError(
            "sentence_pairs must be a (query, passage) pair or a list of such pairs, got "
            f"{type(sentence_pairs).__name__}"
        )
    if len(sentence_pairs) == 0:
        raise ValueError("sentence_pairs is empty: pass at least one (query, passage) pair")
    if isinstance(sentence_pairs[0], str):  # FlagReranker's rule: a single pair
        pairs, single = [sentence_pairs], True
    else:
        pairs, single = list(sentence_pairs), False
    for i, p in enumerate(pairs):
        if not (isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(x, str) for x in p)):
            where = "sentence_pairs" if single else f"sentence_pairs[{i}]"
            raise TypeError(
                f"{where} must be a (query, passage) pair of two strings, got {_describe(p)}"
            )
    return [(p[0], p[1]) for p in pairs], single


def _unique(items: Sequence) -> tuple[list[int], np.ndarray]:
    """``(first, inverse)``: the index of each distinct item's first occurrence, in order of first
    occurrence, and for every item the position of its distinct item in ``first``."""
    seen: dict = {}
    first: list[int] = []
    inverse = np.empty(len(items), dtype=np.int64)
    for i, x in enumerate(items):
        j = seen.setdefault(x, len(first))
        if j == len(first):
            first.append(i)
        inverse[i] = j
    return first, inverse


def _describe(x: Any) -> str:
    if isinstance(x, (tuple, list)):
        inner = ", ".join(type(v).__name__ for v in x[:4]) + (", ..." if len(x) > 4 else "")
        return f"a {type(x).__name__} of {len(x)} ({inner})"
    return f"a {type(x).__name__}"


def _check_positive(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


class Reranker:
    """Cross-encoder reranker (``AutoModelForSequenceClassification`` with one label).

    Args:
        model_name_or_path: hub id (default ``"BAAI/bge-reranker-v2-m3"``) or a local folder.
            Resolution is the encoder's: local folder, packaged copy, Hugging Face cache, hub;
            offline, a clear :class:`~hybridsearch.errors.ModelNotFoundError`.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available.
        dtype: ``"fp32"``, ``"fp16"`` or ``"bf16"``; default fp16 on CUDA and fp32 on CPU.
        batch_size: pairs per forward pass.
        max_length: tokens of a (query, passage) pair, special tokens included; capped by the
            model's position embeddings.
        query_max_length: tokens kept of the query; default ``max_length * 3 // 4`` of the call.
        cache_dir: Hugging Face cache folder.

    Raises:
        ModelFormatError: the folder is not a sequence-classification model with one label.
    """

    def __init__(
        self,
        model_name_or_path: str | os.PathLike = DEFAULT_RERANKER,
        *,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = 32,
        max_length: int = 512,
        query_max_length: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        self.batch_size = _check_positive("batch_size", batch_size)
        self.max_length = _check_positive("max_length", max_length)
        self.query_max_length = (None if query_max_length is None
                                 else _check_positive("query_max_length", query_max_length))
        self.name = str(model_name_or_path)
        path = resolve_model(model_name_or_path, cache_dir=cache_dir)
        self.path = path
        try:
            config = AutoConfig.from_pretrained(str(path))
        except Exception as e:
            raise ModelFormatError(f"cannot read the model config in {path}: {type(e).__name__}: {e}") from e
        archs = list(getattr(config, "architectures", None) or [])
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise ModelFormatError(
                f"{path} is not a cross-encoder: a reranker is a sequence-classification model "
                f"(e.g. XLMRobertaForSequenceClassification, as BAAI/bge-reranker-v2-m3), but its "
                f"config.json declares architectures {archs or 'none'}. An embedding model such as "
                "BAAI/bge-m3 belongs in BGEM3Encoder."
            )
        if int(config.num_labels) != 1:
            raise ModelFormatError(
                f"{path} is a sequence-classification model with {config.num_labels} labels; a "
                "reranker gives one relevance score per pair (num_labels=1)."
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(path), config=config, output_loading_info=True
            )
        except Exception as e:
            raise ModelFormatError(f"cannot load the reranker in {path}: {type(e).__name__}: {e}") from e
        missing = sorted(info.get("missing_keys", []) or [])
        if missing:
            raise ModelFormatError(
                f"{path} lacks weights the reranker needs ({', '.join(missing[:5])}"
                f"{', ...' if len(missing) > 5 else ''}); they would be random, so the scores would "
                "be meaningless."
            )

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = "fp16" if self.device.type == "cuda" else "fp32"
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.dtype = _DTYPES[dtype]
        self.model = model.eval().to(self.device, self.dtype)
        self.position_limit = _position_limit(config)
        self._template = _PairTemplate(self.tokenizer)
        self._tok = SafeTokenizer(self.tokenizer)
        tok = self.tokenizer
        self._pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    # ------------------------------------------------------------------ tokenisation

    def _lengths(self, max_length: int | None, query_max_length: int | None) -> tuple[int, int]:
        """(max_length, query_max_length) for a call, validated and capped."""
        max_length = self.max_length if max_length is None else _check_positive("max_length", max_length)
        if self.position_limit is not None and max_length > self.position_limit:
            log.info("max_length %d capped at the model's %d positions", max_length, self.position_limit)
            max_length = self.position_limit
        if max_length < self._template.n_special + 2:
            raise ValueError(
                f"max_length must be at least {self._template.n_special + 2} (the pair template "
                f"adds {self._template.n_special} special tokens), got {max_length}"
            )
        if query_max_length is not None:
            qmax = _check_positive("query_max_length", query_max_length)
        elif self.query_max_length is not None:
            qmax = self.query_max_length
        else:
            qmax = max_length * 3 // 4
        return max_length, qmax

    def _tokenize(self, pairs: list[tuple[str, str]], max_length: int, qmax: int):
        """Token ids (and token type ids, or None) of every pair, FlagReranker's way."""
        tok = self.tokenizer
        # The tokenizer's own truncation=True would rewrite state shared by every thread (a
        # concurrent call with another max_length could cut these ids to its length): cut here.
        q_ids = self._tok.encode_plain([q for q, _ in pairs], qmax)
        p_ids = self._tok.encode_plain([p for _, p in pairs], max_length)
        # transformers' only_second truncation leaves a pair too long when cutting the passage
        # cannot make it fit (the query alone fills max_length); keep such a pair within
        # max_length by cutting the query so at least one passage token remains.
        q_room = max_length - self._template.n_special - 1
        left = getattr(tok, "truncation_side", "right") == "left"
        ids, types = [], []
        for q, p in zip(q_ids, p_ids):
            if len(q) > q_room:
                q = q[len(q) - q_room :] if left else q[:q_room]
            extra = len(q) + len(p) + self._template.n_special - max_length
            if extra > 0:
                p = p[extra:] if left else p[: len(p) - extra]
            i, t = self._template.build(q, p)
            ids.append(i)
            types.append(t)
        return ids, (types if self._template.types is not None else None)

    def tokenize_pairs(
        self,
        sentence_pairs: Sequence[tuple[str, str]],
        max_length: int | None = None,
        query_max_length: int | None = None,
    ) -> list[list[int]]:
        """Input ids of each (query, passage) pair exactly as the model sees them."""
        pairs, _ = _check_pairs(sentence_pairs)
        ml, qmax = self._lengths(max_length, query_max_length)
        return self._tokenize(pairs, ml, qmax)[0]

    # ------------------------------------------------------------------ scoring

    def compute_score(
        self,
        sentence_pairs: Sequence[tuple[str, str]] | tuple[str, str],
        batch_size: int | None = None,
        max_length: int | None = None,
        normalize: bool = False,
        *,
        query_max_length: int | None = None,
        show_progress: bool | None = None,
    ) -> list[float] | float:
        """Relevance score of each (query, passage) pair, in input order.

        As FlagReranker: a list of floats (raw logits, or their sigmoid with ``normalize=True``);
        a single ``(query, passage)`` pair gives a single float. ``show_progress`` defaults to
        a progress bar for 256 pairs or more.
        """
        pairs, single = _check_pairs(sentence_pairs)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be True or False, got {normalize!r}")
        bs = self.batch_size if batch_size is None else _check_positive("batch_size", batch_size)
        ml, qmax = self._lengths(max_length, query_max_length)
        # Each distinct pair is scored once and its score given to every copy: a batched forward
        # pass rounds differently at different rows, so scoring copies separately can make equal
        # pairs differ in the last bits (and flip the order of ties).
        first, pair_of = _unique(pairs)
        ids, types = self._tokenize([pairs[i] for i in first], ml, qmax)
        # Different strings can give the same model input (e.g. after normalisation): once too.
        keys = [(tuple(i), tuple(t)) for i, t in zip(ids, types)] if types is not None else [tuple(i) for i in ids]
        first, input_of = _unique(keys)
        ids = [ids[i] for i in first]
        types = [types[i] for i in first] if types is not None else None
        if show_progress is None:
            show_progress = len(pairs) >= 256
        logits = self._run(ids, types, bs, show_progress)[input_of[pair_of]]
        if normalize:
            scores = [1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
                      for x in logits.astype(np.float64).tolist()]
        else:
            scores = logits.tolist()
        return scores[0] if single else scores

    def rerank(
        self,
        query: str,
        passages: Sequence[str],
        top_n: int | None = None,
        *,
        normalize: bool = False,
        batch_size: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Score ``passages`` against ``query``.

        Returns ``(scores, order)``: ``scores`` is (n,) float32 in the order of ``passages``;
        ``order`` is int64 indices into ``passages``, best first (ties keep input order), the
        first ``top_n`` of them if given. ``passages[order[0]]`` is the best passage.
        """
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        if isinstance(passages, (str, bytes)) or not isinstance(passages, Sequence):
            raise TypeError(f"passages must be a list of strings, got {type(passages).__name__}")
        if len(passages) == 0:
            raise ValueError("passages is empty: pass at least one passage")
        for i, p in enumerate(passages):
            if not isinstance(p, str):
                raise TypeError(f"passages[{i}] is {type(p).__name__}, expected str")
        if top_n is not None:
            top_n = _check_positive("top_n", top_n)
        scores = np.asarray(
            self.compute_score([(query, p) for p in passages], batch_size=batch_size, normalize=normalize),
            dtype=np.float32,
        ).reshape(-1)
        order = np.argsort(-scores, kind="stable").astype(np.int64)
        if top_n is not None:
            order = order[:top_n]
        return scores, order

    def _run(self, ids: list[list[int]], types: list[list[int]] | None, batch_size: int,
             show_progress: bool) -> np.ndarray:
        from tqdm.auto import tqdm

        n = len(ids)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
        order = np.argsort(-lengths, kind="stable")
        out = np.zeros(n, dtype=np.float32)
        bar = tqdm(total=n, desc="rerank", unit="pair", disable=not show_progress)
        start = 0
        with torch.inference_mode():
            while start < n:
                b = min(batch_size, n - start)
                idx = order[start : start + b]
                try:
                    out[idx] = self._forward_batch(ids, types, idx, int(lengths[idx[0]]))
                except RuntimeError as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
                    if not _is_oom(e):
                        raise
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    if b == 1:
                        raise torch.OutOfMemoryError(
                            f"out of memory scoring a single pair of {int(lengths[idx[0]])} tokens on "
                            f"{self.device} ({str(self.dtype).replace('torch.', '')}): no smaller batch is "
                            "left to try. Pass a smaller max_length, free memory on the device, or use "
                            f"dtype='fp16'. Cause: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                        ) from e
                    batch_size = max(1, b // 2)
                    log.warning("out of memory on a batch of %d pairs; retrying with %d", b, batch_size)
                    continue
                start += b
                bar.update(b)
        bar.close()
        return out

    def _forward_batch(self, ids, types, idx, width) -> np.ndarray:
        b = len(idx)
        input_ids = np.full((b, width), self._pad_id, dtype=np.int64)
        mask = np.zeros((b, width), dtype=np.int64)
        type_ids = np.zeros((b, width), dtype=np.int64) if types is not None else None
        for j, i in enumerate(idx):
            row = ids[i]
            input_ids[j, : len(row)] = row
            mask[j, : len(row)] = 1
            if type_ids is not None:
                type_ids[j, : len(row)] = types[i]
        kw = {
            "input_ids": torch.from_numpy(input_ids).to(self.device),
            "attention_mask": torch.from_numpy(mask).to(self.device),
        }
        if type_ids is not None:
            kw["token_type_ids"] = torch.from_numpy(type_ids).to(self.device)
        logits = self.model(**kw, return_dict=True).logits
        return logits[:, 0].float().cpu().numpy()

    def __repr__(self) -> str:
        return f"Reranker({self.name!r}, device={self.device}, dtype={str(self.dtype).replace('torch.', '')})"
