"""Training: losses against hand-computed values, data validation, mining, the embedder /
reranker / RetroMAE loops on tiny random models, checkpoints and resume."""

import json
import math

import numpy as np
import pytest
import torch

from hybridsearch.testing import DEFAULT_CORPUS, make_tiny_m3, make_tiny_reranker
from hybridsearch.train import losses as L
from hybridsearch.train.data import (
    GroupCollator,
    TrainingDataError,
    batch_order,
    from_beir,
    from_pairs,
    load_records,
    read_jsonl,
)


def _records(n_neg=5):
    out = []
    for i, t in enumerate(DEFAULT_CORPUS):
        w = t.split()
        negs = [x for x in DEFAULT_CORPUS if x != t]
        out.append({"query": f"{w[0]} {w[-1]}", "pos": [t], "neg": negs[i % 3 : i % 3 + n_neg]})
    return out


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _ce(row, t, tau):
    return -math.log(_softmax([x / tau for x in row])[t])


# ============================================================================ losses


def test_info_nce_in_batch_and_group_by_hand():
    s = torch.tensor([[2.0, 1.0, 0.0, 0.5], [0.0, 1.0, 3.0, -1.0]])  # B=2, G=2
    target = L.in_batch_target(2, 2)
    assert target.tolist() == [0, 2]
    tau = 0.5
    want = (_ce([2.0, 1.0, 0.0, 0.5], 0, tau) + _ce([0.0, 1.0, 3.0, -1.0], 2, tau)) / 2
    assert float(L.info_nce(s, target, tau)) == pytest.approx(want, rel=1e-6)
    g = L.group_scores(s, 2)
    assert g.tolist() == [[2.0, 1.0], [3.0, -1.0]]
    want_g = (_ce([2.0, 1.0], 0, tau) + _ce([3.0, -1.0], 0, tau)) / 2
    assert float(L.info_nce_group(g, tau)) == pytest.approx(want_g, rel=1e-6)
    # default temperature is 0.02
    assert float(L.info_nce(s, target)) == pytest.approx(
        (_ce([2.0, 1.0, 0.0, 0.5], 0, 0.02) + _ce([0.0, 1.0, 3.0, -1.0], 2, 0.02)) / 2, rel=1e-5)


def _unified_by_hand(d, s, c, t, tau, sd):
    ens = [[a + 0.3 * b + x for a, b, x in zip(r1, r2, r3)] for r1, r2, r3 in zip(d, s, c)]

    def ce(m):
        return sum(_ce(r, ti, tau) for r, ti in zip(m, t)) / len(m)

    loss = (ce(d) + ce(ens) + 0.1 * ce(s) + ce(c)) / 4
    if not sd:
        return loss

    def kd(m):
        tot = 0.0
        for r, er in zip(m, ens):
            p = _softmax([x / tau for x in er])
            q = _softmax([x / tau for x in r])
            tot += -sum(pi * math.log(qi) for pi, qi in zip(p, q))
        return tot / len(m)

    return (loss + (kd(d) + 0.1 * kd(s) + kd(c)) / 3) / 2


@pytest.mark.parametrize("self_distill", [False, True])
def test_m3_unified_loss_by_hand(self_distill):
    d = [[0.9, 0.2, 0.1, 0.4], [0.3, 0.1, 0.8, 0.5]]
    s = [[0.5, 0.0, 0.2, 0.1], [0.0, 0.4, 0.6, 0.3]]
    c = [[0.7, 0.6, 0.2, 0.3], [0.2, 0.5, 0.9, 0.1]]
    t = [0, 2]
    tau = 0.2
    got, parts = L.m3_unified_loss(torch.tensor(d), torch.tensor(s), torch.tensor(c),
                                   torch.tensor(t), tau, self_distill)
    assert float(got) == pytest.approx(_unified_by_hand(d, s, c, t, tau, self_distill), rel=1e-5)
    assert ("self_distill" in parts) == self_distill


