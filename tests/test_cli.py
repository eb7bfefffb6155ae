"""The `hybridsearch` command line, end to end.

The main paths run as real subprocesses (`python -m hybridsearch.cli ...`); every subprocess
imports torch, which costs seconds, so checks that need no fresh process (other modes, filters,
patched failures) call `main()` in-process on the same index.
"""

import itertools
import json
import os
import re
import subprocess
import sys

import pytest

from hybridsearch.cli import main

ANIMALS = ["aardvark", "badger", "camel", "dingo", "emu", "ferret", "gecko", "heron", "ibis", "jackal",
           "koala", "lemur", "marmot", "newt", "ocelot", "puffin", "quail", "raccoon", "salamander",
           "tapir", "urchin", "vulture", "walrus", "yak"]
LONG = " ".join(f"The {a} lives near river number {i} and eats seeds." for i, a in enumerate(ANIMALS))
DOCS = [
    {"_id": "fox", "title": "Foxes", "text": "The quick brown fox jumps over the lazy quokka."},
    {"_id": "vec", "title": "Dense retrieval", "text": "Dense retrieval uses a single narwhal vector per text.",
     "metadata": {"year": 2020}},
    {"_id": "lex", "title": "BM25", "text": "BM25 is a classic lexical ranking function from the platypus era.",
     "metadata": {"year": 1994}},
    {"_id": "col", "title": "ColBERT", "text": "ColBERT compares every query token with every axolotl token."},
    {"_id": "long", "title": "Animals", "text": LONG},
]
SPLIT = ["--chunk-tokens", "64", "--overlap", "8"]


def run_cli(*args, cwd=None, env=None):
    """Run the command in a fresh interpreter; returns the CompletedProcess."""
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, "-m", "hybridsearch.cli", *map(str, args)], check=False,
                          capture_output=True, text=True, cwd=cwd, env=e, timeout=600)


def call(capsys, *args):
    """Run the command in this process; returns (exit status, stdout, stderr)."""
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line_error(rc, err, *fragments):
    assert rc != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hybridsearch: error: "), lines[0]
    for f in fragments:
        assert f in lines[0], lines[0]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def summary(out):
    """Counts from the index command's summary line."""
    m = re.search(r"(\d+) passages added, (\d+) updated, (\d+) unchanged, (\d+) stale deleted; "
                  r"the index holds (\d+) passages", out)
    assert m, out
    return dict(zip(("added", "updated", "unchanged", "deleted", "total"), map(int, m.groups())))


def query_json(capsys, index, text, *extra):
    rc, out, err = call(capsys, "query", index, text, "--json", *extra)
    assert rc == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_m3):
    """A JSONL corpus indexed once by a subprocess."""
    root = tmp_path_factory.mktemp("cli")
    corpus = write_jsonl(root / "corpus.jsonl", DOCS)
    index = root / "idx"
    p = run_cli("index", corpus, "--index", index, "--model", tiny_m3, *SPLIT)
    assert p.returncode == 0, p.stderr
    return {"root": root, "corpus": corpus, "index": index, "summary": summary(p.stdout)}


# ------------------------------------------------------------------------------ help


@pytest.mark.parametrize("cmd", [[], ["index"], ["query"], ["eval"], ["stats"], ["serve"]])
def test_help(capsys, cmd):
    rc, out, _ = call(capsys, *cmd, "--help")
    assert rc == 0
    assert out.startswith(f"usage: hybridsearch {' '.join(cmd)}".rstrip())


# ------------------------------------------------------------------------------ index + query


