#!/usr/bin/env bash
# session 18 call 3 (same machine as call 2, its .triton_cache kept): the new changing-counts test at gpu4 and gpu2
# shared; the LL suite at gpu1; the cache of this session's kernels back in parts under 16 MiB
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
ls .triton_cache | wc -l
run() { local name=$1 limit=$2; shift 2; echo "=== $name $(date +%T)"; timeout $limit python3 -m pytest -m gpu -v -rfE "$@" 2>&1 | tee $OUT/$name.log | grep -E "PASSED|FAILED|ERROR|passed|failed|SKIPPED|AssertionError|Error:" | cut -c1-600 | head -20; }
export FLASHEP_TEST_SHARED_GPU=1
run gpu4-changing-2 110 -k "gpu4 and change_every" tests/test_gpu_low_latency.py
run gpu2-changing 150 -k "gpu2 and change_every" tests/test_gpu_low_latency.py
unset FLASHEP_TEST_SHARED_GPU
run gpu1-ll 260 -k gpu1 tests/test_gpu_low_latency.py
find .triton_cache -mindepth 1 -maxdepth 1 -mmin -40 > /tmp/new.txt; wc -l < /tmp/new.txt
XZ_OPT=-T0 tar cJf /tmp/tc.tar.xz -T /tmp/new.txt && split -b 15M /tmp/tc.tar.xz $OUT/tc-new.part- && ls -la $OUT
