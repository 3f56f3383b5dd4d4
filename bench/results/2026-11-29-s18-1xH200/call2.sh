#!/usr/bin/env bash
# session 18 call 2: the LL flag wait reads the flags again after its barrier (counts from one copy of the
# flags, not from a copy read before the flag came); the failing case (LL twenty reruns at 4 shared ranks)
# repeated, the new test with token counts drawn anew every call, ranks run apart
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
tar xf .devcache/triton-cache.tar.xz -C .
run() { local name=$1 limit=$2; shift 2; echo "=== $name $(date +%T)"; timeout $limit python3 -m pytest -m gpu -v -rfE "$@" 2>&1 | tee $OUT/$name.log | grep -E "PASSED|FAILED|ERROR|passed|failed|SKIPPED|AssertionError|Error:" | cut -c1-600 | head -20; }
export FLASHEP_TEST_SHARED_GPU=1
run gpu4-twenty-1 150 -k "gpu4 and twenty" tests/test_gpu_low_latency.py
run gpu4-changing-1 180 -k "gpu4 and change_every" tests/test_gpu_low_latency.py
for i in 2 3 4; do
  run gpu4-twenty-$i 40 -k "gpu4 and twenty" tests/test_gpu_low_latency.py
done
run gpu4-changing-2 50 -k "gpu4 and change_every" tests/test_gpu_low_latency.py
run gpu2-changing 45 -k "gpu2 and change_every" tests/test_gpu_low_latency.py
run gpu4-apart 35 -k "gpu4 and apart" tests/test_gpu_low_latency.py
XZ_OPT=-T0 tar cJf $OUT/triton-cache.tar.xz .triton_cache
