"""Normal mode inside one NVLink domain: the host side of the Triton kernels in `kernels/normal.py`.

Two symmetric heaps per backend:
- the signal heap (flags and notify slots, tens of KiB), mapped with the Buffer (a collective call
  anyway): fixed layout for the Buffer's lifetime, so a flag is always a flag and epochs stay valid
  across data-heap growth; and a peer that skips any call, even the first, ends in a bounded kernel wait;
- the data heap, mapped at the first call that moves data (every rank reaches it collectively): two
  halves (the kernels of epoch e use half e % 2) of row records. Its size is max(num_nvl_bytes, need).
  A non-cached dispatch without `num_worst_tokens` learns every rank's token count in notify, so all
  ranks grow it together, to the worst case of those counts (T_max * R rows: every token to every rank,
  in bf16, and back through the combine) with a quarter of headroom: worst-token dispatches with
  num_worst_tokens <= T_max * R, cached dispatches and combines then fit. Calls without a host sync
  (worst-token and cached dispatch, combine) cannot grow it and raise instead, naming the bytes needed.

Kernel roles: each dispatch and combine launches `num_sms` programs; the first `num_sms - receivers` push
rows over NVLink and never wait, the others wait for the peers' pushers and copy (dispatch) or reduce
(combine). The split and the publish interval must be the same on every rank.

Tuning knobs (environment at construction; they must be equal on every rank):
- FLASHEP_TILE_TOKENS: rows per tile, pushers and receivers (power of two, default 16);
- FLASHEP_TILE_HIDDEN: 2-byte elements per row chunk of a tile (power of two, default 1024);
- FLASHEP_NUM_WARPS: warps per program (default 8);
- FLASHEP_STAGES: software-pipelining depth of the loops over a row's chunks (1: none; 2-3 keep the next
  chunks' loads in flight through cp.async; default 3 on GPUs). The combine's reduction, which loads one
  tile per rank and bias per chunk, narrows its chunks so that its stages fit FLASHEP_REDUCE_SMEM bytes
  of shared memory (default 196608; the compiled kernel stays within an SM's 227 KiB at 2 to 8 ranks);
- FLASHEP_RECEIVER_SHARE: share of a dispatch's programs that receive (default 1/3; rounded, at least 1,
  at most num_sms - 1); FLASHEP_COMBINE_RECEIVER_SHARE: the same for a combine (default 0.55: a combine's
  receivers read every row and reduce, a dispatch's copy only the peers' rows; both measured on 2x H200,
  docs/perf.md);
  FLASHEP_RECEIVERS / FLASHEP_COMBINE_RECEIVERS: an exact count instead of a share;
- FLASHEP_PUBLISH_TOKENS: tokens (combine: rows) a pusher moves between two progress flags, rounded to
  whole channels (default 32); the first and each of the last channels get a flag too.
  Fewer flags keep the NVLink stores streaming (a flag's release waits for the stores before it); more
  let receivers follow closer.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.distributed as dist
import triton

from ..kernels import normal as kernels
from ..kernels.sync import ErrorWord, use_timer, wait_budget
from ..transport.heap import HostMeeting, Layout, SymmetricHeap
from .base import Backend, DispatchResult, Routing

_LAYOUT_BLOCK_T = 128
_NOTIFY_BLOCK_T = 256


class TritonNormalBackend(Backend):
    name = "triton"

    def __init__(self, buffer, meeting: Optional[HostMeeting] = None):
        self.group = buffer.group
        self.rank = buffer.rank
        self.num_ranks = buffer.group_size
        self.device = buffer.device
        self.meeting = meeting if meeting is not None else HostMeeting(self.group)
        self.num_nvl_bytes = buffer.num_nvl_bytes
        self.tile_tokens = _env_power_of_two("FLASHEP_TILE_TOKENS", 16)
        self.tile_hidden = _env_power_of_two("FLASHEP_TILE_HIDDEN", 1024)
        self.num_warps = _env_power_of_two("FLASHEP_NUM_WARPS", 8)
        self.stages = _env_int("FLASHEP_STAGES", 3 if self.device.type == "cuda" else 1, minimum=1)
        self.reduce_smem = _env_int("FLASHEP_REDUCE_SMEM", 192 * 1024, minimum=1)
        self.receivers = _env_int("FLASHEP_RECEIVERS", None, minimum=1)
        self.combine_receivers = _env_int("FLASHEP_COMBINE_RECEIVERS", self.receivers, minimum=1)
        self.receiver_share = _env_share("FLASHEP_RECEIVER_SHARE", 1 / 3)
        self.combine_receiver_share = _env_share("FLASHEP_COMBINE_RECEIVER_SHARE", 0.55)
        self.publish_tokens = _env_int("FLASHEP_PUBLISH_TOKENS", 32, minimum=1)
        self.signal_layout = _SignalLayout(self.num_ranks)
        self.signal_heap = SymmetricHeap(self.group, self.signal_layout.nbytes, self.device, self.meeting,
                                         "normal-mode signal buffer allocation")
        self.data_heap: Optional[SymmetricHeap] = None
        self.epoch = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.errors = ErrorWord(self.device)
        self._unmapped_buffer: Optional[torch.Tensor] = None
        self._dummy = {dtype: torch.empty(1, dtype=dtype, device=self.device)
                       for dtype in (torch.int32, torch.int64, torch.float32, torch.bfloat16)}

    # ---- memory -----------------------------------------------------------------------------------------
    @property
    def raw_buffer(self) -> Optional[torch.Tensor]:
        """This rank's data heap (`Buffer.get_local_buffer_tensor`); before the first call maps it, a
        placeholder that Buffer may set."""
        return self.data_heap.local if self.data_heap is not None else self._unmapped_buffer

    @raw_buffer.setter
    def raw_buffer(self, placeholder: torch.Tensor) -> None:
        self._unmapped_buffer = placeholder

    @property
    def nbytes(self) -> int:
        """Symmetric memory this backend holds on each rank."""
        return sum(h.nbytes for h in (self.signal_heap, self.data_heap) if h is not None)

    def _reserve(self, half_bytes: int, agreed: bool, what: str) -> None:
        """Make each half of the data heap hold `half_bytes`. `agreed`: every rank computed the same value
        (after a host sync), so all may grow the heap together."""
        need = 2 * _round_up(max(half_bytes, 1), kernels.RECORD_ALIGN)
        heap = self.data_heap
        if heap is not None and heap.nbytes >= need:
            return
        if agreed:
            self._map_data(max(self.num_nvl_bytes, need + need // 4))  # headroom for the next calls
            return
        if heap is None:
            _refuse_while_capturing(self.device)
            self.meeting(f"normal-mode buffer allocation ({what})")
            self._map_data(max(self.num_nvl_bytes, _all_ranks_max(need, self.group, self.device)))
            return
        raise RuntimeError(f"flashep: this {what} needs {need} bytes of normal-mode buffer per rank, but only "
                           f"{heap.nbytes} are mapped; create the Buffer with num_nvl_bytes >= {need} (a "
                           f"non-cached dispatch without num_worst_tokens grows the buffer by itself)")

    def _map_data(self, nbytes: int) -> None:
        old = self.data_heap
        if old is not None:  # nobody may still read or write the old heap
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.meeting("normal-mode buffer growth")
            self.data_heap = None
            old.close()
        self.data_heap = SymmetricHeap(self.group, nbytes, self.device, self.meeting, "normal-mode buffer allocation")

    def _half(self) -> int:
        return self.data_heap.nbytes // 2 // kernels.RECORD_ALIGN * kernels.RECORD_ALIGN

    # ---- layout -----------------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        self.errors.check()
        num_tokens, num_topk = topk_idx.shape
        per_rank = torch.zeros(self.num_ranks, dtype=torch.int32, device=self.device)
        per_expert = torch.zeros(num_experts, dtype=torch.int32, device=self.device)
        in_rank = torch.empty(num_tokens, self.num_ranks, dtype=torch.bool, device=self.device)
        if num_tokens > 0:
            grid = (triton.cdiv(num_tokens, _LAYOUT_BLOCK_T),)
            kernels.ep_layout_kernel[grid](topk_idx, per_rank, per_expert, in_rank.view(torch.uint8), num_tokens,
                                           num_topk, num_experts // self.num_ranks, NUM_RANKS=self.num_ranks,
                                           R_PAD=self._rank_pad, K_PAD=_pow2(num_topk), BLOCK_T=_LAYOUT_BLOCK_T,
                                           num_warps=4)
        return per_rank, per_expert, in_rank

    # ---- dispatch ---------------------------------------------------------------------------------------
    def dispatch(self, x, x_scales, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
                 num_tokens_per_expert, expert_alignment, num_worst_tokens, num_channels, cached):
        # num_tokens_per_rank is implied by is_token_in_rank, which notify counts per channel anyway
        self.errors.check()
        _check_channels(num_channels)
        if cached is not None:
            return self._cached_dispatch(x, x_scales, cached, num_channels)
        num_ranks, hidden = self.num_ranks, x.size(1)
        num_topk = topk_idx.size(1) if topk_idx is not None else 0
        num_local = num_tokens_per_expert.size(0) // num_ranks
        record = _dispatch_record_bytes(x, x_scales, num_topk)
        # the same rows may come back through a bf16 combine or be re-sent in bf16 with the handle
        bf16_record = _dispatch_record_bytes(torch.empty(0, hidden, dtype=torch.bfloat16), None, num_topk)
        combine_record = _combine_record_bytes(hidden, num_topk)
        if num_worst_tokens > 0:  # checked before any kernel runs, so that an error leaves no peer waiting
            home_bound = x.size(0) * num_ranks  # rows this rank's combine can receive at most
            self._reserve(max(num_worst_tokens * max(record, bf16_record), home_bound * combine_record),
                          agreed=False, what="dispatch with num_worst_tokens")
        rank_prefix, send_prefix, recv_prefix, summary = self._notify(is_token_in_rank, num_tokens_per_expert,
                                                                      num_channels)
        if num_worst_tokens > 0:
            num_rows, combine_rows, per_expert_list = num_worst_tokens, None, []
        else:
            host = summary.cpu()  # the one host synchronisation of normal mode
            self.errors.check()
            pairs = num_ranks * num_ranks
            prefix = host[:pairs].view(num_ranks, num_ranks).to(torch.int64)
            sends = prefix - torch.cat([prefix.new_zeros(1, num_ranks), prefix[:-1]])  # n(s -> j)
            num_rows, combine_rows = int(sends[:, self.rank].sum()), int(sends[self.rank].sum())
            worst_rows = int(host[pairs + num_local:].max()) * num_ranks  # DeepEP's num_worst_tokens = T * R
            self._reserve(worst_rows * max(record, bf16_record, combine_record), agreed=True, what="dispatch")
            per_expert_list = [-(-int(c) // expert_alignment) * expert_alignment
                               for c in host[pairs:pairs + num_local].tolist()]
        out = _DispatchOutputs(x, x_scales, topk_idx, num_rows, self.device)
        send_head = torch.empty(x.size(0), num_ranks, dtype=torch.int32, device=self.device)
        self._launch_dispatch(x, x_scales, topk_idx, topk_weights, is_token_in_rank, rank_prefix, send_prefix,
                              recv_prefix, out, send_head, num_local, num_channels, record,
                              write_send_head=True, worst=num_worst_tokens > 0)
        self.epoch.add_(1)
        rank_prefix._flashep_full = True  # read back by handles.from_tuple
        rank_prefix._flashep_home_rows = combine_rows  # exact combine size when known (None: bounded by T * R)
        routing = Routing(rank_prefix, send_prefix, recv_prefix, out.src_idx, is_token_in_rank, send_head,
                          full_matrix=True)
        return DispatchResult(out.x, out.scales, out.topk_idx, out.topk_weights, per_expert_list, routing)

    def _cached_dispatch(self, x, x_scales, routing: Routing, num_channels: int) -> DispatchResult:
        _check_routing(routing)
        num_rows = routing.num_recv_rows
        record = _dispatch_record_bytes(x, x_scales, 0)
        self._reserve(num_rows * record, agreed=False, what="cached dispatch")
        out = _DispatchOutputs(x, x_scales, None, num_rows, self.device)
        num_local = 1  # no top-k to rewrite
        self._launch_dispatch(x, x_scales, None, None, routing.is_token_in_rank, routing.rank_prefix_matrix,
                              routing.channel_prefix_matrix, routing.recv_channel_prefix_matrix, out,
                              routing.send_head, num_local, num_channels, record, write_send_head=False, worst=False)
        self.epoch.add_(1)
        return DispatchResult(out.x, out.scales, None, None, None, None)

    def _notify(self, is_token_in_rank, num_tokens_per_expert, num_channels):
        """-> rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, and `summary`: the rank
        prefix matrix (a view of it), the received selections per local expert, every rank's token count."""
        num_ranks, pairs = self.num_ranks, self.num_ranks * self.num_ranks
        num_local = num_tokens_per_expert.size(0) // num_ranks
        num_tokens = is_token_in_rank.size(0)
        summary = torch.empty(pairs + num_local + num_ranks, dtype=torch.int32, device=self.device)
        rank_prefix = summary[:pairs].view(num_ranks, num_ranks)
        send_prefix = torch.empty(num_ranks, num_channels, dtype=torch.int32, device=self.device)
        recv_prefix = torch.empty(num_ranks, num_channels, dtype=torch.int32, device=self.device)
        layout = self.signal_layout
        kernels.ep_notify_kernel[(1,)](
            is_token_in_rank.view(torch.uint8), num_tokens_per_expert, self.signal_heap.peer_bases,
            layout.notify_flags, layout.slots, self.epoch, self.errors.address,
            send_prefix, rank_prefix, recv_prefix, summary[pairs:pairs + num_local], summary[pairs + num_local:],
            self.rank, num_tokens, num_channels, _tokens_per_channel(num_tokens, num_channels), num_local,
            wait_budget(),
            NUM_RANKS=num_ranks, R_PAD=self._rank_pad, L_BLOCK=min(1024, _pow2(num_local)),
            BLOCK_T=_NOTIFY_BLOCK_T, MAX_C=kernels.MAX_CHANNELS, MAX_L=kernels.MAX_LOCAL_EXPERTS,
            USE_TIMER=use_timer(), num_warps=4)
        return rank_prefix, send_prefix, recv_prefix, summary

    def _launch_dispatch(self, x, x_scales, topk_idx, topk_weights, is_token_in_rank, rank_prefix, send_prefix,
                         recv_prefix, out: "_DispatchOutputs", send_head, num_local, num_channels, record_bytes,
                         write_send_head: bool, worst: bool) -> None:
        num_tokens = x.size(0)
        words = x.view(torch.int32)
        row_words = words.size(1)
        num_scales = x_scales.size(1) if x_scales is not None else 0
        scales = x_scales.view(torch.int32) if x_scales is not None else self._dummy[torch.int32]
        num_topk = topk_idx.size(1) if topk_idx is not None else 0
        int32, int64, f32 = (self._dummy[d] for d in (torch.int32, torch.int64, torch.float32))
        num_programs = 2 * num_channels
        pushers = num_programs - _receivers(self.receivers, self.receiver_share, num_programs)
        tokens_per_channel = _tokens_per_channel(num_tokens, num_channels)
        # a pusher moves about tokens_per_channel / pushers tokens of every channel
        publish_every = _publish_every(self.publish_tokens, tokens_per_channel / pushers, num_channels)
        kernels.ep_dispatch_kernel[(num_programs,)](
            words, scales, scales.stride(0) if x_scales is not None else 0,
            scales.stride(1) if x_scales is not None else 0,
            topk_idx if topk_idx is not None else int64, topk_weights if topk_weights is not None else f32,
            is_token_in_rank.view(torch.uint8), rank_prefix, send_prefix, recv_prefix,
            out.x.view(torch.int32), out.scales.view(torch.int32) if out.scales is not None else int32,
            out.topk_idx if out.topk_idx is not None else int64,
            out.topk_weights if out.topk_weights is not None else f32, out.src_idx, send_head,
            self.data_heap.peer_bases, self._half(), self.signal_heap.peer_bases, self.signal_layout.dispatch_flags,
            self.epoch, self.errors.address,
            self.rank, num_tokens, num_channels, tokens_per_channel, pushers, publish_every, num_local,
            num_scales, num_topk, self._half() // record_bytes, out.x.size(0), wait_budget(),
            NUM_RANKS=self.num_ranks, R_PAD=self._rank_pad, P_PAD=_pow2(pushers), ROW_WORDS=row_words,
            RECORD_WORDS=record_bytes // 4, S_PAD=_pow2(num_scales), K_PAD=_pow2(num_topk),
            BLOCK_T=self.tile_tokens, BLOCK_W=min(max(self.tile_hidden // 2, 16), _pow2(row_words)),
            HAS_SCALES=x_scales is not None, HAS_TOPK=topk_idx is not None, WRITE_SEND_HEAD=write_send_head,
            WORST=worst, USE_TIMER=use_timer(), STAGES=self.stages, num_warps=self.num_warps)

    # ---- combine ----------------------------------------------------------------------------------------
    def combine(self, x, routing, topk_weights, bias0, bias1):
        self.errors.check()
        _check_routing(routing)
        num_channels = routing.channel_prefix_matrix.size(1)
        _check_channels(num_channels)
        num_tokens, hidden = routing.num_tokens, x.size(1)
        num_topk = topk_weights.size(1) if topk_weights is not None else 0
        record_bytes = _combine_record_bytes(hidden, num_topk)
        home_rows = getattr(routing.rank_prefix_matrix, "_flashep_home_rows", None)
        if home_rows is None:
            home_rows = num_tokens * self.num_ranks
        self._reserve(home_rows * record_bytes, agreed=False, what="combine")
        combined = torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device=self.device)
        combined_weights = (torch.empty(num_tokens, num_topk, dtype=torch.float32, device=self.device)
                            if topk_weights is not None else None)
        num_programs = 2 * num_channels
        pushers = num_programs - _receivers(self.combine_receivers, self.combine_receiver_share, num_programs)
        # a pusher moves about (rows from peers) / (channels * pushers) rows of every channel
        peer_rows = x.size(0) * (self.num_ranks - 1) / self.num_ranks
        publish_every = _publish_every(self.publish_tokens, peer_rows / (num_channels * pushers), num_channels)
        block_h = min(max(self.tile_hidden, 32), _pow2(hidden))
        # the reduction loads a tile per rank and per bias each chunk; its pipeline stages share the budget
        loads = self.num_ranks + (bias0 is not None) + (bias1 is not None)
        reduce_block_h = block_h
        while (self.stages > 1 and reduce_block_h > 64
               and self.stages * loads * self.tile_tokens * reduce_block_h * 2 > self.reduce_smem):
            reduce_block_h //= 2
        bf16, f32 = self._dummy[torch.bfloat16], self._dummy[torch.float32]
        kernels.ep_combine_kernel[(num_programs,)](
            x, topk_weights if topk_weights is not None else f32, bias0 if bias0 is not None else bf16,
            bias1 if bias1 is not None else bf16, routing.is_token_in_rank.view(torch.uint8), routing.send_head,
            routing.rank_prefix_matrix, routing.recv_channel_prefix_matrix,
            combined, combined_weights if combined_weights is not None else f32,
            self.data_heap.peer_bases, self._half(), self.signal_heap.peer_bases, self.signal_layout.combine_flags,
            self.epoch, self.errors.address,
            self.rank, num_tokens, num_channels, _tokens_per_channel(num_tokens, num_channels), pushers,
            publish_every, num_topk, self._half() // record_bytes, wait_budget(),
            NUM_RANKS=self.num_ranks, R_PAD=self._rank_pad, P_PAD=_pow2(pushers), HIDDEN=hidden,
            RECORD_ELEMS=record_bytes // 2, K_PAD=_pow2(num_topk), BLOCK_T=self.tile_tokens, BLOCK_H=block_h,
            REDUCE_BLOCK_H=reduce_block_h, HAS_WEIGHTS=topk_weights is not None, HAS_BIAS0=bias0 is not None,
            HAS_BIAS1=bias1 is not None, USE_TIMER=use_timer(), STAGES=self.stages, num_warps=self.num_warps)
        self.epoch.add_(1)
        return combined, combined_weights

    # ---- lifetime ---------------------------------------------------------------------------------------
    def destroy(self) -> None:
        for heap in (self.data_heap, self.signal_heap):
            if heap is not None:
                heap.close()
        self.data_heap = self.signal_heap = None
        self.meeting.close()

    @property
    def _rank_pad(self) -> int:
        return _pow2(self.num_ranks)


class _SignalLayout:
    """Byte offsets in the signal heap (identical on every rank)."""

    def __init__(self, num_ranks: int):
        slot_ints = kernels.MAX_CHANNELS + kernels.MAX_LOCAL_EXPERTS + num_ranks + 1
        flags_per_kind = num_ranks * kernels.MAX_PUSHERS * 8
        layout = Layout()
        self.notify_flags = layout.add("notify_flags", num_ranks * 8)
        self.dispatch_flags = layout.add("dispatch_flags", flags_per_kind)
        self.combine_flags = layout.add("combine_flags", flags_per_kind)
        self.slots = layout.add("notify_slots", num_ranks * slot_ints * 4)
        self.nbytes = layout.size


class _DispatchOutputs:
    """Output tensors of one dispatch with `num_rows` rows."""

    def __init__(self, x, x_scales, topk_idx, num_rows: int, device):
        self.x = torch.empty(num_rows, x.size(1), dtype=x.dtype, device=device)
        self.scales = (torch.empty(num_rows, x_scales.size(1), dtype=x_scales.dtype, device=device)
                       if x_scales is not None else None)
        self.topk_idx = self.topk_weights = None
        if topk_idx is not None:
            self.topk_idx = torch.empty(num_rows, topk_idx.size(1), dtype=topk_idx.dtype, device=device)
            self.topk_weights = torch.empty(num_rows, topk_idx.size(1), dtype=torch.float32, device=device)
        self.src_idx = torch.empty(num_rows, dtype=torch.int32, device=device)


def _dispatch_record_bytes(x: torch.Tensor, x_scales: Optional[torch.Tensor], num_topk: int) -> int:
    """Row, scales, top-k ids, top-k weights, source index: all 4-byte words."""
    row_bytes = x.size(1) * x.element_size()
    num_scales = x_scales.size(1) if x_scales is not None else 0
    return _round_up(row_bytes + 4 * (num_scales + 2 * num_topk + 1), kernels.RECORD_ALIGN)


def _combine_record_bytes(hidden: int, num_topk: int) -> int:
    return _round_up(2 * hidden + 4 * num_topk, kernels.RECORD_ALIGN)


def _check_channels(num_channels: int) -> None:
    if num_channels > kernels.MAX_CHANNELS:
        raise ValueError(f"config.num_sms must be <= {2 * kernels.MAX_CHANNELS} for the Triton normal kernels, "
                         f"got {2 * num_channels}")


def _check_routing(routing: Routing) -> None:
    if not routing.full_matrix:
        raise ValueError("handle: the Triton normal kernels need a handle made by this backend's dispatch (its "
                         "rank_prefix_matrix must hold every rank's counts)")


def _refuse_while_capturing(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("flashep: the normal-mode buffer is mapped at the first normal-mode call, which cannot "
                           "happen inside CUDA-graph capture: make one dispatch (and combine) before capturing")


def _all_ranks_max(value: int, group, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def _tokens_per_channel(num_tokens: int, num_channels: int) -> int:
    return max(1, -(-num_tokens // num_channels))  # as handles.channel_prefix_matrix


def _pow2(n: int) -> int:
    return max(2, triton.next_power_of_2(max(1, n)))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _receivers(count: Optional[int], share: float, num_programs: int) -> int:
    """Receiver programs of a launch: `count`, else `share` of the programs, leaving at least one pusher."""
    wanted = count if count is not None else round(share * num_programs)
    return min(max(1, wanted), num_programs - 1)


def _publish_every(publish_tokens: int, per_channel: float, num_channels: int) -> int:
    """Channels between two progress flags of a pusher that moves `per_channel` tokens of each channel."""
    if per_channel <= 0:
        return num_channels
    return min(num_channels, max(1, math.ceil(publish_tokens / per_channel)))


def _env_value(name: str, default, parse, what: str):
    """The environment variable `name` parsed by `parse` (`default` when unset or empty); a value `parse`
    rejects raises a ValueError naming the variable and `what` it must be."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return parse(raw)
    except ValueError:
        raise ValueError(f"{name} must be {what}, got {raw!r}") from None


def _env_int(name: str, default: Optional[int], minimum: int) -> Optional[int]:
    number = _env_value(name, default, int, "an integer")
    if number is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def _env_power_of_two(name: str, default: int) -> int:
    value = _env_value(name, default, int, "a power of two")
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")
    return value


def _env_share(name: str, default: float) -> float:
    between = "a number between 0 and 1 (exclusive)"
    share = _env_value(name, default, float, between)
    if not 0.0 < share < 1.0:
        raise ValueError(f"{name} must be {between}, got {share!r}")
    return share
