"""Index format versions: a version-1 index (before merging, docstores and codecs) still opens,
answers, accepts writes, and is rewritten in version 2 by compaction."""

import json
import shutil

import msgpack
import numpy as np

from hybridsearch.index import storage as st
from hybridsearch.index.docstore import Docstore
from hybridsearch.index.hybrid import HybridIndex
from hybridsearch.index.merge import MergePolicy
from hybridsearch.testing import legacy_bm25_index

WORDS = ["river", "fox", "cloud", "token", "stone", "delta", "maple", "quartz"]


def _docs(n, prefix, seed):
    rng = np.random.default_rng(seed)
    return [{"id": f"{prefix}{i}", "text": " ".join(rng.choice(WORDS, 6)),
             "metadata": {"i": i, "tag": ["a", "b"][i % 2]}} for i in range(n)]


def _to_version1(path):
    """Rewrite a (fp16, fp32, unmerged) version-2 index as version 1 wrote it."""
    m = json.loads((path / st.MANIFEST).read_text())
    m["format_version"] = 1
    m["channels"]["dense"] = {"factory": m["channels"]["dense"]["factory"]}
    m["channels"].pop("colbert_codec", None)
    for e in m["segments"]:
        assert e["span"] == e["count"] and not e["docnos"] and e["dense_storage"] == "fp32"
        folder = path / e["name"]
        ds = Docstore.open(folder, e["count"], deep=True)
        ids, texts, metas = ds.chunk(np.arange(e["count"]))
        (folder / "docs.msgpack").write_bytes(
            msgpack.packb({"ids": ids, "texts": texts, "metadata": metas}, use_bin_type=True))
        del ds
        for f in list(e["files"]):
            if f in st.DOCSTORE_FILES or f == st.COLUMNS_FILE or f.startswith("col-"):
                (folder / f).unlink()
        for k in ("format", "first", "span", "dense_storage", "colbert", "docnos", "colbert_codec"):
            e.pop(k, None)
        e["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": st.sha256_file(p)}
                      for p in sorted(folder.iterdir())}
    (path / st.MANIFEST).write_text(json.dumps(m))
    for lease in path.glob("lease-*.json"):
        lease.unlink()


def test_version1_index_reads_writes_and_compacts_to_version2(tmp_path, m3_encoder):
    HybridIndex.create(tmp_path / "v2", m3_encoder, colbert_codec="fp16").close()
    legacy_bm25_index(tmp_path / "v2")  # version 1 kept BM25 in tantivy
    v2 = HybridIndex.open(tmp_path / "v2", m3_encoder, merge_policy=None)
    v2.add(_docs(20, "a", 0))
    v2.add(_docs(15, "b", 1))
    v2.delete(["a3", "b4"])
    v2.close()
    path = tmp_path / "v1"
    shutil.copytree(tmp_path / "v2", path)
    _to_version1(path)
    assert not list(path.glob("seg-*/docs.bin")) and list(path.glob("seg-*/docs.msgpack"))

    ref = HybridIndex.open(tmp_path / "v2", m3_encoder)
    old = HybridIndex.open(path, m3_encoder, merge_policy=MergePolicy(factor=3, floor=4))
    assert len(old) == len(ref) == 33 and sorted(old.ids()) == sorted(ref.ids())
    assert old.get("b7") == ref.get("b7") and "a3" not in old
    for mode in ("dense", "sparse", "colbert", "bm25", "hybrid"):
        for flt in (None, {"tag": "a"}, {"i": {"lt": 5}}):
            got = old.search("fox river", k=8, mode=mode, filter=flt)
            want = ref.search("fox river", k=8, mode=mode, filter=flt)
            assert [h.id for h in got] == [h.id for h in want], (mode, flt)
            np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
    # a write adds a version-2 segment beside the version-1 ones; the manifest takes this
    # library's version (3), BM25 stays in tantivy until compaction
    old.add(_docs(5, "c", 2))
    m = json.loads((path / st.MANIFEST).read_text())
    assert m["format_version"] == st.FORMAT_VERSION == 3 and m["bm25"] is not None
    assert [e.get("format", 1) for e in m["segments"]] == [1, 1, 2]
    old.compact()
    m = json.loads((path / st.MANIFEST).read_text())
    assert [e["format"] for e in m["segments"]] == [2] and len(old) == 38
    assert m["bm25"] is None and m["channels"]["bm25_store"] == "postings"
    assert not list(path.glob("seg-*/docs.msgpack"))
    assert {h.id for h in old.search("fox", k=50, mode="bm25")} <= set(old.ids())
    assert old.get("b7") == ref.get("b7")
    old.close()
    ref.close()
