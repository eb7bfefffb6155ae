"""Every channel at 200,000 documents: 30% deleted, a metadata filter, 256 queries, k=100.

The small tests run a few thousand rows at most, where a use-after-free can go unnoticed: the
dense channel once gave FAISS an ``IDSelectorBitmap`` over a temporary ``np.packbits`` array, and
only at this size did FAISS read the freed bitmap (deleted and filtered documents came back, and
the Flat top-k differed from brute force). Here every result is checked against the allowed set
and, where the channel is exact, against a brute force over the allowed rows.

Representations are synthetic and given through ``add(encoded=...)`` / ``search(query_encoded=...)``
so the model never runs; texts are a few words from a 2,000-word vocabulary, so BM25 has real
matches. Indexes are built once per dense factory (module-scoped) and shared by the tests; the
Flat one holds two segments.
"""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import scipy.sparse as sp

from hybridsearch.index.hybrid import HybridIndex
from hybridsearch.representations import Encoded
from hybridsearch.retrievers.sparse import brute_force_topk

N = 200_000
DELETED = 0.3
NQ = 256
K = 100
N_WORDS = 2_000  # BM25 vocabulary: "w0" .. "w1999" (no stemming or stopword applies)
WORDS_PER_DOC = 6
MODES = ("dense", "sparse", "colbert", "bm25", "hybrid")
# "wide" keeps 4 groups of 7 (about 40% of the documents after deletion); "narrow" about 70
# documents, fewer than k, so exact channels must return exactly that many.
FILTERS = {"wide": {"group": {"in": [0, 2, 3, 5]}}, "narrow": {"rare": True}}
ATOL = 1e-5


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _sparse_rows(rng, n, lo, hi, vocab):
    """Random CSR rows of lo..hi-1 draws over the vocabulary (canonical: sorted, summed)."""
    nnz = rng.integers(lo, hi, n)
    indptr = np.concatenate([[0], np.cumsum(nnz)]).astype(np.int64)
    m = sp.csr_matrix((rng.random(int(indptr[-1])).astype(np.float32) + 0.05,
                       rng.integers(0, vocab, int(indptr[-1])), indptr), shape=(n, vocab))
    m.sum_duplicates()
    return m


