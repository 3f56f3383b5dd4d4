#!/usr/bin/env bash
# session 18 call 1: first GPU run of the heap's per-rank offsets (d42de74) and of the LL reruns with ranks
# apart; repeats of the LL twenty reruns at 4 shared ranks; the normal gpu1 suite in full
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
tar xf .devcache/triton-cache.tar.xz -C .
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
run() { local name=$1 limit=$2; shift 2; echo "=== $name $(date +%T)"; timeout $limit python3 -m pytest -m gpu -v -rfE "$@" 2>&1 | tee $OUT/$name.log | grep -E "PASSED|FAILED|ERROR|passed|failed|SKIPPED|AssertionError|Error:" | cut -c1-600 | head -20; }
export FLASHEP_TEST_SHARED_GPU=1
run gpu2-shapes-deepep 110 -k "gpu2 and (shapes or deepep and 256)" tests/test_gpu_normal.py tests/test_gpu_low_latency.py
for i in 1 2 3; do
  run gpu4-apart-$i 70 -k "gpu4 and apart" tests/test_gpu_low_latency.py
done
run gpu2-apart 60 -k "gpu2 and apart" tests/test_gpu_low_latency.py
for i in 1; do
  run gpu4-twenty-$i 60 -k "gpu4 and twenty" tests/test_gpu_low_latency.py
done
unset FLASHEP_TEST_SHARED_GPU
run gpu1-normal 115 -k gpu1 tests/test_gpu_normal.py
XZ_OPT=-T0 tar cJf $OUT/triton-cache.tar.xz .triton_cache
