#!/usr/bin/env bash
# Builds the GPU suite HERE (no GPU needed) and packs it for a GPU machine that has no Rust:
#
#   gpu-pack/
#     demask              release binary (debug info stripped)
#     tests/<name>        every test binary (lib unit tests = tests/lib, bin unit tests =
#                         tests/bin-demask, integration tests by name)
#     tests/fixtures/     golden fixtures (tests read them via DEMASK_FIXTURES)
#     benches/<name>      criterion benches, when benches/*.rs exist
#     bench.txt           `demask` argument lines to run, one per line (# comments); copied
#                         from tools/bench.txt when present, else a default
#     tools/golden/       the transformers golden script (optional step on the GPU machine)
#     run.sh              runs it all there; logs in gpu-pack/gpu-logs, and with $OUT set
#                         summary.txt, all.log, gpu-logs/*.json (bench reports written there)
#                         and regenerated fixtures copied to $OUT
#
# Usage: tools/gpu-suite.sh            (then copy gpu-pack/ over and run gpu-pack/run.sh)
# The pack must stay under 60 MB: binaries are stripped of debug info and xz-compressed
# (run.sh unpacks them on first use, with xz or else python3's lzma), and the size is checked.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
pack="$root/gpu-pack"
limit_mb="${GPU_PACK_LIMIT_MB:-60}"
export CARGO_TERM_COLOR=never

echo "== gpu-suite: cargo build --release"
cargo build --release

