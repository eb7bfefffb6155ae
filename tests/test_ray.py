"""hybridsearch.distributed on a real Ray cluster: a head and 2 worker nodes on 127.0.0.1
(ray.cluster_utils.Cluster, never `ray start`). Marked `ray`: deselected by default,
`python -m pytest -m ray` runs exactly these."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")

WORDS = ("the quick brown fox jumps over lazy dog dense retrieval uses single vector per text sparse "
         "scores shared tokens with learned weights colbert compares every query token passage bm25 "
         "classic lexical ranking function information hybrid search fuses several channels into one "
         "vectors stored faiss matrices memory mapped zorro salta perro renard chien fuchs hund").split()
QUERIES = ["quick brown fox", "sparse learned weights retrieval", "colbert token passage",
           "the the dog", "hybrid ranking of channels", "faiss memory vectors"]
MODES = ("hybrid", "dense", "sparse", "colbert", "bm25")


def _docs(n, seed=0, prefix="d"):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS[:12]) if rng.random() < 0.4 else rng.choice(WORDS) for _ in range(rng.randint(3, 18))]
        out.append({"id": f"{prefix}{i}", "text": " ".join(words), "metadata": {"year": 2000 + i % 7, "odd": bool(i % 2)}})
    return out


@pytest.fixture(scope="module")
def cluster():
    from hybridsearch.distributed.cluster import local_cluster

    with local_cluster(nodes=3, cpus_per_node=1) as c:
        yield c


def _assert_same(a, b, what, deeper=None):
    """Same scores in the same order, and the same ids; where scores tie, any of the tied
    documents (``deeper``: the single index's longer list, id -> its score) may stand."""
    np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-4, atol=1e-5, err_msg=what)
    if deeper is None:
        assert [h.id for h in a] == [h.id for h in b], what
    else:
        for x, y in zip(a, b):
            if x.id != y.id:  # a tie broken the other way: x must be there, with the same score
                assert x.id in deeper and abs(deeper[x.id] - x.score) <= 1e-5 + 1e-4 * abs(x.score), what
                assert abs(x.score - y.score) <= 1e-5 + 1e-4 * abs(y.score), what
        assert len({h.id for h in a}) == len(a), what
    for x, y in zip(a, b):
        if x.id == y.id:
            _assert_same_channels(x, y, what)


def _assert_same_channels(x, y, what, contributions=True):
    assert x.scores.keys() == y.scores.keys(), what
    assert (x.contributions is None) == (y.contributions is None), what
    if x.contributions is not None and contributions:  # each channel's term of the fused score
        assert x.contributions.keys() == y.contributions.keys(), what
        for c, v in x.contributions.items():
            assert abs(v - y.contributions[c]) <= 1e-5 + 1e-4 * abs(v), (what, c)
    for c in x.scores:
        assert (x.scores[c] is None) == (y.scores[c] is None), (what, c)
        if x.scores[c] is not None:
            assert abs(x.scores[c] - y.scores[c]) <= 1e-4 + 1e-4 * abs(y.scores[c]), (what, c)


def test_nothing_listens_beyond_loopback(cluster):
    """Every socket a Ray process listens on is bound to 127.0.0.1 (ss lists them)."""
    ss = subprocess.run(["ss", "-Hltunp"], capture_output=True, text=True)
    if ss.returncode != 0:
        pytest.skip("ss is not available")
    mine = [line for line in ss.stdout.splitlines()
            if any(name in line for name in ('"ray::', '"raylet"', '"gcs_server"'))]
    assert mine, "no Ray sockets found"
    for line in mine:
        host = line.split()[4].rsplit(":", 1)[0].strip("[]")
        assert host in ("127.0.0.1", "::ffff:127.0.0.1"), line
    assert cluster.head_node.node_ip_address == "127.0.0.1"
    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}
    assert sum(1 for n in ray.nodes() if n["Alive"]) == 3


