#!/usr/bin/env bash
# session 18 call 5: cost of the second flag read in the LL dispatch receive, one rank: the LL benchmark
# with the kernel file of 596b8a4 (new) and of 9893945 (old) alternating, three runs each, one machine
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
tar xf .devcache/triton-cache.tar.xz -C . && tar xf .devcache/triton-cache-s18-ll.tar.xz -C .
for i in 1 2 3; do
  for side in new old; do
    cp .devcache/${side}_low_latency.py flashep/kernels/low_latency.py
    echo "=== $side $i $(date +%T)"
    timeout 100 python3 -m flashep.bench --mode low-latency --backend triton --ll-tokens 128 > $OUT/ll1-$side-$i.txt 2>&1
    grep -E "LL (dispatch|combine)|checks" $OUT/ll1-$side-$i.txt | grep -v "^flashep.bench" | cut -c1-75
  done
done
