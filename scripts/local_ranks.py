"""Local GPU ranks for the probe scripts: one process per GPU, NCCL over a free localhost port."""
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
