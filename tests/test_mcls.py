"""MCLS (multiple CLS) dense vectors and token-budgeted batching of 8192-token passages.

The MCLS reference is written here from the BGE-M3 paper's description: insert a CLS token every
N text tokens, run the model on one unpadded text, average the last hidden states at every CLS
position, L2-normalise. The checkpoint has 8194 position embeddings, like bge-m3, so the
8192-token inputs are real.
"""

import json
import math
import random

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from hybridsearch import BGEM3Encoder
from hybridsearch.encode.encoder import (
    CPU_ATTENTION_BYTES,
    FALLBACK_BATCH_ATTENTION,
    FALLBACK_BATCH_TOKENS,
    default_batch_budgets,
    plan_batches,
)
from hybridsearch.encode.tokenize import mcls_extra, mcls_text_room
from hybridsearch.errors import IndexFormatError, ModelMismatchError
from hybridsearch.index.hybrid import HybridIndex
from hybridsearch.testing import DEFAULT_CORPUS, make_tiny_m3

N = 256  # the paper's interval
LIMIT = 8192


@pytest.fixture(scope="module")
def tiny_8k(tmp_path_factory):
    """Random XLM-RoBERTa with 8194 position embeddings (8192 tokens) and both M3 heads."""
    return make_tiny_m3(tmp_path_factory.mktemp("tiny_8k"), seed=3, colbert_dim=24, max_positions=LIMIT)


@pytest.fixture(scope="module")
def plain_8k(tiny_8k):
    return BGEM3Encoder(tiny_8k, device="cpu")


@pytest.fixture(scope="module")
def words(tiny_8k):
    """Corpus words with their token counts (texts of them have additive token counts)."""
    tok = AutoTokenizer.from_pretrained(tiny_8k)
    ws = sorted({w for s in DEFAULT_CORPUS for w in s.split()})
    return [(w, len(tok(w, add_special_tokens=False)["input_ids"])) for w in ws]


def text_of(words, n, seed):
    """A text of exactly ``n`` tokens of mixed corpus words."""
    rng = random.Random(seed)
    ones = [w for w, c in words if c == 1]
    out, have = [], 0
    while have < n:
        w, c = rng.choice(words)
        if have + c > n:
            w, c = rng.choice(ones), 1
        out.append(w)
        have += c
    return " ".join(out)