def _colbert(rng, n, lo, hi, dim):
    """Token vectors (float16-exact float32, as the store keeps them) and offsets."""
    lengths = rng.integers(lo, hi, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    v = _unit(rng.standard_normal((int(offsets[-1]), dim)).astype(np.float32))
    return v.astype(np.float16).astype(np.float32), offsets


@pytest.fixture(scope="module")
def data(m3_encoder):
    spec = m3_encoder.spec
    rng = np.random.default_rng(20261128)
    dense = _unit(rng.standard_normal((N, spec.dim)).astype(np.float32))
    sparse = _sparse_rows(rng, N, 1, 9, spec.vocab_size)
    cv, co = _colbert(rng, N, 1, 5, spec.colbert_dim)
    enc = Encoded(dense, sparse, cv, co, np.diff(co) + 1)
    words = rng.integers(0, N_WORDS, (N, WORDS_PER_DOC))
    texts = [" ".join(f"w{w}" for w in row) for row in words.tolist()]
    group = np.arange(N) % 7
    rare = np.arange(N) % 2000 == 0
    docs = [{"id": f"d{i}", "text": t, "metadata": {"group": int(g), "rare": bool(r)}}
            for i, (t, g, r) in enumerate(zip(texts, group.tolist(), rare.tolist()))]
    dead = np.zeros(N, bool)
    dead[rng.choice(N, int(DELETED * N), replace=False)] = True
    allowed = {"wide": np.isin(group, [0, 2, 3, 5]) & ~dead, "narrow": rare & ~dead}
    assert 0 < allowed["narrow"].sum() < K < allowed["wide"].sum()

    qd = _unit(rng.standard_normal((NQ, spec.dim)).astype(np.float32))
    qcv, qco = _colbert(rng, NQ, 2, 9, spec.colbert_dim)
    q_enc = Encoded(qd, _sparse_rows(rng, NQ, 2, 6, spec.vocab_size), qcv, qco, np.diff(qco) + 1)
    q_words = rng.integers(0, N_WORDS, (NQ, 3))
    queries = [" ".join(f"w{w}" for w in row) for row in q_words.tolist()]
    # doc x query: does the document hold any query word (what BM25 can match)
    incidence = sp.csr_matrix((np.ones(words.size, np.float32), words.ravel(),
                               np.arange(0, words.size + 1, WORDS_PER_DOC)), shape=(N, N_WORDS))
    q_incidence = sp.csr_matrix((np.ones(q_words.size, np.float32), q_words.ravel(),
                                 np.arange(0, q_words.size + 1, 3)), shape=(NQ, N_WORDS))
    bm25_match = (incidence @ q_incidence.T).tocsc()
    return {"docs": docs, "enc": enc, "dead": dead, "allowed": allowed, "q_enc": q_enc,
            "queries": queries, "bm25_match": bm25_match}


def _build(path, encoder, data, factory, bm25, n=N, segments=1):
    """An index of the first ``n`` documents in ``segments`` commits (segments), with their share
    of the deletions."""
    enc, off = data["enc"], data["enc"].colbert_offsets
    idx = HybridIndex.create(path, encoder, dense_factory=factory, bm25=bm25)
    cuts = np.linspace(0, n, segments + 1).astype(int)
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        part = Encoded(enc.dense[lo:hi], enc.sparse[lo:hi], enc.colbert[off[lo]:off[hi]],
                       off[lo:hi + 1] - off[lo], enc.n_tokens[lo:hi])
        idx.add(data["docs"][lo:hi], encoded=part)
    dead = np.flatnonzero(data["dead"][:n])
    idx.delete([f"d{i}" for i in dead])
    assert len(idx) == n - len(dead)
    manifest = json.loads((idx.path / "manifest.json").read_text())
    assert [e["dense_factory"] for e in manifest["segments"]] == [factory] * segments  # no Flat fallback
    return idx


class _Results:
    """Each (mode, filter) searched once, on first use."""

    def __init__(self, idx, data):
        self.idx, self.data, self._cache = idx, data, {}

    def __call__(self, mode, fname):
        if (mode, fname) not in self._cache:
            # "colbert" here is the exhaustive scan (checked exact below); "colbert_staged" is the
            # default ColBERT search (centroid first stage: exact scores, approximate set)
            kw = {"exhaustive": True} if mode == "colbert" else {}
            self._cache[mode, fname] = self.idx.search_batch(
                self.data["queries"], k=K, mode=mode.replace("_staged", ""), filter=FILTERS[fname],
                query_encoded=self.data["q_enc"], **kw)
        return self._cache[mode, fname]


@pytest.fixture(scope="module")
def flat(tmp_path_factory, m3_encoder, data):
    # two segments (docnos 0..119,999 and 120,000..199,999): masks are sliced per segment and
    # the per-segment top-k merged
    idx = _build(tmp_path_factory.mktemp("scale") / "flat", m3_encoder, data, "Flat", bm25=True,
                 segments=2)
    # ColBERT is stored with the default codec (a codebook of centroids + 1 bit a dimension):
    # exact results are those of MaxSim over the vectors as the codes decode.
    state = idx._current()
    assert [s.colbert_kind for s in state.segments] == ["codes", "codes"]
    decoded = np.concatenate([s.colbert.decode_range(0, int(s.colbert.offsets[-1])) for s in state.segments])
    enc = data["enc"]
    stored = dict(data, enc=Encoded(enc.dense, enc.sparse, decoded, enc.colbert_offsets, enc.n_tokens))
    yield idx, _Results(idx, data), stored
    idx.close()


def _rows(hits):
    return np.array([int(h.id[1:]) for h in hits], np.int64)


def _scores(hits):
    return np.array([h.score for h in hits], np.float64)


def _check_allowed_sorted_unique(results, allowed, what):
    assert len(results) == NQ
    for j, hits in enumerate(results):
        rows = _rows(hits)
        assert len(hits) <= K
        assert allowed[rows].all(), f"{what} q{j}: deleted/filtered rows {rows[~allowed[rows]]}"
        assert len(set(rows.tolist())) == len(rows), f"{what} q{j}: duplicate hits"
        s = _scores(hits)
        assert (np.diff(s) <= 0).all(), f"{what} q{j}: scores not non-increasing"


def _check_exact_topk(hits, full, allowed, k, what):
    """``hits`` equal the brute-force top-k of ``full`` (this query's score of every row) over the
    allowed rows, robustly to ties: same count, same scores rank by rank, true scores returned,
    and every row strictly above the k-th score is present."""
    ref = np.where(allowed, full, -np.inf)
    n = min(k, int(allowed.sum()))
    top = np.argpartition(-ref, n - 1)[:n]
    want = np.sort(ref[top])[::-1]
    rows, got = _rows(hits), _scores(hits)
    assert len(hits) == n, f"{what}: {len(hits)} hits, expected {n}"
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=what)
    np.testing.assert_allclose(got, full[rows], atol=ATOL, rtol=0, err_msg=f"{what} (true scores)")
    must = np.flatnonzero(ref > want[-1] + ATOL)
    missing = np.setdiff1d(must, rows)
    assert missing.size == 0, f"{what}: rows {missing[:10]} of the brute-force top-{k} missing"


