"""Low-latency mode on Triton kernels over NVLink symmetric memory (kernels in flashep.kernels.low_latency).

The send phase of an operation stores every message straight into the destination's region of a symmetric
heap and raises flags; the receive phase waits for the flags and builds the outputs. With a receive hook
they are two launches of the operation's kernel (the hook launches the second); without one, a single
launch runs both, the receiving programs after the sending ones. Nothing in the data path syncs
with the host, so calls can be captured in CUDA graphs once the heap exists.

The heap is this backend's own (separate from normal mode's), allocated at the first low-latency call or in
`clean_low_latency_buffer`, sized for (T_max, hidden, top-k capacity), and re-allocated collectively when a
later call needs more: every rank makes the same low-latency calls with the same sizes, so every rank takes
the same decision.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import _env
from ..kernels import low_latency as kernels
from ..kernels.sync import PHASE_LL_COMBINE, PHASE_LL_DISPATCH, ErrorWord, use_timer, wait_budget
from ..launch import launch
from ..transport.heap import HostMeeting, Layout, SymmetricHeap
from .base import Backend, LowLatencyDispatchResult

TOPK_LIMIT = 32  # largest top-k the message slots hold
MAX_GROUPS = kernels.MAX_GROUPS.value  # flags per (half, source rank): upper bound of programs per peer
SLOT_ATTR = "_flashep_topk_slot"  # int8 [L, R * T_max] attached to src_info: k of each received row
# int32 [R + R * T_max * K] attached to src_info: tokens per source, then per (source, token, k) the received
# row (local expert * R * T_max + row), written for the k whose expert lives here (the others are never read):
# what a pre-reducing combine sums per token
ROW_MAP_ATTR = "_flashep_row_map"


@dataclass(frozen=True)
class Tuning:
    """Launch shapes. Env: FLASHEP_LL_SEND_PROGRAMS, FLASHEP_LL_RECV_PROGRAMS, FLASHEP_LL_COMBINE_RECV_PROGRAMS,
    FLASHEP_LL_BLOCK_H, FLASHEP_LL_TILE_TOKENS, FLASHEP_LL_TILE_ROWS, FLASHEP_LL_COMBINE_TILE_ROWS,
    FLASHEP_LL_SCAN_ROWS, FLASHEP_LL_NUM_WARPS, FLASHEP_LL_FUSED, FLASHEP_LL_PREREDUCE, FLASHEP_LL_PREREDUCE_TOKENS.
    Every rank must use the same FLASHEP_LL_SEND_PROGRAMS (it fixes how many flags a receiver waits for)."""

    send_programs: int  # programs of each send kernel, spread over the destination ranks
    recv_programs: int  # programs of the dispatch receive (at least one per local expert)
    combine_recv_programs: int  # programs of the combine receive (at least one per token tile)
    block_h: int  # hidden elements per tile (a multiple of 512: FP8 scales pack 4 groups per int32)
    tile_tokens: int  # tokens per tile in the dispatch send and the combine receive
    tile_rows: int  # rows per tile in the dispatch receive
    combine_tile_rows: int  # rows per tile in the combine send
    # home tokens per tile in the pre-reducing combine send. 2x H200, session 20 (quick runs): 2 -> 25.7 us,
    # 4 -> 30-38 us (215 registers and spills in the offline sm_90 compile; 2: 188, none), 8 -> 79.9 us
    prereduce_tokens: int
    scan_rows: int  # received top-k rows the dispatch receive reads per step when it packs the rows
    num_warps: int
    fused: int  # 1: a call without a hook launches both phases at once; 0: two launches, as with a hook
    # 1: a combine without a hook (nor LogFMT) sums on the expert side: per (token, rank) the one row the rank
    # answers, or the fp32 sum of its several (4H bytes), instead of one row per (token, k): 0.49 / 0.77 / 0.92
    # of the bytes over the links at 2 / 4 / 8 ranks (DeepSeek-V3 routing)
    prereduce: int

    # GPU: spread the stores over many SMs. Interpreter: programs run one after another, so few programs
    # with large tiles are fastest.
    GPU_DEFAULTS = dict(send_programs=128, recv_programs=128, combine_recv_programs=128, block_h=1024,
                        tile_tokens=4, tile_rows=16, combine_tile_rows=4, prereduce_tokens=2, scan_rows=256,
                        num_warps=8, fused=1, prereduce=1)
    INTERPRETER_DEFAULTS = dict(send_programs=1, recv_programs=1, combine_recv_programs=1, block_h=1024,
                                tile_tokens=16, tile_rows=16, combine_tile_rows=16, prereduce_tokens=16,
                                scan_rows=128, num_warps=4, fused=1, prereduce=1)
    ENV = dict(send_programs="FLASHEP_LL_SEND_PROGRAMS", recv_programs="FLASHEP_LL_RECV_PROGRAMS",
               combine_recv_programs="FLASHEP_LL_COMBINE_RECV_PROGRAMS",
               block_h="FLASHEP_LL_BLOCK_H", tile_tokens="FLASHEP_LL_TILE_TOKENS", tile_rows="FLASHEP_LL_TILE_ROWS",
               combine_tile_rows="FLASHEP_LL_COMBINE_TILE_ROWS", prereduce_tokens="FLASHEP_LL_PREREDUCE_TOKENS",
               scan_rows="FLASHEP_LL_SCAN_ROWS",
               num_warps="FLASHEP_LL_NUM_WARPS", fused="FLASHEP_LL_FUSED", prereduce="FLASHEP_LL_PREREDUCE")

    POWERS_OF_TWO = ("block_h", "tile_tokens", "tile_rows", "combine_tile_rows", "prereduce_tokens", "scan_rows",
                     "num_warps")

    @staticmethod
    def from_env() -> "Tuning":
        defaults = Tuning.INTERPRETER_DEFAULTS if _env.interpret_mode() else Tuning.GPU_DEFAULTS
        values = {}
        for field, env in Tuning.ENV.items():
            if field in Tuning.POWERS_OF_TWO:
                values[field] = _env.power_of_two(env, defaults[field])
            else:
                values[field] = _env.integer(env, defaults[field], minimum=1 if field.endswith("programs") else 0)
        tuning = Tuning(**values)
        if tuning.block_h < 512:
            raise ValueError(f"FLASHEP_LL_BLOCK_H must be >= 512, got {tuning.block_h}")
        for field in ("fused", "prereduce"):
            if getattr(tuning, field) not in (0, 1):
                raise ValueError(f"{Tuning.ENV[field]} must be 0 or 1, got {getattr(tuning, field)}")
        return tuning


@dataclass(frozen=True)
class Capacity:
    num_max_tokens: int
    hidden: int
    topk: int

    def covers(self, other: "Capacity") -> bool:
        return (self.num_max_tokens >= other.num_max_tokens and self.hidden >= other.hidden
                and self.topk >= other.topk)

    def union(self, other: "Capacity") -> "Capacity":
        return Capacity(max(self.num_max_tokens, other.num_max_tokens), max(self.hidden, other.hidden),
                        max(self.topk, other.topk))


class Regions:
    """Byte offsets inside the heap. Every region but the flags holds two halves (operation epoch % 2).

    flags: int64 [2, R, G] for dispatch and for combine (G = flags per source rank), int64 [2] publish,
    int64 [2, R] weights (one per home rank).
    data: per dispatch message (source rank, token < T) a record of 2 * hidden bytes: the BF16 row, or the
    FP8 row followed by its 4-byte scales. meta: per message `meta` int32: the top-k expert ids. combine: per
    (token, k) a BF16 row, or with LogFMT per group of 128 channels its plain BF16 or its codes (see
    flashep/logfmt.py); a pre-reducing combine uses slots (token, 2r) and (token, 2r + 1) per owner rank r: the
    one row r answers (bf16), or the fp32 sum of its several.
    combine_aux, for a combine's side data: with LogFMT per (token, k) one int32 per 128-channel group; in a
    pre-reducing combine per (home rank, token, k) an int64 the home pushed: the top-k id in the high half (-1 for
    none), the float32 weight's bits in the low half (blocks of T * K words rounded up to even per home). A combine uses
    one of the two, so they share the region. publish: per (token, k) this rank's expert ids, read by the
    owners when a handle lost its per-row top-k slots.
    """

    def __init__(self, num_ranks: int, capacity: Capacity):
        slots = num_ranks * capacity.num_max_tokens
        self.capacity = capacity
        self.row_bytes = 2 * capacity.hidden
        self.groups = min(MAX_GROUPS, capacity.num_max_tokens)
        self.meta = -(-capacity.topk // 4) * 4
        flag_bytes = 2 * num_ranks * self.groups * 8
        layout = Layout()
        self.dispatch_flags = layout.add("flags", 2 * flag_bytes + 2 * 8 + 2 * num_ranks * 8)
        self.combine_flags = self.dispatch_flags + flag_bytes
        self.publish_flags = self.combine_flags + flag_bytes
        self.weights_flags = self.publish_flags + 2 * 8
        self.flags_end = layout.size
        self.data = layout.add("data", 2 * slots * self.row_bytes)
        self.meta_records = layout.add("meta", 2 * slots * self.meta * 4)
        self.combine = layout.add("combine", 2 * capacity.num_max_tokens * capacity.topk * self.row_bytes)
        self.meta_stride = capacity.hidden // 128  # int32 words per combine row in combine_aux (LogFMT)
        records = capacity.num_max_tokens * capacity.topk
        aux_half = max(records * self.meta_stride * 4, num_ranks * (records + records % 2) * 8)
        self.aux_half = -(-aux_half // 16) * 16  # each half 16-byte aligned (the kernels' vector accesses)
        self.combine_aux = layout.add("combine_aux", 2 * self.aux_half)
        self.publish = layout.add("publish", 2 * ((records + 3) // 4 * 4) * 4)  # halves 16-byte aligned
        self.nbytes = layout.size


def heap_bytes(num_ranks: int, num_max_tokens: int, hidden: int, num_experts: int) -> int:
    """Bytes of symmetric memory this backend uses per rank for these sizes (top-k up to min(32, E))."""
    return Regions(num_ranks, Capacity(num_max_tokens, hidden, min(TOPK_LIMIT, num_experts))).nbytes


class TritonLowLatencyBackend(Backend):
    name = "triton"

    def __init__(self, buffer, meeting: Optional[HostMeeting] = None):
        self.group = buffer.group
        self.meeting = meeting if meeting is not None else HostMeeting(self.group)
        self.rank = buffer.rank
        self.num_ranks = buffer.group_size
        self.device = buffer.device
        self.tuning = Tuning.from_env()
        self.heap: Optional[SymmetricHeap] = None
        self.regions: Optional[Regions] = None
        self.epoch = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.arrivals = torch.zeros(1, dtype=torch.int32, device=self.device)  # a launch's programs at its end
        self.error = ErrorWord(self.device)
        self.budget = wait_budget()  # of every wait on a peer, FLASHEP_TIMEOUT_S at construction
        self.use_timer = use_timer()
        self._combine_buffer: Optional[torch.Tensor] = None
        self._no_i32 = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._no_i64 = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._no_i8 = torch.zeros(1, dtype=torch.int8, device=self.device)
        # FLASHEP_LL_STAMPS=1 (GPU): every launch records per program %globaltimer and %clock64 at a few points
        # (kernels._stamp); `stamps` keeps per kernel the last launch's (stamps [programs, 2 * STAMP_POINTS],
        # send programs), senders first
        self.stamps_on = bool(_env.integer("FLASHEP_LL_STAMPS", 0, minimum=0)) and self.use_timer
        self.stamps: dict[str, tuple[torch.Tensor, int]] = {}

    # ---- heap --------------------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Symmetric memory this backend holds on each rank (0 before the first call maps it)."""
        return self.heap.nbytes if self.heap is not None else 0

    def _ensure_heap(self, num_max_tokens: int, hidden: int, num_experts: int, topk: int) -> Regions:
        need = Capacity(num_max_tokens, hidden, max(topk, min(TOPK_LIMIT, num_experts)))
        if self.regions is not None and self.regions.capacity.covers(need):
            return self.regions
        _refuse_in_capture("allocate the low-latency symmetric heap")
        capacity = need if self.regions is None else self.regions.capacity.union(need)
        if self.heap is not None:  # no peer may still write into the old heap
            self._synchronize()
            self.meeting("low-latency buffer growth")
            self.heap.close()
        regions = Regions(self.num_ranks, capacity)
        self.heap = SymmetricHeap(self.group, regions.nbytes, self.device, self.meeting,  # zeroed, then a barrier
                                  "low-latency buffer allocation (the first low-latency call)")
        if any(int(b) % 128 for b in self.heap.peer_bases.tolist()):
            raise RuntimeError("the symmetric heap is not 128-byte aligned")
        self.regions = regions
        self.epoch.zero_()  # fresh flags (all zero) on every rank: epochs restart together
        return regions

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _after_launch(self) -> None:
        # the interpreter runs kernels synchronously: a timeout is known right away
        if self.device.type == "cpu":
            self.error.check()

    def _common(self, regions: Regions) -> dict:
        return dict(heap_bases=self.heap.peer_bases, epoch_ptr=self.epoch, arrivals_ptr=self.arrivals,
                    error_address=self.error.address,
                    rank=self.rank, budget=self.budget, R=self.num_ranks, R_PAD=_pow2(self.num_ranks),
                    T_CAP=regions.capacity.num_max_tokens, G_STRIDE=regions.groups,
                    ROW_BYTES=regions.row_bytes, USE_TIMER=self.use_timer, EXACT_CASTS=_env.interpret_mode(),
                    num_warps=self.tuning.num_warps)

    # ---- dispatch ----------------------------------------------------------------------------------------------
    def low_latency_dispatch(self, x, topk_idx, num_max_tokens, num_experts, use_fp8, round_scale, use_ue8m0,
                             cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, with_hook):
        self.error.check()
        num_tokens, hidden = x.shape
        topk = topk_idx.size(1)
        regions = self._ensure_heap(num_max_tokens, hidden, num_experts, topk)
        num_ranks, num_local = self.num_ranks, num_experts // self.num_ranks
        rows = num_ranks * num_max_tokens
        dev = self.device
        recv_x = torch.empty((num_local, rows, hidden), dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16,
                             device=dev)
        num_scales = hidden // 512 if use_ue8m0 else hidden // 128
        scales = None
        if use_fp8:  # column-major in the last two dims: allocated [L, S, rows], returned transposed
            scales = torch.empty((num_local, num_scales, rows), dtype=torch.int32 if use_ue8m0 else torch.float32,
                                 device=dev)
        recv_count = torch.empty(num_local, dtype=torch.int32, device=dev)
        src_info = torch.empty((num_local, rows), dtype=torch.int32, device=dev)
        layout_range = torch.empty((num_local, num_ranks), dtype=torch.int64, device=dev)
        topk_slot = torch.empty((num_local, rows), dtype=torch.int8, device=dev)
        row_msg = torch.empty((num_local, rows), dtype=torch.int32, device=dev)  # receive-phase scratch
        row_map = torch.empty(num_ranks + rows * topk, dtype=torch.int32, device=dev)
        setattr(src_info, SLOT_ATTR, topk_slot)
        setattr(src_info, ROW_MAP_ATTR, row_map)

        groups, tokens_per_group = self._dispatch_groups(num_max_tokens, regions)
        parts = max(1, min(8, -(-self.tuning.recv_programs // num_local)))  # receive programs per local expert
        args = dict(
            x_ptr=x, topk_ptr=topk_idx, num_tokens=num_tokens,
            recv_x=recv_x.view(torch.uint8) if use_fp8 else recv_x,
            recv_scales=scales.view(torch.int32) if use_fp8 else self._no_i32,
            recv_count=recv_count, src_info=src_info, topk_slot=topk_slot, layout_range=layout_range, row_msg=row_msg,
            row_map=row_map,
            expert_stats=_or(cumulative_local_expert_recv_stats, self._no_i32),
            wait_stats=_or(dispatch_wait_recv_cost_stats, self._no_i64),
            num_local=num_local, rows_per_expert=rows, tokens_per_group=tokens_per_group, num_groups=groups,
            num_parts=parts, off_data=regions.data, off_meta=regions.meta_records, off_flags=regions.dispatch_flags,
            H=hidden, K=topk, K_PAD=_pow2(topk), META=regions.meta, G_PAD=_pow2(groups), NUM_SCALES=num_scales,
            SCALES_PAD=_pow2(num_scales), USE_FP8=use_fp8, ROUND_SCALE=round_scale, UE8M0=use_ue8m0,
            HAS_EXPERT_STATS=cumulative_local_expert_recv_stats is not None,
            HAS_WAIT_STATS=dispatch_wait_recv_cost_stats is not None,
            TILE_T=min(self.tuning.tile_tokens, _pow2(tokens_per_group)), TILE_R=self.tuning.tile_rows,
            BLOCK_H=self.tuning.block_h, SCAN=self.tuning.scan_rows, PHASE_CODE=PHASE_LL_DISPATCH,
            **self._common(regions))
        receive = self._launch(kernels.ep_ll_dispatch_kernel, args, num_ranks * groups, num_local * parts, with_hook)
        return LowLatencyDispatchResult(recv_x=recv_x, recv_x_scales=scales.transpose(1, 2) if use_fp8 else None,
                                        recv_count=recv_count, src_info=src_info, layout_range=layout_range,
                                        receive=receive)

    def _dispatch_groups(self, num_max_tokens: int, regions: Regions) -> tuple[int, int]:
        """Token groups per destination (the same on every rank: it depends on T_max and R only)."""
        groups = max(1, min(regions.groups, num_max_tokens, -(-self.tuning.send_programs // self.num_ranks)))
        tokens_per_group = -(-num_max_tokens // groups)
        return -(-num_max_tokens // tokens_per_group), tokens_per_group

    # ---- combine -----------------------------------------------------------------------------------------------
    def low_latency_combine(self, x, topk_idx, topk_weights, handle, zero_copy, out, combine_wait_recv_cost_stats,
                            with_hook, use_logfmt=False):
        self.error.check()
        src_info, layout_range, num_max_tokens, hidden, num_experts = handle
        num_ranks, num_local = self.num_ranks, num_experts // self.num_ranks
        rows = num_ranks * num_max_tokens
        _check_handle(src_info, layout_range, num_local, num_ranks, rows, self.device)
        num_tokens, topk = topk_idx.shape
        regions = self._ensure_heap(num_max_tokens, hidden, num_experts, topk)
        source = self._zero_copy_source(num_max_tokens, hidden, num_experts) if zero_copy else x
        topk_slot = getattr(src_info, SLOT_ATTR, None)
        if topk_slot is not None and tuple(topk_slot.shape) != tuple(src_info.shape):
            topk_slot = None
        row_map = getattr(src_info, ROW_MAP_ATTR, None)
        prereduce = bool(self.tuning.prereduce and not with_hook and not use_logfmt and row_map is not None
                         and row_map.numel() == num_ranks + rows * topk and 2 * num_ranks <= regions.capacity.topk)
        groups = max(1, min(regions.groups, -(-self.tuning.send_programs // num_ranks)))
        # receive grid: token tiles x hidden parts; the parts are a constexpr (the chunk loop is unrolled), so
        # they follow T_max, not the token count, to compile one variant per shape
        token_tiles = max(1, -(-num_tokens // self.tuning.tile_tokens))
        max_tiles = -(-num_max_tokens // self.tuning.tile_tokens)
        hidden_parts = max(1, min(-(-hidden // self.tuning.block_h),
                                  -(-self.tuning.combine_recv_programs // max_tiles)))
        args = dict(
            x_ptr=source, x_expert_stride=source.stride(0), x_row_stride=source.stride(1), topk_ptr=topk_idx,
            weights_ptr=topk_weights, num_tokens=num_tokens, out_ptr=out.view(torch.int16), src_info=src_info,
            topk_slot=_or(topk_slot, self._no_i8), layout_range=layout_range,
            row_map=row_map if prereduce else self._no_i32,
            wait_stats=_or(combine_wait_recv_cost_stats, self._no_i64), num_local=num_local, rows_per_expert=rows,
            num_groups=groups, off_combine=regions.combine, off_aux=regions.combine_aux, aux_half=regions.aux_half,
            off_flags=regions.combine_flags,
            off_publish=regions.publish, off_publish_flags=regions.publish_flags,
            off_weights_flags=regions.weights_flags,
            H=hidden, K=topk, K_PAD=_pow2(topk), K_CAP=regions.capacity.topk, G_PAD=_pow2(groups),
            L_PAD=_pow2(num_local),
            HAS_SLOTS=topk_slot is not None, PREREDUCE=prereduce, LOGFMT=bool(use_logfmt),
            META_STRIDE=regions.meta_stride,
            HAS_WAIT_STATS=combine_wait_recv_cost_stats is not None,
            TILE_T=self.tuning.tile_tokens,
            TILE_R=self.tuning.prereduce_tokens if prereduce else self.tuning.combine_tile_rows,  # the send's tile
            BLOCK_H=self.tuning.block_h,
            HIDDEN_PARTS=hidden_parts, PHASE_CODE=PHASE_LL_COMBINE, **self._common(regions))
        return self._launch(kernels.ep_ll_combine_kernel, args, num_ranks * groups, token_tiles * hidden_parts,
                            with_hook)

    def get_next_low_latency_combine_buffer(self, num_max_tokens: int, hidden: int, num_experts: int) -> torch.Tensor:
        """A local bf16 [L, R * T_max, H] view with row stride H + H / 64 (DeepEP's strides). It is read only
        by this rank's own combine send (stream-ordered), so one buffer serves every call."""
        num_local, rows, row = num_experts // self.num_ranks, self.num_ranks * num_max_tokens, hidden + hidden // 64
        numel = num_local * rows * row
        if self._combine_buffer is None or self._combine_buffer.numel() < numel:
            _refuse_in_capture("allocate the zero-copy combine buffer")
            self._combine_buffer = torch.empty(numel, dtype=torch.bfloat16, device=self.device)
        return self._combine_buffer.as_strided((num_local, rows, hidden), (rows * row, row, 1))

    def _zero_copy_source(self, num_max_tokens: int, hidden: int, num_experts: int) -> torch.Tensor:
        num_local, rows, row = num_experts // self.num_ranks, self.num_ranks * num_max_tokens, hidden + hidden // 64
        if self._combine_buffer is None or self._combine_buffer.numel() < num_local * rows * row:
            raise ValueError("zero_copy=True: write the expert outputs into "
                             "get_next_low_latency_combine_buffer(handle) first (none exists for these sizes)")
        return self._combine_buffer.as_strided((num_local, rows, hidden), (rows * row, row, 1))

    # ---- launches, hooks, cleaning, teardown ---------------------------------------------------------------------
    def _launch(self, kernel, args: dict, senders: int, receivers: int, with_hook: bool) -> Callable[[], None]:
        """Without a hook: one launch of both phases (senders first), and a no-op receive. With a hook (or
        FLASHEP_LL_FUSED=0): the send phase now, the receive phase when the returned function runs. The epoch
        moves on at the end of the (first) launch, by its last program."""
        fused = self.tuning.fused and not with_hook
        stamps = self._no_i64
        if self.stamps_on:
            stamps = torch.zeros((senders + receivers, 2 * kernels.STAMP_POINTS.value), dtype=torch.int64,
                                 device=self.device)
            self.stamps[kernel.fn.__name__] = (stamps, senders)
        args = dict(args, stamps_ptr=stamps, STAMPS=self.stamps_on)
        if fused:
            launch(kernel, (senders + receivers,), PHASE=kernels.BOTH.value, num_senders=senders, **args)
        else:
            launch(kernel, (senders,), PHASE=kernels.SEND.value, num_senders=senders, **args)
        self._after_launch()
        if fused:
            return lambda: None
        return self._receive_on_this_stream(
            lambda: launch(kernel, (receivers,), PHASE=kernels.RECEIVE.value, num_senders=senders, **args))

    def _receive_on_this_stream(self, receive_phase: Callable[[], None]) -> Callable[[], None]:
        """The receive phase runs on the stream of the send phase, whenever the hook is called."""
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

        def receive() -> None:
            if stream is None:
                receive_phase()
                self._after_launch()
            else:
                with torch.cuda.stream(stream):
                    receive_phase()

        return receive

    def clean_low_latency_buffer(self, num_max_tokens: int, hidden: int, num_experts: int) -> None:
        """Collective: flags back to zero and epochs restarted on every rank (e.g. after a timeout)."""
        regions = self._ensure_heap(num_max_tokens, hidden, num_experts, 0)
        self._synchronize()
        self.meeting("clean_low_latency_buffer")
        self.heap.local[:regions.flags_end].zero_()
        self.epoch.zero_()
        self.arrivals.zero_()
        self.error.reset()
        self._synchronize()
        self.meeting("clean_low_latency_buffer")

    def destroy(self) -> None:
        self._synchronize()
        if self.heap is not None:
            self.heap.close()
        self.heap = self.regions = self._combine_buffer = None


def _check_handle(src_info, layout_range, num_local: int, num_ranks: int, rows: int, device) -> None:
    if not isinstance(src_info, torch.Tensor) or src_info.dtype != torch.int32 or tuple(src_info.shape) != (
            num_local, rows) or not src_info.is_contiguous() or src_info.device != device:
        raise ValueError(f"handle[0] (src_info) must be a contiguous int32 tensor of shape {(num_local, rows)} on "
                         f"{device}, as low_latency_dispatch returned it")
    if not isinstance(layout_range, torch.Tensor) or layout_range.dtype != torch.int64 or tuple(
            layout_range.shape) != (num_local, num_ranks) or not layout_range.is_contiguous():
        raise ValueError(f"handle[1] (layout_range) must be a contiguous int64 tensor of shape "
                         f"{(num_local, num_ranks)}, as low_latency_dispatch returned it")


def _refuse_in_capture(what: str) -> None:
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"flashep cannot {what} inside CUDA graph capture: make one low-latency call with these "
                           f"sizes (and get_next_low_latency_combine_buffer for zero_copy) before capturing")


def _or(tensor: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    return fallback if tensor is None else tensor


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
