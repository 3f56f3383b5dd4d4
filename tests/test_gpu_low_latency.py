"""GPU extras for the Triton low-latency backend, through the public Buffer API (`pytest -m gpu`, 1, 2 and 4 GPUs;
one GPU runs a group of one rank).

DeepSeek-V3 decode shapes (128 tokens, hidden 7168, top-8 of 256 or 288 experts): every assertion of
DeepEP's low-latency test (with its LogFMT inputs and bound), hooks with a large matmul between send and hook,
CUDA-graph capture of dispatch + combine (BF16 and LogFMT) replayed with new data, 20 reruns bit-identical
(also with ranks sleeping at random between calls, so that they run apart), 0..T_max tokens per rank
against the oracle (fixed per rank, and drawn anew every call), and the profiler seeing one kernel name per
operation. The pre-reducing combine (the default) against its oracle; DeepEP's assertions, CUDA graphs and the
reruns with it and with the plain one (FLASHEP_LL_PREREDUCE=0).
"""
import os
import random
import time

import pytest
import torch
import torch.distributed as dist

import flashep
from flashep import logfmt, reference
from flashep.fp8 import calc_diff, per_token_cast_back
from harness import (TRITON_LOW_LATENCY, TRITON_NORMAL, CombineLaunches, assert_same, generator, gpu_world, run_ranks,
                     triton_available)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not triton_available(TRITON_NORMAL, TRITON_LOW_LATENCY),
                                                  reason="Triton backends missing")]

WORLDS = [gpu_world(1), gpu_world(2), gpu_world(4)]  # one GPU: a group of one runs the same kernels
T_MAX, HIDDEN, TOPK = 128, 7168, 8
MATMUL = 8192  # the compute between a send and its hook (as DeepEP's benchmark: an 8192^2 fp32 matmul)
MODES = {"bf16": (False, False, False), "fp8": (True, False, False), "fp8_round": (True, True, False),
         "fp8_ue8m0": (True, True, True)}
PREREDUCE, PLAIN = {"FLASHEP_LL_PREREDUCE": "1"}, {"FLASHEP_LL_PREREDUCE": "0"}
COMBINES = [pytest.param(PLAIN, id="plain"), pytest.param(PREREDUCE, id="prereduce")]


def _buffer(group, world, num_experts, t_max=T_MAX, hidden=HIDDEN):
    hint = flashep.Buffer.get_low_latency_rdma_size_hint(t_max, hidden, world, num_experts)
    buffer = flashep.Buffer(group, 0, hint, low_latency_mode=True, num_qps_per_rank=num_experts // world,
                            explicitly_destroy=True)
    assert buffer.backend_name.endswith("/triton"), f"low-latency backend is {buffer.backend_name}"
    return buffer


def _device():
    return torch.device("cuda", torch.cuda.current_device())


def _routing(seed, rank, num_tokens, num_experts, step=0):
    """DeepEP's test routing: sorted top-k of |randn| + 1, weights |randn|, 10 random entries -1."""
    g = generator(seed, rank, step)
    idx = (torch.randn(num_tokens, num_experts, generator=g).abs() + 1).topk(TOPK, dim=1, sorted=True).indices
    weights = torch.randn(num_tokens, TOPK, generator=g).abs()
    if num_tokens:
        idx.view(-1)[torch.randperm(num_tokens * TOPK, generator=g)[:10]] = -1
    return idx.to(_device()), weights.to(_device())


def _gather(group, world, tensor):
    items = [None] * world
    dist.all_gather_object(items, tensor.cpu(), group=group)
    return [t.to(_device()) for t in items]


def _dispatch(buffer, x, idx, num_experts, mode, hook, stats=None, t_max=T_MAX, pause=None):
    use_fp8, round_scale, ue8m0 = MODES[mode]
    recv_x, recv_count, handle, event, recv_hook = buffer.low_latency_dispatch(
        x, idx, t_max, num_experts, cumulative_local_expert_recv_stats=stats, use_fp8=use_fp8,
        round_scale=round_scale, use_ue8m0=ue8m0, async_finish=not hook, return_recv_hook=hook)
    _finish(event, recv_hook, pause)
    return recv_x, recv_count, handle


