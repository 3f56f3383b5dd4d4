"""Host time of eager low-latency calls: what one dispatch and one combine cost on the CPU, and where.

    python scripts/probe_ll_host.py [--ranks 2] [--tokens 128] [--calls 200]

Each rank makes `calls` dispatch + combine pairs back to back (no hook, 128 tokens of hidden 7168, top-8 of
256 experts); rank 0 prints the host time per call with the value checks on and off, then a cProfile of
the calls (checks on) by own time.
"""
import cProfile
import os
import pstats
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import local_ranks  # noqa: E402

from flashep import validate  # noqa: E402


def worker(rank, num_ranks, args):
    experts, tokens = 256, args.tokens
    buffer, x, idx, weights, y = local_ranks.decode_inputs(num_ranks, tokens, experts)

    def pair():
        _, _, handle, _, _ = buffer.low_latency_dispatch(x, idx, tokens, experts)
        buffer.low_latency_combine(y, idx, weights, handle)

    for _ in range(10):
        pair()
    torch.cuda.synchronize()
    for label, unchecked in (("value checks on", False), ("value checks off", True)):
        dist.barrier()
        start = time.perf_counter()
        if unchecked:
            with validate.values_unchecked():
                for _ in range(args.calls):
                    pair()
        else:
            for _ in range(args.calls):
                pair()
        host = (time.perf_counter() - start) / args.calls * 1e6
        torch.cuda.synchronize()
        if rank == 0:
            print(f"{label}: host {host:6.1f} us per dispatch + combine pair", flush=True)
    dist.barrier()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.calls):
        pair()
    profiler.disable()
    torch.cuda.synchronize()
    if rank == 0:
        print(f"--- host profile of {args.calls} pairs (value checks on), by own time")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
    dist.barrier()
    buffer.destroy()


if __name__ == "__main__":
    local_ranks.main(worker, __doc__, calls=200)