def test_kd_and_distill_by_hand():
    teacher = torch.tensor([[0.5, 0.5]])
    assert float(L.kd_loss(torch.zeros(1, 2), teacher, 1.0)) == pytest.approx(math.log(2), rel=1e-6)
    student = torch.tensor([[1.0, 0.0, -1.0]])
    tscores = torch.tensor([[2.0, 0.0, 0.0]])
    p = _softmax([2.0, 0.0, 0.0])
    q = _softmax([1.0 / 0.5, 0.0, -1.0 / 0.5])
    want = -sum(a * math.log(b) for a, b in zip(p, q))
    assert float(L.distill_loss(student, tscores, temperature=0.5)) == pytest.approx(want, rel=1e-6)


def test_reranker_group_ce_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    want = (-math.log(math.exp(2) / (math.exp(2) + 2)) + math.log(3)) / 2
    assert float(L.reranker_group_ce(logits)) == pytest.approx(want, rel=1e-6)


def test_sparse_and_colbert_score_functions_by_hand():
    ids = torch.tensor([[0, 5, 5, 7, 2, 1], [0, 7, 6, 2, 1, 1]])
    w = torch.tensor([[0.9, 0.2, 0.7, 0.4, 0.8, 0.5], [0.3, 0.6, 0.1, 0.2, 0.9, 0.9]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    v = L.sparse_vectors(w, ids, 8, unused_ids=[0, 1, 2, 3], mask=mask)
    want = torch.zeros(2, 8)
    want[0, 5], want[0, 7] = 0.7, 0.4  # max over the repeated id 5; CLS/EOS/PAD dropped
    want[1, 7], want[1, 6] = 0.6, 0.1
    assert torch.allclose(v, want)
    assert torch.allclose(L.sparse_scores(v[:1], v), torch.tensor([[0.7**2 + 0.16, 0.4 * 0.6]]))

    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])  # 3rd query token is padding
    qm = torch.tensor([[1, 1, 0]])
    p = torch.tensor([[[0.6, 0.8], [1.0, 0.0], [9.0, 9.0]]])  # 3rd passage token is padding
    pm = torch.tensor([[1, 1, 0]])
    # token 1: max(0.6, 1.0) = 1.0 ; token 2: max(0.8, 0.0) = 0.8 ; mean over 2 query tokens
    assert float(L.colbert_scores(q, p, qm, pm)) == pytest.approx(0.9)


def test_self_distillation_shrinks_teacher_student_gap():
    """Training with the self-distillation term pulls each channel toward the ensemble."""
    g = torch.Generator().manual_seed(0)
    tau = 0.1
    init = [torch.randn(4, 8, generator=g) * 0.3 for _ in range(3)]
    target = L.in_batch_target(4, 2)

    def gap(d, s, c):
        ens = (d + 0.3 * s + c).detach()
        p = torch.softmax(ens / tau, -1)
        return float((p * (torch.log(p) - torch.log_softmax(d.detach() / tau, -1))).sum(-1).mean())

    d, s, c = (x.clone().requires_grad_(True) for x in init)
    before = gap(d, s, c)
    opt = torch.optim.SGD([d], lr=0.02)  # student: the dense scores; teacher: the ensemble
    for _ in range(30):
        teacher = torch.softmax((d + 0.3 * s + c).detach() / tau, -1)
        loss = L.kd_loss(d, teacher, tau)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert gap(d, s, c) < before * 0.5
    # and inside the unified loss the KD term does it too: with self-distillation the dense
    # channel ends closer to the ensemble than without it
    res = {}
    for sd in (False, True):
        d, s, c = (x.clone().requires_grad_(True) for x in init)
        opt = torch.optim.SGD([d, s, c], lr=0.01)
        for _ in range(20):
            loss, _ = L.m3_unified_loss(d, s, c, target, tau, sd)
            opt.zero_grad()
            loss.backward()
            opt.step()
        res[sd] = gap(d, s, c)
    assert res[True] < res[False]


