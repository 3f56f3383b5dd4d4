#!/usr/bin/env bash
# session 20 call 1 (1 GPU): the non-cached dispatch and notify replays (66cc71d, 0893d0a, 5b0e561) on a GPU
# for the first time: normal suite at one rank, the normal gpu2 suite with shared ranks, the host probe
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
for first in .devcache/triton-cache-s19*.part-aa; do cat "${first%aa}"* | tar xJf - -C .; done
nvidia-smi --query-gpu=name --format=csv,noheader; nproc
T0=$(date +%s)
run() { local name=$1 limit=$2; shift 2; echo "=== $name $(( $(date +%s) - T0 )) s"; timeout $limit python3 -m pytest -m gpu -v -rfE "$@" 2>&1 | tee $OUT/$name.log | grep -E "PASSED|FAILED|ERROR|passed|failed|AssertionError|Error:" | cut -c1-600 | head -30; }
run normal-gpu1 200 -k "gpu1" tests/test_gpu_normal.py
timeout 90 python3 scripts/probe_normal_host.py --ranks 1 --breakdown 2>&1 | grep -v -i warn | tee $OUT/host.txt
FLASHEP_TEST_SHARED_GPU=1 run normal-gpu2-shared $(( 560 - ($(date +%s) - T0) )) -k "gpu2" tests/test_gpu_normal.py
echo "=== total $(( $(date +%s) - T0 )) s"
