#!/usr/bin/env bash
# session 20, 2x H200, call 5 (cfabff9): the benchmark at the final defaults (normal + LL 128 tokens), the
# pre-reducing send's token tile 1 vs 2, then the pre-reduce oracle and DeepEP's LL assertions at 2 GPUs
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
for first in .devcache/triton-cache-s*.part-aa; do cat "${first%aa}"* | tar xJf - -C .; done
git log --oneline | head -1
T0=$(date +%s)
timeout 150 python3 -m flashep.bench --num-sms 24,12 --json $OUT/bench2.json 2>&1 | tee $OUT/bench2.log | grep -E "^flashep.bench:|MISMATCH|Error|tok, 24 SMs|128 tok"
echo "--- $(( $(date +%s) - T0 )) s"
SWEEP_LIMIT=45 bash scripts/sweep_knobs.sh low-latency "FLASHEP_LL_PREREDUCE_TOKENS=1" "FLASHEP_LL_PREREDUCE_TOKENS=2" 2>&1 | tee $OUT/sweep.log
left=$(( 285 - ($(date +%s) - T0) ))
echo "=== tests $(( $(date +%s) - T0 )) s, limit $left"
[ $left -gt 30 ] && timeout $left python3 -m pytest -m gpu -v -rfE -k "gpu2 and (prereduced or deepep_assertions and 256])" tests/test_gpu_low_latency.py 2>&1 | tee $OUT/tests2.log | grep -E "PASSED|FAILED|ERROR|passed|failed|AssertionError|Error:" | cut -c1-600
echo "=== total $(( $(date +%s) - T0 )) s"
