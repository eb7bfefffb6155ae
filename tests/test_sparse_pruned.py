"""The pruned learned-sparse kernel (exact MaxScore over split lists) against today's
term-at-a-time kernel and the scipy brute force: identical ids and float32 scores.

Data look like learned-sparse postings at a small scale: a Zipf(1) vocabulary of 250k terms,
~60 distinct terms a document with lognormal weights that shrink for frequent terms, 100k
documents, and long queries (30-100 terms) built around a document's heaviest terms plus
Zipf-drawn expansion terms, as well as flat random queries.
"""

import numba
import numpy as np
import pytest
import scipy.sparse as sp

from hybridsearch.retrievers import sparse
from hybridsearch.retrievers.sparse import SparsePostings, brute_force_topk

VOCAB = 250_000
N_DOCS = 100_000
ABSENT = (VOCAB - 1, VOCAB - 7)  # terms no document uses


def zipf_terms(rng, n):
    cdf = np.cumsum(1.0 / np.arange(1, VOCAB + 1))
    return np.minimum(np.searchsorted(cdf / cdf[-1], rng.random(n)), VOCAB - 8)


def idf_scale(terms):
    return np.log(2.0 + terms) / np.log(2.0 + VOCAB)


def make_docs(rng, n, draws=64):
    terms = zipf_terms(rng, n * draws)
    w = (rng.lognormal(0.0, 0.5, terms.size) * idf_scale(terms)).astype(np.float32)
    docs = sp.csr_matrix((w, (np.repeat(np.arange(n), draws), terms)), shape=(n, VOCAB))
    docs.sum_duplicates()
    return docs


def make_queries(rng, docs, n, flat=False):
    """Long queries: a random document's heaviest terms plus Zipf expansion terms (or, flat,
    Zipf terms only with unscaled weights)."""
    rows, cols, vals = [], [], []
    for r in range(n):
        length = int(rng.integers(30, 101))
        core = np.zeros(0, np.int64)
        if not flat:
            d = docs[int(rng.integers(docs.shape[0]))]
            core = d.indices[np.argsort(-d.data)][: int(rng.integers(8, 21))]
        terms = np.unique(np.concatenate([core, zipf_terms(rng, length - core.size)]))
        w = rng.lognormal(0.0 if flat else -0.5, 0.6, terms.size)
        if not flat:
            w *= idf_scale(terms)
        rows += [r] * terms.size
        cols += list(terms)
        vals += list(w)
    return sp.csr_matrix((np.array(vals, np.float32), (rows, cols)), shape=(n, VOCAB))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(13)
    docs = make_docs(rng, N_DOCS)
    # Ties: the last rows repeat earlier documents, which queries below are built around.
    dup_of = rng.choice(N_DOCS - 200, 200, replace=False)
    docs = sp.vstack([docs[: N_DOCS - 200], docs[dup_of]], format="csr")
    queries = [make_queries(rng, docs, 14), make_queries(rng, docs, 4, flat=True)]
    around_dups = make_queries(rng, docs[N_DOCS - 200:N_DOCS - 190], 4)
    # An empty query, one of absent terms only, one mixing absent and rare terms (few hits).
    odd = sp.lil_matrix((3, VOCAB), dtype=np.float32)
    odd[1, list(ABSENT)] = 1.0
    odd[2, list(ABSENT)] = 2.0
    odd[2, [VOCAB - 9, VOCAB - 10, 40_000, 60_000]] = [0.5, 0.25, 1.0, 1.5]
    queries = sp.vstack(queries + [around_dups, odd.tocsr()], format="csr")
    assert docs.shape == (N_DOCS, VOCAB) and docs[:, list(ABSENT)].nnz == 0
    return docs, queries, SparsePostings.from_csr(docs)


@pytest.fixture(scope="module")
def brute(data):
    docs, queries, _ = data
    cache = {}

    def get(k, allowed=None, key=None):
        if (k, key) not in cache:
            cache[k, key] = brute_force_topk(docs, queries, k, allowed=allowed)
        return cache[k, key]
    return get


def assert_identical(got, ref):
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_array_equal(got[0], ref[0])