def test_index_jsonl_and_query_every_mode(built, capsys):
    s = built["summary"]
    n_long = s["total"] - 4
    assert n_long >= 3 and s["added"] == s["total"] and s["updated"] == s["unchanged"] == s["deleted"] == 0
    index = built["index"]

    # BM25 is deterministic: the distinctive word's document comes first (fresh process, --json)
    p = run_cli("query", index, "quokka", "--mode", "bm25", "--json", "-k", "3")
    assert p.returncode == 0, p.stderr
    hits = json.loads(p.stdout)
    assert hits[0]["id"] == "fox" and hits[0]["rank"] == 1
    assert hits[0]["metadata"] == {"doc_id": "fox", "char_start": 0, "char_end": len(DOCS[0]["text"]),
                                   "title": "Foxes"}
    assert hits[0]["text"] == "Foxes\n" + DOCS[0]["text"]

    # the other modes: k hits, each with its channel's score (the tiny model is random)
    for mode, channels in [("dense", {"dense"}), ("sparse", {"sparse"}), ("colbert", {"colbert"}),
                           ("hybrid", {"dense", "sparse", "colbert", "bm25"})]:
        hits = query_json(capsys, index, "narwhal vector", "--mode", mode, "-k", "4")
        assert len(hits) == 4
        assert len({h["id"] for h in hits}) == 4
        for h in hits:
            assert set(h["scores"]) == channels and isinstance(h["score"], float)
    assert query_json(capsys, index, "narwhal", "--mode", "hybrid", "--weights", '{"bm25": 5}')[0]["id"] == "vec"

    # readable output
    rc, out, _ = call(capsys, "query", index, "platypus", "--mode", "bm25", "-k", "2")
    assert rc == 0
    assert re.match(r"\s+1\. lex\s+score \d+\.\d{4}\s+\(bm25 \d+\.\d{4}\)\n\s+BM25 \| BM25 is a classic", out), out

    # metadata filter
    hits = query_json(capsys, index, "anything", "--mode", "dense", "--filter", '{"year": {"gte": 2000}}')
    assert [h["id"] for h in hits] == ["vec"]

    # stats
    rc, out, _ = call(capsys, "stats", index)
    assert rc == 0 and json.loads(out)["documents"] == s["total"]


def test_long_document_split_with_offsets(built, capsys):
    hits = query_json(capsys, built["index"], "river", "--mode", "dense", "-k", "100",
                      "--filter", '{"doc_id": "long"}')
    hits.sort(key=lambda h: h["metadata"]["char_start"])
    assert [h["id"] for h in hits] == [f"long#p{i}" for i in range(len(hits))]
    assert len(hits) >= 3
    covered = [False] * len(LONG)
    for h in hits:
        md = h["metadata"]
        body = LONG[md["char_start"]:md["char_end"]]
        assert h["text"] == "Animals\n" + body  # the title, then an exact slice of the document
        assert md["doc_id"] == "long" and md["title"] == "Animals"
        covered[md["char_start"]:md["char_end"]] = [True] * len(body)
    assert all(c or ch.isspace() for c, ch in zip(covered, LONG))
    for a, b in itertools.pairwise(hits):  # consecutive passages overlap (--overlap 8)
        assert b["metadata"]["char_start"] < a["metadata"]["char_end"]