def _make_pair(enc, root, codec):
    """The same documents, writes and deletions in one HybridIndex and a 3-shard ShardedIndex.
    With a residual codec, the sharded index trains its codebook in the second commit (the
    tokens of the first are below codec_train_tokens, the first two above); the single index is
    given that codebook at the same point, so the same documents are float16 or coded in both."""
    from hybridsearch import HybridIndex
    from hybridsearch.distributed import ShardedIndex

    docs = _docs(400)
    batches = [docs[lo:lo + 150] for lo in range(0, 400, 150)]
    encs = [enc.encode_arrays([d["text"] for d in b], kind="passage", sparse=True, colbert=True) for b in batches]
    threshold = int(encs[0].n_tokens.sum()) + 50
    one = HybridIndex.create(root / "one", enc, merge_policy=None, colbert_codec=codec, train_codebook=False)
    many = ShardedIndex.create(root / "sharded", enc, shards=3, merge_policy=None, timeout=300,
                               colbert_codec=codec, codec_train_tokens=threshold)
    for i, (batch, e) in enumerate(zip(batches, encs)):  # three commits; encoded once, the same arrays to both
        many.add(batch, encoded=e)
        if i == 1 and codec != "fp16":
            assert many.codebook is not None
            one.install_codebook(many.codebook)
        elif i == 0:
            assert many.codebook is None
        one.add(batch, encoded=e)
    changed = [{"id": f"d{i}", "text": "quick quick brown fox " + docs[i]["text"], "metadata": {"year": 1999}}
               for i in range(0, 60, 6)]
    e = enc.encode_arrays([d["text"] for d in changed], kind="passage", sparse=True, colbert=True)
    one.upsert(changed, encoded=e)
    many.upsert(changed, encoded=e)
    gone = [f"d{i}" for i in range(3, 400, 11)]
    one.delete(gone)
    many.delete(gone)
    return one, many, gone


@pytest.fixture(scope="module")
def pair(cluster, tiny_m3, tmp_path_factory):
    """The default codec (res1): one codebook shared by the shards."""
    from hybridsearch import BGEM3Encoder

    one, many, gone = _make_pair(BGEM3Encoder(tiny_m3, device="cpu"), tmp_path_factory.mktemp("pair"), "res1")
    kinds = sorted({s.colbert_kind for s in one._current().segments})
    assert kinds == ["codes", "fp16"], kinds  # both kinds of segment are compared
    yield one, many, gone
    many.close()
    one.close()


@pytest.fixture(scope="module")
def pair16(cluster, tiny_m3, tmp_path_factory):
    """ColBERT stored as float16 (no codebook)."""
    from hybridsearch import BGEM3Encoder

    one, many, gone = _make_pair(BGEM3Encoder(tiny_m3, device="cpu"), tmp_path_factory.mktemp("pair16"), "fp16")
    yield one, many, gone
    many.close()
    one.close()


def test_layout_and_routing(pair):
    one, many, gone = pair
    assert len(many) == len(one) == 400 - len(gone)
    st = many.stats()
    assert st["shards"] == 3 and st["documents"] == len(one)
    counts = [s["documents"] for s in st["per_shard"]]
    assert min(counts) > 60, counts  # the hash spreads the ids
    assert sorted(os.listdir(many.path)) == ["LOCK", "codebook-000001", "shard-00", "shard-01", "shard-02",
                                             "sharding.json"]
    ident = many.codebook.identity
    assert json.loads((many.path / "sharding.json").read_text())["colbert_codec"]["identity"] == ident
    assert {i for i, _ in many._each_replica("codec_info").values()} == {ident}  # every shard codes with it
    from hybridsearch import HybridIndex
    from hybridsearch.distributed.sharded import shard_of

    ids = [f"d{i}" for i in range(400) if f"d{i}" not in set(gone)]
    route = shard_of(ids, 3)
    for s in range(3):  # every document is in the shard its id hashes to, and only there
        with HybridIndex.open(many.path / f"shard-{s:02d}", one.encoder) as idx:
            assert sorted(idx.ids()) == sorted(i for i, r in zip(ids, route) if r == s)
    assert many.contains(["d0", "d3", "nope"]) == [True, False, False]