@pytest.fixture(params=[16, 13], ids=["blocks64k", "blocks8k"])
def block_shift(request, monkeypatch):
    """The default blocks, and small ones: many blocks and first windows on 100k docs."""
    monkeypatch.setattr(sparse, "PRUNE_BLOCK_SHIFT", request.param)
    return request.param


@pytest.mark.parametrize("k", [1, 10, 100])
def test_pruned_equals_taat_and_brute_force(data, brute, block_shift, k):
    docs, queries, ix = data
    ref = brute(k)
    taat = ix.search(queries, k, kernel="taat")
    assert_identical(taat, ref)
    ix.prune_stats[:] = 0
    assert_identical(ix.search(queries, k, kernel="pruned"), ref)
    stats = ix.prune_stats[0]
    # Pruning did happen: far fewer postings read than the queries' lists hold.
    postings = int(np.diff(ix.indptr)[queries.indices].sum())
    assert 0 < stats[2] < postings // 2
    assert stats[1] < stats[0]  # not every window read in full
    assert 0 < stats[7] < stats[2]  # some lists were read from their mid list only


def test_ties_resolved_to_the_lower_row(data, brute):
    docs, queries, ix = data
    ids = ix.search(queries, 10, kernel="pruned")[1]
    dup_rows = ids[18:22]  # the queries built around repeated documents
    assert (dup_rows >= N_DOCS - 200).any()  # the copies score like their originals...
    scores = ix.search(queries, 10, kernel="pruned")[0]
    for r in range(18, 22):
        for j in range(9):
            if scores[r, j] == scores[r, j + 1]:
                assert ids[r, j] < ids[r, j + 1]  # ...and come after them on a tie
    assert_identical(ix.search(queries, 10, kernel="pruned"), brute(10))


def test_k_beyond_the_hits(data, brute):
    docs, queries, ix = data
    hits = ((queries @ docs.T) > 0).sum(axis=1).A1
    assert hits[-3] == 0 and hits[-2] == 0 and 0 < hits[-1] < 2000
    k = int(hits[-1]) + 50
    tail = queries[-3:]
    got = ix.search(tail, k, kernel="pruned")
    assert_identical(got, ix.search(tail, k, kernel="taat"))
    assert_identical(got, brute_force_topk(docs, tail, k))
    assert (got[1][:2] == -1).all() and (got[0][:2] == 0).all()
    assert (got[1][2, hits[-1]:] == -1).all() and (got[1][2, :hits[-1]] >= 0).all()


@pytest.mark.parametrize("density", [0.7, 0.001])
def test_allowed_masks(data, brute, block_shift, density):
    docs, queries, ix = data
    allowed = np.random.default_rng(int(density * 1000)).random(N_DOCS) < density
    for k in (1, 10, 100):
        ref = brute(k, allowed, key=density)
        got = ix.search(queries, k, allowed=allowed, kernel="pruned")
        assert_identical(got, ref)
        assert_identical(ix.search(queries, k, allowed=allowed, kernel="taat"), ref)
        assert allowed[got[1][got[1] >= 0]].all()


@pytest.mark.parametrize("forward", [True, False], ids=["forward", "searches"])
@pytest.mark.parametrize("ne_frac,split_min,split_factor,mid_factor,seed_terms,lookups",
                         [(1.0, 256, 3.0, 1.5, 4, 0), (0.2, 256, 2.0, 1.0, 4, 0),
                          (0.6, 16, 1.2, 1.5, 0, 0), (0.9, 10**9, 2.0, 1.0, 0, 0),
                          (0.5, 256, 2.0, 2.0, 20, 20_000), (0.7, 64, 4.0, 0.5, 4, 20_000)])
