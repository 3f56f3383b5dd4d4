#!/usr/bin/env bash
# session 19 call 4 (1 GPU): the host breakdown with replays (the probe fixed after call 3), and the replay
# test with 4 ranks sharing the GPU
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
for first in .devcache/triton-cache-s19*.part-aa; do cat "${first%aa}"* | tar xJf - -C .; done
T0=$(date +%s)
timeout 120 python3 scripts/probe_normal_host.py --ranks 1 --breakdown 2>&1 | grep -v -i warn | tee $OUT/host.txt
echo "=== probe took $(( $(date +%s) - T0 )) s"
FLASHEP_TEST_SHARED_GPU=1 timeout 200 python3 -m pytest -m gpu -v -rfE -k "one_handle and gpu4" tests/test_gpu_normal.py 2>&1 | tee $OUT/one-handle-gpu4-shared.log | grep -E "PASSED|FAILED|ERROR|passed|failed|AssertionError|Error:" | cut -c1-600 | head
echo "=== total $(( $(date +%s) - T0 )) s"