def test_rerun_updates_changed_and_new_documents(tmp_path, tiny_m3, capsys):
    grow_short = "A short note about a wombat."
    v1 = [{"id": "a", "text": "Alpha document about a pelican."},
          {"id": "b", "text": "Beta document about an iguana."},
          {"id": "grow", "text": grow_short},
          {"id": "long", "text": LONG, "title": "Animals"}]
    corpus = write_jsonl(tmp_path / "c.jsonl", v1)
    index = tmp_path / "idx"
    p = run_cli("index", corpus, "--index", index, "--model", tiny_m3, *SPLIT)
    assert p.returncode == 0, p.stderr
    s1 = summary(p.stdout)
    n_long = s1["total"] - 3
    assert n_long >= 3

    # b changes, c is new, grow becomes multi-passage, long shrinks to its first half
    half = LONG[: LONG.index("koala") - 4]
    v2 = [v1[0], {"id": "b", "text": "Beta document about a capybara now."},
          {"id": "c", "text": "Gamma document about a flamingo."},
          {"id": "grow", "text": grow_short + " " + LONG},
          {"id": "long", "text": half, "title": "Animals"}]
    write_jsonl(corpus, v2)
    p = run_cli("index", corpus, "--index", index, *SPLIT)  # the index remembers its model
    assert p.returncode == 0, p.stderr
    s2 = summary(p.stdout)

    hits = query_json(capsys, index, "x", "--mode", "dense", "-k", "1000")
    ids = [h["id"] for h in hits]
    assert len(ids) == len(set(ids)) == s2["total"]  # no duplicates
    long_ids = sorted((i for i in ids if i.startswith("long")), key=lambda i: int(i.split("#p")[1]))
    grow_ids = [i for i in ids if i.startswith("grow")]
    assert long_ids == [f"long#p{i}" for i in range(len(long_ids))] and 2 <= len(long_ids) < n_long
    assert "grow" not in ids and len(grow_ids) >= 3
    assert s2["deleted"] == (n_long - len(long_ids)) + 1  # long's tail and the old single "grow"
    assert s2["unchanged"] >= 1 + 1  # "a" and at least long#p0
    assert s2["added"] == 1 + len(grow_ids) + 0  # "c" and grow's passages
    assert s2["added"] + s2["updated"] + s2["unchanged"] == s2["total"]
    assert s2["total"] == 3 + len(long_ids) + len(grow_ids)
    assert query_json(capsys, index, "capybara", "--mode", "bm25")[0]["id"] == "b"
    assert query_json(capsys, index, "iguana", "--mode", "bm25") == []
    assert query_json(capsys, index, "flamingo", "--mode", "bm25")[0]["id"] == "c"

    # a third run with nothing changed writes nothing
    rc, out, err = call(capsys, "index", corpus, "--index", index, *SPLIT, "-q")
    assert rc == 0, err
    assert summary(out) == {"added": 0, "updated": 0, "unchanged": s2["total"], "deleted": 0, "total": s2["total"]}


def test_interrupted_run_resumes_without_duplicates(tmp_path, tiny_m3, capsys, monkeypatch):
    from hybridsearch.index.hybrid import HybridIndex

    docs = [{"id": f"d{i}", "text": f"document number {i} about the {a}"} for i, a in enumerate(ANIMALS[:5])]
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    index = tmp_path / "idx"
    real_upsert = HybridIndex.upsert
    calls = []

    def flaky_upsert(self, batch, **kw):
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_upsert(self, batch, **kw)

    monkeypatch.setattr(HybridIndex, "upsert", flaky_upsert)
    rc, _, err = call(capsys, "index", corpus, "--index", index, "--model", tiny_m3, "--commit-every", "2")
    assert rc == 130 and err.strip().endswith("hybridsearch: interrupted")
    assert calls == [2, 2]
    monkeypatch.setattr(HybridIndex, "upsert", real_upsert)
    rc, out, err = call(capsys, "index", corpus, "--index", index, "--commit-every", "2", "-q")
    assert rc == 0, err
    assert summary(out) == {"added": 3, "updated": 0, "unchanged": 2, "deleted": 0, "total": 5}

    # interrupted before its first commit: the new folder holds an empty index (nothing is ever
    # removed on failure, so a concurrent run's commits cannot be lost) and a rerun continues
    monkeypatch.setattr(HybridIndex, "upsert", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    rc, _, _ = call(capsys, "index", corpus, "--index", tmp_path / "new", "--model", tiny_m3)
    assert rc == 130 and len(HybridIndex.open(tmp_path / "new", tiny_m3)) == 0
    monkeypatch.setattr(HybridIndex, "upsert", real_upsert)
    rc, out, err = call(capsys, "index", corpus, "--index", tmp_path / "new", "-q")
    assert rc == 0, err
    assert summary(out)["added"] == 5 and len(HybridIndex.open(tmp_path / "new", tiny_m3)) == 5


def test_index_folder_of_text_files(tmp_path, tiny_m3, capsys):
    root = tmp_path / "docs"
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "alpha.md").write_text("# Alpha\n\nThe alpha note mentions a pangolin.\n")
    (root / "beta.txt").write_text("The beta file mentions a chinchilla.")
    (root / ".hidden.txt").write_text("ignored pangolin")
    (root / "image.png").write_bytes(b"\x89PNG")
    p = run_cli("index", root, "--index", tmp_path / "idx", "--model", tiny_m3)
    assert p.returncode == 0, p.stderr
    assert summary(p.stdout)["total"] == 2
    hits = query_json(capsys, tmp_path / "idx", "pangolin", "--mode", "bm25")
    assert [h["id"] for h in hits] == ["notes/alpha.md"]
    assert hits[0]["text"] == "# Alpha\n\nThe alpha note mentions a pangolin."
    assert query_json(capsys, tmp_path / "idx", "chinchilla", "--mode", "bm25")[0]["id"] == "beta.txt"


