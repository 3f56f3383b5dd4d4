#!/usr/bin/env bash
# flashep on a GPU machine in one call: versions and topology, the GPU test suite, the benchmark.
#
#   scripts/gpu_check.sh [PHASE ...] [-- BENCH_ARGS ...]
#
# Phases (default: tests bench):
#   tests   pytest -m gpu -v -rfE (each case named as it ends, failures listed at the end); TESTS_ARGS selects (e.g.
#           TESTS_ARGS="-k gpu4 tests/test_gpu_low_latency.py"); FLASHEP_TEST_SHARED_GPU=1 runs the 2- and 4-rank
#           cases too where fewer GPUs are visible (rank processes sharing a GPU: correctness only); with 4 GPUs and
#           no TESTS_ARGS the 2-GPU cases of
#           both suites run at once on GPUs 0-1 and 2-3, then the rest (run_tests_on_pairs)
#   bench   python -m flashep.bench on 2 GPUs, then on 4 GPUs (where there are 4)
#   quick   the same with --quick (few iterations)
#   sweep   normal mode over 256..16384 tokens per rank on 4 GPUs (or all there are), with a plot
# Arguments after `--` go to every benchmark run (e.g. -- --backend triton --num-sms 24,12).
#
# Needs torch and triton installed (no network, no pip install: the repository is put on PYTHONPATH).
# Triton cache: kernels compile into ./.triton_cache; the GPU suites spend most of their time compiling
# (~40 s per test when cold). Every tarball .devcache/triton-cache*.tar.xz (git-ignored; carry it with the device
# tool's `carry: [".devcache"]`), and every one split into parts (NAME.part-aa, -ab, ...), is unpacked first.
# SAVE_TRITON_CACHE=1 writes the entries this call compiled (not those unpacked) as
# $OUT/triton-cache-new.tar.xz, split into 15 MiB parts when larger (a file that comes back holds at most
# 16 MiB); copy them into .devcache under a new name (e.g. triton-cache-<date>-<call>.tar.xz[.part-aa]) for
# the next call. Entries are keyed by kernel source, so a cache stays valid until the kernels change; stale
# tarballs only cost room in the 64 MiB that travel with a call.
# RECORD_LAUNCHES=1 records every distinct kernel launch of the test ranks (FLASHEP_RECORD_LAUNCHES) and returns
# them as $OUT/launches.tar.xz: commit them under tests/gpu_launches/, and a later session compiles them on a
# machine without a GPU (scripts/warm_triton_cache.py) into the cache tarball above, before its first device call
# (only where Triton is installed at the device's path: the cache key holds it; see that script).
# Keep FLASHEP_TIMEOUT_S at its default (100 s) for the tests on a cold cache: a rank that compiles a new
# kernel variant late keeps its peers' kernels waiting (session 11: two LL cases failed with 20 s and passed
# with the default; the messages were lost, so this is the likely cause, not a proven one).
# Writes logs and JSON into $OUT (or bench/results/<date>-<host>/), at most 8 files, and ends with a
# short summary. Time limits per phase (seconds) can be changed with TESTS_TIMEOUT, BENCH_TIMEOUT and
# SWEEP_TIMEOUT. Exit status: 0 when every phase passed.
# Durations on 2x H200 (2026-11-28): tests ~580 s (most of it compiling kernel variants), bench ~130 s,
# bench with --ll-tokens 1,32,128,256,512 ~190 s; a device call lasts at most 600 s, so run `tests` and
# `bench` in separate calls there. On 4x H200 (session 12) a cold case took ~55 s (LL) and a warm one ~15-35 s;
# the two GPU pairs at once (tests, 4 GPUs) ran 2 + 2 cold normal cases in 74 s.
set -uo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/.triton_cache}"
cache_parent="$(dirname "$TRITON_CACHE_DIR")"
for tarball in .devcache/triton-cache*.tar.xz; do [ -f "$tarball" ] && tar xf "$tarball" -C "$cache_parent"; done
for first in .devcache/triton-cache*.tar.xz.part-aa; do
  [ -f "$first" ] && cat "${first%aa}"* | tar xJf - -C "$cache_parent"
done
touch /tmp/flashep-cache-start  # entries newer than this were compiled by this call
launches_dir=/tmp/flashep-launches
[ "${RECORD_LAUNCHES:-0}" = 1 ] && export FLASHEP_RECORD_LAUNCHES="$launches_dir"
# never NVLink multicast: it can take a shared host's GPUs out of service
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PYTHON="${PYTHON:-python3}"
TESTS_TIMEOUT="${TESTS_TIMEOUT:-600}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-240}"
SWEEP_TIMEOUT="${SWEEP_TIMEOUT:-300}"

phases=()
bench_args=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; bench_args=("$@"); break; fi
  case "$1" in
    tests|bench|quick|sweep) phases+=("$1") ;;
    *) echo "gpu_check.sh: unknown phase '$1' (tests, bench, quick, sweep)" >&2; exit 2 ;;
  esac
  shift
