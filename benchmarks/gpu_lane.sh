#!/usr/bin/env bash
# The GPU lane: where a forward pass's time goes (benchmarks/gpu_profile.py), the whole test
# suite with the GPU as MLX's default device, then aim-mlx against PyTorch side by side
# (benchmarks/vs_pytorch_gpu.py). Everything it writes goes to $OUT.
# On the borrowed GPU machine, from the project's root, after `eval "$(bash .gpu/bootstrap.sh)"`
# (the exact calls: benchmarks/gpu_lane_commands.md). LANE_SMOKE=1 runs a small version of it
# anywhere (the GPU tests and the benchmark's --smoke), which is how tests check this script.
# Where nvidia-smi is found, the card's clocks are logged during the benchmark (gpu_clocks.csv).
#   LANE_TEST_TIMEOUT   seconds for the test suite (default 300)
#   LANE_BENCH_SECONDS  seconds for the benchmark (default 190; it stops starting new work 25 s
#                       before, and keeps what it measured)
#   LANE_TOTAL_SECONDS  if set, the benchmark gets what is left of it after the tests (at most
#                       LANE_BENCH_SECONDS when that is set too)
#   LANE_PARTS          "profile tests bench" (default), or some of them
#   LANE_BENCH_ARGS     more arguments for vs_pytorch_gpu.py (e.g. "--models aim-600M,aim-1B")
#   LANE_TEST_WORKERS   pytest-xdist workers where it is installed (default 12; 0: one process)
#   LANE_PROFILE_SECONDS  seconds for gpu_profile.py (default 150)
#   LANE_PROFILE_ARGS   more arguments for gpu_profile.py (e.g. "--parts kernels")
#   LANE_BUNDLE         1: at the end, everything in $OUT/lane-files.tar.gz beside the summaries
set -uo pipefail
: "${OUT:?set OUT to the folder whose files come back}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SMOKE=${LANE_SMOKE:-0}
PARTS=${LANE_PARTS:-profile tests bench}
status=0

{
  date -u
  nvidia-smi 2>&1 || echo "(no nvidia-smi)"
  nvidia-smi -q -d POWER,CLOCK,PERFORMANCE 2>&1 || true
  $PY -m aim_mlx.cli info
} > "$OUT/machine.txt" 2>&1

if [[ " $PARTS " == *" profile "* ]]; then
  args=(--out "$OUT")
  [ "$SMOKE" = 1 ] && args+=(--smoke)
  read -r -a extra <<< "${LANE_PROFILE_ARGS:-}"
  args+=("${extra[@]}")
  timeout "${LANE_PROFILE_SECONDS:-150}" $PY benchmarks/gpu_profile.py "${args[@]}" \
    > "$OUT/profile.log" 2>&1
  rc=$?
  echo "profile exit status: $rc" >> "$OUT/profile.log"
  tail -n 40 "$OUT/profile.log"
  [ "$rc" = 0 ] || status=1
fi

if [[ " $PARTS " == *" tests "* ]]; then
  # -v: each test's name and outcome as it ends, so a run cut short still says what failed;
  # SIGINT at the time limit lets pytest write its summary and the XML.
  args=(-v -rfE --tb=short --durations=20 -p no:cacheprovider --junitxml "$OUT/pytest.xml")
  $PY -c "import coremltools" 2>/dev/null || args+=(--ignore tests/test_coreml.py)
  workers=${LANE_TEST_WORKERS:-12}
  if [ "$SMOKE" != 1 ] && [ "$workers" != 0 ] && $PY -c "import xdist" 2>/dev/null; then
    args+=(-n "$workers")
  fi
  if [ "$SMOKE" = 1 ]; then args+=(tests/test_gpu.py tests/test_runtime.py); else args+=(tests); fi
  timeout -s INT -k 20 "${LANE_TEST_TIMEOUT:-300}" $PY -m pytest "${args[@]}" > "$OUT/pytest.txt" 2>&1
  rc=$?
  echo "pytest exit status: $rc" >> "$OUT/pytest.txt"
  grep -E "^(FAILED|ERROR) |passed|failed" "$OUT/pytest.txt" | tail -n 30
  [ "$rc" = 0 ] || status=1
fi

if [[ " $PARTS " == *" bench "* ]]; then
  seconds=${LANE_BENCH_SECONDS:-190}
  if [ -n "${LANE_TOTAL_SECONDS:-}" ]; then
    left=$((LANE_TOTAL_SECONDS - SECONDS))
    if [ -z "${LANE_BENCH_SECONDS:-}" ] || [ "$left" -lt "$seconds" ]; then seconds=$left; fi
  fi
  args=(--out "$OUT" --max-seconds "$((seconds - 25))")
  [ "$SMOKE" = 1 ] && args+=(--smoke)
  read -r -a extra <<< "${LANE_BENCH_ARGS:-}"
  args+=("${extra[@]}")
  clocks=""
  if command -v nvidia-smi > /dev/null; then
    # The card's clocks, power and throttling every 0.5 s while the benchmark runs: does it hold
    # its clocks under sustained load?
    fields=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active
    nvidia-smi --query-gpu="$fields" --format=csv -lms 500 > "$OUT/gpu_clocks.csv" 2>&1 &
    clocks=$!
  fi
  timeout "$seconds" $PY benchmarks/vs_pytorch_gpu.py "${args[@]}" > "$OUT/bench.log" 2>&1
  rc=$?
  if [ -n "$clocks" ]; then kill "$clocks" 2> /dev/null; wait "$clocks" 2> /dev/null; fi
  echo "benchmark exit status: $rc" >> "$OUT/bench.log"
  if [ -f "$OUT/vs_pytorch_gpu.md" ]; then cat "$OUT/vs_pytorch_gpu.md"; else tail -n 20 "$OUT/bench.log"; fi
  [ "$rc" = 0 ] || status=1
fi

if [ "${LANE_BUNDLE:-0}" = 1 ]; then
  # Fewer files to bring back (the device tool returns 8 at most): every file in one archive,
  # with the summaries beside it.
  bundle=$(mktemp -d)/lane-files.tar.gz
  tar czf "$bundle" -C "$OUT" . && mv "$bundle" "$OUT/"
  find "$OUT" -maxdepth 1 -type f ! -name lane-files.tar.gz ! -name vs_pytorch_gpu.md \
    ! -name gpu_profile.md ! -name machine.txt -delete
fi
exit $status
