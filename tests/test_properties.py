"""Hypothesis over random routings (token counts, top-k, experts, -1 density, skew, dtypes, alignment) with
the collective backend on 2-4 ranks, against flashep.reference.

Spawning ranks per example would be slow, so each rank runs the whole hypothesis search inside one
spawned group: all ranks use the same hypothesis seed and therefore draw the same examples, and every
example makes the same sequence of collective calls on every rank. A failing rank stops the group
(shrinking would need the other ranks to follow the failing rank's replays), and the error message names
the drawn example; FLASHEP_TEST_SEED replays the search.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

import flashep
from flashep import reference
from harness import run_ranks
from test_low_latency import MODES, LowLatencyCase, LowLatencyRun
from test_normal import VARIANTS, CaseRun, NormalCase

SETTINGS = dict(deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck))
LL_MAX_TOKENS, LL_MAX_HIDDEN, LL_MAX_EXPERTS_PER_RANK = 6, 512, 4


@st.composite
def normal_cases(draw, num_ranks: int):
    num_topk = draw(st.integers(1, 4))
    experts_per_rank = draw(st.integers(max(1, -(-num_topk // num_ranks)), 5))
    return NormalCase(
        name="hypothesis",
        tokens=tuple(draw(st.lists(st.integers(0, 12), min_size=num_ranks, max_size=num_ranks))),
        hidden=draw(st.sampled_from([16, 64, 128, 144])),
        num_topk=num_topk,
        experts_per_rank=experts_per_rank,
        minus_one=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        topk_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        expert_alignment=draw(st.integers(1, 4)),
        skew=draw(st.sampled_from([0.0, 1.0, 4.0])),
        streams="plain")


@st.composite
def low_latency_cases(draw, num_ranks: int):
    mode = draw(st.sampled_from(list(MODES)))
    t_max = draw(st.integers(1, LL_MAX_TOKENS))
    num_topk = draw(st.integers(1, 6))
    experts_per_rank = draw(st.integers(max(1, -(-num_topk // num_ranks)), LL_MAX_EXPERTS_PER_RANK + 2))
    hidden = LL_MAX_HIDDEN if MODES[mode][0] else draw(st.sampled_from([128, 256, 384]))
    return LowLatencyCase(
        name="hypothesis",
        t_max=t_max,
        tokens=tuple(draw(st.lists(st.integers(0, t_max), min_size=num_ranks, max_size=num_ranks))),
        hidden=hidden,
        num_topk=num_topk,
        experts_per_rank=experts_per_rank,
        minus_one=draw(st.sampled_from([0.0, 0.2, 1.0])),
        modes=(mode,),
        hooks=(draw(st.booleans()),),
        skew=draw(st.sampled_from([0.0, 2.0])),
        reruns=1)


def normal_property_body(rank: int, num_ranks: int, group, seed: int, max_examples: int) -> int:
    buffer = flashep.Buffer(group, num_nvl_bytes=1 << 24, explicitly_destroy=True)
    examples = []

    @settings(max_examples=max_examples, **SETTINGS)
    @hypothesis_seed(seed)
    @given(case=normal_cases(num_ranks), variant=st.sampled_from(VARIANTS), data_seed=st.integers(0, 2**31 - 1))
    def check(case, variant, data_seed):
        examples.append(case)
        try:
            run = CaseRun(buffer, rank, num_ranks, case, data_seed, False, torch.device("cpu"))
            layout_args = run.check_layout()
            xs = [variant.x(inp) for inp in run.everyone]
            weights = [variant.weights(inp) for inp in run.everyone]
            expects = reference.dispatch(xs, run.all_topk, weights, run.num_experts, case.expert_alignment)
            for with_topk in (False, True):
                run.check_round(variant, xs, weights, expects, layout_args, with_topk, (False, False))
        except AssertionError as e:
            raise AssertionError(f"{case}, {variant.name}, data seed {data_seed}: {e}") from e

    check()
    buffer.destroy()
    return len(examples)


def low_latency_property_body(rank: int, num_ranks: int, group, seed: int, max_examples: int) -> int:
    num_experts = (LL_MAX_EXPERTS_PER_RANK + 2) * num_ranks
    hint = flashep.Buffer.get_low_latency_rdma_size_hint(LL_MAX_TOKENS, LL_MAX_HIDDEN, num_ranks, num_experts)
    buffer = flashep.Buffer(group, num_rdma_bytes=hint, low_latency_mode=True, explicitly_destroy=True)
    examples = []

    @settings(max_examples=max_examples, **SETTINGS)
    @hypothesis_seed(seed)
    @given(case=low_latency_cases(num_ranks), zero_copy=st.booleans(), data_seed=st.integers(0, 2**31 - 1))
    def check(case, zero_copy, data_seed):
        examples.append(case)
        try:
            run = LowLatencyRun(buffer, rank, num_ranks, case, data_seed, torch.device("cpu"))
            d = run.dispatch("x_rand", case.modes[0], case.hooks[0])
            run.check_dispatch(d)
            run.check_combine(d, case.hooks[0], zero_copy)
        except AssertionError as e:
            raise AssertionError(f"{case}, zero_copy={zero_copy}, data seed {data_seed}: {e}") from e

    check()
    buffer.destroy()
    return len(examples)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_normal_routings(world_size, seed):
    counts = run_ranks(world_size, normal_property_body, seed, 30, backend="collective")
    assert len(set(counts)) == 1 and counts[0] > 0, f"ranks drew different examples: {counts}"


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_low_latency_routings(world_size, seed):
    counts = run_ranks(world_size, low_latency_property_body, seed, 25, backend="collective")
    assert len(set(counts)) == 1 and counts[0] > 0, f"ranks drew different examples: {counts}"