def test_any_pruning_setting_stays_exact(data, monkeypatch, ne_frac, split_min, split_factor,
                                         mid_factor, seed_terms, lookups, forward):
    """The knobs trade speed only: from no split lists to most lists split, mid lists from
    as large as the high ones (or larger: clamped) to most of the list, from a small to the
    largest non-essential share, with and without a first k-th score (partial or exact)."""
    docs, queries, _ = data
    monkeypatch.setattr(sparse, "PRUNE_BLOCK_SHIFT", 14)
    monkeypatch.setattr(sparse, "PRUNE_SEED_TERMS", seed_terms)
    monkeypatch.setattr(sparse, "PRUNE_SEED_LOOKUPS", lookups)
    monkeypatch.setattr(sparse, "PRUNE_NE_FRAC", ne_frac)
    monkeypatch.setattr(sparse, "PRUNE_SPLIT_MIN", split_min)
    monkeypatch.setattr(sparse, "PRUNE_SPLIT_FACTOR", split_factor)
    monkeypatch.setattr(sparse, "PRUNE_MID_FACTOR", mid_factor)
    monkeypatch.setattr(sparse, "PRUNE_FORWARD", forward)
    ix = SparsePostings(*(getattr(data[2], a) for a in ("indptr", "docs", "weights",
                                                        "term_max", "n_docs")))
    for k in (1, 10):
        assert_identical(ix.search(queries, k, kernel="pruned"),
                         ix.search(queries, k, kernel="taat"))


def test_query_parts_merge_exactly(data, monkeypatch):
    """A query split over several parts (what threads get), each part run serially here."""
    docs, queries, ix = data
    monkeypatch.setattr(sparse, "PRUNE_BLOCK_SHIFT", 13)
    k, n_parts = 10, 3
    split = ix._split()  # rebuilt for these blocks
    q_args = (sparse._readonly(queries.indptr.astype(np.int64)),
              sparse._readonly(queries.indices.astype(np.int32)), sparse._readonly(queries.data))
    nq = queries.shape[0]
    part_s = np.zeros((nq * n_parts, k), np.float32)
    part_i = np.full((nq * n_parts, k), -1, np.int64)
    scratch = [a[0] for a in sparse._scratch(1, 1 << 13)]
    sparse._pruned_items(ix.indptr, ix.docs, ix.weights, ix.term_max, *split, *q_args,
                         sparse._readonly(np.zeros(nq, np.float32)),
                         sparse._readonly(np.zeros(0, np.bool_)), False, 13, 1 << 12,
                         ix.n_docs, 0.5, 16, 20_000, n_parts, 0, nq * n_parts, part_s,
                         part_i, *scratch,
                         np.zeros(8, np.int64))
    sparse._local.clean = True
    out_s, out_i = np.zeros((nq, k), np.float32), np.full((nq, k), -1, np.int64)
    sparse._merge_blocks(part_s, part_i, n_parts, out_s, out_i)
    assert_identical((out_s, out_i), ix.search(queries, k, kernel="taat"))
    assert_identical(ix.search(queries, k, kernel="pruned"), (out_s, out_i))


def test_parallel_path(data, monkeypatch):
    """Batches over threads, and one query split over them (needs NUMBA_NUM_THREADS >= 2)."""
    docs, queries, ix = data
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba runs one thread here")
    monkeypatch.setattr(sparse, "PARALLEL_MIN_POSTINGS", 0)
    ref = ix.search(queries, 10, kernel="taat")
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        assert_identical(ix.search(queries, 10, kernel="pruned"), ref)
        for r in (0, 5, 20):
            assert_identical(ix.search(queries[r], 10, kernel="pruned"),
                             (ref[0][r:r + 1], ref[1][r:r + 1]))
    finally:
        numba.set_num_threads(before)


def test_auto_picks_by_size_and_k(data, monkeypatch):
    docs, queries, ix = data
    monkeypatch.setattr(sparse, "PRUNED_DOCS_PER_K", 1000)  # k <= 100 on 100k docs
    monkeypatch.setattr(sparse, "PRUNED_MAX_READ", float("inf"))  # the read share never decides
    for threshold in (1, 10**9):
        monkeypatch.setattr(sparse, "PRUNED_MIN_DOCS", threshold)
        for k in (10, 100, 101):
            ix.prune_stats[:] = 0
            assert_identical(ix.search(queries, k), ix.search(queries, k, kernel="taat"))
            assert (ix.prune_stats[0, 0] > 0) == (threshold == 1 and k <= 100)