def test_mask_tokens_ratio_and_labels():
    ids = torch.tensor([[0, 10, 11, 12, 13, 14, 15, 16, 17, 2, 1, 1]])
    am = (ids != 1).long()
    masked, labels = L.mask_tokens(ids, am, 0.5, 4, special_ids=[0, 1, 2, 4], generator=torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert int(chosen.sum()) == 4  # half of the 8 ordinary tokens
    assert (masked[chosen] == 4).all() and (labels[chosen] == ids[chosen]).all()
    assert not chosen[0, [0, 9, 10, 11]].any()  # specials and padding never masked


# ============================================================================ data


def test_malformed_data_names_file_and_line(tmp_path):
    good = json.dumps({"query": "q", "pos": ["p"], "neg": ["n"]})
    cases = {
        "{not json": "not valid JSON",
        json.dumps({"pos": ["p"]}): "'query' must be a string",
        json.dumps({"query": "  ", "pos": ["p"]}): "'query' is empty",
        json.dumps({"query": "q"}): "'pos' is missing",
        json.dumps({"query": "q", "pos": []}): "'pos' is empty",
        json.dumps({"query": "q", "pos": "p"}): "'pos' must be a list of strings",
        json.dumps({"query": "q", "pos": ["p"], "neg": [1]}): "'neg' must be a list of strings",
        json.dumps({"query": 3, "pos": ["p"]}): "'query' must be a string",
        json.dumps({"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1.0],
                    "neg_scores": [1.0, 2.0]}): "'neg_scores' has 2 value(s) but 'neg' has 1",
        json.dumps({"query": "q", "pos": ["p"], "pos_scores": ["x"]}): "'pos_scores' must be a list of numbers",
        "[1, 2]": "expected a JSON object",
    }
    for bad, msg in cases.items():
        f = tmp_path / "train.jsonl"
        f.write_text(good + "\n\n" + bad + "\n")
        with pytest.raises(TrainingDataError) as e:
            read_jsonl(f)
        assert f"{f}:3:" in str(e.value) and msg in str(e.value), (bad, str(e.value))
    f.write_text(good + "\n")
    assert read_jsonl(f) == [{"query": "q", "pos": ["p"], "neg": ["n"]}]
    with pytest.raises(TrainingDataError, match="record 1"):
        load_records([{"query": "q", "pos": ["p"]}, {"query": "q", "pos": []}])


def test_from_beir_and_from_pairs(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text(
        "\n".join(json.dumps(d) for d in [{"_id": "d1", "title": "T1", "text": "one"},
                                          {"_id": "d2", "title": "", "text": "two"},
                                          {"_id": "d3", "title": "T3", "text": "three"}]) + "\n")
    (tmp_path / "queries.jsonl").write_text(
        json.dumps({"_id": "q1", "text": "first?"}) + "\n" + json.dumps({"_id": "q2", "text": "second?"}) + "\n")
    (tmp_path / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t1\nq2\td3\t0\n")
    recs = from_beir(tmp_path, "train")
    assert len(recs) == 1  # q2 has no relevant document
    assert recs[0]["query"] == "first?" and recs[0]["pos"] == ["T1 one", "two"]
    assert recs[0]["pos_ids"] == ["d1", "d2"] and recs[0]["neg"] == []
    recs = from_pairs([("a", "p1"), ("b", "p2", ["n1"]), ("a", "p3")])
    assert recs == [{"query": "a", "pos": ["p1", "p3"], "neg": []}, {"query": "b", "pos": ["p2"], "neg": ["n1"]}]
    with pytest.raises(TrainingDataError):
        from_pairs([("a",)])


def test_collator_groups_pad_and_align_teacher_scores():
    recs = [{"query": "q1", "pos": ["p"], "neg": ["n1", "n2"], "pos_scores": [9.0], "neg_scores": [1.0, 2.0]},
            {"query": "q2", "pos": ["P"], "neg": ["m1", "m2", "m3", "m4", "m5"], "pos_scores": [5.0],
             "neg_scores": [0.1, 0.2, 0.3, 0.4, 0.5]}]
    col = GroupCollator(group_size=4, seed=3)
    b = col(recs, step=0)
    assert b["queries"] == ["q1", "q2"] and len(b["passages"]) == 8
    assert b["passages"][0] == "p" and b["passages"][4] == "P"
    assert set(b["passages"][1:4]) == {"n1", "n2"}  # padded by resampling
    assert len(set(b["passages"][5:8])) == 3  # enough negatives: no repeats
    score = {"n1": 1.0, "n2": 2.0, "m1": 0.1, "m2": 0.2, "m3": 0.3, "m4": 0.4, "m5": 0.5, "p": 9.0, "P": 5.0}
    assert b["teacher"].tolist() == [[score[t] for t in b["passages"][:4]],
                                     [pytest.approx(score[t]) for t in b["passages"][4:]]]
    assert col(recs, step=0)["passages"] == b["passages"]  # deterministic in (seed, step)
    with pytest.raises(TrainingDataError, match="no negatives"):
        col([{"query": "q", "pos": ["p"], "neg": []}])
    assert GroupCollator(1)([{"query": "q", "pos": ["p"], "neg": []}])["passages"] == ["p"]
    order = batch_order(_records(), 3, seed=0, epoch=0)
    assert sorted(i for b in order for i in b) == list(range(len(DEFAULT_CORPUS)))
    assert order == batch_order(_records(), 3, seed=0, epoch=0)


# ============================================================================ mining


def test_mining_never_returns_a_positive(tmp_path, m3_encoder):
    from hybridsearch import HybridIndex
    from hybridsearch.train.mining import mine_hard_negatives

    docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(DEFAULT_CORPUS)]
    docs.append({"id": "dup", "text": DEFAULT_CORPUS[0]})  # same text as d0 under another id
    index = HybridIndex.create(tmp_path / "idx", m3_encoder)
    index.add(docs)
    recs = [{"query": "quick fox dog", "pos": [DEFAULT_CORPUS[0]], "neg": [], "pos_ids": ["d0"]},
            {"query": "sparse retrieval tokens", "pos": [DEFAULT_CORPUS[2]], "neg": []},  # text only
            {"query": "hybrid search", "pos": ["not in the corpus"], "neg": [], "pos_ids": ["d5"]}]  # id only
    for mode in ("hybrid", "dense", "bm25"):
        out = mine_hard_negatives(index, recs, mode=mode, range_=(0, 20), n_neg=50, seed=1)
        for r, o in zip(recs, out):
            assert o["neg"] or mode == "bm25", mode  # BM25 finds nothing else for some queries
            assert not set(o["neg"]) & set(r["pos"])
            assert not set(o["neg_ids"]) & set(r.get("pos_ids", []))
            assert len(set(o["neg"])) == len(o["neg"])
        assert "dup" not in out[0]["neg_ids"] and "d5" not in out[2]["neg_ids"]
    few = mine_hard_negatives(index, recs, range_=(2, 20), n_neg=3, seed=0)
    assert all(len(o["neg"]) == 3 for o in few)
    assert few == mine_hard_negatives(index, recs, range_=(2, 20), n_neg=3, seed=0)
    ranked = [h.text for h in index.search(recs[1]["query"], k=20)]
    assert all(ranked.index(t) >= 2 for t in few[1]["neg"])  # from the rank window only

    class FakeReranker:
        def compute_score(self, pairs, batch_size=None):
            return [float(len(p)) for _, p in pairs]

    scored = mine_hard_negatives(index, recs[:1], range_=(0, 5), n_neg=2, reranker=FakeReranker())
    assert scored[0]["pos_scores"] == [float(len(recs[0]["pos"][0]))]
    assert scored[0]["neg_scores"] == [float(len(t)) for t in scored[0]["neg"]]
    load_records(scored)  # still valid training data
    index.close()


# ============================================================================ embedder


@pytest.fixture()
def tiny_plain(tmp_path):
    """A tiny encoder without M3 heads and with mean pooling declared, like all-MiniLM-L6-v2."""
    path = make_tiny_m3(tmp_path / "plain", seed=1, heads=False)
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    return path


def _trainer(model_path, **kw):
    from hybridsearch.train.embedder import EmbedderTrainer, M3Model

    torch.manual_seed(0)
    model = M3Model.from_pretrained(model_path, colbert_dim=kw.pop("colbert_dim", None))
    kw.setdefault("device", "cpu")
    return EmbedderTrainer(model, **kw)


def test_added_heads_and_pooling(tiny_plain, tiny_m3):
    from hybridsearch.train.embedder import M3Model

    m = M3Model.from_pretrained(tiny_plain, colbert_dim=16)
    assert m.pooling == "mean" and m.colbert_linear.out_features == 16
    assert m.sparse_linear.out_features == 1
    m = M3Model.from_pretrained(tiny_m3)
    assert m.pooling == "cls" and m.colbert_linear.out_features == 24  # existing heads kept


def test_optimizer_steps_lower_the_loss(tiny_m3):
    tr = _trainer(tiny_m3, group_size=3, batch_size=4, lr=5e-4, warmup_ratio=0.0, query_max_len=16,
                  passage_max_len=32)
    batch = tr.collator(_records()[:4], step=0)
    tr.setup_optimizer(1000)

    def loss_now():
        tr.model.eval()
        with torch.no_grad():
            from hybridsearch.train.embedder import batch_loss

            q = tr._encode(tr.model.tokenize(batch["queries"], 16))
            p = tr._encode(tr.model.tokenize(batch["passages"], 32))
            return float(batch_loss(q, p, 3, unified=True, self_distill=True, temperature=0.02)[0])

    before = loss_now()
    tr.model.train()
    for _ in range(8):
        tr.compute_gradients(batch["queries"], batch["passages"])
        tr.optimizer_step()
        assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4, rel=0.01)
    assert loss_now() < before * 0.93


@pytest.mark.parametrize("unified,in_batch", [(True, True), (True, False), (False, True)])
def test_grad_cache_equals_full_batch(tiny_m3, unified, in_batch):
    batch = GroupCollator(3, seed=0)(_records()[:5], step=0)
    teacher = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    grads, losses = [], []
    for sub in (None, 2):
        tr = _trainer(tiny_m3, group_size=3, sub_batch_size=sub, unified=unified, in_batch_negatives=in_batch,
                      query_max_len=16, passage_max_len=32)
        tr.model.eval()  # no dropout: both ways see the same network
        loss, _ = tr.compute_gradients(batch["queries"], batch["passages"], teacher)
        losses.append(loss)
        grads.append({n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4), n


def test_grad_cache_replays_dropout(tiny_m3):
    """In train mode the chunk re-encoding sees the dropout masks of the cached pass."""
    batch = GroupCollator(2, seed=0)(_records()[:4], step=0)
    tr = _trainer(tiny_m3, group_size=2, sub_batch_size=3, query_max_len=16, passage_max_len=32)
    tr.model.train()
    seen = []
    orig = tr._encode

    def spy(tok, rows=None):
        out = orig(tok, rows)
        seen.append(out["dense"].detach().clone())
        return out

    tr._encode = spy
    tr.compute_gradients(batch["queries"], batch["passages"])
    n = len(seen) // 2
    for a, b in zip(seen[:n], seen[n:]):
        assert torch.allclose(a, b, atol=1e-6)


def test_checkpoint_reloads_in_encoder_with_identical_outputs(tiny_plain, tmp_path):
    from hybridsearch import BGEM3Encoder

    tr = _trainer(tiny_plain, colbert_dim=16, group_size=2, batch_size=4, lr=1e-3,
                  query_max_len=16, passage_max_len=32)
    tr.train(_records(), tmp_path / "out", max_steps=3, show_progress=False)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors", "colbert_linear.pt", "sparse_linear.pt",
            "tokenizer.json", "1_Pooling", "trainer_state.pt"} <= names
    enc = BGEM3Encoder(tmp_path / "out", device="cpu")
    assert enc.outputs == ("dense", "sparse", "colbert") and enc.spec.pooling == "mean"
    assert enc.spec.colbert_dim == 16
    texts = DEFAULT_CORPUS[:6]
    got = enc.encode_arrays(texts, kind="raw", sparse=True, colbert=True, max_length=64)
    m = tr.model.eval()
    tok = m.tokenize(texts, 64)
    with torch.no_grad():
        ref = m(tok["input_ids"], tok["attention_mask"])
    assert np.allclose(got.dense, ref["dense"].numpy(), atol=1e-5)
    assert np.allclose(got.sparse.toarray(), ref["sparse"].numpy()[:, : got.sparse.shape[1]], atol=1e-5)
    assert (got.sparse.toarray() > 0).any()
    for i in range(len(texts)):
        n = int(tok["attention_mask"][i].sum()) - 1
        assert np.allclose(got.colbert[got.colbert_offsets[i] : got.colbert_offsets[i + 1]],
                           ref["colbert"][i, :n].numpy(), atol=1e-5)


def test_fix_encoder_trains_only_the_heads(tiny_m3, tmp_path):
    from hybridsearch.train.embedder import M3Model

    before = M3Model.from_pretrained(tiny_m3)
    tr = _trainer(tiny_m3, fix_encoder=True, group_size=2, batch_size=4, lr=1e-2,
                  query_max_len=16, passage_max_len=32)
    tr.train(_records(), tmp_path / "fixed", max_steps=3, show_progress=False)
    after = M3Model.from_pretrained(tmp_path / "fixed")
    for (n, a), (_, b) in zip(before.encoder.state_dict().items(), after.encoder.state_dict().items()):
        assert torch.equal(a, b), n
    assert not torch.equal(before.colbert_linear.weight, after.colbert_linear.weight)
    assert not torch.equal(before.sparse_linear.weight, after.sparse_linear.weight)


def test_resume_continues_from_the_saved_step(tiny_plain, tmp_path):
    from hybridsearch.train.embedder import M3Model, train_embedder

    kw = {"group_size": 2, "batch_size": 3, "lr": 1e-3, "query_max_len": 16, "passage_max_len": 32,
              "colbert_dim": 16, "show_progress": False, "device": "cpu", "self_distill_start_step": 1}
    full = train_embedder(tiny_plain, _records(), tmp_path / "a", max_steps=5, save_steps=2, **kw)
    assert (tmp_path / "a" / "checkpoint-2").is_dir() and (tmp_path / "a" / "checkpoint-4").is_dir()
    state = torch.load(tmp_path / "a" / "checkpoint-2" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2
    resumed = train_embedder(tiny_plain, _records(), tmp_path / "b", max_steps=5,
                             resume_from=tmp_path / "a" / "checkpoint-2", **kw)
    assert resumed.step == 5 and len(resumed.losses) == 3
    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-4)
    a, b = M3Model.from_pretrained(tmp_path / "a"), M3Model.from_pretrained(tmp_path / "b")
    assert b.pooling == "mean"
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-5), n
    with pytest.raises(FileNotFoundError, match="not a resumable checkpoint"):
        train_embedder(tiny_plain, _records(), tmp_path / "c", max_steps=1, resume_from=tiny_plain, **kw)


