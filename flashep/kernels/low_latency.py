"""Triton kernels of low-latency mode: direct stores into peers' symmetric heap regions.

Two kernels, each launched once per operation with both phases (PHASE = BOTH: the first num_senders
programs send, the others receive), or, when the caller asked for a receive hook, twice (send phase, then
receive phase), so that a profiler sees exactly one kernel name per operation:

- `ep_ll_dispatch_kernel`
  send, grid R * G: program (d, g) takes token group g of this rank and stores, into d's receive region at
  slot (this rank, token), first every token's top-k row (meta record), raising its flag [half][this
  rank][g] to `tag(2e) << 32 | tokens in the group`; then, for each token bound for rank d (one of its
  top-k experts lives there), the FP8 row (quantised here) followed by its scales, or the BF16 row (data
  record), raising the flag to `tag(2e + 1) << 32 | tokens`. Send programs never wait.
  receive, grid L * P: program (local expert l, part p) waits for the top-k rows of every source (the
  flags also carry the token counts), scans them once in (source rank, token) order, and packs the rows
  that selected expert l in (source rank, token, k) order: src_info, the top-k slot k of each row,
  layout_range, recv_count and the statistics. Then it copies the rows (the P parts split them by tiles of
  TILE_R rows): all at once where every source's data flags came with that first wait (after a hook's
  delay), else its own rank's rows first and the rest at once when every peer's data flags came.
- `ep_ll_combine_kernel`
  send, grid R * G: program (h, g) takes chunk g of the rows this rank received from rank h (all local
  experts, in expert order) and stores each row into h's combine region at slot (token, k) (with LogFMT:
  encoded per group of 128 channels, one metadata word per group in combine_meta), then publishes its flag
  [half][this rank][g] on h: `tag(e) << 32 | rows`.
  receive, grid (token tiles, hidden parts): waits for every owner's flags, then per token sums
  `w[t, k] * y[t, k]` in fp32 over k in order (entries -1 skipped; LogFMT rows decoded first) and writes bf16.
  PREREDUCE (no hook, no LogFMT): program (h, 0) first pushes this rank's top-k (ids, weights) to h; program
  (h, g) waits for h's and, per token of chunk g of h's tokens, stores at slots (token, 2 * this rank) of h's region
  the one row this rank answers (bf16) or the fp32 sum of its weighted rows; the receive adds, owner by owner,
  the weighted row or the sum.

Epochs: the send phase (and a fused launch) uses e = epoch + 1 and its last program stores e into `epoch`
(`sync.end_operation`); a separate receive phase, launched after it, reads e = epoch. Regions are
double-buffered by e % 2 (see docs/design.md). Flags carry `sync.tag` values that receivers compare for
equality: exactly their operation's, since a half's previous value is from two operations earlier.

Under TRITON_INTERPRET=1 the float -> fp8 / bf16 conversions run in integer code (EXACT_CASTS), because
the interpreter's own conversions do not round to nearest even; on the GPU the hardware converts.
"""
import triton
import triton.language as tl

from .sync import acquire_flags, end_operation, now_cycles, now_ns, record_timeout, signal, tag
SEND = tl.constexpr(0)
RECEIVE = tl.constexpr(1)
BOTH = tl.constexpr(2)  # one launch: programs [0, num_senders) send, the rest receive
MAX_GROUPS = tl.constexpr(64)  # most flags per (half, source rank): programs per destination of a send
FP8_MAX = tl.constexpr(448.0)
AMAX_FLOOR = tl.constexpr(1e-4)
STAMP_POINTS = tl.constexpr(6)  # probe points per program (FLASHEP_LL_STAMPS=1)
# LogFMT (flashep/logfmt.py has the format and the torch twin of these kernels' code)
LOGFMT_LEVELS = tl.constexpr(510)
LOGFMT_SPAN_LIMIT = tl.constexpr(32 << 7)  # 32 octaves of bf16 magnitude bits
LOGFMT_ONE_BITS = tl.constexpr(0x3F80)  # bf16 bits of 1.0


# ---- helpers ---------------------------------------------------------------------------------------------------
@triton.jit
def _heap_ptr(heap_bases, rank, offset, dtype: tl.constexpr):
    """Pointer to byte `offset` of `rank`'s heap (offsets are multiples of 128, bases 128-aligned). The
    alignment hint goes on the pointer: Triton does not carry it through an int -> pointer cast, and
    without it every access would be split into single elements instead of 16-byte vectors."""
    return tl.multiple_of((tl.load(heap_bases + rank) + offset).to(tl.pointer_type(dtype)), 16)


@triton.jit
def _stamp(stamps, point: tl.constexpr, STAMPS: tl.constexpr):
    """Where a program's time goes (FLASHEP_LL_STAMPS=1, GPU only): %globaltimer and %clock64 at `point` of
    this program's row of the stamps tensor [programs, 2 * STAMP_POINTS]."""
    if STAMPS:
        tl.store(stamps + point, now_ns(True))
        tl.store(stamps + STAMP_POINTS + point, now_cycles())


@triton.jit
def _stamp_row(stamps_ptr, num_senders, PHASE: tl.constexpr):
    """This program's row of the stamps tensor: senders first, then receivers, in either kind of launch."""
    row = tl.program_id(0)
    if PHASE == RECEIVE:
        row += num_senders
    return stamps_ptr + row * (2 * STAMP_POINTS)


@triton.jit
def _wait_flags(flags, num_rows, num_cols, wanted, other, budget, error_address, phase, rank, first_peer,
                ROWS: tl.constexpr, COLS: tl.constexpr, ROW_STRIDE: tl.constexpr, USE_TIMER: tl.constexpr,
                VALUES: tl.constexpr = False):
    """Spin until the tag (high 32 bits) of flags[r * ROW_STRIDE + c] is `wanted` or `other` for every
    r < num_rows, c < num_cols; row r is the flags of peer first_peer + r. -> (ok, per-row wait in ns,
    per-row sum of the flags' low 32 bits: only with VALUES, else zeros). On timeout records (phase, rank,
    first missing peer) in the error word.

    VALUES reads the flags once more after the wait. The flag tile is replicated over threads (more threads
    than flags), each copy loaded on its own, and a reduction takes each row from one copy: in the poll where
    a row arrives, the copy that says "arrived" and the copy whose low bits are summed may differ (one read
    before the store, one after), which gave a count of a previous operation, or 0, for one peer (seen on
    the GPU). A read after the barrier that follows the wait comes after every copy's observation, so every
    copy then holds this operation's tag and count (a flag goes no further before this receive is done).
    For the same reason the callers branch on nothing the flags say: where each warp polls its own copy
    (small tiles: the reductions stay inside a warp), warps would take different branches, and a barrier in
    one branch would pair with another barrier of the other warps."""
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    mask = (rows[:, None] < num_rows) & (cols[None, :] < num_cols)
    ptrs = flags + rows[:, None] * ROW_STRIDE + cols[None, :]
    start = now_ns(USE_TIMER)
    waited = tl.zeros([ROWS], dtype=tl.int64)
    done = rows >= num_rows
    spins = 0
    alive = True
    while (tl.min(done.to(tl.int32), axis=0) == 0) & alive:
        # every poll acquires every flag, so the last one orders the data reads after all of them
        values = acquire_flags(ptrs, mask, USE_TIMER)
        flag_tags = values >> 32
        hit = ((flag_tags == wanted) | (flag_tags == other)).to(tl.int32)
        row_done = tl.min(tl.where(mask, hit, 1), axis=1) > 0
        elapsed = now_ns(USE_TIMER) - start
        waited = tl.where(row_done & (done == 0), elapsed, waited)
        done = done | row_done
        spins += 1
        if USE_TIMER:
            alive = elapsed < budget
        else:
            alive = spins < budget
    tl.debug_barrier()  # threads that did not acquire a flag read the data only after those that did
    ok = tl.min(done.to(tl.int32), axis=0) == 1
    counts = tl.zeros([ROWS], dtype=tl.int32)
    if ok == 0:
        missing = tl.min(tl.where(done, ROWS, rows), axis=0)
        record_timeout(error_address, phase, rank, first_peer + missing)
    elif VALUES:
        values = acquire_flags(ptrs, mask, USE_TIMER)
        counts = tl.sum(tl.where(mask, values & 0xFFFFFFFF, 0), axis=1).to(tl.int32)
    return ok, waited, counts