echo "== gpu-suite: cargo test --release --no-run"
tests_json="$(mktemp)"
benches_json="$(mktemp)"
trap 'rm -f "$tests_json" "$benches_json"' EXIT
cargo test --release --no-run --message-format=json >"$tests_json"
shopt -s nullglob
bench_src=(benches/*.rs)
if ((${#bench_src[@]})); then
  echo "== gpu-suite: cargo bench --no-run"
  cargo bench --no-run --message-format=json >"$benches_json"
fi

# "<dest name> <executable>" for every test (and bench) artifact cargo reported.
list_artifacts() {
  python3 - "$1" "$2" <<'PY'
import json, sys
path, want = sys.argv[1], sys.argv[2]
seen = set()
for line in open(path):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    if not m.get("profile", {}).get("test"):
        continue
    kinds, name = m["target"]["kind"], m["target"]["name"]
    if want == "bench":
        if "bench" not in kinds:
            continue
        dest = name
    elif "bench" in kinds:
        continue
    elif "lib" in kinds or "rlib" in kinds:
        dest = "lib"
    elif "bin" in kinds:
        dest = "bin-" + name
    else:
        dest = name
    if dest not in seen:
        seen.add(dest)
        print(dest, m["executable"])
PY
}

rm -rf "$pack"
mkdir -p "$pack/tests/fixtures" "$pack/benches" "$pack/tools"
strip_copy() {
  cp "$1" "$2"
  chmod u+w "$2"
  strip --strip-debug "$2" 2>/dev/null || objcopy --strip-debug "$2"
  xz -T2 -6 "$2"
}
strip_copy target/release/demask "$pack/demask"
n_tests=0
while read -r dest exe; do
  strip_copy "$exe" "$pack/tests/$dest"
  n_tests=$((n_tests + 1))
done < <(list_artifacts "$tests_json" test)
n_benches=0
if [[ -s "$benches_json" ]]; then
  while read -r dest exe; do
    strip_copy "$exe" "$pack/benches/$dest"
    n_benches=$((n_benches + 1))
  done < <(list_artifacts "$benches_json" bench)
fi
cp -r tests/fixtures/. "$pack/tests/fixtures/" 2>/dev/null || true
cp -r tools/golden "$pack/tools/golden"
rm -rf "$pack/tools/golden/__pycache__"
if [[ -f tools/bench.txt ]]; then
  cp tools/bench.txt "$pack/bench.txt"
else
  cat >"$pack/bench.txt" <<'TXT'
# One `demask` argument line per row, run in order by run.sh (# starts a comment).
bench
TXT
fi

cat >"$pack/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the packed demask GPU suite on a GPU machine (no Rust needed): every test binary with
# DEMASK_REQUIRE_GPU=1, the criterion benches, the `demask` lines of bench.txt, and (with
# DEMASK_GOLDEN=1) the transformers golden script. Logs are written to ./gpu-logs; when $OUT is
# set, only a few files are copied there (summary.txt, all.log with every log concatenated,
# gpu-logs/*.json — point `bench --json` there — and the regenerated fixtures), since the
# machine that fetches $OUT limits the file count.
# Knobs: DEMASK_TEST_TIMEOUT (s per binary, 600), DEMASK_TEST_ARGS (passed to every test
# binary, e.g. "--nocapture" or a name filter; tests always run one at a time, since they share
# one GPU stream and a CUDA-graph capture would record another test's launches), RUN_BENCHES=0 to skip criterion,
# CRITERION_ARGS (default "--warm-up-time 1 --measurement-time 2"), DEMASK_BENCH_TIMEOUT (600).
# Sanitizers: DEMASK_SANITIZE="memcheck racecheck synccheck" runs the kernel test binaries
# (DEMASK_SANITIZE_TESTS, default tests/gpu_*) under compute-sanitizer with each tool, graphs
# off, DEMASK_SANITIZE_ARGS passed to every binary (a name filter keeps slow tools short),
# DEMASK_SANITIZE_TIMEOUT s each (600), DEMASK_SANITIZE_OPTS extra compute-sanitizer options
# (e.g. a kernel-name filter); each run's error summary goes to the summary. Run one sanitized
# binary at a time: several at once exhausted device memory on an H100 (the sanitizer then
# stops tracking cuBLASLt launches and the tests' own allocations fail).
# DEMASK_SANITIZE_SPLIT=1 runs each test as its own sanitized process, DEMASK_SANITIZE_JOBS (4)
# at once, each with its own timeout; DEMASK_SANITIZE_SKIP is a grep -E pattern of tests to leave out.
# DEMASK_SANITIZE_ONLY=1 skips the plain test run, the benches and bench.txt.
# Sanitized tests run at sanitizer scale (DEMASK_SANITIZE_SHAPES=small, the default here): the
# production-shape tests cut their sizes but keep each launch's configuration (docs/sanitizers.md);
# DEMASK_SANITIZE_SHAPES=full runs them whole. Sanitized runs take cuBLASLt's first plan
# (DEMASK_GEMM_TUNE=1 unless set): racecheck died timing its other candidates.
# Several runs may share the pack at once (e.g. one per sanitizer tool): give each its own
# DEMASK_RUN_NAME (logs in gpu-logs-NAME, $OUT/summary-NAME.txt and all-NAME.log); unpack first
# with DEMASK_UNPACK_ONLY=1.
set -uo pipefail
pack="$(cd "$(dirname "$0")" && pwd)"
cd "$pack"
run_name="${DEMASK_RUN_NAME:-}"
logs="$pack/gpu-logs${run_name:+-$run_name}"
rm -rf "$logs"
mkdir -p "$logs"
export DEMASK_REQUIRE_GPU=1
export DEMASK_FIXTURES="$pack/tests/fixtures"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"
# Binaries travel xz-compressed; unpack them once.
for z in demask.xz tests/*.xz benches/*.xz; do
  [[ -f "$z" ]] || continue
  if command -v xz >/dev/null; then
    xz -d -f "$z"
  else
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[1][:-3], "wb"))' "$z" && rm -f "$z"
  fi
  chmod +x "${z%.xz}"
done
[[ "${DEMASK_UNPACK_ONLY:-0}" == 1 ]] && exit 0
[[ -d /usr/local/cuda/lib64 ]] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/usr/local/cuda/lib64"
summary="$logs/summary.txt"
: >"$summary"
failed=0
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true; } | tee "$logs/device.txt"

# run_tests NAME BINARY [ENV...]: one libtest binary, its counts appended to the summary.
run_tests() {
  local name="$1" bin="$2" log="$logs/test-$1.log" t0=$SECONDS rc
  shift 2
  echo "== test $name"
  # shellcheck disable=SC2086
  env "$@" timeout "${DEMASK_TEST_TIMEOUT:-600}" "$bin" --test-threads=1 ${DEMASK_TEST_ARGS:-} >"$log" 2>&1
  rc=$?
  local p f i
  p=$(sed -n 's/^test result:.* \([0-9]*\) passed.*/\1/p' "$log" | awk '{s+=$1} END {print s+0}')
  f=$(sed -n 's/^test result:.* \([0-9]*\) failed.*/\1/p' "$log" | awk '{s+=$1} END {print s+0}')
  i=$(sed -n 's/^test result:.* \([0-9]*\) ignored.*/\1/p' "$log" | awk '{s+=$1} END {print s+0}')
  local status=ok
  if [[ $rc -ne 0 ]]; then
    status="FAIL(rc=$rc)"
    [[ $rc -eq 124 ]] && status="TIMEOUT"
    grep -q '^test result:' "$log" || status="$status,no-result"
    failed=1
    grep -E '^test .* FAILED$|panicked at' "$log" | head -n 20
  fi
  printf 'test   %-28s %-18s passed %4d  failed %3d  ignored %3d  %5ds\n' "$name" "$status" "$p" "$f" "$i" \
    $((SECONDS - t0)) | tee -a "$summary"
  sed -n 's/^test \(.*\) \.\.\. FAILED$/         FAILED: \1/p' "$log" | head -n 20 | tee -a "$summary"
}

