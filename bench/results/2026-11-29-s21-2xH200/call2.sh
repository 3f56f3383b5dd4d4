#!/usr/bin/env bash
# session 21, call 2 (2x H200): the non-cached dispatch launched ahead of its host sync (A/B in one call),
# the normal gpu2 cases it touches, the full benchmark (normal 24,12 SMs; LL at 1..512 tokens), the token sweep
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
for first in .devcache/triton-cache-s*.part-aa; do cat "${first%aa}"* | tar xJf - -C .; done
T0=$(date +%s)
mark() { echo "=== $1 $(( $(date +%s) - T0 )) s"; }
rows() { grep -E "^flashep.bench:|MISMATCH|Error|non-cached|tok, 24 SMs|tok, 12 SMs|tok │" "$1" | cut -c1-200; }
mark "A/B ahead=0"
FLASHEP_DISPATCH_AHEAD=0 timeout 90 python3 -m flashep.bench --mode normal --num-sms 24 > $OUT/ab-ahead0.log 2>&1; rows $OUT/ab-ahead0.log
mark "A/B ahead=1"
FLASHEP_DISPATCH_AHEAD=1 timeout 90 python3 -m flashep.bench --mode normal --num-sms 24 > $OUT/ab-ahead1.log 2>&1; rows $OUT/ab-ahead1.log
mark "tests"
timeout 170 python3 -m pytest -m gpu -v -rfE -k "gpu2 and (shapes or default or one_handle)" tests/test_gpu_normal.py > $OUT/tests2.log 2>&1
grep -E "PASSED|FAILED|ERROR|passed|failed|AssertionError|Error:" $OUT/tests2.log | cut -c1-400 | head -30
mark "bench"
timeout 170 python3 -m flashep.bench --num-sms 24,12 --ll-tokens 1,32,128,256,512 --json $OUT/bench2.json > $OUT/bench2.log 2>&1; rows $OUT/bench2.log
left=$(( 575 - ($(date +%s) - T0) ))
mark "sweep (limit $left)"
[ $left -gt 30 ] && timeout $left python3 -m flashep.bench --mode normal --sweep --num-sms 24 --json $OUT/sweep2.json --plot $OUT/sweep2.png > $OUT/sweep2.log 2>&1; rows $OUT/sweep2.log
mark total
