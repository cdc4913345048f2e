#!/usr/bin/env bash
# The GPU work a session owes, run on the device machine in one call:
#     bash benchmarks/gpu_session.sh PART [PART ...]      (results and logs under $OUT)
# with .whl carried (scripts/gpu_wheels.sh makes it here). Outputs are named by GPU (h100, h200);
# more than 8 of them come back as session.tgz. The device's copy of .git can be stale: pass
# QOQ_GIT_COMMIT=<HEAD here> for the records' commit.
# Parts (keep the sum within one 10-minute call):
#   tests     the GPU tests: kernels against their torch twins at real shapes, GPU quantization
#             against the CPU, the engine on the GPU (junit XML and logs)
#             (TESTS="file ..." runs only those, TESTS_K their tests matching that -k expression, TESTS_TIMEOUT seconds a
#             file (420: test_gemm.py compiles for over 4 minutes on a fresh machine); SERVE_ARGS="--prefill-graph-mode full" reaches features' servers)
#   mixed     probe_host_overhead.py: a mixed step's wall and kernel time, piecewise against full graphs
#   sizing    probe_kv_sizing.py: the KV cache's pages with CUDA graphs and without
#   api       bench_serve.py --api-features: n=4 and logprobs=5 against plain requests (w4a8kv4)
#   fp16      bench_serve.py --precisions w16a16kv16 --quick: the baseline serve records
#   tune      tune_kernels.py for the Llama-3-8B shapes and decode attention into tune-<gpu>.json
#             (TUNE_INSTALL=1: also into this GPU's table in qoq/kernels/configs for the parts after it;
#             TUNE_MS="256,1024": those M only; TUNE_ARGS: more options)
#   prefill   paged prefill attention probe, a profiled 1x1024 prefill, bench_prefill_chunking.py
#   features  bench_serve.py --features: chunked prefill and prefix caching on and off
#   e2e       bench_e2e.py at the largest batch, chunked prefill and prefix caching on and off (E2E_CASES)
#   kernels   bench_kernels.py and bench_attention.py: the kernel records (kernels-<gpu>.json, attention-<gpu>.json;
#             KERNEL_MS="1 16": only those M, into kernels-m-<gpu>.json, no attention)
#   b1        batch-1 decode: profile_decode.py --graphs (kernel table, exposed times) and the engine's graphed step
#   engine1   the engine's batch-1 step alone (qoq bench throughput)
#   prologue  the GEMMs' input prologue on the GPU: its tests, then the batch-1 step with QOQ_ACT_PROLOGUE=0/1,
#             PROLOGUE_REPS (2) times
#   gemv      the CUDA-core gemv kernel: its GPU tests (GEMV_TESTS=0: none), then tune_kernels.py at M = 1 and 4
#             (GEMV_MS; TUNE_MODES, TUNE_ARGS) into the table the parts after it use (tune-gemv-<gpu>.json, every
#             timing in tune-gemv-results-<gpu>.json)
#   generate  qoq quantize + qoq generate of a random Llama-3-8B folder against the engine at batch 1
#   atune     tune_kernels.py for decode attention only (its plan, latency plan and wide plan, KV4 and KV8)
#             into this GPU's table in the tree (atune-<gpu>.json: the table, atune-results-<gpu>.json: every timing)
#   attention bench_attention.py alone: the attention record (attention-<gpu>.json)
#   dprobe    probe_decode.py with PROBE_ARGS: decode attention plans side by side (decode-probe-<gpu>.json)
#   append    KVAppend (QOQ_DECODE_APPEND=1: every step): its kernel tests, the GPU engine tests with it on, then the engine's
#             step at APPEND_BATCHES (64; batch 1 is slower with it, decode-b1-ab-h100.json) off and on,
#             APPEND_REPS (2) times (append-<gpu>.json)
#   ab        the engine's decode step under AB_CASES ("name:VAR=1,VAR2=x ..."), AB_BATCHES (1), AB_REPS (1) (ab-<gpu>.json)
set -u
[ $# -gt 0 ] || { echo "usage: gpu_session.sh tests|sizing|mixed|api|fp16|tune|prefill|features|e2e|kernels|b1|engine1|prologue|gemv|generate|atune|attention|dprobe|append|ab ..."; exit 2; }
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
gpu=$(head -1 "$out/gpu.txt" | grep -oiE 'h100|h200|a100|l40s|b200' | head -1 | tr A-Z a-z)
gpu=${gpu:-gpu}
# The device tool brings back at most 8 files from $OUT: where there are more, they come back as
# one archive (tar xzf session.tgz here).
pack() {
  local n; n=$(find "$out" -type f | wc -l)
  if [ "$n" -gt 8 ]; then
    (cd "$out" && tar czf /tmp/session.tgz . && find . -mindepth 1 -delete && mv /tmp/session.tgz .)
    echo "$n files packed into session.tgz"
  fi
}
trap pack EXIT
table_path() {  # this GPU's table in the tree (what select_plan reads)
  python3 -c "from qoq.kernels import configs; print(configs.table_path(configs.device_key(0)))"
}
# The engine's graphed decode step (qoq bench throughput, w4a8kv4) under each of AB_CASES
# ("name:VAR=value,VAR=value ..."), at each of AB_BATCHES, AB_REPS times: <prefix>-<gpu>.json.
ab_runs() {
  local prefix=$1 rep b case name envs
  for rep in $(seq 1 ${AB_REPS:-1}); do for b in ${AB_BATCHES:-1}; do for case in ${AB_CASES:?}; do
    name=${case%%:*}; envs=${case#*:}
    env ${envs//,/ } timeout 120 python3 -m qoq bench throughput --precision w4a8kv4 --batch $b --input-len 8 \
      --output-len 256 2> /dev/null | tail -1 > "$out/$prefix-run-$name-b$b-$rep.json"
    echo "batch $b $name ($envs, $rep): $(python3 -c "
import json, sys
f, case, envs, device = sys.argv[1:]
d = dict(json.load(open(f)), case=case, env=envs, device=device, commit='$QOQ_GIT_COMMIT')
json.dump(d, open(f, 'w'))
print(d['decode_step_ms'], 'ms', d['tokens_per_s'], 'tok/s')" "$out/$prefix-run-$name-b$b-$rep.json" "$name" "$envs" "$(head -1 "$out/gpu.txt")" 2>&1 | tail -1)"
  done; done; done
  python3 -c "import glob, json, sys; json.dump([dict(json.load(open(f)), file=f.split('/')[-1]) for f in sorted(glob.glob(sys.argv[1] + '/$prefix-run-*.json'))], open(sys.argv[1] + '/$prefix-$gpu.json', 'w'), indent=1)" "$out" \
    && rm -f "$out/$prefix"-run-*.json
}
for part in "$@"; do
echo "=== $part $(date +%T)"
case "$part" in
  tests)
    for t in ${TESTS:-tests/kernels/test_gemm.py tests/kernels/test_attention.py tests/kernels/test_kv_cache.py \
             tests/engine/test_gpu_engine.py tests/quant/test_gpu_quantize.py}; do
      name=$(basename "$t" .py)
      timeout ${TESTS_TIMEOUT:-420} python3 -m pytest -q -x "$t" ${TESTS_K:+-k "$TESTS_K"} --junitxml "$out/$name.xml" > "$out/$name.log" 2>&1
      echo "$name: exit $? $(tail -1 "$out/$name.log")"
    done ;;
  sizing)
    timeout 300 python3 benchmarks/probe_kv_sizing.py --out "$out/kv-sizing-$gpu.json" > "$out/kv-sizing.log" 2>&1
    echo "sizing: exit $?"; grep -v Warning "$out/kv-sizing.log" | tail -12 ;;
  mixed)
    for mode in ${MIXED_MODES:-piecewise full}; do for budget in ${MIXED_BUDGETS:-512}; do
      timeout 200 python3 benchmarks/probe_host_overhead.py --graphs-only --prefill-graph-mode $mode --batch 64 \
        --budget $budget --repeats 4 > "$out/host-overhead-$mode-$budget.log" 2>&1
      echo "mixed $mode budget $budget: exit $?"; grep -E "wall|busy|Error| ms .*x  |calls  total|async stream" "$out/host-overhead-$mode-$budget.log" | head -34
    done; done ;;
  api)
    timeout 560 python3 benchmarks/bench_serve.py --api-features --precisions w4a8kv4 --quick --skip-offline \
      --out "$out/serve-api-$gpu.json" > "$out/serve-api.log" 2>&1
    echo "api: exit $?"; tail -40 "$out/serve-api.log" ;;
  fp16)
    timeout 560 python3 benchmarks/bench_serve.py --precisions w16a16kv16 --quick \
      --out "$out/serve-fp16-$gpu.json" > "$out/serve-fp16.log" 2>&1
    echo "fp16: exit $?"; tail -40 "$out/serve-fp16.log" ;;
  tune)
    timeout 560 python3 benchmarks/tune_kernels.py --model qoq/configs/llama-3-8b.json --budget-s ${TUNE_BUDGET_S:-360} ${TUNE_MS:+--ms $TUNE_MS} ${TUNE_ARGS:-} \
      --modes ${TUNE_MODES:-w4a8_g128,w4a8_per_channel} --attention-bits "${TUNE_ATTENTION_BITS-4,8}" --attention-budget-s 120 \
      --out "$out/tune-$gpu.json" --results "$out/tune-results-$gpu.json" > "$out/tune.log" 2>&1
    rc=$?; echo "tune: exit $rc"; tail -20 "$out/tune.log"
    # TUNE_INSTALL=1: the parts after this one run with the table just tuned
    if [ "${TUNE_INSTALL:-0}" = 1 ] && [ $rc = 0 ]; then cp "$out/tune-$gpu.json" "$(table_path)"; fi ;;
  prefill)
    timeout 200 python3 benchmarks/probe_paged_prefill.py --out "$out/paged-prefill-probe-$gpu.json" \
      > "$out/paged-prefill-probe.log" 2>&1
    echo "probe: exit $?"; cat "$out/paged-prefill-probe.log" | grep -v Warning | tail -45
    timeout 150 python3 benchmarks/profile_decode.py --prefill --batch 1 --context 1024 --steps 1 \
      > "$out/profile-prefill-1x1024.txt" 2>&1
    echo "profile: exit $?"; head -30 "$out/profile-prefill-1x1024.txt"
    timeout 200 python3 benchmarks/bench_prefill_chunking.py --budget 1024 --batch 64 --arrivals 1 \
      --arrival-every 4 --num-prefixes 8 --out "$out" > "$out/prefill-chunking.log" 2>&1
    echo "chunking: exit $?"; tail -30 "$out/prefill-chunking.log" ;;
  features)
    timeout 580 python3 benchmarks/bench_serve.py --features --precisions w4a8kv4 --quick --skip-offline \
      --chunk-budget ${CHUNK_BUDGET:-512 2048} ${FEATURES_ARGS:-} --serve-args "${SERVE_ARGS:-}" --out "$out/serve-features-$gpu.json" > "$out/serve-features.log" 2>&1
    echo "features: exit $?"; grep -A16 "^== " "$out/serve-features.log" | tail -80 ;;
  e2e)
    timeout 560 python3 benchmarks/bench_e2e.py --config llama-3-8b --max-batch 2048 --cases ${E2E_CASES:-w4a8kv4:-1} \
      --features on,off --hf-batches "" --max-num-batched-tokens 8192 ${E2E_ARGS:-} --out "$out/e2e-features-$gpu.json" \
      > "$out/e2e-features.log" 2>&1
    echo "e2e: exit $?"; grep -v Warning "$out/e2e-features.log" | tail -12 ;;
  kernels)
    # KERNEL_MS="1 16": those M only (kernels-m-<gpu>.json) and no attention records
    timeout 330 python3 benchmarks/bench_kernels.py --out "$out/kernels${KERNEL_MS:+-m}-$gpu.json" \
      ${KERNEL_MS:+--ms $KERNEL_MS} > "$out/kernels.log" 2>&1
    echo "kernels: exit $?"; grep -v Warning "$out/kernels.log" | tail -14
    if [ -z "${KERNEL_MS:-}" ]; then
      timeout 200 python3 benchmarks/bench_attention.py --out "$out/attention-$gpu.json" > "$out/attention.log" 2>&1
      echo "attention: exit $?"; grep -v Warning "$out/attention.log" | tail -10
    fi ;;
  engine1)
    timeout 150 python3 -m qoq bench throughput --precision w4a8kv4 --batch 1 --input-len 8 --output-len 256 \
      > "$out/engine-b1-$gpu.log" 2>&1; echo "engine b1: exit $?"; tail -3 "$out/engine-b1-$gpu.log" ;;
  b1)
    timeout 200 python3 benchmarks/profile_decode.py --graphs --precision w4a8kv4 --batch 1 --context 1024 --steps 20 \
      > "$out/profile-decode-b1-$gpu.txt" 2>&1; echo "profile b1: exit $?"; grep -A24 "exposed time" "$out/profile-decode-b1-$gpu.txt"
    timeout 150 python3 -m qoq bench throughput --precision w4a8kv4 --batch 1 --input-len 8 --output-len 256 \
      > "$out/engine-b1.log" 2>&1; echo "engine b1: exit $?"; tail -8 "$out/engine-b1.log" ;;
  prologue)
    timeout 90 python3 -m pytest -q -x tests/kernels/test_gemm.py -k "own_input or touches_no_memory" \
      > "$out/test_gemm_prologue.log" 2>&1; echo "prologue tests: exit $? $(tail -1 "$out/test_gemm_prologue.log")"
    for rep in $(seq 1 ${PROLOGUE_REPS:-2}); do for on in 0 1; do
      QOQ_ACT_PROLOGUE=$on timeout 95 python3 -m qoq bench throughput --precision w4a8kv4 --batch 1 --input-len 8 \
        --output-len 256 2> "$out/b1-prologue$on-$rep.err" | tail -1 > "$out/b1-prologue$on-$rep.json"
      echo "b1 QOQ_ACT_PROLOGUE=$on ($rep): $(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['decode_step_ms'], 'ms', d['tokens_per_s'], 'tok/s')" "$out/b1-prologue$on-$rep.json" 2>&1 | tail -1)"
    done; done ;;
  gemv)
    if [ "${GEMV_TESTS:-1}" = 1 ]; then
      timeout 120 python3 -m pytest -q -x tests/kernels/test_gemm.py -k "gemv" > "$out/test_gemv.log" 2>&1
      echo "gemv tests: exit $? $(tail -1 "$out/test_gemv.log")"
    fi
    # the decode points where the CUDA-core kernel competes (M <= 4), into the table for what follows
    timeout 300 python3 benchmarks/tune_kernels.py --model qoq/configs/llama-3-8b.json --budget-s ${GEMV_BUDGET_S:-200} --ms ${GEMV_MS:-1,4} ${TUNE_ARGS:-} \
      --modes ${TUNE_MODES:-w4a8_g128,w4a8_per_channel,w8a8} --attention-bits "" --out "$out/tune-gemv-$gpu.json" \
      --results "$out/tune-gemv-results-$gpu.json" > "$out/tune-gemv.log" 2>&1
    rc=$?; echo "tune gemv: exit $rc"; grep -E "M=|tuned" "$out/tune-gemv.log" | tail -30
    [ $rc = 0 ] && cp "$out/tune-gemv-$gpu.json" "$(table_path)" ;;
  generate)
    work=/tmp/qoq-gen; mkdir -p $work
    python3 - "$work" <<'PY' || exit 1
