"""BM25 postings channel: the Numba kernel against a plain-Python BM25 and against tantivy,
statistics summed over segments, masks, blocks, merging, and hostile files."""

from __future__ import annotations

import os

import numpy as np
import pytest

from hybridsearch.errors import IndexFormatError
from hybridsearch.retrievers import bm25_postings as bp
from hybridsearch.retrievers.bm25 import BM25Index
from hybridsearch.retrievers.sparse import _merge_blocks

WORDS = ("alpha beta gamma delta epsilon running runs ran the of cats dog dogs zeta eta theta "
         "iota kappa naïve café 東京大学 ไทยภาษา 한국어 über straße").split()


def _texts(n, seed, max_len=90):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(WORDS) + 1)  # Zipf-like: some terms in most docs, some rare
    p /= p.sum()
    out = []
    for _ in range(n):
        length = int(rng.integers(0, max_len))
        out.append(" ".join(rng.choice(WORDS, length, p=p)))
    return out


QUERIES = ["alpha running", "東京 dog", "cats of the beta beta", "한국", "nothing-here", "café naïve",
           "kappa iota theta", "straße über", "ไทย", "the", ""]


def _same_topk(s_a, i_a, s_b, i_b, rtol=2e-6):
    """Top-k lists agree: scores equal within tolerance, ids equal where scores are untied."""
    np.testing.assert_allclose(s_a, s_b, rtol=rtol, atol=1e-6)
    np.testing.assert_array_equal(i_a >= 0, i_b >= 0)
    for r in range(s_a.shape[0]):
        for j in range(s_a.shape[1]):
            if i_a[r, j] != i_b[r, j]:
                # Allowed only among tied scores: both ids hold the same score in the other list.
                assert abs(s_a[r, j] - s_b[r, j]) <= rtol * abs(s_a[r, j]) + 1e-6


def _ref_topk(docs_terms, queries, k, allowed=None, stats_docs=None):
    s_out = np.zeros((len(queries), k), np.float32)
    i_out = np.full((len(queries), k), -1, np.int64)
    for j, q in enumerate(queries):
        sc = bp.reference_scores(docs_terms, q, df_docs=stats_docs)
        ok = sc > 0
        if allowed is not None:
            ok &= allowed
        ids = np.flatnonzero(ok)
        order = np.lexsort((ids, -sc[ids]))[:k]
        s_out[j, :order.size] = sc[ids[order]]
        i_out[j, :order.size] = ids[order]
    return s_out, i_out