def mcls_reference(path, texts, interval, max_length):
    """One text at a time, unpadded: ids built by hand, the model's forward, the formulas."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    s = torch.load(path / "sparse_linear.pt")
    c = torch.load(path / "colbert_linear.pt")
    special = {tok.cls_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    out = []
    for t in texts:
        x = tok(t, add_special_tokens=False)["input_ids"]
        n = len(x)
        # [CLS] before every chunk of `interval` tokens (at least the first one), [EOS] last
        while n + max(1, math.ceil(n / interval)) + 1 > max_length:
            n -= 1
        ids, cls_at = [], []
        for k in range(max(1, math.ceil(n / interval))):
            cls_at.append(len(ids))
            ids.append(tok.cls_token_id)
            ids.extend(x[k * interval:(k + 1) * interval][: max(0, n - k * interval)])
        ids.append(tok.eos_token_id)
        assert len(ids) <= max_length and cls_at[0] == 0
        with torch.no_grad():
            h = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        d = h[cls_at].mean(0)
        own = [i for i in range(len(ids)) if i == 0 or i not in cls_at]  # the text's tokens + template
        w = torch.relu(h @ s["weight"].T + s["bias"])[:, 0].numpy()
        lex = {}
        for p in own:
            if ids[p] not in special and w[p] > 0:
                lex[ids[p]] = max(lex.get(ids[p], 0.0), float(w[p]))
        v = h[own[1:]] @ c["weight"].T + c["bias"]
        out.append({"dense": (d / d.norm()).numpy(), "n_text": n, "n_cls": len(cls_at), "n_tokens": len(own),
                    "lexical": lex, "colbert": (v / v.norm(dim=-1, keepdim=True)).numpy()})
    return out


def check_against(enc, ref, atol=2e-5):
    assert enc.n_tokens.tolist() == [r["n_tokens"] for r in ref]
    for i, r in enumerate(ref):
        np.testing.assert_allclose(enc.dense[i], r["dense"], atol=atol, rtol=0, err_msg=f"dense {i}")
        row = enc.sparse[i]
        assert dict(zip(row.indices.tolist(), row.data.tolist())) == pytest.approx(r["lexical"], abs=atol)
        np.testing.assert_allclose(enc.colbert_of(i), r["colbert"], atol=atol, rtol=0, err_msg=f"colbert {i}")


# ---------------------------------------------------------------------------- MCLS


def test_text_room_formula():
    for interval in (1, 2, 3, 7, 256):
        for room in range(0, 600):
            n = mcls_text_room(room, interval)
            assert n + mcls_extra(n, interval) <= room
            assert n + 1 + mcls_extra(n + 1, interval) > room
    assert mcls_text_room(LIMIT - 2, N) == 8159  # 8159 text + 31 inserted + 2 specials = 8192


def test_mcls_matches_per_text_reference_in_one_padded_batch(tiny_8k, words, monkeypatch):
    enc = BGEM3Encoder(tiny_8k, device="cpu", mcls=True, mcls_interval=N,
                       max_batch_tokens=10 * LIMIT, max_batch_attention=10 * LIMIT**2)
    assert enc.spec.mcls == N and enc.spec.passage_max_length == LIMIT
    # 0 and 3 tokens; at, just past and past 3 x the interval; long; exactly filling the 8192
    # positions (8159 + 31 CLS + 2); one past that (cut by one, as one more CLS would not fit).
    lengths = [0, 3, N, N + 1, 3 * N + 40, 3000, 8159, 8160]
    texts = [text_of(words, n, seed=n) for n in lengths]
    batches = []
    real = enc._forward_batch
    monkeypatch.setattr(enc, "_forward_batch", lambda ids, width, *a: batches.append(
        (width, [len(r) for r in ids])) or real(ids, width, *a))
    got = enc.encode_arrays(texts, colbert=True)
    assert batches == [(LIMIT, sorted((min(n, 8159) + max(1, math.ceil(min(n, 8159) / N)) + 1
                                       for n in lengths), reverse=True))]  # one batch, padded
    ref = mcls_reference(tiny_8k, texts, N, LIMIT)
    assert [r["n_text"] for r in ref] == [min(n, 8159) for n in lengths]
    assert [r["n_cls"] for r in ref] == [1, 1, 1, 2, 4, 12, 32, 32]
    check_against(got, ref)
    # with a shorter max length, the inserted tokens still count against it
    got = enc.encode_arrays(texts[2:6], max_length=300, colbert=True)
    ref = mcls_reference(tiny_8k, texts[2:6], N, 300)
    assert [r["n_text"] for r in ref] == [N, N + 1, 297, 297]
    check_against(got, ref)


def test_mcls_batches_of_default_size_match_reference(tiny_8k, words):
    """The default CPU budgets split the same texts into several batches; same results."""
    enc = BGEM3Encoder(tiny_8k, device="cpu", mcls=True, mcls_interval=64)
    texts = [text_of(words, n, seed=n) for n in (5, 64, 65, 700, 1500, 8100)]
    ref = mcls_reference(tiny_8k, texts, 64, LIMIT)
    check_against(enc.encode_arrays(texts, batch_size=2, colbert=True), ref)
    # the FlagEmbedding-style API returns the same vectors
    out = enc.encode(texts, return_colbert_vecs=True)
    np.testing.assert_allclose(out["dense_vecs"], [r["dense"] for r in ref], atol=2e-5, rtol=0)


def test_short_texts_are_unchanged_and_long_ones_change(tiny_8k, words, plain_8k):
    enc = BGEM3Encoder(tiny_8k, device="cpu", mcls=True, mcls_interval=N)
    short = [text_of(words, n, seed=n) for n in (0, 1, 17, N)] + ["the quick brown fox"]
    a = enc.encode_arrays(short, kind="query", colbert=True)
    b = plain_8k.encode_arrays(short, kind="query", colbert=True)
    np.testing.assert_array_equal(a.n_tokens, b.n_tokens)
    np.testing.assert_allclose(a.dense, b.dense, atol=1e-6, rtol=0)
    np.testing.assert_allclose(a.sparse.toarray(), b.sparse.toarray(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(a.colbert, b.colbert, atol=1e-6, rtol=0)
    long = [text_of(words, 1000, seed=1)]
    a = enc.encode_arrays(long, colbert=True)
    b = plain_8k.encode_arrays(long, colbert=True)
    # same tokens in the sparse and ColBERT outputs (the inserted CLS are left out) ...
    np.testing.assert_array_equal(a.n_tokens, b.n_tokens)
    np.testing.assert_array_equal(a.colbert_offsets, b.colbert_offsets)
    own = set(enc.tokenizer(long[0])["input_ids"]) - {enc.tokenizer.cls_token_id, enc.tokenizer.eos_token_id}
    assert set(a.sparse.indices.tolist()) <= own
    # ... and a different dense vector
    assert float(a.dense[0] @ b.dense[0]) < 1 - 1e-4


def test_mcls_refused_for_mean_pooling_and_bad_arguments(tiny_dense, tiny_m3):
    with pytest.raises(ValueError, match="CLS-pooling model"):
        BGEM3Encoder(tiny_dense, device="cpu", mcls=True)
    with pytest.raises(ValueError, match="mcls_interval"):
        BGEM3Encoder(tiny_m3, device="cpu", mcls=True, mcls_interval=0)
    with pytest.raises(TypeError, match="mcls must be True or False"):
        BGEM3Encoder(tiny_m3, device="cpu", mcls=256)
    assert BGEM3Encoder(tiny_m3, device="cpu").spec.mcls is None


# ---------------------------------------------------------------------------- index manifest


def test_index_records_mcls_and_reopens_with_it(tiny_m3, m3_encoder, tmp_path):
    enc = BGEM3Encoder(tiny_m3, device="cpu", mcls=True, mcls_interval=16)
    long = " ".join(DEFAULT_CORPUS[:6])  # > 16 tokens: CLS tokens are inserted
    assert len(enc.tokenizer(long)["input_ids"]) > 40
    docs = [{"id": f"d{i}", "text": t} for i, t in enumerate([long] + DEFAULT_CORPUS[6:])]
    idx = HybridIndex.create(tmp_path / "idx", enc)
    idx.add(docs)
    idx.close()
    m = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert m["model"]["mcls"] == 16
    with pytest.raises(ModelMismatchError, match="mcls=16"):
        HybridIndex.open(tmp_path / "idx", m3_encoder)  # an encoder without MCLS disagrees
    with pytest.raises(ModelMismatchError, match="mcls=16"):
        HybridIndex.open(tmp_path / "idx", BGEM3Encoder(tiny_m3, device="cpu", mcls=True, mcls_interval=32))
    for reopened in (HybridIndex.open(tmp_path / "idx", str(tiny_m3)), HybridIndex.open(tmp_path / "idx", enc)):
        assert reopened.encoder.spec.mcls == 16
        # the query is encoded as the passage was: the long document is its own best match
        hit = reopened.search(long, k=1, mode="dense")[0]
        assert hit.id == "d0" and hit.score == pytest.approx(1.0, abs=1e-5)
        reopened.close()
    # without MCLS, the same query text gets a different vector than the stored one
    assert float(m3_encoder.encode_arrays([long], kind="query").dense[0]
                 @ enc.encode_arrays([long], kind="passage").dense[0]) < 1 - 1e-4


def test_manifest_without_mcls_is_off_and_bad_values_refused(m3_encoder, tmp_path):
    idx = HybridIndex.create(tmp_path / "idx", m3_encoder)
    idx.add([{"id": "a", "text": "the quick brown fox"}])
    idx.close()
    path = tmp_path / "idx" / "manifest.json"
    m = json.loads(path.read_text())
    assert m["model"]["mcls"] is None
    del m["model"]["mcls"]  # an index written before MCLS existed
    path.write_text(json.dumps(m))
    HybridIndex.open(tmp_path / "idx", m3_encoder).close()
    idx = HybridIndex.open(tmp_path / "idx")
    assert idx.encoder.spec.mcls is None
    idx.close()
    for bad in ("256", -1, 0, True, 1.5, [256]):
        m["model"]["mcls"] = bad
        path.write_text(json.dumps(m))
        with pytest.raises(IndexFormatError, match="model.mcls"):
            HybridIndex.open(tmp_path / "idx", m3_encoder)


# ---------------------------------------------------------------------------- batching


def assert_within(batches, lengths, batch_size, max_tokens, max_attention):
    lengths = np.asarray(lengths)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))  # every text once
    assert np.all(np.diff(lengths[flat]) <= 0)  # longest first
    for b in batches:
        width = int(lengths[b].max())
        assert width == lengths[b[0]]
        if len(b) > 1:  # a single text over a cap is still encoded alone
            assert len(b) <= batch_size and len(b) * width <= max_tokens and len(b) * width**2 <= max_attention


def test_plan_batches_respect_every_budget():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([np.full(5, 8192), rng.integers(2, 8192, 200), rng.integers(2, 64, 300),
                              [4096, 4096, 4097, 2048, 1, 8191]])
    rng.shuffle(lengths)
    for bs, tok, att in ((64, 32768, 8192**2), (64, 32768, 2 * 8192**2), (8, 10**9, 10**12), (64, 10**6, 5 * 10**7),
                         (3, 100, 10**4), (1000, 65536, 3 * 4096**2)):
        batches = plan_batches(lengths, bs, tok, att)
        assert_within(batches, lengths, bs, tok, att)
        # and as large as the caps allow: one more text would break one
        for b in batches[:-1]:
            w = int(lengths[b[0]])
            assert len(b) + 1 > bs or (len(b) + 1) * w > tok or (len(b) + 1) * w * w > att
    # 8192-token texts: one per batch under one 8192^2 budget, two under two
    for att, per in ((8192**2, 1), (2 * 8192**2 + 5, 2)):
        first = plan_batches(lengths, 64, 10**9, att)[: 5 // per]
        assert [len(b) for b in first] == [per] * (5 // per)


def test_default_budgets(monkeypatch):
    from types import SimpleNamespace

    m3 = SimpleNamespace(hidden_size=1024, intermediate_size=4096, num_attention_heads=16)
    tok, att = default_batch_budgets(torch.device("cpu"), m3, torch.float32)
    assert tok == FALLBACK_BATCH_TOKENS and att == CPU_ATTENTION_BYTES // (4 * 49)
    assert [len(b) for b in plan_batches([8192] * 4 + [4096] * 4 + [2048] * 10, 64, tok, att)][:9] \
        == [1] * 8 + [5]  # 8192- and 4096-token passages one by one on CPU, 2048 five by five
    # CUDA: from the free memory: planned cost within half of it
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * gib, 141 * gib))
    tok, att = default_batch_budgets(torch.device("cuda"), m3, torch.float16)
    assert tok * 2 * (8 * 1024 + 2 * 4096) + att * 2 * (3 * 16 + 1) <= 40 * gib
    per_8k = [len(b) for b in plan_batches([8192] * 20, 64, tok, att)]
    assert 2 <= per_8k[0] <= 8  # a few 8192-token passages per batch on an 80 GiB-free GPU

    def broken(device=None):
        raise RuntimeError("no query")

    monkeypatch.setattr(torch.cuda, "mem_get_info", broken)
    assert default_batch_budgets(torch.device("cuda"), m3, torch.float16) == (
        FALLBACK_BATCH_TOKENS, FALLBACK_BATCH_ATTENTION)
    assert default_batch_budgets(torch.device("mps"), m3, torch.float16) == (
        FALLBACK_BATCH_TOKENS, FALLBACK_BATCH_ATTENTION)


def test_mixed_batch_with_8192_token_passages(plain_8k, words, monkeypatch):
    """3 x 8192 tokens + short texts, at the encoder's default CPU budgets: the batches formed are
    the plan's, within the budgets (an 8192-token passage alone), and every text's vectors
    equal those of encoding it alone."""
    enc = plain_8k
    assert enc.max_batch_tokens == FALLBACK_BATCH_TOKENS and enc.max_batch_attention < 2 * LIMIT**2
    texts = [text_of(words, 9000, seed=1), "the quick brown fox", text_of(words, 8190, seed=2),
             text_of(words, 300, seed=3), "", text_of(words, 12000, seed=4), text_of(words, 2000, seed=5),
             "dense", text_of(words, 40, seed=6)]
    seen = []
    real = enc._forward_batch
    monkeypatch.setattr(enc, "_forward_batch", lambda ids, width, *a: seen.append(
        (width, [len(r) for r in ids])) or real(ids, width, *a))
    got = enc.encode_arrays(texts, colbert=True)
    monkeypatch.undo()
    assert got.n_tokens.tolist().count(LIMIT) == 3
    plan = plan_batches(got.n_tokens, enc.batch_size, enc.max_batch_tokens, enc.max_batch_attention)
    assert seen == [(int(got.n_tokens[b[0]]), got.n_tokens[b].tolist()) for b in plan]
    assert_within(plan, got.n_tokens, enc.batch_size, enc.max_batch_tokens, enc.max_batch_attention)
    assert [w for w, _ in seen][:3] == [LIMIT] * 3 and all(len(r) == 1 for _, r in seen[:3])
    assert any(len(r) > 1 and min(r) < w for w, r in seen)  # short texts share a padded batch
    for i, t in enumerate(texts):
        one = enc.encode_arrays([t], colbert=True)
        assert one.n_tokens[0] == got.n_tokens[i]
        np.testing.assert_allclose(got.dense[i], one.dense[0], atol=2e-5, rtol=0)
        np.testing.assert_allclose(got.sparse[i].toarray(), one.sparse.toarray(), atol=2e-5, rtol=0)
        np.testing.assert_allclose(got.colbert_of(i), one.colbert_of(0), atol=2e-5, rtol=0)