@pytest.mark.parametrize("codec", ["res1", "fp16"])
@pytest.mark.parametrize("mode", MODES)
def test_three_shards_answer_as_one_index(request, mode, codec):
    """Same top-10 ids and scores as one index over the same documents, in every mode, with
    and without filters, after upserts and deletions; BM25 scored with global statistics; with
    the default codec (res1: one codebook for every shard) and with float16 ColBERT."""
    one, many, _ = request.getfixturevalue("pair" if codec == "res1" else "pair16")
    for flt in (None, {"year": {"gte": 2003}}, {"odd": True}):
        got = many.search_batch(QUERIES, k=10, mode=mode, filter=flt, candidates=20)
        want = one.search_batch(QUERIES, k=10, mode=mode, filter=flt, candidates=20)
        for q, g, w in zip(QUERIES, got, want):
            assert not g.partial
            assert len(w) == 10 or flt
            deeper = None
            if mode == "bm25":  # BM25 scores tie often (same tf and length); one index breaks ties by docno
                deeper = {h.id: h.score for h in one.search(q, k=40, mode=mode, filter=flt, candidates=40)}
            _assert_same(g, w, f"{mode} {flt} {q!r}", deeper)
    if mode == "hybrid":  # other fusions too, and BM25 weighted in
        # Rank-based and normalised fusions depend on the whole union. A tie at a channel's C-th
        # candidate is broken by docno in one index and by (shard, docno) across shards, so the
        # union (and these fusions) may differ there: only queries without such a tie compare.
        clean = [q for q in QUERIES if not _bm25_tie_at(one, q, 15)]
        assert len(clean) >= 3, clean
        for kw in ({"weights": {"bm25": 0.3}}, {"normalize": ["dense", "sparse", "colbert", "bm25"]}):
            for q, g, w in zip(clean, many.search_batch(clean, k=10, candidates=15, **kw),
                               one.search_batch(clean, k=10, candidates=15, **kw)):
                _assert_same(g, w, f"{kw} {q!r}")
        # RRF ranks tied channel scores (a sparse score of 0 is common) by their position in the
        # union, which differs across shards: the same channel scores, near-identical lists.
        for q, g, w in zip(clean, many.search_batch(clean, k=10, candidates=15, fusion="rrf"),
                           one.search_batch(clean, k=10, candidates=15, fusion="rrf")):
            by_id = {h.id: h for h in w}
            assert len(set(by_id) & {h.id for h in g}) >= 8, q
            for h in g:
                if h.id in by_id:
                    _assert_same_channels(h, by_id[h.id], q, contributions=False)  # RRF terms follow the ranks
                    assert abs(h.score - by_id[h.id].score) < 3e-4


def _bm25_tie_at(index, q, C):
    hits = index.search(q, k=C + 1, mode="bm25")
    return len(hits) > C and abs(hits[C - 1].score - hits[C].score) <= 1e-6


def test_bm25_needs_global_statistics(pair):
    """The per-shard statistics would give other scores: the global ones are what make it exact."""
    one, many, _ = pair
    from hybridsearch.index.hybrid import HybridIndex

    want = one.search("quick brown fox", k=10, mode="bm25")
    with HybridIndex.open(many.path / "shard-00", one.encoder) as shard:
        local = shard.search("quick brown fox", k=10, mode="bm25")
    g = {h.id: h.score for h in want}
    assert any(abs(g[h.id] - h.score) > 1e-3 for h in local if h.id in g)


def test_search_surface_and_errors(pair):
    one, many, _ = pair
    with pytest.raises(TypeError, match="search_batch"):
        many.search(["a", "b"])
    with pytest.raises(ValueError, match="unknown mode"):
        many.search("fox", mode="nope")
    with pytest.raises(ValueError):  # a bad filter is the shard's ValueError, not a Ray wrapper
        many.search("fox", filter={"year": {"between": 1}})
    with pytest.raises(KeyError):
        many.delete(["d1", "missing-id"])
    assert "d1" in many
    with pytest.raises(ValueError, match="already in the index"):
        many.add([{"id": "d1", "text": "x"}])
    assert many.channels == one.channels
    st = many.stats()
    assert st["generation"] == sum(st["generations"]) and len(st["generations"]) == 3


