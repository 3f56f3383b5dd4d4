"""The portable backend: every operation as torch ops plus torch.distributed collectives.

It runs wherever torch.distributed does: gloo on CPU, NCCL on GPUs without a peer-memory fast path, any
group size. Each operation is vectorised torch code around `all_to_all_single`, which moves raw bytes
(gloo and NCCL have no FP8 collectives, so every payload travels as uint8 rows).

Costs per operation:
- normal dispatch: one all-gather of the counts, read by the host (the split sizes of
  `all_to_all_single` are host integers: the only CPU sync), then one all-to-all for the rows, received
  straight into `recv_x`, and one for the small per-row fields (scales, top-k, weights, source index)
  packed as int32 words. Keeping the rows apart from the small fields saves a pack and an unpack copy of
  the rows, the bulk of the bytes.
- cached dispatch and combine: no count exchange; the split sizes travel with the handle (`_ExchangePlan`,
  kept as an attribute of the handle's `send_head`), so they need no CPU sync either.
- low-latency dispatch: one all-to-all of counts (host read), one of the messages, one per (token,
  destination rank); the receive phase expands them into per-expert rows. Low-latency combine: one
  all-to-all, with split sizes known since the dispatch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .. import handles, logfmt
from .base import Backend, DispatchResult, LowLatencyDispatchResult, Routing

FP8_MAX = 448.0
FP8_GROUP = 128  # channels per low-latency FP8 scale


@dataclass
class _ExchangePlan:
    """How one normal-mode routing moves rows: which tokens go out, in (destination, token) order, and the
    split sizes of the all-to-all. Dispatch sends with it, combine reverses it."""

    send_token: torch.Tensor  # [N_send] int64: token index of each row sent, grouped by destination rank
    send_counts: list  # rows sent to each rank
    recv_counts: list  # rows received from each rank

    @property
    def num_recv(self) -> int:
        return sum(self.recv_counts)


@dataclass
class _LowLatencyRoute:
    """Private state of a low-latency dispatch, attached to its `src_info` for the combine."""

    selected: torch.Tensor  # [T, K] bool: the (token, k) selections dispatched from this rank
    # [T, K] int64: the slot whose returned row each (token, k) uses. A token that selects one expert
    # twice gets two rows; like a per-(expert, token) receive slot, both k then read the later row.
    read_slots: torch.Tensor
    # home side: the rows coming back, in the order owners send them, and their (token, k) slots
    return_slots: torch.Tensor  # [V_home] int64: t * K + k
    return_counts: list  # rows coming back from each owner rank
    # owner side: the rows of x to send back, grouped by source rank (filled by the receive phase)
    send_rows: Optional[torch.Tensor]  # [V] int64 flat row ids into [L * R * T_max]
    send_counts: list  # rows going back to each source rank


class CollectiveBackend(Backend):
    name = "collective"

    def __init__(self, buffer):
        self.group = buffer.group
        self.rank = buffer.rank
        self.num_ranks = buffer.group_size
        self.device = buffer.device
        self._combine_buffers: dict[tuple, torch.Tensor] = {}

    # ---- helpers ------------------------------------------------------------------------------------
    def _all_to_all(self, output: torch.Tensor, input: torch.Tensor, output_splits: list,
                    input_splits: list) -> None:
        dist.all_to_all_single(_as_bytes(output), _as_bytes(input), output_splits, input_splits, group=self.group)

    def _send_rows(self, output: torch.Tensor, rows: torch.Tensor, plan: "_ExchangePlan") -> None:
        """Dispatch-direction exchange of `rows` [T, ...] as the plan says, into `output`. Rows are gathered
        as int32 words (any strides) or as bytes (contiguous rows): index_select supports those for every
        payload dtype, FP8 included."""
        if rows.dtype not in (torch.int32, torch.uint8):
            rows = _as_bytes(rows)
        self._all_to_all(output, rows.index_select(0, plan.send_token), plan.recv_counts, plan.send_counts)

    def _arange(self, n: int, dtype=torch.int64) -> torch.Tensor:
        return torch.arange(n, dtype=dtype, device=self.device)

    # ---- normal mode --------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        num_tokens = topk_idx.size(0)
        experts_per_rank = num_experts // self.num_ranks
        valid = topk_idx >= 0
        # -1 entries land in an extra bucket that is dropped
        expert = torch.where(valid, topk_idx, num_experts).long()
        per_expert = torch.zeros(num_experts + 1, dtype=torch.int64, device=self.device)
        per_expert.index_add_(0, expert.flatten(), torch.ones_like(expert.flatten()))
        owner = expert // experts_per_rank
        in_rank = torch.zeros(num_tokens, self.num_ranks + 1, dtype=torch.bool, device=self.device)
        in_rank.scatter_(1, owner, True)
        in_rank = in_rank[:, : self.num_ranks].contiguous()
        per_rank = in_rank.sum(0, dtype=torch.int32)
        return per_rank, per_expert[:num_experts].to(torch.int32), in_rank

    def dispatch(self, x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
                 num_tokens_per_expert, expert_alignment, num_worst_tokens, num_channels, cached):
        if cached is not None:
            return self._cached_dispatch(x, x_scales, cached)
        r, num_ranks = self.rank, self.num_ranks
        num_local = num_tokens_per_expert.size(0) // num_ranks

        # Count exchange: every rank learns n(s -> j) for every pair (the full rank prefix matrix), plus
        # the expert and channel counts that it receives.
        channel_prefix = handles.channel_prefix_matrix(is_token_in_rank, num_channels)
        send_counts = is_token_in_rank.sum(0, dtype=torch.int32)  # what is really sent, per destination
        mine = torch.cat([send_counts.unsqueeze(1), num_tokens_per_expert.reshape(num_ranks, num_local).to(torch.int32),
                          channel_prefix], 1).contiguous()
        everyone = torch.empty(num_ranks, *mine.shape, dtype=torch.int32, device=self.device)
        dist.all_gather(list(everyone.unbind(0)), mine, group=self.group)
        counts = everyone[:, :, 0]  # [source, destination]
        recv_per_expert = everyone[:, r, 1:1 + num_local].sum(0, dtype=torch.int32)
        recv_channel_inclusive = everyone[:, r, 1 + num_local:]
        recv_channel_prefix = torch.cat([torch.zeros_like(recv_channel_inclusive[:, :1]),
                                         recv_channel_inclusive[:, :-1]], 1).contiguous()
        rank_prefix = counts.cumsum(0, dtype=torch.int32)

        host = torch.cat([counts.flatten(), recv_per_expert]).tolist()  # the CPU sync
        counts_host = [host[s * num_ranks:(s + 1) * num_ranks] for s in range(num_ranks)]
        received = [sum(counts_host[s][j] for s in range(num_ranks)) for j in range(num_ranks)]
        if num_worst_tokens and max(received) > num_worst_tokens:
            # every rank sees every count, so all ranks raise together instead of leaving peers waiting
            j = max(range(num_ranks), key=lambda i: received[i])
            raise ValueError(f"num_worst_tokens={num_worst_tokens} is smaller than the {received[j]} tokens that "
                             f"rank {j} receives")
        plan = _ExchangePlan(self._send_order(is_token_in_rank, sum(counts_host[r])), counts_host[r],
                             [counts_host[s][r] for s in range(num_ranks)])
        num_recv = plan.num_recv
        rows = num_worst_tokens or num_recv

        recv_x = torch.empty(rows, x.size(1), dtype=x.dtype, device=self.device)
        self._send_rows(recv_x[:num_recv], x, plan)

        # the per-row fields, packed as int32 words: [scales S | top-k K | weights K | source index]
        fields = [] if x_scales is None else [x_scales.view(torch.int32)]
        if topk_idx is not None:
            fields += [topk_idx.to(torch.int32), topk_weights.view(torch.int32)]
        fields.append(self._arange(x.size(0), torch.int32).unsqueeze(1))
        words = torch.cat(fields, 1).index_select(0, plan.send_token)
        recv_words = torch.empty(num_recv, words.size(1), dtype=torch.int32, device=self.device)
        self._all_to_all(recv_words, words, plan.recv_counts, plan.send_counts)

        num_scales = 0 if x_scales is None else x_scales.size(1)
        recv_scales = None
        if x_scales is not None:
            recv_scales = torch.empty(rows, num_scales, dtype=x_scales.dtype, device=self.device)
            recv_scales[:num_recv] = recv_words[:, :num_scales].view(x_scales.dtype)
        recv_topk_idx = recv_topk_weights = None
        if topk_idx is not None:
            k = topk_idx.size(1)
            local = recv_words[:, num_scales:num_scales + k] - r * num_local
            is_local = (local >= 0) & (local < num_local)
            recv_topk_idx = torch.full((rows, k), -1, dtype=topk_idx.dtype, device=self.device)
            recv_topk_idx[:num_recv] = torch.where(is_local, local, -1)
            weights = recv_words[:, num_scales + k:num_scales + 2 * k].view(torch.float32)
            recv_topk_weights = torch.zeros(rows, k, dtype=torch.float32, device=self.device)
            recv_topk_weights[:num_recv] = torch.where(is_local, weights, 0.0)
        recv_src_idx = torch.full((rows,), -1, dtype=torch.int32, device=self.device)
        recv_src_idx[:num_recv] = recv_words[:, -1]

        if num_worst_tokens:
            per_expert_list = []
        else:
            per_expert_list = [-(-n // expert_alignment) * expert_alignment for n in host[num_ranks * num_ranks:]]
        send_head = handles.send_head(is_token_in_rank)
        send_head._flashep_plan = plan  # lets cached dispatch and combine skip the count exchange
        rank_prefix._flashep_full = True  # every column is valid (read back by handles.from_tuple)
        routing = Routing(rank_prefix, channel_prefix, recv_channel_prefix, recv_src_idx, is_token_in_rank,
                          send_head, full_matrix=True)
        return DispatchResult(recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert_list, routing)

    def _cached_dispatch(self, x, x_scales, cached: Routing) -> DispatchResult:
        plan = self._plan(cached)
        num_recv = plan.num_recv
        recv_x = torch.empty(cached.num_recv_rows, x.size(1), dtype=x.dtype, device=self.device)
        self._send_rows(recv_x[:num_recv], x, plan)
        recv_scales = None
        if x_scales is not None:
            recv_scales = torch.empty(cached.num_recv_rows, x_scales.size(1), dtype=x_scales.dtype,
                                      device=self.device)
            self._send_rows(recv_scales[:num_recv], x_scales.view(torch.int32), plan)
        return DispatchResult(recv_x, recv_scales, None, None, None, None)

    def combine(self, x, routing, topk_weights, bias0, bias1):
        plan = self._plan(routing)
        num_tokens, hidden = routing.num_tokens, x.size(1)
        # rows go back the way they came: the received rows (a prefix of x) to their sources
        returned = torch.empty(plan.send_token.size(0), hidden, dtype=x.dtype, device=self.device)
        self._all_to_all(returned, x[:plan.num_recv], plan.send_counts, plan.recv_counts)
        combined = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=self.device)
        for bias in (bias0, bias1):
            if bias is not None:
                combined += bias.float()
        self._sum_by_rank(combined, returned, plan)

        combined_weights = None
        if topk_weights is not None:
            returned_weights = torch.empty(plan.send_token.size(0), topk_weights.size(1), dtype=torch.float32,
                                           device=self.device)
            self._all_to_all(returned_weights, topk_weights[:plan.num_recv], plan.send_counts, plan.recv_counts)
            combined_weights = torch.zeros(num_tokens, topk_weights.size(1), dtype=torch.float32, device=self.device)
            self._sum_by_rank(combined_weights, returned_weights, plan)
        return combined.to(torch.bfloat16), combined_weights

    @staticmethod
    def _sum_by_rank(acc: torch.Tensor, rows: torch.Tensor, plan: _ExchangePlan) -> None:
        """acc[t] += rows from rank 0, then rank 1, ... (the canonical fp32 order). Within one rank's block
        every token appears once, so the indexed add is a plain gather-add-scatter, deterministic."""
        start = 0
        for count in plan.send_counts:
            if count:
                tokens = plan.send_token[start:start + count]
                acc[tokens] += rows[start:start + count].float()
            start += count

    def _send_order(self, is_token_in_rank: torch.Tensor, total: int) -> torch.Tensor:
        """Token index of each row sent, ordered by destination rank then token index."""
        flat = _true_indices(is_token_in_rank.t().reshape(-1), total)
        return flat % max(1, is_token_in_rank.size(0))

    def _plan(self, routing: Routing) -> _ExchangePlan:
        plan = getattr(routing.send_head, "_flashep_plan", None)
        if plan is not None:
            return plan
        # a handle without the cached plan (rebuilt by the caller): derive it, at the cost of a CPU sync
        column = routing.rank_prefix_matrix[:, self.rank].to(torch.int64)
        recv_counts = torch.diff(column, prepend=column.new_zeros(1))
        send_counts = routing.is_token_in_rank.sum(0)
        host = torch.cat([send_counts, recv_counts]).tolist()
        send, recv = host[:self.num_ranks], host[self.num_ranks:]
        plan = _ExchangePlan(self._send_order(routing.is_token_in_rank, sum(send)), send, recv)
        routing.send_head._flashep_plan = plan
        return plan

    # ---- low-latency mode ---------------------------------------------------------------------------
    def low_latency_dispatch(self, x, topk_idx, num_max_tokens, num_experts, use_fp8, round_scale, use_ue8m0,
                             cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, with_hook):
        # dispatch_wait_recv_cost_stats stays as it is: this backend's receive phase never waits on a peer
        # (the data arrived during the call), so every per-source wait cost is 0.
        r, num_ranks = self.rank, self.num_ranks
        num_local = num_experts // num_ranks
        num_tokens, hidden = x.shape
        k = topk_idx.size(1)
        slots = num_ranks * num_max_tokens

        selected = topk_idx >= 0
        expert = torch.where(selected, topk_idx, num_experts).long()  # num_experts = "none"
        in_rank = torch.zeros(num_tokens, num_ranks + 1, dtype=torch.bool, device=self.device)
        in_rank.scatter_(1, expert // num_local, True)
        in_rank = in_rank[:, :num_ranks]
        per_expert = torch.zeros(num_experts + 1, dtype=torch.int64, device=self.device)
        per_expert.index_add_(0, expert.flatten(), torch.ones_like(expert.flatten()))
        # per destination rank: tokens sent, then selections of each of its experts
        mine = torch.cat([in_rank.sum(0).unsqueeze(1), per_expert[:num_experts].view(num_ranks, num_local)], 1)
        mine = mine.to(torch.int32).contiguous()
        theirs = torch.empty_like(mine)  # per source rank: tokens received, selections of my experts
        dist.all_to_all_single(theirs, mine, group=self.group)
        host = torch.cat([mine.flatten(), theirs.flatten()]).tolist()  # the CPU sync
        width = 1 + num_local
        mine_host = [host[j * width:(j + 1) * width] for j in range(num_ranks)]
        theirs_host = [host[(num_ranks + s) * width:(num_ranks + s + 1) * width] for s in range(num_ranks)]
        send_counts = [row[0] for row in mine_host]
        recv_counts = [row[0] for row in theirs_host]

        # one message per (token, destination rank): [data | scales | top-k (global ids) | token index]
        data_words, scale_words = _quantize_words(x, use_fp8, round_scale, use_ue8m0)
        messages = torch.cat([data_words, scale_words, topk_idx.to(torch.int32),
                              self._arange(num_tokens, torch.int32).unsqueeze(1)], 1)
        send_token = self._send_order(in_rank, sum(send_counts))
        received = torch.empty(sum(recv_counts), messages.size(1), dtype=torch.int32, device=self.device)
        self._all_to_all(received, messages.index_select(0, send_token), recv_counts, send_counts)
        rows_per_expert = [sum(row[1 + i] for row in theirs_host) for i in range(num_local)]
        if max(rows_per_expert, default=0) > slots:  # only when a token lists one expert several times
            raise ValueError(f"topk_idx: local expert {rows_per_expert.index(max(rows_per_expert))} of rank {r} "
                             f"would receive {max(rows_per_expert)} rows, more than num_ranks * "
                             f"num_max_dispatch_tokens_per_rank = {slots}")

        # outputs, allocated now and filled by the receive phase
        if use_fp8:
            recv_x = torch.empty(num_local, slots, hidden, dtype=torch.float8_e4m3fn, device=self.device)
            scale_dtype = torch.int32 if use_ue8m0 else torch.float32
            recv_scales = torch.empty(num_local, scale_words.size(1), slots, dtype=scale_dtype,
                                      device=self.device).transpose(1, 2)
        else:
            recv_x = torch.empty(num_local, slots, hidden, dtype=torch.bfloat16, device=self.device)
            recv_scales = None
        block_counts = theirs[:, 1:].t().to(torch.int64)  # [local expert, source rank]
        recv_count = block_counts.sum(1).to(torch.int32)
        block_begin = block_counts.cumsum(1) - block_counts
        layout_range = (block_begin << 32) | block_counts
        src_info = torch.full((num_local, slots), -1, dtype=torch.int32, device=self.device)

        # what the combine needs on the home side: the order in which owners will send rows back
        # (expert ascending, then token, then k), as (token, k) slots
        return_counts = [sum(row[1:]) for row in mine_host]
        same_expert = topk_idx.unsqueeze(2) == topk_idx.unsqueeze(1)
        last_k = torch.where(same_expert, self._arange(k), -1).amax(2)
        route = _LowLatencyRoute(
            selected=selected,
            read_slots=self._arange(num_tokens).unsqueeze(1) * k + last_k,
            return_slots=torch.argsort(expert.flatten(), stable=True)[:sum(return_counts)],
            return_counts=return_counts, send_rows=None, send_counts=[sum(row[1:]) for row in theirs_host])
        src_info._flashep_ll = route

        num_rows = sum(route.send_counts)
        topk_start = data_words.size(1) + scale_words.size(1)

        def receive() -> None:
            # expand each received token into one row per selection of a local expert; rows of an expert
            # are ordered by source rank, then source token, then k (layout_range's blocks)
            local = received[:, topk_start:topk_start + k] - r * num_local
            local = torch.where((local >= 0) & (local < num_local), local, num_local).flatten()
            order = torch.argsort(local, stable=True)[:num_rows]
            row_expert = local[order]
            expert_begin = recv_count.to(torch.int64).cumsum(0) - recv_count
            row_slot = self._arange(num_rows) - expert_begin[row_expert]
            message = received[order // k]
            recv_x.view(torch.int32)[row_expert, row_slot] = message[:, :data_words.size(1)]
            if recv_scales is not None:
                recv_scales.view(torch.int32)[row_expert, row_slot] = message[:, data_words.size(1):topk_start]
            src_info[row_expert, row_slot] = message[:, -1]
            # combine sends rows back grouped by source rank, experts ascending within each group
            message_source = torch.repeat_interleave(self._arange(num_ranks), theirs[:, 0],
                                                     output_size=received.size(0))
            by_source = torch.argsort(message_source[order // k] * num_local + row_expert, stable=True)
            route.send_rows = (row_expert * slots + row_slot)[by_source]
            if cumulative_local_expert_recv_stats is not None:
                cumulative_local_expert_recv_stats.add_(recv_count)

        return LowLatencyDispatchResult(recv_x, recv_scales, recv_count, src_info, layout_range, receive)

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, zero_copy, out,
                            combine_wait_recv_cost_stats, with_hook, use_logfmt=False) -> Callable[[], None]:
        # combine_wait_recv_cost_stats stays as it is: the receive phase never waits on a peer (cost 0)
        src_info, _, num_max_tokens, hidden, num_experts = handle
        route = getattr(src_info, "_flashep_ll", None)
        if route is None or route.send_rows is None:
            raise ValueError("handle: not made by this backend's low_latency_dispatch, or its receive hook has "
                             "not run yet")
        if tuple(topk_idx.shape) != tuple(route.selected.shape):
            raise ValueError(f"topk_idx must have the shape of the dispatch's topk_idx, "
                             f"{tuple(route.selected.shape)}, got {tuple(topk_idx.shape)}")
        source = self.get_next_low_latency_combine_buffer(num_max_tokens, hidden, num_experts) if zero_copy else x
        rows = source.view(-1, hidden).index_select(0, route.send_rows)
        if use_logfmt:  # what the receiver would decode: the codec is exact per row, so apply it here
            rows = logfmt.roundtrip(rows)
        returned = torch.empty(route.return_slots.size(0), hidden, dtype=torch.bfloat16, device=self.device)
        self._all_to_all(returned, rows, route.return_counts, route.send_counts)
        num_tokens, k = topk_idx.shape

        def receive() -> None:
            outputs = torch.empty(num_tokens * k, hidden, dtype=torch.bfloat16, device=self.device)
            outputs[route.return_slots] = returned
            use = (topk_idx >= 0) & route.selected
            acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=self.device)
            for i in range(k):  # k order, one fp32 product and one fp32 add per term
                term = topk_weights[:, i:i + 1] * outputs[route.read_slots[:, i]].float()
                acc += torch.where(use[:, i:i + 1], term, 0.0)
            out.copy_(acc.to(torch.bfloat16))

        return receive

    def get_next_low_latency_combine_buffer(self, num_max_tokens: int, hidden: int, num_experts: int) -> torch.Tensor:
        key = (num_max_tokens, hidden, num_experts)
        if key not in self._combine_buffers:
            num_local, slots = num_experts // self.num_ranks, self.num_ranks * num_max_tokens
            row_stride = hidden + hidden // 64  # the row stride DeepEP's combine buffer has
            storage = torch.empty(num_local * slots * row_stride, dtype=torch.bfloat16, device=self.device)
            self._combine_buffers[key] = storage.as_strided((num_local, slots, hidden),
                                                            (slots * row_stride, row_stride, 1))
        return self._combine_buffers[key]

    def clean_low_latency_buffer(self, num_max_tokens: int, hidden: int, num_experts: int) -> None:
        dist.barrier(group=self.group)  # no persistent signalling state to clean

    def destroy(self) -> None:
        self._combine_buffers.clear()


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def _true_indices(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the True entries of a 1-D mask, in order, given their number: like `nonzero`, but
    without a CPU sync on the GPU."""
    if count == 0:
        return torch.zeros(0, dtype=torch.int64, device=mask.device)
    cumulative = torch.cumsum(mask, 0)
    wanted = torch.arange(1, count + 1, dtype=cumulative.dtype, device=mask.device)
    return torch.searchsorted(cumulative, wanted)


