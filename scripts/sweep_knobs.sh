#!/usr/bin/env bash
# Sweep launch knobs of the Triton kernels with the quick benchmark: one summary block per setting.
#
#   scripts/sweep_knobs.sh MODE "VAR=V VAR=V" ["VAR=V ..."] ...     MODE: normal | low-latency
#
# Each quoted argument is one setting (environment variables for the ranks, e.g. FLASHEP_TILE_TOKENS=16).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mode="$1"; shift
for setting in "$@"; do
  echo "=== $mode: $setting"
  env $setting timeout "${SWEEP_LIMIT:-150}" python3 -m flashep.bench --mode "$mode" --quick 2>&1 \
    | grep -E "^flashep\.bench:|MISMATCH|Error|error:" | grep -v "^flashep.bench: wrote"
done