def test_teacher_scores_and_dense_only(tiny_m3, tmp_path):
    from hybridsearch.train.embedder import train_embedder

    recs = [dict(r, pos_scores=[5.0], neg_scores=[float(-i) for i in range(len(r["neg"]))]) for r in _records()]
    res = train_embedder(tiny_m3, recs, tmp_path / "t", max_steps=2, batch_size=4, group_size=3,
                         query_max_len=16, passage_max_len=32, show_progress=False, device="cpu")
    assert all("teacher_kd" in p for p in res.parts)
    res = train_embedder(tiny_m3, _records(), tmp_path / "d", unified=False, max_steps=2, batch_size=4,
                         group_size=3, query_max_len=16, passage_max_len=32, show_progress=False, device="cpu")
    assert set(res.parts[0]) == {"dense"}


# ============================================================================ reranker / RetroMAE


def test_reranker_training_lowers_group_ce_and_loads(tmp_path):
    from hybridsearch.rerank import Reranker
    from hybridsearch.train.reranker import load_cross_encoder, tokenize_pairs, train_reranker

    path = make_tiny_reranker(tmp_path / "rr")
    recs = _records()[:4]
    batch = GroupCollator(3, seed=0)(recs, step=0)

    def group_ce(folder):
        model, tok = load_cross_encoder(folder)
        model.eval()
        qs = [q for q in batch["queries"] for _ in range(3)]
        with torch.no_grad():
            logits = model(**tokenize_pairs(tok, qs, batch["passages"], 64)).logits[:, 0].view(4, 3)
        return float(L.reranker_group_ce(logits))

    before = group_ce(path)
    res = train_reranker(path, recs, tmp_path / "out", group_size=3, batch_size=4, lr=2e-3, max_steps=16,
                         max_length=64, show_progress=False, device="cpu")
    assert res.step == 16
    assert group_ce(tmp_path / "out") < before * 0.8
    r = Reranker(tmp_path / "out", device="cpu")
    s = r.compute_score([(recs[0]["query"], recs[0]["pos"][0]), (recs[0]["query"], recs[0]["neg"][0])])
    assert len(s) == 2 and all(np.isfinite(s))


