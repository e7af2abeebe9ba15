#!/usr/bin/env bash
# On the device (an NVIDIA GPU, no network): build llama-cpp-python 0.3.36 with
# CUDA, install edge-reft (with its native gate) next to it, run gpu_check.py.
# Carried in .gpu/ (see benchmarks/gpu/README.md): the llama-cpp-python sdist
# without models/docs, wheels of its build backend, and a cut model.
#   bash benchmarks/gpu/run.sh start    # build + checks in the background (setsid), log in /tmp/gpujob
#   bash benchmarks/gpu/run.sh wait N   # wait up to N seconds, copy the log to $OUT
set -uo pipefail
cd "$(dirname "$0")/../.."
JOB=/tmp/gpujob
case "${1:-start}" in
start)
  mkdir -p $JOB
  setsid nohup bash benchmarks/gpu/run.sh job > $JOB/log 2>&1 < /dev/null &
  exec bash benchmarks/gpu/run.sh wait "${2:-540}" ;;
wait)
  for _ in $(seq "${2:-540}"); do [ -e $JOB/done ] && break; sleep 1; done
  cp $JOB/log "${OUT:-/tmp}/gpu_log.txt" 2>/dev/null; cp $JOB/report.txt "${OUT:-/tmp}/" 2>/dev/null
  tail -c 11000 $JOB/log; [ -e $JOB/done ] && echo "JOB DONE: $(cat $JOB/done)" || echo "JOB STILL RUNNING" ;;
job)
  set -e
  trap 'echo "exit $?" > $JOB/done' EXIT
  # the image's CC/CXX wrappers link libstdc++ statically; programs built so
  # segfault in std::regex while loading a tokenizer: use the system compilers
  export CC=gcc CXX=g++ CUDAHOSTCXX=g++
  SITE=/tmp/site; mkdir -p $SITE
  python3 -m pip install -q --no-index --no-deps --target $SITE .gpu/whl/*.whl
  export PYTHONPATH=$SITE
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  tar xzf .gpu/llama_cpp_python-0.3.36-stripped.tar.gz -C /tmp
  t0=$(date +%s)
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAVA_BUILD=OFF -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install --no-index --no-deps --no-build-isolation \
    --target $SITE /tmp/llama_cpp_python-0.3.36
  echo "llama-cpp-python with CUDA built in $(( $(date +%s) - t0 )) s"; ls -la $SITE/llama_cpp/lib
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target $SITE .
  (cd /tmp && python3 -c "from edge_reft.runtime.llama_native import load_gate; assert load_gate(), 'no native gate'")
  python3 benchmarks/gpu/gpu_check.py --model .gpu/smol8.gguf --rounds "${ROUNDS:-6}" 2>&1 | tee $JOB/report.txt ;;
esac
