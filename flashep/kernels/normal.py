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
num_sms // 2`): pushers take the tiles of channel 0, then channel 1, ..., dealt round-robin (tile g goes to
pusher g % num_pushers, counting on across channels so that every pusher gets the same share). A
pusher publishes `(epoch << 32) | channels it finished` to every peer after every `publish_every`
channels (and after the first and each of the last channels) and at the end: one CTA barrier and one
release atomic per peer, rarely, so its stores stream.
Receivers deal the tiles of the receive side round-robin in the same channel order and wait, per
channel, until every pusher of the peers they need has passed it: one vector of acquire atomics over
(source, pusher) flags. So all pushers of a rank move through the channels together and the receivers
follow a channel behind. At the end every receiver sees every peer's final flag of the epoch, which
keeps peers at most one operation apart (docs/design.md, "Symmetric heap and signalling"); data lives in
half `epoch % 2` of the data heap.

Heap regions (byte offsets from the backend):
- signal heap: notify flags int64[R] (one per source), dispatch flags int64[R, MAX_PUSHERS] (source
  rank, pusher), combine flags int64[R, MAX_PUSHERS] (sender rank, pusher), notify slots
  int32[R, MAX_CHANNELS + MAX_LOCAL_EXPERTS + R + 1] (one per source).
- data heap, per half, one record per row. Dispatch record (4-byte words): the row, its scales, top-k
  ids, top-k weights (float bits), source token index. Combine record: the bf16 row, then the float32
  weights.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .sync import PHASE_COMBINE, PHASE_DISPATCH, PHASE_NOTIFY, now_ns, record_timeout, signal, wait_ge

MAX_CHANNELS = 128  # num_sms <= 256
MAX_PUSHERS = 2 * MAX_CHANNELS  # at most num_sms - 1 programs push
MAX_LOCAL_EXPERTS = 1024
RECORD_ALIGN = 64  # bytes; keeps record strides divisible by 16 elements for vectorised access
SCAN_TOKENS = 256  # tokens per step when a pusher counts the earlier tokens of its channel

_max_pushers = tl.constexpr(MAX_PUSHERS)
_scan_tokens = tl.constexpr(SCAN_TOKENS)
_phase_dispatch = tl.constexpr(PHASE_DISPATCH)
_phase_combine = tl.constexpr(PHASE_COMBINE)
_phase_notify = tl.constexpr(PHASE_NOTIFY)

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
    """Channels a pusher finished in epoch e, from its flag: an older epoch means none yet, a later one
    that the pusher already finished epoch e."""
    epoch = values >> 32
    done = tl.where(epoch > e, num_channels, (values & 0xFFFFFFFF).to(tl.int32))
    return tl.where(epoch < e, 0, done)


@triton.jit
def _wait_channels(flag_ptrs, flag_ok, needed, channel, ready, e, num_channels, failed, err_ptr, phase, rank, budget,
                   R_PAD: tl.constexpr, USE_TIMER: tl.constexpr):
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
            values = tl.atomic_add(flag_ptrs, 0, mask=flag_ok & behind[:, None], sem="acquire", scope="sys")
            done = tl.min(tl.where(flag_ok, _channels_done(values, e, num_channels), num_channels), axis=1)
            ready = tl.where(behind, done, ready)
            behind = needed & (ready <= channel)
            spins += 1
            if USE_TIMER:
                alive = (now_ns(USE_TIMER) - start) < budget
            else:
                alive = spins < budget
        tl.debug_barrier()  # threads that did not acquire read the rows only after those that did
        if tl.max(behind.to(tl.int32), axis=0) > 0:
            record_timeout(err_ptr, phase, rank, tl.min(tl.where(behind, ranks, R_PAD), axis=0))
            failed = 1
    return ready, failed


