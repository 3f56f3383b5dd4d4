#!/usr/bin/env bash
# session 19 call 1 (2 GPUs): benchmark both modes at 24 and 12 SMs, then a quick knob sweep of normal mode
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
touch /tmp/start
nvidia-smi topo -m
T0=$(date +%s)
timeout 300 python3 -m flashep.bench --num-sms 24,12 --json $OUT/bench2.json 2>&1 | tee $OUT/bench2.log | grep -E "^flashep.bench:|MISMATCH|Error|us " | head -80
echo "=== bench took $(( $(date +%s) - T0 )) s"
SWEEP_LIMIT=80 bash scripts/sweep_knobs.sh normal "" "FLASHEP_DIRECT_DISPATCH=1" "FLASHEP_TILE_TOKENS=32" "FLASHEP_COMBINE_RECEIVER_SHARE=0.45" 2>&1 | tee $OUT/sweep.log
echo "=== total $(( $(date +%s) - T0 )) s"
find .triton_cache -mindepth 1 -maxdepth 1 -newer /tmp/start | XZ_OPT=-T0 tar cJf /tmp/tc.tar.xz -T - && split -b 15M /tmp/tc.tar.xz $OUT/triton-cache-s19-call1.tar.xz.part-
ls -la $OUT
