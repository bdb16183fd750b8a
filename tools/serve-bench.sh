#!/usr/bin/env bash
# Served throughput against the engine's own benchmark, on one GPU, in one run:
#   1. `demask bench` W2 at batch 64 (prompt 256, gen 256, block 32, dual, 4 tokens/step);
#   2. `demask serve --preset llada-8b` (synthetic weights) and `demask loadgen` with 64
#      streaming clients on the same workload: served tokens/s, time to first block and to
#      completion (p50/p99);
#   3. a soak: SOAK_REQUESTS (10000) short requests (prompt 32, gen 32) at 64 clients, with the
#      server's device memory sampled every second and every request accounted for.
# Usage: tools/serve-bench.sh [DEMASK_BIN] [OUT_DIR]   (env: PRESET, REQUESTS, SOAK_REQUESTS, PORT)
set -uo pipefail
bin="${1:-target/release/demask}"
out="${2:-serve-bench-out}"
preset="${PRESET:-llada-8b}"
port="${PORT:-8311}"
mkdir -p "$out"
status=0
# GET a URL quietly; success when it answers 200 (python3, since curl may be absent).
get() { python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$1" >/dev/null 2>&1; }

echo "== bench W2 batch 64 ($preset)"
"$bin" bench --workload w2 --preset "$preset" --batch 64 --tokens-per-step 4 --cache dual \
  --json "$out/w2-b64.json" 2>&1 | tee "$out/bench.log" || status=1

echo "== serve $preset"
"$bin" serve --preset "$preset" --max-batch 64 --max-len 512 --cache dual --port "$port" >"$out/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 1 240); do
  get "http://127.0.0.1:$port/health" && break
  kill -0 $server 2>/dev/null || break
  sleep 1
done
if ! get "http://127.0.0.1:$port/health"; then
  echo "server did not come up"; tail -n 20 "$out/serve.log"; exit 1
fi

echo "== loadgen: 64 streaming clients, prompt 256, gen 256, block 32, dual, schedule:8"
"$bin" loadgen --url "http://127.0.0.1:$port" --clients 64 --requests "${REQUESTS:-256}" --prompt-len 256 \
  --gen-len 256 --block-len 32 --policy schedule:8 --cache dual --json "$out/loadgen.json" 2>&1 | tee "$out/loadgen.log" || status=1

echo "== soak: ${SOAK_REQUESTS:-10000} requests, 64 clients, prompt 32, gen 32"
timeout "${SOAK_TIMEOUT:-240}" "$bin" loadgen --url "http://127.0.0.1:$port" --clients 64 --requests "${SOAK_REQUESTS:-10000}" --prompt-len 32 \
  --gen-len 32 --block-len 32 --policy schedule:8 --cache dual --json "$out/soak.json" 2>&1 | tail -n 8 | tee "$out/soak.log" || status=1
python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())' \
  "http://127.0.0.1:$port/metrics" >"$out/metrics.txt" 2>&1
grep -E '^demask_(requests_total|steps_total|generated_tokens_total|device_memory_used_bytes|active_requests|kv_rows_used)' "$out/metrics.txt"
exit $status
