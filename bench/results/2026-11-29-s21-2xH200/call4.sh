#!/usr/bin/env bash
# session 21, call 4 (2x H200): the normal GPU suite at 2 GPUs and at one GPU with the dispatch launched ahead
# of its host sync (bc267f1; kernels of 4886d6a)
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
for first in .devcache/triton-cache-s*.part-aa; do cat "${first%aa}"* | tar xJf - -C .; done
T0=$(date +%s)
for world in gpu2 gpu1; do
  echo "=== $world $(( $(date +%s) - T0 )) s"
  timeout $(( 390 - ($(date +%s) - T0) )) python3 -m pytest -m gpu -v -rfE -k $world tests/test_gpu_normal.py > $OUT/normal-$world.log 2>&1
  grep -E "PASSED|FAILED|ERROR|passed|failed|AssertionError|Error:" $OUT/normal-$world.log | cut -c1-400 | head -30
done
echo "=== total $(( $(date +%s) - T0 )) s"
