#!/usr/bin/env bash
# session 18 call 4 (same machine): the normal direct-write dispatch after its slots are read again after the
# barrier (gpu1 and 2 shared ranks); then whether the new changing-counts test catches the old LL wait
# (the kernel file of 9893945, before the fix, swapped in)
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
run() { local name=$1 limit=$2; shift 2; echo "=== $name $(date +%T)"; timeout $limit python3 -m pytest -m gpu -v -rfE "$@" 2>&1 | tee $OUT/$name.log | grep -E "PASSED|FAILED|ERROR|passed|failed|SKIPPED|AssertionError|Error:" | cut -c1-700 | head -20; }
run gpu1-direct 120 -k "gpu1 and direct" tests/test_gpu_normal.py
export FLASHEP_TEST_SHARED_GPU=1
run gpu2-direct 110 -k "gpu2 and direct and not graph" tests/test_gpu_normal.py
cp .devcache/old_low_latency.py flashep/kernels/low_latency.py
for i in 1 2; do run old-gpu4-changing-$i 100 -k "gpu4 and change_every" tests/test_gpu_low_latency.py; done