def test_rerank_on_the_global_top(pair, tmp_path):
    from hybridsearch import Reranker
    from hybridsearch.testing import make_tiny_reranker

    one, many, _ = pair
    rr = Reranker(make_tiny_reranker(tmp_path / "rr"), device="cpu")
    for w in (1.0, 0.5):
        got = many.search("quick brown fox", k=5, reranker=rr, rerank_top=20, rerank_weight=w, candidates=20)
        want = one.search("quick brown fox", k=5, reranker=rr, rerank_top=20, rerank_weight=w, candidates=20)
        assert [h.id for h in got] == [h.id for h in want]
        np.testing.assert_allclose([h.rerank_score for h in got], [h.rerank_score for h in want], rtol=1e-5)


def _kill(pid):
    os.kill(pid, signal.SIGKILL)


def test_killed_shard_restarts_partial_or_wait(cluster, tiny_m3, tmp_path):
    """A shard actor killed by SIGKILL: a query either returns a result marked partial naming
    it (partial=True) or waits for Ray to restart it; the restarted actor reopens its folder at
    the last commit, and no acknowledged write is lost."""
    from hybridsearch.distributed import ShardedIndex, ShardUnavailableError

    idx = ShardedIndex.create(tmp_path / "s", tiny_m3, shards=3, timeout=300, codec_train_tokens=200)
    try:
        docs = _docs(90, seed=3)
        idx.add(docs)
        ident = idx.codebook.identity  # trained in the first write
        full = idx.search("quick brown fox", k=10)
        pids = idx.shard_pids()
        _kill(pids[1][0])
        # the restart takes seconds (a process, torch, the model, the index); the others answer
        part = idx.search("quick brown fox", k=10, timeout=2.0, partial=True)
        assert part.partial and 1 in part.missing
        from hybridsearch.distributed.sharded import shard_of

        lost = set(part.missing)
        assert all(shard_of([h.id], 3)[0] not in lost for h in part)
        kept = [h.id for h in full if shard_of([h.id], 3)[0] not in lost]
        assert [h.id for h in part][:len(kept)] == kept  # then the live shards' next documents
        waited = idx.search("quick brown fox", k=10)  # waits (up to the index's 300 s) for the restart
        assert not waited.partial
        _assert_same(waited, full, "after restart")
        assert idx.shard_pids()[1][0] != pids[1][0]
        assert {i for i, _ in idx._each_replica("codec_info").values()} == {ident}  # the restarted one too
        # kill again and ask without partial and a short timeout: a clear error naming the shard
        _kill(idx.shard_pids()[0][0])
        with pytest.raises(ShardUnavailableError, match=r"shard\(s\) \[0") as err:
            idx.search("quick brown fox", k=10, timeout=0.2)
        assert 0 in err.value.missing
        # writes while shards die: every acknowledged write is there afterwards
        acked = []
        stop = threading.Event()

        def killer():  # two SIGKILLs at random moments of the writes (a restart takes seconds)
            rng = random.Random(5)
            for _ in range(2):
                if stop.wait(rng.uniform(0.2, 1.5)):
                    return
                try:
                    _kill(rng.choice([p[0] for p in idx.shard_pids()]))
                except ProcessLookupError:
                    pass

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        try:
            for b in range(4):
                batch = _docs(15, seed=100 + b, prefix=f"w{b}-")
                idx.upsert(batch)
                acked += [d["id"] for d in batch]
        finally:
            stop.set()
            t.join()
        assert all(idx.contains(docs_ids := [d["id"] for d in docs] + acked))
        assert len(idx) == len(docs_ids)
        assert {i for i, _ in idx._each_replica("codec_info").values()} == {ident}
    finally:
        idx.close()


