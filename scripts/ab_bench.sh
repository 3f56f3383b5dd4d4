#!/usr/bin/env bash
# The benchmark of this working tree next to that of an earlier revision, in one run on the same GPUs
# (timings compare only within one machine and one run).
#
#   scripts/ab_bench.sh BASE_REV NAME [BENCH_ARGS ...]
#
# Runs `python -m flashep.bench BENCH_ARGS` for this tree, then for BASE_REV (a git worktree in /tmp), and
# prints the summary lines and the hook-phase rows of both; the logs go to $OUT (or /tmp) as NAME-new.log
# and NAME-base.log (logs only: a device call returns at most 8 files).
set -u
cd "$(dirname "$0")/.."
base_rev="$1" name="$2"; shift 2
out="${OUT:-/tmp}"
base_dir="/tmp/flashep-base-$base_rev"
[ -d "$base_dir" ] || git worktree add -q --detach "$base_dir" "$base_rev"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
for side in new base; do
  dir="$PWD"
  [ "$side" = base ] && dir="$base_dir"
  (cd "$dir" && PYTHONPATH="$dir" timeout "${BENCH_LIMIT:-200}" python3 -m flashep.bench "$@" \
     > "$out/$name-$side.log" 2>&1)
  echo "=== $name $side ($( [ "$side" = base ] && echo "$base_rev" || git rev-parse --short HEAD)+tree)"
  grep -E "^flashep\.bench:|\(hook\) \*|\(CUDA graph\)" "$out/$name-$side.log" | grep -v "wrote" | cut -c1-80
done