def _merge(parts, firsts, k):
    s = np.concatenate([p[0] for p in parts], axis=1)
    i = np.concatenate([np.where(p[1] >= 0, p[1] + f, -1) for p, f in zip(parts, firsts)], axis=1)
    s = np.where(i >= 0, s, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    s, i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    s[i < 0] = 0
    return s.astype(np.float32), i


def test_fieldnorm_table_is_lucene_small_float():
    t = bp.FIELDNORM_TABLE
    assert t[:24].tolist() == list(range(24)) and t[24:40].tolist() == list(range(24, 40))
    assert t[40:44].tolist() == [40, 42, 44, 46]
    assert (np.diff(t) > 0).all() and t[-1] > 2**31 - 2**28
    lengths = np.array([0, 5, 23, 40, 41, 1000, 2**31 - 1])
    codes = bp.fieldnorm_ids(lengths)
    for n, c in zip(lengths, codes):
        assert t[c] <= n and (c == 255 or t[c + 1] > n)


def test_matches_reference_and_tantivy():
    texts = _texts(1500, 0)
    # Frequencies past the kernel's table (32) and past the impact byte (255).
    texts[3] += " kappa" * 40
    texts[10] += " kappa" * 300 + " beta" * 31
    texts[11] += " iota" * 33
    p = bp.Bm25Postings.from_texts(texts)
    docs_terms = [bp.document_terms(t) for t in texts]
    for k in (1, 10, 100):
        (s, i), = bp.search([p], QUERIES, k)
        rs, ri = _ref_topk(docs_terms, QUERIES, k)
        _same_topk(s, i, rs, ri)
    tan = BM25Index.in_memory()
    tan.add(np.arange(len(texts)), texts)
    tan.commit()
    ts, ti = tan.search(QUERIES, 20)
    (s, i), = bp.search([p], QUERIES, 20)
    _same_topk(s, i, ts, ti)


def test_segments_share_global_statistics_and_masks():
    texts = _texts(2400, 1)
    docs_terms = [bp.document_terms(t) for t in texts]
    cuts = [0, 700, 1900, 2400]
    segs = [bp.Bm25Postings.from_texts(texts[a:b]) for a, b in zip(cuts, cuts[1:])]
    rng = np.random.default_rng(2)
    allowed = rng.random(len(texts)) < 0.3
    for mask in (None, allowed):
        masks = None if mask is None else [mask[a:b] for a, b in zip(cuts, cuts[1:])]
        parts = bp.search(segs, QUERIES, 15, masks)
        s, i = _merge(parts, cuts[:-1], 15)
        # Deleted (masked) documents still count in the statistics: reference over all docs.
        rs, ri = _ref_topk(docs_terms, QUERIES, 15, mask)
        _same_topk(s, i, rs, ri)
        assert mask is None or all(mask[d] for d in i[i >= 0])
    one = bp.Bm25Postings.from_texts(texts)
    (s1, i1), = bp.search([one], QUERIES, 15)
    s, i = _merge(bp.search(segs, QUERIES, 15), cuts[:-1], 15)
    _same_topk(s, i, s1, i1)


def test_blocks_and_threads_on_many_rows():
    # More rows than one accumulator block, sparse and dense regimes, batch of queries.
    rng = np.random.default_rng(3)
    n, vocab = 150_000, 400
    pz = 1.0 / np.arange(1, vocab + 1)
    pz /= pz.sum()
    lens = rng.integers(1, 12, n)
    flat = rng.choice(vocab, int(lens.sum()), p=pz)
    words = [f"w{j}" for j in range(vocab)]
    docs_terms, pos = [], 0
    for ln in lens:
        docs_terms.append([words[j] for j in flat[pos:pos + ln]])
        pos += ln
    p = bp.Bm25Postings.from_terms(docs_terms)
    queries = ["w0 w5", "w399", "w1 w2 w3 w77", "w250 w250 w9"]
    allowed = rng.random(n) < 0.5
    # A vectorised reference: per query term, tf per row from the postings' own input.
    tf = {}
    for r, d in enumerate(docs_terms):
        for t in d:
            tf.setdefault(t, {}).setdefault(r, 0)
            tf[t][r] += 1
    total = int(lens.sum())
    norm = bp.K1 * (1 - bp.B + bp.B * bp.FIELDNORM_TABLE[bp.fieldnorm_ids(lens)] / (total / n))
    for mask in (None, allowed):
        (s, i), = bp.search([p], queries, 50, None if mask is None else [mask])
        (s0, i0), = bp.search([p], queries, 50, None if mask is None else [mask], prune=False)
        np.testing.assert_array_equal(s, s0)
        np.testing.assert_array_equal(i, i0)
        for j, q in enumerate(queries):
            sc = np.zeros(n)
            for t in q.split():
                rows = np.array(list(tf[t]))
                f = np.array([tf[t][r] for r in rows], float)
                df = len(rows)
                idf = np.log(1 + (n - df + 0.5) / (df + 0.5))
                sc[rows] += idf * (1 + bp.K1) * f / (f + norm[rows])
            ok = sc > 0 if mask is None else (sc > 0) & mask
            ids = np.flatnonzero(ok)
            order = np.lexsort((ids, -sc[ids]))[:50]
            _same_topk(s[j:j + 1], i[j:j + 1], sc[ids[order]][None].astype(np.float32),
                       ids[order][None])


def test_parallel_chunks_and_parts_match_one_chunk():
    texts = _texts(3000, 7)
    p = bp.Bm25Postings.from_texts(texts)
    terms, per_query = bp._analyze(QUERIES)
    (ids,), weight, avg = bp._statistics([p], terms)
    cache, table = bp._tables(avg)
    q_indptr, q_idx, q_w = [0], [], []
    for entries in per_query:
        for ti, c in entries:
            if ids[ti] >= 0:
                q_idx.append(ids[ti])
                q_w.append(weight[ti] * c)
        q_indptr.append(len(q_idx))
    q_ub = np.full(len(q_idx), 1e30)  # loose bounds: never prunes, still exact
    outs = []
    for prune, n_parts, chunks in ((False, 1, 1), (True, 1, 4), (False, 2, 3), (True, 3, 2)):
        args = (p.indptr, p.docs, p.impact, p.tf, cache, table, np.array(q_indptr, np.int64),
                np.array(q_idx, np.int32), np.array(q_w, np.float32), q_ub, np.zeros(0, bool),
                False, prune, p.n_docs, 1024, n_parts)  # 1024-row blocks: 3 per query
        n_items = len(QUERIES) * n_parts
        s = np.zeros((n_items, 10), np.float32)
        i = np.full((n_items, 10), -1, np.int64)
        acc = np.zeros((chunks, 1024), np.float32)
        scratch = (acc, np.zeros((chunks, 1024), np.int32), np.zeros((chunks, 1024), np.int32))
        if chunks == 1:
            bp._bm25_items(*args, 0, n_items, s, i, *(a[0] for a in scratch))
        else:
            bp._bm25_parallel(*args, chunks, s, i, *scratch)
        assert not acc.any()
        if n_parts > 1:
            s2 = np.zeros((len(QUERIES), 10), np.float32)
            i2 = np.full((len(QUERIES), 10), -1, np.int64)
            _merge_blocks(s, i, n_parts, s2, i2)
            s, i = s2, i2
        outs.append((s, i))
    for s, i in outs[1:]:
        np.testing.assert_array_equal(outs[0][0], s)
        np.testing.assert_array_equal(outs[0][1], i)


def test_pruning_gives_the_same_hits():
    # Zipf words: queries mixing rare and very common terms, where MaxScore skips most postings.
    rng = np.random.default_rng(8)
    n, vocab = 40_000, 3000
    words = rng.zipf(1.1, (n, 30)) % vocab
    docs_terms = [[f"w{w}" for w in row[: rng.integers(5, 30)]] for row in words]
    p = bp.Bm25Postings.from_terms(docs_terms)
    qw = rng.zipf(1.1, (60, 6)) % vocab
    queries = [" ".join(f"w{w}" for w in row) for row in qw]
    allowed = rng.random(n) < 0.7
    for k in (1, 10, 50):
        for mask in (None, [allowed]):
            (s0, i0), = bp.search([p], queries, k, mask, prune=False)
            (s1, i1), = bp.search([p], queries, k, mask, prune=True)
            np.testing.assert_array_equal(s0, s1)
            np.testing.assert_array_equal(i0, i1)


def test_save_load_and_merge(tmp_path):
    texts = _texts(900, 4)
    a, b = bp.Bm25Postings.from_texts(texts[:500]), bp.Bm25Postings.from_texts(texts[500:])
    for name, p in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        assert p.save(tmp_path / name) == list(bp.FILES)
    a2 = bp.Bm25Postings.load(tmp_path / "a", n_docs=500)
    b2 = bp.Bm25Postings.load(tmp_path / "b", mmap=False)
    for x, y in ((a, a2), (b, b2)):
        for attr in ("term_hash", "term_blob", "term_offsets", "indptr", "docs", "tf", "impact",
                     "lengths", "term_bound"):
            np.testing.assert_array_equal(getattr(x, attr), getattr(y, attr))
    rng = np.random.default_rng(5)
    keep_a = np.flatnonzero(rng.random(500) < 0.6)
    keep_b = np.flatnonzero(rng.random(400) < 0.6)
    (tmp_path / "m").mkdir()
    bp.merge_bm25(tmp_path / "m", [(a2, keep_a), (b2, keep_b)])
    m = bp.Bm25Postings.load(tmp_path / "m")
    kept = [texts[r] for r in keep_a] + [texts[500 + r] for r in keep_b]
    want = bp.Bm25Postings.from_texts(kept)
    for attr in ("term_hash", "term_blob", "term_offsets", "indptr", "docs", "tf", "impact",
                 "lengths", "term_bound"):
        np.testing.assert_array_equal(getattr(m, attr), getattr(want, attr), err_msg=attr)


def test_hash_collisions_are_resolved_by_bytes(monkeypatch, tmp_path):
    real = bp._hash_terms

    def colliding(terms):  # every term gets the same hash
        h, blob, off = real(terms)
        return np.full_like(h, 12345), blob, off

    monkeypatch.setattr(bp, "_hash_terms", colliding)
    docs = [["x", "y"], ["y", "z", "z"], ["w"]]
    p = bp.Bm25Postings.from_terms(docs)
    assert (p.term_hash == 12345).all()
    ids, df = p.find(bp._QueryTerms(["x", "y", "z", "w", "v"]))
    assert ids[4] == -1
    got = [p.term_blob[p.term_offsets[i]:p.term_offsets[i + 1]].tobytes() for i in ids[:4]]
    assert got == [b"x", b"y", b"z", b"w"]
    assert df.tolist() == [1, 2, 1, 1, 0]
    (tmp_path / "a").mkdir()
    p.save(tmp_path / "a")
    (tmp_path / "m").mkdir()
    bp.merge_bm25(tmp_path / "m", [(bp.Bm25Postings.load(tmp_path / "a"), np.array([1, 2]))])
    m = bp.Bm25Postings.load(tmp_path / "m")
    assert m.find(bp._QueryTerms(["x", "y", "z", "w"]))[1].tolist() == [0, 1, 1, 1]


def test_empty_segment_and_queries(tmp_path):
    p = bp.Bm25Postings.from_texts([])
    p.save(tmp_path)
    e = bp.Bm25Postings.load(tmp_path)
    (s, i), = bp.search([e], ["alpha"], 3)
    assert (i == -1).all()
    q = bp.Bm25Postings.from_texts(["", "the of"])  # only stopwords: no terms
    (s, i), = bp.search([q, e], ["the"], 2)[:1]
    assert (i == -1).all()
    with pytest.raises(TypeError):
        bp.search([q], "alpha", 2)
    with pytest.raises(ValueError):
        bp.search([q], ["alpha"], 0)


def _saved(tmp_path):
    p = bp.Bm25Postings.from_texts(_texts(300, 6))
    p.save(tmp_path)
    return p


@pytest.mark.parametrize("name,value", [
    ("bm25_tf.npy", "zero_tf"),
    ("bm25_impact.npy", "inconsistent"),
    ("bm25_docs.npy", "out_of_range"),
    ("bm25_docs.npy", "unsorted"),
    ("bm25_indptr.npy", "decreasing"),
    ("bm25_term_offsets.npy", "past_blob"),
    ("bm25_term_hash.npy", "unsorted"),
    ("bm25_lengths.npy", "negative"),
    ("bm25_tf.npy", "wrong_dtype"),
    ("bm25_term_bound.npy", "wrong_shape"),
    ("bm25_term_bound.npy", "understated"),
    ("bm25_terms.bin", "missing"),
])
def test_hostile_files_raise_index_format_error(tmp_path, name, value):
    p = _saved(tmp_path)
    path = tmp_path / name
    if value == "missing":
        path.unlink()
    elif value == "zero_tf":
        a = np.array(p.tf)
        a[7] = 0
        np.save(path, a)
    elif value == "inconsistent":
        a = np.array(p.impact)
        a[5] ^= 1
        np.save(path, a)
    elif value == "out_of_range":
        a = np.array(p.docs)
        a[-1] = p.n_docs
        np.save(path, a)
    elif value == "unsorted":
        a = np.array(p.docs if name == "bm25_docs.npy" else p.term_hash)
        j = int(np.argmax(np.diff(p.indptr) > 2)) if name == "bm25_docs.npy" else 0
        lo = int(p.indptr[j]) if name == "bm25_docs.npy" else 0
        a[lo], a[lo + 1] = a[lo + 1], a[lo]
        np.save(path, a)
    elif value == "decreasing":
        a = np.array(p.indptr)
        a[3] = a[4] + 1
        np.save(path, a)
    elif value == "past_blob":
        a = np.array(p.term_offsets)
        a[-1] += 5
        np.save(path, a)
    elif value == "negative":
        a = np.array(p.lengths)
        a[0] = -1
        np.save(path, a)
    elif value == "wrong_dtype":
        np.save(path, np.array(p.tf).astype(np.int64))
    elif value == "wrong_shape":
        np.save(path, np.array(p.term_bound)[:-1])
    elif value == "understated":  # a smaller largest tf: pruning would skip true hits
        a = np.array(p.term_bound)
        j = int(np.argmax(a[:, 0] > 1))
        a[j, 0] -= 1
        np.save(path, a)
    with pytest.raises(IndexFormatError, match=name.replace(".", r"\.")):
        bp.Bm25Postings.load(tmp_path)


def test_link_is_refused(tmp_path):
    _saved(tmp_path)
    os.rename(tmp_path / "bm25_tf.npy", tmp_path / "real.npy")
    os.symlink(tmp_path / "real.npy", tmp_path / "bm25_tf.npy")
    with pytest.raises(IndexFormatError):
        bp.Bm25Postings.load(tmp_path)


def test_query_preparation_kernels_match_numpy():
    """The Numba helpers that build a segment's kernel input agree with plain numpy."""
    rng = np.random.default_rng(7)
    vocab = [f"t{i}" for i in range(300)]
    docs = [list(rng.choice(vocab, size=rng.integers(1, 40))) for _ in range(2000)]
    p = bp.Bm25Postings.from_terms(docs)
    # upper bounds and posting counts
    q_idx = rng.integers(0, p.vocab_size, 500).astype(np.int32)
    q_w = rng.random(500).astype(np.float32) + 0.1
    cache, _ = bp._tables(np.float32(17.3))
    tb = p.term_bound[q_idx]
    tf = tb[:, 0].astype(np.float64)
    want = q_w * tf / (tf + cache[bp.fieldnorm_ids(tb[:, 1])])
    got = np.empty(500)
    postings = bp._entry_bounds(p.indptr, p.term_bound, cache, bp.FIELDNORM_TABLE, q_idx, q_w, got)
    np.testing.assert_array_equal(got, want)
    assert postings == int((p.indptr[q_idx + 1] - p.indptr[q_idx]).sum())
    # entries kept for one segment: term present and weight > 0, order preserved
    nq = 40
    e_q = np.sort(rng.integers(0, nq, 900)).astype(np.int64)
    e_t = rng.integers(0, 120, 900).astype(np.int64)
    e_w = (rng.random(900) - 0.2).astype(np.float32)
    local = np.where(rng.random(120) < 0.7, rng.integers(0, p.vocab_size, 120), -1).astype(np.int64)
    q_indptr, q_i, q_ww = bp._segment_entries(e_q, e_t, e_w, local, nq)
    loc = local[e_t]
    keep = (loc >= 0) & (e_w > 0)
    np.testing.assert_array_equal(q_i, loc[keep].astype(np.int32))
    np.testing.assert_array_equal(q_ww, e_w[keep])
    np.testing.assert_array_equal(q_indptr, np.concatenate([[0], np.cumsum(np.bincount(e_q[keep], minlength=nq))]))