def test_replicas_serve_reads_while_one_is_down(cluster, tiny_m3, tmp_path):
    from hybridsearch.distributed import ShardedIndex

    idx = ShardedIndex.create(tmp_path / "r", tiny_m3, shards=2, replicas=2, timeout=300)
    try:
        idx.add(_docs(60, seed=7))
        assert sorted(os.listdir(idx.path)) == ["LOCK", "shard-00", "shard-00-r1", "shard-01", "shard-01-r1",
                                                "sharding.json"]
        full = idx.search("brown dog", k=8)
        for s in range(2):  # writes reached every copy
            st = idx._each_replica("count")
            assert st[(s, 0)] == st[(s, 1)]
        pids = idx.shard_pids()
        _kill(pids[0][0])
        _kill(pids[1][1])
        for _ in range(4):  # reads go to the live copy: complete, no wait
            got = idx.search("brown dog", k=8, timeout=5, partial=True)
            assert not got.partial
            _assert_same(got, full, "replica")
        idx.delete(["d1", "d2"])  # writes wait for every copy
        counts = idx._each_replica("count")
        assert len(set(counts.values())) == 2 and sum(counts.values()) == 2 * 58
    finally:
        idx.close()


def test_reopen_at_last_commit(cluster, tiny_m3, tmp_path):
    from hybridsearch.distributed import ShardedIndex

    idx = ShardedIndex.create(tmp_path / "o", tiny_m3, shards=2, codec_train_tokens=150)
    idx.add(_docs(40, seed=9))
    ident = idx.codebook.identity
    want = idx.search("lazy dog", k=5)
    _check_round_trips(idx, tiny_m3)
    idx.close()
    again = ShardedIndex.open(tmp_path / "o")
    try:
        assert len(again) == 40 and again.codebook.identity == ident
        _assert_same(again.search("lazy dog", k=5), want, "reopen")
    finally:
        again.close()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "sharding.json").write_text(json.dumps({"format": "x"}))
    from hybridsearch.errors import IndexFormatError

    with pytest.raises(IndexFormatError):
        ShardedIndex.open(tmp_path / "bad")


def _check_round_trips(idx, model):
    """The fan-outs a query makes: BM25 statistics only for a term not seen at the shards'
    current generations; documents only when the candidates replies lacked one. A write (here
    or by another process) makes the cached statistics stale: detected, and asked again."""
    from hybridsearch import HybridIndex
    from hybridsearch.distributed.sharded import shard_of

    calls = []
    real = idx._fanout

    def spy(method, *a, **kw):
        calls.append(method)
        return real(method, *a, **kw)

    idx._fanout = spy

    def rounds(*a, **kw):
        calls.clear()
        hits = idx.search(*a, **kw)
        return list(calls), hits

    def fresh(*a, **kw):  # the same query without the cache
        idx._stats_cache.clear()
        return idx.search(*a, **kw)

    try:
        idx._stats_cache.clear()
        assert rounds("lazy dog zorro", k=5, mode="bm25")[0] == ["bm25_stats", "candidates"]
        assert rounds("lazy dog zorro", k=5, mode="bm25")[0] == ["candidates"]
        assert rounds("zorro dog", k=5)[0] == ["candidates"]  # hybrid, terms known: one round
        assert rounds("fox", k=5)[0] == ["bm25_stats", "candidates"]
        assert rounds("fox", k=5, mode="dense")[0] == ["candidates"]
        order, _ = rounds("fox", k=5, normalize=["dense", "sparse", "colbert", "bm25"])  # global min-max:
        assert order[0] == "candidates" and set(order) <= {"candidates", "docs"}  # documents may be missing
        # a write through this coordinator, then one by another process into a shard's folder
        idx.upsert([{"id": "x-lazy", "text": "lazy lazy dog zorro"}])
        order, got = rounds("lazy dog zorro", k=5, mode="bm25")
        assert order == ["candidates", "bm25_stats", "candidates"] and got[0].id == "x-lazy"
        _assert_same(got, fresh("lazy dog zorro", k=5, mode="bm25"), "after a write")
        other = next(f"y{i}" for i in range(100) if shard_of([f"y{i}"], idx.n_shards)[0] == 0)
        with HybridIndex.open(idx.path / "shard-00", model) as shard:
            shard.add([{"id": other, "text": "zorro zorro zorro dog lazy"}])
        order, got = rounds("lazy dog zorro", k=5, mode="bm25")
        assert order == ["candidates", "bm25_stats", "candidates"] and got[0].id == other
        _assert_same(got, fresh("lazy dog zorro", k=5, mode="bm25"), "after another process wrote")
        for mode in ("hybrid", "bm25"):
            got = idx.search("lazy dog", k=5, mode=mode)
            _assert_same(got, fresh("lazy dog", k=5, mode=mode), mode)
        idx.delete(["x-lazy", other])
    finally:
        idx._fanout = real


