"""The baseline every op is compared with in the same run: the process group's `all_to_all_single`
(NCCL on GPUs, gloo on CPU) moving the same bytes to and from each rank as the op does."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .metrics import Traffic
from .timing import NCCL_PATTERNS, OP_PHASE, Timer


@dataclass
class BaselineTiming:
    e2e_us: float
    kernel_us: Optional[float]  # NCCL kernels only (None on CPU)


def time_all_to_all(timer: Timer, traffic: Traffic, group: dist.ProcessGroup,
                    device: torch.device) -> BaselineTiming:
    send = torch.randint(0, 256, (sum(traffic.send_split),), dtype=torch.uint8, device=device)
    recv = torch.empty(sum(traffic.recv_split), dtype=torch.uint8, device=device)

    def exchange():
        dist.all_to_all_single(recv, send, output_split_sizes=traffic.recv_split,
                               input_split_sizes=traffic.send_split, group=group)

    e2e = timer.end_to_end_us(exchange)
    profile = timer.profile(exchange)
    kernel = profile.per_call_us(NCCL_PATTERNS, OP_PHASE) if profile is not None else None
    return BaselineTiming(e2e, kernel)