done
[ ${#phases[@]} -eq 0 ] && phases=(tests bench)

OUT="${OUT:-bench/results/$(date -u +%Y%m%d-%H%M%S)-$(hostname -s)}"
mkdir -p "$OUT"
summary=()
failed=0

note() { summary+=("$1"); }

# records PASS / FAIL / TIMEOUT for NAME from the exit status RC of a command run under `timeout LIMIT`
record_verdict() {
  local name="$1" limit="$2" log="$3" rc="$4" verdict="PASS"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="TIMEOUT after ${limit}s"; failed=1
  elif [ "$rc" -ne 0 ]; then verdict="FAIL (exit $rc)"; failed=1; fi
  note "$name: $verdict; log $log"
}

# runs "$@" under `timeout LIMIT`, output teed into LOG; records its verdict for NAME
run_phase() {
  local name="$1" limit="$2" log="$3"; shift 3
  echo "=== $name: $* (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
  record_verdict "$name" "$limit" "$log" "${PIPESTATUS[0]}"
  return 0
}

echo "=== versions"
"$PYTHON" - <<'EOF'
import sys, torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}")
for i in range(torch.cuda.device_count()):
    print(f"GPU {i}: {torch.cuda.get_device_name(i)}")
EOF
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>/dev/null
echo "=== nvidia-smi topo -m"
nvidia-smi topo -m 2>/dev/null || echo "(nvidia-smi topo unavailable)"
num_gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
echo "=== $num_gpus GPUs visible; phases: ${phases[*]}; results in $OUT"

bench_on() {  # bench_on NAME NUM_GPUS LIMIT EXTRA_ARGS...
  local name="$1" gpus="$2" limit="$3"; shift 3
  if [ "$num_gpus" -lt "$gpus" ]; then note "$name: SKIPPED (needs $gpus GPUs, $num_gpus visible)"; return; fi
  local devices
  devices=$(seq -s, 0 $((gpus - 1)))
  CUDA_VISIBLE_DEVICES="$devices" run_phase "$name" "$limit" "$OUT/$name.log" \
    "$PYTHON" -m flashep.bench "$@" "${bench_args[@]}"
}

# With 4 GPUs and no TESTS_ARGS: the 2-GPU cases of the two suites at once on GPUs 0-1 and 2-3 (most of a cold
# suite is compiling, so two pairs halve it), then every other case on all GPUs. TESTS_TIMEOUT bounds each step.
run_tests_on_pairs() {
  local suite rc i=0 pids=() names=()
  for suite in low_latency normal; do
    local devices="$((2 * i)),$((2 * i + 1))"
    echo "=== tests-gpu2-$suite: GPUs $devices (limit ${TESTS_TIMEOUT}s)"
    CUDA_VISIBLE_DEVICES="$devices" timeout --kill-after=10 "$TESTS_TIMEOUT" "$PYTHON" -m pytest -m gpu -v -rfE \
      -k gpu2 "tests/test_gpu_$suite.py" > "$OUT/tests-gpu2-$suite.log" 2>&1 &
    pids+=($!); names+=("tests-gpu2-$suite"); i=$((i + 1))
  done
  for i in 0 1; do
    wait "${pids[$i]}"; rc=$?
    record_verdict "${names[$i]}" "$TESTS_TIMEOUT" "$OUT/${names[$i]}.log" "$rc"
    grep -E "PASSED|FAILED|ERROR" "$OUT/${names[$i]}.log"
  done
  run_phase tests-rest "$TESTS_TIMEOUT" "$OUT/tests-rest.log" "$PYTHON" -m pytest -m gpu -v -rfE -k "not gpu2"
}

for phase in "${phases[@]}"; do
  case "$phase" in
    tests)
      if [ "$num_gpus" -ge 4 ] && [ -z "${TESTS_ARGS:-}" ]; then
        run_tests_on_pairs
      else
        # shellcheck disable=SC2086  # TESTS_ARGS is a list of pytest arguments
        run_phase tests "$TESTS_TIMEOUT" "$OUT/tests.log" "$PYTHON" -m pytest -m gpu -v -rfE ${TESTS_ARGS:-}
      fi ;;
    bench|quick)
      quick=()
      [ "$phase" = quick ] && quick=(--quick)
      bench_on "${phase}_2gpu" 2 "$BENCH_TIMEOUT" "${quick[@]}" --json "$OUT/${phase}_2gpu.json"
      bench_on "${phase}_4gpu" 4 "$BENCH_TIMEOUT" "${quick[@]}" --json "$OUT/${phase}_4gpu.json" ;;
    sweep)
      gpus=$(( num_gpus >= 4 ? 4 : num_gpus ))
      bench_on sweep "$gpus" "$SWEEP_TIMEOUT" --mode normal --sweep --json "$OUT/sweep.json" \
        --plot "$OUT/sweep.png" ;;
  esac
done

if [ "${RECORD_LAUNCHES:-0}" = 1 ] && [ -d "$launches_dir" ]; then
  cat "$launches_dir"/*.jsonl | sort -u > /tmp/launches.jsonl
  XZ_OPT=-T0 tar cJf "$OUT/launches.tar.xz" -C /tmp launches.jsonl
fi
if [ "${SAVE_TRITON_CACHE:-0}" = 1 ]; then
  (cd "$cache_parent" && find "$(basename "$TRITON_CACHE_DIR")" -mindepth 1 -maxdepth 1 -newer /tmp/flashep-cache-start \
     | XZ_OPT=-T0 tar cJf /tmp/triton-cache-new.tar.xz -T -)
  if [ "$(stat -c %s /tmp/triton-cache-new.tar.xz)" -gt $((15 << 20)) ]; then
    split -b 15M /tmp/triton-cache-new.tar.xz "$OUT/triton-cache-new.tar.xz.part-"
  else
    cp /tmp/triton-cache-new.tar.xz "$OUT/"
  fi
fi

echo
echo "=== summary ($OUT)"
for line in "${summary[@]}"; do
  echo "$line"
  log="${line##*; log }"
  [ -f "$log" ] || continue
  case "$line" in
    tests*) grep -E "passed|failed|error" "$log" | tail -n 1 | sed "s/^/    /" ;;
    *) grep -E "^flashep\.bench: " "$log" | sed 's/^/    /' ;;
  esac
done
[ "$failed" -eq 0 ] && echo "gpu_check: ALL PASSED" || echo "gpu_check: SOMETHING FAILED"
exit "$failed"