def _colbert_scores(data, j, rows):
    """MaxSim of query j against documents ``rows``, in numpy (float32, float16-exact vectors)."""
    enc, q = data["enc"], data["q_enc"].colbert_of(j)
    off = enc.colbert_offsets
    lengths = off[rows + 1] - off[rows]  # every document has >= 1 vector
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    tokens = np.repeat(off[rows] - starts, lengths) + np.arange(int(lengths.sum()))
    sims = enc.colbert[tokens] @ q.T  # (tokens, m)
    return np.maximum.reduceat(sims, starts, axis=0).mean(axis=1)


def _colbert_full(data, j, allowed):
    """Query j's MaxSim for every allowed document (-inf elsewhere)."""
    rows = np.flatnonzero(allowed)
    full = np.full(N, -np.inf, np.float32)
    full[rows] = _colbert_scores(data, j, rows)
    return full


@pytest.mark.parametrize("fname", FILTERS)
@pytest.mark.parametrize("mode", MODES)
def test_no_deleted_or_filtered_hit(flat, data, mode, fname):
    _, results, _ = flat
    _check_allowed_sorted_unique(results(mode, fname), data["allowed"][fname], f"{mode}/{fname}")


@pytest.mark.parametrize("fname", FILTERS)
def test_dense_flat_equals_brute_force(flat, data, fname):
    _, results, _ = flat
    allowed = data["allowed"][fname]
    full = data["q_enc"].dense @ data["enc"].dense.T  # (NQ, N)
    for j, hits in enumerate(results("dense", fname)):
        _check_exact_topk(hits, full[j], allowed, K, f"dense/{fname} q{j}")


@pytest.mark.parametrize("fname", FILTERS)
def test_sparse_equals_brute_force(flat, data, fname):
    _, results, _ = flat
    allowed = data["allowed"][fname]
    got = results("sparse", fname)
    q = data["q_enc"].sparse
    for lo in range(0, NQ, 64):  # brute force densifies (queries x N): 64 queries at a time
        ref_s, ref_i = brute_force_topk(data["enc"].sparse, q[lo:lo + 64], K, allowed)
        for r in range(ref_s.shape[0]):
            j = lo + r
            hits, n = got[j], int((ref_i[r] >= 0).sum())
            rows, s = _rows(hits), _scores(hits)
            assert len(hits) == n, f"sparse/{fname} q{j}: {len(hits)} hits, expected {n}"
            # the kernel and the reference compute the same float32 sums
            np.testing.assert_allclose(s, ref_s[r, :n], rtol=1e-6, atol=0, err_msg=f"q{j}")
            above = ref_s[r, :n] > ref_s[r, n - 1] * (1 + 1e-6)
            assert set(rows[above].tolist()) == set(ref_i[r, :n][above].tolist()), f"q{j}"


@pytest.mark.parametrize("fname", FILTERS)
def test_colbert_equals_brute_force(flat, data, fname):
    _, results, data = flat
    allowed = data["allowed"][fname]
    got = results("colbert", fname)
    for j in range(0, NQ, 16):  # 16 of the 256 queries: numpy MaxSim over the allowed docs
        _check_exact_topk(got[j], _colbert_full(data, j, allowed), allowed, K, f"colbert/{fname} q{j}")


@pytest.mark.parametrize("fname", FILTERS)
def test_colbert_first_stage_masks_counts_and_exact_scores(flat, data, fname):
    _, results, data = flat
    allowed = data["allowed"][fname]
    got = results("colbert_staged", fname)
    _check_allowed_sorted_unique(got, allowed, f"colbert_staged/{fname}")
    n = min(K, int(allowed.sum()))
    for j in range(0, NQ, 32):
        rows = _rows(got[j])
        assert len(rows) == n
        np.testing.assert_allclose(_scores(got[j]), _colbert_scores(data, j, rows), atol=ATOL, rtol=0)


@pytest.mark.parametrize("fname", FILTERS)
def test_bm25_counts_and_order(flat, data, fname):
    _, results, _ = flat
    allowed = data["allowed"][fname]
    match = data["bm25_match"]
    for j, hits in enumerate(results("bm25", fname)):
        docs = match.indices[match.indptr[j]:match.indptr[j + 1]]
        n = min(K, int(allowed[docs].sum()))
        assert len(hits) == n, f"bm25/{fname} q{j}: {len(hits)} hits, expected {n}"
        assert all(h.score > 0 for h in hits)
        rows = _rows(hits)
        assert np.isin(rows, docs).all()  # every hit holds a query word