golden_fresh=""
if [[ "${DEMASK_GOLDEN:-0}" == 1 ]]; then
  echo "== golden fixtures from transformers (tools/golden/run.sh)"
  if PYTHON="${PYTHON:-python3}" tools/golden/run.sh ./demask "$logs/fixtures" >"$logs/golden.log" 2>&1; then
    golden_fresh="$logs/fixtures"
    echo "golden script: ok (fixtures in $golden_fresh)" | tee -a "$summary"
    grep -E '^\[make_golden\] (bidirectional|self-check|wrote)' "$logs/golden.log" | tee -a "$summary"
  else
    echo "golden script: FAILED (see golden.log)" | tee -a "$summary"
    tail -n 20 "$logs/golden.log"
    failed=1
  fi
fi

# run_sanitizer TOOL NAME BINARY [TEST]: one test binary (or, with TEST, that one test of it,
# run with --exact) under compute-sanitizer; its error count (ERROR SUMMARY, or RACECHECK
# SUMMARY's errors) appended to the summary. A failure also touches $logs/.sanitize-failed, since
# split runs happen in background jobs whose variables do not reach this shell.
run_sanitizer() {
  local tool="$1" name="$2" bin="$3" test="${4:-}" t0=$SECONDS rc
  local log="$logs/sanitize-$1-$2${test:+--$test}.log"
  local cs
  cs="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
  if [[ -z "$cs" ]]; then
    echo "sanitize $tool: compute-sanitizer not found" | tee -a "$summary"
    failed=1
    return
  fi
  echo "== $tool $name"
  # shellcheck disable=SC2086
  local args=(--test-threads=1)
  [[ -n "$test" ]] && args+=(--exact "$test")
  DEMASK_GRAPHS=0 DEMASK_SANITIZE_SHAPES="${DEMASK_SANITIZE_SHAPES:-small}" DEMASK_GEMM_TUNE="${DEMASK_GEMM_TUNE:-1}" \
    timeout "${DEMASK_SANITIZE_TIMEOUT:-600}" "$cs" --tool "$tool" --error-exitcode 99 \
    --print-limit 20 ${DEMASK_SANITIZE_OPTS:-} "$bin" "${args[@]}" ${DEMASK_SANITIZE_ARGS:-} >"$log" 2>&1
  rc=$?
  local errs
  errs=$(sed -n -e 's/.*ERROR SUMMARY: \([0-9][0-9]*\) error.*/\1/p' \
    -e 's/.*RACECHECK SUMMARY: .*(\([0-9][0-9]*\) error.*/\1/p' "$log" | awk '{s+=$1} END {print s+0}')
  local p f
  p=$(sed -n 's/^test result:.* \([0-9]*\) passed.*/\1/p' "$log" | awk '{s+=$1} END {print s+0}')
  f=$(sed -n 's/^test result:.* \([0-9]*\) failed.*/\1/p' "$log" | awk '{s+=$1} END {print s+0}')
  local status=ok
  [[ $rc -eq 0 ]] || status="FAIL(rc=$rc)"
  [[ $rc -eq 124 ]] && status="TIMEOUT"
  [[ $rc -eq 0 && $errs -eq 0 ]] || { failed=1; touch "$logs/.sanitize-failed"; }
  printf 'sanitize %-9s %-24s %-14s errors %4d  tests passed %3d failed %2d  %5ds%s\n' "$tool" "$name" "$status" \
    "$errs" "$p" "$f" $((SECONDS - t0)) "${test:+  $test}" | tee -a "$summary"
  grep -E '^========= (Invalid|Race|Barrier|Error|.*hazard)' "$log" | sort | uniq -c | head -n 10 | tee -a "$summary"
}

