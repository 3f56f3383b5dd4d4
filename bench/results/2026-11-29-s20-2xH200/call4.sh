#!/usr/bin/env bash
# session 20, 2x H200, call 4 (020ecba+): the row map written in the dispatch's copy: A/B of the LL bench
# against 5b0e561 twice; the pre-reducing combine's token tile (COMBINE_TILE_ROWS 2 / 8 vs 4); then the LL GPU
# tests that touch the map and both combines at 2 GPUs, within the time left
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
for first in .devcache/triton-cache-s*.part-aa; do cat "${first%aa}"* | tar xJf - -C .; done
touch /tmp/cache-start
nvidia-smi --query-gpu=name --format=csv,noheader; git log --oneline | head -1
T0=$(date +%s)
for round in 1 2; do
  BENCH_LIMIT=80 bash scripts/ab_bench.sh 5b0e561 ll$round --mode low-latency --quick
  echo "--- $(( $(date +%s) - T0 )) s"
done
SWEEP_LIMIT=60 bash scripts/sweep_knobs.sh low-latency "FLASHEP_LL_COMBINE_TILE_ROWS=2" "FLASHEP_LL_COMBINE_TILE_ROWS=8" 2>&1 | tee $OUT/sweep.log
left=$(( 470 - ($(date +%s) - T0) ))
echo "=== tests $(( $(date +%s) - T0 )) s, limit $left"
timeout $left python3 -m pytest -m gpu -v -rfE -k "gpu2 and (prereduce or change_every or zero_to or 256)" tests/test_gpu_low_latency.py 2>&1 | tee $OUT/tests2.log | grep -E "PASSED|FAILED|ERROR|passed|failed|AssertionError|Error:" | cut -c1-600
(find .triton_cache -newer /tmp/cache-start -type f | XZ_OPT=-T0 tar cJf /tmp/tc.tar.xz -T -)
ls -la /tmp/tc.tar.xz
echo "=== total $(( $(date +%s) - T0 )) s"