def test_rerank(built, tmp_path, capsys):
    import hybridsearch.rerank  # noqa: F401 - part of the project: a failing import is a failure
    from hybridsearch.testing import make_tiny_reranker

    rr = make_tiny_reranker(tmp_path / "rr")
    hits = query_json(capsys, built["index"], "river seeds", "--mode", "hybrid", "-k", "3", "--rerank", rr)
    assert len(hits) == 3
    scores = [h["rerank_score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and all(isinstance(h["score"], float) for h in hits)
    rc, out, _ = call(capsys, "query", built["index"], "river seeds", "-k", "2", "--rerank", rr)
    assert rc == 0 and "rerank " in out and "score " in out


def test_serve_is_wired_to_the_server_module(built, capsys, monkeypatch, tmp_path):
    import hybridsearch.server as server
    seen = []
    monkeypatch.setattr(server, "serve", lambda path, settings, model=None: seen.append((path, settings, model)))
    monkeypatch.delenv("HYBRIDSEARCH_API_KEY", raising=False)
    monkeypatch.delenv("HYBRIDSEARCH_READ_KEY", raising=False)
    rc, _, err = call(capsys, "serve", built["index"], "--port", "0", "--host", "localhost", "--workers", "2",
                      "--cors-origin", "http://a.example", "--cors-origin", "http://b.example")
    assert rc == 0, err
    (path, settings, model), = seen
    assert (path, model) == (str(built["index"]), None)
    assert (settings.host, settings.port, settings.workers) == ("localhost", 0, 2)
    assert settings.cors_origins == ("http://a.example", "http://b.example") and settings.api_key is None
    # a non-loopback address without a key is refused before anything is loaded
    rc, _, err = call(capsys, "serve", built["index"], "--host", "0.0.0.0")
    assert rc == 1 and "without an API key" in err and "--insecure" in err and len(seen) == 1
    rc, _, err = call(capsys, "serve", built["index"], "--host", "0.0.0.0", "--insecure")
    assert rc == 0 and seen[-1][1].insecure
    # keys come from files (or the environment), never from the command line
    key = tmp_path / "key"
    key.write_text("k" * 24 + "\n")
    rc, _, err = call(capsys, "serve", built["index"], "--host", "0.0.0.0", "--api-key-file", key)
    assert rc == 0 and seen[-1][1].api_key == "k" * 24
    monkeypatch.setenv("HYBRIDSEARCH_API_KEY", "e" * 20)
    monkeypatch.setenv("HYBRIDSEARCH_READ_KEY", "r" * 20)
    rc, _, err = call(capsys, "serve", built["index"])
    assert rc == 0 and (seen[-1][1].api_key, seen[-1][1].read_key) == ("e" * 20, "r" * 20)
    key.write_text("short")
    rc, _, err = call(capsys, "serve", built["index"], "--api-key-file", key)
    assert rc == 1 and "too short" in err


# ------------------------------------------------------------------------------ eval


def test_eval_on_a_tiny_beir_folder(built, tmp_path, capsys):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    write_jsonl(beir / "corpus.jsonl", DOCS)
    write_jsonl(beir / "queries.jsonl", [{"_id": "q1", "text": "quokka"}, {"_id": "q2", "text": "narwhal"},
                                         {"_id": "q3", "text": "walrus"},  # in a late passage of "long"
                                         {"_id": "q4", "text": "axolotl"}])
    (beir / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\tfox\t1\nq2\tvec\t1\nq3\tlong\t1\nq4\tcol\t2\n")
    plot = tmp_path / "eval.png"
    p = run_cli("eval", beir, "--index", built["index"], "--modes", "bm25", "dense", "hybrid", "--json",
                "--plot", plot, "-q")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert list(res) == ["bm25", "dense", "hybrid"]
    for r in res.values():
        assert set(r) == {"ndcg@10", "recall@100", "mrr@10"}
        assert all(0.0 <= v <= 1.0 for v in r.values())
    assert res["bm25"] == {"ndcg@10": 1.0, "recall@100": 1.0, "mrr@10": 1.0}
    assert plot.read_bytes()[:4] == b"\x89PNG"

    rc, out, err = call(capsys, "eval", beir, "--index", built["index"], "-q")  # every mode, a table
    assert rc == 0, err
    assert "nDCG@10" in out and "Recall@100" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert set(rows) == {"dense", "sparse", "colbert", "bm25", "hybrid"}
    assert rows["bm25"] == ["1.0000", "1.0000", "1.0000"]

    # extra hybrid columns: each equals the same search run by hand
    rc, out, err = call(capsys, "eval", beir, "--index", built["index"], "-q", "--json", "--modes", "hybrid",
                        "--variant", 'bm25only={"weights": {"dense": 0, "sparse": 0, "colbert": 0, "bm25": 1}}',
                        "--variant", 'rrf={"fusion": "rrf"}')
    assert rc == 0, err
    res = json.loads(out)
    assert list(res) == ["hybrid", "bm25only", "rrf"]
    assert res["bm25only"] == {"ndcg@10": 1.0, "recall@100": 1.0, "mrr@10": 1.0}
    from hybridsearch import HybridIndex
    from hybridsearch.evaluation import evaluate

    idx = HybridIndex.open(built["index"])
    qs = {"q1": "quokka", "q2": "narwhal", "q3": "walrus", "q4": "axolotl"}
    qrels = {"q1": {"fox": 1}, "q2": {"vec": 1}, "q3": {"long": 1}, "q4": {"col": 2}}
    run = {q: list(dict.fromkeys(h.id.split("#")[0] for h in idx.search(t, k=100, fusion="rrf")))
           for q, t in qs.items()}
    assert abs(evaluate(run, qrels, ks=(10, 100))["ndcg@10"] - res["rrf"]["ndcg@10"]) < 1e-9
    assert_one_line_error(*call(capsys, "eval", beir, "--index", built["index"], "--variant", "x")[::2],
                          "NAME=JSON")
    assert_one_line_error(*call(capsys, "eval", beir, "--index", built["index"], "--variant",
                                'x={"k": 3}')[::2], "unknown option")


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("case", ["malformed", "no_text", "no_model", "bad_mode", "no_index", "bad_filter"])
def test_errors_one_line_no_traceback_no_folder(case, tmp_path, tiny_m3):
    good = json.dumps({"id": "a", "text": "fine"})
    corpus = tmp_path / "corpus.jsonl"
    index = tmp_path / "idx"
    env = None
    if case == "malformed":
        corpus.write_text(good + '\n{"id": "b", "text": \n')
        args, want = ["index", corpus, "--index", index, "--model", tiny_m3], [f"{corpus}:2: not valid JSON"]
    elif case == "no_text":
        corpus.write_text(good + "\n" + json.dumps({"id": "b", "title": "t"}) + "\n")
        args, want = ["index", corpus, "--index", index, "--model", tiny_m3], [f"{corpus}:2: missing the 'text' field"]
    elif case == "no_model":  # the default model, with an empty Hugging Face cache and no hub
        corpus.write_text(good + "\n")
        env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
        args, want = ["index", corpus, "--index", index], [
            "BAAI/bge-m3", "not available offline", "--model sentence-transformers/all-MiniLM-L6-v2"]
    elif case == "bad_mode":
        args, want = ["query", index, "x", "--mode", "fast"], ["invalid choice: 'fast'"]
    elif case == "no_index":
        args, want = ["query", index, "x"], [f"index folder {index} does not exist"]
    else:
        args, want = ["query", index, "x", "--filter", "{year: 2020}"], ["--filter is not valid JSON"]
    p = run_cli(*args, cwd=tmp_path, env=env)
    assert_one_line_error(p.returncode, p.stderr, *want)
    assert p.stdout == ""
    assert not index.exists()


def test_more_errors_in_process(tmp_path, tiny_m3, tiny_dense, capsys, monkeypatch):
    good = json.dumps({"id": "a", "text": "fine"})
    corpus = tmp_path / "c.jsonl"
    index = tmp_path / "idx"

    corpus.write_text(good + "\n" + json.dumps({"text": "no id"}) + "\n")
    assert_one_line_error(*call(capsys, "index", corpus, "--index", index, "--model", tiny_m3)[::2],
                          f"{corpus}:2: missing the document id")
    corpus.write_text(good + "\n" + good + "\n")
    assert_one_line_error(*call(capsys, "index", corpus, "--index", index)[::2], "duplicate document id 'a'")
    assert_one_line_error(*call(capsys, "index", tmp_path / "nope.jsonl", "--index", index)[::2], "not found")
    corpus.write_text(good + "\n")
    assert_one_line_error(*call(capsys, "index", corpus, "--index", index, "--overlap", "40",
                                "--chunk-tokens", "40")[::2], "--overlap (40) must be smaller")
    assert_one_line_error(*call(capsys, "index", corpus, "--index", index, "--model", tmp_path / "nomodel")[::2],
                          "model folder", "does not exist")
    assert_one_line_error(*call(capsys, "index", corpus, "--index", index, "--model", tiny_m3,
                                "--dense-factory", "Nonsense")[::2], "invalid FAISS factory")
    assert not index.exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert_one_line_error(*call(capsys, "index", corpus, "--index", tmp_path / "full")[::2],
                          "is not empty and holds no index")
    assert_one_line_error(*call(capsys, "stats", tmp_path / "full")[::2], "is not a hybridsearch index")

    # a dense-only index has no sparse channel
    rc, _, err = call(capsys, "index", corpus, "--index", index, "--model", tiny_dense, "-q")
    assert rc == 0, err
    assert_one_line_error(*call(capsys, "query", index, "x", "--mode", "sparse")[::2], "no sparse channel")
    assert_one_line_error(*call(capsys, "query", index, "x", "--filter", "[1]")[::2], "must be a JSON object")
    assert_one_line_error(*call(capsys, "query", index, "x", "--weights", '{"dense": "a"}')[::2], "--weights")
    assert_one_line_error(*call(capsys, "query", index, "x", "-k", "0")[::2], "-k must be >= 1")

    # an optional package missing: one line
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert_one_line_error(*call(capsys, "eval", tmp_path, "--index", index, "--plot", tmp_path / "p.png")[::2],
                          "--plot needs matplotlib")
    monkeypatch.undo()
    assert_one_line_error(*call(capsys, "eval", tmp_path, "--index", index)[::2], "corpus.jsonl not found")
    assert not (tmp_path / "p.png").exists()


def test_bad_utf8_folder_and_empty_corpus(tmp_path, capsys):
    root = tmp_path / "docs"
    root.mkdir()
    (root / "bad.txt").write_bytes(b"\xff\xfe")
    assert_one_line_error(*call(capsys, "index", root, "--index", tmp_path / "idx")[::2], "bad.txt: not valid UTF-8")
    (tmp_path / "empty.jsonl").write_text("\n")
    assert_one_line_error(*call(capsys, "index", tmp_path / "empty.jsonl", "--index", tmp_path / "idx")[::2],
                          "no documents")
    assert not (tmp_path / "idx").exists()


# ------------------------------------------------------------------------------ disk full, bad inputs


def _fill_disk(monkeypatch, exc):
    """Every .npy file an index write saves raises ``exc``."""
    import hybridsearch.index.segment as segment
    import hybridsearch.index.storage as storage

    def save_npy(path, arr, *a, **kw):
        raise exc

    monkeypatch.setattr(storage, "save_npy", save_npy)
    monkeypatch.setattr(segment, "save_npy", save_npy, raising=False)


@pytest.mark.parametrize("kind", ["oserror", "diskfull"])
def test_disk_full_is_one_line_and_the_index_keeps_its_last_commit(tmp_path, tiny_m3, capsys, monkeypatch, kind):
    import errno

    from hybridsearch.errors import DiskFullError

    cls = DiskFullError if kind == "diskfull" else OSError
    index = tmp_path / "idx"
    v1 = [{"id": "a", "text": "Alpha document about a pelican."}]
    v2 = v1 + [{"id": "b", "text": "Beta document about an iguana."}]
    corpus = write_jsonl(tmp_path / "c.jsonl", v1)
    rc, _, err = call(capsys, "index", corpus, "--index", index, "--model", tiny_m3, "-q")
    assert rc == 0, err
    write_jsonl(corpus, v2)
    _fill_disk(monkeypatch, cls(errno.ENOSPC, "No space left on device", "/some/path"))
    rc, out, err = call(capsys, "index", corpus, "--index", index, "-q")
    assert rc == 1
    assert_one_line_error(rc, err, "hybridsearch: error: disk full (ENOSPC) writing /some/path: "
                                   "No space left on device")
    monkeypatch.undo()
    assert [h["id"] for h in query_json(capsys, index, "pelican iguana", "--mode", "bm25")] == ["a"]
    rc, out, err = call(capsys, "index", corpus, "--index", index, "-q")  # the rerun completes the update
    assert rc == 0, err
    assert summary(out) == {"added": 1, "updated": 0, "unchanged": 1, "deleted": 0, "total": 2}
    assert query_json(capsys, index, "iguana", "--mode", "bm25")[0]["id"] == "b"


def test_unstorable_corpus_is_refused_before_anything_is_written(tmp_path, tiny_m3, capsys):
    index = tmp_path / "idx"
    good = [{"id": f"g{i}", "text": f"good document {i}"} for i in range(3)]
    for bad, want in [
        ('{"id": "x", "text": "bad \\ud800 text"}', "c.jsonl:4: the text contains a lone surrogate (U+D800) at position 4"),
        ('{"id": "x", "text": "t", "metadata": {"n": 18446744073709551616}}', "c.jsonl:4: metadata['n']: integer "
                                                                             "18446744073709551616 is outside the 64-bit range"),
        ('{"id": "x\\udc80", "text": "t"}', "lone surrogate (U+DC80)"),
    ]:
        corpus = tmp_path / "c.jsonl"
        corpus.write_text("".join(json.dumps(d) + "\n" for d in good) + bad + "\n", encoding="utf-8")
        rc, _, err = call(capsys, "index", corpus, "--index", index, "--model", tiny_m3, "--commit-every", "1", "-q")
        assert_one_line_error(rc, err, want)
        if index.exists():  # refused before the first commit: at most an empty index
            from hybridsearch.index.hybrid import HybridIndex

            with HybridIndex.open(index, tiny_m3) as idx:
                assert len(idx) == 0


def test_bad_query_inputs_are_one_line_errors(tmp_path, tiny_dense, capsys, monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "fine words", "metadata": {"i": 1}}])
    index = tmp_path / "idx"
    rc, _, err = call(capsys, "index", corpus, "--index", index, "--model", tiny_dense, "-q")
    assert rc == 0, err
    big = "1" + "0" * 400
    for args, want in [
        (["x", "--weights", '{"colbert": 1}'], "--weights: this index has no colbert channel (it has: dense, bm25)"),
        (["x", "--weights", '{"sparse": 0}'], "no sparse channel"),
        (["x", "--weights", '{"dense": -1}'], "--weights: the weight of 'dense' must be a finite number >= 0"),
        (["x", "--weights", '{"splade": 1}'], "unknown channel 'splade'"),
        (["x", "--filter", '{"i": %s}' % big], "--filter: filter on 'i': integer with about 401 digits"),
        (["x", "--filter", '{"i": {"gte": 1e400}}'], "--filter: filter on 'i': inf is not a finite number"),
        (["  "], "the query text is empty"),
        (["ab\udcff"], "the query contains a lone surrogate (U+DCFF) at position 2"),  # argv bytes b"ab\xff"
    ]:
        assert_one_line_error(*call(capsys, "query", index, *args)[::2], want)
    assert query_json(capsys, index, "fine", "--weights", '{"dense": 0.5, "bm25": 1}')[0]["id"] == "a"


def test_compact_command_reclaims_stale_passages(tmp_path, tiny_m3, capsys):
    from hybridsearch import HybridIndex

    corpus, index = tmp_path / "c.jsonl", tmp_path / "idx"
    write_jsonl(corpus, [{"id": f"d{i}", "text": f"passage number {i} about otters"} for i in range(12)])
    assert call(capsys, "index", corpus, "--index", index, "--model", tiny_m3, "-q")[0] == 0
    write_jsonl(corpus, [{"id": f"d{i}", "text": f"passage number {i} about otters" + (" v2" if i < 4 else "")}
                         for i in range(12)])
    assert call(capsys, "index", corpus, "--index", index, "-q")[0] == 0  # 4 updated: 4 old versions tombstoned
    before = HybridIndex.open(index, tiny_m3).stats()
    assert before["deleted_pending_compaction"] == 4 and before["segments"] == 2
    rc, out, err = call(capsys, "compact", index)
    assert rc == 0, err
    assert "compacted 12 passages into 1 segment(s); 4 deleted passages reclaimed" in out
    idx = HybridIndex.open(index, tiny_m3)
    after = idx.stats()
    assert after["deleted_pending_compaction"] == 0 and after["documents"] == 12 and after["segments"] == 1
    assert sorted(h.id for h in idx.search("otters", k=20, mode="bm25")) == sorted(idx.ids())
    assert sum(h.text.endswith("v2") for h in idx.search("otters", k=20, mode="bm25")) == 4
    assert_one_line_error(*call(capsys, "compact", tmp_path / "nope")[::2], "does not exist")


def test_mcls_index_from_the_command_line(tmp_path, tiny_m3, capsys):
    from hybridsearch import HybridIndex

    corpus, index = tmp_path / "c.jsonl", tmp_path / "idx"
    long_text = " ".join(f"word{i % 50}" for i in range(300))
    write_jsonl(corpus, [{"id": "long", "text": long_text}, {"id": "short", "text": "otters and herons"}])
    rc, _, err = call(capsys, "index", corpus, "--index", index, "--model", tiny_m3, "--mcls", "64",
                      "--chunk-tokens", "1000", "-q")
    assert rc == 0, err
    assert json.loads((index / "manifest.json").read_text())["model"]["mcls"] == 64
    assert HybridIndex.open(index).encoder.spec.mcls == 64  # the recorded setting is used on open
    rc, out, err = call(capsys, "query", index, "otters and herons", "--json")  # reopens with MCLS
    assert rc == 0, err
    assert call(capsys, "stats", index)[0] == 0
    assert_one_line_error(*call(capsys, "index", corpus, "--index", index, "--mcls", "32")[::2],
                          "--mcls only applies to a new index")