def test_retromae_step_lowers_its_loss(tiny_plain, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from hybridsearch import BGEM3Encoder
    from hybridsearch.train.pretrain import RetroMAE, pretrain_retromae

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tiny_plain))
    model = RetroMAE(AutoModelForMaskedLM.from_pretrained(str(tiny_plain)), tok)
    enc = tok(DEFAULT_CORPUS[:8], padding=True, return_tensors="pt")

    def loss_now():
        model.eval()
        with torch.no_grad():
            return float(model(enc["input_ids"], enc["attention_mask"], torch.Generator().manual_seed(1))[0])

    before = loss_now()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for i in range(8):
        loss, parts = model(enc["input_ids"], enc["attention_mask"], torch.Generator().manual_seed(1))
        assert set(parts) == {"encoder_mlm", "decoder_mlm"}
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_now() < before * 0.9
    res = pretrain_retromae(tiny_plain, DEFAULT_CORPUS, tmp_path / "pt", max_steps=2, batch_size=4,
                            show_progress=False, device="cpu")
    assert res.step == 2
    e = BGEM3Encoder(tmp_path / "pt", device="cpu")  # encoder only, pooling kept
    assert e.outputs == ("dense",) and e.spec.pooling == "mean"
    assert not (tmp_path / "pt" / "sparse_linear.pt").exists()


