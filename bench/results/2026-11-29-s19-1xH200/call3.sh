#!/usr/bin/env bash
# session 19 call 3 (1 GPU; the 2-GPU kind was no longer lent): launch replays of cached dispatches and
# combines: host time A/B (FLASHEP_FAST_LAUNCH=0: no fast path, no replays), the new GPU test at one rank and
# at two ranks sharing the GPU, the normal GPU suite at one rank
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
for first in .devcache/triton-cache-s19*.part-aa; do cat "${first%aa}"* | tar xJf - -C .; done
touch /tmp/start
T0=$(date +%s)
for fast in 1 0 1; do
  FLASHEP_FAST_LAUNCH=$fast timeout 120 python3 scripts/probe_normal_host.py --ranks 1 --breakdown 2>&1 | grep -v Warn | tee -a $OUT/host.txt | grep -v "^ *_warn"
done
echo "=== probes took $(( $(date +%s) - T0 )) s"
run() { local name=$1 limit=$2; shift 2; echo "=== $name $(( $(date +%s) - T0 )) s"; timeout $limit python3 -m pytest -m gpu -v -rfE "$@" 2>&1 | tee $OUT/$name.log | grep -E "PASSED|FAILED|ERROR|passed|failed|AssertionError|Error:" | cut -c1-600 | head -20; }
run one-handle-gpu1 120 -k "one_handle and gpu1" tests/test_gpu_normal.py
FLASHEP_TEST_SHARED_GPU=1 run one-handle-gpu2-shared 120 -k "one_handle and gpu2" tests/test_gpu_normal.py
run normal-gpu1 $(( 560 - ($(date +%s) - T0) )) -k "gpu1 and not one_handle" tests/test_gpu_normal.py
echo "=== total $(( $(date +%s) - T0 )) s"
find .triton_cache -mindepth 1 -maxdepth 1 -newer /tmp/start | XZ_OPT=-T0 tar cJf /tmp/tc.tar.xz -T - && split -b 15M /tmp/tc.tar.xz $OUT/triton-cache-s19-call3.tar.xz.part-
