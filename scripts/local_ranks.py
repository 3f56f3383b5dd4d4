"""Local GPU ranks for the probe scripts: one process per GPU, NCCL over a free localhost port."""
import argparse
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def spawn(worker, num_ranks: int, args) -> None:
    """Run `worker(rank, num_ranks, args)` in `num_ranks` processes, each with its GPU and the process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_start, args=(num_ranks, port, worker, args), nprocs=num_ranks)


def _start(rank: int, num_ranks: int, port: int, worker, args) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=num_ranks,
                            device_id=torch.device("cuda", rank))
    try:
        worker(rank, num_ranks, args)
    finally:
        dist.destroy_process_group()


def main(worker, doc: str, calls: int, tokens: int = 128) -> None:
    """Command line of the probes (--ranks, --tokens, --calls), then `worker` on every rank."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=tokens)
    p.add_argument("--calls", type=int, default=calls)
    p.add_argument("--profile", action="store_true", help="also print a cProfile of the host side")
    p.add_argument("--breakdown", action="store_true", help="also time the pieces of a call's host side")
    p.add_argument("--kernels-only", action="store_true", help="time only the kernels")
    p.add_argument("--logfmt", action="store_true",
                   help="low-latency combine with use_logfmt=True (expert outputs times 0.1: every group encoded)")
    args = p.parse_args()
    spawn(worker, args.ranks, args)


def decode_inputs(num_ranks: int, tokens: int, experts: int = 256, hidden: int = 7168, topk: int = 8):
    """A low-latency Buffer for DeepSeek-V3 decode and random inputs on this rank's GPU:
    (buffer, x [tokens, hidden] bf16, topk_idx, topk_weights, expert outputs [experts / R, R * tokens, hidden])."""
    import flashep

    hint = flashep.Buffer.get_low_latency_rdma_size_hint(tokens, hidden, num_ranks, experts)
    buffer = flashep.Buffer(dist.group.WORLD, 0, hint, low_latency_mode=True, num_qps_per_rank=experts // num_ranks,
                            explicitly_destroy=True)
    x = torch.randn(tokens, hidden, device="cuda").to(torch.bfloat16)
    idx = torch.rand(tokens, experts, device="cuda").topk(topk, dim=1).indices
    weights = torch.rand(tokens, topk, device="cuda")
    y = torch.randn(experts // num_ranks, num_ranks * tokens, hidden, device="cuda").to(torch.bfloat16)
    return buffer, x, idx, weights, y