def test_codebook_install_completed_on_open_and_hostile_layouts(cluster, tiny_m3, tmp_path):
    """A coordinator that died after naming the codebook in sharding.json but before installing
    it on every replica: open() installs it. A layout naming a codebook that is not there, not
    the one named (identity) or outside the folder, or shards coded with another: clear errors."""
    import shutil

    from hybridsearch import HybridIndex
    from hybridsearch.distributed import ShardedIndex
    from hybridsearch.errors import IndexFormatError
    from hybridsearch.retrievers.colbert_codec import ColbertCodec

    root = tmp_path / "c"
    idx = ShardedIndex.create(root, tiny_m3, shards=2, codec_train_tokens=10 ** 9)
    idx.add(_docs(40, seed=12))
    want = idx.search("lazy dog", k=5)
    dim = idx.encoder.spec.colbert_dim
    idx.close()
    assert idx.codebook is None and not any(p.name.startswith("codebook-") for p in root.iterdir())
    # what the coordinator does up to its death: the codebook saved and named, installed on one shard only
    codec = ColbertCodec.train(np.random.default_rng(1).standard_normal((800, dim)).astype(np.float32), nbits=1, k=8)
    codec.save(root / "codebook-000001")
    layout = json.loads((root / "sharding.json").read_text())
    layout["colbert_codec"].update(codebook="codebook-000001", identity=codec.identity)
    (root / "sharding.json").write_text(json.dumps(layout))
    with HybridIndex.open(root / "shard-01", tiny_m3) as one_copy:
        one_copy.install_codebook(codec)
    again = ShardedIndex.open(root)
    try:
        assert again.codebook.identity == codec.identity
        assert {i for i, _ in again._each_replica("codec_info").values()} == {codec.identity}
        _assert_same(again.search("lazy dog", k=5), want, "float16 segments stay float16")
        again.add(_docs(10, seed=13, prefix="n"))  # coded with it
        with HybridIndex.open(root / "shard-00", tiny_m3) as copy:
            assert "codes" in {s.colbert_kind for s in copy._current().segments}
    finally:
        again.close()
    good = (root / "sharding.json").read_text()

    def bad_layout(change, match):
        layout = json.loads(good)
        change(layout)
        (root / "sharding.json").write_text(json.dumps(layout))
        with pytest.raises(IndexFormatError, match=match):
            ShardedIndex.open(root, timeout=60)

    bad_layout(lambda m: m["colbert_codec"].update(codebook="../shard-00"), "colbert_codec")
    bad_layout(lambda m: m["colbert_codec"].update(identity="0" * 64), "not the codebook")
    bad_layout(lambda m: m["colbert_codec"].update(identity=None), "colbert_codec")
    bad_layout(lambda m: m["colbert_codec"].update(train_tokens=True), "colbert_codec")
    bad_layout(lambda m: m.update(colbert_codec="res1"), "colbert_codec")
    bad_layout(lambda m: m["colbert_codec"].update(codebook="codebook-000002"), "not a folder")
    (root / "sharding.json").write_text(good)
    shutil.rmtree(root / "codebook-000001")
    (root / "codebook-000001").mkdir()  # an empty (or tampered) codebook folder
    with pytest.raises(IndexFormatError, match="codec"):
        ShardedIndex.open(root, timeout=60)
    # a layout that names no codebook while the shards code with one
    layout = json.loads(good)
    layout["colbert_codec"].update(codebook=None, identity=None)
    (root / "sharding.json").write_text(json.dumps(layout))
    with pytest.raises(IndexFormatError, match="another codebook"):
        ShardedIndex.open(root, timeout=60)