def _quantize_words(x: torch.Tensor, use_fp8: bool, round_scale: bool, use_ue8m0: bool):
    """Low-latency payload of each token as int32 words -> (data [T, H/2 or H/4], scales [T, S]).

    Per token and 128-channel group (docs/design.md): amax = max(max|x|, 1e-4); plain scales are
    448 / amax, round_scale ones are powers of two 2^-e with e = ceil(log2(amax / 448)) taken from the
    float's bits; the stored scale is the inverse (float32), or the byte e + 127 packed four per int32."""
    num_tokens, hidden = x.shape
    if not use_fp8:
        return x.view(torch.int32), x.new_empty(num_tokens, 0, dtype=torch.int32)
    groups = x.float().view(num_tokens, hidden // FP8_GROUP, FP8_GROUP)
    amax = groups.abs().amax(2).clamp_min(1e-4)
    if round_scale:
        bits = _divide(amax, FP8_MAX).view(torch.int32)
        exponent = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)
        scale = ((127 - exponent) << 23).view(torch.float32)
        scale_inv = ((127 + exponent) << 23).view(torch.float32)
    else:
        scale = torch.reciprocal(amax) * FP8_MAX
        scale_inv = _divide(amax, FP8_MAX)
    data = (groups * scale.unsqueeze(2)).to(torch.float8_e4m3fn).view(num_tokens, hidden)
    if use_ue8m0:
        scale_words = (exponent + 127).to(torch.uint8).view(torch.int32)  # group 4p + j in byte j
    else:
        scale_words = scale_inv.view(torch.int32)
    return data.view(torch.int32), scale_words


def _divide(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """Correctly rounded t / divisor on every device (CUDA turns division by a Python scalar into a
    multiplication by its reciprocal, which rounds differently)."""
    return t / torch.full_like(t, divisor)
