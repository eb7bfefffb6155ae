"""``dense_factory="auto"``: the structure picked per segment by its size, and the guarantees an
ANN segment keeps (never a disallowed row, ``min(k, allowed)`` hits, exact scores), against a
brute force at 30k rows with masks of many densities, batches, deletions and several segments."""

import json
import threading

import faiss
import numpy as np
import pytest
import scipy.sparse as sp

from hybridsearch.errors import IndexFormatError
from hybridsearch.index.hybrid import HybridIndex
from hybridsearch.index.merge import MergePolicy
from hybridsearch.representations import Encoded
from hybridsearch.retrievers import dense as dense_mod
from hybridsearch.retrievers.dense import DenseIndex, auto_factory, check_factory, search_effort
from hybridsearch.retrievers.dense_store import DenseStore, search_reference, write_dense_array

N, D, TOPICS = 30_000, 32, 300


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _clustered(n, d, seed, topics=TOPICS):
    """Unit vectors around ``topics`` centroids (what embeddings of real text look like)."""
    rng = np.random.default_rng(seed)
    c = _unit(np.random.default_rng(99).standard_normal((topics, d)))
    return _unit(c[rng.integers(0, topics, n)] + 0.35 * rng.standard_normal((n, d)) / np.sqrt(d))


def _queries(x, nq, seed):
    rng = np.random.default_rng(seed)
    return _unit(x[rng.choice(len(x), nq, replace=False)] + 0.3 * rng.standard_normal((nq, x.shape[1])) / np.sqrt(x.shape[1]))


@pytest.fixture(scope="module")
def ann(tmp_path_factory):
    """A 30k x 32 sq8 store with the structure "auto" builds over it, saved and reopened as a
    segment opens it (memory-mapped, with its store)."""
    folder = tmp_path_factory.mktemp("auto")
    x = _clustered(N, D, 0)
    write_dense_array(folder, x, "sq8")
    store = DenseStore.open(folder, N, D, "sq8")
    built = DenseIndex.build_from(store, "auto")
    assert built.factory == dense_mod.AUTO_ANN
    built.save(folder)
    di = DenseIndex.load(folder, store, built.factory, use_gpu=False)
    return di, store, store.rows(np.arange(N))


@pytest.fixture(scope="module")
def ivf(tmp_path_factory):
    """The same store with the inverted file "auto" builds for large segments (its threshold
    lowered to this size)."""
    folder = tmp_path_factory.mktemp("auto_ivf")
    x = _clustered(N, D, 0)
    write_dense_array(folder, x, "sq8")
    store = DenseStore.open(folder, N, D, "sq8")
    mp = pytest.MonkeyPatch()
    mp.setattr(dense_mod, "AUTO_IVF_MIN_ROWS", 10_000)
    try:
        built = DenseIndex.build_from(store, "auto")
    finally:
        mp.undo()
    assert built.factory == f"IVF{dense_mod.auto_nlist(N)},SQ8"
    built.save(folder)
    di = DenseIndex.load(folder, store, built.factory, use_gpu=False)
    return di, store, store.rows(np.arange(N))


def _recall(ids, ref, k):
    return np.mean([len(set(ids[r, :k].tolist()) & set(ref[r, :k].tolist())) / k for r in range(len(ids))])


def _check(di, decoded, q, k, mask, exact):
    """No disallowed row, min(k, allowed) hits per query, scores = exact scores of the rows
    over the stored values, sorted; when ``exact``, the same top-k as the brute force (ties
    allowed: compared by score)."""
    s, i = di.search(q, k, mask)
    n_allowed = len(decoded) if mask is None else int(mask.sum())
    want = min(k, n_allowed)
    assert (i[:, :want] >= 0).all() and (i[:, want:] == -1).all() and (s[:, want:] == 0).all()
    hit = i[:, :want]
    if mask is not None:
        assert mask[hit].all()
    for r in range(len(q)):
        assert len(set(hit[r].tolist())) == want
        np.testing.assert_allclose(s[r, :want], decoded[hit[r]] @ q[r], rtol=1e-5, atol=1e-5)
        assert (np.diff(s[r, :want]) <= 1e-6).all()
    rs, ri = search_reference(decoded, q, k, mask)
    if exact:
        np.testing.assert_allclose(s[:, :want], rs[:, :want], rtol=1e-5, atol=1e-5)
    return i, ri


