"""The benchmark runner runs end to end and writes its report (figures themselves are not
checked: timings do not belong in tests)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # runs every benchmark section end to end: minutes
def test_quick_bench_runs_and_writes_results(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "RESULTS.md"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--tiny", "--sections", "scale",
                        "breakdown", "quality", "--out", str(out), "--tmp", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "Machine:" in text and "## Where we lose" in text
    assert "This section failed" not in text, text
    assert "| 1,000 | hybridsearch hybrid |" in text            # scale table row for our hybrid
    assert "bare FAISS dense (1 thread)" in text and "bm25s BM25" in text
    assert "Milvus Lite hybrid (RRF)" in text
    assert "Not run: no `--scifact` folder given." in text       # quality needs the data path
    assert "| sum of stages |" in text                            # breakdown table
    for png in ("latency.png", "build.png", "stages.png"):
        assert (tmp_path / "results" / "plots" / png).stat().st_size > 1000
        assert f"results/plots/{png}" in text


def test_sparse_section_checks_both_kernels_and_reports_them(tmp_path):
    """run.py's sparse section: both kernels' top-k compared on every query before timing (an
    assertion inside the run), then one table row per size, query set and thread setting."""
    out = tmp_path / "RESULTS.md"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--tiny", "--sections", "sparse",
                        "--out", str(out), "--tmp", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert "This section failed" not in text, text
    assert "## Learned sparse: exact pruning against the term-at-a-time scan" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| 10,000 | ")]
    assert {ln.split(" | ")[1] for ln in rows} == {"doc", "flat"}, rows


def test_m3_reuse_must_name_kept_run_folders(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--tiny", "--sections", "scale_m3",
                        "--m3-reuse", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a kept scale_m3 run folder" in r.stderr


def test_bad_arguments_fail_clearly(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--tiny", "--scifact", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no corpus.jsonl" in r.stderr


# ---------------------------------------------------------------- scale_m3 (bench/suite/scale_m3.py)


def _m3():
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    from suite import scale_m3

    return scale_m3


def test_m3_corpus_rows_are_shaped_and_depend_only_on_seed_and_docno():
    import numpy as np

    m3 = _m3()
    s = m3.TINY
    rows = m3.Corpus(s, seed=3).rows(50, 250)  # crosses block boundaries (blocks of 100)
    again = m3.Corpus(s, seed=3)
    again.rows(0, 10)  # another block generated first must not change anything
    part = again.rows(120, 180)
    assert np.array_equal(part.dense, rows.dense[70:130])
    assert np.array_equal(part.colbert, rows.colbert[rows.colbert_offsets[70]:rows.colbert_offsets[130]])
    assert (part.sparse != rows.sparse[70:130]).nnz == 0 and part.texts() == rows.texts()[70:130]
    assert not np.array_equal(m3.Corpus(s, seed=4).rows(50, 250).dense, rows.dense)

    enc = rows.encoded()
    assert enc.dense.shape == (200, s.dim) and enc.dense.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(enc.dense, axis=1), 1, atol=1e-5)
    lens = np.diff(enc.colbert_offsets)
    assert lens.min() >= s.tokens[0] and lens.max() <= s.tokens[1] and enc.colbert_offsets[-1] == len(enc.colbert)
    assert enc.colbert.shape[1] == s.colbert_dim and enc.colbert.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(enc.colbert, axis=1), 1, atol=1e-4)
    assert np.array_equal(enc.n_tokens, lens + 1)
    sp = enc.sparse
    assert sp.shape == (200, s.vocab) and sp.has_sorted_indices and (sp.data > 0).all()
    assert sp.indices.min() >= 5 and (np.diff(sp.indptr) >= 1).all()  # ids 0-4 are special tokens
    assert all(len(np.unique(sp.indices[a:b])) == b - a for a, b in zip(sp.indptr[:-1], sp.indptr[1:]))
    docs = rows.docs()
    assert [d["id"] for d in docs[:2]] == ["d50", "d51"]
    assert all(s.text_words[0] <= len(d["text"].split()) <= s.text_words[1] for d in docs)
    assert {d["metadata"]["lang"] for d in docs} <= set(m3.LANGS)
    assert all(m3.YEARS[0] <= d["metadata"]["year"] <= m3.YEARS[1] for d in docs)


def test_m3_queries_have_their_source_as_answer():
    import numpy as np

    m3 = _m3()
    c = m3.Corpus(m3.TINY, seed=3)
    blk = c.rows(0, 300)
    dense1 = maxsim1 = 0
    for i in range(0, 300, 6):
        q = c.query(blk, i)
        assert q["source"] == i
        np.testing.assert_array_equal(q["dense"], c.query(blk, i)["dense"])  # depends on (seed, docno) only
        dense1 += int(np.argmax(blk.dense @ q["dense"])) == i
        ms = [(q["colbert"] @ blk.colbert[blk.colbert_offsets[j]:blk.colbert_offsets[j + 1]].T).max(1).sum()
              for j in range(300)]
        maxsim1 += int(np.argmax(ms)) == i
        own = blk.sparse.indices[blk.sparse.indptr[i]:blk.sparse.indptr[i + 1]]
        assert len(np.intersect1d(own, q["terms"])) >= min(8, len(own))
        assert len(set(q["text"].split()) & set(blk.texts()[i].split())) >= 1
    assert dense1 >= 45 and maxsim1 >= 40  # of 50: a query's own document is its best answer


def test_m3_query_files_round_trip_and_refuse_corrupt_ones(tmp_path):
    import numpy as np

    from hybridsearch.errors import IndexFormatError
    from hybridsearch.index.storage import save_npy

    m3 = _m3()
    c = m3.Corpus(m3.TINY, seed=1)
    blk = c.rows(0, 100)
    qs = m3.Queries.from_list([c.query(blk, i) for i in (3, 40, 99)], m3.TINY.vocab)
    qs.save(tmp_path / "q")
    back = m3.Queries.load(tmp_path / "q", m3.TINY, 100)
    assert back.texts == qs.texts and np.array_equal(back.sources, [3, 40, 99])
    assert np.array_equal(back.colbert, qs.colbert) and (back.sparse != qs.sparse).nnz == 0
    row = back.row(1)
    assert row.dense.shape == (1, m3.TINY.dim) and row.colbert.shape == (32, m3.TINY.colbert_dim)

    with pytest.raises(IndexFormatError, match="sources.npy"):
        m3.Queries.load(tmp_path / "q", m3.TINY, 50)  # a source beyond the corpus
    save_npy(tmp_path / "q" / "dense.npy", qs.dense.astype(np.float64))
    with pytest.raises(IndexFormatError, match="dense.npy"):
        m3.Queries.load(tmp_path / "q", m3.TINY, 100)
    qs.save(tmp_path / "q")
    (tmp_path / "q" / "texts.json").write_text('["a", "b"]')
    with pytest.raises(IndexFormatError, match="texts.json"):
        m3.Queries.load(tmp_path / "q", m3.TINY, 100)


def test_m3_disk_estimate_refuses_what_cannot_fit(tmp_path, monkeypatch):
    import collections
    import shutil as sh

    m3 = _m3()
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(0, 0, 65 * 2**30))
    fp16 = {"dense_factory": "Flat", "dense_storage": "fp32", "colbert_codec": "fp16"}
    res1 = dict(fp16, colbert_codec="res1")
    est = m3.estimate_bytes(1_000_000, m3.Shape(), res1, 1000)
    assert 12e9 < est["colbert"] < 14e9 and est["dense"] == 4096 * 1_000_000
    assert m3.estimate_bytes(1_000_000, m3.Shape(), fp16, 1000)["colbert"] > 200e9
    lines = []
    m3.check_disk(tmp_path, 1_000_000, m3.Shape(), res1, 1000, False, lines.append)
    with pytest.raises(SystemExit, match="refusing 1,000,000 documents with ColBERT fp16"):
        m3.check_disk(tmp_path, 1_000_000, m3.Shape(), fp16, 1000, False, lines.append)
    unknown = dict(fp16, colbert_codec="zz9")  # costed as float16: refused too
    with pytest.raises(SystemExit):
        m3.check_disk(tmp_path, 1_000_000, m3.Shape(), unknown, 1000, False, lines.append)
    assert "unknown storage option" in lines[-1]


def test_m3_results_file_keeps_other_sizes_and_ignores_garbage(tmp_path):
    m3 = _m3()
    md = tmp_path / "scale_m3.md"
    assert m3.read_records(md) == {}
    md.write_text(f"# x\n\n{m3.RAW_MARK}\n```json\n{{\"12\": [1, 2]}}\n```\n")
    assert m3.read_records(md) == {}  # not records: ignored, never trusted
    results = tmp_path / "RESULTS.md"
    results.write_text("# all\n\n## A\n\na\n\n## " + m3.TITLE + "\n\nold\n\n## B\n\nb\n")
    m3.splice(results, "new body")
    text = results.read_text()
    assert "old" not in text and "new body" in text and "## A\n\na" in text and "## B\n\nb" in text


@pytest.mark.slow  # four worker processes (build, serve, Milvus, compact): about a minute
def test_scale_m3_tiny_end_to_end(tmp_path):
    m3 = _m3()
    out = tmp_path / "RESULTS.md"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--tiny", "--sections", "scale_m3",
                        "--out", str(out), "--tmp", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert f"## {m3.TITLE}" in text and "This section failed" not in text, text
    assert not (tmp_path / "results" / "scale_m3.md").exists()  # tiny records stay apart from real ones
    rec = m3.read_records(tmp_path / "results" / "scale_m3_tiny.md")["300"]
    st = rec["build"]["stats"]
    assert st["documents"] == 300 and rec["build"]["commits"] == 3 and 1 <= st["segments"] <= 3
    assert {"dense", "sparse", "colbert", "bm25"} <= set(st["channels"])
    assert all(st["channel_bytes"][c]["bytes"] > 0 for c in ("dense", "sparse", "colbert", "bm25"))
    assert rec["du_bytes"] >= sum(v["bytes"] for v in st["channel_bytes"].values())
    modes = rec["serve"]["modes"]
    assert set(modes) == {"dense", "sparse", "bm25", "hybrid", "colbert"}
    assert modes["hybrid"]["queries"] == 20 and modes["hybrid"]["hit10"] >= 0.9
    assert rec["serve"]["rss_queries_mib"] > 0
    for f in rec["serve"]["filters"].values():
        assert f["violations"] == 0
        if "mask_fraction" in f:  # the index's own mask keeps about what the generator says
            assert abs(f["mask_fraction"] - f["fraction"]) < 0.12
    assert rec["compact"]["segments_after"] == 1
    assert rec["build"]["maxrss_mib"] >= rec["build"]["rss_base_mib"] > 0
    if m3._have_milvus():
        assert rec["milvus_serve"]["modes"]["dense"]["hit10"] >= 0.9
        assert "| 300 | hybrid p50 ms (Milvus: hybrid (RRF)); source in top 10 |" in text
    # every channel against its anchor, in one process: exact anchors agree with ours at this size
    vs = rec["versus"]
    assert "failed" not in vs, vs
    assert {"ours dense", "bare FAISS IndexFlatIP (exact)", "ours bm25", "ours sparse", "ours colbert",
            "colbert, exhaustive MaxSim over every token", "ours hybrid"} <= set(vs["systems"])
    assert vs["recall"]["ours dense vs exact Flat"] >= 0.9
    assert vs["recall"]["ours sparse vs exhaustive TAAT"] == 1.0
    assert vs["recall"]["ours colbert vs exhaustive MaxSim"] >= 0.9
    assert all(v > 0 for v in vs["batch"].values())
    assert "### Every channel against its anchor" in text and "| 300 | dense | bare FAISS IndexFlatIP (exact) |" in text
