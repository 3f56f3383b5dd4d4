#!/usr/bin/env bash
# session 20, 2x H200, call 3 (e00d7fb): the exact pre-reducing combine (now the default) at two GPUs: its
# GPU tests, then A/B of the LL bench against 5b0e561 (before the row map) twice, then the LL bench at
# 1..512 tokens with the default and with FLASHEP_LL_PREREDUCE=0
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
for first in .devcache/triton-cache-s*.part-aa; do cat "${first%aa}"* | tar xJf - -C .; done
touch /tmp/cache-start
nvidia-smi --query-gpu=name --format=csv,noheader; git log --oneline | head -1
T0=$(date +%s)
timeout 200 python3 -m pytest -m gpu -v -rfE -k "prereduce and gpu2" tests/test_gpu_low_latency.py 2>&1 | tee $OUT/tests-prereduce.log | grep -E "PASSED|FAILED|ERROR|passed|failed|AssertionError|Error:" | cut -c1-600
echo "--- $(( $(date +%s) - T0 )) s"
for round in 1 2; do
  BENCH_LIMIT=80 bash scripts/ab_bench.sh 5b0e561 ll$round --mode low-latency --quick
  echo "--- $(( $(date +%s) - T0 )) s"
done
timeout 120 python3 -m flashep.bench --mode low-latency --ll-tokens 1,32,128,256,512 --json $OUT/ll-tokens.json 2>&1 | tee $OUT/ll-tokens.log | grep -E "^flashep.bench:|MISMATCH|Error| tok "
echo "--- $(( $(date +%s) - T0 )) s"
left=$(( 575 - ($(date +%s) - T0) ))
FLASHEP_LL_PREREDUCE=0 timeout $left python3 -m flashep.bench --mode low-latency --ll-tokens 1,32,128,256,512 --quick 2>&1 | tee $OUT/ll-tokens-plain.log | grep -E "^flashep.bench:|MISMATCH|Error| tok "
(find .triton_cache -newer /tmp/cache-start -type f | XZ_OPT=-T0 tar cJf /tmp/tc.tar.xz -T -)
split -b 15M /tmp/tc.tar.xz "$OUT/triton-cache-s20-x2b.tar.xz.part-"
echo "=== total $(( $(date +%s) - T0 )) s"
