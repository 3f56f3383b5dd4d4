#!/usr/bin/env bash
# session 18 call 6: 4 ranks sharing the GPU: the normal direct-write dispatch (its slot re-read, 596b8a4) and
# the copy-engine combine, then the LL token counts 0..T_max (cases not yet run with 4 ranks)
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 FLASHEP_TEST_SHARED_GPU=1
for t in .devcache/triton-cache*.tar.xz; do tar xf $t -C .; done
run() { local name=$1 limit=$2; shift 2; echo "=== $name $(date +%T)"; timeout $limit python3 -m pytest -m gpu -v -rfE "$@" 2>&1 | tee $OUT/$name.log | grep -E "PASSED|FAILED|ERROR|passed|failed|SKIPPED|AssertionError|Error:" | cut -c1-700 | head -20; }
run gpu4-direct 110 -k "gpu4 and direct_write_dispatch" tests/test_gpu_normal.py
run gpu4-copy-engine 75 -k "gpu4 and copy_engine" tests/test_gpu_normal.py
run gpu4-ll-counts 60 -k "gpu4 and zero_to_t_max" tests/test_gpu_low_latency.py
