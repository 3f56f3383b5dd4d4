#!/usr/bin/env bash
# session 19 call 5 (1 GPU): replays that swap the handle's tensors and the row count (the next step's handle
# replays the same launch): the replay test at 1, 2 and 4 ranks (shared GPU), the normal suite at one rank,
# the host probe
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
for first in .devcache/triton-cache-s19*.part-aa; do cat "${first%aa}"* | tar xJf - -C .; done
T0=$(date +%s)
run() { local name=$1 limit=$2; shift 2; echo "=== $name $(( $(date +%s) - T0 )) s"; timeout $limit python3 -m pytest -m gpu -v -rfE "$@" 2>&1 | tee $OUT/$name.log | grep -E "PASSED|FAILED|ERROR|passed|failed|AssertionError|Error:" | cut -c1-600 | head -20; }
run one-handle-gpu1 90 -k "one_handle and gpu1" tests/test_gpu_normal.py
FLASHEP_TEST_SHARED_GPU=1 run one-handle-gpu2-shared 90 -k "one_handle and gpu2" tests/test_gpu_normal.py
FLASHEP_TEST_SHARED_GPU=1 run one-handle-gpu4-shared 150 -k "one_handle and gpu4" tests/test_gpu_normal.py
timeout 90 python3 scripts/probe_normal_host.py --ranks 1 --breakdown 2>&1 | grep -v -i warn | tee $OUT/host.txt
run normal-gpu1 $(( 540 - ($(date +%s) - T0) )) -k "gpu1 and not one_handle" tests/test_gpu_normal.py
echo "=== total $(( $(date +%s) - T0 )) s"