@triton.jit
def _e4m3_bits_exact(v):
    """fp32 -> float8_e4m3fn bit pattern, round to nearest even, saturating at 448 (integer code)."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.minimum(tl.abs(v), FP8_MAX)
    abits = a.to(tl.int32, bitcast=True)
    rounded = abits + 0x7FFFF + ((abits >> 20) & 1)  # round the mantissa to 3 bits
    normal = (((rounded >> 23) - 120) << 3) | ((rounded >> 20) & 7)
    subnormal = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)  # multiples of 2^-9, rounded by the add
    magnitude = tl.where(a >= 0.015625, normal, subnormal)
    return (sign | magnitude).to(tl.uint8)


@triton.jit
def _to_e4m3_bits(v, EXACT_CASTS: tl.constexpr):
    if EXACT_CASTS:
        out = _e4m3_bits_exact(v)
    else:
        out = v.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    return out


@triton.jit
def _to_bf16_bits(v, EXACT_CASTS: tl.constexpr):
    """fp32 -> bfloat16 bit pattern (int16), round to nearest even."""
    if EXACT_CASTS:
        bits = v.to(tl.int32, bitcast=True)
        out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.int16)
    else:
        out = v.to(tl.bfloat16).to(tl.int16, bitcast=True)
    return out


@triton.jit
def _bound_for(topk_ptr, tokens, token_mask, dst, num_local, K: tl.constexpr, K_PAD: tl.constexpr):
    """[tokens] bool: the token selects at least one expert of rank `dst`."""
    ks = tl.arange(0, K_PAD)
    ids = tl.load(topk_ptr + tokens[:, None] * K + ks[None, :], mask=token_mask[:, None] & (ks[None, :] < K),
                  other=-1).to(tl.int32)  # 32-bit division is much cheaper than 64-bit
    hit = (ids >= 0) & (ids // num_local == dst)
    return (tl.max(hit.to(tl.int32), axis=1) > 0) & token_mask


@triton.jit
def _role(epoch_ptr, num_senders, PHASE: tl.constexpr):
    """-> (program index within its phase, epoch of the operation, sends?). The send phase works on epoch + 1
    (and moves the epoch on at its end, `_end`); a fused launch (BOTH) puts the senders first, so that
    every sender is scheduled before any receiver starts to spin."""
    pid = tl.program_id(0)
    e = tl.load(epoch_ptr)
    sending = False
    if PHASE == SEND:
        sending = True
        e += 1
    elif PHASE == BOTH:
        e += 1
        sending = pid < num_senders
        if pid >= num_senders:
            pid -= num_senders
    return pid, e, sending


@triton.jit
def _end(epoch_ptr, arrivals_ptr, e, PHASE: tl.constexpr):
    """A send or fused launch moves the epoch on once all its programs are done; a receive launch does not."""
    if PHASE != RECEIVE:
        end_operation(epoch_ptr, arrivals_ptr, e)


# ---- dispatch ------------------------------------------------------------------------------------------------
@triton.jit
def _quantize_and_store(x_ptr, tokens, send, h0, data_dst, msg, H: tl.constexpr, ROW_BYTES: tl.constexpr,
                        ROUND_SCALE: tl.constexpr, UE8M0: tl.constexpr, EXACT_CASTS: tl.constexpr,
                        BLOCK_H: tl.constexpr):
    """FP8-quantise columns [h0, h0 + BLOCK_H) of the tokens; store the bytes and the scales (which follow
    the H payload bytes of each data record). Tile [token, 4 scale groups, scale group, channel]: UE8M0
    packs the 4 groups of axis 2 into one int32."""
    Q: tl.constexpr = BLOCK_H // 512
    quad = tl.arange(0, Q)
    part = tl.arange(0, 4)
    chan = tl.arange(0, 128)
    cols = h0 + quad[None, :, None, None] * 512 + part[None, None, :, None] * 128 + chan[None, None, None, :]
    mask = send[:, None, None, None] & (cols < H)
    x = tl.load(x_ptr + tokens[:, None, None, None].to(tl.int64) * H + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=3), AMAX_FLOOR)  # [TILE_T, Q, 4]
    if ROUND_SCALE:
        bits = tl.div_rn(amax, FP8_MAX).to(tl.int32, bitcast=True)
        exponent = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        scale = ((127 - exponent) << 23).to(tl.float32, bitcast=True)
        scale_inv = ((127 + exponent) << 23).to(tl.float32, bitcast=True)
    else:
        # 448 * (1 / amax) with the reciprocal rounded first: what torch computes for `448.0 / amax`, which
        # the oracle and the collective backend use, so every backend quantises bit for bit alike
        scale = tl.div_rn(tl.full(amax.shape, 1.0, tl.float32), amax) * FP8_MAX
        scale_inv = tl.div_rn(amax, FP8_MAX)
    q = _to_e4m3_bits(x * scale[:, :, :, None], EXACT_CASTS)
    record = msg.to(tl.int64) * ROW_BYTES
    tl.store(data_dst + record[:, None, None, None] + cols, q, mask=mask)
    scale_dst = (data_dst + H).to(tl.pointer_type(tl.int32))
    scale_record = msg.to(tl.int64) * (ROW_BYTES // 4)
    if UE8M0:
        packed = tl.sum((exponent + 127) << (part[None, None, :] * 8), axis=2)  # group 4p + j in byte j
        packed_cols = h0 // 512 + quad[None, :]
        tl.store(scale_dst + scale_record[:, None] + packed_cols, packed,
                 mask=send[:, None] & (packed_cols * 512 < H))
    else:
        scale_cols = h0 // 128 + quad[None, :, None] * 4 + part[None, None, :]
        tl.store(scale_dst + scale_record[:, None, None] + scale_cols, scale_inv.to(tl.int32, bitcast=True),
                 mask=send[:, None, None] & (scale_cols * 128 < H))


@triton.jit
def _dispatch_send(pid, e, x_ptr, topk_ptr, num_tokens, heap_bases, rank, num_local, off_data, off_meta,
                   off_flags, tokens_per_group, num_groups,
                   H: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, R: tl.constexpr, T_CAP: tl.constexpr,
                   META: tl.constexpr, G_STRIDE: tl.constexpr, ROW_BYTES: tl.constexpr,
                   USE_FP8: tl.constexpr, ROUND_SCALE: tl.constexpr, UE8M0: tl.constexpr,
                   EXACT_CASTS: tl.constexpr, TILE_T: tl.constexpr, BLOCK_H: tl.constexpr, stamps,
                   STAMPS: tl.constexpr):
    _stamp(stamps, 0, STAMPS)
    dst = pid // num_groups
    group = pid % num_groups
    half = e % 2
    records = R * T_CAP  # message records per half
    t0 = tl.minimum(group * tokens_per_group, num_tokens)
    t1 = tl.minimum(t0 + tokens_per_group, num_tokens)
    if USE_FP8:
        data_dst = _heap_ptr(heap_bases, dst, off_data + half * records * ROW_BYTES, tl.uint8)
    else:
        data_dst = _heap_ptr(heap_bases, dst, off_data + half * records * ROW_BYTES, tl.bfloat16)
    meta_dst = _heap_ptr(heap_bases, dst, off_meta + half * records * META * 4, tl.int32)
    flag = _heap_ptr(heap_bases, dst, off_flags, tl.int64) + (half * R + rank) * G_STRIDE + group
    # stage 1: every token's top-k row goes to every destination (the receivers find their experts in it; a
    # token bound elsewhere matches none), then a flag, so that receivers lay out their rows while the data
    # is still on its way
    ks = tl.arange(0, K_PAD)
    start = t0
    while start < t1:
        tokens = start + tl.arange(0, TILE_T)
        kmask = (tokens[:, None] < t1) & (ks[None, :] < K)
        ids = tl.load(topk_ptr + tokens[:, None] * K + ks[None, :], mask=kmask, other=-1)
        msg = rank * T_CAP + tokens  # the message slot is the token index: no count of earlier tokens needed
        tl.store(meta_dst + msg[:, None] * META + ks[None, :], ids.to(tl.int32), mask=kmask)
        start += TILE_T
    signal(flag, (tag(2 * e) << 32) | (t1 - t0))
    _stamp(stamps, 1, STAMPS)
    # stage 2: the data of the tokens bound for dst (one of their experts lives there)
    start = t0
    while start < t1:
        tokens = start + tl.arange(0, TILE_T)
        send = _bound_for(topk_ptr, tokens, tokens < t1, dst, num_local, K, K_PAD)
        msg = rank * T_CAP + tokens
        for h0 in tl.static_range(0, H, BLOCK_H):  # unrolled: all loads in flight at once
            if USE_FP8:
                _quantize_and_store(x_ptr, tokens, send, h0, data_dst, msg, H, ROW_BYTES, ROUND_SCALE, UE8M0,
                                    EXACT_CASTS, BLOCK_H)
            else:
                cols = h0 + tl.arange(0, BLOCK_H)
                mask = send[:, None] & (cols[None, :] < H)
                row = tl.load(x_ptr + tokens[:, None].to(tl.int64) * H + cols[None, :], mask=mask)
                tl.store(data_dst + msg[:, None].to(tl.int64) * (ROW_BYTES // 2) + cols[None, :], row, mask=mask)
        start += TILE_T
    signal(flag, (tag(2 * e + 1) << 32) | (t1 - t0))
    _stamp(stamps, 2, STAMPS)


@triton.jit
def _copy_rows(recv_x, recv_scales, row_msg, topk_slot, row_map, data_src, local_expert, row_begin, row_end,
               skip_begin, skip_end, part, num_parts, rows_per_expert, H: tl.constexpr, K: tl.constexpr,
               R: tl.constexpr, T_CAP: tl.constexpr, ROW_BYTES: tl.constexpr, NUM_SCALES: tl.constexpr,
               SCALES_PAD: tl.constexpr, USE_FP8: tl.constexpr, TILE_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """Copy this part's tiles of rows [row_begin, row_end) of one local expert from the data records, all
    but rows [skip_begin, skip_end); note each row in the pre-reducing combine's map, at (source rank, token,
    k): expert * R * T_max + row (here, off the scan's critical path and its registers: 1-d stores per tile)."""
    expert_base = local_expert.to(tl.int64) * rows_per_expert
    tile = part
    while row_begin + tile * TILE_R < row_end:
        rows = row_begin + tile * TILE_R + tl.arange(0, TILE_R)
        rmask = (rows < row_end) & ((rows < skip_begin) | (rows >= skip_end))
        msg = tl.load(row_msg + expert_base + rows, mask=rmask, other=0).to(tl.int64)
        k = tl.load(topk_slot + expert_base + rows, mask=rmask, other=0).to(tl.int32)
        source_token = (msg // T_CAP) * (rows_per_expert // R) + msg % T_CAP
        tl.store(row_map + R + source_token * K + k, (expert_base + rows).to(tl.int32), mask=rmask)
        for h0 in tl.static_range(0, H, BLOCK_H):  # unrolled: all loads in flight at once
            cols = h0 + tl.arange(0, BLOCK_H)
            mask = rmask[:, None] & (cols[None, :] < H)
            if USE_FP8:
                v = tl.load(data_src + msg[:, None] * ROW_BYTES + cols[None, :], mask=mask, cache_modifier=".cg")
            else:
                v = tl.load(data_src + msg[:, None] * (ROW_BYTES // 2) + cols[None, :], mask=mask,
                            cache_modifier=".cg")
            tl.store(recv_x + (expert_base + rows[:, None]) * H + cols[None, :], v, mask=mask)
        if USE_FP8:
            sc = tl.arange(0, SCALES_PAD)
            smask = rmask[:, None] & (sc[None, :] < NUM_SCALES)
            scale_src = (data_src + H).to(tl.pointer_type(tl.int32))
            s = tl.load(scale_src + msg[:, None] * (ROW_BYTES // 4) + sc[None, :], mask=smask, cache_modifier=".cg")
            # the scale outputs are column-major: [L, NUM_SCALES, rows_per_expert]
            out = recv_scales + (local_expert.to(tl.int64) * NUM_SCALES + sc[None, :]) * rows_per_expert
            tl.store(out + rows[:, None], s, mask=smask)
        tile += num_parts


@triton.jit
def _dispatch_receive(pid, e, recv_x, recv_scales, recv_count, src_info, topk_slot, layout_range, row_msg,
                      row_map, expert_stats, wait_stats, heap_bases, error_address, rank, num_local, rows_per_expert,
                      num_parts, num_groups, budget, off_data, off_meta, off_flags,
                      H: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
                      T_CAP: tl.constexpr, META: tl.constexpr, G_STRIDE: tl.constexpr,
                      G_PAD: tl.constexpr, ROW_BYTES: tl.constexpr, NUM_SCALES: tl.constexpr,
                      SCALES_PAD: tl.constexpr, USE_FP8: tl.constexpr, HAS_EXPERT_STATS: tl.constexpr,
                      HAS_WAIT_STATS: tl.constexpr, USE_TIMER: tl.constexpr, TILE_R: tl.constexpr,
                      BLOCK_H: tl.constexpr, SCAN: tl.constexpr, PHASE: tl.constexpr, PHASE_CODE: tl.constexpr,
                      stamps, STAMPS: tl.constexpr):
    _stamp(stamps, 0, STAMPS)
    local_expert = pid // num_parts
    part = pid % num_parts
    half = e % 2
    records = R * T_CAP
    expert = rank * num_local + local_expert

    flags = _heap_ptr(heap_bases, rank, off_flags, tl.int64) + half * R * G_STRIDE
    meta_tag = tag(2 * e)
    data_tag = tag(2 * e + 1)
    start = now_ns(USE_TIMER)
    # the top-k rows of every source. A receive launched on its own (a hook, called once the data is there as a
    # rule) waits for the data stage at once and then copies every row in one pass; a launch of both phases
    # takes the top-k stage (or the data stage, which implies it), lays out the rows while the data is on its
    # way and copies in two passes (below). The choice is the launch's, not the flags': see _wait_flags
    if PHASE == RECEIVE:
        first_tag = data_tag
    else:
        first_tag = meta_tag
    ok, first_wait, num_msgs = _wait_flags(flags, R, num_groups, first_tag, data_tag, budget, error_address,
                                           PHASE_CODE, rank, 0, R_PAD, G_PAD, G_STRIDE, USE_TIMER, VALUES=True)
    _stamp(stamps, 1, STAMPS)
    if ok:
        sources = tl.arange(0, R_PAD)
        if USE_FP8:
            data_src = _heap_ptr(heap_bases, rank, off_data + half * records * ROW_BYTES, tl.uint8)
        else:
            data_src = _heap_ptr(heap_bases, rank, off_data + half * records * ROW_BYTES, tl.bfloat16)
        meta_src = _heap_ptr(heap_bases, rank, off_meta + half * records * META * 4, tl.int32)
        expert_base = local_expert.to(tl.int64) * rows_per_expert
        ks = tl.arange(0, K_PAD)
        msgs_end = tl.cumsum(num_msgs, axis=0)  # messages of sources <= s, in (source, slot) order
        total_msgs = tl.sum(num_msgs, axis=0)
        # one pass over every received message in (source, slot) order = (source, token) order: each
        # (message, k) that selected this expert takes the next row
        rows_per_source = tl.zeros([R_PAD], dtype=tl.int32)
        num_rows = tl.zeros((), tl.int32)
        m0 = tl.zeros((), tl.int32)
        while m0 < total_msgs:
            m = m0 + tl.arange(0, SCAN)
            mmask = m < total_msgs
            src = tl.sum((msgs_end[None, :] <= m[:, None]).to(tl.int32), axis=1)
            slot = m - tl.sum(tl.where(sources[None, :] < src[:, None], num_msgs[None, :], 0), axis=1)
            msg = src * T_CAP + slot
            ids = tl.load(meta_src + msg[:, None] * META + ks[None, :], mask=mmask[:, None] & (ks[None, :] < K),
                          other=-1, cache_modifier=".cg")
            match = (ids == expert).to(tl.int32)
            per_msg = tl.sum(match, axis=1)
            rows = num_rows + (tl.cumsum(per_msg, axis=0) - per_msg)[:, None] + tl.cumsum(match, axis=1) - match
            # every part of the expert writes every row (the same values): it reads back any of them below
            mine = (match > 0) & (rows < rows_per_expert)
            tl.store(src_info + expert_base + rows, tl.broadcast_to(slot[:, None], rows.shape), mask=mine)
            tl.store(topk_slot + expert_base + rows, tl.broadcast_to(ks[None, :], rows.shape).to(tl.int8), mask=mine)
            tl.store(row_msg + expert_base + rows, tl.broadcast_to(msg[:, None], rows.shape), mask=mine)
            rows_per_source += tl.sum(tl.where(src[:, None] == sources[None, :], per_msg[:, None], 0), axis=0)
            num_rows += tl.sum(per_msg, axis=0)
            m0 += SCAN
        # rows past the output's capacity (only if a token names one expert many times) are dropped
        begins = tl.minimum(tl.cumsum(rows_per_source, axis=0) - rows_per_source, rows_per_expert)
        ends = tl.minimum(begins + rows_per_source, rows_per_expert)
        num_rows = tl.minimum(num_rows, rows_per_expert)
        if pid == 0:
            tl.store(row_map + sources, num_msgs, mask=sources < R)  # each source's token count
        if part == 0:
            tl.store(layout_range + local_expert * R + sources, (begins.to(tl.int64) << 32) | (ends - begins),
                     mask=sources < R)
            tl.store(recv_count + local_expert, num_rows)
            if HAS_EXPERT_STATS:
                tl.store(expert_stats + local_expert, tl.load(expert_stats + local_expert) + num_rows)
        tl.debug_barrier()  # this program's row_msg stores are read back by its copy
        _stamp(stamps, 2, STAMPS)
        # then the rows, in as few dependent passes as possible (each pass is a chain of loads and stores):
        # a receive on its own has every source's data already and copies everything in one pass; a launch
        # of both phases copies this rank's own rows (stored first) while the peers' data is on its way, and
        # the rest in one pass once every peer's data came
        waited = first_wait  # ns per source until its data came
        own_begin = tl.sum(tl.where(sources == rank, begins, 0), axis=0)
        own_end = own_begin
        if PHASE != RECEIVE:
            own_end = tl.sum(tl.where(sources == rank, ends, 0), axis=0)
            ok, _own_wait, _own_count = _wait_flags(flags + rank * G_STRIDE, 1, num_groups, data_tag, data_tag,
                                                    budget, error_address, PHASE_CODE, rank, rank, 1, G_PAD,
                                                    G_STRIDE, USE_TIMER)
            if ok:
                _copy_rows(recv_x, recv_scales, row_msg, topk_slot, row_map, data_src, local_expert, own_begin,
                           own_end, 0, 0, part, num_parts, rows_per_expert, H, K, R, T_CAP, ROW_BYTES, NUM_SCALES,
                           SCALES_PAD, USE_FP8, TILE_R, BLOCK_H)
                since = now_ns(USE_TIMER) - start
                ok, arrival, _all_counts = _wait_flags(flags, R, num_groups, data_tag, data_tag, budget,
                                                       error_address, PHASE_CODE, rank, 0, R_PAD, G_PAD, G_STRIDE,
                                                       USE_TIMER)
                waited = since + arrival
        _stamp(stamps, 3, STAMPS)
        if ok:
            _copy_rows(recv_x, recv_scales, row_msg, topk_slot, row_map, data_src, local_expert, 0, num_rows,
                       own_begin, own_end, part, num_parts, rows_per_expert, H, K, R, T_CAP, ROW_BYTES, NUM_SCALES,
                       SCALES_PAD, USE_FP8, TILE_R, BLOCK_H)
        if HAS_WAIT_STATS:
            if pid == 0:
                tl.atomic_add(wait_stats + sources, waited, mask=sources < R, sem="relaxed")
    _stamp(stamps, 4, STAMPS)


@triton.jit(do_not_specialize=["num_tokens", "rank", "budget"])
def ep_ll_dispatch_kernel(x_ptr, topk_ptr, num_tokens, recv_x, recv_scales, recv_count, src_info, topk_slot,
                          layout_range, row_msg, row_map, expert_stats, wait_stats, heap_bases, epoch_ptr,
                          arrivals_ptr, error_address, stamps_ptr, rank, num_local, rows_per_expert,
                          tokens_per_group, num_groups, num_parts, num_senders, budget, off_data, off_meta, off_flags,
                          PHASE: tl.constexpr, H: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
                          R: tl.constexpr, R_PAD: tl.constexpr, T_CAP: tl.constexpr, META: tl.constexpr,
                          G_STRIDE: tl.constexpr, G_PAD: tl.constexpr, ROW_BYTES: tl.constexpr,
                          NUM_SCALES: tl.constexpr, SCALES_PAD: tl.constexpr, USE_FP8: tl.constexpr,
                          ROUND_SCALE: tl.constexpr, UE8M0: tl.constexpr, EXACT_CASTS: tl.constexpr,
                          HAS_EXPERT_STATS: tl.constexpr, HAS_WAIT_STATS: tl.constexpr, USE_TIMER: tl.constexpr,
                          TILE_T: tl.constexpr, TILE_R: tl.constexpr, BLOCK_H: tl.constexpr, SCAN: tl.constexpr,
                          PHASE_CODE: tl.constexpr, STAMPS: tl.constexpr):
    pid, e, sending = _role(epoch_ptr, num_senders, PHASE)
    stamps = _stamp_row(stamps_ptr, num_senders, PHASE)
    if sending:
        _dispatch_send(pid, e, x_ptr, topk_ptr, num_tokens, heap_bases, rank, num_local, off_data, off_meta,
                       off_flags, tokens_per_group, num_groups, H, K, K_PAD, R, T_CAP, META, G_STRIDE,
                       ROW_BYTES, USE_FP8, ROUND_SCALE, UE8M0, EXACT_CASTS, TILE_T, BLOCK_H, stamps, STAMPS)
    else:
        _dispatch_receive(pid, e, recv_x, recv_scales, recv_count, src_info,
                          topk_slot, layout_range, row_msg, row_map, expert_stats, wait_stats, heap_bases,
                          error_address,
                          rank, num_local, rows_per_expert, num_parts, num_groups, budget, off_data, off_meta,
                          off_flags, H, K, K_PAD, R, R_PAD, T_CAP, META, G_STRIDE, G_PAD, ROW_BYTES,
                          NUM_SCALES, SCALES_PAD, USE_FP8, HAS_EXPERT_STATS, HAS_WAIT_STATS, USE_TIMER, TILE_R,
                          BLOCK_H, SCAN, PHASE, PHASE_CODE, stamps, STAMPS)
    _end(epoch_ptr, arrivals_ptr, e, PHASE)


# ---- combine -------------------------------------------------------------------------------------------------
@triton.jit
def _floor_div(num, den):
    """floor(num / den) for int32 0 <= num < 2^24, den > 0: a float estimate (off by at most one, however the
    reciprocal rounds) corrected in integers, so GPU and interpreter agree; cheaper than an integer divide."""
    q = (num.to(tl.float32) * (1.0 / den.to(tl.float32))).to(tl.int32)
    q = tl.where(q * den > num, q - 1, q)
    return tl.where((q + 1) * den <= num, q + 1, q)


@triton.jit
def _group_columns(h0, BLOCK_H: tl.constexpr):
    """Columns [h0, h0 + BLOCK_H) by 128-channel group: (group indices [G], channel in group [128],
    columns [1, G, 128])."""
    groups = h0 // 128 + tl.arange(0, BLOCK_H // 128)
    chan = tl.arange(0, 128)
    return groups, chan, groups[None, :, None] * 128 + chan[None, None, :]


@triton.jit
def _logfmt_send(x_ptr, x_rows, dst, dst_meta, slot, smask, h0, H: tl.constexpr, ROW_BYTES: tl.constexpr,
                 META_STRIDE: tl.constexpr, BLOCK_H: tl.constexpr):
    """LogFMT-encode columns [h0, h0 + BLOCK_H) of the rows at x_ptr + x_rows into their slots: per group of
    128 channels either the plain bf16 (256 bytes) or 160 bytes of 10-bit codes (the low bytes, then byte j
    holding the top 2 bits of channel j + 32 i in bits 2 i: the decoder reads them with contiguous vectors), and
    the group's metadata word (-1: plain; else amin | amax << 16)."""
    G: tl.constexpr = BLOCK_H // 128
    groups, chan, cols = _group_columns(h0, BLOCK_H)
    mask = smask[:, None, None] & (cols < H)
    y = tl.load(x_ptr + x_rows[:, None, None] + cols, mask=mask, other=0.0)
    bits = y.to(tl.int16, bitcast=True).to(tl.int32)
    magnitude = bits & 0x7FFF
    amax = tl.max(magnitude, axis=2)
    amin = tl.maximum(tl.min(magnitude, axis=2), amax - LOGFMT_SPAN_LIMIT)
    plain = (amax >= LOGFMT_ONE_BITS) | (amax == amin)
    span = tl.maximum(amax - amin, 1)[:, :, None]
    offset = tl.maximum(magnitude - amin[:, :, None], 0)
    q = 1 + _floor_div(offset * (2 * LOGFMT_LEVELS) + span, span * 2)
    code = tl.where(magnitude == 0, 0, q) | ((bits >> 6) & 0x200)  # the sign goes to bit 9
    row_bytes = slot.to(tl.int64) * ROW_BYTES
    group_bytes = row_bytes[:, None] + groups[None, :] * 256
    coded = (plain == 0) & smask[:, None] & (groups[None, :] * 128 < H)
    tl.store(dst + row_bytes[:, None, None] // 2 + cols, y, mask=mask & plain[:, :, None])
    dst_bytes = dst.to(tl.pointer_type(tl.uint8))
    tl.store(dst_bytes + group_bytes[:, :, None] + chan[None, None, :], (code & 0xFF).to(tl.uint8),
             mask=coded[:, :, None])
    top = tl.reshape(code >> 8, (code.shape[0], G, 4, 32))
    packed = tl.sum(top << (2 * tl.arange(0, 4))[None, None, :, None], axis=2)
    byte = tl.arange(0, 32)
    tl.store(dst_bytes + group_bytes[:, :, None] + 128 + byte[None, None, :], packed.to(tl.uint8),
             mask=coded[:, :, None])
    meta = tl.where(plain, -1, amin | (amax << 16))
    tl.store(dst_meta + slot.to(tl.int64)[:, None] * META_STRIDE + groups[None, :], meta,
             mask=smask[:, None] & (groups[None, :] * 128 < H))


@triton.jit
def _logfmt_receive(region, region_meta, slot, valid, h0, H: tl.constexpr, ROW_BYTES: tl.constexpr,
                    META_STRIDE: tl.constexpr, BLOCK_H: tl.constexpr):
    """[tokens, groups, 128] float32: columns [h0, h0 + BLOCK_H) of the rows at `slot` (one per token), decoded
    from what `_logfmt_send` stored."""
    groups, chan, cols = _group_columns(h0, BLOCK_H)
    group_ok = valid[:, None] & (groups[None, :] * 128 < H)
    meta = tl.load(region_meta + slot.to(tl.int64)[:, None] * META_STRIDE + groups[None, :], mask=group_ok,
                   other=-1, cache_modifier=".cg")
    plain = meta == -1
    coded = (group_ok & (plain == 0))[:, :, None]
    row_bytes = slot.to(tl.int64) * ROW_BYTES
    y = tl.load(region + row_bytes[:, None, None] // 2 + cols, mask=(group_ok & plain)[:, :, None], other=0.0,
                cache_modifier=".cg")
    group_bytes = (row_bytes[:, None] + groups[None, :] * 256)[:, :, None]
    region_bytes = region.to(tl.pointer_type(tl.uint8))
    low = tl.load(region_bytes + group_bytes + chan[None, None, :], mask=coded, other=0, cache_modifier=".cg")
    top = tl.load(region_bytes + group_bytes + 128 + chan[None, None, :] % 32, mask=coded, other=0,
                  cache_modifier=".cg")
    code = low.to(tl.int32) | (((top.to(tl.int32) >> (chan // 32 * 2)[None, None, :]) & 3) << 8)
    q = code & 0x1FF
    amin = (meta & 0xFFFF)[:, :, None]
    span = (meta >> 16)[:, :, None] - amin
    magnitude = tl.where(q == 0, 0, amin + ((q - 1) * span * 2 + LOGFMT_LEVELS) // (2 * LOGFMT_LEVELS))
    decoded = ((magnitude << 16) | ((code & 0x200) << 22)).to(tl.float32, bitcast=True)
    return tl.where(plain[:, :, None], y.to(tl.float32), decoded)


@triton.jit
def _topk_column(all_ids, all_weights, k, K_PAD: tl.constexpr):
    """(expert ids, weights) of top-k slot k of a token tile, from its [tokens, K_PAD] rows in registers."""
    ks = tl.arange(0, K_PAD)
    ids = tl.sum(tl.where(ks[None, :] == k, all_ids, 0), axis=1)
    return ids, tl.sum(tl.where(ks[None, :] == k, all_weights, 0.0), axis=1)


@triton.jit
def _logfmt_reduce(region, region_meta, out_ptr, tokens, tmask, all_ids, all_weights, h0, H: tl.constexpr,
                   K: tl.constexpr, K_PAD: tl.constexpr, K_CAP: tl.constexpr, ROW_BYTES: tl.constexpr,
                   META_STRIDE: tl.constexpr, TILE_T: tl.constexpr, BLOCK_H: tl.constexpr,
                   EXACT_CASTS: tl.constexpr):
    """Columns [h0, h0 + BLOCK_H) of the tokens' combined rows from LogFMT slots: decode, weight, sum over k."""
    _, _, cols = _group_columns(h0, BLOCK_H)
    acc = tl.zeros([TILE_T, BLOCK_H // 128, 128], dtype=tl.float32)
    for k in tl.range(0, K):
        ids, w = _topk_column(all_ids, all_weights, k, K_PAD)
        valid = ids >= 0
        y = _logfmt_receive(region, region_meta, (tokens * K_CAP + k).to(tl.int64), valid, h0, H, ROW_BYTES,
                            META_STRIDE, BLOCK_H)
        acc = tl.where(valid[:, None, None], acc + w[:, None, None] * y, acc)
    tl.store(out_ptr + tokens[:, None, None].to(tl.int64) * H + cols, _to_bf16_bits(acc, EXACT_CASTS),
             mask=tmask[:, None, None] & (cols < H))


@triton.jit
def _store_topk(topk_ptr, weights_ptr, num_tokens, dst, K: tl.constexpr, K_PAD: tl.constexpr, K_CAP: tl.constexpr,
                TILE_T: tl.constexpr, WITH_WEIGHTS: tl.constexpr):
    """This rank's top-k rows into dst [tokens, K_CAP]: int32 expert ids, or WITH_WEIGHTS int64 records (the id
    in the high half, -1 for none; the float32 weight's bits in the low half)."""
    ks = tl.arange(0, K_PAD)
    t0 = tl.zeros((), tl.int32)
    while t0 < num_tokens:
        tokens = t0 + tl.arange(0, TILE_T)
        mask = (tokens[:, None] < num_tokens) & (ks[None, :] < K)
        ids = tl.load(topk_ptr + tokens[:, None] * K + ks[None, :], mask=mask, other=-1)
        if WITH_WEIGHTS:
            w = tl.load(weights_ptr + tokens[:, None] * K + ks[None, :], mask=mask, other=0.0).to(tl.float32)
            value = (ids.to(tl.int64) << 32) | (w.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF)
        else:
            value = ids.to(tl.int32)
        tl.store(dst + tokens[:, None] * K_CAP + ks[None, :], value, mask=mask)
        t0 += TILE_T


@triton.jit
def _publish_topk(topk_ptr, num_tokens, heap_bases, rank, half, e, off_publish, off_publish_flags,
                  K: tl.constexpr, K_PAD: tl.constexpr, T_CAP: tl.constexpr, K_CAP: tl.constexpr,
                  TILE_T: tl.constexpr):
    """Copy this rank's top-k rows into its own heap for the owners, then raise its publish flag."""
    PUBLISHED: tl.constexpr = (T_CAP * K_CAP + 3) // 4 * 4  # ids per half, rounded: halves 16-byte aligned
    own = _heap_ptr(heap_bases, rank, off_publish + half * PUBLISHED * 4, tl.int32)
    _store_topk(topk_ptr, topk_ptr, num_tokens, own, K, K_PAD, K_CAP, TILE_T, False)
    signal(_heap_ptr(heap_bases, rank, off_publish_flags, tl.int64) + half, tag(e) << 32)


@triton.jit
def _find_slot(home_topk, src_info, base, row, row_begin, token, expert, mask,
               K: tl.constexpr, K_PAD: tl.constexpr, K_CAP: tl.constexpr):
    """Top-k position k of a row's (token, expert) selection in the home rank's published top-k row.
    The n-th row of one token inside an expert's block (blocks are in token order, so such rows are
    adjacent) takes the n-th k that selects the expert."""
    ks = tl.arange(0, K_PAD)
    back = ks[None, :] + 1
    earlier = mask[:, None] & (row[:, None] - back >= row_begin[:, None])
    earlier_token = tl.load(src_info + (base[:, None] - back), mask=earlier, other=-1)
    n = tl.sum((earlier_token == token[:, None]).to(tl.int32), axis=1)
    ids = tl.load(home_topk + token[:, None] * K_CAP + ks[None, :], mask=mask[:, None] & (ks[None, :] < K),
                  other=-1, cache_modifier=".cg")
    match = (ids == expert[:, None]).to(tl.int32)
    # matches before each k, as a sum over a [rows, k, j < k] tile: tl.cumsum along this axis of a small tile
    # hits an assertion in Triton 3.6's scan lowering for sm_90 (interpreter-sized tiles, 4 warps)
    earlier_k = ks[None, None, :] < ks[None, :, None]
    occurrence = tl.sum(tl.where(earlier_k, match[:, None, :], 0), axis=2)
    hit = (match > 0) & (occurrence == n[:, None])
    return tl.max(tl.where(hit, ks[None, :], -1), axis=1)


@triton.jit
def _combine_send(pid, e, x_ptr, x_expert_stride, x_row_stride, topk_ptr, num_tokens, src_info, topk_slot,
                  layout_range, heap_bases, error_address, rank, num_local, rows_per_expert, num_groups, budget,
                  off_combine, off_aux, aux_half, off_flags, off_publish, off_publish_flags,
                  H: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, R: tl.constexpr, T_CAP: tl.constexpr,
                  K_CAP: tl.constexpr, G_STRIDE: tl.constexpr, ROW_BYTES: tl.constexpr, L_PAD: tl.constexpr,
                  HAS_SLOTS: tl.constexpr, LOGFMT: tl.constexpr, META_STRIDE: tl.constexpr,
                  USE_TIMER: tl.constexpr, TILE_R: tl.constexpr, BLOCK_H: tl.constexpr, PHASE_CODE: tl.constexpr,
                  stamps, STAMPS: tl.constexpr):
    _stamp(stamps, 0, STAMPS)
    home = pid // num_groups
    group = pid % num_groups
    half = e % 2
    if not HAS_SLOTS:
        if pid == 0:
            _publish_topk(topk_ptr, num_tokens, heap_bases, rank, half, e, off_publish, off_publish_flags,
                          K, K_PAD, T_CAP, K_CAP, TILE_R)

    # the rows received from `home`, local expert by local expert; this program takes chunk `group`
    les = tl.arange(0, L_PAD)
    lmask = les < num_local
    counts = (tl.load(layout_range + les * R + home, mask=lmask, other=0) & 0xFFFFFFFF).to(tl.int32)
    inclusive = tl.cumsum(counts, axis=0)
    total = tl.sum(counts, axis=0)
    per_group = tl.cdiv(total, num_groups)
    i0 = tl.minimum(group * per_group, total)
    i1 = tl.minimum(i0 + per_group, total)

    ok = True
    if not HAS_SLOTS:
        publish_flag = _heap_ptr(heap_bases, home, off_publish_flags, tl.int64) + half
        ok, _, _ = _wait_flags(publish_flag, 1, 1, tag(e), tag(e), budget, error_address, PHASE_CODE, rank,
                               home, 1, 1, 1, USE_TIMER)
        PUBLISHED: tl.constexpr = (T_CAP * K_CAP + 3) // 4 * 4
        home_topk = _heap_ptr(heap_bases, home, off_publish + half * PUBLISHED * 4, tl.int32)
    if ok:
        dst = _heap_ptr(heap_bases, home, off_combine + half * T_CAP * K_CAP * ROW_BYTES, tl.bfloat16)
        dst_meta = _heap_ptr(heap_bases, home, off_aux + half * aux_half, tl.int32)
        start = i0
        while start < i1:
            idx = start + tl.arange(0, TILE_R)
            imask = idx < i1
            local_expert = tl.sum(((inclusive[None, :] <= idx[:, None]) & lmask[None, :]).to(tl.int32), axis=1)
            before = tl.sum(tl.where(les[None, :] < local_expert[:, None], counts[None, :], 0), axis=1)
            row_begin = (tl.load(layout_range + local_expert * R + home, mask=imask, other=0) >> 32).to(tl.int32)
            row = row_begin + idx - before
            base = local_expert.to(tl.int64) * rows_per_expert + row
            token = tl.load(src_info + base, mask=imask, other=0)
            if HAS_SLOTS:
                k = tl.load(topk_slot + base, mask=imask, other=0).to(tl.int32)
            else:
                k = _find_slot(home_topk, src_info, base, row, row_begin, token, rank * num_local + local_expert,
                               imask, K, K_PAD, K_CAP)
            smask = imask & (k >= 0)
            slot = (token * K_CAP + k).to(tl.int64)
            x_rows = local_expert.to(tl.int64) * x_expert_stride + row.to(tl.int64) * x_row_stride
            if LOGFMT:  # a runtime loop: the encoder unrolled per chunk would overflow the instruction cache
                for h0 in tl.range(0, H, BLOCK_H):
                    _logfmt_send(x_ptr, x_rows, dst, dst_meta, slot, smask, h0, H, ROW_BYTES, META_STRIDE, BLOCK_H)
            else:
                for h0 in tl.static_range(0, H, BLOCK_H):  # unrolled: all loads in flight at once
                    cols = h0 + tl.arange(0, BLOCK_H)
                    mask = smask[:, None] & (cols[None, :] < H)
                    y = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=mask)
                    tl.store(dst + slot[:, None] * (ROW_BYTES // 2) + cols[None, :], y, mask=mask)
            start += TILE_R
    flags = _heap_ptr(heap_bases, home, off_flags, tl.int64)
    signal(flags + (half * R + rank) * G_STRIDE + group, (tag(e) << 32) | (i1 - i0))
    _stamp(stamps, 1, STAMPS)


@triton.jit
def _push_topk(topk_ptr, weights_ptr, num_tokens, heap_bases, rank, dst, half, e, off_aux, aux_half,
               off_weights_flags, K: tl.constexpr, K_PAD: tl.constexpr, R: tl.constexpr, T_CAP: tl.constexpr,
               K_CAP: tl.constexpr, TILE_T: tl.constexpr):
    """This rank's combine top-k (ids and weights) into dst's heap at [half][this rank], then raise dst's
    weight flag."""
    HOME_RECORDS: tl.constexpr = (T_CAP * K_CAP + 1) // 2 * 2  # even: each home's block is 16-byte aligned
    records = _heap_ptr(heap_bases, dst, off_aux + half * aux_half + rank * HOME_RECORDS * 8, tl.int64)
    _store_topk(topk_ptr, weights_ptr, num_tokens, records, K, K_PAD, K_CAP, TILE_T, True)
    signal(_heap_ptr(heap_bases, dst, off_weights_flags, tl.int64) + half * R + rank, tag(e) << 32)


@triton.jit
def _combine_send_reduced(pid, e, x_ptr, x_expert_stride, x_row_stride, topk_ptr, weights_ptr, num_tokens,
                          row_map, heap_bases, error_address, rank, num_local, rows_per_expert, num_groups, budget,
                          off_combine, off_flags, off_aux, aux_half, off_weights_flags, H: tl.constexpr,
                          K: tl.constexpr, K_PAD: tl.constexpr, R: tl.constexpr, T_CAP: tl.constexpr,
                          K_CAP: tl.constexpr, G_STRIDE: tl.constexpr, ROW_BYTES: tl.constexpr, USE_TIMER: tl.constexpr,
                          TILE_T: tl.constexpr, BLOCK_H: tl.constexpr, PHASE_CODE: tl.constexpr, stamps,
                          STAMPS: tl.constexpr):
    """Pre-reducing send: program (h, g) takes chunk g of home h's tokens; per token, the m of its top-k
    entries this rank answers decide what goes to h's combine region at slots (token, 2 * this rank) and the
    next one (4H bytes): m = 1: that row as it is (bf16, the home weights it); m >= 2: the fp32 sum, in k
    order, of w[t, k] * y over those k. The weights come from h (pushed by h's program (this rank, 0), as this
    rank's program (h, 0) pushes its own to h)."""
    _stamp(stamps, 0, STAMPS)
    home = pid // num_groups
    group = pid % num_groups
    half = e % 2
    if group == 0:
        _push_topk(topk_ptr, weights_ptr, num_tokens, heap_bases, rank, home, half, e, off_aux, aux_half,
                   off_weights_flags, K, K_PAD, R, T_CAP, K_CAP, 32)
    home_tokens = tl.load(row_map + home)
    per_group = tl.cdiv(home_tokens, num_groups)
    t_begin = tl.minimum(group * per_group, home_tokens)
    t_end = tl.minimum(t_begin + per_group, home_tokens)
    weight_flag = _heap_ptr(heap_bases, rank, off_weights_flags, tl.int64) + half * R + home
    ok, _, _ = _wait_flags(weight_flag, 1, 1, tag(e), tag(e), budget, error_address, PHASE_CODE, rank, home, 1, 1,
                           1, USE_TIMER)
    if ok:
        HOME_RECORDS: tl.constexpr = (T_CAP * K_CAP + 1) // 2 * 2
        records = _heap_ptr(heap_bases, rank, off_aux + half * aux_half + home * HOME_RECORDS * 8, tl.int64)
        dst_row = _heap_ptr(heap_bases, home, off_combine + half * T_CAP * K_CAP * ROW_BYTES, tl.bfloat16)
        dst_sum = _heap_ptr(heap_bases, home, off_combine + half * T_CAP * K_CAP * ROW_BYTES, tl.float32)
        home_map = row_map + R + home * (rows_per_expert // R) * K
        ks = tl.arange(0, K_PAD)
        start = t_begin
        while start < t_end:
            tokens = start + tl.arange(0, TILE_T)
            kmask = (tokens[:, None] < t_end) & (ks[None, :] < K)
            record = tl.load(records + tokens[:, None] * K_CAP + ks[None, :], mask=kmask, other=-1 << 32,
                             cache_modifier=".cg")
            ids = (record >> 32).to(tl.int32)  # the home's combine-time ids: -1 entries are skipped
            mine = (ids >= 0) & (ids // num_local == rank)
            rows = tl.load(home_map + tokens[:, None] * K + ks[None, :], mask=mine, other=-1)
            # a row outside the outputs (a map entry no dispatch wrote: ids changed since) is skipped too
            rows = tl.where((rows >= 0) & (rows < num_local * rows_per_expert), rows, -1)
            weights = (record & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
            answered = tl.sum((rows >= 0).to(tl.int32), axis=1)
            slot = (tokens * K_CAP + 2 * rank).to(tl.int64)
            for h0 in tl.static_range(0, H, BLOCK_H):  # unrolled: all loads in flight at once
                cols = h0 + tl.arange(0, BLOCK_H)
                cmask = cols < H
                acc = tl.zeros([TILE_T, BLOCK_H], dtype=tl.float32)
                row_as_is = tl.zeros([TILE_T, BLOCK_H], dtype=tl.float32)
                for k in tl.static_range(K):
                    row, w = _topk_column(rows, weights, k, K_PAD)
                    valid = row >= 0
                    x_rows = (row // rows_per_expert).to(tl.int64) * x_expert_stride + (
                        row % rows_per_expert).to(tl.int64) * x_row_stride
                    y = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=valid[:, None] & cmask[None, :],
                                other=0.0).to(tl.float32)
                    acc = tl.where(valid[:, None], acc + w[:, None] * y, acc)
                    row_as_is = tl.where(valid[:, None], y, row_as_is)
                tl.store(dst_row + slot[:, None] * (ROW_BYTES // 2) + cols[None, :], row_as_is.to(tl.bfloat16),
                         mask=(answered == 1)[:, None] & cmask[None, :])
                tl.store(dst_sum + slot[:, None] * (ROW_BYTES // 4) + cols[None, :], acc,
                         mask=(answered >= 2)[:, None] & cmask[None, :])
            start += TILE_T
    flags = _heap_ptr(heap_bases, home, off_flags, tl.int64)
    signal(flags + (half * R + rank) * G_STRIDE + group, (tag(e) << 32) | (t_end - t_begin))
    _stamp(stamps, 1, STAMPS)


@triton.jit
def _combine_receive(pid_t, pid_h, e, out_ptr, topk_ptr, weights_ptr, num_tokens, wait_stats, heap_bases,
                     error_address, rank, num_local, num_groups, budget, off_combine, off_aux, aux_half, off_flags,
                     H: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
                     G_STRIDE: tl.constexpr, G_PAD: tl.constexpr, T_CAP: tl.constexpr, K_CAP: tl.constexpr,
                     ROW_BYTES: tl.constexpr, PREREDUCE: tl.constexpr, LOGFMT: tl.constexpr,
                     META_STRIDE: tl.constexpr,
                     HAS_WAIT_STATS: tl.constexpr, EXACT_CASTS: tl.constexpr,
                     USE_TIMER: tl.constexpr, TILE_T: tl.constexpr, BLOCK_H: tl.constexpr,
                     HIDDEN_PARTS: tl.constexpr, PHASE_CODE: tl.constexpr, stamps, STAMPS: tl.constexpr):
    _stamp(stamps, 0, STAMPS)
    half = e % 2
    flags = _heap_ptr(heap_bases, rank, off_flags, tl.int64) + half * R * G_STRIDE
    ok, waited, _ = _wait_flags(flags, R, num_groups, tag(e), tag(e), budget, error_address, PHASE_CODE, rank,
                                0, R_PAD, G_PAD, G_STRIDE, USE_TIMER)
    _stamp(stamps, 1, STAMPS)
    if ok:
        if HAS_WAIT_STATS:
            if pid_t + pid_h == 0:
                owners = tl.arange(0, R_PAD)
                tl.atomic_add(wait_stats + owners, waited, mask=owners < R, sem="relaxed")
        region = _heap_ptr(heap_bases, rank, off_combine + half * T_CAP * K_CAP * ROW_BYTES, tl.bfloat16)
        region_meta = _heap_ptr(heap_bases, rank, off_aux + half * aux_half, tl.int32)
        tokens = pid_t * TILE_T + tl.arange(0, TILE_T)
        tmask = tokens < num_tokens
        ks = tl.arange(0, K_PAD)
        kmask = tmask[:, None] & (ks[None, :] < K)
        all_ids = tl.load(topk_ptr + tokens[:, None] * K + ks[None, :], mask=kmask, other=-1)
        all_weights = tl.load(weights_ptr + tokens[:, None] * K + ks[None, :], mask=kmask, other=0.0)
        CHUNKS: tl.constexpr = ((H + BLOCK_H - 1) // BLOCK_H + HIDDEN_PARTS - 1) // HIDDEN_PARTS
        if LOGFMT:
            # runtime loops: a decode unrolled per (chunk, k) would overflow the instruction cache
            for c in tl.range(0, CHUNKS):
                _logfmt_reduce(region, region_meta, out_ptr, tokens, tmask, all_ids, all_weights,
                               (pid_h + c * HIDDEN_PARTS) * BLOCK_H, H, K, K_PAD, K_CAP, ROW_BYTES, META_STRIDE,
                               TILE_T, BLOCK_H, EXACT_CASTS)
        elif PREREDUCE:
            # per owner r, in order: the m of the token's entries it answers say what its slots (token, 2r..2r+1)
            # hold: m = 1 its row as it is (weighted here), m >= 2 its fp32 sum
            owners = tl.arange(0, R_PAD)
            owner_of = tl.where(all_ids >= 0, all_ids.to(tl.int32) // num_local, -1)
            hits = owner_of[:, :, None] == owners[None, None, :]  # [TILE_T, K_PAD, R_PAD]
            answered = tl.sum(hits.to(tl.int32), axis=1)
            single_weight = tl.sum(tl.where(hits, all_weights[:, :, None], 0.0), axis=1)  # used where m = 1
            sums = _heap_ptr(heap_bases, rank, off_combine + half * T_CAP * K_CAP * ROW_BYTES, tl.float32)
            for c in tl.static_range(0, CHUNKS):
                cols = (pid_h + c * HIDDEN_PARTS) * BLOCK_H + tl.arange(0, BLOCK_H)
                cmask = cols < H
                acc = tl.zeros([TILE_T, BLOCK_H], dtype=tl.float32)
                for r in tl.static_range(R):
                    m = tl.sum(tl.where(owners[None, :] == r, answered, 0), axis=1)
                    w = tl.sum(tl.where(owners[None, :] == r, single_weight, 0.0), axis=1)
                    slot = (tokens * K_CAP + 2 * r).to(tl.int64)
                    y = tl.load(region + slot[:, None] * (ROW_BYTES // 2) + cols[None, :],
                                mask=(m == 1)[:, None] & cmask[None, :], other=0.0, cache_modifier=".cg")
                    partial = tl.load(sums + slot[:, None] * (ROW_BYTES // 4) + cols[None, :],
                                      mask=(m >= 2)[:, None] & cmask[None, :], other=0.0, cache_modifier=".cg")
                    acc = tl.where((m == 1)[:, None], acc + w[:, None] * y.to(tl.float32), acc)
                    acc = tl.where((m >= 2)[:, None], acc + partial, acc)
                tl.store(out_ptr + tokens[:, None].to(tl.int64) * H + cols[None, :], _to_bf16_bits(acc, EXACT_CASTS),
                         mask=tmask[:, None] & cmask[None, :])
        else:
            # chunk c of this program is hidden chunk pid_h + c * HIDDEN_PARTS; loops unrolled so that every
            # load is in flight at once
            for c in tl.static_range(0, CHUNKS):
                cols = (pid_h + c * HIDDEN_PARTS) * BLOCK_H + tl.arange(0, BLOCK_H)
                cmask = cols < H
                acc = tl.zeros([TILE_T, BLOCK_H], dtype=tl.float32)
                for k in tl.static_range(K):
                    ids, w = _topk_column(all_ids, all_weights, k, K_PAD)
                    valid = ids >= 0
                    slot = (tokens * K_CAP + k).to(tl.int64)
                    y = tl.load(region + slot[:, None] * (ROW_BYTES // 2) + cols[None, :],
                                mask=valid[:, None] & cmask[None, :], other=0.0, cache_modifier=".cg").to(tl.float32)
                    acc = tl.where(valid[:, None], acc + w[:, None] * y, acc)
                tl.store(out_ptr + tokens[:, None].to(tl.int64) * H + cols[None, :], _to_bf16_bits(acc, EXACT_CASTS),
                         mask=tmask[:, None] & cmask[None, :])
    _stamp(stamps, 2, STAMPS)


@triton.jit(do_not_specialize=["num_tokens", "rank", "budget"])
def ep_ll_combine_kernel(x_ptr, x_expert_stride, x_row_stride, topk_ptr, weights_ptr, num_tokens, out_ptr,
                         src_info, topk_slot, layout_range, row_map, wait_stats, heap_bases, epoch_ptr, arrivals_ptr,
                         error_address, stamps_ptr, rank, num_local, rows_per_expert, num_groups, num_senders, budget,
                         off_combine, off_aux, aux_half, off_flags, off_publish, off_publish_flags,
                         off_weights_flags, PHASE: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
                         K_PAD: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr, T_CAP: tl.constexpr,
                         K_CAP: tl.constexpr, G_STRIDE: tl.constexpr, G_PAD: tl.constexpr, ROW_BYTES: tl.constexpr,
                         L_PAD: tl.constexpr, HAS_SLOTS: tl.constexpr, PREREDUCE: tl.constexpr, LOGFMT: tl.constexpr,
                         META_STRIDE: tl.constexpr,
                         HAS_WAIT_STATS: tl.constexpr, EXACT_CASTS: tl.constexpr,
                         USE_TIMER: tl.constexpr, TILE_T: tl.constexpr, TILE_R: tl.constexpr,
                         BLOCK_H: tl.constexpr, HIDDEN_PARTS: tl.constexpr, PHASE_CODE: tl.constexpr,
                         STAMPS: tl.constexpr):
    pid, e, sending = _role(epoch_ptr, num_senders, PHASE)
    stamps = _stamp_row(stamps_ptr, num_senders, PHASE)
    if sending and PREREDUCE:
        _combine_send_reduced(pid, e, x_ptr, x_expert_stride, x_row_stride, topk_ptr, weights_ptr, num_tokens,
                              row_map, heap_bases, error_address, rank, num_local, rows_per_expert, num_groups,
                              budget, off_combine, off_flags, off_aux, aux_half, off_weights_flags, H, K, K_PAD, R,
                              T_CAP, K_CAP, G_STRIDE, ROW_BYTES, USE_TIMER, TILE_R, BLOCK_H, PHASE_CODE, stamps, STAMPS)
    elif sending:
        _combine_send(pid, e, x_ptr, x_expert_stride, x_row_stride, topk_ptr, num_tokens, src_info, topk_slot,
                      layout_range, heap_bases, error_address, rank, num_local, rows_per_expert, num_groups, budget,
                      off_combine, off_aux, aux_half, off_flags, off_publish, off_publish_flags,
                      H, K, K_PAD, R, T_CAP, K_CAP, G_STRIDE, ROW_BYTES, L_PAD, HAS_SLOTS, LOGFMT, META_STRIDE,
                      USE_TIMER, TILE_R, BLOCK_H, PHASE_CODE, stamps, STAMPS)
    else:
        # receive programs: (token tile, hidden part), part fastest
        _combine_receive(pid // HIDDEN_PARTS, pid % HIDDEN_PARTS, e, out_ptr, topk_ptr, weights_ptr, num_tokens,
                         wait_stats, heap_bases, error_address, rank, num_local, num_groups, budget, off_combine,
                         off_aux, aux_half, off_flags, H, K, K_PAD, R, R_PAD, G_STRIDE, G_PAD, T_CAP, K_CAP, ROW_BYTES,
                         PREREDUCE, LOGFMT, META_STRIDE, HAS_WAIT_STATS,
                         EXACT_CASTS, USE_TIMER, TILE_T, BLOCK_H, HIDDEN_PARTS, PHASE_CODE, stamps, STAMPS)
    _end(epoch_ptr, arrivals_ptr, e, PHASE)