@triton.jit
def _peer_blocks(rank_prefix_ptr, recv_prefix_ptr, rank, channel, num_channels, NUM_RANKS: tl.constexpr,
                 R_PAD: tl.constexpr):
    """For every rank p, the rows p sends to `rank` in p's channel `channel`: (count, first row in rank's
    receive order, first slot in p's combine region for these rows when they come back), as [R_PAD]
    vectors."""
    peers = tl.arange(0, R_PAD)
    valid = peers < NUM_RANKS
    prev = tl.load(rank_prefix_ptr + (peers - 1) * NUM_RANKS + rank, mask=valid & (peers > 0), other=0)
    total = tl.load(rank_prefix_ptr + peers * NUM_RANKS + rank, mask=valid, other=0) - prev
    begin = tl.load(recv_prefix_ptr + peers * num_channels + channel, mask=valid, other=0)
    has_next = valid & (channel + 1 < num_channels)
    end = tl.load(recv_prefix_ptr + peers * num_channels + channel + 1, mask=has_next, other=0)
    count = tl.where(has_next, end, total) - begin
    # p's combine region holds the rows of lower ranks first: sum over j < rank of n(p -> j)
    lower = valid[:, None] & (peers < rank)[None, :]
    upto = tl.load(rank_prefix_ptr + peers[:, None] * NUM_RANKS + peers[None, :], mask=lower, other=0)
    below = tl.load(rank_prefix_ptr + (peers[:, None] - 1) * NUM_RANKS + peers[None, :],
                    mask=lower & (peers > 0)[:, None], other=0)
    return count, prev + begin, tl.sum(upto - below, axis=1) + begin


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
        signal(_heap_ptr(signal_bases_ptr, peer, notify_flags_offset + rank * 8, tl.int64, 8), e << 32)

    err_ptr = tl.load(err_addr_ptr).to(tl.pointer_type(tl.int32))
    failed = tl.load(err_ptr + 3, volatile=True)
    flags = _heap_ptr(signal_bases_ptr, rank, notify_flags_offset, tl.int64, 8)
    for src in tl.static_range(NUM_RANKS):
        if failed == 0:
            value = wait_ge(flags + src, e << 32, budget, USE_TIMER)
            if value < (e << 32):
                record_timeout(err_ptr, _phase_notify, rank, src)
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


