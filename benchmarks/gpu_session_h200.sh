#!/usr/bin/env bash
# One part of the GPU work a session owes, run on the device machine (H200) in one call:
#     bash benchmarks/gpu_session_h200.sh PART      (results and logs under $OUT)
# with .whl carried (scripts/gpu_wheels.sh makes it here). Parts, each within one 10-minute call:
#   tests    the GPU tests: kernels against their torch twins at real shapes, GPU quantization
#            against the CPU, the engine on the GPU (junit XML and logs)
#   api      bench_serve.py --api-features: n=4 and logprobs=5 against plain requests (w4a8kv4)
#   fp16     bench_serve.py --precisions w16a16kv16 --quick: the baseline records of serve-h200.json
#   tune     tune_kernels.py for the Llama-3-8B shapes into qoq/kernels/configs/nvidia-h200.json
set -u
part=${1:?usage: gpu_session_h200.sh tests|api|fp16|tune}
out=${OUT:-/tmp/gpu}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 QOQ_GIT_COMMIT=${QOQ_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
case "$part" in
  tests)
    for t in tests/kernels/test_gemm.py tests/kernels/test_attention.py tests/kernels/test_kv_cache.py \
             tests/engine/test_gpu_engine.py tests/quant/test_gpu_quantize.py; do
      name=$(basename "$t" .py)
      timeout 170 python3 -m pytest -q -x "$t" --junitxml "$out/$name.xml" > "$out/$name.log" 2>&1
      echo "$name: exit $? $(tail -1 "$out/$name.log")"
    done ;;
  api)
    timeout 560 python3 benchmarks/bench_serve.py --api-features --precisions w4a8kv4 --quick --skip-offline \
      --out "$out/serve-api-h200.json" > "$out/serve-api.log" 2>&1
    echo "api: exit $?"; tail -40 "$out/serve-api.log" ;;
  fp16)
    timeout 560 python3 benchmarks/bench_serve.py --precisions w16a16kv16 --quick \
      --out "$out/serve-fp16-h200.json" > "$out/serve-fp16.log" 2>&1
    echo "fp16: exit $?"; tail -40 "$out/serve-fp16.log" ;;
  tune)
    timeout 560 python3 benchmarks/tune_kernels.py --model qoq/configs/llama-3-8b.json --budget-s 480 \
      --out "$out/nvidia-h200.json" > "$out/tune.log" 2>&1
    echo "tune: exit $?"; tail -20 "$out/tune.log" ;;
  *) echo "unknown part $part"; exit 2 ;;
esac
