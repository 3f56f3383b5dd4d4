#!/usr/bin/env bash
# session 21, call 1 (2x H200 expected): the gpu2 cases not run with the final kernels, then the normal gpu2 suite; returns the Triton cache
# then the gpu4 cases of both suites. On 2 GPUs: the gpu2 LL cases not run at c559f6c's kernels (plain variants,
# hooks, copied handle, ranks apart, kernel names) and the normal gpu2 suite. One GPU: gpu1 of both suites.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
for first in .devcache/triton-cache-s*.part-aa; do cat "${first%aa}"* | tar xJf - -C .; done
n=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l); echo "$n GPUs"
T0=$(date +%s)
run() { local name=$1 limit=$2; shift 2; echo "=== $name $(( $(date +%s) - T0 )) s"; timeout $limit python3 -m pytest -m gpu -v -rfE "$@" 2>&1 | tee $OUT/$name.log | grep -E "PASSED|FAILED|ERROR|passed|failed|AssertionError|Error:" | cut -c1-600 | head -40; }
if [ "$n" -ge 4 ]; then
  timeout 240 python3 -m flashep.bench --num-sms 24,12 --json $OUT/bench4.json 2>&1 | tee $OUT/bench4.log | grep -E "^flashep.bench:|MISMATCH|Error|tok, 24 SMs|128 tok"
  run gpu4 $(( 560 - ($(date +%s) - T0) )) -k gpu4
elif [ "$n" -ge 2 ]; then
  run ll-gpu2 280 -k "gpu2 and (copied or hooks or plain or apart or kernel_name or 288)" tests/test_gpu_low_latency.py
  run normal-gpu2 $(( 515 - ($(date +%s) - T0) )) -k gpu2 tests/test_gpu_normal.py
else
  run gpu1 540 -k gpu1
fi
echo "=== total $(( $(date +%s) - T0 )) s"
tar cf - .triton_cache | xz -1 -T8 > $OUT/triton-cache-s21-call1.tar.xz; ls -la $OUT