if [[ "${DEMASK_SANITIZE_ONLY:-0}" != 1 ]]; then
  for bin in tests/*; do
    [[ -f "$bin" && -x "$bin" ]] || continue
    run_tests "$(basename "$bin")" "./$bin"
  done
fi
# DEMASK_SANITIZE_SPLIT=1: every test of a binary is its own sanitized process, and
# DEMASK_SANITIZE_JOBS (4) of them run at once; a slow test then costs its own timeout only.
# DEMASK_SANITIZE_SKIP: a grep -E pattern of test names to leave out (say so in any report).
sanitize_jobs=0
for tool in ${DEMASK_SANITIZE:-}; do
  for bin in ${DEMASK_SANITIZE_TESTS:-tests/gpu_*}; do
    [[ -f "$bin" && -x "$bin" ]] || continue
    if [[ "${DEMASK_SANITIZE_SPLIT:-0}" != 1 ]]; then
      run_sanitizer "$tool" "$(basename "$bin")" "./$bin"
      continue
    fi
    while read -r t; do
      [[ -n "${DEMASK_SANITIZE_SKIP:-}" ]] && grep -Eq "${DEMASK_SANITIZE_SKIP}" <<<"$t" && {
        echo "sanitize $tool $(basename "$bin") skipped: $t" | tee -a "$summary"
        continue
      }
      while (($(jobs -rp | wc -l) >= ${DEMASK_SANITIZE_JOBS:-4})); do wait -n; done
      run_sanitizer "$tool" "$(basename "$bin")" "./$bin" "$t" &
      sanitize_jobs=$((sanitize_jobs + 1))
    done < <("./$bin" --list --format terse 2>/dev/null | sed -n 's/: test$//p')
  done
done
wait
[[ -e "$logs/.sanitize-failed" ]] && failed=1
[[ "${DEMASK_SANITIZE_ONLY:-0}" == 1 ]] && RUN_BENCHES=0
if [[ -n "$golden_fresh" && -x tests/golden ]]; then
  run_tests golden-fresh ./tests/golden "DEMASK_FIXTURES=$golden_fresh"
fi

if [[ "${RUN_BENCHES:-1}" == 1 ]]; then
  for bin in benches/*; do
    [[ -f "$bin" && -x "$bin" ]] || continue
    name="$(basename "$bin")" log="$logs/criterion-$(basename "$bin").log" t0=$SECONDS
    echo "== criterion $name"
    # shellcheck disable=SC2086
    timeout "${DEMASK_BENCH_TIMEOUT:-600}" "./$bin" --bench ${CRITERION_ARGS:---warm-up-time 1 --measurement-time 2} >"$log" 2>&1
    rc=$?
    [[ $rc -eq 0 ]] || failed=1
    printf 'bench  %-28s %-18s %5ds\n' "$name" "$([[ $rc -eq 0 ]] && echo ok || echo "FAIL(rc=$rc)")" \
      $((SECONDS - t0)) | tee -a "$summary"
    # "<name> time: [lo mid hi]" lines (criterion prints long names on their own line).
    awk '/^[^ ]/ && !/time:/ && !/^(Benchmarking|Found|Warning|Gnuplot)/ {name=$1} /time:/ {sub(/^ +/, ""); if ($0 ~ /^time:/) print "       " name " " $0; else print "       " $0}' \
      "$log" | tee -a "$summary"
  done
fi

n=0
while IFS= read -r line || [[ -n "$line" ]]; do
  line="${line%%#*}"
  [[ -n "${line//[[:space:]]/}" ]] || continue
  n=$((n + 1))
  log="$logs/bench-$n.log" t0=$SECONDS
  echo "== demask $line"
  # shellcheck disable=SC2086
  timeout "${DEMASK_BENCH_TIMEOUT:-600}" ./demask $line >"$log" 2>&1
  rc=$?
  [[ $rc -eq 0 ]] || failed=1
  last="$(grep -v '^[[:space:]]*$' "$log" | tail -n 1)"
  printf 'demask %-40s rc %d %5ds | %s\n' "$line" "$rc" $((SECONDS - t0)) "$last" | tee -a "$summary"
done < <([[ "${DEMASK_SANITIZE_ONLY:-0}" == 1 ]] || cat bench.txt)

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  cp "$summary" "$OUT/summary${run_name:+-$run_name}.txt"
  for f in "$logs"/device.txt "$logs"/golden.log "$logs"/test-*.log "$logs"/sanitize-*.log "$logs"/criterion-*.log "$logs"/bench-*.log; do
    [[ -f "$f" ]] && printf '\n######## %s ########\n' "$(basename "$f")" && cat "$f"
  done >"$OUT/all${run_name:+-$run_name}.log"
  [[ -n "$golden_fresh" ]] && cp "$golden_fresh"/golden-*.safetensors "$OUT/"
  for f in "$logs"/*.json; do [[ -f "$f" ]] && cp "$f" "$OUT/"; done  # bench --json reports
fi
echo
echo "================ summary (logs: $logs${OUT:+, copied to $OUT}) ================"
cat "$logs/device.txt"
cat "$summary"
exit "$failed"
RUN
chmod +x "$pack/run.sh" "$pack/tools/golden/"*.sh "$pack/tools/golden/"*.py

echo "== gpu-suite: pack contents"
(cd "$pack" && find . -type f -printf '%s\t%p\n' | sort -k2 | awk -F'\t' '{printf "  %10d  %s\n", $1, $2}')
bytes=$(du -sb "$pack" | cut -f1)
echo "gpu-pack: $n_tests test binaries, $n_benches benches, $((bytes / 1024 / 1024)) MB ($bytes bytes)"
if ((bytes > limit_mb * 1024 * 1024)); then
  echo "gpu-suite: the pack exceeds ${limit_mb} MB" >&2
  exit 1
fi
echo "run it on the GPU machine: gpu-pack/run.sh   (OUT=dir for logs, DEMASK_GOLDEN=1 to regenerate fixtures)"