# ---------------------------------------------------------------------------- encoding


def _write_corpus(path, n, seed=11):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40)))
            f.write(json.dumps({"id": f"doc{i}", "title": rng.choice(WORDS), "text": text,
                                "metadata": {"n": i}}) + "\n")


def _manifest(folder):
    m = json.loads((folder / "manifest.json").read_text())
    return m


def test_ray_index_equals_single_process_despite_a_killed_encoder(cluster, tiny_m3, tmp_path, capsys):
    """`hybridsearch index --ray` writes the index the single-process command writes: the same
    segments file for file (sha256 of every array), commit for commit, although an encoder
    actor is killed (SIGKILL) mid-run; a rerun finds everything unchanged (resume rules)."""
    import torch

    from hybridsearch.cli import main

    torch.set_num_threads(1)  # the actors run one thread each: the same kernels, the same sums
    corpus = tmp_path / "corpus.jsonl"
    _write_corpus(corpus, 80)
    common = ["--model", str(tiny_m3), "--commit-every", "10", "--device", "cpu", "-q", "--chunk-tokens", "24",
              "--overlap", "4"]
    assert main(["index", str(corpus), "--index", str(tmp_path / "one"), *common]) == 0
    killed = []

    def killer():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            m = tmp_path / "ray" / "manifest.json"
            # three blocks in flight (window 3): once the first is committed, the pool is at work
            # on the next ones (in order, so the driver waits for the one it needs next)
            if m.exists() and json.loads(m.read_text())["generation"] >= 1:
                pids = subprocess.run(["pgrep", "-f", "ray::_EncodeBlocks"], capture_output=True,
                                      text=True).stdout.split()
                if pids:
                    os.kill(int(pids[0]), signal.SIGKILL)
                    killed.append(int(pids[0]))
                    return
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    capsys.readouterr()
    assert main(["index", str(corpus), "--index", str(tmp_path / "ray"), *common, "--ray", "auto",
                 "--ray-actors", "2", "--ray-window", "3"]) == 0
    t.join()
    assert killed, "no encoder actor was killed mid-run"
    a, b = _manifest(tmp_path / "one"), _manifest(tmp_path / "ray")
    assert a["generation"] == b["generation"] and a["next_docno"] == b["next_docno"]
    assert a["counts"] == b["counts"]
    assert a["segments"] == b["segments"]  # every file of every segment, by size and sha256
    out = capsys.readouterr().out
    assert "passages added" in out
    # resume: a second run finds every passage unchanged and writes nothing
    assert main(["index", str(corpus), "--index", str(tmp_path / "ray"), *common, "--ray", "auto"]) == 0
    assert " 0 passages added, 0 updated" in capsys.readouterr().out
    assert _manifest(tmp_path / "ray")["generation"] == b["generation"]


