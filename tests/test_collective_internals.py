"""Internals of the collective backend (flashep/backends/collective.py), driven directly on gloo ranks.

The API-level suites go through `flashep.Buffer`; these tests call the backend itself, check every field
of the routing it builds (full rank prefix matrix, channel matrices, send_head, the cached exchange
plan) against loops over all ranks' inputs, and compare the data with `flashep.reference` bit for bit.
Every rank regenerates any rank's inputs from the shared seed, so no inputs travel between ranks.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from flashep import reference
from flashep.backends.base import Routing
from flashep.backends.collective import CollectiveBackend, _quantize_words, _true_indices
from harness import assert_same, generator, run_ranks

HIDDEN = 64
NUM_CHANNELS = 3


def _backend(rank: int, world_size: int, group) -> CollectiveBackend:
    return CollectiveBackend(SimpleNamespace(group=group, rank=rank, group_size=world_size,
                                             device=torch.device("cpu")))


def _num_tokens(seed: int, rank: int, world_size: int, most: int) -> int:
    """Differs per rank; the last of three or more ranks has no tokens."""
    if world_size >= 3 and rank == world_size - 1:
        return 0
    return int(torch.randint(1, most + 1, (1,), generator=generator(seed, rank, 1)))


def _topk(seed: int, rank: int, num_tokens: int, num_experts: int, k: int, skewed: bool,
          dtype=torch.int64) -> torch.Tensor:
    g = generator(seed, rank, 2)
    if skewed:  # every token picks expert 0 and nothing else
        idx = torch.full((num_tokens, k), -1, dtype=torch.int64)
        idx[:, 0] = 0
        return idx.to(dtype)
    idx = torch.rand(num_tokens, num_experts, generator=g).topk(k, dim=1).indices
    idx[torch.rand(num_tokens, k, generator=g) < 0.2] = -1
    return idx.to(dtype)


def _bf16(seed: int, *keys: int, shape) -> torch.Tensor:
    return torch.randn(*shape, generator=generator(seed, *keys)).to(torch.bfloat16)


def _fp8_input(seed: int, rank: int, num_tokens: int, int_scales: bool):
    """(fp8 [T, H], scales [T, S]) with non-row-major scales: column-major float32, or a strided int32 view."""
    g = generator(seed, rank, 3)
    data = torch.randn(num_tokens, HIDDEN, generator=g).to(torch.float8_e4m3fn)
    if int_scales:
        scales = torch.randint(-2**31, 2**31 - 1, (num_tokens, 6), generator=g, dtype=torch.int32)[:, ::3]
    else:
        scales = torch.rand(3, num_tokens, generator=g).t()
    return data, scales


# ---- single-process helpers ---------------------------------------------------------------------------------
def test_true_indices_matches_nonzero(seed):
    g = generator(seed, 0)
    for size in (0, 1, 7, 100):
        mask = torch.rand(size, generator=g) < 0.4
        expected = mask.nonzero().flatten()
        assert_same(_true_indices(mask, expected.numel()), expected, f"true indices of a {size}-mask")


@pytest.mark.parametrize("round_scale,use_ue8m0", [(False, False), (True, False), (True, True)])
def test_quantize_words_match_the_oracle(seed, round_scale, use_ue8m0):
    x = (_bf16(seed, 0, shape=(5, 1024)).float() * torch.logspace(-6, 4, 8).repeat_interleave(128)).bfloat16()
    x[1, :128] = 0  # amax floor
    data, scales = _quantize_words(x, True, round_scale, use_ue8m0)
    q, s = reference.quantize_low_latency(x, round_scale, use_ue8m0)
    assert_same(data.view(torch.float8_e4m3fn), q, "fp8 data")
    assert_same(scales.view(s.dtype), s, "scales")


def test_round_scale_is_exact_at_powers_of_two():
    x = torch.zeros(1, 512, dtype=torch.bfloat16)
    x[0, 0] = 448 * 2.0**-3  # exactly 2^-3 * 448: e = -3
    x[0, 128] = 448 * 2.0**-3 * 1.5  # just above: e = -2
    x[0, 256] = 448 * 2.0**5  # e = 5
    x[0, 384] = -448.0  # e = 0
    _, scales = _quantize_words(x, True, True, False)
    assert scales.view(torch.float32).tolist() == [[2.0**-3, 2.0**-2, 2.0**5, 1.0]]
    _, packed = _quantize_words(x, True, True, True)
    assert packed.view(torch.uint8).tolist() == [[127 - 3, 127 - 2, 127 + 5, 127]]  # group j in byte j


def test_bf16_words_are_the_raw_rows(seed):
    x = _bf16(seed, 0, shape=(3, 256))
    data, scales = _quantize_words(x, False, False, False)
    assert_same(data.view(torch.bfloat16), x, "bf16 payload")
    assert scales.shape == (3, 0)


# ---- normal mode -------------------------------------------------------------------------------------------
def _expected_routing(rank, world_size, memberships):
    """Full rank prefix matrix, channel matrices and send_head from every rank's is_token_in_rank."""
    counts = torch.tensor([[int(m[:, j].sum()) for j in range(world_size)] for m in memberships])
    mine = memberships[rank]
    num_tokens = mine.size(0)
    per_channel = max(1, -(-num_tokens // NUM_CHANNELS))
    channel_prefix = torch.zeros(world_size, NUM_CHANNELS, dtype=torch.int32)
    send_head = torch.full((num_tokens, world_size), -1, dtype=torch.int32)
    for j in range(world_size):
        sent = 0
        for t in range(num_tokens):
            if mine[t, j]:
                channel_prefix[j, t // per_channel:] += 1
                send_head[t, j] = sent
                sent += 1
    recv_channel_prefix = torch.zeros(world_size, NUM_CHANNELS, dtype=torch.int32)
    for s, theirs in enumerate(memberships):
        per_channel_s = max(1, -(-theirs.size(0) // NUM_CHANNELS))
        for c in range(NUM_CHANNELS):
            recv_channel_prefix[s, c] = int(theirs[:c * per_channel_s, rank].sum())
    return counts.cumsum(0).to(torch.int32), channel_prefix, recv_channel_prefix, send_head


def _check_dispatch(result, expect, what, num_recv, rows=None):
    rows = rows or num_recv
    assert result.recv_x.shape[0] == rows, f"{what}: {result.recv_x.shape[0]} rows, expected {rows}"
    assert_same(result.recv_x[:num_recv], expect.recv_x, f"{what}: recv_x")
    if expect.recv_x_scales is not None:
        assert result.recv_x_scales.is_contiguous()
        assert_same(result.recv_x_scales[:num_recv], expect.recv_x_scales, f"{what}: scales")


def _normal_suite(rank, world_size, group, seed, skewed, topk_dtype):
    backend = _backend(rank, world_size, group)
    num_experts, k = 3 * world_size, min(3, 3 * world_size)
    tokens = [_num_tokens(seed, s, world_size, 12) for s in range(world_size)]
    topks = [_topk(seed, s, tokens[s], num_experts, k, skewed, topk_dtype) for s in range(world_size)]
    weights = [torch.rand(tokens[s], k, generator=generator(seed, s, 4)) for s in range(world_size)]
    xs = [_bf16(seed, s, 5, shape=(tokens[s], HIDDEN)) for s in range(world_size)]

    # layout
    per_rank, per_expert, in_rank = backend.get_dispatch_layout(topks[rank], num_experts)
    want = reference.layout(topks[rank], num_experts, world_size)
    assert_same(per_rank, want[0], "num_tokens_per_rank")
    assert_same(per_expert, want[2], "num_tokens_per_expert")
    assert_same(in_rank, want[3], "is_token_in_rank")
    memberships = [reference.layout(t, num_experts, world_size)[3] for t in topks]
    layout_args = (per_rank, in_rank, per_expert)

    # dispatch with top-k, BF16
    expects = reference.dispatch(xs, topks, weights, num_experts, expert_alignment=4)
    expect = expects[rank]
    num_recv = expect.recv_x.size(0)
    result = backend.dispatch(xs[rank], None, topks[rank], weights[rank], *layout_args, 4, 0, NUM_CHANNELS, None)
    _check_dispatch(result, expect, "bf16 dispatch", num_recv)
    assert_same(result.recv_topk_idx, expect.recv_topk_idx, "recv_topk_idx")
    assert_same(result.recv_topk_weights, expect.recv_topk_weights, "recv_topk_weights")
    assert result.num_recv_tokens_per_expert == expect.num_recv_tokens_per_expert
    routing = result.routing
    assert_same(routing.recv_src_idx, expect.recv_src_idx.to(torch.int32), "recv_src_idx")
    assert_same(routing.rank_prefix_matrix[:, rank], expect.rank_prefix, "rank prefix column")
    full, channel_prefix, recv_channel_prefix, send_head = _expected_routing(rank, world_size, memberships)
    assert routing.full_matrix and routing.rank_prefix_matrix._flashep_full
    assert_same(routing.rank_prefix_matrix, full, "full rank prefix matrix")
    assert_same(routing.channel_prefix_matrix, channel_prefix, "channel_prefix_matrix")
    assert_same(routing.recv_channel_prefix_matrix, recv_channel_prefix, "recv_channel_prefix_matrix")
    assert_same(routing.send_head, send_head, "send_head")
    assert routing.is_token_in_rank is in_rank
    plan = routing.send_head._flashep_plan
    assert plan.send_counts == memberships[rank].sum(0).tolist()
    assert plan.recv_counts == torch.diff(expect.rank_prefix, prepend=torch.zeros(1, dtype=torch.int32)).tolist()

    # FP8 without top-k: scales with any strides come out row-major, bytes unchanged
    for int_scales in (False, True):
        fp8 = [_fp8_input(seed, s, tokens[s], int_scales) for s in range(world_size)]
        fp8_expect = reference.dispatch(fp8, topks, None, num_experts)[rank]
        got = backend.dispatch(fp8[rank][0], fp8[rank][1], None, None, *layout_args, 1, 0, NUM_CHANNELS, None)
        _check_dispatch(got, fp8_expect, f"fp8 dispatch (int scales {int_scales})", num_recv)
        assert got.recv_topk_idx is None and got.recv_topk_weights is None
        assert got.num_recv_tokens_per_expert == reference.dispatch(xs, topks, None, num_experts)[rank] \
            .num_recv_tokens_per_expert

    # worst-case rows: a valid prefix, -1 / 0 tails, no per-expert list
    worst = sum(tokens)
    got = backend.dispatch(xs[rank], None, topks[rank], weights[rank], *layout_args, 1, worst, NUM_CHANNELS, None)
    _check_dispatch(got, expect, "worst-token dispatch", num_recv, rows=worst)
    assert got.num_recv_tokens_per_expert == []
    assert_same(got.recv_topk_idx[:num_recv], expect.recv_topk_idx, "worst recv_topk_idx prefix")
    assert bool((got.recv_topk_idx[num_recv:] == -1).all()) and bool((got.recv_topk_weights[num_recv:] == 0).all())
    assert got.routing.num_recv_rows == worst and bool((got.routing.recv_src_idx[num_recv:] == -1).all())
    worst_routing = got.routing
    most = max(e.recv_x.size(0) for e in expects)
    if most > 1:  # every rank raises, not only the one that overflows
        with pytest.raises(ValueError, match="num_worst_tokens"):
            backend.dispatch(xs[rank], None, topks[rank], weights[rank], *layout_args, 1, most - 1, NUM_CHANNELS,
                             None)

    # cached: another dtype and hidden size with the same routing, no count exchange
    xs_wide = [_bf16(seed, s, 6, shape=(tokens[s], 2 * HIDDEN)) for s in range(world_size)]
    wide_expect = reference.dispatch(xs_wide, topks, None, num_experts)[rank]
    for cached, rows in ((routing, num_recv), (worst_routing, worst)):
        got = backend.dispatch(xs_wide[rank], None, None, None, None, None, None, 1, 0, NUM_CHANNELS, cached)
        _check_dispatch(got, wide_expect, "cached dispatch", num_recv, rows=rows)
        assert got.routing is None and got.recv_topk_idx is None and got.num_recv_tokens_per_expert is None
    fp8 = [_fp8_input(seed, s, tokens[s], False) for s in range(world_size)]
    got = backend.dispatch(fp8[rank][0], fp8[rank][1], None, None, None, None, None, 1, 0, NUM_CHANNELS, routing)
    _check_dispatch(got, reference.dispatch(fp8, topks, None, num_experts)[rank], "cached fp8 dispatch", num_recv)

    # combine: canonical fp32 order, biases, weights; only the valid prefix of a worst-case x is read
    recv_rows = [e.recv_x.size(0) for e in expects]
    ys = [_bf16(seed, j, 7, shape=(recv_rows[j], HIDDEN)) for j in range(world_size)]
    ws = [torch.rand(recv_rows[j], k, generator=generator(seed, j, 8)) for j in range(world_size)]
    biases = [(_bf16(seed, s, 9, shape=(tokens[s], HIDDEN)), _bf16(seed, s, 10, shape=(tokens[s], HIDDEN)))
              for s in range(world_size)]
    for bias_case in ((None, None), (biases[rank][0], None), biases[rank]):
        per_rank_biases = [(b[0] if bias_case[0] is not None else None, b[1] if bias_case[1] is not None else None)
                           for b in biases]
        want_x, want_w = reference.combine(ys, topks, num_experts, ws, per_rank_biases)[rank]
        got_x, got_w = backend.combine(ys[rank], routing, ws[rank], *bias_case)
        assert_same(got_x, want_x, f"combined_x (biases {[b is not None for b in bias_case]})")
        assert_same(got_w, want_w, "combined_topk_weights")
    want_x, _ = reference.combine(ys, topks, num_experts)[rank]
    padded = torch.full((worst, HIDDEN), float("nan"), dtype=torch.bfloat16)
    padded[:num_recv] = ys[rank]
    got_x, got_w = backend.combine(padded, worst_routing, None, None, None)
    assert_same(got_x, want_x, "combine through a worst-case handle")
    assert got_w is None
    # a handle without the cached plan (rebuilt by the caller) derives it
    rebuilt = Routing(routing.rank_prefix_matrix.clone(), routing.channel_prefix_matrix,
                      routing.recv_channel_prefix_matrix, routing.recv_src_idx, routing.is_token_in_rank,
                      routing.send_head.clone())
    assert_same(backend.combine(ys[rank], rebuilt, None, None, None)[0], want_x, "combine, plan derived")


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_normal_mode(seed, world_size):
    run_ranks(world_size, _normal_suite, seed, False, torch.int64)


@pytest.mark.parametrize("world_size", [2, 3])
def test_normal_mode_skewed_int32_topk(seed, world_size):
    run_ranks(world_size, _normal_suite, seed, True, torch.int32)


# ---- low-latency mode --------------------------------------------------------------------------------------
LL_MODES = [(False, False, False), (True, False, False), (True, True, False), (True, True, True)]
LL_HIDDEN = 512
T_MAX = 6


def _ll_inputs(seed, rank, world_size, num_experts, k):
    # rank 0 sends at most T_MAX - 1 tokens, so that its token listing one expert exactly twice cannot
    # overflow that expert's R * T_MAX rows
    num_tokens = _num_tokens(seed, rank, world_size, T_MAX - 1 if rank == 0 else T_MAX)
    idx = _topk(seed, rank, num_tokens, num_experts, k, skewed=False)
    if rank == 0 and num_tokens:
        idx[0, idx[0] == 1] = -1  # the draw may have picked expert 1 already: then it would be listed 3 times
        idx[0, 1] = idx[0, 0] = 1
    groups = torch.logspace(-3, 2, LL_HIDDEN // 128).repeat_interleave(128)
    x = (_bf16(seed, rank, 12, shape=(num_tokens, LL_HIDDEN)).float() * groups).to(torch.bfloat16)
    if num_tokens:
        x[0, 128:256] = 0
    weights = torch.rand(num_tokens, k, generator=generator(seed, rank, 13))
    return x, idx, weights


def _low_latency_suite(rank, world_size, group, seed):
    backend = _backend(rank, world_size, group)
    num_experts, k = 2 * world_size, min(4, 2 * world_size)
    num_local, slots = 2, world_size * T_MAX
    inputs = [_ll_inputs(seed, s, world_size, num_experts, k) for s in range(world_size)]
    xs, topks, weights = ([i[n] for i in inputs] for n in range(3))

    for use_fp8, round_scale, use_ue8m0 in LL_MODES:
        what = f"fp8={use_fp8} round_scale={round_scale} ue8m0={use_ue8m0}"
        expect = reference.low_latency_dispatch(xs, topks, num_experts, use_fp8, round_scale, use_ue8m0)[rank]
        stats = torch.randint(0, 100, (num_local,), dtype=torch.int32)
        stats_before = stats.clone()
        wait = torch.randint(0, 100, (world_size,), dtype=torch.int64)
        wait_before = wait.clone()
        result = backend.low_latency_dispatch(xs[rank], topks[rank], T_MAX, num_experts, use_fp8, round_scale,
                                              use_ue8m0, stats, wait, True)
        assert_same(stats, stats_before, f"{what}: stats before the receive phase")
        result.receive()
        assert_same(result.recv_count, expect.recv_count, f"{what}: recv_count")
        assert_same(stats, stats_before + expect.recv_count, f"{what}: cumulative stats")
        assert_same(wait, wait_before, f"{what}: wait cost stats (always 0 here)")
        assert result.recv_x.shape == (num_local, slots, LL_HIDDEN)
        if use_fp8:
            num_scales = LL_HIDDEN // 512 if use_ue8m0 else LL_HIDDEN // 128
            scales = result.recv_x_scales
            assert scales.shape == (num_local, slots, num_scales)
            assert scales.stride() == (num_scales * slots, 1, slots), "scales must be column-major"
            recv_x = (result.recv_x, scales)
        else:
            assert result.recv_x_scales is None
            recv_x = result.recv_x
        handle = (result.src_info, result.layout_range, T_MAX, LL_HIDDEN, num_experts)
        got = reference.canonical_low_latency_rows(recv_x, result.recv_count, handle, world_size)
        for i in range(num_local):
            count = int(expect.recv_count[i])
            assert_same(got.src_rank[i], expect.src_rank[i], f"{what}: expert {i} source ranks")
            assert_same(got.src_idx[i], expect.src_idx[i], f"{what}: expert {i} source tokens")
            assert_same(got.data[i], expect.data[i], f"{what}: expert {i} data")
            if use_fp8:
                assert_same(got.scales[i], expect.scales[i], f"{what}: expert {i} scales")
            # this backend already writes rows in the canonical order, and -1 past the valid rows
            assert_same(result.src_info[i, :count], expect.src_idx[i].to(torch.int32), f"{what}: row order")
            assert bool((result.src_info[i, count:] == -1).all())

        # combine: weighted fp32 sum in k order against the oracle; one selection masked at combine time
        infos = [torch.empty_like(result.src_info) for _ in range(world_size)]
        ranges = [torch.empty_like(result.layout_range) for _ in range(world_size)]
        dist.all_gather(infos, result.src_info, group=group)
        dist.all_gather(ranges, result.layout_range, group=group)
        handles = [(infos[d], ranges[d], T_MAX, LL_HIDDEN, num_experts) for d in range(world_size)]
        ys = [_bf16(seed, d, 14, shape=(num_local, slots, LL_HIDDEN)) for d in range(world_size)]
        combine_topks = [t.clone() for t in topks]
        for t in combine_topks:
            chosen = (t >= 0).nonzero()
            if chosen.size(0):
                t[tuple(chosen[-1].tolist())] = -1
        want = reference.low_latency_combine(ys, handles, combine_topks, weights, num_experts)[rank]
        for zero_copy in (False, True):
            x = ys[rank]
            if zero_copy:
                buffer = backend.get_next_low_latency_combine_buffer(T_MAX, LL_HIDDEN, num_experts)
                assert buffer.stride() == (slots * (LL_HIDDEN + LL_HIDDEN // 64), LL_HIDDEN + LL_HIDDEN // 64, 1)
                assert buffer is backend.get_next_low_latency_combine_buffer(T_MAX, LL_HIDDEN, num_experts)
                buffer.copy_(ys[rank])
                x = torch.full_like(ys[rank], float("nan"))  # must not be read
            out = torch.full((xs[rank].size(0), LL_HIDDEN), float("nan"), dtype=torch.bfloat16)
            receive = backend.low_latency_combine(x, combine_topks[rank], weights[rank], handle, zero_copy, out,
                                                  None, True)
            receive()
            assert_same(out, want, f"{what}: low-latency combine (zero_copy={zero_copy})")
    if world_size == 1:  # more rows for one expert than R * T_max: only possible with repeated ids
        repeated = torch.zeros(T_MAX, k, dtype=torch.int64)
        x = _bf16(seed, 0, 15, shape=(T_MAX, LL_HIDDEN))
        with pytest.raises(ValueError, match="topk_idx: local expert 0 of rank 0 would receive"):
            backend.low_latency_dispatch(x, repeated, T_MAX, num_experts, False, False, False, None, None, False)
    backend.clean_low_latency_buffer(T_MAX, LL_HIDDEN, num_experts)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_low_latency_mode(seed, world_size):
    run_ranks(world_size, _low_latency_suite, seed)
