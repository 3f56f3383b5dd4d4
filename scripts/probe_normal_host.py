"""Host time of normal-mode calls on GPUs: what a cached dispatch, a dispatch and a combine cost on the CPU,
whether the GPU or the host sets the pace, and where the host's time goes.

    python scripts/probe_normal_host.py [--ranks 2] [--tokens 4096] [--calls 100] [--kernels-only] [--breakdown]
                                        [--profile]

`--ranks 1` also works on a machine with one GPU: the Triton normal backend then runs with a group of one
(the kernels move rows to the rank itself), which times the host side without any peer coupling.

Per op, rank 0 prints: host us per call in a back-to-back loop (no sync), GPU us per call of that loop
(events around the whole loop), the same op timed one call at a time with the benchmark's L2 flush before each
(e2e and its host time), and the kernels' time per call (torch.profiler, the ranks lined up). Options:
--kernels-only (only the kernel column), --breakdown (host cost of the pieces of a cached dispatch: the Triton
launch through the JIT, through flashep.launch (a repeated launch, FLASHEP_FAST_LAUNCH), through the replay
the backend keeps of it, and through the compiled kernel's launcher, allocations, events, ...), --profile (a cProfile of the calls by own time). The
tuning knobs of the environment (FLASHEP_NUM_WARPS, ...) apply, so a loop over settings at --ranks 1 compares
the kernels' per-SM speed without links.
"""
import cProfile
import os
import pstats
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import local_ranks  # noqa: E402

import flashep  # noqa: E402
from flashep.kernels import normal as kernels  # noqa: E402
from flashep.launch import launch  # noqa: E402
from flashep.bench.timing import KERNEL_PATTERNS, Timer  # noqa: E402
from flashep.bench.workload import normal_inputs  # noqa: E402

HIDDEN, TOPK, EXPERTS = 7168, 8, 256


def build(num_ranks: int, tokens: int):
    os.environ["FLASHEP_BACKEND"] = "triton"
    buffer = flashep.Buffer(dist.group.WORLD, num_nvl_bytes=int(1e9), explicitly_destroy=True)
    inputs = normal_inputs(tokens, HIDDEN, TOPK, EXPERTS, seed=dist.get_rank(), device=torch.device("cuda"))
    return buffer, inputs


def ops(buffer, inputs):
    layout = buffer.get_dispatch_layout(inputs.topk_idx, EXPERTS)
    per_rank, _, per_expert, in_rank, _ = layout
    recv = buffer.dispatch(inputs.x_fp8, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                           num_tokens_per_expert=per_expert, topk_idx=inputs.topk_idx,
                           topk_weights=inputs.topk_weights)
    recv_x, _, recv_weights, _, handle, _ = recv
    expert_out = recv_x[0].float().mul(recv_x[1].repeat_interleave(128, dim=1)[:, :HIDDEN]).to(torch.bfloat16)

    def layout_op():
        buffer.get_dispatch_layout(inputs.topk_idx, EXPERTS)

    def dispatch_op():
        buffer.dispatch(inputs.x_fp8, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                        num_tokens_per_expert=per_expert, topk_idx=inputs.topk_idx, topk_weights=inputs.topk_weights)

    def cached_fp8():
        buffer.dispatch(inputs.x_fp8, handle=handle)

    def cached_bf16():
        buffer.dispatch(inputs.x, handle=handle)

    def combine():
        buffer.combine(expert_out, handle, topk_weights=recv_weights)

    return {"layout": layout_op, "dispatch (host sync)": dispatch_op, "cached FP8": cached_fp8,
            "cached BF16": cached_bf16, "combine": combine}


def back_to_back(fn, calls: int):
    """-> (host us per call, GPU us per call) of `calls` calls queued without a sync."""
    dist.barrier()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - began) / calls * 1e6
    end.record()
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) * 1e3 / calls


def host_us(fn, calls: int = 200) -> float:
    """Median host time of fn() in microseconds (the GPU is left to run behind)."""
    samples = []
    for _ in range(calls):
        began = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - began) / 1e3)
    torch.cuda.synchronize()
    return statistics.median(samples)