import sys, pathlib
from qoq.bench.random_hf import random_text, write_random_hf_folder
from qoq.bench.random_model import bundled_config
work = pathlib.Path(sys.argv[1]); cfg = bundled_config("llama-3-8b")
write_random_hf_folder(cfg, work / "hf", device="cuda")
(work / "calib.txt").write_text(random_text(80_000, cfg.vocab_size))
PY
    timeout 300 python3 -m qoq quantize "$work/hf" --out "$work/ckpt" --calib "$work/calib.txt" --no-gptq \
      > "$out/generate-quantize.log" 2>&1; echo "quantize: exit $?"; tail -5 "$out/generate-quantize.log"
    for i in 1 2; do
      timeout 120 python3 -m qoq generate "$work/ckpt" -p "The capital of France is" --max-tokens 256 \
        > "$out/generate-$i.log" 2>&1; echo "generate $i: exit $?"; tail -2 "$out/generate-$i.log" | cut -c1-300
    done
    timeout 150 python3 -m qoq bench throughput --precision w4a8kv4 --batch 1 --input-len 8 --output-len 256 \
      > "$out/generate-engine-b1.log" 2>&1; echo "engine b1: exit $?"; tail -8 "$out/generate-engine-b1.log" ;;
  atune)
    timeout 560 python3 benchmarks/tune_kernels.py --model qoq/configs/llama-3-8b.json --modes "" \
      --attention-bits "${TUNE_ATTENTION_BITS-4,8}" --attention-budget-s ${ATUNE_BUDGET_S:-150} \
      --out "$out/atune-$gpu.json" --results "$out/atune-results-$gpu.json" > "$out/atune.log" 2>&1
    rc=$?; echo "atune: exit $rc"; grep -v Warning "$out/atune.log" | tail -12
    [ $rc = 0 ] && cp "$out/atune-$gpu.json" "$(table_path)" ;;
  attention)
    timeout 200 python3 benchmarks/bench_attention.py --out "$out/attention-$gpu.json" > "$out/attention.log" 2>&1
    echo "attention: exit $?"; grep -v Warning "$out/attention.log" | tail -10 ;;
  dprobe)
    timeout 300 python3 benchmarks/probe_decode.py --out "$out/decode-probe-$gpu.json" ${PROBE_ARGS:-} \
      > "$out/decode-probe.log" 2>&1
    echo "dprobe: exit $?"; grep -v Warning "$out/decode-probe.log" | tail -40 ;;
  append)
    timeout 150 python3 -m pytest -q -x tests/kernels/test_attention.py -k "append" > "$out/test_append.log" 2>&1
    echo "append kernel tests: exit $? $(tail -1 "$out/test_append.log")"
    QOQ_DECODE_APPEND=1 timeout 300 python3 -m pytest -q -x tests/engine/test_gpu_engine.py > "$out/test_append_engine.log" 2>&1
    echo "GPU engine tests with QOQ_DECODE_APPEND=1: exit $? $(tail -1 "$out/test_append_engine.log")"
    AB_CASES="off:QOQ_DECODE_APPEND=0 on:QOQ_DECODE_APPEND=1" AB_BATCHES=${APPEND_BATCHES:-64} AB_REPS=${APPEND_REPS:-2} \
      ab_runs append ;;
  ab)
    ab_runs ab ;;
  *) echo "unknown part $part"; exit 2 ;;
esac
done
