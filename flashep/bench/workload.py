"""Benchmark inputs (DeepEP's test shapes and routing) and the gathers that give every rank all inputs.

Routing is rank-to-expert as in DeepEP's intranode and low-latency tests: random positive scores,
plain top-k over all experts (no group limit). Each rank draws from its own seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..buffer import topk_idx_t
from ..fp8 import per_token_cast_to_fp8, to_column_major


@dataclass
class NormalInputs:
    x: torch.Tensor  # bf16 [T, H]
    x_fp8: tuple  # (fp8 [T, H], float32 scales [T, ceil(H / 128)], column-major as DeepEP's tests pass them)
    topk_idx: torch.Tensor  # [T, K] topk_idx_t
    topk_weights: torch.Tensor  # [T, K] float32


@dataclass
class LowLatencyInputs:
    x: torch.Tensor  # bf16 [T, H]
    topk_idx: torch.Tensor  # [T, K] topk_idx_t, with a few -1 entries
    topk_weights: torch.Tensor  # [T, K] float32, positive


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _route(tokens: int, experts: int, topk: int, gen: torch.Generator, device: torch.device,
           sorted_topk: bool) -> torch.Tensor:
    scores = torch.randn(tokens, experts, generator=gen, device=device).abs() + 1
    return torch.topk(scores, topk, dim=-1, sorted=sorted_topk).indices.to(topk_idx_t)


def normal_inputs(tokens: int, hidden: int, topk: int, experts: int, seed: int,
                  device: torch.device) -> NormalInputs:
    gen = _generator(seed, device)
    x = torch.randn(tokens, hidden, generator=gen, device=device).to(torch.bfloat16)
    data, scales = per_token_cast_to_fp8(x)
    topk_idx = _route(tokens, experts, topk, gen, device, sorted_topk=False)
    topk_weights = torch.randn(tokens, topk, generator=gen, device=device)
    return NormalInputs(x, (data, to_column_major(scales)), topk_idx, topk_weights)


def low_latency_inputs(tokens: int, hidden: int, topk: int, experts: int, seed: int,
                       device: torch.device) -> LowLatencyInputs:
    gen = _generator(seed, device)
    x = torch.randn(tokens, hidden, generator=gen, device=device).to(torch.bfloat16)
    topk_idx = _route(tokens, experts, topk, gen, device, sorted_topk=True)
    topk_weights = torch.randn(tokens, topk, generator=gen, device=device).abs()
    # a few dropped selections, as DeepEP's low-latency test has
    num_dropped = min(10, topk_idx.numel() // 8)
    if num_dropped:
        positions = torch.randint(0, topk_idx.numel(), (num_dropped,), generator=gen, device=device)
        topk_idx.view(-1)[positions] = -1
    return LowLatencyInputs(x, topk_idx, topk_weights)


def gather_rows(t: torch.Tensor, group: dist.ProcessGroup) -> list:
    """Every rank's `t` (same dtype and trailing shape, any number of rows), in rank order.

    Moved as bytes, so dtypes the process group cannot handle (fp8, bool) travel too."""
    t = t.contiguous()
    world = dist.get_world_size(group)
    row_bytes = _row_numel(t) * t.element_size()
    raw = t.view(torch.uint8).view(t.size(0), row_bytes)
    rows = torch.tensor([t.size(0)], dtype=torch.int64, device=t.device)
    all_rows = [torch.zeros_like(rows) for _ in range(world)]
    dist.all_gather(all_rows, rows, group=group)
    counts = [int(r) for r in all_rows]
    padded = torch.zeros(max(counts), row_bytes, dtype=torch.uint8, device=t.device)
    padded[: t.size(0)] = raw
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded, group=group)
    return [piece[:n].contiguous().view(t.dtype).view(n, *t.shape[1:]) for piece, n in zip(pieces, counts)]


def gather_matrix(row: list, group: dist.ProcessGroup, device: torch.device) -> list:
    """Each rank contributes a list of ints of the same length -> the matrix, row r from rank r."""
    mine = torch.tensor([row], dtype=torch.int64, device=device)
    return [r.view(-1).tolist() for r in gather_rows(mine, group)]


def _row_numel(t: torch.Tensor) -> int:
    numel = 1
    for size in t.shape[1:]:
        numel *= size
    return numel
