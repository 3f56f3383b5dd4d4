"""Probe of the normal-mode combine under several settings (environment variables, one Buffer each):
host time per call, time per call back to back (CUDA events), and for a copy-engine combine the
reduction kernel alone (relaunched once the copies have landed). DeepSeek-V3 shape, top-8 of 256.

    python scripts/probe_copy_combine.py [--ranks 2] [--tokens 4096] [--hidden 7168] ["VAR=V VAR=V" ...]
"""
import argparse
import os
import time

import torch
import torch.distributed as dist

import local_ranks

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")


def _events_us(fn, iters=10):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3


class _Recorder:
    """Stands in for the reduction kernel in the backend's namespace and remembers its last launch."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.last = None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.last = (grid, args, kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def _one_setting(rank, world, group, args, setting):
    import flashep

    os.environ.update(setting)
    buffer = flashep.Buffer(group, 0, explicitly_destroy=True)
    g = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(args.tokens, args.hidden, device="cuda", generator=g).to(torch.bfloat16)
    topk_idx = torch.rand(args.tokens, 256, device="cuda", generator=g).topk(8, dim=1).indices
    weights = torch.rand(args.tokens, 8, device="cuda", generator=g)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, 256)
    recv_x, _, recv_w, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights,
                                                      num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                      num_tokens_per_expert=per_expert)
    combine = lambda: buffer.combine(recv_x, handle, topk_weights=recv_w)  # noqa: E731
    for _ in range(3):
        combine()
    torch.cuda.synchronize()
    dist.barrier()
    host = []
    for _ in range(9):
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        combine()
        host.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    dist.barrier()
    e2e = _events_us(combine)
    dist.barrier()
    if args.profile_host and rank == 0:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(20):
            combine()
        profiler.disable()
        torch.cuda.synchronize()
        print(f"--- host profile of 20 calls, {setting or 'defaults'}")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(14)
    else:
        for _ in range(20):
            combine()
    torch.cuda.synchronize()
    dist.barrier()
    line = f"host {sorted(host)[4]:5.0f} us/call, back to back {e2e:5.0f} us/call"
    recorder = flashep.kernels.normal.ep_combine_reduce_kernel
    if isinstance(recorder, _Recorder) and recorder.last is not None and setting.get("FLASHEP_COPY_ENGINE") != "0":
        grid, a, kw = recorder.last
        torch.cuda.synchronize()
        dist.barrier()  # every rank's copies and flags of the last call have landed: a relaunch only reduces
        line += f", reduction alone {_events_us(lambda: recorder.kernel[grid](*a, **kw)):5.0f} us"
    dist.barrier()
    buffer.destroy()
    for key in setting:
        del os.environ[key]
    return line


def worker(rank, world, args):
    import flashep.kernels.normal as kernels

    kernels.ep_combine_reduce_kernel = _Recorder(kernels.ep_combine_reduce_kernel)
    for text in args.settings:
        setting = dict(item.split("=", 1) for item in text.split())
        line = _one_setting(rank, world, dist.group.WORLD, args, setting)
        if rank == 0:
            print(f"{world} ranks, {text or 'defaults'}: {line}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--profile-host", action="store_true", help="cProfile 20 calls on rank 0 per setting")
    p.add_argument("settings", nargs="*", default=[""], help='environment per run, e.g. "FLASHEP_COPY_PARTS=2"')
    args = p.parse_args()
    local_ranks.spawn(worker, args.ranks, args)


if __name__ == "__main__":
    main()
