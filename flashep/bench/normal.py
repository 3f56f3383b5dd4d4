"""Normal mode on one rank: check dispatch and combine against the oracle, then time them.

Per configuration (SMs, tokens per rank): layout, BF16 and FP8 dispatch (non-cached, then with the
cached handle, as DeepEP's tests time it), BF16 combine of the received rows with their weights.
"""
from __future__ import annotations

import torch

from .. import reference
from ..buffer import Buffer
from . import metrics
from .baseline import time_all_to_all
from .context import RankContext
from .results import OpResult
from .timing import KERNEL_PATTERNS
from .workload import gather_rows, normal_inputs

MODE = "normal"


def run_normal(ctx: RankContext) -> list:
    options = ctx.options
    buffer = Buffer(ctx.group, num_nvl_bytes=options.nvl_bytes, explicitly_destroy=True)
    results = []
    try:
        for num_sms in options.num_sms:
            for tokens in options.tokens:
                results += _bench_config(ctx, buffer, num_sms, tokens)
                ctx.progress.advance()
    except NotImplementedError:
        buffer.destroy()  # every rank raised at the same call, so the collective teardown is safe
        raise
    ctx.note_buffer(MODE, buffer, "normal")
    buffer.destroy()
    return results


def _bench_config(ctx: RankContext, buffer: Buffer, num_sms: int, tokens: int) -> list:
    options, rank, group = ctx.options, ctx.rank, ctx.group
    experts, hidden = options.experts, options.hidden
    shape = options.normal_shape(tokens, num_sms)
    config_name = f"{num_sms} SMs, {tokens} tokens"
    say = lambda what: ctx.progress.step(f"normal {config_name}: {what}")  # noqa: E731

    Buffer.set_num_sms(num_sms)
    dispatch_config = Buffer.get_dispatch_config(ctx.world)
    combine_config = Buffer.get_combine_config(ctx.world)
    inputs = normal_inputs(tokens, hidden, options.topk, experts, ctx.seed_for(num_sms * 100_003 + tokens),
                           ctx.device)

    say("gather inputs for the oracle")
    all_topk_idx = gather_rows(inputs.topk_idx, group)
    all_weights = gather_rows(inputs.topk_weights, group)

    say("layout")
    layout = buffer.get_dispatch_layout(inputs.topk_idx, experts)
    _check_layout(ctx, config_name, layout, reference.layout(inputs.topk_idx, experts, ctx.world))
    per_rank, per_rdma_rank, per_expert, in_rank, _ = layout

    def fresh_dispatch(x):
        return buffer.dispatch(x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma_rank,
                               is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                               topk_idx=inputs.topk_idx, topk_weights=inputs.topk_weights, config=dispatch_config)

    say("check BF16 dispatch")
    bf16 = fresh_dispatch(inputs.x)
    expect_bf16 = reference.dispatch(gather_rows(inputs.x, group), all_topk_idx, all_weights, experts)
    _check_dispatch(ctx, config_name, metrics.DISPATCH_BF16_FRESH, bf16, expect_bf16[rank])

    say("check FP8 dispatch")
    fp8 = fresh_dispatch(inputs.x_fp8)
    all_fp8 = list(zip(gather_rows(inputs.x_fp8[0], group), gather_rows(inputs.x_fp8[1], group)))
    expect_fp8 = reference.dispatch(all_fp8, all_topk_idx, all_weights, experts)[rank]
    del all_fp8
    _check_dispatch(ctx, config_name, metrics.DISPATCH_FP8_FRESH, fp8, expect_fp8)

    def cached_bf16():
        return buffer.dispatch(inputs.x, handle=bf16[4], config=dispatch_config)

    def cached_fp8():
        return buffer.dispatch(inputs.x_fp8, handle=fp8[4], config=dispatch_config)

    say("check cached dispatch")
    _check_dispatch(ctx, config_name, metrics.DISPATCH_BF16, cached_bf16(), expect_bf16[rank])
    _check_dispatch(ctx, config_name, metrics.DISPATCH_FP8, cached_fp8(), expect_fp8)
    del expect_fp8

    recv_x, recv_weights, handle = bf16[0], bf16[2], bf16[4]

    def combine():
        return buffer.combine(recv_x, handle, topk_weights=recv_weights, config=combine_config)

    say("check combine")
    combined_x, combined_w, _ = combine()
    # Every rank combines the rows it received, which it checked against expect_bf16 above; so the
    # oracle's combine input is every rank's expected dispatch output.
    expect_combine = reference.combine([e.recv_x for e in expect_bf16], all_topk_idx, experts,
                                       topk_weights=[e.recv_topk_weights for e in expect_bf16])[rank]
    del expect_bf16
    ctx.checks.same_bits(MODE, config_name, f"{metrics.COMBINE}: combined_x", combined_x, expect_combine[0])
    ctx.checks.same_bits(MODE, config_name, f"{metrics.COMBINE}: combined_topk_weights", combined_w,
                         expect_combine[1])

    counts = [reference.layout(idx, experts, ctx.world)[0].tolist() for idx in all_topk_idx]
    fp8_row = metrics.fp8_row_bytes(hidden, inputs.x_fp8[1].size(1))
    bf16_row = metrics.bf16_row_bytes(hidden)
    traffics = {
        "fp8": metrics.normal_dispatch_traffic(counts, rank, fp8_row),
        "bf16": metrics.normal_dispatch_traffic(counts, rank, bf16_row),
        "combine": metrics.normal_combine_traffic(counts, rank, bf16_row),
    }
    ops = [
        (metrics.DISPATCH_FP8, cached_fp8, "fp8"),
        (metrics.DISPATCH_BF16, cached_bf16, "bf16"),
        (metrics.DISPATCH_FP8_FRESH, lambda: fresh_dispatch(inputs.x_fp8), "fp8"),
        (metrics.DISPATCH_BF16_FRESH, lambda: fresh_dispatch(inputs.x), "bf16"),
        (metrics.COMBINE, combine, "combine"),
    ]
    results = []
    for op, fn, traffic in ops:
        say(f"time {op}")
        result = OpResult(MODE, shape, op)
        ctx.measure(result, fn, KERNEL_PATTERNS)
        result.attach_traffic(traffics[traffic])
        result.attach_deepep(metrics.deepep_figure(ctx.card, ctx.world, op, shape))
        results.append(result)

    baselines = {}
    for name, traffic in traffics.items():
        say(f"time all_to_all baseline ({name})")
        baselines[name] = time_all_to_all(ctx.timer, traffic, group, ctx.device)
    for result, (_, _, traffic) in zip(results, ops):
        result.attach_baseline(baselines[traffic])
    return results


