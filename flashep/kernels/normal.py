"""Triton kernels of normal (throughput) mode inside one NVLink domain.

Kernels (profilers find them by name: exactly one name holds "notify", one "dispatch", one "combine"):
- `ep_layout_kernel`: per-rank and per-expert counts and `is_token_in_rank` from `topk_idx`.
- `ep_notify_kernel`: one program; sends every peer its per-channel token counts, the counts for its
  experts, its send totals and its token count, waits for every peer's, and builds the routing.
- `ep_dispatch_kernel`, `ep_combine_kernel`: `num_sms` programs in two roles. Programs
  [0, num_pushers) are pushers: they stream rows over NVLink to their final places and never wait.
  The others are receivers: they wait for peers' pushers and copy (dispatch) or reduce (combine).
  Pushers have the lower program ids, so they are scheduled first on a GPU and run first under the
  interpreter (which runs programs one after another): a wait never depends on a program that can only
  run after the waiting one.

Work is ordered by channel (a channel is the token range of the handle's routing, `num_channels =
num_sms // 2`), in segments of channels: a segment ends after every `publish_every` channels, and also
after the first and each of the last channels (receivers start and finish sooner). Per segment, a
dispatch pusher takes an equal contiguous part of the segment's tokens and a combine pusher an equal
contiguous part of every home's rows (homes in ring order from a pusher-dependent start, so that a rank's
pushers load all its links at once). At a segment's end a pusher publishes `(tag(epoch) << 32) | channels it
finished` to every peer: one CTA barrier and one release atomic per peer, rarely, so its stores stream.
Receivers take an equal contiguous part of the segment's rows (dispatch: of every peer; combine: of this
rank's tokens) and wait until every pusher of the peers they need has passed the segment: one vector of
acquire loads over (source, pusher) flags (`sync.acquire_flags`). On a GPU the loops over (tile, row
chunk) are software-pipelined (`STAGES`), also across tiles. At the end every receiver sees every peer's
final flag of the epoch, which keeps peers at most one operation apart (docs/design.md, "Symmetric heap
and signalling"); data lives in half `epoch % 2` of the data heap.

Heap regions (byte offsets from the backend):
- signal heap: notify flags int64[R] (one per source), dispatch flags int64[R, MAX_PUSHERS] (source
  rank, pusher), combine flags int64[R, MAX_PUSHERS] (sender rank, pusher), notify slots
  int32[R, MAX_CHANNELS + MAX_LOCAL_EXPERTS + R + 1] (one per source), copy-engine flags
  int32[R, MAX_COPY_PARTS] (sender rank, part), output slots int64[R] (a direct-write dispatch's output
  block offset, one per source).
- output pool (direct-write dispatch, `DIRECT`): each rank's outputs in one block; pushers store there
  instead of into records, and no program receives.
- data heap, per half, one record per row. Dispatch record (4-byte words): the row, its scales, top-k
  ids, top-k weights (float bits), source token index. Combine record: the bf16 row, then the float32
  weights.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .sync import (PHASE_COMBINE, PHASE_DISPATCH, PHASE_DISPATCH_OUTPUTS, PHASE_NOTIFY, acquire_flags, end_operation,
                   failed_before, now_ns, record_timeout, signal, tag, wait_tag, within_budget)

MAX_CHANNELS = 128  # num_sms <= 256
MAX_PUSHERS = 2 * MAX_CHANNELS  # at most num_sms - 1 programs push
MAX_LOCAL_EXPERTS = 1024
RECORD_ALIGN = 64  # bytes; keeps record strides divisible by 16 elements for vectorised access
SCAN_TOKENS = 256  # tokens per step when a pusher counts the earlier tokens of its channel
MAX_COPY_PARTS = 16  # parts of a copy-engine combine (one flag per source and part)
OUTPUT_UNIT = 64  # bytes; a direct-write dispatch's output block offsets travel in these units
OUTPUT_ROWS_ALIGN = 16  # rows; each field of an output block starts at a multiple of 16 rows (64-byte aligned)

_max_pushers = tl.constexpr(MAX_PUSHERS)
_scan_tokens = tl.constexpr(SCAN_TOKENS)
_phase_dispatch = tl.constexpr(PHASE_DISPATCH)
_output_unit = tl.constexpr(OUTPUT_UNIT)
_output_rows_align = tl.constexpr(OUTPUT_ROWS_ALIGN)
_phase_combine = tl.constexpr(PHASE_COMBINE)
_phase_notify = tl.constexpr(PHASE_NOTIFY)
_phase_dispatch_outputs = tl.constexpr(PHASE_DISPATCH_OUTPUTS)

# Under the interpreter every call of a @triton.jit helper costs milliseconds, so the per-tile code below
# inlines one-line lookups (a peer's heap pointer, column j of a [tokens, ranks] tile) instead of calling
# helpers for them.


# ---------------------------------------------------------------- small helpers
@triton.jit
def _heap_ptr(bases_ptr, rank, byte_offset, DTYPE: tl.constexpr, ALIGN: tl.constexpr):
    """Typed pointer to `byte_offset` in `rank`'s heap (`bases_ptr`: int64 base address per rank)."""
    ptr = (tl.load(bases_ptr + rank) + byte_offset).to(tl.pointer_type(DTYPE))
    return tl.multiple_of(ptr, ALIGN)


@triton.jit
def _publish(flag_ptrs, values, mask):
    """`signal` to several peers at once: one CTA barrier, then one release store per peer."""
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptrs, values, mask=mask, sem="release", scope="sys")


@triton.jit
def _publish_now(channels_done, publish_every, num_channels):
    """Whether a pusher raises its flag after finishing `channels_done` channels: every `publish_every`
    channels, and, when that leaves several channels between flags, also after the first channel (the
    receivers start sooner) and after each of the last channels (they finish sooner)."""
    several = publish_every < num_channels
    edge = (channels_done == 1) | (channels_done > num_channels - publish_every)
    return (channels_done % publish_every == 0) | (channels_done == num_channels) | (several & edge)


@triton.jit
def _channels_done(values, e, num_channels):
    """Channels a pusher finished in epoch e, from its flag: epoch e + 1 (peers are at most one operation
    apart) means it already finished epoch e, an older one that it has not started."""
    flag_tag = values >> 32
    done = tl.where(flag_tag == tag(e + 1), num_channels, (values & 0xFFFFFFFF).to(tl.int32))
    return tl.where((flag_tag == tag(e)) | (flag_tag == tag(e + 1)), done, 0)


@triton.jit
def _wait_channels(flag_ptrs, flag_ok, needed, channel, ready, e, num_channels, failed, err_addr_ptr, phase, rank,
                   budget, R_PAD: tl.constexpr, USE_TIMER: tl.constexpr):
    """Wait (bounded) until every pusher of every source in `needed` finished `channel`.
    flag_ptrs [R_PAD, P_PAD]: the flags of (source, pusher) here; `flag_ok` marks the real ones; `ready`
    [R_PAD]: channels every pusher of a source finished, as last seen. A timeout is recorded in the
    error word, naming the first source behind. -> (ready, failed)"""
    ranks = tl.arange(0, R_PAD)
    behind = needed & (ready <= channel)
    if (tl.max(behind.to(tl.int32), axis=0) > 0) & (failed == 0):
        start = now_ns(USE_TIMER)
        spins = 0
        alive = True
        while (tl.max(behind.to(tl.int32), axis=0) > 0) & alive:
            values = acquire_flags(flag_ptrs, flag_ok & behind[:, None], USE_TIMER)
            done = tl.min(tl.where(flag_ok, _channels_done(values, e, num_channels), num_channels), axis=1)
            ready = tl.where(behind, done, ready)
            behind = needed & (ready <= channel)
            spins += 1
            alive = within_budget(start, spins, budget, USE_TIMER)
        if tl.max(behind.to(tl.int32), axis=0) > 0:
            record_timeout(err_addr_ptr, phase, rank, tl.min(tl.where(behind, ranks, R_PAD), axis=0))
            failed = 1
    # threads that did not acquire read the rows only after those that did. Outside the `if`: where the flag
    # tile is replicated over warps, each warp polls its own copy and keeps its own `ready`, so one warp may
    # still wait where another has seen the flags already (sm_90 PTX: the test above is a per-warp shuffle
    # reduction), and a barrier inside would pair with a later barrier of the other warps
    tl.debug_barrier()
    return ready, failed


@triton.jit
def _to_bf16(x):
    """float32 -> bfloat16 rounded to nearest even, as torch does (NaN -> 0x7FC0). Spelled out with
    integer ops because the Triton interpreter's float cast truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _localize(ids, weights, rank, num_local_experts):
    """Global expert ids -> this rank's local ids, -1 elsewhere; weights of -1 entries become 0."""
    first = rank * num_local_experts
    mine = (ids >= first) & (ids < first + num_local_experts)
    return tl.where(mine, ids - first, -1), tl.where(mine, weights, 0.0)


