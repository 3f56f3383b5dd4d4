"""Low-latency mode on one rank: check FP8 dispatch, BF16 and LogFMT combine against the oracle, then time them.

Per tokens-per-rank value (one `Buffer` each, sized with DeepEP's hint as users do): dispatch and combine
without hook (kernel and end-to-end time), dispatch+combine end to end and replayed from a CUDA graph,
and the send and receive kernels of each op in hook mode, with a large matmul standing in for the
compute that runs between the send and the hook. The LogFMT combine reads the expert outputs times 0.1
(DeepEP's LogFMT benchmark input, randn * 0.1: every group below 1, so every group is encoded).
"""
from __future__ import annotations

import torch

from .. import reference
from ..buffer import Buffer
from ..fp8 import per_token_cast_back
from . import metrics
from .baseline import BaselineTiming, time_all_to_all
from .checks import LL_COMBINE_LIMIT
from .context import RankContext
from .results import OpResult
from .timing import KernelProfile, phase
from .workload import gather_rows, low_latency_inputs

MODE = "low-latency"
_HOOK_PHASES = {
    metrics.LL_DISPATCH_SEND: ("dispatch", "dispatch send", 0),
    metrics.LL_DISPATCH_RECV: ("dispatch", "dispatch receive", 1),
    metrics.LL_COMBINE_SEND: ("combine", "combine send", 0),
    metrics.LL_COMBINE_RECV: ("combine", "combine receive", 1),
}