# ---------------------------------------------------------------- dispatch
@triton.jit
def _dispatch_push_tile(start, channel_begin, channel_end, channel_prefix, block_start, half_offset,
                        x_ptr, scales_ptr, scale_stride_t, scale_stride_s, topk_ptr, weights_ptr, in_rank_ptr,
                        recv_x_ptr, recv_scales_ptr, recv_topk_ptr, recv_weights_ptr, recv_src_ptr, send_head_ptr,
                        data_bases_ptr, rank, num_local_experts, num_scales, num_topk, capacity, num_out_rows,
                        NUM_RANKS: tl.constexpr, R_PAD: tl.constexpr, ROW_WORDS: tl.constexpr,
                        RECORD_WORDS: tl.constexpr, S_PAD: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_W: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_TOPK: tl.constexpr,
                        WRITE_SEND_HEAD: tl.constexpr, STAGES: tl.constexpr):
    """Push tokens [start, start + BLOCK_T) of a channel, each loaded once, to every destination at its final
    row; rows for this rank go straight into the output tensors. A token's position among the tokens sent
    to j comes from `send_head` (cached dispatch) or is counted and written there."""
    ranks = tl.arange(0, R_PAD)
    rank_ok = ranks < NUM_RANKS
    toks = start + tl.arange(0, BLOCK_T)
    tok_ok = toks < channel_end
    tile_ok = tok_ok[:, None] & rank_ok[None, :]
    toks64 = toks.to(tl.int64)
    offsets = toks64[:, None] * NUM_RANKS + ranks[None, :]
    chosen = tl.load(in_rank_ptr + offsets, mask=tile_ok, other=0).to(tl.int32)
    if WRITE_SEND_HEAD:
        # the channel's earlier tokens to j, then an inclusive prefix over the tile's tokens as a masked sum
        # (tl.cumsum's lowering fails on some tiny tiles in Triton 3.6)
        before = channel_prefix
        scan = channel_begin
        while scan < start:
            scan_toks = scan + tl.arange(0, _scan_tokens)
            scan_ok = (scan_toks < start)[:, None] & rank_ok[None, :]
            seen = tl.load(in_rank_ptr + scan_toks[:, None].to(tl.int64) * NUM_RANKS + ranks[None, :], mask=scan_ok,
                           other=0)
            before += tl.sum(seen.to(tl.int32), axis=0)
            scan += _scan_tokens
        earlier = (tl.arange(0, BLOCK_T)[None, :] <= tl.arange(0, BLOCK_T)[:, None]).to(tl.int32)
        pos = before[None, :] + tl.sum(earlier[:, :, None] * chosen[None, :, :], axis=1) - 1
        tl.store(send_head_ptr + offsets, tl.where(chosen != 0, pos, -1), mask=tile_ok)
    else:
        pos = tl.load(send_head_ptr + offsets, mask=tile_ok, other=0)
    rows = block_start[None, :] + pos  # final row on destination j
    for c0 in tl.range(0, ROW_WORDS, BLOCK_W, num_stages=STAGES):
        cols = c0 + tl.arange(0, BLOCK_W)
        col_ok = cols < ROW_WORDS
        data = tl.load(x_ptr + toks64[:, None] * ROW_WORDS + cols[None, :], mask=tok_ok[:, None] & col_ok[None, :])
        for step in tl.static_range(NUM_RANKS):  # self first, then the peers in ring order (spreads the links)
            dst = (rank + step) % NUM_RANKS
            pick = ranks[None, :] == dst
            dst_rows = tl.sum(tl.where(pick, rows, 0), axis=1).to(tl.int64)
            dst_ok = (tl.sum(tl.where(pick, chosen, 0), axis=1) != 0)[:, None] & col_ok[None, :]
            if step == 0:
                tl.store(recv_x_ptr + dst_rows[:, None] * ROW_WORDS + cols[None, :], data,
                         mask=dst_ok & (dst_rows < num_out_rows)[:, None])
            else:
                region = (tl.load(data_bases_ptr + dst) + half_offset).to(tl.pointer_type(tl.int32))
                region = tl.multiple_of(region, 16)
                tl.store(region + dst_rows[:, None] * RECORD_WORDS + cols[None, :], data,
                         mask=dst_ok & (dst_rows < capacity)[:, None])
    ks = tl.arange(0, K_PAD)
    k_ok = tok_ok[:, None] & (ks < num_topk)[None, :]
    ss = tl.arange(0, S_PAD)
    s_ok = tok_ok[:, None] & (ss < num_scales)[None, :]
    if HAS_TOPK:
        ids = tl.load(topk_ptr + toks64[:, None] * num_topk + ks[None, :], mask=k_ok, other=-1).to(tl.int32)
        weights = tl.load(weights_ptr + toks64[:, None] * num_topk + ks[None, :], mask=k_ok, other=0.0)
        local, local_weights = _localize(ids, weights, rank, num_local_experts)
    if HAS_SCALES:
        scales = tl.load(scales_ptr + toks64[:, None] * scale_stride_t + ss[None, :] * scale_stride_s, mask=s_ok)
    for step in tl.static_range(NUM_RANKS):
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
            row_ok = row_ok & (dst_rows < capacity)
            region = (tl.load(data_bases_ptr + dst) + half_offset).to(tl.pointer_type(tl.int32))
            record = region + dst_rows * RECORD_WORDS + ROW_WORDS
            if HAS_SCALES:
                tl.store(record[:, None] + ss[None, :], scales, mask=row_ok[:, None] & s_ok)
            record += num_scales
            if HAS_TOPK:
                tl.store(record[:, None] + ks[None, :], ids, mask=row_ok[:, None] & k_ok)
                tl.store(record[:, None] + num_topk + ks[None, :], weights.to(tl.int32, bitcast=True),
                         mask=row_ok[:, None] & k_ok)
            tl.store(record + 2 * num_topk, toks, mask=row_ok)