def test_auto_factory_by_size_and_effort():
    t, t_ivf = dense_mod.AUTO_ANN_MIN_ROWS, dense_mod.AUTO_IVF_MIN_ROWS
    assert auto_factory(0) == auto_factory(t - 1) == "Flat"
    assert auto_factory(t) == auto_factory(t_ivf - 1) == dense_mod.AUTO_ANN
    assert auto_factory(10 ** 6) == "IVF2048,SQ8" and auto_factory(t_ivf) == f"IVF{dense_mod.auto_nlist(t_ivf)},SQ8"
    assert all(39 * dense_mod.auto_nlist(n) <= n for n in (t_ivf, 10 ** 6, 10 ** 8))  # trainable
    check_factory("auto", 1024)  # what create() accepts
    check_factory(dense_mod.AUTO_ANN, 1024)
    with pytest.raises(ValueError):
        check_factory("Auto", 16)
    ef10, np10 = search_effort(10, 1.0)
    ef100, np100 = search_effort(100, 1.0)
    assert (ef10, np10) == (dense_mod.EF_SEARCH, dense_mod.NPROBE)
    assert ef100 >= 200 and np100 > np10  # grows with k
    assert search_effort(10, 0.25)[0] == 4 * ef10  # and as a filter removes rows
    assert search_effort(10, 0.01, nlist=64)[1] == 64
    assert search_effort(10, 0.5, ef_search=7, nprobe=3) == (7, 3)  # given values are kept


def test_small_segments_stay_flat():
    x = _clustered(500, D, 1)
    di = DenseIndex.build(x, "auto")
    assert di.factory == "Flat"


def test_unfiltered_batches_have_high_recall_and_exact_scores(ann):
    di, _, decoded = ann
    q = _queries(decoded, 64, 2)
    for k in (1, 10, 100):
        i, ri = _check(di, decoded, q, k, None, exact=False)
        assert _recall(i, ri, min(k, 10)) >= 0.95, k


@pytest.mark.parametrize("density", [0.0001, 0.001, 0.02, 0.09, 0.2, 0.5, 0.97])
def test_masks_keep_the_guarantees(ann, density):
    di, _, decoded = ann
    rng = np.random.default_rng(int(density * 1e5))
    mask = rng.random(N) < density
    q = _queries(decoded, 48, 3)
    for k in (10, 100):
        # below ANN_MIN_ALLOWED the allowed rows are scanned exactly
        i, ri = _check(di, decoded, q, k, mask, exact=density < dense_mod.ANN_MIN_ALLOWED)
        if mask.sum() >= 10:
            assert _recall(i, ri, 10) >= 0.9, (density, k)


@pytest.mark.parametrize("density", [0.001, 0.05, 0.3, 1.0])
def test_ivf_segments_keep_the_guarantees(ivf, density):
    di, _, decoded = ivf
    mask = None if density == 1.0 else np.random.default_rng(int(density * 1e4)).random(N) < density
    q = _queries(decoded, 48, 13)
    for k in (10, 100):
        i, ri = _check(di, decoded, q, k, mask, exact=density < dense_mod.ANN_MIN_ALLOWED)
        assert _recall(i, ri, 10) >= 0.9, (density, k)


def test_short_walks_fall_back_to_exact(ann, monkeypatch):
    """Allowed rows that lie far from the queries: the graph walk (effort forced down) finds too
    few of them, and those queries are answered exactly."""
    di, store, decoded = ann
    q = _queries(decoded, 16, 4)
    far = (decoded @ q.mean(0)) < np.quantile(decoded @ q.mean(0), 0.15)
    calls = []
    real = DenseStore.search

    def spy(self, qq, k, allowed=None):
        calls.append(len(qq))
        return real(self, qq, k, allowed)

    monkeypatch.setattr(DenseStore, "search", spy)
    s, i = di.search(q, 50, far, ef_search=50)
    assert calls, "no query came back short: the test lost its point"
    assert (i >= 0).all() and far[i].all()
    rs, _ = search_reference(decoded, q, 50, far)
    short = (i >= 0).all(axis=1)
    assert short.all()
    # queries answered exactly match the brute force; the others kept the guarantees
    assert sum(np.allclose(s[r], rs[r], atol=1e-5) for r in range(len(q))) >= calls[0]