def run_low_latency(ctx: RankContext) -> list:
    options = ctx.options
    results = []
    for tokens in options.ll_tokens:
        num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(tokens, options.hidden, ctx.world, options.experts)
        buffer = Buffer(ctx.group, 0, num_rdma_bytes, low_latency_mode=True,
                        num_qps_per_rank=max(1, options.experts // ctx.world), explicitly_destroy=True)
        try:
            results += _bench_config(ctx, buffer, tokens)
        except NotImplementedError:
            buffer.destroy()  # every rank raised at the same call, so the collective teardown is safe
            raise
        ctx.note_buffer(f"{MODE} ({tokens} tokens)", buffer, "low_latency")
        buffer.destroy()
        ctx.progress.advance()
    return results


def _bench_config(ctx: RankContext, buffer: Buffer, tokens: int) -> list:
    options, rank, group, world = ctx.options, ctx.rank, ctx.group, ctx.world
    experts, hidden = options.experts, options.hidden
    shape = options.low_latency_shape(tokens)
    config_name = f"{tokens} tokens"
    say = lambda what: ctx.progress.step(f"low-latency {config_name}: {what}")  # noqa: E731
    inputs = low_latency_inputs(tokens, hidden, options.topk, experts, ctx.seed_for(tokens), ctx.device)
    out = torch.empty(tokens, hidden, dtype=torch.bfloat16, device=ctx.device)

    def dispatch(hook: bool = False):
        return buffer.low_latency_dispatch(inputs.x, inputs.topk_idx, tokens, experts, use_fp8=True,
                                           return_recv_hook=hook)

    def combine(expert_outputs, handle, hook: bool = False, use_logfmt: bool = False):
        return buffer.low_latency_combine(expert_outputs, inputs.topk_idx, inputs.topk_weights, handle, out=out,
                                          use_logfmt=use_logfmt, return_recv_hook=hook)

    say("gather inputs for the oracle")
    all_x = gather_rows(inputs.x, group)
    all_topk_idx = gather_rows(inputs.topk_idx, group)
    all_weights = gather_rows(inputs.topk_weights, group)

    say("check dispatch")
    recv_x, recv_count, handle, _, _ = dispatch()
    expected = reference.low_latency_dispatch(all_x, all_topk_idx, experts, use_fp8=True)[rank]
    _check_dispatch(ctx, config_name, metrics.LL_DISPATCH, recv_x, recv_count, handle, expected)

    say("check combine")
    expert_outputs = _expert_outputs(recv_x, recv_count)
    combine(expert_outputs, handle)
    expected_out = _expected_combine(ctx, expert_outputs, handle, all_topk_idx, all_weights)
    limit = LL_COMBINE_LIMIT["FP8"]
    ctx.checks.similar(MODE, config_name, metrics.LL_COMBINE, out, expected_out, limit)

    say("check hook mode")
    hook_x, hook_count, hook_handle, _, hook = dispatch(hook=True)
    hook()
    _check_dispatch(ctx, config_name, f"{metrics.LL_DISPATCH} (hook)", hook_x, hook_count, hook_handle, expected)
    _, _, hook = combine(expert_outputs, handle, hook=True)
    hook()
    ctx.checks.similar(MODE, config_name, f"{metrics.LL_COMBINE} (hook)", out, expected_out, limit)
    small_outputs = (expert_outputs.float() * 0.1).to(torch.bfloat16)
    combine(small_outputs, handle, use_logfmt=True)
    expected_out = _expected_combine(ctx, small_outputs, handle, all_topk_idx, all_weights, use_logfmt=True)
    ctx.checks.similar(MODE, config_name, metrics.LL_COMBINE_LOGFMT, out, expected_out, limit)
    del expected, expected_out, hook_x

    def dispatch_then_combine():
        _, _, fresh_handle, _, _ = dispatch()
        combine(expert_outputs, fresh_handle)

    results = []
    for op, fn, patterns in ((metrics.LL_DISPATCH, dispatch, ("dispatch",)),
                             (metrics.LL_COMBINE, lambda: combine(expert_outputs, handle), ("combine",)),
                             (metrics.LL_COMBINE_LOGFMT, lambda: combine(small_outputs, handle, use_logfmt=True),
                              ("combine",)),
                             (metrics.LL_BOTH, dispatch_then_combine, ("dispatch", "combine"))):
        say(f"time {op}")
        result = OpResult(MODE, shape, op, prefer_kernel_time=True)
        ctx.measure(result, fn, patterns)
        results.append(result)

    if _graphs_possible(ctx, buffer):
        say(f"time {metrics.LL_GRAPH}")
        result = OpResult(MODE, shape, metrics.LL_GRAPH)
        result.e2e_us = _graph_replay_us(ctx, dispatch_then_combine)
        results.append(result)
    else:
        ctx.progress.note(f"low-latency {config_name}: no CUDA graph replay (needs GPUs and the Triton "
                          f"low-latency backend; backends in use: {buffer.backend_name})")

    say("time hook mode")
    results += _hook_mode(ctx, shape, dispatch, combine, expert_outputs)

    say("time all_to_all baselines")
    selections = [_selections_per_owner(idx, experts, world) for idx in all_topk_idx]
    dispatch_traffic = metrics.ll_dispatch_traffic(selections, rank, metrics.ll_dispatch_message_bytes(hidden))
    combine_traffic = metrics.ll_combine_traffic(selections, rank, metrics.ll_combine_message_bytes(hidden))
    logfmt_traffic = metrics.ll_combine_traffic(selections, rank, metrics.ll_logfmt_message_bytes(hidden))
    dispatch_baseline = time_all_to_all(ctx.timer, dispatch_traffic, group, ctx.device)
    combine_baseline = time_all_to_all(ctx.timer, combine_traffic, group, ctx.device)
    both = metrics.Traffic(dispatch_traffic.metric_bytes + combine_traffic.metric_bytes,
                           dispatch_traffic.remote_bytes + combine_traffic.remote_bytes, [], [])
    both_baseline = BaselineTiming(dispatch_baseline.e2e_us + combine_baseline.e2e_us,
                                   _sum_or_none(dispatch_baseline.kernel_us, combine_baseline.kernel_us))
    for result in results:
        if result.op == metrics.LL_DISPATCH:
            result.attach_traffic(dispatch_traffic)
            result.attach_baseline(dispatch_baseline)
        elif result.op == metrics.LL_COMBINE:
            result.attach_traffic(combine_traffic)
            result.attach_baseline(combine_baseline)
        elif result.op == metrics.LL_COMBINE_LOGFMT:  # baseline: the same BF16 rows through NCCL
            result.attach_traffic(logfmt_traffic)
            result.attach_baseline(combine_baseline)
        elif result.op in (metrics.LL_BOTH, metrics.LL_GRAPH):
            result.attach_traffic(both)
            result.attach_baseline(both_baseline)
        result.attach_deepep(metrics.deepep_figure(ctx.card, world, result.op, shape))
    return results


def _hook_mode(ctx: RankContext, shape: dict, dispatch, combine, expert_outputs) -> list:
    """Send and receive kernel times of each op with a hook, compute running in between."""
    size = ctx.options.compute_size
    a = torch.randn(size, size, device=ctx.device).to(torch.bfloat16)
    b = torch.randn(size, size, device=ctx.device).to(torch.bfloat16)

    def one_round():
        with phase("dispatch send"):
            _, _, handle, _, hook = dispatch(hook=True)
        a @ b
        with phase("dispatch receive"):
            hook()
        with phase("combine send"):
            _, _, hook = combine(expert_outputs, handle, hook=True)
        a @ b
        with phase("combine receive"):
            hook()

    profile = ctx.timer.profile(one_round)
    if profile is None:  # CPU: run the round once for coverage; there are no kernels to time
        one_round()
        return []
    results = []
    for op, (pattern, label, position) in _HOOK_PHASES.items():
        result = OpResult(MODE, shape, op, prefer_kernel_time=True)
        result.kernel_us = _phase_kernel_us(profile, pattern, label, position)
        result.kernels = profile.breakdown((pattern,), label)
        results.append(result)
    return results


def _phase_kernel_us(profile: KernelProfile, pattern: str, label: str, position: int):
    """Kernel time of one phase; without phase information, the send kernel is the first kernel of its
    op in each round and the receive kernel the second (both carry the op's name)."""
    if profile.phases_known:
        return profile.per_call_us((pattern,), label)
    kernels = profile.matching((pattern,))
    if len(kernels) != 2 * profile.calls:
        return None
    return sum(k.duration_us for k in kernels[position::2]) / profile.calls


def _graphs_possible(ctx: RankContext, buffer: Buffer) -> bool:
    # the collective backend synchronises with the host, which a CUDA graph cannot capture
    return ctx.device.type == "cuda" and not buffer.backend_name.endswith("collective")


def _graph_replay_us(ctx: RankContext, fn) -> float:
    fn()  # the first calls allocate; capture must not
    torch.cuda.synchronize(ctx.device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return ctx.timer.end_to_end_us(graph.replay)


def _expert_outputs(recv_x: tuple, recv_count: torch.Tensor) -> torch.Tensor:
    """Stand-in expert outputs: the received rows dequantized to BF16 (as DeepEP's test does); rows past
    each expert's count, which hold no token, are zero."""
    data, scales = recv_x
    num_local, num_rows, hidden = data.shape
    values = per_token_cast_back(data.reshape(num_local * num_rows, hidden),
                                 scales.reshape(num_local * num_rows, -1)).view(num_local, num_rows, hidden)
    valid = torch.arange(num_rows, device=data.device).unsqueeze(0) < recv_count.unsqueeze(1)
    return torch.where(valid.unsqueeze(2), values, torch.zeros((), dtype=values.dtype, device=values.device))


def _expected_combine(ctx: RankContext, expert_outputs: torch.Tensor, handle: tuple, all_topk_idx: list,
                      all_weights: list, use_logfmt: bool = False) -> torch.Tensor:
    """This rank's combine per the oracle, from every owner's expert outputs and handle."""
    src_info, layout_range, t_max, hidden, experts = handle
    all_outputs = gather_rows(expert_outputs, ctx.group)
    all_src_info = gather_rows(src_info, ctx.group)
    all_layout_range = gather_rows(layout_range, ctx.group)
    handles = [(s, r, t_max, hidden, experts) for s, r in zip(all_src_info, all_layout_range)]
    # the oracle combines every rank's tokens; other ranks' selections are blanked to skip their work
    mine_only = [idx if r == ctx.rank else torch.full_like(idx, -1) for r, idx in enumerate(all_topk_idx)]
    return reference.low_latency_combine(all_outputs, handles, mine_only, all_weights, experts,
                                         use_logfmt=use_logfmt)[ctx.rank]


def _check_dispatch(ctx: RankContext, config_name: str, op: str, recv_x: tuple, recv_count: torch.Tensor,
                    handle: tuple, expected: reference.LowLatencyExpect) -> None:
    log = ctx.checks
    try:
        got = reference.canonical_low_latency_rows(recv_x, recv_count, handle, ctx.world)
    except AssertionError as error:
        log.record(MODE, config_name, f"{op}: layout_range", False, str(error))
        return
    log.same_bits(MODE, config_name, f"{op}: recv_count", recv_count, expected.recv_count)
    for field in ("src_rank", "src_idx", "data", "scales"):
        got_rows, expected_rows = getattr(got, field), getattr(expected, field)
        log.same_bits(MODE, config_name, f"{op}: {field}", torch.cat(got_rows), torch.cat(expected_rows))


def _selections_per_owner(topk_idx: torch.Tensor, experts: int, world: int) -> list:
    """Non -1 selections of one rank's tokens per rank that owns the expert."""
    chosen = topk_idx[topk_idx >= 0]
    return torch.bincount(chosen // (experts // world), minlength=world).tolist()


def _sum_or_none(a, b):
    return None if a is None or b is None else a + b
