"""Normal mode inside one NVLink domain: the host side of the Triton kernels in `kernels/normal.py`.

Symmetric heaps per backend:
- the signal heap (flags and notify slots, tens of KiB), mapped with the Buffer (a collective call
  anyway): fixed layout for the Buffer's lifetime, so a flag is always a flag and epochs stay valid
  across data-heap growth; and a peer that skips any call, even the first, ends in a bounded kernel wait;
- the data heap, mapped at the first call that moves data (every rank reaches it collectively): two
  halves (the kernels of epoch e use half e % 2) of row records. Its size is max(num_nvl_bytes, need).
  A non-cached dispatch without `num_worst_tokens` learns every rank's token count in notify, so all
  ranks grow it together, to the worst case of those counts (T_max * R rows: every token to every rank,
  in bf16, and back through the combine) with a quarter of headroom: worst-token dispatches with
  num_worst_tokens <= T_max * R, cached dispatches and combines then fit. Calls without a host sync
  (worst-token and cached dispatch, combine) cannot grow it and raise instead, naming the bytes needed;
- the copy heap (FLASHEP_COPY_ENGINE only), where a combine's rows from the peers land by copy engine:
  two halves, used by copy-engine combines in turn (sequence numbers, counted alike on every rank, pick
  the half and are the flags' values), each sized in the dispatch's host sync for the most rows any rank
  gets back, and their weights, with a quarter of headroom. It is apart from the data heap because the
  host does not know the epoch (CUDA-graph replays advance it), and a copy's address is fixed on the host.
  Why the halves are safe: a rank's copy-engine combine s waits for every peer's flags of s, which the peers
  raise only after their stream passed their own earlier calls, so when it reaches combine s + 2 and
  writes half s % 2 again, every peer has finished reducing combine s.

Kernel roles: each dispatch and combine launches `num_sms` programs; the first `num_sms - receivers` push
rows over NVLink and never wait, the others wait for the peers' pushers and copy (dispatch) or reduce
(combine). A rank in the direct-write state of a dispatch (FLASHEP_DIRECT_DISPATCH) has pushers only. The
split and the publish interval must be the same on every rank (a dispatch that may write directly: every
rank's split may differ, and each publishes its choice).

Tuning knobs (environment at construction; they must be equal on every rank):
- FLASHEP_TILE_TOKENS: rows per tile of the pushers and the dispatch's receivers (power of two, default 16);
- FLASHEP_TILE_HIDDEN: 2-byte elements per row chunk of a tile (power of two, default 1024);
- FLASHEP_NUM_WARPS: warps per program (default 8);
- FLASHEP_STAGES: software-pipelining depth of the pushers' and the dispatch receivers' loops over a row's
  chunks (1: none; 2-3 keep the next chunks' loads in flight through cp.async; default 3 on GPUs);
- FLASHEP_COMBINE_REDUCE_STAGES: pipelining depth of the loop over a tile's chunks in the combine's
  reduction (default 3 on GPUs). It loads one tile per rank and bias per chunk, so its chunks narrow until
  the stages fit FLASHEP_REDUCE_SMEM bytes of shared memory (default 196608; the compiled kernel stays
  within an SM's 227 KiB at 2 to 8 ranks). send_head is read once per tile, before that loop, so the
  pipeliner stages row data only (session 12's wrong sums came from a pipelined send_head load, read again
  for every chunk); FLASHEP_REDUCE_TILE_TOKENS: tokens per tile of that reduction (power of two, default 32;
  `scripts/probe_reduce.py`, 1x H200: 16 -> 32 tokens 283 -> 262 us for 4 ranks' rows on 13 programs);
- FLASHEP_RECEIVER_SHARE: share of a dispatch's programs that receive (default 1/3; rounded, at least 1,
  at most num_sms - 1); FLASHEP_COMBINE_RECEIVER_SHARE: the same for a combine (default 0.45: 11 of 24
  programs; on 2x H200, session 19, combine e2e 249 us at 0.45 against 332-348 at 1/3, the share that a
  one-GPU model had chosen; not yet measured at 4 GPUs);
  FLASHEP_RECEIVERS / FLASHEP_COMBINE_RECEIVERS: an exact count instead of a share;
- FLASHEP_PUBLISH_TOKENS: tokens (combine: rows) a pusher moves between two progress flags, rounded to
  whole channels (default 32); the first and each of the last channels get a flag too.
  Fewer flags keep the NVLink stores streaming (a flag's release waits for the stores before it); more
  let receivers follow closer;
- FLASHEP_COPY_ENGINE: 1 moves a combine's rows by copy engine (no SM; `_combine_by_copy_engine`), 0 by SM
  pushers (default 0). Only combines whose handle came from a dispatch with a
  host synchronisation can (the copies' sizes come from the host), and none while a CUDA graph is being
  captured; the others use the pushers. FLASHEP_COPY_PARTS: parts of such a combine, each followed by
  a flag the reduction waits for (default 4, at most 16 and the number of channels).
- FLASHEP_DISPATCH_AHEAD: 1 (default) launches a non-cached dispatch before its host sync, with outputs of
  a guessed size, and launches it again in the rare call where some rank's rows overflowed (`_row_guesses`,
  docs/design.md); 0 reads the counts first;
- FLASHEP_DIRECT_DISPATCH: 1 lets dispatches without num_worst_tokens (non-cached and cached) write
  directly: a rank whose symmetric output pool (`transport.pool`) has room carves its outputs there, and
  every program of every rank stores straight into them; a rank without room takes records, which its
  receivers copy, as with 0 (default 0 until verified on GPUs; docs/design.md). Each rank chooses alone;
  the kernel learns every peer's choice at its start. The pools are mapped or replaced only where all
  ranks decide alike, after a non-cached dispatch's host sync: when the pool is smaller than twice the
  largest outputs of any rank, every rank maps a new one of OUTPUT_POOL_BLOCKS times that size (the old
  one stays mapped while its outputs live).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import triton

from .. import _env
from ..kernels import normal as kernels
from ..kernels.sync import ErrorWord, use_timer, wait_budget
from ..launch import launch, launch_replayable
from ..transport.copy_engine import PeerCopier
from ..transport.heap import HostMeeting, Layout, SymmetricHeap
from ..transport.pool import UNIT as OUTPUT_UNIT, OutputPool
from .base import Backend, DispatchResult, Routing

_LAYOUT_BLOCK_T = 128
_NOTIFY_BLOCK_T = 256
_ROW_HISTORY = 8  # non-cached dispatches whose received rows size the next guesses
OUTPUT_POOL_BLOCKS = 3  # a new output pool holds this many of the largest outputs that made it grow


class TritonNormalBackend(Backend):
    name = "triton"

    def __init__(self, buffer, meeting: Optional[HostMeeting] = None):
        self.group = buffer.group
        self.rank = buffer.rank
        self.num_ranks = buffer.group_size
        self.device = buffer.device
        self.meeting = meeting if meeting is not None else HostMeeting(self.group)
        self.num_nvl_bytes = buffer.num_nvl_bytes
        self.tile_tokens = _env.power_of_two("FLASHEP_TILE_TOKENS", 16)
        self.tile_hidden = _env.power_of_two("FLASHEP_TILE_HIDDEN", 1024)
        self.num_warps = _env.power_of_two("FLASHEP_NUM_WARPS", 8)
        self.stages = _env.integer("FLASHEP_STAGES", 3 if self.device.type == "cuda" else 1, minimum=1)
        self.reduce_stages = _env.integer("FLASHEP_COMBINE_REDUCE_STAGES", 3 if self.device.type == "cuda" else 1,
                                          minimum=1)
        self.reduce_tile_tokens = _env.power_of_two("FLASHEP_REDUCE_TILE_TOKENS", 32)
        self.reduce_smem = _env.integer("FLASHEP_REDUCE_SMEM", 192 * 1024, minimum=1)
        self.receivers = _env.integer("FLASHEP_RECEIVERS", None, minimum=1)
        self.combine_receivers = _env.integer("FLASHEP_COMBINE_RECEIVERS", self.receivers, minimum=1)
        self.receiver_share = _env.share("FLASHEP_RECEIVER_SHARE", 1 / 3)
        self.combine_receiver_share = _env.share("FLASHEP_COMBINE_RECEIVER_SHARE", 0.45)
        self.publish_tokens = _env.integer("FLASHEP_PUBLISH_TOKENS", 32, minimum=1)
        # off by default: on H200 (docs/perf.md) a combine by copy engine was no faster than the SM pushers at
        # 2 ranks once the reduction was tuned, slower at 4 (host work per copy and flag), and noisier
        self.use_copy_engine = _env.integer("FLASHEP_COPY_ENGINE", 0, minimum=0) != 0
        self.direct = _env.integer("FLASHEP_DIRECT_DISPATCH", 0, minimum=0) != 0
        self.output_pool: Optional[OutputPool] = None  # where direct-write dispatches carve their outputs
        self.direct_dispatches = 0  # dispatches whose outputs this rank took by direct writes (tests, benchmark)
        # 1: a non-cached dispatch launches before its host sync, with outputs of a guessed size (_row_guesses)
        self.dispatch_ahead = _env.integer("FLASHEP_DISPATCH_AHEAD", 1, minimum=0) != 0
        self._recent_rows = deque(maxlen=_ROW_HISTORY)  # rows each rank received, last non-cached dispatches
        self._summary_copy = _SummaryCopy()
        self.ahead_launches = [0, 0]  # dispatches launched ahead of the sync: [kept, launched again] (tests)
        self.copy_parts = min(_env.integer("FLASHEP_COPY_PARTS", 4, minimum=1), kernels.MAX_COPY_PARTS)
        self.signal_layout = _SignalLayout(self.num_ranks)
        self.signal_heap = SymmetricHeap(self.group, self.signal_layout.nbytes, self.device, self.meeting,
                                         "normal-mode signal buffer allocation")
        self.data_heap: Optional[SymmetricHeap] = None
        self.copy_heap: Optional[SymmetricHeap] = None  # where copy-engine combines land (halves by sequence)
        self.copy_heap_mappings = 0  # copy heaps mapped so far: copy plans hold views of one of them
        self.copier = PeerCopier(self.signal_heap, self.signal_layout.copy_flags, self.num_ranks * kernels.MAX_COPY_PARTS,
                                 self.rank, self.num_ranks, self.device)
        self.copy_sequence = 0  # copy-engine operations so far (identical on every rank)
        # operations so far; a dispatch or combine kernel's last program advances it (kernels.sync.end_operation)
        self.epoch = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.arrivals = torch.zeros(1, dtype=torch.int32, device=self.device)  # that kernel's programs at the end
        self.errors = ErrorWord(self.device)
        self.budget = wait_budget()  # of every wait on a peer, FLASHEP_TIMEOUT_S at construction
        self.use_timer = use_timer()
        self._unmapped_buffer: Optional[torch.Tensor] = None
        self._dummy = {dtype: torch.empty(1, dtype=dtype, device=self.device)
                       for dtype in (torch.int32, torch.int64, torch.float32, torch.bfloat16)}
        # launches of cached dispatches and combines, replayed with a call's inputs, outputs and handle swapped in,
        # keyed by everything else they pass; emptied when the data heap is mapped again
        self._replays: dict = {}

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
        """Symmetric memory this backend holds on each rank (of output pools, the current one)."""
        pool = self.output_pool.heap if self.output_pool is not None else None
        return sum(h.nbytes for h in (self.signal_heap, self.data_heap, self.copy_heap, pool) if h is not None)

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
            self._replays.clear()
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
            launch(kernels.ep_layout_kernel, grid, topk_idx, per_rank, per_expert, in_rank.view(torch.uint8),
                   num_tokens, num_topk, num_experts // self.num_ranks, NUM_RANKS=self.num_ranks,
                   R_PAD=self._rank_pad, K_PAD=_pow2(num_topk), BLOCK_T=_LAYOUT_BLOCK_T, num_warps=4)
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
        bf16_record = _record_bytes(2 * hidden, 0, num_topk)
        combine_record = _combine_record_bytes(hidden, num_topk)
        if num_worst_tokens > 0:  # checked before any kernel runs, so that an error leaves no peer waiting
            home_bound = x.size(0) * num_ranks  # rows this rank's combine can receive at most
            self._reserve(max(num_worst_tokens * max(record, bf16_record), home_bound * combine_record),
                          agreed=False, what="dispatch with num_worst_tokens")
        rank_prefix, send_prefix, recv_prefix, summary = self._notify(is_token_in_rank, num_tokens_per_expert,
                                                                      num_channels)
        send_head = torch.empty(x.size(0), num_ranks, dtype=torch.int32, device=self.device)  # before the sync
        inputs = _DispatchInputs(x, x_scales, topk_idx, topk_weights, is_token_in_rank.view(torch.uint8), send_head,
                                 rank_prefix, recv_prefix, send_prefix, num_local, num_channels, record,
                                 write_send_head=True)
        if num_worst_tokens > 0:
            out = self._dispatch_into_new(inputs, num_worst_tokens, worst=True)
            counts, per_expert_list = None, []
        else:
            guesses = self._row_guesses()
            if guesses is not None:  # the kernel runs while the host waits for the counts and checks them
                summary_copy = self._summary_copy.start(summary)
                capacity = self._half() // record
                out = self._dispatch_into_new(inputs, guesses[self.rank])
                host = summary_copy.wait()  # the one host synchronisation of normal mode (notify only)
            else:
                out, host = None, summary.tolist()  # the one host synchronisation of normal mode
            self.errors.check()
            counts = _HostCounts.from_summary(host, self.rank, num_ranks, num_local, num_channels)
            received = [counts.received_by(r) for r in range(num_ranks)]
            num_rows = received[self.rank]
            if out is not None:  # rows past a rank's guess or past a heap half were dropped by the kernel
                held = all(rows <= min(guess, capacity) for rows, guess in zip(received, guesses))
                self.ahead_launches[0 if held else 1] += 1
                if not held:
                    out = None  # some rank's rows overflowed its guess: every rank sees it, all dispatch again
            self._recent_rows.append(received)
            worst_rows = max(counts.tokens) * num_ranks  # DeepEP's num_worst_tokens = T * R
            self._reserve(worst_rows * max(record, bf16_record, combine_record), agreed=True, what="dispatch")
            if self.use_copy_engine:
                rows = counts.most_peer_rows_home()
                self._reserve_copy(_copy_weights_at(rows, hidden) + rows * num_topk * 4)
            per_expert_list = [-(-int(c) // expert_alignment) * expert_alignment
                               for c in host[num_ranks * num_ranks:num_ranks * num_ranks + num_local]]
            if out is not None:
                out.narrow(num_rows)
            else:
                block = None  # this rank's outputs in its output pool: (offset, tensor)
                if self.direct:
                    self._size_output_pool([_output_block_bytes(rows, x, x_scales, topk_idx) for rows in received])
                    block = self._carve(_output_block_bytes(num_rows, x, x_scales, topk_idx))
                out = self._dispatch_into_new(inputs, num_rows, block=block)
        rank_prefix._flashep_full = True  # read back by handles.from_tuple
        rank_prefix._flashep_counts = counts  # the routing's counts on the host, when known (a combine uses them)
        routing = Routing(rank_prefix, send_prefix, recv_prefix, out.src_idx, is_token_in_rank, send_head,
                          full_matrix=True)
        return DispatchResult(out.x, out.scales, out.topk_idx, out.topk_weights, per_expert_list, routing)

    def _size_output_pool(self, needs: list) -> None:
        """Map a larger output pool on every rank when the pool is smaller than twice the largest of `needs`
        (every rank's output bytes, learned in notify: all ranks decide alike). The old pool stays mapped
        while outputs carved from it live."""
        pool_bytes = self.output_pool.nbytes if self.output_pool is not None else 0
        biggest = max(needs)
        if 2 * biggest <= pool_bytes:
            return
        if self.output_pool is not None:
            self.output_pool.retire()
            self.output_pool = None
        self.output_pool = OutputPool(self.group, OUTPUT_POOL_BLOCKS * biggest, self.device, self.meeting)

    def _carve(self, nbytes: int):
        """This rank's choice for a dispatch that may write directly: -> (offset, block) of its outputs in the
        output pool when the pool has room, else None (records)."""
        pool = self.output_pool
        if pool is None or pool.largest_free() < _round_up(max(nbytes, 1), OUTPUT_UNIT):  # as carve rounds it
            return None
        return pool.carve(nbytes)

    def _row_guesses(self) -> Optional[list]:
        """Output rows for each rank with which a non-cached dispatch launches before its host sync: the most
        each rank received in the last few such dispatches, plus a sixteenth and 64 rows, rounded up to 16.
        Every rank holds the same history (counts from the same summaries), hence the same guesses. None: sync
        first (no history yet, FLASHEP_DISPATCH_AHEAD=0, direct writes or copy-engine combines, which size
        buffers from the counts, or inside CUDA-graph capture, where a non-cached dispatch refuses anyway)."""
        if (not self._recent_rows or not self.dispatch_ahead or self.direct or self.use_copy_engine
                or (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing())):
            return None
        most = [max(rows) for rows in zip(*self._recent_rows)]
        # multiples of 16: the launch of every guess is of one specialisation class, so it replays
        return [_round_up(m + m // 16 + 64, 16) for m in most]

    def _dispatch_into_new(self, inputs: "_DispatchInputs", num_rows: int, worst: bool = False,
                           block=None) -> "_DispatchOutputs":
        """Launch a dispatch (by replay where one is kept) into new outputs of `num_rows` rows (`block`: see
        _launch_dispatch)."""
        out = _DispatchOutputs(inputs.x, inputs.x_scales, inputs.topk_idx, num_rows, self.device, block)
        swaps = self._dispatch_swaps(inputs.x, inputs.x_scales, inputs.topk_idx, inputs.topk_weights, out,
                                     inputs.in_rank, inputs.send_head, inputs.rank_prefix, inputs.recv_prefix,
                                     inputs.send_prefix, num_rows)
        replay_key = self._dispatch_key(inputs.x, inputs.x_scales, inputs.topk_idx, inputs.num_local,
                                        inputs.num_channels, inputs.write_send_head, worst)
        if not self._replayed(replay_key, swaps):
            self._launch_dispatch(swaps, inputs.x, inputs.x_scales, inputs.topk_idx, inputs.num_local,
                                  inputs.num_channels, inputs.record_bytes, write_send_head=inputs.write_send_head,
                                  worst=worst, may_write_directly=self.direct and not worst, block=block,
                                  replay_key=replay_key)
        return out

    def _cached_dispatch(self, x, x_scales, routing: Routing, num_channels: int) -> DispatchResult:
        _check_routing(routing)
        num_rows = routing.num_recv_rows
        record = _dispatch_record_bytes(x, x_scales, 0)
        self._reserve(num_rows * record, agreed=False, what="cached dispatch")
        block = self._carve(_output_block_bytes(num_rows, x, x_scales, None)) if self.direct else None
        inputs = _DispatchInputs(x, x_scales, None, None, *_handle_swaps(routing), num_local=1,  # no top-k to rewrite
                                 num_channels=num_channels, record_bytes=record, write_send_head=False)
        out = self._dispatch_into_new(inputs, num_rows, block=block)
        return DispatchResult(out.x, out.scales, None, None, None, None)

    def _dispatch_swaps(self, x, x_scales, topk_idx, topk_weights, out: "_DispatchOutputs", in_rank, send_head,
                        rank_prefix, recv_prefix, send_prefix, num_rows: int) -> tuple:
        """The values of a dispatch launch that change from call to call, in _DISPATCH_SWAPS order (absent
        tensors as the backend's stand-ins)."""
        int32, int64, f32 = (self._dummy[d] for d in (torch.int32, torch.int64, torch.float32))
        return (x.view(torch.int32), x_scales.view(torch.int32) if x_scales is not None else int32,
                topk_idx if topk_idx is not None else int64, topk_weights if topk_weights is not None else f32,
                out.x.view(torch.int32), out.scales.view(torch.int32) if out.scales is not None else int32,
                out.topk_idx if out.topk_idx is not None else int64,
                out.topk_weights if out.topk_weights is not None else f32, out.src_idx,
                in_rank, send_head, rank_prefix, recv_prefix, send_prefix, num_rows)

    def _dispatch_key(self, x, x_scales, topk_idx, num_local: int, num_channels: int, write_send_head: bool,
                      worst: bool) -> Optional[tuple]:
        """What a dispatch launch depends on besides its _DISPATCH_SWAPS values (the backend's own state aside);
        None with direct writes (the launch depends on this call's carving): not replayed."""
        if self.direct:
            return None
        return ("dispatch", num_channels, x.dtype, x.shape,
                None if x_scales is None else (x_scales.dtype, x_scales.shape, x_scales.stride()),
                None if topk_idx is None else (topk_idx.dtype, topk_idx.shape), num_local, write_send_head, worst)

    def _replayed(self, key, swaps: tuple) -> bool:
        """Launch the replay kept under `key` with `swaps`; False where there is none or it refused."""
        replay = self._replays.get(key) if key is not None else None
        return replay is not None and replay(*swaps)

    def _remember(self, key, replay) -> None:
        if replay is None:
            return
        if len(self._replays) >= _MAX_REPLAYS:
            self._replays.clear()
        self._replays[key] = replay

    def _notify(self, is_token_in_rank, num_tokens_per_expert, num_channels):
        """-> rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, and `summary`: the rank
        prefix matrix, the received selections per local expert, every rank's token count and the receive
        channel prefix matrix (the first and the last are views of it)."""
        num_ranks, pairs = self.num_ranks, self.num_ranks * self.num_ranks
        num_local = num_tokens_per_expert.size(0) // num_ranks
        num_tokens = is_token_in_rank.size(0)
        summary = torch.empty(pairs + num_local + num_ranks + num_ranks * num_channels, dtype=torch.int32,
                              device=self.device)
        rank_prefix = summary[:pairs].view(num_ranks, num_ranks)
        send_prefix = torch.empty(num_ranks, num_channels, dtype=torch.int32, device=self.device)
        recv_prefix = summary[pairs + num_local + num_ranks:].view(num_ranks, num_channels)
        swaps = (is_token_in_rank.view(torch.uint8), num_tokens_per_expert, send_prefix, rank_prefix, recv_prefix,
                 summary[pairs:pairs + num_local], summary[pairs + num_local:pairs + num_local + num_ranks])
        replay_key = ("notify", num_tokens, num_channels, num_local)
        if not self._replayed(replay_key, swaps):
            layout = self.signal_layout
            self._remember(replay_key, launch_replayable(kernels.ep_notify_kernel, (1,), _NOTIFY_SWAPS,
                swaps[0], swaps[1], self.signal_heap.peer_bases, layout.notify_flags, layout.slots, self.epoch,
                self.errors.address, *swaps[2:],
                self.rank, num_tokens, num_channels, _tokens_per_channel(num_tokens, num_channels), num_local,
                self.budget,
                NUM_RANKS=num_ranks, R_PAD=self._rank_pad, L_BLOCK=min(1024, _pow2(num_local)),
                BLOCK_T=_NOTIFY_BLOCK_T, MAX_C=kernels.MAX_CHANNELS, MAX_L=kernels.MAX_LOCAL_EXPERTS,
                USE_TIMER=self.use_timer, num_warps=4))
        return rank_prefix, send_prefix, recv_prefix, summary

    def _launch_dispatch(self, swaps: tuple, x, x_scales, topk_idx, num_local, num_channels, record_bytes,
                         write_send_head: bool, worst: bool, may_write_directly: bool = False,
                         block=None, replay_key=None) -> None:
        """`swaps`: from _dispatch_swaps; `may_write_directly`: the kernel's DIRECT (the same on every rank);
        `block`: (offset, tensor) of this rank's outputs in its output pool (direct state), or None (records).
        `replay_key`: keep a replay of this launch under that key (None: none)."""
        (words, scales, topk, weights, recv_x, recv_scales, recv_topk, recv_weights, recv_src, in_rank, send_head,
         rank_prefix, recv_prefix, send_prefix, num_rows) = swaps
        num_tokens = x.size(0)
        row_words = words.size(1)
        num_scales = x_scales.size(1) if x_scales is not None else 0
        num_topk = topk_idx.size(1) if topk_idx is not None else 0
        num_programs = 2 * num_channels
        pushers = num_programs - _receivers(self.receivers, self.receiver_share, num_programs)
        # every rank's output pool (any symmetric heap when there is none: no peer is then in the direct state)
        out_bases = self.output_pool.peer_bases if self.output_pool is not None else self.signal_heap.peer_bases
        out_state = 0
        if block is not None:
            pushers = num_programs
            out_state = 1 + block[0] // OUTPUT_UNIT
            self.direct_dispatches += 1
        tokens_per_channel = _tokens_per_channel(num_tokens, num_channels)
        # a pusher moves about tokens_per_channel / pushers tokens of every channel
        publish_every = _publish_every(self.publish_tokens, tokens_per_channel / pushers, num_channels)
        replay = launch_replayable(kernels.ep_dispatch_kernel, (num_programs,), _DISPATCH_SWAPS if replay_key else (),
            words, scales, scales.stride(0) if x_scales is not None else 0,
            scales.stride(1) if x_scales is not None else 0, topk, weights, in_rank, rank_prefix, send_prefix,
            recv_prefix, recv_x, recv_scales, recv_topk, recv_weights, recv_src, send_head,
            self.data_heap.peer_bases, self._half(), self.signal_heap.peer_bases, self.signal_layout.dispatch_flags,
            self.epoch, self.arrivals, self.errors.address,
            self.rank, num_tokens, num_channels, tokens_per_channel, pushers, publish_every, num_local,
            num_scales, num_topk, self._half() // record_bytes, num_rows, out_bases,
            self.signal_layout.output_slots, out_state, self.budget,
            NUM_RANKS=self.num_ranks, R_PAD=self._rank_pad,
            P_PAD=_pow2(num_programs if may_write_directly else pushers), ROW_WORDS=row_words,
            RECORD_WORDS=record_bytes // 4, S_PAD=_pow2(num_scales), K_PAD=_pow2(num_topk),
            BLOCK_T=self.tile_tokens, BLOCK_W=min(max(self.tile_hidden // 2, 16), _pow2(row_words)),
            HAS_SCALES=x_scales is not None, HAS_TOPK=topk_idx is not None,
            TOPK_BYTES=topk_idx.element_size() if topk_idx is not None else 8, WRITE_SEND_HEAD=write_send_head,
            WORST=worst, DIRECT=may_write_directly, USE_TIMER=self.use_timer, STAGES=self.stages,
            num_warps=self.num_warps)
        if replay_key is not None:
            self._remember(replay_key, replay)

    # ---- combine ----------------------------------------------------------------------------------------
    def combine(self, x, routing, topk_weights, bias0, bias1):
        self.errors.check()
        _check_routing(routing)
        num_channels = routing.channel_prefix_matrix.size(1)
        _check_channels(num_channels)
        num_tokens, hidden = routing.num_tokens, x.size(1)
        num_topk = topk_weights.size(1) if topk_weights is not None else 0
        record_bytes = _combine_record_bytes(hidden, num_topk)
        counts = getattr(routing.rank_prefix_matrix, "_flashep_counts", None)
        if self._copy_engine_fits(counts, num_channels, hidden, num_topk):
            return self._combine_by_copy_engine(x, routing, counts, topk_weights, bias0, bias1)
        home_rows = counts.sent_by(self.rank) if counts is not None else num_tokens * self.num_ranks
        self._reserve(home_rows * record_bytes, agreed=False, what="combine")
        combined = torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device=self.device)
        combined_weights = (torch.empty(num_tokens, num_topk, dtype=torch.float32, device=self.device)
                            if topk_weights is not None else None)
        num_programs = 2 * num_channels
        pushers = num_programs - _receivers(self.combine_receivers, self.combine_receiver_share, num_programs)
        # a pusher moves about (rows from peers) / (channels * pushers) rows of every channel
        peer_rows = x.size(0) * (self.num_ranks - 1) / self.num_ranks
        publish_every = _publish_every(self.publish_tokens, peer_rows / (num_channels * pushers), num_channels)
        swaps = self._combine_swaps(x, topk_weights, bias0, bias1, combined, combined_weights, routing)
        replay_key = ("combine", num_channels, hidden, num_tokens, num_topk, bias0 is not None, bias1 is not None,
                      publish_every)
        if self._replayed(replay_key, swaps):
            return combined, combined_weights
        block_h = min(max(self.tile_hidden, 32), _pow2(hidden))
        reduce_block_h = self._reduce_block_h(hidden, bias0, bias1)
        replay = launch_replayable(kernels.ep_combine_kernel, (num_programs,), _COMBINE_SWAPS,
            *swaps,
            self.data_heap.peer_bases, self._half(), self.signal_heap.peer_bases, self.signal_layout.combine_flags,
            self.epoch, self.arrivals, self.errors.address,
            self.rank, num_tokens, num_channels, _tokens_per_channel(num_tokens, num_channels), pushers,
            publish_every, num_topk, self._half() // record_bytes, self.budget,
            NUM_RANKS=self.num_ranks, R_PAD=self._rank_pad, P_PAD=_pow2(pushers), HIDDEN=hidden,
            RECORD_ELEMS=record_bytes // 2, K_PAD=_pow2(num_topk), BLOCK_T=self.tile_tokens, BLOCK_H=block_h,
            REDUCE_BLOCK_T=self.reduce_tile_tokens, REDUCE_BLOCK_H=reduce_block_h,
            HAS_WEIGHTS=topk_weights is not None, HAS_BIAS0=bias0 is not None, HAS_BIAS1=bias1 is not None,
            USE_TIMER=self.use_timer, STAGES=self.stages, REDUCE_STAGES=self.reduce_stages, num_warps=self.num_warps)
        self._remember(replay_key, replay)
        return combined, combined_weights

    def _combine_swaps(self, x, topk_weights, bias0, bias1, combined, combined_weights, routing: Routing) -> tuple:
        """The values of a combine launch that change from call to call, in _COMBINE_SWAPS order, which is the
        kernel's (absent tensors as the backend's stand-ins)."""
        bf16, f32 = self._dummy[torch.bfloat16], self._dummy[torch.float32]
        return (x, topk_weights if topk_weights is not None else f32, bias0 if bias0 is not None else bf16,
                bias1 if bias1 is not None else bf16, *_handle_swaps(routing)[:4], combined,
                combined_weights if combined_weights is not None else f32)

    def _reduce_block_h(self, hidden: int, bias0, bias1) -> int:
        """Row chunk of the combine's reduction: it loads a tile per rank and per bias each chunk, and its
        pipeline stages share the FLASHEP_REDUCE_SMEM budget."""
        loads = self.num_ranks + (bias0 is not None) + (bias1 is not None)
        block_h = min(max(self.tile_hidden, 32), _pow2(hidden))
        while (self.reduce_stages > 1 and block_h > 64
               and self.reduce_stages * loads * self.reduce_tile_tokens * block_h * 2 > self.reduce_smem):
            block_h //= 2
        return block_h

    # ---- combine by copy engine -------------------------------------------------------------------------
    def _reserve_copy(self, half_bytes: int) -> None:
        """Make each half of the copy heap hold `half_bytes` (called where every rank computed the same)."""
        need = 2 * _round_up(max(half_bytes, 1), kernels.RECORD_ALIGN)
        if self.copy_heap is not None and self.copy_heap.nbytes >= need:
            return
        if self.copy_heap is not None:  # nobody may still read or write the old heap
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.meeting("normal-mode copy buffer growth")
            self.copy_heap.close()
            self.copy_heap = None
        self.copy_heap_mappings += 1
        self.copy_heap = SymmetricHeap(self.group, need + need // 4, self.device, self.meeting,
                                       "normal-mode copy buffer allocation")

    def _copy_half(self) -> int:
        return self.copy_heap.nbytes // 2 // kernels.RECORD_ALIGN * kernels.RECORD_ALIGN

    def _copy_engine_fits(self, counts: Optional["_HostCounts"], num_channels: int, hidden: int,
                          num_topk: int) -> bool:
        """Whether this combine moves its rows by copy engine. Every input is the same on every rank (host
        counts of the whole routing, the heap size, capture state), so all ranks decide alike."""
        if not self.use_copy_engine or counts is None or self.copy_heap is None:
            return False
        if counts.num_channels != num_channels:
            return False
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False  # the copies' sizes come from the host: a replay could not follow new routing
        rows = counts.most_peer_rows_home()
        return _copy_weights_at(rows, hidden) + rows * num_topk * 4 <= self._copy_half()

    def _combine_by_copy_engine(self, x, routing: Routing, counts: "_HostCounts", topk_weights, bias0, bias1):
        """Every rank copies the rows it received from each home back to that home's copy heap by copy
        engine, in parts of the home's channels with a flag behind each; every program of the reduction
        kernel then reduces its share of each part's tokens as the part lands."""
        num_tokens, hidden = routing.num_tokens, x.size(1)
        num_topk = topk_weights.size(1) if topk_weights is not None else 0
        num_ranks, rank = self.num_ranks, self.rank
        num_channels = counts.num_channels
        num_parts = min(self.copy_parts, num_channels)
        self.copy_sequence = self.copy_sequence % _SEQUENCE_CYCLE + 1
        seq, seq_next = self.copy_sequence, self.copy_sequence % _SEQUENCE_CYCLE + 1
        copy_rows = counts.most_peer_rows_home()  # the same layout on every rank: rows, then their weights
        half = (seq % 2) * self._copy_half()
        weights_at = half + _copy_weights_at(copy_rows, hidden)
        plan = self._copy_plan(counts, hidden, num_topk, num_parts, half, weights_at)
        sources = {"x": x, "weights": topk_weights}
        self.copier.begin()
        for home, parts in plan:
            self.copier.send(home, [([(to, sources[name][lo:hi]) for to, name, lo, hi in copies], flag)
                                    for copies, flag in parts], seq, keep=[t for t in sources.values() if t is not None])
        combined = torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device=self.device)
        combined_weights = (torch.empty(num_tokens, num_topk, dtype=torch.float32, device=self.device)
                            if topk_weights is not None else None)
        bf16, f32 = self._dummy[torch.bfloat16], self._dummy[torch.float32]
        heap = self.copy_heap
        launch(kernels.ep_combine_reduce_kernel, (2 * num_channels,),
            x, topk_weights if topk_weights is not None else f32, bias0 if bias0 is not None else bf16,
            bias1 if bias1 is not None else bf16, routing.send_head, routing.rank_prefix_matrix, combined,
            combined_weights if combined_weights is not None else f32,
            heap.view(half, (copy_rows, hidden), torch.bfloat16),
            heap.view(weights_at, (copy_rows, num_topk), torch.float32),
            self.signal_heap.view(self.signal_layout.copy_flags, (num_ranks * kernels.MAX_COPY_PARTS,), torch.int32),
            seq, seq_next, self.errors.address, rank, num_tokens, num_channels,
            _tokens_per_channel(num_tokens, num_channels), num_parts, num_topk, self.budget,
            NUM_RANKS=num_ranks, R_PAD=self._rank_pad, MAX_PARTS=kernels.MAX_COPY_PARTS, HIDDEN=hidden,
            K_PAD=_pow2(num_topk), BLOCK_T=self.reduce_tile_tokens,
            REDUCE_BLOCK_H=self._reduce_block_h(hidden, bias0, bias1),
            HAS_WEIGHTS=topk_weights is not None, HAS_BIAS0=bias0 is not None, HAS_BIAS1=bias1 is not None,
            USE_TIMER=self.use_timer, STAGES=self.reduce_stages, num_warps=self.num_warps)
        self.copier.join()
        return combined, combined_weights

    def _copy_plan(self, counts: "_HostCounts", hidden: int, num_topk: int, num_parts: int, half: int,
                   weights_at: int) -> list:
        """What a copy-engine combine copies, per home in ring order from the next rank: for each part of
        the home's channels, ([(destination view, source "x" or "weights", first row, end row)], flag index);
        the top-k weights go with the first part. Kept on the routing's counts: the views depend only on the
        routing, the shape and the heap half."""
        key = (self.copy_heap_mappings, hidden, num_topk, num_parts, half)  # a regrown heap: new views
        plan = counts.copy_plans.get(key)
        if plan is not None:
            return plan
        num_ranks, rank, heap = self.num_ranks, self.rank, self.copy_heap
        bounds = [counts.num_channels * k // num_parts for k in range(num_parts + 1)]
        x_block = counts.block_starts(rank)  # x rows from home h start at x_block[h]
        plan = []
        for step in range(1, num_ranks):
            home = (rank + step) % num_ranks
            slot = counts.peer_slot(home, rank)  # where this rank's rows start in home's copy heap
            first, n = x_block[home], counts.sends[home][rank]
            parts = []
            for part in range(num_parts):
                lo, hi = counts.recv_rows(home, bounds[part]), counts.recv_rows(home, bounds[part + 1])
                copies = []
                if hi > lo:
                    to = heap.peer_view(home, half + (slot + lo) * hidden * 2, (hi - lo, hidden), torch.bfloat16)
                    copies.append((to, "x", first + lo, first + hi))
                if part == 0 and n > 0 and num_topk > 0:
                    to = heap.peer_view(home, weights_at + slot * num_topk * 4, (n, num_topk), torch.float32)
                    copies.append((to, "weights", first, first + n))
                parts.append((copies, rank * kernels.MAX_COPY_PARTS + part))
            plan.append((home, parts))
        if len(counts.copy_plans) >= 4:  # both heap halves of at most two shapes
            counts.copy_plans.clear()
        counts.copy_plans[key] = plan
        return plan

    # ---- lifetime ---------------------------------------------------------------------------------------
    def destroy(self) -> None:
        self._replays.clear()  # they hold the heaps' pointer tables
        if self.output_pool is not None:  # unmapped once the last output carved from it is gone
            self.output_pool.retire()
            self.output_pool = None
        for heap in (self.data_heap, self.copy_heap, self.signal_heap):
            if heap is not None:
                heap.close()
        self.data_heap = self.copy_heap = self.signal_heap = None

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
        self.copy_flags = layout.add("copy_flags", num_ranks * kernels.MAX_COPY_PARTS * 4)
        self.output_slots = layout.add("output_slots", num_ranks * 8)  # direct-write output block per source
        self.nbytes = layout.size


@dataclass
class _HostCounts:
    """A routing's counts on the host, from the dispatch's one synchronisation: sends[s][j] = n(s -> j)
    rows, every rank's token count, and this rank's receive channel prefix matrix (rows from source s
    before channel c)."""
    rank: int
    sends: list
    tokens: list
    recv_prefix: list
    num_channels: int
    copy_plans: dict = field(default_factory=dict)  # see TritonNormalBackend._copy_plan

    @classmethod
    def from_summary(cls, host: list, rank: int, num_ranks: int, num_local: int, num_channels: int) -> "_HostCounts":
        """`host`: the notify summary as a list (TritonNormalBackend._notify)."""
        pairs = num_ranks * num_ranks
        prefix = [host[s * num_ranks:(s + 1) * num_ranks] for s in range(num_ranks)]  # rows to j from sources <= s
        sends = [prefix[0]] + [[n - m for n, m in zip(prefix[s], prefix[s - 1])] for s in range(1, num_ranks)]
        tokens = host[pairs + num_local:pairs + num_local + num_ranks]
        received = host[pairs + num_local + num_ranks:]
        recv_prefix = [received[s * num_channels:(s + 1) * num_channels] for s in range(num_ranks)]
        return cls(rank, sends, tokens, recv_prefix, num_channels)

    def received_by(self, rank: int) -> int:
        return sum(row[rank] for row in self.sends)

    def sent_by(self, rank: int) -> int:
        return sum(self.sends[rank])

    def most_peer_rows_home(self) -> int:
        """The most rows any rank gets back from its peers in a combine."""
        return max(sum(n for j, n in enumerate(row) if j != home) for home, row in enumerate(self.sends))

    def block_starts(self, rank: int) -> list:
        """Where the rows `rank` received from each source start in its receive order."""
        starts, total = [], 0
        for row in self.sends:
            starts.append(total)
            total += row[rank]
        return starts

    def peer_slot(self, home: int, sender: int) -> int:
        """Where `sender`'s rows start among the rows `home` gets back from its peers (peers ascending)."""
        return sum(self.sends[home][j] for j in range(sender) if j != home)

    def recv_rows(self, source: int, channel: int) -> int:
        """Rows this rank received from `source` in the source's channels before `channel`."""
        if channel >= self.num_channels:
            return self.sends[source][self.rank]
        return self.recv_prefix[source][channel]


@dataclass
class _DispatchInputs:
    """What a dispatch launch takes besides its outputs: the rows and their top-k, the routing (notify's
    matrices and send_head, or a handle's), the record size; a non-cached dispatch writes send_head."""
    x: torch.Tensor
    x_scales: Optional[torch.Tensor]
    topk_idx: Optional[torch.Tensor]
    topk_weights: Optional[torch.Tensor]
    in_rank: torch.Tensor  # is_token_in_rank as bytes
    send_head: torch.Tensor
    rank_prefix: torch.Tensor
    recv_prefix: torch.Tensor
    send_prefix: torch.Tensor
    num_local: int
    num_channels: int
    record_bytes: int
    write_send_head: bool


class _SummaryCopy:
    """The notify summary on the host without waiting for what the stream runs after notify: a copy into
    pinned memory and an event behind it (on CPU, under the interpreter, the summary itself: kernels there
    have finished when their launch returns). Each dispatch waits for its copy before it returns, so one
    pinned buffer serves every call."""

    def __init__(self):
        self._pinned: Optional[torch.Tensor] = None
        self._event = None
        self._summary: Optional[torch.Tensor] = None
        self._copying = False

    def start(self, summary: torch.Tensor) -> "_SummaryCopy":
        self._copying = summary.is_cuda
        if not self._copying:
            self._summary = summary
            return self
        if self._pinned is None or self._pinned.numel() < summary.numel():
            self._pinned = torch.empty(summary.numel(), dtype=summary.dtype, pin_memory=True)
            self._event = torch.cuda.Event()
        self._summary = self._pinned[:summary.numel()]
        self._summary.copy_(summary, non_blocking=True)
        self._event.record()
        return self

    def wait(self) -> list:
        if self._copying:
            self._event.synchronize()
        host, self._summary = self._summary.tolist(), None
        return host


class _DispatchOutputs:
    """Output tensors of one dispatch with `num_rows` rows: new tensors, or views of an output-pool block."""

    def __init__(self, x, x_scales, topk_idx, num_rows: int, device, block=None):
        """`block`: (offset, uint8 tensor) from the output pool, or None."""
        if block is not None:
            self._carve_from(block[1], x, x_scales, topk_idx, num_rows)
            return
        self.x = torch.empty(num_rows, x.size(1), dtype=x.dtype, device=device)
        self.scales = (torch.empty(num_rows, x_scales.size(1), dtype=x_scales.dtype, device=device)
                       if x_scales is not None else None)
        self.topk_idx = self.topk_weights = None
        if topk_idx is not None:
            self.topk_idx = torch.empty(num_rows, topk_idx.size(1), dtype=topk_idx.dtype, device=device)
            self.topk_weights = torch.empty(num_rows, topk_idx.size(1), dtype=torch.float32, device=device)
        self.src_idx = torch.empty(num_rows, dtype=torch.int32, device=device)

    def narrow(self, num_rows: int) -> None:
        """Keep the first `num_rows` rows of every output (views)."""
        self.x, self.scales, self.topk_idx, self.topk_weights, self.src_idx = (
            t[:num_rows] if t is not None else None
            for t in (self.x, self.scales, self.topk_idx, self.topk_weights, self.src_idx))

    def _carve_from(self, block: torch.Tensor, x, x_scales, topk_idx, num_rows: int) -> None:
        """The outputs as views of one output-pool block (uint8), fields where `_output_block_bytes` and the
        kernel's `_direct_outputs` put them."""
        padded = _round_up(num_rows, kernels.OUTPUT_ROWS_ALIGN)
        at = 0

        def field(columns: int, dtype: torch.dtype):
            nonlocal at
            view = block[at:at + num_rows * columns * dtype.itemsize].view(dtype).view(num_rows, columns)
            at += padded * columns * dtype.itemsize
            return view

        self.x = field(x.size(1), x.dtype)
        self.scales = field(x_scales.size(1), x_scales.dtype) if x_scales is not None else None
        self.topk_idx = self.topk_weights = None
        if topk_idx is not None:
            self.topk_idx = field(topk_idx.size(1), topk_idx.dtype)
            self.topk_weights = field(topk_idx.size(1), torch.float32)
        self.src_idx = field(1, torch.int32).view(num_rows)


# parameters whose values a replay replaces (see TritonNormalBackend._replays), in the order of
# _dispatch_swaps / _combine_swaps
_DISPATCH_SWAPS = ("x_ptr", "scales_ptr", "topk_ptr", "weights_ptr", "recv_x_ptr", "recv_scales_ptr",
                   "recv_topk_ptr", "recv_weights_ptr", "recv_src_ptr", "in_rank_ptr", "send_head_ptr",
                   "rank_prefix_ptr", "recv_prefix_ptr", "send_prefix_ptr", "num_out_rows")
_NOTIFY_SWAPS = ("in_rank_ptr", "expert_counts_ptr", "send_prefix_ptr", "rank_prefix_ptr", "recv_prefix_ptr",
                 "recv_expert_ptr", "tokens_ptr")
_COMBINE_SWAPS = ("x_ptr", "weights_ptr", "bias0_ptr", "bias1_ptr", "in_rank_ptr", "send_head_ptr",
                  "rank_prefix_ptr", "recv_prefix_ptr", "out_ptr", "out_weights_ptr")
_MAX_REPLAYS = 16


def _handle_swaps(routing: Routing) -> tuple:
    """The handle's tensors as the kernels take them, in _DISPATCH_SWAPS order: is_token_in_rank (bytes),
    send_head, the rank prefix matrix, the receive and the send channel prefix matrices (a combine takes the
    first four, in the same order)."""
    return (routing.is_token_in_rank.view(torch.uint8), routing.send_head, routing.rank_prefix_matrix,
            routing.recv_channel_prefix_matrix, routing.channel_prefix_matrix)


def _dispatch_record_bytes(x: torch.Tensor, x_scales: Optional[torch.Tensor], num_topk: int) -> int:
    return _record_bytes(x.size(1) * x.element_size(), x_scales.size(1) if x_scales is not None else 0, num_topk)


def _record_bytes(row_bytes: int, num_scales: int, num_topk: int) -> int:
    """Row, scales, top-k ids, top-k weights, source index: all 4-byte words."""
    return _round_up(row_bytes + 4 * (num_scales + 2 * num_topk + 1), kernels.RECORD_ALIGN)


def _output_block_bytes(num_rows: int, x: torch.Tensor, x_scales: Optional[torch.Tensor],
                        topk_idx: Optional[torch.Tensor]) -> int:
    """Bytes of a direct-write dispatch's output block for `num_rows` rows: recv_x, scales, top-k ids,
    top-k weights, source index, each starting at a multiple of OUTPUT_ROWS_ALIGN rows."""
    padded = _round_up(num_rows, kernels.OUTPUT_ROWS_ALIGN)
    row = x.size(1) * x.element_size() + (4 * x_scales.size(1) if x_scales is not None else 0) + 4
    if topk_idx is not None:
        row += topk_idx.size(1) * (topk_idx.element_size() + 4)
    return padded * row


def _combine_record_bytes(hidden: int, num_topk: int) -> int:
    return _round_up(2 * hidden + 4 * num_topk, kernels.RECORD_ALIGN)


def _copy_weights_at(rows: int, hidden: int) -> int:
    """Where the weights start in a half of the copy heap that holds `rows` bf16 rows, then their weights."""
    return _round_up(rows * hidden * 2, kernels.RECORD_ALIGN)


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


_SEQUENCE_CYCLE = 2**30  # copy-engine sequence numbers run 1 .. 2**30, then start over (an even cycle)


def _pow2(n: int) -> int:
    """The next power of two >= n, at least 2 (plain integer arithmetic: triton.next_power_of_2 costs
    microseconds per call on the host, and every launch computes several)."""
    return max(2, 1 << max(0, n - 1).bit_length())


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
