import os, torch, torch.distributed as dist
os.environ.setdefault("NCCL_NVLS_ENABLE", "0"); os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"); os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
torch.cuda.set_device(0)
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29555", rank=0, world_size=1, device_id=torch.device("cuda", 0))
from flashep.transport.heap import SymmetricHeap
from flashep.transport.pool import OutputPool
heap = SymmetricHeap(dist.group.WORLD, 256 << 20, torch.device("cuda", 0))
pool = OutputPool(dist.group.WORLD, 256 << 20, torch.device("cuda", 0), None)
_, block = pool.carve(64 << 20)
src = torch.randn(30 << 18, device="cuda")  # 30 MiB of fp32
plain = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
def t(dst):
    d = dst[: src.numel() * 4].view(torch.float32)
    for _ in range(5): d.copy_(src)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(50): d.copy_(src)
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) * 1e3 / 50
for name, dst in (("torch.empty", plain), ("symmetric heap", heap.local), ("output pool block", block), ("torch.empty again", plain)):
    print(f"copy 30 MiB into {name}: {t(dst):.1f} us", flush=True)
dist.destroy_process_group()