def test_auto_follows_the_share_of_postings_read(data, monkeypatch):
    """kernel="auto" scans term at a time while the segment's pruned searches read more than
    PRUNED_MAX_READ of their postings (flat queries), prunes while they read less (learned-
    sparse-like ones), probes again every PRUNED_REPROBE-th search, and always returns what
    both kernels return."""
    docs, queries, _ = data
    monkeypatch.setattr(sparse, "PRUNED_MIN_DOCS", 1)
    monkeypatch.setattr(sparse, "PRUNED_DOCS_PER_K", 1000)
    doc_q, flat_q = queries[:14], queries[14:18]

    def share(ix, q):  # what one pruned search of q reads, as auto measures it
        before = ix.prune_stats[0, 2]
        ix.search(q, 10, kernel="pruned")
        post = int((ix.indptr[q.indices + 1] - ix.indptr[q.indices]).sum())
        return (ix.prune_stats[0, 2] - before) / post

    probe = SparsePostings.from_csr(docs)
    flat_share = float(np.median([share(probe, flat_q[i]) for i in range(4)]))
    doc_share = float(np.median([share(probe, doc_q[i]) for i in range(14)]))
    assert doc_share < flat_share
    monkeypatch.setattr(sparse, "PRUNED_MAX_READ", (doc_share + flat_share) / 2)

    ix = SparsePostings.from_csr(docs)
    ref_flat = ix.search(flat_q, 10, kernel="taat")
    ref_doc = ix.search(doc_q, 10, kernel="taat")
    # flat queries one by one: the first is pruned, then mostly scanned, with a probe every 16th
    n = 2 * sparse.PRUNED_REPROBE + 1
    for j in range(n):
        i = j % 4
        assert_identical(ix.search(flat_q[i], 10), (ref_flat[0][i:i + 1], ref_flat[1][i:i + 1]))
    assert ix.auto_counts["pruned"] == 3 and ix.auto_counts["taat"] == n - 3
    # learned-sparse-like queries pull the running share down again: pruned from then on
    for j in range(40):
        i = j % 14
        assert_identical(ix.search(doc_q[i], 10), (ref_doc[0][i:i + 1], ref_doc[1][i:i + 1]))
    counts = dict(ix.auto_counts)
    assert_identical(ix.search(doc_q, 10), ref_doc)
    assert ix.auto_counts["pruned"] == counts["pruned"] + 1
    assert ix._read_share < sparse.PRUNED_MAX_READ
    # k beyond the size rule: the scan, whatever the share
    ix.search(doc_q[0], 200)
    assert ix.auto_counts["taat"] == counts["taat"] + 1


@pytest.mark.parametrize("forward", [True, False], ids=["forward", "searches"])
def test_query_csr_order_duplicates_and_odd_weights(data, monkeypatch, forward):
    """Unsorted and repeated query entries, zero weights: the sums follow the query's CSR
    order exactly as term at a time does; an infinite weight falls back to it."""
    docs, queries, ix = data
    monkeypatch.setattr(sparse, "PRUNE_FORWARD", forward)
    q = queries[:3]
    rng = np.random.default_rng(5)
    indptr, indices, values = [0], [], []
    for r in range(3):
        row = q[r]
        idx = np.concatenate([row.indices, row.indices[:5]])
        w = np.concatenate([row.data, row.data[:5] * 0.5]).astype(np.float32)
        w[::11] = 0.0
        perm = rng.permutation(idx.size)
        indices += list(idx[perm])
        values += list(w[perm])
        indptr.append(len(indices))
    odd = sp.csr_matrix((np.array(values, np.float32), np.array(indices, np.int32),
                         np.array(indptr)), shape=(3, VOCAB))
    assert not odd.has_canonical_format
    assert_identical(ix.search(odd, 10, kernel="pruned"), ix.search(odd, 10, kernel="taat"))
    # Unsorted without repeats (the forward rows' hash path, not the per-entry searches).
    uniq = sp.csr_matrix((np.concatenate([queries[r].data[::-1] for r in range(6)]),
                          np.concatenate([queries[r].indices[::-1] for r in range(6)]),
                          np.concatenate([[0], np.cumsum(np.diff(queries.indptr)[:6])])),
                         shape=(6, VOCAB))
    for k in (1, 10, 50):
        assert_identical(ix.search(uniq, k, kernel="pruned"), ix.search(uniq, k, kernel="taat"))
    inf = odd.copy()
    inf.data[3] = np.inf
    got = ix.search(inf, 10, kernel="pruned")
    ref = ix.search(inf, 10, kernel="taat")
    np.testing.assert_array_equal(got[1], ref[1])