@triton.jit
def _dispatch_copy_tile(begin, end, region, recv_x_ptr, recv_scales_ptr, recv_topk_ptr, recv_weights_ptr,
                        recv_src_ptr, rank, num_local_experts, num_scales, num_topk, capacity, num_out_rows,
                        ROW_WORDS: tl.constexpr, RECORD_WORDS: tl.constexpr, S_PAD: tl.constexpr,
                        K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, HAS_SCALES: tl.constexpr,
                        HAS_TOPK: tl.constexpr, STAGES: tl.constexpr):
    """Copy received rows [begin, min(begin + BLOCK_T, end)) from the local receive region into the outputs
    (the row index is the same in both), rewriting top-k ids to local ones."""
    rows = begin + tl.arange(0, BLOCK_T)
    row_ok = (rows < end) & (rows < capacity) & (rows < num_out_rows)
    rows64 = rows.to(tl.int64)
    for c0 in tl.range(0, ROW_WORDS, BLOCK_W, num_stages=STAGES):
        cols = c0 + tl.arange(0, BLOCK_W)
        ok = row_ok[:, None] & (cols < ROW_WORDS)[None, :]
        data = tl.load(region + rows64[:, None] * RECORD_WORDS + cols[None, :], mask=ok, cache_modifier=".cg")
        tl.store(recv_x_ptr + rows64[:, None] * ROW_WORDS + cols[None, :], data, mask=ok)
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


DISPATCH_NO_SPECIALIZE = ["scale_stride_t", "scale_stride_s", "rank", "num_tokens", "num_channels",
                          "tokens_per_channel", "num_pushers", "publish_every", "num_local_experts", "num_scales",
                          "num_topk", "capacity", "num_out_rows", "budget"]


