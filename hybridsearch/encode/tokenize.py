"""Token ids without shared mutable state, so that threads can tokenise at the same time.

A Hugging Face *fast* tokenizer keeps its truncation and padding settings on the Rust tokenizer
it wraps, and every call rewrites them (``set_truncation_and_padding``) before encoding. Two
threads calling it with different ``max_length`` (queries at 8 tokens, passages at 8192) can
each encode with the other's setting: passages came out cut to the query length. The same holds
for anyone else calling the same tokenizer object with ``truncation=True``.

:class:`SafeTokenizer` encodes with its own copy of the Rust tokenizer, with truncation and
padding switched off once at construction and never touched again, so concurrent calls only
read it. Truncation is done here on the ids, exactly as the tokenizer would (the special tokens
of the single-sequence template are kept, the text's own tokens are cut on the tokenizer's
``truncation_side``). A tokenizer whose template is not a fixed prefix and suffix (none of the
usual encoders) is served through the same copy with its truncation under a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

PROBES = ("probe text for the template", "")


class SafeTokenizer:
    """Thread-safe token ids for one Hugging Face tokenizer (which is not modified)."""

    def __init__(self, tokenizer) -> None:
        self.hf = tokenizer
        self._rust = None
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        if backend is not None:
            from tokenizers import Tokenizer

            own = Tokenizer.from_str(backend.to_str())
            own.no_truncation()
            own.no_padding()
            own.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
            self._rust = own
        self._lock = threading.Lock()  # only used by the fallback (_exact False)
        self._exact = False
        with_special = self.ids(list(PROBES), add_special_tokens=True)
        plain = self.ids(list(PROBES), add_special_tokens=False)
        full, text = with_special[0], plain[0]
        starts = [i for i in range(len(full) - len(text) + 1) if full[i : i + len(text)] == text]
        if text and starts:
            i = starts[0]
            self.prefix, self.suffix = full[:i], full[i + len(text) :]
            self._exact = all(w == self.prefix + p + self.suffix for w, p in zip(with_special, plain))
        if not self._exact:
            self.prefix = self.suffix = []

    @property
    def n_special(self) -> int:
        """Special tokens the single-sequence template adds (0 when not a fixed prefix/suffix)."""
        return len(self.prefix) + len(self.suffix)

    def ids(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text, not truncated."""
        if self._rust is not None:
            if not self._exact:  # the fallback sets truncation on the copy: wait for it
                with self._lock:
                    return [e.ids for e in self._rust.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
            return [e.ids for e in self._rust.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        # A Python ("slow") tokenizer keeps no truncation state between calls.
        return self.hf(list(texts), add_special_tokens=add_special_tokens, truncation=False, verbose=False,
                       return_attention_mask=False, return_token_type_ids=False)["input_ids"]

    def _cut(self, ids: list[int], n: int) -> list[int]:
        if len(ids) <= n:
            return ids
        return ids[len(ids) - n :] if self.hf.truncation_side == "left" else ids[:n]

    def encode(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """Ids with the special tokens, at most ``max_length`` of them: the tokenizer's
        ``truncation=True, max_length=max_length`` output for single texts."""
        if not self._exact:
            return self._encode_locked(texts, max_length)
        room = max_length - self.n_special
        if room < 0:
            raise ValueError(f"max_length {max_length} is below the {self.n_special} special tokens "
                             "the tokenizer adds")
        pre, suf = self.prefix, self.suffix
        return [pre + self._cut(x, room) + suf for x in self.ids(texts, add_special_tokens=False)]

    def encode_mcls(self, texts: Sequence[str], max_length: int, interval: int,
                    cls_id: int) -> tuple[list[list[int]], list[list[int]]]:
        """Ids for MCLS (multiple CLS) encoding, and where the inserted CLS tokens are.

        The text's own tokens are cut into chunks of ``interval`` tokens; the template's prefix
        (whose first token is the CLS) precedes the first chunk, and ``cls_id`` is inserted
        before each further chunk: ``[CLS] t1..tI [CLS] tI+1..t2I [CLS] ... [EOS]``. Inserted
        tokens count against ``max_length`` (they take positions), so the text is cut (on the
        tokenizer's ``truncation_side``) to the most tokens for which text + inserted CLS +
        special tokens fit. Returns ``(ids, inserted)``: per text, its ids and the ascending
        positions of the inserted CLS tokens (the template's own CLS at 0 is not listed).
        """
        if not self._exact:
            raise ValueError("MCLS needs a tokenizer whose special tokens are a fixed prefix and suffix")
        if interval < 1:
            raise ValueError(f"the MCLS interval must be at least 1, got {interval}")
        room = max_length - self.n_special
        if room < 0:
            raise ValueError(f"max_length {max_length} is below the {self.n_special} special tokens "
                             "the tokenizer adds")
        n_max = mcls_text_room(room, interval)
        pre, suf, p = self.prefix, self.suffix, len(self.prefix)
        ids, where = [], []
        for x in self.ids(texts, add_special_tokens=False):
            x = self._cut(x, n_max)
            row = list(pre)
            for k in range(0, len(x), interval):
                if k:
                    row.append(cls_id)
                row.extend(x[k : k + interval])
            row.extend(suf)
            ids.append(row)
            where.append([p - 1 + k * (interval + 1) for k in range(1, mcls_extra(len(x), interval) + 1)])
        return ids, where

    def encode_plain(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """Ids without special tokens, at most ``max_length``: the tokenizer's
        ``add_special_tokens=False, truncation=True, max_length=max_length`` output."""
        return [self._cut(x, max_length) for x in self.ids(texts, add_special_tokens=False)]

    def _encode_locked(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        if self._rust is None:  # stateless Python tokenizer
            return self.hf(list(texts), truncation=True, max_length=max_length,
                           return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        with self._lock:
            self._rust.enable_truncation(max_length, direction=self.hf.truncation_side)
            try:
                return [e.ids for e in self._rust.encode_batch(list(texts), add_special_tokens=True)]
            finally:
                self._rust.no_truncation()


def mcls_extra(n_text: int, interval: int) -> int:
    """CLS tokens MCLS inserts into a text of ``n_text`` tokens: one before every chunk of
    ``interval`` tokens but the first (which follows the template's CLS)."""
    return (n_text - 1) // interval if n_text > 0 else 0


def mcls_text_room(room: int, interval: int) -> int:
    """The most text tokens ``n`` with ``n + mcls_extra(n, interval) <= room``."""
    if room <= 0:
        return 0
    n = (room + 1) * interval // (interval + 1)  # n + ceil(n / interval) <= room + 1, about
    while n + 1 + mcls_extra(n + 1, interval) <= room:
        n += 1
    while n > 0 and n + mcls_extra(n, interval) > room:
        n -= 1
    return n
