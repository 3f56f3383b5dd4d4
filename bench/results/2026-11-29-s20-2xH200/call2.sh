#!/usr/bin/env bash
# session 20, 2x H200: the benchmark at defaults (normal: replays of every launch, combine share 0.45, first
# full run; LL: the dispatch with its new row map), the LL bench with the pre-reducing combine, then the
# prereduce GPU tests at two real GPUs; the new Triton cache comes back
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
for first in .devcache/triton-cache-s19*.part-aa; do cat "${first%aa}"* | tar xJf - -C .; done
touch /tmp/cache-start
nvidia-smi --query-gpu=name --format=csv,noheader; nproc; nvidia-smi topo -m | head -4
T0=$(date +%s)
echo "=== bench $(( $(date +%s) - T0 )) s"
timeout 230 python3 -m flashep.bench --num-sms 24,12 --json $OUT/bench2.json 2>&1 | tee $OUT/bench2.log | grep -E "^flashep.bench:|MISMATCH|Error|tok, 24 SMs|tok, 12 SMs|128 tok"
echo "=== sweep $(( $(date +%s) - T0 )) s"
SWEEP_LIMIT=120 bash scripts/sweep_knobs.sh low-latency "FLASHEP_LL_PREREDUCE=1" 2>&1 | tee $OUT/sweep.log
left=$(( 560 - ($(date +%s) - T0) ))
echo "=== tests $(( $(date +%s) - T0 )) s, limit $left"
timeout $left python3 -m pytest -m gpu -v -rfE -k "prereduce and gpu2" tests/test_gpu_low_latency.py 2>&1 | tee $OUT/tests2.log | grep -E "PASSED|FAILED|ERROR|passed|failed|AssertionError|Error:" | cut -c1-600
(find .triton_cache -newer /tmp/cache-start -type f | XZ_OPT=-T0 tar cJf /tmp/tc.tar.xz -T -)
split -b 15M /tmp/tc.tar.xz "$OUT/triton-cache-s20-x2.tar.xz.part-"
echo "=== total $(( $(date +%s) - T0 )) s"