def _check_layout(ctx: RankContext, config_name: str, layout: tuple, expected: tuple) -> None:
    per_rank, _, per_expert, in_rank, _ = layout
    exp_per_rank, _, exp_per_expert, exp_in_rank = expected
    log = ctx.checks
    log.same_bits(MODE, config_name, "layout: num_tokens_per_rank", per_rank, exp_per_rank)
    log.same_bits(MODE, config_name, "layout: num_tokens_per_expert", per_expert, exp_per_expert)
    log.same_bits(MODE, config_name, "layout: is_token_in_rank", in_rank, exp_in_rank)


def _check_dispatch(ctx: RankContext, config_name: str, op: str, output: tuple,
                    expected: reference.DispatchExpect) -> None:
    recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle, _ = output
    data, scales = recv_x if isinstance(recv_x, tuple) else (recv_x, None)
    log = ctx.checks
    log.same_bits(MODE, config_name, f"{op}: recv_x", data, expected.recv_x)
    log.same_bits(MODE, config_name, f"{op}: recv_x scales", scales, expected.recv_x_scales)
    if handle is None:  # cached dispatch returns the rows only
        return
    log.same_bits(MODE, config_name, f"{op}: recv_topk_idx", recv_topk_idx, expected.recv_topk_idx)
    log.same_bits(MODE, config_name, f"{op}: recv_topk_weights", recv_topk_weights, expected.recv_topk_weights)
    log.same_value(MODE, config_name, f"{op}: num_recv_tokens_per_expert_list", per_expert,
                   expected.num_recv_tokens_per_expert)
    log.same_bits(MODE, config_name, f"{op}: handle[0][:, rank] (rank prefix)",
                  handle[0][:, ctx.rank].contiguous(), expected.rank_prefix)
    log.same_bits(MODE, config_name, f"{op}: recv_src_idx", handle[3].to(torch.int64), expected.recv_src_idx)