@triton.jit(do_not_specialize=DISPATCH_NO_SPECIALIZE)
def ep_dispatch_kernel(x_ptr, scales_ptr, scale_stride_t, scale_stride_s, topk_ptr, weights_ptr, in_rank_ptr,
                       rank_prefix_ptr, send_prefix_ptr, recv_prefix_ptr,
                       recv_x_ptr, recv_scales_ptr, recv_topk_ptr, recv_weights_ptr, recv_src_ptr, send_head_ptr,
                       data_bases_ptr, half_bytes, signal_bases_ptr, flags_offset, epoch_ptr, err_addr_ptr,
                       rank, num_tokens, num_channels, tokens_per_channel, num_pushers, publish_every,
                       num_local_experts, num_scales, num_topk, capacity, num_out_rows, budget,
                       NUM_RANKS: tl.constexpr, R_PAD: tl.constexpr, P_PAD: tl.constexpr, ROW_WORDS: tl.constexpr,
                       RECORD_WORDS: tl.constexpr, S_PAD: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_W: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_TOPK: tl.constexpr,
                       WRITE_SEND_HEAD: tl.constexpr, WORST: tl.constexpr, USE_TIMER: tl.constexpr,
                       STAGES: tl.constexpr):
    """Rows are 4-byte words (`x_ptr`/`recv_x_ptr` are int32 views). Row i of the receive order sits at the
    same index in the receive region and in `recv_x`. Pushers: tiles of this rank's tokens. Receivers:
    tiles of the rows each peer sends here, per channel of that peer."""
    pid = tl.program_id(0)
    e = tl.load(epoch_ptr) + 1
    half_offset = (e % 2) * half_bytes
    ranks = tl.arange(0, R_PAD)
    rank_ok = ranks < NUM_RANKS
    peer_ok = rank_ok & (ranks != rank)
    zero = tl.full((), 0, tl.int32)
    channel = zero
    first_tile = zero  # round-robin index of the current channel's first tile
    if pid < num_pushers:
        # this pusher's flag (source rank, pusher) on every peer
        my_flag = flags_offset + (rank * _max_pushers + pid) * 8
        out_flags = (tl.load(signal_bases_ptr + ranks, mask=rank_ok, other=0) + my_flag).to(tl.pointer_type(tl.int64))
        block_start = tl.load(rank_prefix_ptr + (rank - 1) * NUM_RANKS + ranks, mask=rank_ok & (rank > 0), other=0)
        tile = zero + pid
        while channel < num_channels:
            begin = channel * tokens_per_channel
            end = tl.minimum(begin + tokens_per_channel, num_tokens)
            tiles = tl.cdiv(tl.maximum(end - begin, 0), BLOCK_T)
            # tokens of earlier channels sent to each rank
            channel_prefix = tl.load(send_prefix_ptr + ranks * num_channels + channel - 1,
                                     mask=rank_ok & (channel > 0), other=0)
            while tile < first_tile + tiles:
                _dispatch_push_tile(begin + (tile - first_tile) * BLOCK_T, begin, end, channel_prefix, block_start,
                                    half_offset, x_ptr, scales_ptr, scale_stride_t, scale_stride_s, topk_ptr,
                                    weights_ptr, in_rank_ptr, recv_x_ptr, recv_scales_ptr, recv_topk_ptr,
                                    recv_weights_ptr, recv_src_ptr, send_head_ptr, data_bases_ptr, rank,
                                    num_local_experts, num_scales, num_topk, capacity, num_out_rows,
                                    NUM_RANKS, R_PAD, ROW_WORDS, RECORD_WORDS, S_PAD, K_PAD, BLOCK_T, BLOCK_W,
                                    HAS_SCALES, HAS_TOPK, WRITE_SEND_HEAD, STAGES)
                tile += num_pushers
            first_tile += tiles
            channel += 1
            if _publish_now(channel, publish_every, num_channels):
                _publish(out_flags, tl.zeros([R_PAD], tl.int64) + ((e << 32) | channel.to(tl.int64)), peer_ok)
    else:
        worker = pid - num_pushers
        num_workers = tl.num_programs(0) - num_pushers
        err_ptr = tl.load(err_addr_ptr).to(tl.pointer_type(tl.int32))
        failed = tl.load(err_ptr + 3, volatile=True)
        region = _heap_ptr(data_bases_ptr, rank, half_offset, tl.int32, 16)
        pushers = tl.arange(0, P_PAD)
        flags = (tl.load(signal_bases_ptr + rank) + flags_offset
                 + (ranks[:, None] * _max_pushers + pushers[None, :]) * 8).to(tl.pointer_type(tl.int64))
        flag_ok = peer_ok[:, None] & (pushers < num_pushers)[None, :]
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
        tile = zero + worker
        while channel < num_channels:
            # tiles of this channel: source by source, each source's rows in BLOCK_T tiles
            count, row0, _ = _peer_blocks(rank_prefix_ptr, recv_prefix_ptr, rank, channel, num_channels, NUM_RANKS,
                                          R_PAD)
            tiles = tl.where(peer_ok, tl.cdiv(count, BLOCK_T), 0)
            tiles_before = tl.sum(tl.where(ranks[None, :] < ranks[:, None], tiles[None, :], 0), axis=1)
            while tile < first_tile + tl.sum(tiles, axis=0):
                index = tile - first_tile
                pick = peer_ok & (tiles_before <= index) & (index < tiles_before + tiles)
                ready, failed = _wait_channels(flags, flag_ok, pick, channel, ready, e, num_channels, failed, err_ptr,
                                               _phase_dispatch, rank, budget, R_PAD, USE_TIMER)
                if failed == 0:
                    first_row = tl.sum(tl.where(pick, row0 + (index - tiles_before) * BLOCK_T, 0), axis=0)
                    _dispatch_copy_tile(first_row, tl.sum(tl.where(pick, row0 + count, 0), axis=0), region,
                                        recv_x_ptr, recv_scales_ptr, recv_topk_ptr, recv_weights_ptr, recv_src_ptr,
                                        rank, num_local_experts, num_scales, num_topk, capacity, num_out_rows,
                                        ROW_WORDS, RECORD_WORDS, S_PAD, K_PAD, BLOCK_T, BLOCK_W, HAS_SCALES,
                                        HAS_TOPK, STAGES)
                tile += num_workers
            first_tile += tl.sum(tiles, axis=0)
            channel += 1
        # every peer's final flags, also where no rows flow: keeps the ranks at most one operation apart
        ready, failed = _wait_channels(flags, flag_ok, peer_ok, num_channels - 1, ready, e, num_channels, failed,
                                       err_ptr, _phase_dispatch, rank, budget, R_PAD, USE_TIMER)