def test_save_load_then_pruned(data, tmp_path):
    docs, queries, ix = data
    ix.save(tmp_path, prefix="seg")
    back = SparsePostings.load(tmp_path, prefix="seg", mmap=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "seg_docs.npy", "seg_indptr.npy", "seg_n_docs.npy", "seg_term_max.npy",
        "seg_weights.npy"]  # nothing new on disk: the split lists are built on load
    assert_identical(back.search(queries, 10, kernel="pruned"), ix.search(queries, 10))


def test_split_lists_match_numpy(data):
    docs, _, ix = data
    min_len, factor = 256, 2.0
    tau, low_max, h_indptr, h_docs, h_weights = sparse._split_lists(
        ix.indptr, ix.docs, ix.weights, min_len, factor)
    lengths = np.diff(ix.indptr)
    for t in np.flatnonzero(lengths)[::97].tolist() + [0, 1, 2]:
        rows = ix.docs[ix.indptr[t]:ix.indptr[t + 1]]
        w = ix.weights[ix.indptr[t]:ix.indptr[t + 1]]
        hr = h_docs[h_indptr[t]:h_indptr[t + 1]]
        hw = h_weights[h_indptr[t]:h_indptr[t + 1]]
        if w.size < min_len:
            assert tau[t] == -1 and low_max[t] == 0 and hr.size == 0
            continue
        cut = np.float32(factor * float(w.astype(np.float64).sum()) / w.size)
        np.testing.assert_allclose(tau[t], cut, rtol=1e-6)
        high = w > tau[t]
        np.testing.assert_array_equal(hr, rows[high])
        np.testing.assert_array_equal(hw, w[high])
        assert low_max[t] == (w[~high].max() if (~high).any() else 0)
        assert ix.term_max[t] >= low_max[t]


def test_bad_kernel_name(data):
    with pytest.raises(ValueError, match="kernel"):
        data[2].search(data[1][:1], 3, kernel="wand")


def test_block_offsets_match_searchsorted(data):
    _, _, ix = data
    shift, min_len = 13, 1000
    tau, low_max, h_indptr, h_docs, h_weights = sparse._split_lists(
        ix.indptr, ix.docs, ix.weights, 256, 2.0)
    row, offs, h_offs, b_max, b_low = sparse._block_offsets(
        ix.indptr, ix.docs, ix.weights, tau, h_indptr, h_docs, shift, ix.n_docs, min_len)
    lengths = np.diff(ix.indptr)
    np.testing.assert_array_equal(row >= 0, lengths >= min_len)
    edges = np.arange(offs.shape[1]) << shift
    assert b_max.shape == b_low.shape == (offs.shape[0], offs.shape[1] - 1)
    n_checked = 0
    for t in np.flatnonzero(row >= 0)[::7]:
        lo, hi = ix.indptr[t], ix.indptr[t + 1]
        np.testing.assert_array_equal(offs[row[t]], lo + np.searchsorted(ix.docs[lo:hi], edges))
        # Block maxima: of all the block's postings, and of those left out of the high list.
        w = ix.weights[lo:hi]
        blk = ix.docs[lo:hi] >> shift
        for b in range(b_max.shape[1]):
            in_b = w[blk == b]
            assert b_max[row[t], b] == (in_b.max() if in_b.size else 0)
            low = in_b[in_b <= tau[t]] if tau[t] >= 0 else in_b[:0]
            assert b_low[row[t], b] == (low.max() if low.size else 0)
            n_checked += in_b.size > 0 and low.size > 0 and low.size < in_b.size
        lo, hi = h_indptr[t], h_indptr[t + 1]
        np.testing.assert_array_equal(h_offs[row[t]], lo + np.searchsorted(h_docs[lo:hi], edges))
    assert n_checked > 100  # blocks with both parts were compared