@pytest.mark.parametrize("fname", FILTERS)
def test_hybrid_counts_and_channel_scores(flat, data, fname):
    _, results, data = flat
    allowed = data["allowed"][fname]
    enc, q = data["enc"], data["q_enc"]
    got = results("hybrid", fname)
    n = min(K, int(allowed.sum()))  # the dense first stage alone brings min(K, allowed) rows
    for j, hits in enumerate(got):
        assert len(hits) == n, f"hybrid/{fname} q{j}: {len(hits)} hits, expected {n}"
    for j in range(0, NQ, 16):
        hits = got[j]
        rows = _rows(hits)
        colbert = _colbert_scores(data, j, rows)
        dense = enc.dense[rows] @ q.dense[j]
        sparse_ = (enc.sparse[rows] @ q.sparse[j].T).toarray()[:, 0]
        ch = {c: np.array([h.scores[c] for h in hits]) for c in ("dense", "sparse", "colbert")}
        np.testing.assert_allclose(ch["dense"], dense, atol=ATOL)
        np.testing.assert_allclose(ch["sparse"], sparse_, atol=ATOL)
        np.testing.assert_allclose(ch["colbert"], colbert, atol=ATOL)
        fused = 0.4 * dense + 0.2 * sparse_ + 0.4 * colbert  # default BGE-M3 weights, BM25 0
        np.testing.assert_allclose(_scores(hits), fused, atol=ATOL)


@pytest.fixture(scope="module", params=[
    # HNSW32 takes 20-40 s to build over 200k vectors on two cores: 50k by default, 200k when
    # slow tests run (-m slow).
    pytest.param(("HNSW32", 50_000), id="HNSW32-50k"),
    pytest.param(("IVF256,Flat", N), id="IVF256-200k"),
    pytest.param(("HNSW32", N), id="HNSW32-200k", marks=pytest.mark.slow),
])
def approx(request, tmp_path_factory, m3_encoder, data):
    """The first n documents under an approximate factory (no BM25: not under test here)."""
    factory, n = request.param
    path = tmp_path_factory.mktemp("scale") / f"{factory.replace(',', '_')}-{n}"
    idx = _build(path, m3_encoder, data, factory, bm25=False, n=n)
    yield factory, n, idx
    idx.close()


@pytest.mark.parametrize("fname", FILTERS)
def test_approximate_factories_never_return_disallowed(approx, data, fname):
    factory, n, idx = approx
    allowed = data["allowed"][fname][:n]
    got = idx.search_batch(data["queries"], k=K, mode="dense", filter=FILTERS[fname],
                     query_encoded=data["q_enc"])
    _check_allowed_sorted_unique(got, allowed, f"{factory}/{n}/{fname}")
    if fname == "wide":
        assert all(len(hits) > 0 for hits in got)
    for j, hits in enumerate(got):  # scores are the true inner products of the rows returned
        rows = _rows(hits)
        np.testing.assert_allclose(_scores(hits), data["enc"].dense[rows] @ data["q_enc"].dense[j],
                                   atol=ATOL, err_msg=f"{factory}/{n}/{fname} q{j}")


def test_concurrent_filtered_searches_equal_single_threaded(flat, data):
    idx, _, _ = flat
    q_enc, queries = data["q_enc"], data["queries"]

    def sub(lo, hi):
        rows = np.arange(lo, hi)
        co = q_enc.colbert_offsets
        return queries[lo:hi], Encoded(
            q_enc.dense[lo:hi], q_enc.sparse[lo:hi], q_enc.colbert[co[lo]:co[hi]],
            co[lo:hi + 1] - co[lo], q_enc.n_tokens[rows])

    filters = [FILTERS["wide"], FILTERS["narrow"], {"group": 1}, {"group": {"ne": 4}}, None]
    tasks = []
    ranges = {"dense": ((0, 32), (32, 35), (64, 96)), "sparse": ((0, 32), (32, 35), (64, 96)),
              "colbert": ((0, 6), (32, 33), (64, 70))}  # ColBERT search is exhaustive: fewer
    for t, (mode, (lo, hi)) in enumerate([(m, r) for m in ranges for r in ranges[m]]):
        tasks.append((mode, lo, hi, filters[t % len(filters)]))

    def run(task):
        mode, lo, hi, flt = task
        qs, qe = sub(lo, hi)
        hits = idx.search_batch(qs, k=K, mode=mode, filter=flt, query_encoded=qe)
        return [[(h.id, h.score) for h in row] for row in hits]

    want = [run(t) for t in tasks]
    start = threading.Barrier(4)

    def worker(offset):
        start.wait()
        order = [(offset + i) % len(tasks) for i in range(len(tasks))]
        return {i: run(tasks[i]) for i in order}

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(worker, range(0, 4 * 3, 3)))
    for out in outs:
        for i, got in out.items():
            assert got == want[i], f"task {tasks[i][:3]} differs under concurrency"
