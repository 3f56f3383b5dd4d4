"""Host time of eager low-latency calls: what one dispatch and one combine cost on the CPU, and where.

    python scripts/probe_ll_host.py [--ranks 2] [--tokens 128] [--calls 200]

Each rank makes `calls` dispatch + combine pairs back to back (no hook, 128 tokens of hidden 7168, top-8 of
256 experts); rank 0 prints the host time per call with the value checks on and off, then a cProfile of
the calls (checks on) by own time.
"""
import argparse
import cProfile
import os
import pstats
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import local_ranks  # noqa: E402

import flashep  # noqa: E402
from flashep import validate  # noqa: E402


def worker(rank, num_ranks, args):
    experts, hidden, topk, tokens = 256, 7168, 8, args.tokens
    hint = flashep.Buffer.get_low_latency_rdma_size_hint(tokens, hidden, num_ranks, experts)
    buffer = flashep.Buffer(dist.group.WORLD, 0, hint, low_latency_mode=True, num_qps_per_rank=experts // num_ranks,
                            explicitly_destroy=True)
    x = torch.randn(tokens, hidden, device="cuda").to(torch.bfloat16)
    idx = torch.rand(tokens, experts, device="cuda").topk(topk, dim=1).indices
    weights = torch.rand(tokens, topk, device="cuda")
    y = torch.randn(experts // num_ranks, num_ranks * tokens, hidden, device="cuda").to(torch.bfloat16)

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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    local_ranks.spawn(worker, args.ranks, args)


if __name__ == "__main__":
    main()
