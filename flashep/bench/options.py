"""The benchmark's settings, resolved from the command line for the machine it runs on."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

MODES = ("normal", "low-latency")

# DeepEP's test shapes on GPUs; small ones on CPU, where ranks are gloo processes
GPU_SHAPE = dict(tokens=4096, hidden=7168, topk=8, experts=256, ll_tokens=[128])
CPU_SHAPE = dict(tokens=128, hidden=512, topk=4, experts=16, ll_tokens=[32])
CPU_QUICK_SHAPE = dict(tokens=32, hidden=512, topk=4, experts=16, ll_tokens=[8])
GPU_SWEEP = [2**p for p in range(8, 15)]  # 256 .. 16384 tokens per rank
CPU_SWEEP = [2**p for p in range(5, 10)]  # 32 .. 512

# (warmups, timed iterations, profiled iterations)
GPU_ITERATIONS = (20, 50, 20)
GPU_QUICK_ITERATIONS = (3, 10, 5)
CPU_ITERATIONS = (1, 5, 0)
CPU_QUICK_ITERATIONS = (1, 2, 0)


@dataclass
class Options:
    device: str  # "cuda" or "cpu"
    num_ranks: int
    modes: tuple
    tokens: list  # normal-mode tokens per rank, one run each
    hidden: int
    topk: int
    experts: int
    num_sms: list
    ll_tokens: list
    backend: Optional[str]  # FLASHEP_BACKEND for the ranks, None = library default
    warmups: int
    iters: int
    profile_iters: int
    seed: int
    nvl_bytes: int  # num_nvl_bytes of the normal-mode Buffer (0: the backend allocates what it needs)
    compute_size: int  # square matmul run between a low-latency send and its hook
    sweep: bool = False
    command: str = ""

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    def normal_shape(self, tokens: int, num_sms: int) -> dict:
        return dict(tokens=tokens, hidden=self.hidden, topk=self.topk, experts=self.experts, num_sms=num_sms)

    def low_latency_shape(self, tokens: int) -> dict:
        return dict(tokens=tokens, hidden=self.hidden, topk=self.topk, experts=self.experts)

    @property
    def num_configs(self) -> int:
        count = 0
        if "normal" in self.modes:
            count += len(self.num_sms) * len(self.tokens)
        if "low-latency" in self.modes:
            count += len(self.ll_tokens)
        return count