def test_k_beyond_the_allowed_rows(ann):
    di, _, decoded = ann
    mask = np.zeros(N, bool)
    mask[[5, 17, 29_999]] = True
    q = _queries(decoded, 4, 5)
    s, i = di.search(q, 10, mask)
    assert (np.sort(i[:, :3], axis=1) == [5, 17, 29_999]).all() and (i[:, 3:] == -1).all()
    s, i = di.search(q, 10, np.zeros(N, bool))
    assert (i == -1).all() and (s == 0).all()


def test_concurrent_searches_equal_sequential(ann):
    di, _, decoded = ann
    rng = np.random.default_rng(6)
    jobs = [(_queries(decoded, 3, 10 + j), (10, 100)[j % 2], None if j % 3 == 0 else rng.random(N) < (0.05, 0.4, 0.9)[j % 3])
            for j in range(12)]
    want = [di.search(q, k, m) for q, k, m in jobs]
    got = [None] * len(jobs)

    def run(j):
        for _ in range(3):
            got[j] = di.search(*jobs[j])

    threads = [threading.Thread(target=run, args=(j,)) for j in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (ws, wi), (gs, gi) in zip(want, got):
        assert (wi == gi).all()
        np.testing.assert_allclose(ws, gs, atol=1e-6)


def test_sq8_quantiser_of_wrong_size_is_refused(tmp_path, ann):
    di, store, _ = ann
    x = _clustered(2000, D, 7)
    write_dense_array(tmp_path, x, "sq8")
    small = DenseStore.open(tmp_path, 2000, D, "sq8")
    index = faiss.index_factory(D, dense_mod.AUTO_ANN, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    faiss.downcast_index(faiss.downcast_index(index).storage).sq.trained.resize(3)
    faiss.write_index(index, str(tmp_path / "dense.faiss"))
    with pytest.raises(IndexFormatError, match="dense.faiss"):
        DenseIndex.load(tmp_path, small, dense_mod.AUTO_ANN, use_gpu=False)


# ------------------------------------------------------------------ through the index


def _encoded(rng, n, spec, x):
    nnz = rng.integers(1, 5, n)
    indptr = np.concatenate([[0], np.cumsum(nnz)]).astype(np.int64)
    sparse = sp.csr_matrix((rng.random(int(indptr[-1])).astype(np.float32) + 0.05,
                            rng.integers(0, min(300, spec.vocab_size), int(indptr[-1])), indptr),
                           shape=(n, spec.vocab_size))
    sparse.sum_duplicates()
    lengths = rng.integers(1, 4, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    colbert = _unit(rng.standard_normal((int(offsets[-1]), spec.colbert_dim)))
    return Encoded(x, sparse, colbert, offsets, lengths + 1)


def test_index_picks_per_segment_and_merges_upgrade(tmp_path, m3_encoder, monkeypatch):
    """Commits of 400 stay Flat; merges past the (lowered) thresholds become HNSW / IVF segments with
    ``dense.faiss``; an explicit "Flat" index never does; searches with deletions and filters
    keep the guarantees across the mixed segments."""
    monkeypatch.setattr(dense_mod, "AUTO_ANN_MIN_ROWS", 1000)
    monkeypatch.setattr(dense_mod, "AUTO_IVF_MIN_ROWS", 3000)
    spec = m3_encoder.spec
    rng = np.random.default_rng(8)
    n_commit, commits = 400, 13
    x = _clustered(n_commit * commits, spec.dim, 9, topics=40)
    policy = MergePolicy(factor=3, floor=100)
    idx = HybridIndex.create(tmp_path / "auto", m3_encoder, merge_policy=policy, bm25=False)
    flat = HybridIndex.create(tmp_path / "flat", m3_encoder, dense_factory="Flat", merge_policy=policy, bm25=False)
    for c in range(commits):
        rows = np.arange(c * n_commit, (c + 1) * n_commit)
        docs = [{"id": f"d{r}", "text": f"w{r % 50} w{r % 7}", "metadata": {"g": int(r % 5)}} for r in rows]
        enc = _encoded(rng, n_commit, spec, x[rows])
        idx.add(docs, encoded=enc)
        flat.add(docs, encoded=enc)
    m = json.loads((idx.path / "manifest.json").read_text())
    assert m["channels"]["dense"]["factory"] == "auto"
    kinds = [(e["count"], e["dense_factory"], "dense.faiss" in e["files"]) for e in m["segments"]]
    assert {f.split(",")[0] for _, f, _ in kinds} == {"Flat", "HNSW32", "IVF64"}, kinds  # one of each
    for count, f, has_file in kinds:
        assert f == auto_factory(count) and has_file == (f != "Flat"), kinds
    mf = json.loads((flat.path / "manifest.json").read_text())
    assert all(e["dense_factory"] == "Flat" and "dense.faiss" not in e["files"] for e in mf["segments"])
    assert mf["channels"]["dense"]["factory"] == "Flat"

    gone = [f"d{r}" for r in rng.choice(len(x), 500, replace=False)]
    idx.delete(gone)
    flat.delete(gone)
    dead = np.isin(np.arange(len(x)), [int(g[1:]) for g in gone])
    q = _queries(x, 24, 10)
    q_enc = _encoded(rng, len(q), spec, q)
    queries = [f"q{j}" for j in range(len(q))]
    for flt, allowed in ((None, ~dead), ({"g": 2}, ~dead & (np.arange(len(x)) % 5 == 2))):
        for k in (10, 60):
            got = idx.search_batch(queries, k=k, mode="dense", filter=flt, query_encoded=q_enc)
            ref = flat.search_batch(queries, k=k, mode="dense", filter=flt, query_encoded=q_enc)
            hits_total = 0
            for j, (g, r) in enumerate(zip(got, ref)):
                rows = [int(h.id[1:]) for h in g]
                assert len(rows) == len(r) == min(k, int(allowed.sum())), (flt, k, j)
                assert allowed[rows].all() and len(set(rows)) == len(rows)
                hits_total += len(set(rows) & {int(h.id[1:]) for h in r})
            assert hits_total / sum(len(r) for r in ref) >= 0.9, (flt, k)
    # reopening reads the recorded structure
    idx.close()
    again = HybridIndex.open(tmp_path / "auto", m3_encoder)
    assert [s.dense_factory for s in again._current().segments] == [f for _, f, _ in kinds]
    again.close()
    flat.close()


def test_compact_moves_a_flat_index_to_another_structure(tmp_path, m3_encoder, monkeypatch):
    """``compact(dense_factory=...)``: an index created "Flat" (as every index before "auto")
    is rewritten with the new structure and keeps it for later commits; answers stay those of
    the exact search up to ANN recall, with no deleted row; a bad factory changes nothing."""
    monkeypatch.setattr(dense_mod, "AUTO_ANN_MIN_ROWS", 1000)
    spec = m3_encoder.spec
    rng = np.random.default_rng(21)
    n = 2400
    x = _clustered(n, spec.dim, 22, topics=30)
    idx = HybridIndex.create(tmp_path / "old", m3_encoder, dense_factory="Flat", bm25=False)
    docs = [{"id": f"d{r}", "text": f"w{r % 9}", "metadata": {}} for r in range(n)]
    for a in range(0, n, 800):
        idx.add(docs[a:a + 800], encoded=_encoded(rng, 800, spec, x[a:a + 800]))
    gone = [f"d{r}" for r in range(0, n, 7)]
    idx.delete(gone)
    q = _queries(x, 16, 23)
    q_enc = _encoded(rng, len(q), spec, q)
    queries = [f"q{j}" for j in range(len(q))]
    before = idx.search_batch(queries, k=10, mode="dense", query_encoded=q_enc)
    with pytest.raises(ValueError):
        idx.compact(dense_factory="NotAFactory")
    assert json.loads((idx.path / "manifest.json").read_text())["channels"]["dense"]["factory"] == "Flat"
    idx.compact(dense_factory="auto")
    m = json.loads((idx.path / "manifest.json").read_text())
    assert m["channels"]["dense"]["factory"] == "auto"
    assert [e["dense_factory"] for e in m["segments"]] == [auto_factory(n - len(gone))]
    assert "dense.faiss" in m["segments"][0]["files"]
    after = idx.search_batch(queries, k=10, mode="dense", query_encoded=q_enc)
    same = sum(len({h.id for h in a} & {h.id for h in b}) for a, b in zip(after, before))
    assert same / sum(len(b) for b in before) >= 0.9
    assert not {h.id for hs in after for h in hs} & set(gone)
    assert all(len(hs) == 10 for hs in after)
    idx.close()
    again = HybridIndex.open(tmp_path / "old", m3_encoder)
    assert again._current().manifest["channels"]["dense"]["factory"] == "auto"
    again.close()