def _combine(buffer, y, idx, weights, handle, hook, zero_copy=False, out=None, use_logfmt=False, pause=None):
    combined, event, recv_hook = buffer.low_latency_combine(y, idx, weights, handle, use_logfmt=use_logfmt,
                                                            zero_copy=zero_copy, async_finish=not hook,
                                                            return_recv_hook=hook, out=out)
    _finish(event, recv_hook, pause)
    return combined


def _finish(event, recv_hook, pause):
    """Run the hook (after `pause`, the time a model would spend in between) or wait for the event."""
    if recv_hook is None:
        event.current_stream_wait()
        return
    if pause is not None:
        pause()
    recv_hook()


def _random_pauses(seed, rank):
    """-> a function sleeping 0, 20, 100 or 300 ms at random (half the time not at all), per (seed, rank)."""
    rng = random.Random(seed * 1009 + rank)
    return lambda: time.sleep(rng.choice((0, 0, 0, 0.02, 0.1, 0.3)))


def _as_float(recv_x):
    return per_token_cast_back(*recv_x) if isinstance(recv_x, tuple) else recv_x


def _valid(recv_x, recv_count, handle):
    """The valid part of a dispatch result as exact bit patterns (rows past recv_count are garbage):
    per local expert (data, scales or None, src_info), plus recv_count and layout_range."""
    data, scales = recv_x if isinstance(recv_x, tuple) else (recv_x, None)
    data = data.view(torch.uint8) if data.dtype == torch.float8_e4m3fn else data
    rows = []
    for i, count in enumerate(recv_count.tolist()):
        rows.append((data[i, :count].clone(), None if scales is None else scales[i, :count].clone(),
                     handle[0][i, :count].clone()))
    return rows, recv_count.clone(), handle[1].clone()


def _assert_same_valid(got, want, what):
    got_rows, got_count, got_layout = got
    want_rows, want_count, want_layout = want
    assert_same(got_count, want_count, f"{what}: recv_count")
    assert_same(got_layout, want_layout, f"{what}: layout_range")
    for i, (a, b) in enumerate(zip(got_rows, want_rows)):
        for name, x, y in zip(("data", "scales", "src_info"), a, b):
            if x is not None:
                assert_same(x, y, f"{what}: {name} of expert {i}")


