#!/usr/bin/env bash
# session 21, call 3 (2x H200): host vs GPU per call of the non-cached dispatch, launched ahead of its host sync
# or not, in back-to-back loops (probe_normal_host.py), alternating, with and without the expert-id check's sync
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
for first in .devcache/triton-cache-s*.part-aa; do cat "${first%aa}"* | tar xJf - -C .; done
T0=$(date +%s)
for check in 1 0; do for round in 1 2; do for ahead in 0 1; do
  echo "=== CHECK_VALUES=$check round $round AHEAD=$ahead $(( $(date +%s) - T0 )) s"
  FLASHEP_CHECK_VALUES=$check FLASHEP_DISPATCH_AHEAD=$ahead timeout 100 python3 scripts/probe_normal_host.py --ranks 2 --calls 100 2>&1 \
    | tee -a $OUT/probe-host.log | grep -E "^op|host sync|cached FP8|Error|error"
done; done; done
echo "=== total $(( $(date +%s) - T0 )) s"