def test_encoder_pool_serves_the_whole_run(cluster, m3_encoder):
    """One pool for a run: the same actors (one model load each) encode every block, whatever
    the window; results in order, each block checked against its ids, equal to encode_arrays;
    a killed actor is restarted and its blocks retried, each still answered once."""
    from hybridsearch.distributed.encode import EncoderPool

    texts = [" ".join(WORDS[i:i + 5 + i % 4]) for i in range(36)]
    blocks = [([f"x{i}" for i in range(lo, lo + 6)], texts[lo:lo + 6]) for lo in range(0, 36, 6)]
    pool = EncoderPool(str(m3_encoder.spec.path), actors=2, gpus=False)
    try:
        first = pool.pids()
        got = []
        for b, enc in pool.encode_all(blocks, window=2):
            got.append(b)
            if b == 1:
                _kill(first[0])  # blocks in flight on it are retried on its restart
            want = m3_encoder.encode_arrays(blocks[b][1], kind="passage", sparse=True, colbert=True)
            np.testing.assert_allclose(enc.dense, want.dense, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(enc.colbert_offsets, want.colbert_offsets)
        assert got == list(range(6))
        after = pool.pids()
        assert after[1] == first[1] and after[0] != first[0]  # the same pool: only the killed one restarted
        h = pool.submit(7, ["a", "b"], ["one text", "two text"])
        h = (h[0], 7, ["a", "c"], h[3])  # an answer for other ids is refused, not committed
        with pytest.raises(RuntimeError, match="another block"):
            pool.result(h)
    finally:
        pool.close()


def test_encode_blocks_roundtrip(cluster, m3_encoder):
    from hybridsearch.distributed.encode import encode_blocks, pack, unpack

    texts = [" ".join(WORDS[i:i + 7]) for i in range(30)]
    blocks = [([f"x{i}" for i in range(lo, lo + 10)], texts[lo:lo + 10]) for lo in range(0, 30, 10)]
    got = list(encode_blocks(blocks, str(m3_encoder.spec.path), actors=2, gpus=False))
    assert [b for b, _ in got] == [0, 1, 2]
    for (b, enc), (_, tx) in zip(got, blocks):
        want = m3_encoder.encode_arrays(tx, kind="passage", sparse=True, colbert=True)
        np.testing.assert_allclose(enc.dense, want.dense, rtol=1e-5, atol=1e-6)
        assert (enc.sparse != want.sparse).nnz == 0 or np.allclose(enc.sparse.toarray(), want.sparse.toarray(), atol=1e-6)
        np.testing.assert_array_equal(enc.colbert_offsets, want.colbert_offsets)
        again = unpack(pack(enc))
        np.testing.assert_array_equal(again.colbert, enc.colbert)
        np.testing.assert_array_equal(again.sparse.toarray(), enc.sparse.toarray())


# ---------------------------------------------------------------------------- serving


def test_http_api_in_front_of_a_sharded_index(cluster, tiny_m3, tmp_path):
    """hybridsearch.server's app over a ShardedIndex (what `serve DIR --ray` runs): the same
    hits as the library, writes routed to the shards, stats summed; 127.0.0.1 only."""
    httpx = pytest.importorskip("httpx")
    from hybridsearch.distributed import ShardedIndex
    from hybridsearch.server import Settings
    from hybridsearch.server.app import create_app
    from hybridsearch.server.run import start

    idx = ShardedIndex.create(tmp_path / "h", tiny_m3, shards=2, timeout=300)
    server = None
    try:
        idx.add(_docs(50, seed=21))
        server = start(create_app(idx, Settings(port=0), log=None))
        assert server.url.startswith("http://127.0.0.1:")
        with httpx.Client(base_url=server.url, timeout=120) as c:
            r = c.post("/search", json={"query": "quick brown fox", "k": 5})
            assert r.status_code == 200, r.text
            want = idx.search("quick brown fox", k=5)
            got = r.json()["hits"]
            assert [h["id"] for h in got] == [h.id for h in want]
            assert got[0]["contributions"] is not None
            r = c.post("/add", json={"documents": [{"id": "new-1", "text": "quick fox new"}]})
            assert r.status_code == 200, r.text
            assert r.json()["documents"] == 51 and "new-1" in idx
            r = c.post("/delete", json={"ids": ["new-1", "d0"]})
            assert r.status_code == 200 and r.json()["documents"] == 49, r.text
            st = c.get("/stats").json()
            assert st["documents"] == 49 and st["shards"] == 2
            assert c.post("/search", json={"query": "fox", "mode": "nope"}).status_code == 400
    finally:
        if server is not None:
            server.stop()
        idx.close()