# ---- rank bodies ------------------------------------------------------------------------------------------------
def _deepep_body(rank, world, group, seed, num_experts):
    """Every assertion of DeepEP's low-latency test (spec 8.4), plus exact rows against the oracle."""
    buffer = _buffer(group, world, num_experts)
    dev, num_local = _device(), num_experts // world
    x_rank = torch.full((T_MAX, HIDDEN), rank - 128.0, dtype=torch.bfloat16, device=dev)
    x_rank[:, -128:] = torch.arange(T_MAX, device=dev, dtype=torch.bfloat16).view(-1, 1)
    x_rand = (torch.randn(T_MAX, HIDDEN, generator=generator(seed, rank, 99)) * 0.1).to(dev, torch.bfloat16)
    # DeepEP's LogFMT inputs: randn * 0.5 * U(0, 1) (one factor per token here, so one tensor has them all)
    factors = torch.rand(T_MAX, 1, generator=generator(seed, rank, 98)) * 0.5
    x_logfmt = (torch.randn(T_MAX, HIDDEN, generator=generator(seed, rank, 97)) * factors).to(dev, torch.bfloat16)
    idx, weights = _routing(seed, rank, T_MAX, num_experts)
    all_idx = _gather(group, world, idx)
    all_rand = _gather(group, world, x_rand)
    for x_kind, x in (("rank", x_rank), ("rand", x_rand), ("logfmt", x_logfmt)):
        for hook in (False, True):
            for mode, (use_fp8, round_scale, _) in MODES.items():
                _dispatch(buffer, x, idx, num_experts, mode, hook)  # first of two: both halves in use
                stats = torch.zeros(num_local, dtype=torch.int32, device=dev)
                recv_x, recv_count, handle = _dispatch(buffer, x, idx, num_experts, mode, hook, stats)
                what = f"{x_kind}/{mode}/hook={hook}"
                src_info, layout_range = handle[0], handle[1]
                recv = _as_float(recv_x)
                for i in range(num_local):
                    expert, count = rank * num_local + i, int(recv_count[i])
                    assert int(stats[i]) == count, f"{what}: recv stats of expert {i}"
                    assert count == int((layout_range[i] & 0xFFFFFFFF).sum()), f"{what}: layout_range of {i}"
                    assert count == sum(int((t == expert).sum()) for t in all_idx), f"{what}: count of {i}"
                    if x_kind != "rank":
                        continue
                    rows = recv[i, :count].float()
                    body = rows[:, :-128]
                    assert torch.equal(body.amax(dim=1), body.amin(dim=1)), f"{what}: expert {i} row not constant"
                    tokens = (src_info[i, :count] % T_MAX).float()
                    if round_scale:
                        assert count == 0 or calc_diff(rows[:, -1], tokens) < 0.007, f"{what}: token column of {i}"
                    else:
                        assert torch.equal(rows[:, -128:], tokens.view(-1, 1).expand(-1, 128)), f"{what}: tokens"
                    for j in range(world):
                        begin, size = int(layout_range[i, j]) >> 32, int(layout_range[i, j]) & 0xFFFFFFFF
                        assert size == int((all_idx[j] == expert).sum()), f"{what}: rows of source {j}"
                        if not round_scale:
                            assert int((body[:, 0] == j - 128).sum()) == size, f"{what}: values of source {j}"
                            assert torch.all(recv[i, begin:begin + size, :-128].float() == j - 128), \
                                f"{what}: block of source {j} of expert {i}"
                if x_kind == "rand":
                    expect = reference.low_latency_dispatch(all_rand, all_idx, num_experts, *MODES[mode])[rank]
                    got = reference.canonical_low_latency_rows(recv_x, recv_count, handle, world)
                    for i in range(num_local):
                        assert_same(got.src_rank[i], expect.src_rank[i], f"{what}: oracle source ranks of {i}")
                        assert_same(got.src_idx[i], expect.src_idx[i], f"{what}: oracle tokens of {i}")
                        assert_same(got.data[i], expect.data[i], f"{what}: oracle data of {i}")
                        if use_fp8:
                            assert_same(got.scales[i], expect.scales[i], f"{what}: oracle scales of {i}")
                for zero_copy, use_logfmt in ((False, False), (True, False), (False, True)):
                    if zero_copy:
                        buffer.get_next_low_latency_combine_buffer(handle).copy_(recv)
                    out = torch.empty(T_MAX, HIDDEN, dtype=torch.bfloat16, device=dev)
                    combined = _combine(buffer, recv, idx, weights, handle, hook, zero_copy, out, use_logfmt)
                    how = f"{what}, zero_copy={zero_copy}, use_logfmt={use_logfmt}"
                    assert combined.data_ptr() == out.data_ptr(), f"{how}: combine must write into `out`"
                    assert not torch.isnan(combined).any(), f"{how}: NaN in the combine"
                    if not round_scale:
                        ref = x.float() * weights.masked_fill(idx == -1, 0).sum(dim=1, keepdim=True)
                        diff = calc_diff(ref, combined.float())
                        assert diff < (9e-4 if use_fp8 else 1e-5), f"{how}: diff {diff}"
    buffer.destroy()
    return True


def _hook_overlap_body(rank, world, group, seed, num_experts):
    """Send, a large matmul on the same stream, then the hook: results equal those without hooks."""
    buffer = _buffer(group, world, num_experts)
    dev = _device()
    x = torch.randn(T_MAX, HIDDEN, generator=generator(seed, rank)).to(dev, torch.bfloat16)
    idx, weights = _routing(seed, rank, T_MAX, num_experts)
    big = torch.randn(MATMUL, MATMUL, device=dev)
    plain_x, plain_count, plain_handle = _dispatch(buffer, x, idx, num_experts, "fp8", hook=False)
    plain = _valid(plain_x, plain_count, plain_handle)
    plain_out = _combine(buffer, per_token_cast_back(*plain_x), idx, weights, plain_handle, hook=False).clone()
    for _ in range(3):
        recv_x, recv_count, handle, _, recv_hook = buffer.low_latency_dispatch(x, idx, T_MAX, num_experts,
                                                                                return_recv_hook=True)
        busy = big @ big
        recv_hook()
        _assert_same_valid(_valid(recv_x, recv_count, handle), plain, "dispatch with a hook")
        y = per_token_cast_back(*recv_x)
        out, _, recv_hook = buffer.low_latency_combine(y, idx, weights, handle, return_recv_hook=True)
        busy = busy @ big
        recv_hook()
        assert_same(out, plain_out, "combine with a hook")
    torch.cuda.synchronize()
    assert torch.isfinite(busy).all()
    buffer.destroy()
    return True