def breakdown(buffer, cached_fp8, rank: int) -> None:
    """Host cost of the pieces of one cached FP8 dispatch, each timed alone."""
    seen = {}
    jit = kernels.ep_dispatch_kernel
    buffer._normal._replays.clear()  # the spy below sees a launch only where no replay of it is kept

    class Spy:  # records the launch arguments of one dispatch
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.update(grid=grid, args=args, kwargs=kwargs)
                return jit[grid](*args, **kwargs)
            return launch

    kernels.ep_dispatch_kernel = Spy()
    try:
        cached_fp8()
    finally:
        kernels.ep_dispatch_kernel = jit
    grid, args, kwargs = seen["grid"], seen["args"], seen["kwargs"]
    compiled = jit[grid](*args, **kwargs)
    names = list(jit.signature.parameters)
    values = list(args) + [kwargs[n] for n in names[len(args):]]
    cached_fp8()  # keeps a replay of the launch (FLASHEP_FAST_LAUNCH=1)
    replay = next(iter(buffer._normal._replays.values()), None)
    stream = torch.cuda.current_stream().cuda_stream
    epoch = torch.zeros(1, dtype=torch.int64, device="cuda")
    event = torch.cuda.Event()
    pieces = {
        "whole cached FP8 dispatch": cached_fp8,
        "Triton launch through the JIT": lambda: jit[grid](*args, **kwargs),
        "Triton launch through flashep.launch": lambda: launch(jit, grid, *args, **kwargs),
        "Triton launch through its replay": (lambda: replay(*[values[i] for i in replay.slots])) if replay
        else (lambda: None),
        "Triton launch, compiled launcher": lambda: compiled.run(grid[0], 1, 1, stream, compiled.function,
                                                                compiled.packed_metadata, None, None, None, *values),
        "torch.empty x3 (outputs)": lambda: [torch.empty(4096, 7168, dtype=torch.uint8, device="cuda")
                                             for _ in range(3)],
        "epoch.add_(1)": lambda: epoch.add_(1),
        "torch.cuda.Event() + record": lambda: torch.cuda.Event().record(),
        "event.record (reused event)": lambda: event.record(),
        "is_current_stream_capturing": torch.cuda.is_current_stream_capturing,
        "current_stream().wait_event": lambda: torch.cuda.current_stream().wait_event(event),
    }
    for name, fn in pieces.items():
        for _ in range(20):
            fn()
        us = host_us(fn)
        if rank == 0:
            print(f"  host {us:8.1f} us  {name}", flush=True)


def worker(rank, num_ranks, args):
    buffer, inputs = build(num_ranks, args.tokens)
    if rank == 0:
        knobs = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("FLASHEP_"))
        print(f"{num_ranks} rank(s), {args.tokens} tokens, backend {buffer.backend_name}, "
              f"{torch.cuda.get_device_name()}; {knobs}", flush=True)
        print(f"{'op':22s} {'host/call':>10s} {'gpu/call':>10s} {'e2e':>10s} {'e2e host':>10s} {'kernel':>10s}",
              flush=True)
    table = ops(buffer, inputs)
    timer = Timer(dist.group.WORLD, torch.device("cuda", torch.cuda.current_device()), 0, args.calls, profile_iters=10)
    for name, fn in table.items():
        for _ in range(10):
            fn()
        host = gpu = e2e = e2e_host = 0.0
        if not args.kernels_only:
            host, gpu = back_to_back(fn, args.calls)
            e2e, e2e_host = timer.end_to_end_us(fn), timer.last_host_us  # as the benchmark times a call
        kernel = timer.profile(fn).per_call_us(KERNEL_PATTERNS + ("layout",))
        if rank == 0:
            print(f"{name:22s} {host:10.1f} {gpu:10.1f} {e2e:10.1f} {e2e_host:10.1f} {kernel or 0:10.1f}", flush=True)
    if args.breakdown:
        breakdown(buffer, table["cached FP8"], rank)
    for name in ("cached FP8", "combine") if args.profile else ():
        dist.barrier()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            table[name]()
        profiler.disable()
        torch.cuda.synchronize()
        if rank == 0:
            print(f"--- host profile of {args.calls} x {name}, by own time", flush=True)
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(16)
    dist.barrier()
    buffer.destroy()


if __name__ == "__main__":
    local_ranks.main(worker, __doc__, calls=100, tokens=4096)
