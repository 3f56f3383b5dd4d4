#!/usr/bin/env bash
# session 21, call 6 (2x H200): after the cached and non-cached launches share one helper: replays and reruns
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
for first in .devcache/triton-cache-s*.part-aa; do cat "${first%aa}"* | tar xJf - -C .; done
timeout 200 python3 -m pytest -m gpu -v -rfE -k "gpu2 and (one_handle or shapes)" tests/test_gpu_normal.py 2>&1 | tee $OUT/normal-gpu2.log | grep -E "PASSED|FAILED|ERROR|passed|failed|AssertionError|Error:" | cut -c1-400
