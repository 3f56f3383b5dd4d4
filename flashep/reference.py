"""Single-process oracle: from every rank's inputs, every rank's expected outputs.

Plain torch, written from the contract (spec sections 3-7, numerics in docs/design.md) and independent
of the backends and of `flashep.fp8`. Tests and the benchmark compare backends against it. Inputs are
lists indexed by rank; tensors may live on any device (outputs follow the inputs).

    layout(topk_idx, num_experts, num_ranks, node_size=8)
        -> (num_tokens_per_rank, num_tokens_per_rdma_rank or None, num_tokens_per_expert, is_token_in_rank)
    dispatch(xs, topk_idxs, topk_weights, num_experts, expert_alignment=1) -> [DispatchExpect] per rank
    combine(xs, topk_idxs, num_experts, topk_weights=None, biases=None) -> [(combined_x, combined_w)] per rank
    low_latency_dispatch(xs, topk_idxs, num_experts, use_fp8, round_scale=False, use_ue8m0=False)
        -> [LowLatencyExpect] per rank
    low_latency_combine(expert_outputs, handles, topk_idxs, topk_weights, num_experts) -> [bf16 [T, H]]
    canonical_low_latency_rows(recv_x, recv_count, handle, num_ranks) -> LowLatencyExpect
        (a backend's low-latency output rearranged into the oracle's row order, for comparison)

Normal-mode rows are ordered by source rank, then source token index. Low-latency rows of one local
expert are ordered the same way here; backends may order them differently (only the data of each
(expert, source rank, source token) is contract), hence `canonical_low_latency_rows`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from . import logfmt

_GROUP = 128  # channels per FP8 scale
_FP8_MAX = 448.0
_AMAX_FLOOR = 1e-4


# ---- normal mode ---------------------------------------------------------------------------------------
def layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int, node_size: int = 8):
    """One rank's `get_dispatch_layout`: distinct tokens per rank and per node, selections per expert,
    and the token -> rank membership. -1 entries select nothing."""
    num_tokens = topk_idx.size(0)
    experts_per_rank = num_experts // num_ranks
    device = topk_idx.device
    is_token_in_rank = torch.zeros(num_tokens, num_ranks, dtype=torch.bool, device=device)
    for rank in range(num_ranks):
        first, last = rank * experts_per_rank, (rank + 1) * experts_per_rank
        is_token_in_rank[:, rank] = ((topk_idx >= first) & (topk_idx < last)).any(dim=1)
    num_tokens_per_rank = is_token_in_rank.sum(dim=0).to(torch.int32)
    num_tokens_per_expert = torch.stack([(topk_idx == e).sum() for e in range(num_experts)]).to(torch.int32)
    num_tokens_per_rdma_rank = None
    if num_ranks > node_size:
        num_nodes = num_ranks // node_size
        in_node = is_token_in_rank.view(num_tokens, num_nodes, node_size).any(dim=2)
        num_tokens_per_rdma_rank = in_node.sum(dim=0).to(torch.int32)
    return num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank


@dataclass
class DispatchExpect:
    """What one rank must receive from a normal dispatch (M = rows received)."""

    recv_x: torch.Tensor  # [M, H] bf16 or fp8
    recv_x_scales: Optional[torch.Tensor]  # [M, S] row-major, dtype of the input scales; None for bf16
    recv_topk_idx: torch.Tensor  # [M, K] input dtype: local expert ids, -1 for other ranks' experts
    recv_topk_weights: Optional[torch.Tensor]  # [M, K] float32, 0 where the id is -1; None without weights
    num_recv_tokens_per_expert: list  # [L] selections per local expert, rounded up to expert_alignment
    recv_src_rank: torch.Tensor  # [M] int64
    recv_src_idx: torch.Tensor  # [M] int64, token index on the source rank
    rank_prefix: torch.Tensor  # [R] int32, inclusive prefix over source ranks of rows received


def dispatch(xs: Sequence, topk_idxs: Sequence[torch.Tensor], topk_weights: Optional[Sequence[torch.Tensor]],
             num_experts: int, expert_alignment: int = 1) -> list[DispatchExpect]:
    """Normal dispatch of every rank. xs[r] is bf16 [T_r, H] or (fp8 [T_r, H], scales [T_r, S]); the
    scales are copied as they are (any strides in, row-major out)."""
    num_ranks = len(topk_idxs)
    experts_per_rank = num_experts // num_ranks
    memberships = [layout(idx, num_experts, num_ranks)[3] for idx in topk_idxs]
    expects = []
    for dst in range(num_ranks):
        first = dst * experts_per_rank
        data, scales, ids, weights, src_rank, src_idx, counts = [], [], [], [], [], [], []
        for src in range(num_ranks):
            tokens = memberships[src][:, dst].nonzero().flatten()
            x_data, x_scales = _split_x(xs[src])
            data.append(_take_rows(x_data, tokens))
            if x_scales is not None:
                scales.append(x_scales[tokens])
            idx = topk_idxs[src][tokens]
            local = (idx >= first) & (idx < first + experts_per_rank)
            ids.append(torch.where(local, idx - first, torch.full_like(idx, -1)))
            if topk_weights is not None:
                w = topk_weights[src][tokens]
                weights.append(torch.where(local, w, torch.zeros_like(w)))
            src_rank.append(torch.full((tokens.numel(),), src, dtype=torch.int64, device=tokens.device))
            src_idx.append(tokens.to(torch.int64))
            counts.append(tokens.numel())
        per_expert = []
        for local_expert in range(experts_per_rank):
            selections = sum(int((idx == first + local_expert).sum()) for idx in topk_idxs)
            per_expert.append(-(-selections // expert_alignment) * expert_alignment)
        expects.append(DispatchExpect(
            recv_x=_cat_rows(data),
            recv_x_scales=torch.cat(scales).contiguous() if scales else None,
            recv_topk_idx=torch.cat(ids),
            recv_topk_weights=torch.cat(weights) if topk_weights is not None else None,
            num_recv_tokens_per_expert=per_expert,
            recv_src_rank=torch.cat(src_rank),
            recv_src_idx=torch.cat(src_idx),
            rank_prefix=torch.tensor(counts, device=topk_idxs[dst].device).cumsum(0).to(torch.int32)))
    return expects


def combine(xs: Sequence[torch.Tensor], topk_idxs: Sequence[torch.Tensor], num_experts: int,
            topk_weights: Optional[Sequence[torch.Tensor]] = None, biases: Optional[Sequence[tuple]] = None):
    """Normal combine of every rank -> [(combined_x bf16 [T_r, H], combined_w float32 [T_r, K] or None)].

    xs[j] are rank j's rows in its dispatch order (first M_j rows are read); topk_idxs is the original
    routing; topk_weights[j] are rank j's weight rows; biases[r] = (bias0 or None, bias1 or None) or None.
    Per token, in fp32: 0 + bias0 + bias1 + rows of the destination ranks in ascending rank order,
    then one rounding to bf16.
    """
    num_ranks = len(topk_idxs)
    memberships = [layout(idx, num_experts, num_ranks)[3] for idx in topk_idxs]
    # row of (source s, destination j) block start inside j's rows
    block_start = [[0] * num_ranks for _ in range(num_ranks)]
    for dst in range(num_ranks):
        offset = 0
        for src in range(num_ranks):
            block_start[src][dst] = offset
            offset += int(memberships[src][:, dst].sum())
    results = []
    for home in range(num_ranks):
        num_tokens = topk_idxs[home].size(0)
        hidden = xs[0].size(1)
        device = xs[0].device
        acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=device)
        for bias in (biases[home] if biases is not None and biases[home] is not None else (None, None)):
            if bias is not None:
                acc = acc + bias.float()
        acc_w = None
        if topk_weights is not None:
            acc_w = torch.zeros(num_tokens, topk_weights[0].size(1), dtype=torch.float32, device=device)
        for dst in range(num_ranks):
            tokens = memberships[home][:, dst].nonzero().flatten()
            rows = torch.arange(tokens.numel(), device=device) + block_start[home][dst]
            acc[tokens] = acc[tokens] + xs[dst][rows].float()
            if acc_w is not None:
                acc_w[tokens] = acc_w[tokens] + topk_weights[dst][rows].float()
        results.append((acc.to(torch.bfloat16), acc_w))
    return results


# ---- low-latency mode ----------------------------------------------------------------------------------
@dataclass
class LowLatencyExpect:
    """One rank's low-latency dispatch output, per local expert i, rows in canonical order (source rank
    ascending, then source token ascending)."""

    recv_count: torch.Tensor  # [L] int32
    src_rank: list  # [L] of int64 [n_i]
    src_idx: list  # [L] of int64 [n_i]
    data: list  # [L] of bf16 or fp8 [n_i, H]
    scales: Optional[list]  # [L] of float32 [n_i, H / 128] or int32 UE8M0 [n_i, H / 512]; None for bf16


def quantize_low_latency(x: torch.Tensor, round_scale: bool, use_ue8m0: bool):
    """Low-latency FP8 of bf16 [T, H] (H a multiple of 128) -> (fp8 [T, H], scales), docs/design.md:
    amax = max(max|x|, 1e-4) per 128-channel group; plain scale 448 / amax; round_scale: the power of
    two 2^-e with e = ceil(log2(amax / 448)) read from the float's bits. Scales are float32 scale_inv
    [T, H / 128], or with use_ue8m0 the bytes e + 127 packed 4 to an int32 [T, H / 512]."""
    num_tokens, hidden = x.shape
    groups = hidden // _GROUP
    grouped = x.float().view(num_tokens, groups, _GROUP)
    amax = grouped.abs().amax(dim=2).clamp(min=_AMAX_FLOOR)
    if round_scale:
        bits = _divide(amax, _FP8_MAX).view(torch.int32)
        exponent = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)
        scale = _power_of_two(-exponent)
        scale_inv = _power_of_two(exponent)
    else:
        scale = torch.reciprocal(amax) * _FP8_MAX
        scale_inv = _divide(amax, _FP8_MAX)
    q = (grouped * scale.unsqueeze(2)).to(torch.float8_e4m3fn).view(num_tokens, hidden)
    if not use_ue8m0:
        return q, scale_inv
    biased = (exponent + 127).to(torch.int64).view(num_tokens, groups // 4, 4)
    words = biased[..., 0] | (biased[..., 1] << 8) | (biased[..., 2] << 16) | (biased[..., 3] << 24)
    return q, torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def low_latency_dispatch(xs: Sequence[torch.Tensor], topk_idxs: Sequence[torch.Tensor], num_experts: int,
                         use_fp8: bool, round_scale: bool = False, use_ue8m0: bool = False) -> list[LowLatencyExpect]:
    """Low-latency dispatch of every rank: one row per (token, k) selection of each local expert."""
    if use_ue8m0 and not round_scale:
        raise ValueError("use_ue8m0 needs round_scale")
    num_ranks = len(topk_idxs)
    experts_per_rank = num_experts // num_ranks
    if use_fp8:
        quantized = [quantize_low_latency(x, round_scale, use_ue8m0) for x in xs]
        payloads, scales = [q for q, _ in quantized], [s for _, s in quantized]
    else:
        payloads, scales = list(xs), None
    expects = []
    for dst in range(num_ranks):
        per_expert = {name: [] for name in ("src_rank", "src_idx", "data", "scales")}
        counts = []
        for local_expert in range(experts_per_rank):
            expert = dst * experts_per_rank + local_expert
            src_rank, src_idx, data, expert_scales = [], [], [], []
            for src in range(num_ranks):
                # tokens in ascending order, one entry per (token, k) that selects the expert
                tokens = (topk_idxs[src] == expert).nonzero()[:, 0]
                src_rank.append(torch.full((tokens.numel(),), src, dtype=torch.int64, device=tokens.device))
                src_idx.append(tokens.to(torch.int64))
                data.append(_take_rows(payloads[src], tokens))
                if scales is not None:
                    expert_scales.append(scales[src][tokens])
            per_expert["src_rank"].append(torch.cat(src_rank))
            per_expert["src_idx"].append(torch.cat(src_idx))
            per_expert["data"].append(_cat_rows(data))
            per_expert["scales"].append(torch.cat(expert_scales) if scales is not None else None)
            counts.append(per_expert["src_idx"][-1].numel())
        expects.append(LowLatencyExpect(
            recv_count=torch.tensor(counts, dtype=torch.int32, device=topk_idxs[dst].device),
            src_rank=per_expert["src_rank"], src_idx=per_expert["src_idx"], data=per_expert["data"],
            scales=per_expert["scales"] if use_fp8 else None))
    return expects


def low_latency_combine(expert_outputs: Sequence[torch.Tensor], handles: Sequence[tuple],
                        topk_idxs: Sequence[torch.Tensor], topk_weights: Sequence[torch.Tensor],
                        num_experts: int, use_logfmt: bool = False, prereduce: bool = False) -> list[torch.Tensor]:
    """Low-latency combine of every rank -> bf16 [T_r, H]: per token, in fp32, 0 + w[k] * y_k for
    k = 0 .. K-1 with topk_idx >= 0 (a product then a sum, no fused multiply-add), then bf16. With
    `use_logfmt` each row y_k is first replaced by `logfmt.roundtrip(y_k)` (the decoded wire format). With
    `prereduce` (the expert side sums first) each owner rank's terms are summed alone in fp32, 0 + in k order,
    and the token's result is 0 + those partial sums of the owners it chose, in owner order (the same terms
    as without, associated differently).

    expert_outputs[d] is owner d's [L, R * T_max, H]; handles[d] its low-latency handle, used only to find
    which row holds (expert, source rank, source token)."""
    if use_logfmt and prereduce:
        raise ValueError("a pre-reducing combine sends no LogFMT rows")
    num_ranks = len(topk_idxs)
    experts_per_rank = num_experts // num_ranks
    rows = _expert_rows(handles, topk_idxs, num_experts)
    hidden = expert_outputs[0].size(-1)
    device = expert_outputs[0].device
    results = []
    for home in range(num_ranks):
        idx, weights = topk_idxs[home].cpu(), topk_weights[home].to(device)
        num_tokens, num_topk = idx.shape
        owner_of = torch.where(idx >= 0, torch.div(idx, experts_per_rank, rounding_mode="floor"), -1)
        acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=device)
        partials = [torch.zeros_like(acc) for _ in range(num_ranks)] if prereduce else [acc] * num_ranks
        for k in range(num_topk):
            for owner in range(num_ranks):
                tokens = (owner_of[:, k] == owner).nonzero().flatten()
                if tokens.numel() == 0:
                    continue
                experts = idx[tokens, k]
                local = (experts % experts_per_rank).to(device)
                row = torch.tensor([rows[(int(e), home, int(t))] for e, t in zip(experts, tokens)], device=device)
                y = expert_outputs[owner][local, row]
                y = (logfmt.roundtrip(y) if use_logfmt else y).float()
                tokens = tokens.to(device)
                partials[owner][tokens] = partials[owner][tokens] + weights[tokens, k:k + 1] * y
        if prereduce:
            for owner in range(num_ranks):
                chosen = (owner_of == owner).any(dim=1).nonzero().flatten().to(device)
                acc[chosen] = acc[chosen] + partials[owner][chosen]
        results.append(acc.to(torch.bfloat16))
    return results


def canonical_low_latency_rows(recv_x: Union[torch.Tensor, tuple], recv_count: torch.Tensor, handle: tuple,
                               num_ranks: int) -> LowLatencyExpect:
    """A backend's low-latency dispatch output (recv_x, recv_count, handle) -> its valid rows in the
    oracle's order. Checks that each source's rows form the block `layout_range` names and that the
    blocks tile [0, recv_count) exactly."""
    src_info, layout_range, _, _, _ = handle
    data, scales = (recv_x if isinstance(recv_x, tuple) else (recv_x, None))
    num_local = data.size(0)
    out = LowLatencyExpect(recv_count=recv_count.clone(), src_rank=[], src_idx=[], data=[],
                           scales=[] if scales is not None else None)
    for local_expert in range(num_local):
        count = int(recv_count[local_expert])
        blocks = []
        for src in range(num_ranks):
            packed = int(layout_range[local_expert, src])
            begin, size = packed >> 32, packed & 0xFFFFFFFF
            blocks.append((begin, size, src))
        covered = sorted((begin, size) for begin, size, _ in blocks if size > 0)
        position = 0
        for begin, size in covered:
            if begin != position:
                raise AssertionError(f"local expert {local_expert}: layout_range blocks {covered} do not tile "
                                     f"[0, {count})")
            position += size
        if position != count:
            raise AssertionError(f"local expert {local_expert}: layout_range covers {position} rows, "
                                 f"recv_count is {count}")
        order = []
        for begin, size, src in blocks:
            tokens = src_info[local_expert, begin:begin + size].to(torch.int64)
            for row, token in zip(range(begin, begin + size), tokens.tolist()):
                order.append((src, token, row))
        order.sort()
        rows = torch.tensor([row for _, _, row in order], dtype=torch.int64, device=data.device)
        out.src_rank.append(torch.tensor([s for s, _, _ in order], dtype=torch.int64, device=data.device))
        out.src_idx.append(torch.tensor([t for _, t, _ in order], dtype=torch.int64, device=data.device))
        out.data.append(_take_rows(data[local_expert], rows))
        if scales is not None:
            out.scales.append(scales[local_expert, rows])
    return out


def _expert_rows(handles: Sequence[tuple], topk_idxs: Sequence[torch.Tensor], num_experts: int) -> dict:
    """(global expert, source rank, source token) -> row in the owner's expert block, from the handles."""
    num_ranks = len(handles)
    experts_per_rank = num_experts // num_ranks
    rows = {}
    for owner, (src_info, layout_range, _, _, _) in enumerate(handles):
        src_info, layout_range = src_info.cpu(), layout_range.cpu()
        for local_expert in range(experts_per_rank):
            expert = owner * experts_per_rank + local_expert
            for src in range(num_ranks):
                packed = int(layout_range[local_expert, src])
                begin, size = packed >> 32, packed & 0xFFFFFFFF
                for row in range(begin, begin + size):
                    rows[(expert, src, int(src_info[local_expert, row]))] = row
    for home, idx in enumerate(topk_idxs):
        for token, k in (idx >= 0).nonzero().tolist():
            key = (int(idx[token, k]), home, token)
            if key not in rows:
                raise AssertionError(f"no row for expert {key[0]}, source rank {home}, token {token} in the "
                                     f"owner's low-latency handle")
    return rows


def _take_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[index] along dim 0; FP8 rows move as bytes (FP8 indexing is not implemented on every device)."""
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8)[index].view(t.dtype)
    return t[index]


def _cat_rows(tensors: list) -> torch.Tensor:
    if tensors[0].dtype == torch.float8_e4m3fn:
        return torch.cat([t.view(torch.uint8) for t in tensors]).view(torch.float8_e4m3fn)
    return torch.cat(tensors)


def _split_x(x):
    return x if isinstance(x, tuple) else (x, None)


def _power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """Exact float32 2^exponent for exponents of normal floats."""
    return ((exponent + 127).to(torch.int32) << 23).view(torch.float32)


def _divide(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """Correctly rounded t / divisor on every device (CUDA turns division by a Python scalar into a
    multiplication by its reciprocal, which rounds differently)."""
    return t / torch.full_like(t, divisor)