# ---------------------------------------------------------------- combine
@triton.jit
def _combine_push_tile(begin, end, x_row0, slot0, home, half_offset, x_ptr, weights_ptr, data_bases_ptr, num_topk,
                       capacity, HIDDEN: tl.constexpr, RECORD_ELEMS: tl.constexpr, K_PAD: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                       STAGES: tl.constexpr):
    """Push rows x_row0 + [begin, min(begin + BLOCK_T, end)) of x to `home`'s combine region at slots slot0 +
    the same offsets."""
    idx = begin + tl.arange(0, BLOCK_T)
    slots = (slot0 + idx).to(tl.int64)
    row_ok = (idx < end) & (slots < capacity)
    rows = (x_row0 + idx).to(tl.int64)
    home_base = tl.load(data_bases_ptr + home) + half_offset
    region = tl.multiple_of(home_base.to(tl.pointer_type(tl.bfloat16)), 16)
    for c0 in tl.range(0, HIDDEN, BLOCK_H, num_stages=STAGES):
        cols = c0 + tl.arange(0, BLOCK_H)
        ok = row_ok[:, None] & (cols < HIDDEN)[None, :]
        data = tl.load(x_ptr + rows[:, None] * HIDDEN + cols[None, :], mask=ok)
        tl.store(region + slots[:, None] * RECORD_ELEMS + cols[None, :], data, mask=ok)
    if HAS_WEIGHTS:
        ks = tl.arange(0, K_PAD)
        k_ok = row_ok[:, None] & (ks < num_topk)[None, :]
        weights = tl.load(weights_ptr + rows[:, None] * num_topk + ks[None, :], mask=k_ok)
        weight_region = (home_base + HIDDEN * 2).to(tl.pointer_type(tl.float32))
        tl.store(weight_region + slots[:, None] * (RECORD_ELEMS // 2) + ks[None, :], weights, mask=k_ok)


@triton.jit
def _combine_reduce_tile(start, last, x_ptr, weights_ptr, bias0_ptr, bias1_ptr, in_rank_ptr, send_head_ptr, out_ptr,
                         out_weights_ptr, slot_base, self_row0, region_base, rank, num_topk,
                         NUM_RANKS: tl.constexpr, R_PAD: tl.constexpr, HIDDEN: tl.constexpr,
                         RECORD_ELEMS: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_H: tl.constexpr, HAS_WEIGHTS: tl.constexpr, HAS_BIAS0: tl.constexpr,
                         HAS_BIAS1: tl.constexpr, STAGES: tl.constexpr):
    """Reduce tokens [start, min(start + BLOCK_T, last)): bias0 + bias1 + the rows of destination ranks
    ascending, in float32, one rounding to bf16. Peer j's row of token t is staged at slot
    slot_base[j] + send_head[t, j]; this rank's own row is x[self_row0 + send_head[t, rank]]."""
    ranks = tl.arange(0, R_PAD)
    toks = start + tl.arange(0, BLOCK_T)
    tok_ok = toks < last
    tile_ok = tok_ok[:, None] & (ranks < NUM_RANKS)[None, :]
    toks64 = toks.to(tl.int64)
    chosen = tl.load(in_rank_ptr + toks64[:, None] * NUM_RANKS + ranks[None, :], mask=tile_ok, other=0).to(tl.int32)
    head = tl.load(send_head_ptr + toks64[:, None] * NUM_RANKS + ranks[None, :], mask=tile_ok, other=0)
    # source row of every (token, rank): a slot in the staging region, or a row of x for this rank
    where = tl.where(ranks[None, :] == rank, self_row0, slot_base[None, :]) + head
    region = tl.multiple_of(region_base.to(tl.pointer_type(tl.bfloat16)), 16)
    for c0 in tl.range(0, HIDDEN, BLOCK_H, num_stages=STAGES):
        cols = c0 + tl.arange(0, BLOCK_H)
        ok = tok_ok[:, None] & (cols < HIDDEN)[None, :]
        acc = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
        if HAS_BIAS0:
            acc += tl.load(bias0_ptr + toks64[:, None] * HIDDEN + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS1:
            acc += tl.load(bias1_ptr + toks64[:, None] * HIDDEN + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        for j in tl.static_range(NUM_RANKS):  # canonical order: destination ranks ascending
            pick = ranks[None, :] == j
            row = tl.sum(tl.where(pick, where, 0), axis=1).to(tl.int64)
            has = ok & (tl.sum(tl.where(pick, chosen, 0), axis=1) != 0)[:, None]
            # one unconditional load per rank (a pointer select, not a branch) lets the loop be pipelined
            ptrs = tl.where(j == rank, x_ptr + row[:, None] * HIDDEN + cols[None, :],
                            region + row[:, None] * RECORD_ELEMS + cols[None, :])
            acc += tl.load(ptrs, mask=has, other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(out_ptr + toks64[:, None] * HIDDEN + cols[None, :], _to_bf16(acc), mask=ok)
    if HAS_WEIGHTS:
        ks = tl.arange(0, K_PAD)
        ok = tok_ok[:, None] & (ks < num_topk)[None, :]
        weight_region = (region_base + HIDDEN * 2).to(tl.pointer_type(tl.float32))
        acc_w = tl.zeros([BLOCK_T, K_PAD], tl.float32)
        for j in tl.static_range(NUM_RANKS):
            pick = ranks[None, :] == j
            row = tl.sum(tl.where(pick, where, 0), axis=1).to(tl.int64)
            has = ok & (tl.sum(tl.where(pick, chosen, 0), axis=1) != 0)[:, None]
            if j == rank:
                part = tl.load(weights_ptr + row[:, None] * num_topk + ks[None, :], mask=has, other=0.0)
            else:
                part = tl.load(weight_region + row[:, None] * (RECORD_ELEMS // 2) + ks[None, :], mask=has, other=0.0,
                               cache_modifier=".cg")
            acc_w += part
        tl.store(out_weights_ptr + toks64[:, None] * num_topk + ks[None, :], acc_w, mask=ok)


COMBINE_NO_SPECIALIZE = ["rank", "num_tokens", "num_channels", "tokens_per_channel", "num_pushers", "publish_every",
                         "num_topk", "capacity", "budget"]


@triton.jit(do_not_specialize=COMBINE_NO_SPECIALIZE)
def ep_combine_kernel(x_ptr, weights_ptr, bias0_ptr, bias1_ptr, in_rank_ptr, send_head_ptr, rank_prefix_ptr,
                      recv_prefix_ptr, out_ptr, out_weights_ptr, data_bases_ptr, half_bytes, signal_bases_ptr,
                      flags_offset, epoch_ptr, err_addr_ptr, rank, num_tokens, num_channels, tokens_per_channel,
                      num_pushers, publish_every, num_topk, capacity, budget,
                      NUM_RANKS: tl.constexpr, R_PAD: tl.constexpr, P_PAD: tl.constexpr, HIDDEN: tl.constexpr,
                      RECORD_ELEMS: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                      REDUCE_BLOCK_H: tl.constexpr, HAS_WEIGHTS: tl.constexpr, HAS_BIAS0: tl.constexpr,
                      HAS_BIAS1: tl.constexpr, USE_TIMER: tl.constexpr, STAGES: tl.constexpr):
    """Pushers: the rows this rank received from `home` go back to `home`'s combine region, at slot
    sum_{j < rank} n(home -> j) + send_head_home[t, rank]; per channel of the homes, tiles alternate
    between homes (ring order from rank + 1), so that a rank's pushers load all its links. Receivers
    reduce this rank's own tokens, a tile at a time once every peer's pushers finished its channel."""
    PEERS: tl.constexpr = NUM_RANKS - 1 if NUM_RANKS > 1 else 1
    pid = tl.program_id(0)
    e = tl.load(epoch_ptr) + 1
    half_offset = (e % 2) * half_bytes
    ranks = tl.arange(0, R_PAD)
    rank_ok = ranks < NUM_RANKS
    peer_ok = rank_ok & (ranks != rank)
    zero = tl.full((), 0, tl.int32)
    channel = zero
    first_tile = zero  # round-robin index of the current channel's first tile
    if pid < num_pushers:
        # this pusher's flag (sender rank, pusher) on every home
        my_flag = flags_offset + (rank * _max_pushers + pid) * 8
        out_flags = (tl.load(signal_bases_ptr + ranks, mask=rank_ok, other=0) + my_flag).to(tl.pointer_type(tl.int64))
        tile = zero + pid
        while channel < num_channels:
            count, x_row0, slot0 = _peer_blocks(rank_prefix_ptr, recv_prefix_ptr, rank, channel, num_channels,
                                                NUM_RANKS, R_PAD)
            tiles = tl.where(peer_ok, tl.cdiv(count, BLOCK_T), 0)
            # tile i of every home, then tile i + 1 (homes without tile i leave a hole)
            num_slots = tl.max(tiles, axis=0) * PEERS
            while tile < first_tile + num_slots:
                index = tile - first_tile
                pick = ranks == (rank + 1 + index % PEERS) % NUM_RANKS
                begin = (index // PEERS) * BLOCK_T
                end = tl.sum(tl.where(pick, count, 0), axis=0)
                if begin < end:
                    _combine_push_tile(begin, end, tl.sum(tl.where(pick, x_row0, 0), axis=0),
                                       tl.sum(tl.where(pick, slot0, 0), axis=0),
                                       tl.sum(tl.where(pick, ranks, 0), axis=0), half_offset, x_ptr, weights_ptr,
                                       data_bases_ptr, num_topk, capacity, HIDDEN, RECORD_ELEMS, K_PAD, BLOCK_T,
                                       BLOCK_H, HAS_WEIGHTS, STAGES)
                tile += num_pushers
            first_tile += num_slots
            channel += 1
            if _publish_now(channel, publish_every, num_channels):
                _publish(out_flags, tl.zeros([R_PAD], tl.int64) + ((e << 32) | channel.to(tl.int64)), peer_ok)
    else:
        worker = pid - num_pushers
        num_workers = tl.num_programs(0) - num_pushers
        err_ptr = tl.load(err_addr_ptr).to(tl.pointer_type(tl.int32))
        failed = tl.load(err_ptr + 3, volatile=True)
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
        ready = tl.zeros([R_PAD], tl.int32)  # channels every pusher of a peer finished, as last seen
        tile = zero + worker
        while channel < num_channels:
            begin = channel * tokens_per_channel
            end = tl.minimum(begin + tokens_per_channel, num_tokens)
            tiles = tl.cdiv(tl.maximum(end - begin, 0), BLOCK_T)
            while tile < first_tile + tiles:
                ready, failed = _wait_channels(flags, flag_ok, peer_ok, channel, ready, e, num_channels, failed,
                                               err_ptr, _phase_combine, rank, budget, R_PAD, USE_TIMER)
                if failed == 0:
                    _combine_reduce_tile(begin + (tile - first_tile) * BLOCK_T, end, x_ptr, weights_ptr, bias0_ptr,
                                         bias1_ptr, in_rank_ptr, send_head_ptr, out_ptr, out_weights_ptr, slot_base,
                                         self_row0, region_base, rank, num_topk, NUM_RANKS, R_PAD, HIDDEN,
                                         RECORD_ELEMS, K_PAD, BLOCK_T, REDUCE_BLOCK_H, HAS_WEIGHTS, HAS_BIAS0,
                                         HAS_BIAS1, STAGES)
                tile += num_workers
            first_tile += tiles
            channel += 1
        # every peer's final flags, also where no rows flow: keeps the ranks at most one operation apart
        ready, failed = _wait_channels(flags, flag_ok, peer_ok, num_channels - 1, ready, e, num_channels, failed,
                                       err_ptr, _phase_combine, rank, budget, R_PAD, USE_TIMER)
