# session 19 call 2 (2 GPUs, the same machine as call 1, warm): the 2-GPU cases of both GPU suites
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
timeout 540 python3 -m pytest -m gpu -v -rfE -k gpu2 tests/test_gpu_normal.py tests/test_gpu_low_latency.py 2>&1 | tee $OUT/tests2.log