def _graph_body(rank, world, group, seed, num_experts):
    """Dispatch (plain and with a hook inside the graph) + combine (BF16 and LogFMT) captured once, replayed
    with new data; every replay equals an eager run on the same data."""
    buffer = _buffer(group, world, num_experts)
    dev = _device()
    x_s = torch.empty(T_MAX, HIDDEN, dtype=torch.bfloat16, device=dev)
    idx_s = torch.empty(T_MAX, TOPK, dtype=torch.int64, device=dev)
    w_s = torch.empty(T_MAX, TOPK, dtype=torch.float32, device=dev)

    def load(step):
        idx, weights = _routing(seed, rank, T_MAX, num_experts, step)
        x_s.copy_(torch.randn(T_MAX, HIDDEN, generator=generator(seed, rank, step, 1)).to(dev, torch.bfloat16))
        idx_s.copy_(idx)
        w_s.copy_(weights)

    def step_fn(hook):
        recv_x, recv_count, handle, _, recv_hook = buffer.low_latency_dispatch(
            x_s, idx_s, T_MAX, num_experts, use_fp8=True, return_recv_hook=hook)
        if hook:
            recv_hook()
        y = per_token_cast_back(*recv_x) * 0.1  # below 1: LogFMT encodes every group
        out, _, _ = buffer.low_latency_combine(y, idx_s, w_s, handle, use_logfmt=hook)
        return recv_x, recv_count, handle, out

    def snapshot(result):
        recv_x, recv_count, handle, out = result
        return _valid(recv_x, recv_count, handle), out.clone()

    load(0)
    step_fn(False)  # compiles the kernels and allocates the heap before capture
    step_fn(True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = [step_fn(False), step_fn(True)]
    for step in range(1, 5):
        load(step)
        graph.replay()
        torch.cuda.synchronize()
        replayed = [snapshot(r) for r in captured]
        for hook, (got, got_out) in zip((False, True), replayed):
            want, want_out = snapshot(step_fn(hook))
            _assert_same_valid(got, want, f"replay {step}, hook={hook}")
            assert_same(got_out, want_out, f"replay {step}, hook={hook}: combine")
    buffer.destroy()
    return True


def _determinism_body(rank, world, group, seed, num_experts, apart=False):
    """20 reruns with one seed (hooks and plain alternating) are bit-identical and match the oracle's counts.
    `apart`: every rank sleeps a random 0-300 ms before each call and each hook, so that ranks run apart (a
    peer one call behind or far ahead; session 17 saw a wrong count once with ranks started seconds apart)."""
    pause = _random_pauses(seed, rank) if apart else (lambda: None)
    buffer = _buffer(group, world, num_experts)
    dev = _device()
    x = torch.randn(T_MAX, HIDDEN, generator=generator(seed, rank)).to(dev, torch.bfloat16)
    idx, weights = _routing(seed, rank, T_MAX, num_experts)
    expect = reference.low_latency_dispatch(_gather(group, world, x), _gather(group, world, idx), num_experts,
                                            *MODES["fp8"])[rank]
    # a pre-reducing combine (no hook) rounds its partial sums: compare each kind of call with its own first
    prereduce = os.environ.get("FLASHEP_LL_PREREDUCE", "1") == "1"
    firsts = {}
    for rerun in range(20):
        hook = bool(rerun % 2)
        pause()
        recv_x, recv_count, handle = _dispatch(buffer, x, idx, num_experts, "fp8", hook, pause=pause)
        _check_counts(recv_count, handle[1], expect, world, f"rerun {rerun} (hook {hook})")
        pause()
        out = _combine(buffer, per_token_cast_back(*recv_x), idx, weights, handle, hook, pause=pause)
        current = (_valid(recv_x, recv_count, handle), out.clone())
        first = firsts.setdefault(hook if prereduce else None, current)
        if first is current:
            continue
        _assert_same_valid(current[0], first[0], f"rerun {rerun}")
        assert_same(current[1], first[1], f"rerun {rerun}: combine")
    buffer.destroy()
    return True


def _prereduce_oracle_body(rank, world, group, seed, num_experts):
    """The pre-reducing combine (FLASHEP_LL_PREREDUCE=1), small shapes (the oracle needs every rank's expert
    outputs): combines without a hook pre-reduce (their launches say so) and match the pre-reducing oracle in
    all but fused multiply-add roundings (under 1% of the elements), and DeepEP's bound against the plain
    weighted sum; the same from the zero-copy buffer; a combine with a hook is the plain one."""
    t_max, hidden = 32, 1024
    buffer = _buffer(group, world, num_experts, t_max, hidden)
    launches = CombineLaunches()
    dev = _device()
    for step in range(3):
        g = generator(seed, rank, step, 3)
        num_tokens = int(torch.randint(1, t_max + 1, (1,), generator=g))
        x = torch.randn(num_tokens, hidden, generator=g).to(dev, torch.bfloat16)
        idx, weights = _routing(seed, rank, num_tokens, num_experts, step)
        recv_x, recv_count, handle = _dispatch(buffer, x, idx, num_experts, "bf16", hook=False, t_max=t_max)
        y = torch.randn(recv_x.shape, generator=g).to(dev, torch.bfloat16)
        handles = [(s, lr, t_max, hidden, num_experts) for s, lr in
                   zip(_gather(group, world, handle[0]), _gather(group, world, handle[1]))]
        owners = (_gather(group, world, y), handles, _gather(group, world, idx), _gather(group, world, weights))
        pre = reference.low_latency_combine(*owners, num_experts, prereduce=True)[rank]
        plain = reference.low_latency_combine(*owners, num_experts)[rank]
        for hook, zero_copy in ((False, False), (False, True), (True, False)):
            if zero_copy:
                buffer.get_next_low_latency_combine_buffer(handle).copy_(y)
            launches.take()
            out = _combine(buffer, y, idx, weights, handle, hook=hook, zero_copy=zero_copy)
            what = f"step {step}, hook={hook}, zero_copy={zero_copy}"
            assert set(launches.take()) == {not hook}, f"{what}: pre-reduced exactly without a hook"
            off = (out != (plain if hook else pre)).float().mean().item()
            assert off < 0.01, f"{what}: {off:.4f} of the elements off the oracle"
            assert calc_diff(plain.float(), out.float()) < 1e-5, f"{what}: DeepEP's bound"
    buffer.destroy()
    return True

def _copied_handle_body(rank, world, group, seed, num_experts):
    """A handle whose src_info is a copy (it lost the per-row top-k slots and the row map): the combine's owners
    read the home's published top-k instead; with FLASHEP_LL_PREREDUCE=0 the result equals the one through the
    original handle bit for bit (the same rows into the same slots)."""
    buffer = _buffer(group, world, num_experts)
    dev = _device()
    for step in range(2):
        x = torch.randn(T_MAX, HIDDEN, generator=generator(seed, rank, step)).to(dev, torch.bfloat16)
        idx, weights = _routing(seed, rank, T_MAX, num_experts, step)
        recv_x, _, handle = _dispatch(buffer, x, idx, num_experts, "bf16", hook=bool(step))
        want = _combine(buffer, recv_x, idx, weights, handle, hook=bool(step)).clone()
        copied = (handle[0].clone(), *handle[1:])
        got = _combine(buffer, recv_x, idx, weights, copied, hook=bool(step))
        assert_same(got, want, f"step {step}: combine through a copied handle")
    buffer.destroy()
    return True


def _check_counts(recv_count, layout_range, expect, world, what):
    """recv_count against the oracle; a mismatch names, per wrong expert, the rows per source rank as the
    dispatch laid them out (layout_range) and as the oracle has them."""
    wrong = (recv_count != expect.recv_count).nonzero().flatten().tolist()
    if not wrong:
        return
    got = {i: (layout_range[i] & 0xFFFFFFFF).tolist() for i in wrong}
    want = {i: torch.bincount(expect.src_rank[i].cpu(), minlength=world).tolist() for i in wrong}
    raise AssertionError(f"{what}: recv_count of local experts {wrong}: {recv_count[wrong].tolist()}, the oracle "
                         f"{expect.recv_count[wrong].tolist()}; rows per source rank {got}, the oracle {want}")


def _check_dispatch(recv_x, recv_count, handle, all_x, all_idx, rank, world, num_experts, mode, what):
    """This rank's dispatch exactly as the oracle's: counts (per source rank), rows, tokens, data, scales."""
    expect = reference.low_latency_dispatch(all_x, all_idx, num_experts, *MODES[mode])[rank]
    _check_counts(recv_count, handle[1], expect, world, what)
    got = reference.canonical_low_latency_rows(recv_x, recv_count, handle, world)
    for i in range(recv_count.numel()):
        assert_same(got.src_rank[i], expect.src_rank[i], f"{what}: source ranks of expert {i}")
        assert_same(got.src_idx[i], expect.src_idx[i], f"{what}: tokens of expert {i}")
        assert_same(got.data[i], expect.data[i], f"{what}: data of expert {i}")
        if MODES[mode][0]:
            assert_same(got.scales[i], expect.scales[i], f"{what}: scales of expert {i}")


def _check_combine(out, x, idx, weights, mode, what):
    """The combine of the dispatched rows sent back unchanged: each token's row as the dispatch carried it
    (quantised in the FP8 modes) times its summed weights. -> that row (x as the experts saw it)."""
    assert out.shape == x.shape, f"{what}: combine shape {tuple(out.shape)}"
    x_seen = _as_float(reference.quantize_low_latency(x, *MODES[mode][1:])) if MODES[mode][0] else x
    if x.size(0):
        ref = x_seen.float() * weights.masked_fill(idx == -1, 0).sum(dim=1, keepdim=True)
        assert calc_diff(ref, out.float()) < 1e-5, f"{what}: combine"
        assert (ref - out.float()).abs().max() <= 0.02 * ref.abs().max() + 1e-3, f"{what}: combine max error"
    return x_seen


def _token_counts_body(rank, world, group, seed, num_experts):
    """0, 1, T_max / 2 and T_max tokens on the ranks: dispatch exact against the oracle in every mode,
    combine (BF16 and LogFMT) close to the oracle's weighted sum."""
    buffer = _buffer(group, world, num_experts)
    dev = _device()
    num_tokens = (0, 1, T_MAX // 2, T_MAX)[rank % 4] if world > 2 else (T_MAX, 0)[rank]
    x = torch.randn(num_tokens, HIDDEN, generator=generator(seed, rank)).to(dev, torch.bfloat16)
    idx, weights = _routing(seed, rank, num_tokens, num_experts)
    all_x, all_idx = _gather(group, world, x), _gather(group, world, idx)
    for mode in MODES:
        for hook in (False, True):
            recv_x, recv_count, handle = _dispatch(buffer, x, idx, num_experts, mode, hook)
            _check_dispatch(recv_x, recv_count, handle, all_x, all_idx, rank, world, num_experts, mode, mode)
            y = _as_float(recv_x)
            out = _combine(buffer, y, idx, weights, handle, hook)
            x_seen = _check_combine(out, x, idx, weights, mode, mode)
            # LogFMT: every expert returns its row times 0.1 (every group encoded); each output element is the
            # codec's decoded value times the summed weights, up to one bf16 rounding and the fp32 sum
            small = (y.float() * 0.1).to(torch.bfloat16)
            out = _combine(buffer, small, idx, weights, handle, hook, use_logfmt=True)
            if num_tokens:
                decoded = logfmt.roundtrip((x_seen.float() * 0.1).to(torch.bfloat16)).float()
                ref = decoded * weights.masked_fill(idx == -1, 0).sum(dim=1, keepdim=True)
                bound = ref.abs() * 2**-8 + decoded.abs() * weights.sum(dim=1, keepdim=True) * 2**-20
                assert torch.all((out.float() - ref).abs() <= bound), f"{mode}: LogFMT combine vs the codec"
    buffer.destroy()
    return True


def _changing_counts_body(rank, world, group, seed, num_experts):
    """Every call draws new token counts (0..T_max per rank) and new routing, so that a flag left by an earlier
    operation carries another count than this one's (a receive once took such a count: rows of one peer went
    missing). Each call's dispatch equals the oracle and its combine the weighted sum; the calls cycle through
    the modes, with and without hooks."""
    buffer = _buffer(group, world, num_experts)
    dev = _device()
    modes = list(MODES)
    for call in range(16):
        mode, hook = modes[(call // 2) % len(modes)], bool(call % 2)
        counts = [int(torch.randint(0, T_MAX + 1, (1,), generator=generator(seed, r, call, 5))) for r in range(world)]
        xs = [torch.randn(n, HIDDEN, generator=generator(seed, r, call, 6)).to(dev, torch.bfloat16)
              for r, n in enumerate(counts)]
        routes = [_routing(seed, r, n, num_experts, 100 + call) for r, n in enumerate(counts)]
        idxs = [idx for idx, _ in routes]
        x, (idx, weights) = xs[rank], routes[rank]
        recv_x, recv_count, handle = _dispatch(buffer, x, idx, num_experts, mode, hook)
        what = f"call {call} ({mode}, hook {hook}, tokens per rank {counts})"
        _check_dispatch(recv_x, recv_count, handle, xs, idxs, rank, world, num_experts, mode, what)
        out = _combine(buffer, _as_float(recv_x), idx, weights, handle, hook)
        _check_combine(out, x, idx, weights, mode, what)
    buffer.destroy()
    return True


def _kernel_names_body(rank, world, group, seed, num_experts):
    """Profilers find each operation by substring: one kernel name holds "dispatch", one "combine"."""
    buffer = _buffer(group, world, num_experts)
    dev = _device()
    x = torch.randn(T_MAX, HIDDEN, generator=generator(seed, rank)).to(dev, torch.bfloat16)
    idx, weights = _routing(seed, rank, T_MAX, num_experts)
    recv_x, _, handle = _dispatch(buffer, x, idx, num_experts, "fp8", hook=False)
    y = per_token_cast_back(*recv_x)
    _combine(buffer, y, idx, weights, handle, hook=False)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for hook in (False, True):
            recv_x, _, handle = _dispatch(buffer, x, idx, num_experts, "fp8", hook)
            _combine(buffer, y, idx, weights, handle, hook)
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    for op in ("dispatch", "combine"):
        matching = [n for n in names if op in n]
        assert len(matching) == 1, f"kernels named like '{op}': {matching}"
    buffer.destroy()
    return True


# ---- tests ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_experts, env", [pytest.param(256, {}, id="256"), pytest.param(288, {}, id="288"),
                                              pytest.param(256, PLAIN, id="256-plain")])
@pytest.mark.parametrize("world", WORLDS)
def test_deepep_assertions(world, num_experts, env, seed):
    assert all(run_ranks(world, _deepep_body, seed, num_experts, backend="triton", device="cuda", env=env))


@pytest.mark.parametrize("world", WORLDS)
def test_prereduced_combine_matches_oracle(world, seed):
    assert all(run_ranks(world, _prereduce_oracle_body, seed, 8 * world, backend="triton", device="cuda",
                         env=PREREDUCE))


@pytest.mark.parametrize("world", WORLDS)
def test_combine_through_a_copied_handle(world, seed):
    assert all(run_ranks(world, _copied_handle_body, seed, 256, backend="triton", device="cuda", env=PLAIN))


@pytest.mark.parametrize("world", WORLDS)
def test_hooks_around_a_large_matmul(world, seed):
    # the plain combine without a hook: bit for bit the one with a hook (which never pre-reduces)
    assert all(run_ranks(world, _hook_overlap_body, seed, 256, backend="triton", device="cuda", env=PLAIN))


@pytest.mark.parametrize("env", COMBINES)
@pytest.mark.parametrize("world", WORLDS)
def test_cuda_graph_replay_with_new_data(world, env, seed):
    assert all(run_ranks(world, _graph_body, seed, 256, backend="triton", device="cuda", env=env))


@pytest.mark.parametrize("env", COMBINES)
@pytest.mark.parametrize("world", WORLDS)
def test_twenty_reruns_bit_identical(world, env, seed):
    assert all(run_ranks(world, _determinism_body, seed, 288, backend="triton", device="cuda", env=env))


@pytest.mark.parametrize("world", [gpu_world(2), gpu_world(4)])
def test_reruns_with_ranks_apart(world, seed):
    assert all(run_ranks(world, _determinism_body, seed, 288, True, backend="triton", device="cuda"))


@pytest.mark.parametrize("world", WORLDS)
def test_token_counts_zero_to_t_max(world, seed):
    assert all(run_ranks(world, _token_counts_body, seed, 256, backend="triton", device="cuda"))


@pytest.mark.parametrize("world", WORLDS)
def test_token_counts_change_every_call(world, seed):
    assert all(run_ranks(world, _changing_counts_body, seed, 256, backend="triton", device="cuda"))


@pytest.mark.parametrize("world", WORLDS)
def test_one_kernel_name_per_operation(world, seed):
    assert all(run_ranks(world, _kernel_names_body, seed, 256, backend="triton", device="cuda"))