# ============================================================================ CLI


def test_cli_train_and_mine(tiny_m3, m3_encoder, tmp_path, capsys):
    import argparse

    from hybridsearch import HybridIndex
    from hybridsearch.train.cli import add_train_parser, main
    from hybridsearch.train.data import write_jsonl

    p = argparse.ArgumentParser()
    add_train_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["train", "embedder", "m", "d", "o", "--sub-batch-size", "2", "--fix-encoder"])
    assert args.sub_batch_size == 2 and args.fix_encoder and args.group_size == 4

    index = HybridIndex.create(tmp_path / "idx", m3_encoder)
    index.add([{"id": f"d{i}", "text": t} for i, t in enumerate(DEFAULT_CORPUS)])
    index.close()
    src = write_jsonl([{k: r[k] for k in ("query", "pos")} for r in _records()], tmp_path / "in.jsonl")
    assert main(["mine", str(tmp_path / "idx"), str(src), str(tmp_path / "mined.jsonl"),
                 "--range", "0-8", "--n-neg", "3", "--model", str(tiny_m3)]) == 0
    mined = read_jsonl(tmp_path / "mined.jsonl")
    assert len(mined) == len(DEFAULT_CORPUS) and all(r["neg"] for r in mined)
    assert main(["train", "embedder", str(tiny_m3), str(tmp_path / "mined.jsonl"), str(tmp_path / "out"),
                 "--max-steps", "2", "--group-size", "2", "--batch-size", "4", "--query-max-len", "16",
                 "--passage-max-len", "32", "--device", "cpu", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 2
    assert (tmp_path / "out" / "sparse_linear.pt").is_file()


def test_reranker_resume_continues_from_the_saved_step(tmp_path):
    from hybridsearch.train.reranker import load_cross_encoder, train_reranker

    path = make_tiny_reranker(tmp_path / "rr")
    kw = {"group_size": 3, "batch_size": 2, "lr": 1e-3, "max_length": 48, "show_progress": False,
          "device": "cpu"}
    full = train_reranker(path, _records(), tmp_path / "a", max_steps=5, save_steps=2, **kw)
    state = torch.load(tmp_path / "a" / "checkpoint-2" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2
    resumed = train_reranker(path, _records(), tmp_path / "b", max_steps=5,
                             resume_from=tmp_path / "a" / "checkpoint-2", **kw)
    assert resumed.step == 5 and len(resumed.losses) == 3
    assert resumed.losses == pytest.approx(full.losses[2:], rel=1e-4)
    a, _ = load_cross_encoder(tmp_path / "a")
    b, _ = load_cross_encoder(tmp_path / "b")
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-5), n
    with pytest.raises(FileNotFoundError, match="not a resumable reranker checkpoint"):
        train_reranker(path, _records(), tmp_path / "c", max_steps=1, resume_from=path, **kw)


def test_frozen_trunk_cache_equals_the_encoder_and_runs_each_text_once(tiny_m3, tmp_path):
    from hybridsearch.train.embedder import FrozenTrunkCache, M3Model

    m = M3Model.from_pretrained(tiny_m3).eval()
    texts = DEFAULT_CORPUS[:7]
    tok = m.tokenize(texts, 48)  # padded batch
    with torch.no_grad():
        ref = m.encoder(**tok, return_dict=True).last_hidden_state
    calls = []
    real_forward = m.encoder.forward

    def counting(*a, **kw):
        calls.append(kw["input_ids"].shape[0])
        return real_forward(*a, **kw)

    m.encoder.forward = counting
    cache = FrozenTrunkCache(m.encoder)
    got = cache(tok["input_ids"], tok["attention_mask"]).last_hidden_state
    mask = tok["attention_mask"].bool()
    assert torch.allclose(got[mask], ref[mask], atol=2e-3, rtol=1e-3)  # float16 storage
    assert (got[~mask] == 0).all()
    # the same texts again, in another order and padding: no encoder call
    tok2 = m.tokenize(texts[::-1] + texts[:2], 64)
    got2 = cache(tok2["input_ids"], tok2["attention_mask"]).last_hidden_state
    assert calls == [7]
    assert torch.equal(got2[0, : int(tok2["attention_mask"][0].sum())],
                       got[6, : int(tok["attention_mask"][6].sum())])
    # one new text: only it is encoded
    tok3 = m.tokenize([texts[0], "a sentence the cache has never seen"], 48)
    cache(tok3["input_ids"], tok3["attention_mask"])
    assert calls == [7, 1]

    # training with the cache: heads learn, the encoder does not, the cache really is used
    tr = _trainer(tiny_m3, fix_encoder=True, cache_hidden=True, group_size=2, batch_size=4, lr=1e-2,
                  query_max_len=16, passage_max_len=32)
    before = {k: v.clone() for k, v in tr.model.encoder.state_dict().items()}
    res = tr.train(_records(), tmp_path / "cached", max_steps=6, show_progress=False)
    assert len(tr.model.trunk_cache.states) > 0 and all(np.isfinite(res.losses))
    for k, v in tr.model.encoder.state_dict().items():
        assert torch.equal(before[k], v), k
    with pytest.raises(ValueError, match="fix_encoder"):
        _trainer(tiny_m3, cache_hidden=True)
