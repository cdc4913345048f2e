#!/usr/bin/env bash
# Every end-to-end case of benchmarks/results/e2e-h100.json, one process per case (a case's
# memory can never leak into the next one's KV-cache sizing). On the GPU machine:
#     QOQ_GIT_COMMIT=<sha> bash benchmarks/run_e2e_h100.sh /tmp/e2e
# then here: python benchmarks/merge_e2e.py benchmarks/results/e2e-h100.json /tmp/e2e/*.json
# and python benchmarks/make_e2e_report.py. It takes ~25 minutes: longer than one device call,
# so start it detached (setsid) and collect /tmp/e2e from later calls.
# A second argument picks a part: l3 (the Llama-3-8B cases, ~15 min) or others (70B, Mistral,
# Llama-2-7B, ~12 min), so that each part fits one device machine's 30-minute hold; core (the
# Llama-3-8B w4a8kv4 per-channel / g128 and fp16 cases at their largest batch, ~3 min); l3-rest
# (the Llama-3-8B cases outside core), l70 (the two 70B cases), 7b (Mistral and Llama-2-7B): each
# fits one 10-minute device command.
set -u
out=${1:-/tmp/e2e}
part=${2:-all}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
budget=${QOQ_TOKEN_BUDGET:-8192}  # the engine's token budget per step; run names get -t<budget> when not 8192
suffix=$([ "$budget" = 8192 ] || echo "-t$budget")
run() {  # config cases hf-batches name
  python benchmarks/bench_e2e.py --config "$1" --max-batch "${QOQ_MAX_BATCH:-2048}" --cases "$2" --hf-batches "$3" \
    --max-num-batched-tokens "$budget" --out "$out/$4$suffix.json" > "$out/$4$suffix.log" 2>&1
}
if [ "$part" = core ]; then  # the headline ratio only: w4a8kv4 at max batch against fp16
run llama-3-8b w4a8kv4:-1 "" l3-w4a8kv4-pc-max
run llama-3-8b w4a8kv4:128 "" l3-w4a8kv4-g128-max
run llama-3-8b w16a16kv16:-1 "" l3-fp16-max
echo done > "$out/ALLDONE"
exit 0
fi
if [ "$part" = l3-rest ]; then
run llama-3-8b w4a8kv4:-1:512 "" l3-w4a8kv4-pc-512
run llama-3-8b w4a8kv4:128:512 "" l3-w4a8kv4-g128-512
run llama-3-8b "" 64,128 l3-hf
run llama-3-8b w8a8kv8:-1 "" l3-w8a8kv8-max
run llama-3-8b w4a8kv8:128 "" l3-w4a8kv8-max
echo done > "$out/ALLDONE"
exit 0
fi
if [ "$part" = l70 ]; then
run llama-2-70b w4a8kv4:128 "" l70-w4a8kv4-g128-max
run llama-2-70b w4a8kv4:-1 "" l70-w4a8kv4-pc-max
echo done > "$out/ALLDONE"
exit 0
fi
if [ "$part" = 7b ]; then
for c in mistral-7b:m7 llama-2-7b:l27; do
  run "${c%%:*}" w16a16kv16:-1 "" "${c##*:}-fp16-max"
  run "${c%%:*}" w4a8kv4:-1 "" "${c##*:}-w4a8kv4-pc-max"
done
echo done > "$out/ALLDONE"
exit 0
fi
if [ "$part" != others ]; then
run llama-3-8b w4a8kv4:-1 "" l3-w4a8kv4-pc-max
run llama-3-8b w16a16kv16:-1 "" l3-fp16-max
run llama-3-8b w4a8kv4:-1:512 "" l3-w4a8kv4-pc-512
run llama-3-8b w4a8kv4:128 "" l3-w4a8kv4-g128-max
run llama-3-8b w4a8kv4:128:512 "" l3-w4a8kv4-g128-512
run llama-3-8b "" 64,128 l3-hf
run llama-3-8b w8a8kv8:-1 "" l3-w8a8kv8-max
run llama-3-8b w4a8kv8:128 "" l3-w4a8kv8-max
fi
if [ "$part" != l3 ]; then
run llama-2-70b w4a8kv4:128 "" l70-w4a8kv4-g128-max
run llama-2-70b w4a8kv4:-1 "" l70-w4a8kv4-pc-max
for c in mistral-7b:m7 llama-2-7b:l27; do
  run "${c%%:*}" w16a16kv16:-1 "" "${c##*:}-fp16-max"
  run "${c%%:*}" w4a8kv4:-1 "" "${c##*:}-w4a8kv4-pc-max"
done
fi
echo done > "$out/ALLDONE"