@pytest.mark.parametrize("budget", [20_000, 0], ids=["exact", "partial"])
@pytest.mark.parametrize("density", [1.0, 0.05])
def test_seed_is_a_lower_bound_of_the_kth_score(data, brute, density, budget):
    """The first k-th score comes from exact scores of allowed docs (a look-up budget) or
    from their partial sums less the float32 roundings (no budget): never above the true
    k-th score (equal to it is allowed), and found for the queries built around documents."""
    docs, queries, ix = data
    allowed = np.random.default_rng(3).random(N_DOCS) < density
    split = ix._split()
    skip, tops, fwd = split[-3], split[-2], split[-1]
    no_fwd = (np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
    assert fwd[0].shape[0] == N_DOCS + 1  # the forward index is on by default
    for k in (1, 10, 100):
        ref = brute_force_topk(docs, queries, k, allowed=allowed)
        found = 0
        for r in range(queries.shape[0]):
            q = queries[r]
            ts, ws = q.indices.astype(np.int32), q.data
            b_high = ws.astype(np.float64) * ix.term_max[ts]
            qmap = sparse._query_map(ts, ix.vocab_size)
            scratch = np.empty(2 * ts.size, np.int64)
            seed = sparse._seed_theta(ix.indptr, ix.docs, ix.weights, skip, tops, no_fwd, qmap,
                                      scratch, ts, ws, b_high, allowed, density < 1.0, k, 16, budget)
            assert seed <= ref[0][r, -1]
            # From forward rows: exact scores of more docs, still a lower bound.
            seed_f = sparse._seed_theta(ix.indptr, ix.docs, ix.weights, skip, tops, fwd, qmap,
                                        scratch, ts, ws, b_high, allowed, density < 1.0, k, 16,
                                        budget)
            assert seed_f <= ref[0][r, -1]
            assert budget == 0 or seed_f >= seed  # 4k docs scored against 2k
            assert seed == 0.0 or ref[1][r, -1] >= 0  # a seed implies k hits exist
            found += seed > 0
        assert found >= (10 if k <= 10 and density == 1.0 else 0)


@pytest.mark.parametrize("m", [1, 5, 32])
def test_tops_are_each_lists_heaviest_postings(data, m):
    """The first k-th score's postings: for every list longer than m, m of its postings whose
    weights are its m largest (a plain sort as the reference); none for the other lists."""
    _, _, ix = data
    t_indptr, t_docs, t_weights = sparse._tops(ix.indptr, ix.docs, ix.weights, m)
    lengths = np.diff(ix.indptr)
    np.testing.assert_array_equal(np.diff(t_indptr), np.where(lengths > m, m, 0))
    checked = 0
    for t in np.flatnonzero(lengths > m).tolist():
        lo, hi = int(ix.indptr[t]), int(ix.indptr[t + 1])
        got_w = t_weights[t_indptr[t]:t_indptr[t + 1]]
        got_d = t_docs[t_indptr[t]:t_indptr[t + 1]]
        np.testing.assert_array_equal(np.sort(got_w), np.sort(ix.weights[lo:hi])[-m:])
        assert np.unique(got_d).size == m  # distinct postings of this list, with their weights
        pos = lo + np.searchsorted(ix.docs[lo:hi], got_d)
        np.testing.assert_array_equal(ix.docs[pos], got_d)
        np.testing.assert_array_equal(ix.weights[pos], got_w)
        checked += 1
    assert checked > 100


def test_seek_matches_searchsorted(data):
    """The interpolating search on the 1-in-64 sample: the first position >= row in
    docs[p:hi], for lists of every length, rows on postings, between them and outside."""
    _, _, ix = data
    skip = ix._split()[-3]
    rng = np.random.default_rng(11)
    lengths = np.diff(ix.indptr)
    terms = np.concatenate([np.argsort(-lengths)[:40], rng.choice(np.flatnonzero(lengths), 400)])
    checked = 0
    for t in terms.tolist():
        lo, hi = int(ix.indptr[t]), int(ix.indptr[t + 1])
        lst = ix.docs[lo:hi]
        rows = np.concatenate([lst[rng.integers(0, lst.size, 20)],
                               rng.integers(0, ix.n_docs, 20), [0, ix.n_docs, lst[0], lst[-1],
                                                                lst[-1] + 1]])
        for p in {lo, lo + 1, (lo + hi) // 2, hi - 1, hi}:
            p = min(max(p, lo), hi)
            for row in rows.tolist():
                want = p + int(np.searchsorted(ix.docs[p:hi], row))
                assert sparse._seek(ix.docs, skip, p, hi, row) == want, (t, p, row)
                checked += 1
    assert checked > 20_000


def test_forward_index_matches_the_csr(data):
    """Row r of the forward index: the doc's terms ascending, then their weights."""
    docs, _, ix = data
    f_indptr, f_terms, f_weights = ix._split()[-1]
    np.testing.assert_array_equal(f_indptr, docs.indptr)
    assert f_terms.size == f_weights.size == 2 * docs.nnz
    for r in [0, 1, N_DOCS - 1] + list(range(5, N_DOCS, 997)):
        lo, m = 2 * f_indptr[r], f_indptr[r + 1] - f_indptr[r]
        np.testing.assert_array_equal(f_terms[lo:lo + m], docs.indices[docs.indptr[r]:
                                                                       docs.indptr[r + 1]])
        np.testing.assert_array_equal(f_weights[lo + m:lo + 2 * m],
                                      docs.data[docs.indptr[r]:docs.indptr[r + 1]])


def _taat_score(ts, ws, doc_terms, doc_w):
    """The reference: float32 sum in entry order of w * weight over the entries present."""
    s = np.float32(0.0)
    for t, w in zip(ts.tolist(), ws):
        hit = np.flatnonzero(doc_terms == t)
        if hit.size:
            s = np.float32(s + np.float32(w * doc_w[hit[0]]))
    return s


def test_forward_scores_equal_term_at_a_time_sums(data):
    """Exact scores from forward rows, for sorted queries, unsorted ones (hash table) and
    ones repeating a term (searches per entry), against a plain float32 loop and against
    the term-at-a-time kernel's own scores."""
    docs, queries, ix = data
    fwd = ix._split()[-1]
    rng = np.random.default_rng(21)
    checked = 0
    for r in range(queries.shape[0]):
        q = queries[r]
        if not q.nnz:
            continue
        variants = [(q.indices, q.data)]
        perm = rng.permutation(q.nnz)
        variants.append((q.indices[perm], q.data[perm]))
        rep = np.concatenate([perm, perm[:3]])
        variants.append((q.indices[rep], (q.data[rep] * 0.75).astype(np.float32)))
        taat_s, taat_i = ix.search(q, 20, kernel="taat")
        rows = np.concatenate([taat_i[0][taat_i[0] >= 0], rng.integers(0, N_DOCS, 20)])
        for ts, ws in variants:
            ts = ts.astype(np.int32)
            ws = np.ascontiguousarray(ws, np.float32)
            qmap = sparse._query_map(ts, VOCAB)
            assert (qmap[0].size == 0) == (len(set(ts.tolist())) < ts.size)
            found = np.empty(2 * ts.size, np.int64)
            for row in rows.tolist():
                got = sparse._fwd_score(fwd, ts, ws, qmap, found, row)
                d = docs[row]
                assert got == _taat_score(ts, ws, d.indices, d.data), (r, row)
                checked += 1
        # Sorted and canonical: equal to the term-at-a-time kernel's scores.
        qmap = sparse._query_map(q.indices.astype(np.int32), VOCAB)
        found = np.empty(2 * q.nnz, np.int64)
        for s, row in zip(taat_s[0], taat_i[0]):
            if row >= 0:
                assert sparse._fwd_score(fwd, q.indices.astype(np.int32), q.data, qmap, found,
                                         row) == s
    assert checked > 1000
