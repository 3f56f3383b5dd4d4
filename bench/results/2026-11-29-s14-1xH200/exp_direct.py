"""Why is the direct-write dispatch kernel slower? One rank, cached FP8 dispatch, kernel time per variant."""
import os, sys, functools, torch, torch.distributed as dist
sys.path.insert(0, "scripts")
import local_ranks
import flashep
from flashep.backends import triton_normal as tn
from flashep.bench.timing import KERNEL_PATTERNS, Timer
import probe_normal_host as probe

def worker(rank, num_ranks, args):
    os.environ["FLASHEP_DIRECT_DISPATCH"] = "1"
    buffer, inputs = probe.build(num_ranks, 4096)
    table = probe.ops(buffer, inputs)
    backend = buffer._normal
    timer = Timer(dist.group.WORLD, torch.device("cuda", 0), 0, 0, profile_iters=10)
    real_launch, real_carve = backend._launch_dispatch, backend._carve
    def variant(name, carve, direct_kernel):
        def launch(*a, **k):
            if not direct_kernel:
                k["may_write_directly"], k["block"] = False, None
            return real_launch(*a, **k)
        backend._launch_dispatch = launch
        backend._carve = carve
        for op in ("cached FP8", "cached BF16"):
            fn = table[op]
            for _ in range(5): fn()
            us = timer.profile(fn).per_call_us(KERNEL_PATTERNS)
            print(f"{name:60s} {op}: {us:7.1f} us  (direct dispatches so far {backend.direct_dispatches})", flush=True)
    variant("direct kernel, outputs in the pool (as built)", real_carve, True)
    variant("records kernel, outputs in the pool", real_carve, False)
    variant("direct kernel in records state, outputs from torch.empty", lambda n: None, True)
    variant("records kernel, outputs from torch.empty", lambda n: None, False)
    buffer.destroy()

if __name__ == "__main__":
    local_ranks.main(worker, __doc__, calls=10, tokens=4096)