# ---------------------------------------------------------------- layout
@triton.jit(do_not_specialize=["num_tokens", "num_topk", "experts_per_rank"])
def ep_layout_kernel(topk_ptr, per_rank_ptr, per_expert_ptr, in_rank_ptr, num_tokens, num_topk, experts_per_rank,
                     NUM_RANKS: tl.constexpr, R_PAD: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = toks < num_tokens
    ks = tl.arange(0, K_PAD)
    ranks = tl.arange(0, R_PAD)
    rank_ok = ranks < NUM_RANKS
    experts = tl.load(topk_ptr + toks[:, None].to(tl.int64) * num_topk + ks[None, :],
                      mask=tok_ok[:, None] & (ks < num_topk)[None, :], other=-1)
    chosen = experts >= 0
    tl.atomic_add(per_expert_ptr + experts, 1, mask=chosen, sem="relaxed")
    owner = tl.where(chosen, experts // experts_per_rank, -1)
    hit = tl.zeros([BLOCK_T, R_PAD], tl.int32)
    for j in tl.static_range(NUM_RANKS):
        column = tl.max((owner == j).to(tl.int32), axis=1)
        hit = tl.where(ranks[None, :] == j, column[:, None], hit)
    tile_ok = tok_ok[:, None] & rank_ok[None, :]
    tl.store(in_rank_ptr + toks[:, None].to(tl.int64) * NUM_RANKS + ranks[None, :], hit.to(tl.int8), mask=tile_ok)
    tl.atomic_add(per_rank_ptr + ranks, tl.sum(hit, axis=0), mask=rank_ok, sem="relaxed")


# ---------------------------------------------------------------- notify
@triton.jit(do_not_specialize=["notify_flags_offset", "slots_offset", "rank", "num_tokens", "num_channels",
                               "tokens_per_channel", "num_local_experts", "budget"])
def ep_notify_kernel(in_rank_ptr, expert_counts_ptr, signal_bases_ptr, notify_flags_offset, slots_offset,
                     epoch_ptr, err_addr_ptr, send_prefix_ptr, rank_prefix_ptr, recv_prefix_ptr, recv_expert_ptr,
                     tokens_ptr, rank, num_tokens, num_channels, tokens_per_channel, num_local_experts, budget,
                     NUM_RANKS: tl.constexpr, R_PAD: tl.constexpr, L_BLOCK: tl.constexpr,
                     BLOCK_T: tl.constexpr, MAX_C: tl.constexpr, MAX_L: tl.constexpr, USE_TIMER: tl.constexpr):
    """Slot of source s on each rank (int32): [0, MAX_C) tokens per channel sent to that rank,
    [MAX_C, MAX_C + MAX_L) selections of that rank's experts, then s's send totals to every rank, then
    s's token count. Outputs: the routing prefix matrices, the received selections per local expert and
    every rank's token count."""
    SLOT_INTS: tl.constexpr = MAX_C + MAX_L + NUM_RANKS + 1
    e = tl.load(epoch_ptr) + 1
    zero = tl.full((), 0, tl.int32)
    ranks = tl.arange(0, R_PAD)
    rank_ok = ranks < NUM_RANKS
    my_slot = slots_offset + rank * (SLOT_INTS * 4)
    # my slot on every peer, as a vector of pointers (one lane per peer)
    slot_on_peer = (tl.load(signal_bases_ptr + ranks, mask=rank_ok, other=0) + my_slot).to(tl.pointer_type(tl.int32))

    totals = tl.zeros([R_PAD], tl.int32)
    channel = zero
    while channel < num_channels:
        first = channel * tokens_per_channel
        last = tl.minimum(first + tokens_per_channel, num_tokens)
        count = tl.zeros([R_PAD], tl.int32)
        start = first
        while start < last:
            toks = start + tl.arange(0, BLOCK_T)
            tile_ok = (toks < last)[:, None] & rank_ok[None, :]
            sent = tl.load(in_rank_ptr + toks[:, None].to(tl.int64) * NUM_RANKS + ranks[None, :], mask=tile_ok,
                           other=0)
            count += tl.sum(sent.to(tl.int32), axis=0)
            start += BLOCK_T
        totals += count
        tl.store(send_prefix_ptr + ranks * num_channels + channel, totals, mask=rank_ok)
        tl.store(slot_on_peer + channel, count, mask=rank_ok)
        channel += 1
    for peer in tl.static_range(NUM_RANKS):
        slot = _heap_ptr(signal_bases_ptr, peer, my_slot, tl.int32, 4)
        l0 = zero
        while l0 < num_local_experts:
            experts = l0 + tl.arange(0, L_BLOCK)
            ok = experts < num_local_experts
            counts = tl.load(expert_counts_ptr + peer * num_local_experts + experts, mask=ok, other=0)
            tl.store(slot + MAX_C + experts, counts, mask=ok)
            l0 += L_BLOCK
        tl.store(slot + MAX_C + MAX_L + ranks, totals, mask=rank_ok)
        tl.store(slot + MAX_C + MAX_L + NUM_RANKS, num_tokens)
        signal(_heap_ptr(signal_bases_ptr, peer, notify_flags_offset + rank * 8, tl.int64, 8), tag(e) << 32)

    failed = failed_before(err_addr_ptr)
    flags = _heap_ptr(signal_bases_ptr, rank, notify_flags_offset, tl.int64, 8)
    for src in tl.static_range(NUM_RANKS):
        if failed == 0:
            arrived = wait_tag(flags + src, tag(e), tag(e + 1), budget, USE_TIMER)  # a peer may be one ahead
            if arrived == 0:
                record_timeout(err_addr_ptr, _phase_notify, rank, src)
                failed = 1
    if failed == 0:
        # prefix sums with loops: tl.cumsum's lowering fails on some tiny tiles (Triton 3.6)
        slots = _heap_ptr(signal_bases_ptr, rank, slots_offset, tl.int32, 4)
        src_slots = slots + ranks[:, None] * SLOT_INTS
        before = tl.zeros([R_PAD], tl.int32)  # per source: its rows in the channels so far
        channel = zero
        while channel < num_channels:
            count = tl.load(slots + ranks * SLOT_INTS + channel, mask=rank_ok, other=0, cache_modifier=".cg")
            tl.store(recv_prefix_ptr + ranks * num_channels + channel, before, mask=rank_ok)
            before += count
            channel += 1
        upto = tl.zeros([R_PAD], tl.int32)  # per destination: rows from the sources so far
        for src in tl.static_range(NUM_RANKS):
            upto += tl.load(slots + src * SLOT_INTS + MAX_C + MAX_L + ranks, mask=rank_ok, other=0,
                            cache_modifier=".cg")
            tl.store(rank_prefix_ptr + src * NUM_RANKS + ranks, upto, mask=rank_ok)
        src_tokens = tl.load(slots + ranks * SLOT_INTS + MAX_C + MAX_L + NUM_RANKS, mask=rank_ok, other=0,
                             cache_modifier=".cg")
        tl.store(tokens_ptr + ranks, src_tokens, mask=rank_ok)
        l0 = zero
        while l0 < num_local_experts:
            experts = l0 + tl.arange(0, L_BLOCK)
            ok = experts < num_local_experts
            counts = tl.load(src_slots + MAX_C + experts[None, :], mask=rank_ok[:, None] & ok[None, :], other=0,
                             cache_modifier=".cg")
            tl.store(recv_expert_ptr + experts, tl.sum(counts, axis=0), mask=ok)
            l0 += L_BLOCK


# ---------------------------------------------------------------- segments and parts
@triton.jit
def _segment_end(begin, publish_every, num_channels):
    """The first channel count after `begin` at which a pusher publishes: the end of a segment."""
    end = begin + 1
    while _publish_now(end, publish_every, num_channels) == 0:
        end += 1
    return end


@triton.jit
def _source_rows(rank_prefix_ptr, recv_prefix_ptr, rank, channel, num_channels, NUM_RANKS: tl.constexpr,
                 R_PAD: tl.constexpr):
    """For every rank p: where the rows p sends to `rank` from p's channel `channel` on start inside p's
    block of rank's receive order (channel == num_channels: the block's end), and the block's first row.
    Both as [R_PAD] vectors; the block's first row is also where p's rows start in rank's x in a combine."""
    peers = tl.arange(0, R_PAD)
    valid = peers < NUM_RANKS
    block = tl.load(rank_prefix_ptr + (peers - 1) * NUM_RANKS + rank, mask=valid & (peers > 0), other=0)
    total = tl.load(rank_prefix_ptr + peers * NUM_RANKS + rank, mask=valid, other=0) - block
    inner = valid & (channel < num_channels)
    start = tl.load(recv_prefix_ptr + peers * num_channels + channel, mask=inner, other=0)
    return tl.where(inner, start, total), block


@triton.jit
def _share(lo, hi, index, count):
    """Share `index` of `count` near-equal contiguous shares of [lo, hi) -> (begin, end)."""
    n = hi - lo
    return lo + n * index // count, lo + n * (index + 1) // count


@triton.jit
def _channel_tokens(first_channel, end_channel, tokens_per_channel, num_tokens):
    """Tokens of channels [first_channel, end_channel) -> (lo, hi)."""
    return (tl.minimum(first_channel * tokens_per_channel, num_tokens),
            tl.minimum(end_channel * tokens_per_channel, num_tokens))


@triton.jit
def _parts(lo, hi, part, num_parts, peer_ok, first_peer, NUM_RANKS: tl.constexpr, R_PAD: tl.constexpr,
           BLOCK_T: tl.constexpr):
    """Part `part` of `num_parts` of every peer's row range [lo, hi) ([R_PAD] vectors), the peers taken in
    ring order from `first_peer`. -> (part begin, part end, tiles, tiles of the peers before in the order)."""
    ranks = tl.arange(0, R_PAD)
    begin, end = _share(lo, hi, part, num_parts)
    tiles = tl.where(peer_ok, tl.cdiv(end - begin, BLOCK_T), 0)
    order = (ranks - first_peer % NUM_RANKS + NUM_RANKS) % NUM_RANKS
    before = tl.sum(tl.where(order[None, :] < order[:, None], tiles[None, :], 0), axis=1)
    return begin, end, tiles, before


# ---------------------------------------------------------------- dispatch
@triton.jit
def _dispatch_push_fields(start, last, before, block_start, bases, caps, direct, out_scales, out_topk, out_weights,
                          out_src,
                          scales_ptr, scale_stride_t, scale_stride_s, topk_ptr, weights_ptr, in_rank_ptr,
                          recv_scales_ptr, recv_topk_ptr, recv_weights_ptr, recv_src_ptr, send_head_ptr, rank,
                          num_local_experts, num_scales, num_topk, num_out_rows, NUM_RANKS: tl.constexpr,
                          R_PAD: tl.constexpr, ROW_WORDS: tl.constexpr, RECORD_WORDS: tl.constexpr,
                          S_PAD: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                          HAS_SCALES: tl.constexpr, HAS_TOPK: tl.constexpr, WRITE_SEND_HEAD: tl.constexpr,
                          DIRECT: tl.constexpr):
    """Tokens [start, min(start + BLOCK_T, last)): their positions among the tokens sent to each rank
    (written into send_head from `before`, the tokens before `start` sent to each rank, or read from it in a
    cached dispatch), and their per-row fields (scales, top-k ids and weights, source index) at their final
    rows: this rank's into its outputs; a peer's into its record region (`bases`, rows < `caps`), or with
    DIRECT, where `direct` marks the peer, into its outputs (`out_*`: every rank's field addresses), top-k
    ids made local to that peer. -> (`before` after these tokens, the positions [BLOCK_T, R_PAD], -1: not
    sent to that rank)."""
    ranks = tl.arange(0, R_PAD)
    rank_ok = ranks < NUM_RANKS
    ks = tl.arange(0, K_PAD)
    ss = tl.arange(0, S_PAD)
    toks = start + tl.arange(0, BLOCK_T)
    tok_ok = toks < last
    tile_ok = tok_ok[:, None] & rank_ok[None, :]
    toks64 = toks.to(tl.int64)
    offsets = toks64[:, None] * NUM_RANKS + ranks[None, :]
    chosen = tl.load(in_rank_ptr + offsets, mask=tile_ok, other=0).to(tl.int32)
    if WRITE_SEND_HEAD:
        # inclusive prefix over the tile's tokens as a masked sum (tl.cumsum's lowering fails on some tiny
        # tiles in Triton 3.6)
        earlier = (tl.arange(0, BLOCK_T)[None, :] <= tl.arange(0, BLOCK_T)[:, None]).to(tl.int32)
        pos = before[None, :] + tl.sum(earlier[:, :, None] * chosen[None, :, :], axis=1) - 1
        before += tl.sum(chosen, axis=0)
        pos = tl.where(chosen != 0, pos, -1)
        tl.store(send_head_ptr + offsets, pos, mask=tile_ok)
    else:
        pos = tl.where(chosen != 0, tl.load(send_head_ptr + offsets, mask=tile_ok, other=0), -1)
    rows = block_start[None, :] + pos  # final row on destination j
    k_ok = tok_ok[:, None] & (ks < num_topk)[None, :]
    s_ok = tok_ok[:, None] & (ss < num_scales)[None, :]
    if HAS_TOPK:
        ids = tl.load(topk_ptr + toks64[:, None] * num_topk + ks[None, :], mask=k_ok, other=-1).to(tl.int32)
        weights = tl.load(weights_ptr + toks64[:, None] * num_topk + ks[None, :], mask=k_ok, other=0.0)
        local, local_weights = _localize(ids, weights, rank, num_local_experts)
    if HAS_SCALES:
        scales = tl.load(scales_ptr + toks64[:, None] * scale_stride_t + ss[None, :] * scale_stride_s, mask=s_ok)
    for step in tl.static_range(NUM_RANKS):  # self first, then the peers in ring order
        dst = (rank + step) % NUM_RANKS
        pick = ranks[None, :] == dst
        dst_rows = tl.sum(tl.where(pick, rows, 0), axis=1).to(tl.int64)
        row_ok = tl.sum(tl.where(pick, chosen, 0), axis=1) != 0
        if step == 0:
            row_ok = row_ok & (dst_rows < num_out_rows)
            tl.store(recv_src_ptr + dst_rows, toks, mask=row_ok)
            if HAS_TOPK:
                tl.store(recv_topk_ptr + dst_rows[:, None] * num_topk + ks[None, :],
                         local.to(recv_topk_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok)
                tl.store(recv_weights_ptr + dst_rows[:, None] * num_topk + ks[None, :], local_weights,
                         mask=row_ok[:, None] & k_ok)
            if HAS_SCALES:
                tl.store(recv_scales_ptr + dst_rows[:, None] * num_scales + ss[None, :], scales,
                         mask=row_ok[:, None] & s_ok)
        else:
            at_dst = ranks == dst
            row_ok = row_ok & (dst_rows < tl.sum(tl.where(at_dst, caps, 0), axis=0))
            to_outputs = False
            if DIRECT:
                to_outputs = tl.sum(tl.where(at_dst, direct, 0), axis=0) != 0
            if to_outputs:  # straight into the peer's outputs, top-k ids made local to it
                if HAS_SCALES:
                    out = tl.sum(tl.where(at_dst, out_scales, 0), axis=0).to(tl.pointer_type(tl.int32))
                    tl.store(out + dst_rows[:, None] * num_scales + ss[None, :], scales, mask=row_ok[:, None] & s_ok)
                if HAS_TOPK:
                    dst_ids, dst_weights = _localize(ids, weights, dst, num_local_experts)
                    out_ids = tl.sum(tl.where(at_dst, out_topk, 0), axis=0).to(
                        tl.pointer_type(recv_topk_ptr.dtype.element_ty))
                    tl.store(out_ids + dst_rows[:, None] * num_topk + ks[None, :],
                             dst_ids.to(recv_topk_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok)
                    out = tl.sum(tl.where(at_dst, out_weights, 0), axis=0).to(tl.pointer_type(tl.float32))
                    tl.store(out + dst_rows[:, None] * num_topk + ks[None, :], dst_weights,
                             mask=row_ok[:, None] & k_ok)
                out = tl.sum(tl.where(at_dst, out_src, 0), axis=0).to(tl.pointer_type(tl.int32))
                tl.store(out + dst_rows, toks, mask=row_ok)
            else:  # into the peer's record region (its receivers copy them)
                region = tl.sum(tl.where(at_dst, bases, 0), axis=0).to(tl.pointer_type(tl.int32))
                record = region + dst_rows * RECORD_WORDS + ROW_WORDS
                if HAS_SCALES:
                    tl.store(record[:, None] + ss[None, :], scales, mask=row_ok[:, None] & s_ok)
                record += num_scales
                if HAS_TOPK:
                    tl.store(record[:, None] + ks[None, :], ids, mask=row_ok[:, None] & k_ok)
                    tl.store(record[:, None] + num_topk + ks[None, :], weights.to(tl.int32, bitcast=True),
                             mask=row_ok[:, None] & k_ok)
                tl.store(record + 2 * num_topk, toks, mask=row_ok)
    if WRITE_SEND_HEAD:
        # read back what this program's threads just stored: the prefix sum leaves the positions in a layout
        # that the rows' loop would convert through shared memory at every chunk
        tl.debug_barrier()
        pos = tl.load(send_head_ptr + offsets, mask=tile_ok, other=-1)
    return before, pos


@triton.jit
def _dispatch_push_chunk(chunk, toks, tok_ok, pos, block_start, bases, caps, direct, x_ptr, recv_x_ptr, rank,
                         num_out_rows, NUM_RANKS: tl.constexpr, R_PAD: tl.constexpr, ROW_WORDS: tl.constexpr,
                         RECORD_WORDS: tl.constexpr, BLOCK_W: tl.constexpr, DIRECT: tl.constexpr):
    """Chunk `chunk` of a tile's rows (tokens `toks`, positions `pos` from `_dispatch_push_fields`), loaded
    once and stored to every destination at its row (this rank's rows straight into recv_x; a peer's at
    `bases`, rows < `caps`: its record region, or with DIRECT, where `direct` marks the peer, its recv_x)."""
    ranks = tl.arange(0, R_PAD)
    toks64 = toks.to(tl.int64)
    rows = block_start[None, :] + pos
    cols = chunk * BLOCK_W + tl.arange(0, BLOCK_W)
    col_ok = cols < ROW_WORDS
    data = tl.load(x_ptr + toks64[:, None] * ROW_WORDS + cols[None, :], mask=tok_ok[:, None] & col_ok[None, :])
    for dst_step in tl.static_range(NUM_RANKS):  # self first, then the peers in ring order
        dst = (rank + dst_step) % NUM_RANKS
        pick = ranks[None, :] == dst
        dst_rows = tl.sum(tl.where(pick, rows, 0), axis=1).to(tl.int64)
        dst_ok = (tl.max(tl.where(pick, pos, -1), axis=1) >= 0)[:, None] & col_ok[None, :]
        if dst_step == 0:
            tl.store(recv_x_ptr + dst_rows[:, None] * ROW_WORDS + cols[None, :], data,
                     mask=dst_ok & (dst_rows < num_out_rows)[:, None])
        else:
            at_dst = ranks == dst
            region = tl.multiple_of(tl.sum(tl.where(at_dst, bases, 0), axis=0).to(tl.pointer_type(tl.int32)), 16)
            mask = dst_ok & (dst_rows < tl.sum(tl.where(at_dst, caps, 0), axis=0))[:, None]
            to_outputs = False
            if DIRECT:
                to_outputs = tl.sum(tl.where(at_dst, direct, 0), axis=0) != 0
            if to_outputs:
                tl.store(region + dst_rows[:, None] * ROW_WORDS + cols[None, :], data, mask=mask)
            else:
                tl.store(region + dst_rows[:, None] * RECORD_WORDS + cols[None, :], data, mask=mask)


@triton.jit
def _pick_tile(tile, begins, ends, tiles, tiles_before, BLOCK_T: tl.constexpr):
    """Tile `tile` of the peers' ranges [begins[p], ends[p]) laid end to end (`tiles`, `tiles_before`: the
    ranges' tiles and the tiles before each range). -> (the tile's indices, which are valid, its peer)."""
    pick = (tiles_before <= tile) & (tile < tiles_before + tiles)
    idx = tl.sum(tl.where(pick, begins + (tile - tiles_before) * BLOCK_T, 0), axis=0) + tl.arange(0, BLOCK_T)
    return idx, idx < tl.sum(tl.where(pick, ends, 0), axis=0), pick


@triton.jit
def _dispatch_copy_chunk(step, begins, ends, tiles, tiles_before, region, recv_x_ptr, capacity, num_out_rows,
                         ROW_WORDS: tl.constexpr, RECORD_WORDS: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_W: tl.constexpr):
    """Step `step` of copying received rows [begins[p], ends[p]) of every peer p (row index = receive order,
    the same in the local region and in recv_x): tile step // CHUNKS, chunk step % CHUNKS."""
    CHUNKS: tl.constexpr = (ROW_WORDS + BLOCK_W - 1) // BLOCK_W
    rows, row_ok, _ = _pick_tile(step // CHUNKS, begins, ends, tiles, tiles_before, BLOCK_T)
    row_ok = row_ok & (rows < capacity) & (rows < num_out_rows)
    rows64 = rows.to(tl.int64)
    cols = (step % CHUNKS) * BLOCK_W + tl.arange(0, BLOCK_W)
    ok = row_ok[:, None] & (cols < ROW_WORDS)[None, :]
    data = tl.load(region + rows64[:, None] * RECORD_WORDS + cols[None, :], mask=ok, cache_modifier=".cg")
    tl.store(recv_x_ptr + rows64[:, None] * ROW_WORDS + cols[None, :], data, mask=ok)


@triton.jit
def _dispatch_copy_fields(tile, begins, ends, tiles, tiles_before, region, recv_scales_ptr, recv_topk_ptr,
                          recv_weights_ptr, recv_src_ptr, rank, num_local_experts, num_scales, num_topk, capacity,
                          num_out_rows, ROW_WORDS: tl.constexpr, RECORD_WORDS: tl.constexpr, S_PAD: tl.constexpr,
                          K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, HAS_SCALES: tl.constexpr,
                          HAS_TOPK: tl.constexpr):
    """The per-row fields of tile `tile` of the ranges `_dispatch_copy_chunk` copies, top-k ids rewritten to
    local ones (weights of -1 become 0)."""
    rows, row_ok, _ = _pick_tile(tile, begins, ends, tiles, tiles_before, BLOCK_T)
    row_ok = row_ok & (rows < capacity) & (rows < num_out_rows)
    rows64 = rows.to(tl.int64)
    record = region + rows64 * RECORD_WORDS + ROW_WORDS
    if HAS_SCALES:
        ss = tl.arange(0, S_PAD)
        s_ok = row_ok[:, None] & (ss < num_scales)[None, :]
        scales = tl.load(record[:, None] + ss[None, :], mask=s_ok, cache_modifier=".cg")
        tl.store(recv_scales_ptr + rows64[:, None] * num_scales + ss[None, :], scales, mask=s_ok)
    record += num_scales
    if HAS_TOPK:
        ks = tl.arange(0, K_PAD)
        k_ok = row_ok[:, None] & (ks < num_topk)[None, :]
        ids = tl.load(record[:, None] + ks[None, :], mask=k_ok, other=-1, cache_modifier=".cg")
        bits = tl.load(record[:, None] + num_topk + ks[None, :], mask=k_ok, other=0, cache_modifier=".cg")
        local, weights = _localize(ids, bits.to(tl.float32, bitcast=True), rank, num_local_experts)
        tl.store(recv_topk_ptr + rows64[:, None] * num_topk + ks[None, :], local.to(recv_topk_ptr.dtype.element_ty),
                 mask=k_ok)
        tl.store(recv_weights_ptr + rows64[:, None] * num_topk + ks[None, :], weights, mask=k_ok)
    src_idx = tl.load(record + 2 * num_topk, mask=row_ok, cache_modifier=".cg")
    tl.store(recv_src_ptr + rows64, src_idx, mask=row_ok)


@triton.jit
def _direct_outputs(slot_ptrs, out_bases_ptr, rank_prefix_ptr, e, num_scales, num_topk, failed, err_addr_ptr, rank,
                    budget, NUM_RANKS: tl.constexpr, R_PAD: tl.constexpr, ROW_WORDS: tl.constexpr,
                    TOPK_BYTES: tl.constexpr, USE_TIMER: tl.constexpr):
    """Every peer's state in a dispatch that may write directly: wait (bounded) until each peer published its
    slot (`slot_ptrs`: the peers' slots here, `(tag(e) << 32) | v`, v = 1 + its output block's offset in its
    output pool, in units, or 0: records), then lay out the fields of every direct peer's block as
    `_DispatchOutputs._carve_from` (backends/triton_normal.py) does, from the rows it receives.
    -> (failed, direct, x, rows, scales, top-k ids, top-k weights, source index): [R_PAD] vectors (direct:
    1 where the peer takes direct writes; rows: the peer's row count; the others: addresses)."""
    ranks = tl.arange(0, R_PAD)
    rank_ok = ranks < NUM_RANKS
    peer_ok = rank_ok & (ranks != rank)
    values = acquire_flags(slot_ptrs, peer_ok, USE_TIMER)
    behind = peer_ok & ((values >> 32) != tag(e))
    if (tl.max(behind.to(tl.int32), axis=0) > 0) & (failed == 0):
        start = now_ns(USE_TIMER)
        spins = 0
        alive = True
        while (tl.max(behind.to(tl.int32), axis=0) > 0) & alive:
            values = tl.where(behind, acquire_flags(slot_ptrs, behind, USE_TIMER), values)
            behind = peer_ok & ((values >> 32) != tag(e))
            spins += 1
            alive = within_budget(start, spins, budget, USE_TIMER)
        if tl.max(behind.to(tl.int32), axis=0) > 0:
            record_timeout(err_addr_ptr, _phase_dispatch_outputs, rank, tl.min(tl.where(behind, ranks, R_PAD), axis=0))
            failed = 1
    # the slots once more, after a barrier (unconditional: see _wait_channels): each thread's copy of them was
    # loaded on its own, so a copy may predate the one the wait decided on (see low_latency._wait_flags); this
    # read follows them all
    tl.debug_barrier()
    if failed == 0:
        values = acquire_flags(slot_ptrs, peer_ok, USE_TIMER)
    state = values & 0xFFFFFFFF
    direct = (peer_ok & (state != 0)).to(tl.int32)
    x = tl.load(out_bases_ptr + ranks, mask=rank_ok, other=0) + tl.maximum(state - 1, 0) * _output_unit
    rows = tl.load(rank_prefix_ptr + (NUM_RANKS - 1) * NUM_RANKS + ranks, mask=rank_ok, other=0)
    padded = (tl.cdiv(rows, _output_rows_align) * _output_rows_align).to(tl.int64)
    scales = x + padded * (ROW_WORDS * 4)
    ids = scales + padded * num_scales * 4
    weights = ids + padded * num_topk * TOPK_BYTES
    src = weights + padded * num_topk * 4
    return failed, direct, x, rows, scales, ids, weights, src


DISPATCH_NO_SPECIALIZE = ["scale_stride_t", "scale_stride_s", "rank", "num_tokens", "num_channels",
                          "tokens_per_channel", "num_pushers", "publish_every", "num_local_experts", "num_scales",
                          "num_topk", "capacity", "num_out_rows", "out_slots_offset", "out_state", "budget"]


@triton.jit(do_not_specialize=DISPATCH_NO_SPECIALIZE)
def ep_dispatch_kernel(x_ptr, scales_ptr, scale_stride_t, scale_stride_s, topk_ptr, weights_ptr, in_rank_ptr,
                       rank_prefix_ptr, send_prefix_ptr, recv_prefix_ptr,
                       recv_x_ptr, recv_scales_ptr, recv_topk_ptr, recv_weights_ptr, recv_src_ptr, send_head_ptr,
                       data_bases_ptr, half_bytes, signal_bases_ptr, flags_offset, epoch_ptr, arrivals_ptr,
                       err_addr_ptr, rank, num_tokens, num_channels, tokens_per_channel, num_pushers, publish_every,
                       num_local_experts, num_scales, num_topk, capacity, num_out_rows,
                       out_bases_ptr, out_slots_offset, out_state, budget,
                       NUM_RANKS: tl.constexpr, R_PAD: tl.constexpr, P_PAD: tl.constexpr, ROW_WORDS: tl.constexpr,
                       RECORD_WORDS: tl.constexpr, S_PAD: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_W: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_TOPK: tl.constexpr,
                       TOPK_BYTES: tl.constexpr, WRITE_SEND_HEAD: tl.constexpr, WORST: tl.constexpr,
                       DIRECT: tl.constexpr, USE_TIMER: tl.constexpr, STAGES: tl.constexpr):
    """Rows are 4-byte words (`x_ptr`/`recv_x_ptr` are int32 views). Row i of the receive order sits at the
    same index in the receive region and in `recv_x`. Work goes by segments of channels (a flag at each
    segment's end): a pusher takes an equal contiguous part of the segment's tokens, a receiver an equal
    contiguous part of every peer's rows of the segment. USE_TIMER: compiled for a GPU (timed waits,
    software-pipelined loops).

    DIRECT (a dispatch that may write directly; every rank launches the same kind): each rank is in one of
    two states, its own choice. `out_state` = 1 + the offset (units) of the output block it carved from its
    output pool (`out_bases_ptr`: every rank's pool base): every program pushes (num_pushers = the grid) and
    peers store straight into its outputs; 0: records, as without DIRECT. Program 0 publishes the state into
    every peer's slot (signal heap, int64[R] at `out_slots_offset`, one per source) and, for a rank with
    receivers, the receivers' flags as finished (every source then has a flag per program, whatever its
    split); each pusher waits for its peers' slots before its first store and writes each peer as its state
    says. Receivers wait for every program's flag of each source; in the direct state the last program
    waits for every peer's final flags, so the kernel ends when every row has landed."""
    CHUNKS: tl.constexpr = (ROW_WORDS + BLOCK_W - 1) // BLOCK_W
    pid = tl.program_id(0)
    e = tl.load(epoch_ptr) + 1
    half_offset = (e % 2) * half_bytes
    ranks = tl.arange(0, R_PAD)
    rank_ok = ranks < NUM_RANKS
    peer_ok = rank_ok & (ranks != rank)
    zero = tl.full((), 0, tl.int32)
    segment = zero  # first channel of the current segment
    signal_bases = tl.load(signal_bases_ptr + ranks, mask=rank_ok, other=0)
    my_signal_base = tl.load(signal_bases_ptr + rank)
    num_programs = tl.num_programs(0)
    if DIRECT:
        if pid == 0:
            _publish((signal_bases + out_slots_offset + rank * 8).to(tl.pointer_type(tl.int64)),
                     tl.zeros([R_PAD], tl.int64) + ((tag(e) << 32) | out_state), peer_ok)
            receivers = tl.arange(0, P_PAD) + num_pushers  # they push nothing: finished from the start
            idle = (signal_bases[:, None] + flags_offset + (rank * _max_pushers + receivers[None, :]) * 8)
            finished = tl.zeros([R_PAD, P_PAD], tl.int64) + ((tag(e) << 32) | num_channels)
            idle_ok = peer_ok[:, None] & (receivers < num_programs)[None, :]
            _publish(idle.to(tl.pointer_type(tl.int64)), finished, idle_ok)
    if pid < num_pushers:
        # this pusher's flag (source rank, pusher) on every peer
        my_flag = flags_offset + (rank * _max_pushers + pid) * 8
        out_flags = (signal_bases + my_flag).to(tl.pointer_type(tl.int64))
        block_start = tl.load(rank_prefix_ptr + (rank - 1) * NUM_RANKS + ranks, mask=rank_ok & (rank > 0), other=0)
        # every peer's record region, or with DIRECT its outputs where it takes direct writes
        bases = tl.load(data_bases_ptr + ranks, mask=rank_ok, other=0) + half_offset
        caps = tl.zeros([R_PAD], tl.int32) + capacity
        direct = tl.zeros([R_PAD], tl.int32)
        out_scales = bases  # unused without DIRECT
        out_topk = bases
        out_weights = bases
        out_src = bases
        if DIRECT:
            slots = (my_signal_base + out_slots_offset + ranks * 8).to(tl.pointer_type(tl.int64))
            failed, direct, out_x, out_rows, out_scales, out_topk, out_weights, out_src = _direct_outputs(
                slots, out_bases_ptr, rank_prefix_ptr, e, num_scales, num_topk, failed_before(err_addr_ptr),
                err_addr_ptr, rank, budget, NUM_RANKS, R_PAD, ROW_WORDS, TOPK_BYTES, USE_TIMER)
            bases = tl.where(direct != 0, out_x, bases)
            caps = tl.where(direct != 0, out_rows, caps)
            if failed != 0:  # no flag either: the peers time out too, naming this rank
                segment = num_channels
        elif failed_before(err_addr_ptr) != 0:
            # a dispatch launched ahead of the host sync behind a notify that timed out: no peer is known
            # to be in this operation, so nothing is stored into their buffers
            segment = num_channels
        while segment < num_channels:
            segment_end = _segment_end(segment, publish_every, num_channels)
            lo, hi = _channel_tokens(segment, segment_end, tokens_per_channel, num_tokens)
            first, last = _share(lo, hi, pid, num_pushers)
            before = tl.zeros([R_PAD], tl.int32)  # tokens before `first` sent to each rank
            if WRITE_SEND_HEAD:
                channel = first // tokens_per_channel
                before = tl.load(send_prefix_ptr + ranks * num_channels + channel - 1,
                                 mask=rank_ok & (channel > 0) & (channel < num_channels), other=0)
                scan = channel * tokens_per_channel
                while scan < first:
                    scan_toks = scan + tl.arange(0, _scan_tokens)
                    scan_ok = (scan_toks < first)[:, None] & rank_ok[None, :]
                    seen = tl.load(in_rank_ptr + scan_toks[:, None].to(tl.int64) * NUM_RANKS + ranks[None, :],
                                   mask=scan_ok, other=0)
                    before += tl.sum(seen.to(tl.int32), axis=0)
                    scan += _scan_tokens
            # tile by tile: the per-row fields and positions, then the rows chunk by chunk; on a GPU the loop
            # over a tile's chunks is software-pipelined (its loads depend only on values in registers)
            num_tiles = tl.cdiv(last - first, BLOCK_T)
            tile = zero
            while tile < num_tiles:
                toks = first + tile * BLOCK_T + tl.arange(0, BLOCK_T)
                before, pos = _dispatch_push_fields(
                    first + tile * BLOCK_T, last, before, block_start, bases, caps, direct, out_scales, out_topk,
                    out_weights, out_src, scales_ptr, scale_stride_t, scale_stride_s, topk_ptr, weights_ptr,
                    in_rank_ptr, recv_scales_ptr, recv_topk_ptr, recv_weights_ptr, recv_src_ptr, send_head_ptr,
                    rank, num_local_experts, num_scales, num_topk, num_out_rows, NUM_RANKS, R_PAD, ROW_WORDS,
                    RECORD_WORDS, S_PAD, K_PAD, BLOCK_T, HAS_SCALES, HAS_TOPK, WRITE_SEND_HEAD, DIRECT)
                if USE_TIMER:  # the interpreter needs constant bounds for tl.range
                    for chunk in tl.range(0, CHUNKS, num_stages=STAGES):
                        _dispatch_push_chunk(chunk, toks, toks < last, pos, block_start, bases, caps, direct, x_ptr,
                                             recv_x_ptr, rank, num_out_rows, NUM_RANKS, R_PAD, ROW_WORDS,
                                             RECORD_WORDS, BLOCK_W, DIRECT)
                else:
                    for chunk in range(CHUNKS):
                        _dispatch_push_chunk(chunk, toks, toks < last, pos, block_start, bases, caps, direct, x_ptr,
                                             recv_x_ptr, rank, num_out_rows, NUM_RANKS, R_PAD, ROW_WORDS,
                                             RECORD_WORDS, BLOCK_W, DIRECT)
                tile += 1
            _publish(out_flags, tl.zeros([R_PAD], tl.int64) + ((tag(e) << 32) | segment_end.to(tl.int64)), peer_ok)
            segment = segment_end
        if DIRECT:
            if (num_pushers == num_programs) & (pid == num_programs - 1):
                # direct state, the last program: the kernel ends when every peer's rows have landed
                programs = tl.arange(0, P_PAD)
                flags = (my_signal_base + flags_offset
                         + (ranks[:, None] * _max_pushers + programs[None, :]) * 8).to(tl.pointer_type(tl.int64))
                flag_ok = peer_ok[:, None] & (programs < num_programs)[None, :]
                _wait_channels(flags, flag_ok, peer_ok, num_channels - 1, tl.zeros([R_PAD], tl.int32), e,
                               num_channels, failed_before(err_addr_ptr), err_addr_ptr, _phase_dispatch, rank,
                               budget, R_PAD, USE_TIMER)
    else:
        worker = pid - num_pushers
        num_workers = tl.num_programs(0) - num_pushers
        failed = failed_before(err_addr_ptr)
        region = _heap_ptr(data_bases_ptr, rank, half_offset, tl.int32, 16)
        pushers = tl.arange(0, P_PAD)
        flags = (my_signal_base + flags_offset
                 + (ranks[:, None] * _max_pushers + pushers[None, :]) * 8).to(tl.pointer_type(tl.int64))
        flag_count = num_pushers  # a source's flags: one per pusher, or with DIRECT one per program
        if DIRECT:
            flag_count = num_programs
        flag_ok = peer_ok[:, None] & (pushers < flag_count)[None, :]
        if WORST:  # rows past the valid prefix: top-k -1 and source index -1
            num_valid = tl.load(rank_prefix_ptr + (NUM_RANKS - 1) * NUM_RANKS + rank)
            ks = tl.arange(0, K_PAD)
            r0 = num_valid + worker * BLOCK_T
            while r0 < num_out_rows:
                tail = r0 + tl.arange(0, BLOCK_T)
                tail_ok = tail < num_out_rows
                tl.store(recv_src_ptr + tail, -1, mask=tail_ok)
                if HAS_TOPK:
                    tl.store(recv_topk_ptr + tail[:, None].to(tl.int64) * num_topk + ks[None, :],
                             tl.full([BLOCK_T, K_PAD], -1, recv_topk_ptr.dtype.element_ty),
                             mask=tail_ok[:, None] & (ks < num_topk)[None, :])
                r0 += num_workers * BLOCK_T
        ready = tl.zeros([R_PAD], tl.int32)  # channels every pusher of a source finished, as last seen
        row_lo, block = _source_rows(rank_prefix_ptr, recv_prefix_ptr, rank, segment, num_channels, NUM_RANKS,
                                     R_PAD)
        while segment < num_channels:
            segment_end = _segment_end(segment, publish_every, num_channels)
            row_hi, block = _source_rows(rank_prefix_ptr, recv_prefix_ptr, rank, segment_end, num_channels,
                                         NUM_RANKS, R_PAD)
            begins, ends, tiles, tiles_before = _parts(block + row_lo, block + row_hi, worker, num_workers, peer_ok,
                                                       rank + 1 + worker, NUM_RANKS, R_PAD, BLOCK_T)
            ready, failed = _wait_channels(flags, flag_ok, tiles > 0, segment_end - 1, ready, e, num_channels, failed,
                                           err_addr_ptr, _phase_dispatch, rank, budget, R_PAD, USE_TIMER)
            num_tiles = tl.where(failed == 0, tl.sum(tiles, axis=0), 0)
            if USE_TIMER:  # software-pipelined loops (the interpreter needs constant bounds for tl.range)
                for step in tl.range(0, num_tiles * CHUNKS, num_stages=STAGES):
                    _dispatch_copy_chunk(step, begins, ends, tiles, tiles_before, region, recv_x_ptr, capacity,
                                         num_out_rows, ROW_WORDS, RECORD_WORDS, BLOCK_T, BLOCK_W)
                for tile in tl.range(0, num_tiles, num_stages=STAGES):
                    _dispatch_copy_fields(tile, begins, ends, tiles, tiles_before, region, recv_scales_ptr,
                                          recv_topk_ptr, recv_weights_ptr, recv_src_ptr, rank, num_local_experts,
                                          num_scales, num_topk, capacity, num_out_rows, ROW_WORDS, RECORD_WORDS,
                                          S_PAD, K_PAD, BLOCK_T, HAS_SCALES, HAS_TOPK)
            else:
                step = zero
                while step < num_tiles * CHUNKS:
                    _dispatch_copy_chunk(step, begins, ends, tiles, tiles_before, region, recv_x_ptr, capacity,
                                         num_out_rows, ROW_WORDS, RECORD_WORDS, BLOCK_T, BLOCK_W)
                    step += 1
                tile = zero
                while tile < num_tiles:
                    _dispatch_copy_fields(tile, begins, ends, tiles, tiles_before, region, recv_scales_ptr,
                                          recv_topk_ptr, recv_weights_ptr, recv_src_ptr, rank, num_local_experts,
                                          num_scales, num_topk, capacity, num_out_rows, ROW_WORDS, RECORD_WORDS,
                                          S_PAD, K_PAD, BLOCK_T, HAS_SCALES, HAS_TOPK)
                    tile += 1
            row_lo = row_hi
            segment = segment_end
        # every peer's final flags, also where no rows flow: keeps the ranks at most one operation apart
        ready, failed = _wait_channels(flags, flag_ok, peer_ok, num_channels - 1, ready, e, num_channels, failed,
                                       err_addr_ptr, _phase_dispatch, rank, budget, R_PAD, USE_TIMER)
    end_operation(epoch_ptr, arrivals_ptr, e)


# ---------------------------------------------------------------- combine
@triton.jit
def _combine_push_chunk(step, begins, ends, tiles, tiles_before, x_block, slot_block, bases, x_ptr, capacity,
                        HIDDEN: tl.constexpr, RECORD_ELEMS: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_H: tl.constexpr):
    """Step `step` of pushing rows [begins[h], ends[h]) of every home h's block (x rows x_block[h] + i) to h's
    combine region (`bases`: every rank's, slots slot_block[h] + i): tile step // CHUNKS, chunk step % CHUNKS."""
    CHUNKS: tl.constexpr = (HIDDEN + BLOCK_H - 1) // BLOCK_H
    idx, row_ok, pick = _pick_tile(step // CHUNKS, begins, ends, tiles, tiles_before, BLOCK_T)
    slots = (tl.sum(tl.where(pick, slot_block, 0), axis=0) + idx).to(tl.int64)
    row_ok = row_ok & (slots < capacity)
    rows = (tl.sum(tl.where(pick, x_block, 0), axis=0) + idx).to(tl.int64)
    region = tl.multiple_of(tl.sum(tl.where(pick, bases, 0), axis=0).to(tl.pointer_type(tl.bfloat16)), 16)
    cols = (step % CHUNKS) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = row_ok[:, None] & (cols < HIDDEN)[None, :]
    data = tl.load(x_ptr + rows[:, None] * HIDDEN + cols[None, :], mask=ok)
    tl.store(region + slots[:, None] * RECORD_ELEMS + cols[None, :], data, mask=ok)


@triton.jit
def _combine_push_weights(tile, begins, ends, tiles, tiles_before, x_block, slot_block, bases, weights_ptr,
                          num_topk, capacity, HIDDEN: tl.constexpr, RECORD_ELEMS: tl.constexpr, K_PAD: tl.constexpr,
                          BLOCK_T: tl.constexpr):
    """The top-k weights of tile `tile` of the rows `_combine_push_chunk` pushes, after each row."""
    idx, row_ok, pick = _pick_tile(tile, begins, ends, tiles, tiles_before, BLOCK_T)
    slots = (tl.sum(tl.where(pick, slot_block, 0), axis=0) + idx).to(tl.int64)
    row_ok = row_ok & (slots < capacity)
    rows = (tl.sum(tl.where(pick, x_block, 0), axis=0) + idx).to(tl.int64)
    ks = tl.arange(0, K_PAD)
    k_ok = row_ok[:, None] & (ks < num_topk)[None, :]
    weights = tl.load(weights_ptr + rows[:, None] * num_topk + ks[None, :], mask=k_ok)
    region = (tl.sum(tl.where(pick, bases, 0), axis=0) + HIDDEN * 2).to(tl.pointer_type(tl.float32))
    tl.store(region + slots[:, None] * (RECORD_ELEMS // 2) + ks[None, :], weights, mask=k_ok)


@triton.jit
def _combine_sources(start, last, send_head_ptr, slot_base, self_row0, rank, NUM_RANKS: tl.constexpr,
                     R_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """Tokens start + [0, BLOCK_T) below `last`, and where each (token, rank) row is: a slot of the staging
    region (peer j's row of token t at slot_base[j] + send_head[t, j]) or, for this rank, a row of x
    (self_row0 + send_head[t, rank]); send_head -1: no row. -> (tokens, which are valid, rows, send_head)."""
    ranks = tl.arange(0, R_PAD)
    toks = start + tl.arange(0, BLOCK_T)
    tok_ok = toks < last
    head_ptrs = send_head_ptr + toks[:, None].to(tl.int64) * NUM_RANKS + ranks[None, :]
    head = tl.load(head_ptrs, mask=tok_ok[:, None] & (ranks < NUM_RANKS)[None, :], other=-1)
    return toks.to(tl.int64), tok_ok, tl.where(ranks[None, :] == rank, self_row0, slot_base[None, :]) + head, head


@triton.jit
def _combine_reduce_chunk(chunk, toks64, tok_ok, where, head, x_ptr, bias0_ptr, bias1_ptr, out_ptr, region, rank,
                          NUM_RANKS: tl.constexpr, R_PAD: tl.constexpr, HIDDEN: tl.constexpr,
                          RECORD_ELEMS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                          HAS_BIAS0: tl.constexpr, HAS_BIAS1: tl.constexpr, USE_TIMER: tl.constexpr):
    """Chunk `chunk` of a tile's tokens (`_combine_sources`): bias0 + bias1 + the rows of destination ranks
    ascending, in float32, one rounding to bf16 (on a GPU the hardware's round-to-nearest-even cast; the
    interpreter's cast truncates, so there it is spelled out)."""
    ranks = tl.arange(0, R_PAD)
    cols = chunk * BLOCK_H + tl.arange(0, BLOCK_H)
    if HIDDEN % BLOCK_H == 0:  # whole chunks: masks by row only, constant along a row
        col_ok = tl.full([BLOCK_H], 1, tl.int1)
    else:
        col_ok = cols < HIDDEN
    ok = tok_ok[:, None] & col_ok[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    if HAS_BIAS0:
        acc += tl.load(bias0_ptr + toks64[:, None] * HIDDEN + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS1:
        acc += tl.load(bias1_ptr + toks64[:, None] * HIDDEN + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    for j in tl.static_range(NUM_RANKS):  # canonical order: destination ranks ascending
        pick = ranks[None, :] == j
        row = tl.sum(tl.where(pick, where, 0), axis=1).to(tl.int64)
        has = tok_ok & (tl.max(tl.where(pick, head, -1), axis=1) >= 0)
        # one unconditional load per rank (a per-row pointer select, not a branch) lets the loop be pipelined
        row_ptrs = tl.where(j == rank, x_ptr + row * HIDDEN, region + row * RECORD_ELEMS)
        acc += tl.load(row_ptrs[:, None] + cols[None, :], mask=has[:, None] & col_ok[None, :], other=0.0,
                       cache_modifier=".cg").to(tl.float32)
    if USE_TIMER:
        rounded = acc.to(tl.bfloat16)
    else:
        rounded = _to_bf16(acc)
    tl.store(out_ptr + toks64[:, None] * HIDDEN + cols[None, :], rounded, mask=ok)


@triton.jit
def _combine_reduce_weights(toks64, tok_ok, where, head, weights_ptr, out_weights_ptr, weight_region, rank, num_topk,
                            NUM_RANKS: tl.constexpr, R_PAD: tl.constexpr, WEIGHT_STRIDE: tl.constexpr,
                            K_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    """The combined top-k weights of a tile's tokens (`_combine_sources`): the ranks' weight rows summed in
    float32, ranks ascending (a peer's row at weight_region + slot * WEIGHT_STRIDE, 0: num_topk)."""
    ranks = tl.arange(0, R_PAD)
    ks = tl.arange(0, K_PAD)
    ok = tok_ok[:, None] & (ks < num_topk)[None, :]
    acc = tl.zeros([BLOCK_T, K_PAD], tl.float32)
    for j in tl.static_range(NUM_RANKS):
        pick = ranks[None, :] == j
        row = tl.sum(tl.where(pick, where, 0), axis=1).to(tl.int64)
        has = ok & (tl.max(tl.where(pick, head, -1), axis=1) >= 0)[:, None]
        if WEIGHT_STRIDE == 0:
            stride = num_topk
        else:
            stride = WEIGHT_STRIDE
        ptrs = tl.where(j == rank, weights_ptr + row[:, None] * num_topk + ks[None, :],
                        weight_region + row[:, None] * stride + ks[None, :])
        acc += tl.load(ptrs, mask=has, other=0.0, cache_modifier=".cg")
    tl.store(out_weights_ptr + toks64[:, None] * num_topk + ks[None, :], acc, mask=ok)


@triton.jit
def _reduce_tokens(first, last, num_tiles, x_ptr, weights_ptr, bias0_ptr, bias1_ptr, send_head_ptr, out_ptr,
                   out_weights_ptr, slot_base, self_row0, region, weight_region, rank, num_topk,
                   NUM_RANKS: tl.constexpr, R_PAD: tl.constexpr, HIDDEN: tl.constexpr, RECORD_ELEMS: tl.constexpr,
                   WEIGHT_STRIDE: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                   HAS_WEIGHTS: tl.constexpr, HAS_BIAS0: tl.constexpr, HAS_BIAS1: tl.constexpr,
                   USE_TIMER: tl.constexpr, STAGES: tl.constexpr):
    """Reduce tokens [first, last) (`num_tiles` tiles), tile by tile: where the tile's rows are (send_head,
    read once per tile), its chunks, then its top-k weights. On a GPU the loop over a tile's chunks is
    software-pipelined (STAGES); its loads then depend only on values held in registers, so the pipeliner
    stages row data alone, never an index that addresses other loads."""
    CHUNKS: tl.constexpr = (HIDDEN + BLOCK_H - 1) // BLOCK_H
    tile = num_tiles * 0
    while tile < num_tiles:
        toks64, tok_ok, where, head = _combine_sources(first + tile * BLOCK_T, last, send_head_ptr, slot_base,
                                                       self_row0, rank, NUM_RANKS, R_PAD, BLOCK_T)
        if USE_TIMER:  # the interpreter needs constant bounds for tl.range
            for chunk in tl.range(0, CHUNKS, num_stages=STAGES):
                _combine_reduce_chunk(chunk, toks64, tok_ok, where, head, x_ptr, bias0_ptr, bias1_ptr, out_ptr,
                                      region, rank, NUM_RANKS, R_PAD, HIDDEN, RECORD_ELEMS, BLOCK_T, BLOCK_H,
                                      HAS_BIAS0, HAS_BIAS1, USE_TIMER)
        else:
            for chunk in range(CHUNKS):
                _combine_reduce_chunk(chunk, toks64, tok_ok, where, head, x_ptr, bias0_ptr, bias1_ptr, out_ptr,
                                      region, rank, NUM_RANKS, R_PAD, HIDDEN, RECORD_ELEMS, BLOCK_T, BLOCK_H,
                                      HAS_BIAS0, HAS_BIAS1, USE_TIMER)
        if HAS_WEIGHTS:
            _combine_reduce_weights(toks64, tok_ok, where, head, weights_ptr, out_weights_ptr, weight_region, rank,
                                    num_topk, NUM_RANKS, R_PAD, WEIGHT_STRIDE, K_PAD, BLOCK_T)
        tile += 1


COMBINE_NO_SPECIALIZE = ["rank", "num_tokens", "num_channels", "tokens_per_channel", "num_pushers", "publish_every",
                         "num_topk", "capacity", "budget"]


@triton.jit(do_not_specialize=COMBINE_NO_SPECIALIZE)
def ep_combine_kernel(x_ptr, weights_ptr, bias0_ptr, bias1_ptr, in_rank_ptr, send_head_ptr, rank_prefix_ptr,
                      recv_prefix_ptr, out_ptr, out_weights_ptr, data_bases_ptr, half_bytes, signal_bases_ptr,
                      flags_offset, epoch_ptr, arrivals_ptr, err_addr_ptr, rank, num_tokens, num_channels,
                      tokens_per_channel, num_pushers, publish_every, num_topk, capacity, budget,
                      NUM_RANKS: tl.constexpr, R_PAD: tl.constexpr, P_PAD: tl.constexpr, HIDDEN: tl.constexpr,
                      RECORD_ELEMS: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                      REDUCE_BLOCK_T: tl.constexpr, REDUCE_BLOCK_H: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                      HAS_BIAS0: tl.constexpr, HAS_BIAS1: tl.constexpr, USE_TIMER: tl.constexpr, STAGES: tl.constexpr,
                      REDUCE_STAGES: tl.constexpr):
    """Pushers: the rows this rank received from `home` go back to `home`'s combine region, at slot
    sum_{j < rank} n(home -> j) + send_head_home[t, rank]; per segment of the homes' channels, a pusher takes
    an equal contiguous part of every home's rows, homes in ring order from a pusher-dependent start, so
    that a rank's pushers load all its links at once. Receivers reduce an equal contiguous part of this
    rank's tokens of the segment once every pusher of every peer finished it. USE_TIMER: compiled for a
    GPU (timed waits, software-pipelined loops: STAGES for the pushers, REDUCE_STAGES for the reduction)."""
    CHUNKS: tl.constexpr = (HIDDEN + BLOCK_H - 1) // BLOCK_H
    pid = tl.program_id(0)
    e = tl.load(epoch_ptr) + 1
    half_offset = (e % 2) * half_bytes
    ranks = tl.arange(0, R_PAD)
    rank_ok = ranks < NUM_RANKS
    peer_ok = rank_ok & (ranks != rank)
    zero = tl.full((), 0, tl.int32)
    segment = zero  # first channel of the current segment
    if pid < num_pushers:
        # this pusher's flag (sender rank, pusher) on every home
        my_flag = flags_offset + (rank * _max_pushers + pid) * 8
        out_flags = (tl.load(signal_bases_ptr + ranks, mask=rank_ok, other=0) + my_flag).to(tl.pointer_type(tl.int64))
        # home h's rows sit in x from x_block[h]; they go to h's slots from sum over j < rank of n(h -> j)
        lower = rank_ok[:, None] & (ranks < rank)[None, :]
        sums = tl.load(rank_prefix_ptr + ranks[:, None] * NUM_RANKS + ranks[None, :], mask=lower, other=0)
        sums_before = tl.load(rank_prefix_ptr + (ranks[:, None] - 1) * NUM_RANKS + ranks[None, :],
                              mask=lower & (ranks > 0)[:, None], other=0)
        slot_block = tl.sum(sums - sums_before, axis=1)
        bases = tl.load(data_bases_ptr + ranks, mask=rank_ok, other=0) + half_offset  # every rank's region
        row_lo, x_block = _source_rows(rank_prefix_ptr, recv_prefix_ptr, rank, segment, num_channels, NUM_RANKS,
                                       R_PAD)
        while segment < num_channels:
            segment_end = _segment_end(segment, publish_every, num_channels)
            row_hi, x_block = _source_rows(rank_prefix_ptr, recv_prefix_ptr, rank, segment_end, num_channels,
                                           NUM_RANKS, R_PAD)
            begins, ends, tiles, tiles_before = _parts(row_lo, row_hi, pid, num_pushers, peer_ok, rank + 1 + pid,
                                                       NUM_RANKS, R_PAD, BLOCK_T)
            num_tiles = tl.sum(tiles, axis=0)
            if USE_TIMER:  # software-pipelined loops (the interpreter needs constant bounds for tl.range)
                for step in tl.range(0, num_tiles * CHUNKS, num_stages=STAGES):
                    _combine_push_chunk(step, begins, ends, tiles, tiles_before, x_block, slot_block, bases, x_ptr,
                                        capacity, HIDDEN, RECORD_ELEMS, BLOCK_T, BLOCK_H)
                if HAS_WEIGHTS:
                    for tile in tl.range(0, num_tiles, num_stages=STAGES):
                        _combine_push_weights(tile, begins, ends, tiles, tiles_before, x_block, slot_block, bases,
                                              weights_ptr, num_topk, capacity, HIDDEN, RECORD_ELEMS, K_PAD, BLOCK_T)
            else:
                step = zero
                while step < num_tiles * CHUNKS:
                    _combine_push_chunk(step, begins, ends, tiles, tiles_before, x_block, slot_block, bases, x_ptr,
                                        capacity, HIDDEN, RECORD_ELEMS, BLOCK_T, BLOCK_H)
                    step += 1
                if HAS_WEIGHTS:
                    tile = zero
                    while tile < num_tiles:
                        _combine_push_weights(tile, begins, ends, tiles, tiles_before, x_block, slot_block, bases,
                                              weights_ptr, num_topk, capacity, HIDDEN, RECORD_ELEMS, K_PAD, BLOCK_T)
                        tile += 1
            _publish(out_flags, tl.zeros([R_PAD], tl.int64) + ((tag(e) << 32) | segment_end.to(tl.int64)), peer_ok)
            row_lo = row_hi
            segment = segment_end
    else:
        worker = pid - num_pushers
        num_workers = tl.num_programs(0) - num_pushers
        failed = failed_before(err_addr_ptr)
        pushers = tl.arange(0, P_PAD)
        flags = (tl.load(signal_bases_ptr + rank) + flags_offset
                 + (ranks[:, None] * _max_pushers + pushers[None, :]) * 8).to(tl.pointer_type(tl.int64))
        flag_ok = peer_ok[:, None] & (pushers < num_pushers)[None, :]
        upto = tl.load(rank_prefix_ptr + rank * NUM_RANKS + ranks, mask=rank_ok, other=0)
        before = tl.load(rank_prefix_ptr + (rank - 1) * NUM_RANKS + ranks, mask=rank_ok & (rank > 0), other=0)
        sent_to = upto - before  # n(rank -> j)
        # where peer j's rows start in my combine region: sum over j' < j of n(rank -> j')
        slot_base = tl.sum(tl.where(ranks[None, :] < ranks[:, None], sent_to[None, :], 0), axis=1)
        self_row0 = tl.sum(tl.where(ranks == rank, before, 0), axis=0)
        region_base = tl.load(data_bases_ptr + rank) + half_offset
        region = tl.multiple_of(region_base.to(tl.pointer_type(tl.bfloat16)), 16)
        weight_region = (region_base + HIDDEN * 2).to(tl.pointer_type(tl.float32))
        ready = tl.zeros([R_PAD], tl.int32)  # channels every pusher of a peer finished, as last seen
        while segment < num_channels:
            segment_end = _segment_end(segment, publish_every, num_channels)
            lo, hi = _channel_tokens(segment, segment_end, tokens_per_channel, num_tokens)
            first, last = _share(lo, hi, worker, num_workers)
            if first < last:
                ready, failed = _wait_channels(flags, flag_ok, peer_ok, segment_end - 1, ready, e, num_channels,
                                               failed, err_addr_ptr, _phase_combine, rank, budget, R_PAD, USE_TIMER)
                num_tiles = tl.where(failed == 0, tl.cdiv(last - first, REDUCE_BLOCK_T), 0)
                _reduce_tokens(first, last, num_tiles, x_ptr, weights_ptr, bias0_ptr, bias1_ptr, send_head_ptr,
                               out_ptr, out_weights_ptr, slot_base, self_row0, region, weight_region, rank, num_topk,
                               NUM_RANKS, R_PAD, HIDDEN, RECORD_ELEMS, RECORD_ELEMS // 2, K_PAD, REDUCE_BLOCK_T,
                               REDUCE_BLOCK_H, HAS_WEIGHTS, HAS_BIAS0, HAS_BIAS1, USE_TIMER, REDUCE_STAGES)
            segment = segment_end
        # every peer's final flags, also where no rows flow: keeps the ranks at most one operation apart
        ready, failed = _wait_channels(flags, flag_ok, peer_ok, num_channels - 1, ready, e, num_channels, failed,
                                       err_addr_ptr, _phase_combine, rank, budget, R_PAD, USE_TIMER)
    end_operation(epoch_ptr, arrivals_ptr, e)


# ---------------------------------------------------------------- combine, rows moved by copy engine
@triton.jit
def _wait_parts(flag_ptrs, needed, seq, seq_next, failed, err_addr_ptr, phase, rank, budget, R_PAD: tl.constexpr,
                USE_TIMER: tl.constexpr):
    """Wait (bounded) until every source in `needed` wrote `seq` (this operation) or `seq_next` (it already
    went on to the next one) into its flag here (`flag_ptrs` [R_PAD]). A timeout is recorded in the error
    word, naming the first source behind. -> failed"""
    ranks = tl.arange(0, R_PAD)
    values = acquire_flags(flag_ptrs, needed, USE_TIMER)
    behind = needed & (values != seq) & (values != seq_next)
    if (tl.max(behind.to(tl.int32), axis=0) > 0) & (failed == 0):
        start = now_ns(USE_TIMER)
        spins = 0
        alive = True
        while (tl.max(behind.to(tl.int32), axis=0) > 0) & alive:
            values = acquire_flags(flag_ptrs, behind, USE_TIMER)
            behind = behind & (values != seq) & (values != seq_next)
            spins += 1
            alive = within_budget(start, spins, budget, USE_TIMER)
        if tl.max(behind.to(tl.int32), axis=0) > 0:
            record_timeout(err_addr_ptr, phase, rank, tl.min(tl.where(behind, ranks, R_PAD), axis=0))
            failed = 1
    tl.debug_barrier()  # threads that did not acquire read the rows only after those that did
    return failed


COMBINE_REDUCE_NO_SPECIALIZE = ["rank", "num_tokens", "num_channels", "tokens_per_channel", "num_parts", "num_topk",
                                "seq", "seq_next", "budget"]


@triton.jit(do_not_specialize=COMBINE_REDUCE_NO_SPECIALIZE)
def ep_combine_reduce_kernel(x_ptr, weights_ptr, bias0_ptr, bias1_ptr, send_head_ptr, rank_prefix_ptr, out_ptr,
                             out_weights_ptr, rows_ptr, peer_weights_ptr, flags_ptr, seq, seq_next, err_addr_ptr,
                             rank, num_tokens, num_channels, tokens_per_channel, num_parts, num_topk, budget,
                             NUM_RANKS: tl.constexpr, R_PAD: tl.constexpr, MAX_PARTS: tl.constexpr,
                             HIDDEN: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                             REDUCE_BLOCK_H: tl.constexpr, HAS_WEIGHTS: tl.constexpr, HAS_BIAS0: tl.constexpr,
                             HAS_BIAS1: tl.constexpr, USE_TIMER: tl.constexpr, STAGES: tl.constexpr):
    """The combine's reduction when the peers' rows arrive by copy engine (the host's `copy_engine`): peer p
    copies the rows it received from this rank, in order, to `rows_ptr` from slot sum_{j < p, j != rank}
    n(rank -> j) (weights likewise to `peer_weights_ptr`), in `num_parts` parts of this rank's channels,
    and writes `seq` into flags_ptr[p * MAX_PARTS + part] behind each part. Every program reduces an equal
    contiguous part of each part's tokens once every peer's flag of that part is up: bias0 + bias1 + the
    rows of ranks ascending (this rank's straight from x), in float32, one rounding to bf16."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    ranks = tl.arange(0, R_PAD)
    rank_ok = ranks < NUM_RANKS
    peer_ok = rank_ok & (ranks != rank)
    zero = tl.full((), 0, tl.int32)
    failed = failed_before(err_addr_ptr)
    upto = tl.load(rank_prefix_ptr + rank * NUM_RANKS + ranks, mask=rank_ok, other=0)
    before = tl.load(rank_prefix_ptr + (rank - 1) * NUM_RANKS + ranks, mask=rank_ok & (rank > 0), other=0)
    peer_sent = tl.where(peer_ok, upto - before, 0)  # n(rank -> p) for the peers
    slot_base = tl.sum(tl.where(ranks[None, :] < ranks[:, None], peer_sent[None, :], 0), axis=1)
    self_row0 = tl.sum(tl.where(ranks == rank, before, 0), axis=0)
    part = zero
    while part < num_parts:
        first_channel, end_channel = _share(0, num_channels, part, num_parts)
        lo, hi = _channel_tokens(first_channel, end_channel, tokens_per_channel, num_tokens)
        first, last = _share(lo, hi, pid, num_programs)
        if first < last:
            failed = _wait_parts(flags_ptr + ranks * MAX_PARTS + part, peer_ok, seq, seq_next, failed, err_addr_ptr,
                                 _phase_combine, rank, budget, R_PAD, USE_TIMER)
            num_tiles = tl.where(failed == 0, tl.cdiv(last - first, BLOCK_T), 0)
            _reduce_tokens(first, last, num_tiles, x_ptr, weights_ptr, bias0_ptr, bias1_ptr, send_head_ptr, out_ptr,
                           out_weights_ptr, slot_base, self_row0, rows_ptr, peer_weights_ptr, rank, num_topk,
                           NUM_RANKS, R_PAD, HIDDEN, HIDDEN, 0, K_PAD, BLOCK_T, REDUCE_BLOCK_H, HAS_WEIGHTS,
                           HAS_BIAS0, HAS_BIAS1, USE_TIMER, STAGES)
        part += 1
    # every peer's last flag, also where no rows flow: keeps the ranks at most one operation apart
    failed = _wait_parts(flags_ptr + ranks * MAX_PARTS + num_parts - 1, peer_ok, seq, seq_next, failed, err_addr_ptr,
                         _phase_combine, rank, budget, R_PAD, USE_TIMER)
