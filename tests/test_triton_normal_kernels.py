"""The Triton normal-mode kernels under the interpreter, on 2-4 spawned ranks, bit for bit against
flashep.reference: shapes and paths the API suite does not reach (16-byte rows, pusher/receiver splits,
several tiles and column chunks per program, channels without tokens, top-32, odd FP8 scale counts,
back-to-back operations on both heap halves), buffer growth and capacity errors, timeouts naming rank
and phase, and the bf16 rounding helper. Shapes stay tiny: the interpreter runs every program in Python.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import triton
import triton.language as tl

import flashep
from flashep import reference
from flashep.kernels.normal import _to_bf16
from harness import TRITON_NORMAL, assert_same, generator, run_ranks, triton_available

pytestmark = pytest.mark.skipif(not triton_available(TRITON_NORMAL), reason="Triton normal backend missing")


@dataclass(frozen=True)
class Case:
    name: str
    tokens: tuple  # per rank, cycled
    hidden: int
    num_topk: int
    experts_per_rank: int
    num_sms: int
    minus_one: float = 0.0
    fp8_scales: int = 0  # FP8 dispatch with this many int32 scale columns (strided input); 0 = bf16
    topk_dtype: torch.dtype = torch.int64


CASES = (
    # 16-byte rows: the second lane of every row is empty; one channel
    Case("tiny_rows_one_channel", (6, 3), hidden=8, num_topk=1, experts_per_rank=2, num_sms=2),
    # more channels than tokens on some ranks, a rank without tokens, top-32 with many -1
    Case("empty_channels_top32", (0, 9, 2, 5), hidden=40, num_topk=32, experts_per_rank=16, num_sms=16,
         minus_one=0.5, topk_dtype=torch.int32),
    # FP8 with three scale columns, strided
    Case("fp8_odd_scales", (7, 11), hidden=48, num_topk=3, experts_per_rank=3, num_sms=4, minus_one=0.2,
         fp8_scales=3),
)


def _inputs(case: Case, seed: int, index: int, rank: int, num_ranks: int):
    g = generator(seed, index, rank)
    num_tokens = case.tokens[rank % len(case.tokens)]
    num_experts = case.experts_per_rank * num_ranks
    scores = torch.rand(num_tokens, num_experts, generator=g)
    topk_idx = scores.topk(case.num_topk, dim=1).indices
    topk_idx[torch.rand(topk_idx.shape, generator=g) < case.minus_one] = -1
    weights = torch.randn(num_tokens, case.num_topk, generator=g)
    if case.fp8_scales:
        data = (torch.randn(num_tokens, case.hidden, generator=g) * 8).to(torch.float8_e4m3fn)
        words = torch.randint(-2**31, 2**31 - 1, (num_tokens, 2 * case.fp8_scales), generator=g, dtype=torch.int32)
        x = (data, words[:, ::2])  # any strides in, contiguous out
    else:
        x = torch.randn(num_tokens, case.hidden, generator=g).to(torch.bfloat16)
    bias = (torch.randn(num_tokens, case.hidden, generator=g).to(torch.bfloat16),
            torch.randn(num_tokens, case.hidden, generator=g).to(torch.bfloat16))
    return x, topk_idx.to(case.topk_dtype), weights, bias


def _as_pair(x):
    return x if isinstance(x, tuple) else (x, None)


def _check_dispatch(out, expect, with_topk: bool, what: str, num_valid: Optional[int] = None):
    recv_x, recv_idx, recv_w = out[0], out[1], out[2]
    data, scales = _as_pair(recv_x)
    rows = slice(0, num_valid if num_valid is not None else data.size(0))
    assert_same(data[rows], expect.recv_x, f"{what}: recv_x")
    if expect.recv_x_scales is not None:
        assert scales.is_contiguous(), f"{what}: scales must be contiguous"
        assert_same(scales[rows], expect.recv_x_scales, f"{what}: scales")
    if with_topk:
        assert_same(recv_idx[rows], expect.recv_topk_idx, f"{what}: recv_topk_idx")
        assert_same(recv_w[rows], expect.recv_topk_weights, f"{what}: recv_topk_weights")


def _run_cases(rank: int, num_ranks: int, group, seed: int, cases: tuple, repeats: int,
               first_epoch: int = 0) -> None:
    buffer = flashep.Buffer(group, 0)
    assert buffer.backend_name.startswith("triton/"), buffer.backend_name
    buffer._normal.epoch.fill_(first_epoch)  # the same on every rank, before any kernel
    for index, case in enumerate(cases):
        everyone = [_inputs(case, seed, index, r, num_ranks) for r in range(num_ranks)]
        xs, topks, weights = [e[0] for e in everyone], [e[1] for e in everyone], [e[2] for e in everyone]
        x, topk_idx, topk_weights, bias = everyone[rank]
        num_experts = case.experts_per_rank * num_ranks
        config = flashep.Config(case.num_sms, 8, 256)
        expects = reference.dispatch(xs, topks, weights, num_experts)
        expect = expects[rank]
        for repeat in range(repeats):  # consecutive operations alternate between the heap halves
            what = f"{case.name} #{repeat}"
            per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
            layout = reference.layout(topk_idx, num_experts, num_ranks)
            assert_same(per_rank, layout[0], f"{what}: num_tokens_per_rank")
            assert_same(per_expert, layout[2], f"{what}: num_tokens_per_expert")
            assert_same(in_rank, layout[3], f"{what}: is_token_in_rank")
            args = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                        config=config)
            out = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, **args)
            _check_dispatch(out, expect, True, what)
            assert out[3] == expect.num_recv_tokens_per_expert, f"{what}: per-expert list {out[3]}"
            handle = out[4]
            assert_same(handle[0][:, rank], expect.rank_prefix, f"{what}: rank prefix")
            assert_same(handle[3].long(), expect.recv_src_idx, f"{what}: recv_src_idx")
            cached = buffer.dispatch(x, handle=handle, config=config)
            _check_dispatch(cached, expect, False, f"{what} cached")
            worst = max(1, max(case.tokens) * num_ranks)
            worst_out = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, num_worst_tokens=worst,
                                        **args)
            num_recv = expect.recv_x.size(0)
            _check_dispatch(worst_out, expect, True, f"{what} worst", num_valid=num_recv)
            assert torch.all(worst_out[1][num_recv:] == -1), f"{what}: worst-token top-k tail must be -1"
            assert torch.all(worst_out[4][3][num_recv:] == -1), f"{what}: worst-token source index tail must be -1"

            # combine: fresh rows on every rank, both biases, the received weights
            rows = [torch.randn(expects[r].recv_x.size(0), case.hidden,
                                generator=generator(seed, index, r, repeat)).to(torch.bfloat16)
                    for r in range(num_ranks)]
            recv_weights = [e.recv_topk_weights for e in expects]
            expect_x, expect_w = reference.combine(rows, topks, num_experts, topk_weights=recv_weights,
                                                   biases=[e[3] for e in everyone])[rank]
            combined, combined_w, _ = buffer.combine(rows[rank], handle, topk_weights=out[2], bias=bias)
            assert_same(combined, expect_x, f"{what}: combined_x")
            assert_same(combined_w, expect_w, f"{what}: combined weights")
            padding = torch.full((worst - rows[rank].size(0), case.hidden), float("nan"), dtype=torch.bfloat16)
            combined, _, _ = buffer.combine(torch.cat([rows[rank], padding]), worst_out[4])
            expect_plain = reference.combine(rows, topks, num_experts)[rank][0]
            assert_same(combined, expect_plain, f"{what}: combine with the worst-token handle")
            del out, handle, cached  # direct-write outputs go back to the pool (so the next ones fit)
    # with FLASHEP_DIRECT_DISPATCH every dispatch without num_worst_tokens (non-cached and cached) wrote directly
    assert buffer._normal.direct_dispatches == (2 * len(cases) * repeats if buffer._normal.direct else 0)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_dispatch_and_combine_match_the_oracle(world_size, seed):
    run_ranks(world_size, _run_cases, seed, CASES, 1, backend="triton")


def test_flag_tags_wrap(seed):
    """Operations across the epoch where the flags' tags start over (2^31 - 1) stay exact."""
    run_ranks(2, _run_cases, seed, CASES[:1], 2, 2**31 - 5, backend="triton")


@pytest.mark.parametrize("world_size", [2, 4])
def test_combine_by_copy_engine_matches_the_oracle(world_size, seed):
    """Combines with an exact handle move their rows by copy engine (three parts, two rounds: both halves of
    the copy heap); the worst-token handle's combine still goes through the SM pushers."""
    run_ranks(world_size, _run_cases, seed, CASES, 2, backend="triton",
              env={"FLASHEP_COPY_ENGINE": "1", "FLASHEP_COPY_PARTS": "3"})


def _replay_under_interpreter() -> list:
    """Make the backend keep replays of its launches under the interpreter, as it does with compiled kernels
    on a GPU (there `flashep.launch` returns them; the interpreter has no compiled kernel): a replay runs the
    JIT function with the stored arguments and the swapped tensors. -> the list of kernels each replay ran."""
    from flashep import launch as fl
    from flashep.backends import triton_normal

    replayed = []

    class Interpreted:  # stands in for a compiled kernel
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*values, stream=None):
                replayed.append(self.kernel.fn.__name__)
                self.kernel[grid](*values)
            return run

    def launch_replayable(kernel, grid, swap, *args, **kwargs):
        triton_normal.launch(kernel, grid, *args, **kwargs)
        params = list(inspect.signature(kernel.fn).parameters.values())
        names = [p.name for p in params]
        values = [*args, *(kwargs.get(p.name, p.default) for p in params[len(args):])]
        return fl.Replay(Interpreted(kernel), tuple(grid) + (1,) * (3 - len(grid)), values,
                         [names.index(name) for name in swap], 0)

    fl.current_device = lambda: 0
    fl.current_stream = lambda device: 0
    triton_normal.launch_replayable = launch_replayable
    return replayed


def _one_handle_many_calls(rank: int, num_ranks: int, group, seed: int) -> None:
    """Cached dispatches and combines of one handle, new inputs every call (FP8 and BF16 alternating; combines
    with and without weights and biases), every call against the oracle; later calls of a kind replay the
    first one's launch with the new tensors swapped in."""
    replayed = _replay_under_interpreter()
    case = CASES[2]  # FP8 with three strided scale columns
    buffer = flashep.Buffer(group, 0)
    num_experts = case.experts_per_rank * num_ranks
    config = flashep.Config(case.num_sms, 8, 256)
    everyone = [_inputs(case, seed, 0, r, num_ranks) for r in range(num_ranks)]
    topks = [e[1] for e in everyone]
    x, topk_idx, topk_weights, _ = everyone[rank]
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    out = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=per_rank,
                          is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, config=config)
    handle, recv_weights = out[4], out[2]
    received = [reference.dispatch([e[0] for e in everyone], topks, [e[2] for e in everyone], num_experts)[r]
                for r in range(num_ranks)]
    for call in range(6):
        fresh = [_inputs(case, seed, 1 + call, r, num_ranks) for r in range(num_ranks)]
        # odd calls dispatch the BF16 rows of the same tokens (same hidden size, another launch key)
        xs = [f[0] if call % 2 == 0 else torch.randn(f[1].size(0), case.hidden, generator=generator(seed, call, r))
              .to(torch.bfloat16) for r, f in enumerate(fresh)]
        expect = reference.dispatch(xs, topks, None, num_experts)[rank]
        _check_dispatch(buffer.dispatch(xs[rank], handle=handle, config=config), expect, False,
                        f"cached dispatch #{call}")
        with_weights, biases = call % 3 != 1, [f[3] if call % 3 == 0 else (f[3][0], None) for f in fresh]
        if call % 3 == 1:
            biases = [None] * num_ranks
        rows = [torch.randn(received[r].recv_x.size(0), case.hidden, generator=generator(seed, 100 + call, r))
                .to(torch.bfloat16) for r in range(num_ranks)]
        weights = [e.recv_topk_weights for e in received] if with_weights else None
        expect_x, expect_w = reference.combine(rows, topks, num_experts, topk_weights=weights, biases=biases)[rank]
        combined, combined_w, _ = buffer.combine(rows[rank], handle, topk_weights=recv_weights if with_weights
                                                 else None, bias=biases[rank], config=config)
        assert_same(combined, expect_x, f"combine #{call}: combined_x")
        if with_weights:
            assert_same(combined_w, expect_w, f"combine #{call}: combined weights")
    # calls 2-5 of each kind repeat an earlier call's key (dispatch: FP8 / BF16; combine: 3 bias variants)
    assert replayed.count("ep_dispatch_kernel") == 4 and replayed.count("ep_combine_kernel") == 3, replayed

    # another routing of the same shapes (the next training step): the same tokens in another order on every
    # rank, so every rank receives as many rows as before (the swapped row count keeps its specialisation class)
    # while every tensor of the handle changes; the whole step replays
    everyone = [_permuted(e, generator(seed, 50, r)) for r, e in enumerate(everyone)]
    topks = [e[1] for e in everyone]
    x, topk_idx, topk_weights, bias = everyone[rank]
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    out = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=per_rank,
                          is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, config=config)
    received = reference.dispatch([e[0] for e in everyone], topks, [e[2] for e in everyone], num_experts)
    _check_dispatch(buffer.dispatch(x, handle=out[4], config=config), received[rank], False,
                    "cached dispatch of a second handle")
    rows = [torch.randn(received[r].recv_x.size(0), case.hidden, generator=generator(seed, 200, r))
            .to(torch.bfloat16) for r in range(num_ranks)]
    expect_x, expect_w = reference.combine(rows, topks, num_experts, topk_weights=[e.recv_topk_weights for e in received],
                                           biases=[e[3] for e in everyone])[rank]
    combined, combined_w, _ = buffer.combine(rows[rank], out[4], topk_weights=out[2], bias=bias, config=config)
    assert_same(combined, expect_x, "combine of a second handle: combined_x")
    assert_same(combined_w, expect_w, "combine of a second handle: combined weights")
    # the non-cached dispatch of the same shapes (count exchange included) launched ahead of its host sync,
    # with a guessed row count (a multiple of 16): it replayed the first handle's launch where that one's
    # exact row count was of the same class
    first_rows = handle[3].size(0)
    same_class = first_rows % 16 == 0 and first_rows != 1
    assert replayed.count("ep_dispatch_kernel") == 5 + same_class, replayed
    assert replayed.count("ep_combine_kernel") == 4 and replayed.count("ep_notify_kernel") == 1, replayed
    # the next step's non-cached dispatch launches with the same guesses: a replay, whatever the class
    out = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=per_rank,
                          is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, config=config)
    _check_dispatch(out, received[rank], True, "the next step's dispatch")
    assert replayed.count("ep_dispatch_kernel") == 6 + same_class and replayed.count("ep_notify_kernel") == 2


def _permuted(inputs, g):
    """One rank's (x, topk_idx, weights, bias) with its tokens in a random order; FP8 scales keep their strides."""
    x, topk_idx, weights, bias = inputs
    order = torch.randperm(topk_idx.size(0), generator=g)
    if isinstance(x, tuple):
        data, scales = x
        words = torch.zeros(scales.size(0), 2 * scales.size(1), dtype=scales.dtype)
        words[:, ::2] = scales[order]
        x = (data[order], words[:, ::2])
    else:
        x = x[order]
    return x, topk_idx[order], weights[order], (bias[0][order], bias[1][order])


def test_one_handle_many_calls_replay_their_launches(seed):
    run_ranks(2, _one_handle_many_calls, seed, backend="triton")


ROLES = (
    # one receiver per launch, a flag after every channel: many tiles per program, every program's tiles
    # spread over several channels
    ({"FLASHEP_RECEIVERS": "1", "FLASHEP_TILE_TOKENS": "2", "FLASHEP_TILE_HIDDEN": "32",
      "FLASHEP_PUBLISH_TOKENS": "1"}, 4),
    # one pusher per launch, flags only at the end, a combine split unlike the dispatch's
    ({"FLASHEP_RECEIVERS": "3", "FLASHEP_COMBINE_RECEIVERS": "2", "FLASHEP_TILE_TOKENS": "4",
      "FLASHEP_PUBLISH_TOKENS": "100000"}, 4),
    # six channels, a flag every few channels plus the first and the last ones; combines by SM pushers
    ({"FLASHEP_TILE_TOKENS": "2", "FLASHEP_PUBLISH_TOKENS": "1", "FLASHEP_COMBINE_RECEIVER_SHARE": "0.5",
      "FLASHEP_COPY_ENGINE": "0"}, 12),
    # combines by copy engine in one part per channel (more parts asked than there are channels)
    ({"FLASHEP_TILE_TOKENS": "2", "FLASHEP_TILE_HIDDEN": "32", "FLASHEP_COPY_PARTS": "16",
      "FLASHEP_COPY_ENGINE": "1"}, 12),
)


@pytest.mark.parametrize("env, num_sms", ROLES, ids=["one_receiver_flag_per_channel", "one_pusher_final_flag_only",
                                                     "flag_every_few_channels_sm_combine",
                                                     "copy_engine_part_per_channel"])
def test_program_roles_tiles_and_repeats(env, num_sms, seed):
    """Pusher/receiver splits at both extremes and in between, publish intervals, small tiles and column
    chunks (several per program), and three rounds so both data halves are reused."""
    cases = (Case("roles", (13, 6, 9), hidden=96, num_topk=2, experts_per_rank=2, num_sms=num_sms, minus_one=0.2),)
    run_ranks(3, _run_cases, seed, cases, 3, backend="triton", env=env)


@pytest.mark.parametrize("world_size", [2, 4])
def test_direct_write_dispatch_matches_the_oracle(world_size, seed):
    """FLASHEP_DIRECT_DISPATCH: the non-cached and cached dispatches write the outputs directly (the
    worst-token dispatches and the combines keep the records); every output and the combines of their
    handles match the oracle, two rounds of every case."""
    run_ranks(world_size, _run_cases, seed, CASES, 2, backend="triton", env={"FLASHEP_DIRECT_DISPATCH": "1"})


def _direct_pool(rank: int, num_ranks: int, group, seed: int) -> None:
    """The output pool of direct-write dispatches, each rank choosing alone: every token picks an expert of
    rank 0 and one of another rank (round robin), so rank 0 receives every token and the others fewer. Kept
    outputs stay intact while later dispatches write the pool; when only rank 0's pool is full, rank 0 takes
    records and the others direct writes in the same dispatch (and cached dispatch), all exact; freed
    outputs make room again; larger outputs map a larger pool while the old one stays mapped for the
    outputs still in it, and unmapped after the last one dies."""
    buffer = flashep.Buffer(group, 0)
    backend = buffer._normal
    config = flashep.Config(4, 8, 256)
    num_experts = 2 * num_ranks

    def inputs(num_tokens: int, tag: int, r: int):
        g = generator(seed, tag, r)
        toks = torch.arange(num_tokens)
        other = 1 + (toks + r) % (num_ranks - 1)  # the second expert's rank
        topk_idx = torch.stack([torch.randint(0, 2, (num_tokens,), generator=g),
                                2 * other + torch.randint(0, 2, (num_tokens,), generator=g)], dim=1)
        weights = torch.randn(num_tokens, 2, generator=g)
        data = (torch.randn(num_tokens, 64, generator=g) * 8).to(torch.float8_e4m3fn)
        words = torch.randint(-2**31, 2**31 - 1, (num_tokens, 4), generator=g, dtype=torch.int32)
        return (data, words[:, ::2]), topk_idx, weights

    def dispatch(num_tokens: int, tag: int):
        everyone = [inputs(num_tokens, tag, r) for r in range(num_ranks)]
        expect = reference.dispatch(*([e[i] for e in everyone] for i in range(3)), num_experts)[rank]
        x, topk_idx, weights = everyone[rank]
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
        out = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, num_tokens_per_rank=per_rank,
                              is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, config=config)
        _check_dispatch(out, expect, True, f"dispatch {tag}")
        return out, expect, x

    kept = [dispatch(8, 0)]  # maps a pool of three times rank 0's outputs on every rank
    first_pool = backend.output_pool
    kept += [dispatch(8, 1), dispatch(8, 2)]
    assert backend.direct_dispatches == 3
    mixed = dispatch(8, 3)  # rank 0's pool is full, the others' are not
    assert backend.direct_dispatches == (3 if rank == 0 else 4), backend.direct_dispatches
    cached = buffer.dispatch(mixed[2], handle=mixed[0][4], config=config)
    _check_dispatch(cached, mixed[1], False, "cached dispatch with rank 0 in records")
    assert backend.direct_dispatches == (3 if rank == 0 else 5), backend.direct_dispatches
    for tag, (out, expect, _) in enumerate(kept):
        _check_dispatch(out, expect, True, f"dispatch {tag} kept alive")
    del kept[1:], out, expect, mixed, cached
    dispatch(8, 4)  # room again on every rank
    assert backend.direct_dispatches == (4 if rank == 0 else 6)
    dispatch(40, 5)  # larger outputs: a new, larger pool
    assert backend.direct_dispatches == (5 if rank == 0 else 7) and backend.output_pool is not first_pool
    assert not first_pool._unmapped, "the old pool went while an output in it lived"
    _check_dispatch(kept[0][0], kept[0][1], True, "dispatch 0 after the pool was replaced")
    del kept
    assert first_pool._unmapped, "the old pool stayed mapped after its last output died"


def test_direct_write_output_pool_lifetime_and_fallback(seed):
    run_ranks(3, _direct_pool, seed, backend="triton", env={"FLASHEP_DIRECT_DISPATCH": "1"})


def _synced_dispatch(buffer, case: Case, seed: int, rank: int, num_ranks: int, config=None):
    """A non-cached dispatch of `case`'s inputs (drawn from the seed and the token count) -> (every rank's
    inputs, the layout and top-k arguments, the output)."""
    everyone = [_inputs(case, seed, case.tokens[0], r, num_ranks) for r in range(num_ranks)]
    x, topk_idx, weights, _ = everyone[rank]
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, case.experts_per_rank * num_ranks)
    args = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                topk_idx=topk_idx, topk_weights=weights)
    return everyone, args, buffer.dispatch(x, config=config, **args)


def _growth(rank: int, num_ranks: int, group, seed: int) -> None:
    buffer = flashep.Buffer(group, 0)
    sizes = []
    for num_tokens in (3, 40):
        case = Case("growth", (num_tokens,), hidden=64, num_topk=2, experts_per_rank=2, num_sms=2)
        everyone, args, out = _synced_dispatch(buffer, case, seed, rank, num_ranks)
        expect = reference.dispatch([e[0] for e in everyone], [e[1] for e in everyone], [e[2] for e in everyone],
                                    2 * num_ranks)[rank]
        _check_dispatch(out, expect, True, f"growth, {num_tokens} tokens")
        sizes.append(buffer.get_local_buffer_tensor(torch.uint8).numel())  # the mapped data heap
    assert sizes[1] > sizes[0], f"the buffer did not grow: {sizes}"
    # without a host sync the buffer cannot grow: a clear error on every rank, before any kernel runs
    x = everyone[rank][0]
    with pytest.raises(RuntimeError, match="num_nvl_bytes >= "):
        buffer.dispatch(x, num_worst_tokens=10**7, **args)
    out = buffer.dispatch(x, **args)
    _check_dispatch(out, expect, True, "after the capacity error")


def test_buffer_grows_in_synced_dispatch_and_refuses_otherwise(seed):
    run_ranks(2, _growth, seed, backend="triton")


class DispatchLaunches:
    """Counts, in this process, the dispatch kernel launches of the Triton normal backend."""

    def __init__(self):
        from flashep.backends import triton_normal as module

        self.count = 0
        launch_replayable = module.launch_replayable

        def spy(kernel, grid, swaps, *args, **kwargs):
            if kernel is module.kernels.ep_dispatch_kernel:
                self.count += 1
            return launch_replayable(kernel, grid, swaps, *args, **kwargs)

        module.launch_replayable = spy

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def _dispatch_ahead(rank: int, num_ranks: int, group, seed: int) -> list:
    """Non-cached dispatches whose token counts differ per rank and change from call to call: each against the
    oracle, and -> the dispatch kernel launches of each call (1: launched once, before or after the host sync;
    2: launched ahead with guessed outputs that some rank's rows overflowed, then again)."""
    launches = DispatchLaunches()
    buffer = flashep.Buffer(group, 0)
    counts = []
    for index, tokens in enumerate(((5, 2, 7), (4, 6, 3), (30, 2, 9), (29, 3, 8), (1, 0, 2), (30, 2, 9))):
        case = Case("ahead", tokens, hidden=48, num_topk=3, experts_per_rank=2, num_sms=4, minus_one=0.2,
                    fp8_scales=2 if index % 2 else 0)
        everyone = [_inputs(case, seed, index, r, num_ranks) for r in range(num_ranks)]
        x, topk_idx, weights, _ = everyone[rank]
        expects = reference.dispatch(*([e[i] for e in everyone] for i in range(3)), case.experts_per_rank * num_ranks)
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, case.experts_per_rank * num_ranks)
        out = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                              num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=weights,
                              config=flashep.Config(case.num_sms, 8, 256))
        what = f"dispatch {index} ({tokens})"
        _check_dispatch(out, expects[rank], True, what)
        rows = expects[rank].recv_x.size(0)
        assert _as_pair(out[0])[0].size(0) == rows and out[4][3].size(0) == rows, f"{what}: row count"
        assert out[3] == expects[rank].num_recv_tokens_per_expert, f"{what}: per-expert list"
        if not case.fp8_scales:  # the handle of a dispatch launched ahead carries the exact routing
            expect = reference.combine([e.recv_x for e in expects], [e[1] for e in everyone],
                                       case.experts_per_rank * num_ranks)[rank][0]
            assert_same(buffer.combine(expects[rank].recv_x, out[4])[0], expect, f"{what}: combine")
        counts.append(launches.take())
    return counts


@pytest.mark.parametrize("ahead", ["1", "0"])
def test_dispatch_ahead_of_the_host_sync(ahead, seed):
    counts = run_ranks(3, _dispatch_ahead, seed, backend="triton", env={"FLASHEP_DISPATCH_AHEAD": ahead})
    if ahead == "0":
        assert counts[0] == [1] * 6, counts
        return
    # call 0 has no history (sync first); 1 fits the guesses of 0; 2 overflows them (30 tokens); 3 and 4 fit;
    # 5 fits too: the guesses take the most of the last calls
    assert all(c == counts[0] for c in counts), counts
    assert counts[0] == [1, 1, 2, 1, 1, 1], counts


def _copy_heap_growth(rank: int, num_ranks: int, group, seed: int) -> None:
    """Combines by copy engine with a handle made before the copy heap grew and with one made after, each
    twice in a row (both heap halves), so the older handle's copies meet both halves again after growth."""
    buffer = flashep.Buffer(group, 0)
    rounds = []
    for num_tokens in (3, 40):
        case = Case("copy_growth", (num_tokens,), hidden=64, num_topk=2, experts_per_rank=2, num_sms=4)
        everyone, _, out = _synced_dispatch(buffer, case, seed, rank, num_ranks, flashep.Config(4, 8, 256))
        expects = reference.dispatch(*([e[i] for e in everyone] for i in range(3)), 2 * num_ranks)
        rows = [e.recv_x * 3 for e in expects]  # what the experts return
        expect = reference.combine(rows, [e[1] for e in everyone], 2 * num_ranks)[rank][0]
        rounds.append((out[4], rows[rank], expect))
        for _ in range(2):
            assert_same(buffer.combine(rows[rank], out[4])[0], expect, f"combine, {num_tokens} tokens")
    assert buffer._normal.copy_heap_mappings == 2, "the copy heap should have grown once"
    for _ in range(2):  # the older handle's copies now go to the grown heap, in both halves
        assert_same(buffer.combine(rounds[0][1], rounds[0][0])[0], rounds[0][2], "combine after the copy heap grew")


def test_copy_heap_grows_and_older_handles_follow(seed):
    run_ranks(2, _copy_heap_growth, seed, backend="triton", env={"FLASHEP_COPY_ENGINE": "1"})


def _skip_one_call(rank: int, num_ranks: int, group, skipped: str) -> Optional[str]:
    """Rank 1 skips one collective call; rank 0 must raise PeerTimeoutError (returned as text)."""
    from flashep.kernels.sync import PeerTimeoutError

    buffer = flashep.Buffer(group, 0)
    topk_idx = torch.tensor([[0, 3], [1, -1], [2, 3]])
    x = torch.randn(3, 16).to(torch.bfloat16)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, 4)
    args = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                config=flashep.Config(2, 8, 256))
    if skipped != "dispatch":
        recv_x, _, _, _, handle, _ = buffer.dispatch(x, **args)
    if rank == 1:
        return None
    try:
        if skipped == "dispatch":
            buffer.dispatch(x, **args)  # waits in notify, then raises after the host sync
        elif skipped == "cached":
            buffer.dispatch(x, handle=handle, config=args["config"])  # no host sync: the next call raises
        else:
            buffer.combine(recv_x, handle)
        buffer.get_dispatch_layout(topk_idx, 4)
    except PeerTimeoutError as e:
        return str(e)
    return "no error"


@pytest.mark.parametrize("skipped, phase, copy_engine, direct", [
    ("dispatch", "notify", "0", "0"),
    ("cached", "dispatch receive", "0", "0"),
    ("cached", "dispatch output address exchange", "0", "1"),  # pushers wait for the peer's output block
    ("combine", "combine receive", "0", "0"),
    ("combine", "combine receive", "1", "0")])
def test_a_missing_peer_times_out_naming_rank_and_phase(skipped, phase, copy_engine, direct):
    env = {"FLASHEP_TIMEOUT_S": "2", "FLASHEP_COPY_ENGINE": copy_engine, "FLASHEP_DIRECT_DISPATCH": direct}
    message = run_ranks(2, _skip_one_call, skipped, backend="triton", env=env)[0]
    assert "rank 0" in message and "rank 1" in message and f"'{phase}" in message, message


@triton.jit
def _convert_to_bf16(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, _to_bf16(tl.load(src + offs, mask=offs < n)), mask=offs < n)


def _rounding(rank: int, num_ranks: int, group) -> None:
    g = torch.Generator().manual_seed(7)
    bits = torch.randint(-2**31, 2**31 - 1, (4096,), generator=g, dtype=torch.int32)
    ties = (torch.randint(0, 2**15, (512,), generator=g, dtype=torch.int32) << 16) | 0x8000  # exactly halfway
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 3.3895314e38, -3.3895314e38, 1e-45, -1e-45, 1e-40,
                            float("inf"), float("-inf"), float("nan")])
    values = torch.cat([bits.view(torch.float32), ties.view(torch.float32), special])
    out = torch.empty(values.numel(), dtype=torch.bfloat16)
    _convert_to_bf16[(triton.cdiv(values.numel(), 256),)](values, out, values.numel(), BLOCK=256)
    expect = values.to(torch.bfloat16)
    nan = torch.isnan(values)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan].view(torch.int16), expect[~nan].view(torch.int16))


def test_bf16_rounding_matches_torch():
    run_ranks(1, _rounding, backend="triton")


def test_reduction_probe_matches_torch():
    """scripts/probe_reduce.py under the interpreter: the combine's reduction kernel alone, as rank 0 of 4 and of
    2 (random routing, peers' rows in one local tensor), against its own torch sums; several tile shapes, with
    uneven tails (hidden 384 is not a multiple of 256)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    for ranks in (4, 2):
        done = subprocess.run([sys.executable, os.path.join(root, "scripts", "probe_reduce.py"), "--cpu",
                               "--ranks", str(ranks), "--tokens", "37", "--hidden", "384", "--programs", "3",
                               "--settings", "block_h=128", "block_h=256,block_t=8"],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr[-3000:]
        assert done.stdout.count(" ok") == 2, done.stdout


def test_data_path_vectorises_for_hopper(tmp_path):
    """At DeepSeek-V3 widths (and a rank count that pads the rank axis) the dispatch and combine data
    paths must compile for sm_90 to pipelined 16-byte copies (cp.async) and 128-bit stores, within the
    shared memory of one SM. Compiled offline, no GPU needed (tests/test_gpu_compile.py checks that every
    recorded launch compiles)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    script = "import test_triton_normal_kernels as t; t.check_hopper_vectorisation()"
    done = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(__file__), env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


HOPPER_SHARED_BYTES = 227 * 1024  # per block, opt-in maximum of sm_90


def check_hopper_vectorisation() -> None:
    """Compile for sm_90 with a stand-in driver that only names the target (run without TRITON_INTERPRET),
    with the backend's default tiles and stages."""
    from gpu_compile import use_hopper_target

    from flashep.kernels import normal as kernels

    use_hopper_target()

    def t(dtype=torch.int32):
        return torch.empty(64, dtype=dtype)  # only dtype and alignment matter

    def check(kernel, what):
        ptx = kernel.asm["ptx"]
        assert "cp.async.cg.shared.global" in ptx, f"{what}: the chunk loops are not pipelined"
        assert "st.global.v4" in ptx, f"{what}: the stores are not vectorised"
        assert kernel.metadata.shared <= HOPPER_SHARED_BYTES, f"{what}: {kernel.metadata.shared} bytes of shared memory"

    i64, f32, bf16, u8 = torch.int64, torch.float32, torch.bfloat16, torch.uint8
    common = dict(NUM_RANKS=3, R_PAD=4, P_PAD=16, K_PAD=8, BLOCK_T=16, USE_TIMER=True, STAGES=3, num_warps=8,
                  grid=(1,))
    # hidden 7168: bf16 rows of 3584 words, fp8 rows of 1792 words + 56 scales; records or direct-write
    vector_stores = {}
    for fp8, direct in ((False, False), (True, False), (False, True), (True, True)):
        row_words, scales = (1792, 56) if fp8 else (3584, 0)
        dispatch = kernels.ep_dispatch_kernel.warmup(
            t(), t(), 1, 56, t(i64), t(f32), t(u8), t(), t(), t(), t(), t(), t(i64), t(f32), t(), t(),
            t(i64), 1 << 30, t(i64), 4096, t(i64), t(), t(i64), 1, 4096, 12, 342, 16, 2, 64, scales, 8, 10**5,
            10**5, t(i64), 8192, 12345, 10**9, ROW_WORDS=row_words, RECORD_WORDS=row_words + 48 + (16 if fp8 else 0),
            S_PAD=64 if fp8 else 2, BLOCK_W=512, HAS_SCALES=fp8, HAS_TOPK=True, TOPK_BYTES=8,
            WRITE_SEND_HEAD=direct or not fp8, WORST=fp8 and not direct, DIRECT=direct, **common)
        check(dispatch, f"dispatch (fp8={fp8}, direct={direct})")
        vector_stores[fp8, direct] = dispatch.asm["ptx"].count("st.global.v4")
    for fp8 in (False, True):  # a direct-write kernel stores its rows as widely as the records kernel does
        assert vector_stores[fp8, True] >= vector_stores[fp8, False], vector_stores
    for reduce_stages in (3, 1):  # the default (pipelined reduction), and the unpipelined one
        combine = kernels.ep_combine_kernel.warmup(
            t(bf16), t(f32), t(bf16), t(bf16), t(u8), t(), t(), t(), t(bf16), t(f32), t(i64), 1 << 30, t(i64),
            8192, t(i64), t(), t(i64), 1, 4096, 12, 342, 16, 2, 8, 10**5, 10**9, HIDDEN=7168, RECORD_ELEMS=7184,
            BLOCK_H=1024, REDUCE_BLOCK_T=32, REDUCE_BLOCK_H=256, HAS_WEIGHTS=True, HAS_BIAS0=True, HAS_BIAS1=True,
            REDUCE_STAGES=reduce_stages, **common)
        check(combine, f"combine (reduce stages {reduce_stages})")
        # send_head is read once per tile, outside the pipelined loop: never through a pipeliner's shared buffer
        assert not re.search(r"memdesc<\d+x16x4xi32", combine.asm["ttgir"]), "send_head went through shared memory"


def epoch_body(rank: int, num_ranks: int, group, seed: int) -> None:
    """The epoch moves on inside the dispatch and combine kernels (their last program stores it): after every
    operation it counts the operations so far and the kernels' arrival counter is re-armed, with the outputs
    right (checked against the oracle, which a stale epoch breaks: flags and heap halves follow it). A group
    of one runs these kernels too when FLASHEP_BACKEND=triton asks for them (on one GPU)."""
    buffer = flashep.Buffer(group, int(1e7), explicitly_destroy=True)
    assert buffer.backend_name.startswith("triton/"), buffer.backend_name
    backend, device = buffer._normal, buffer.device
    num_experts, hidden, num_topk = 4 * num_ranks, 256, 2
    everyone = []
    for r in range(num_ranks):
        g = generator(seed, r)
        tokens = 40 + 7 * r
        topk_idx = torch.rand(tokens, num_experts, generator=g).topk(num_topk, dim=1).indices
        everyone.append((torch.randn(tokens, hidden, generator=g).to(torch.bfloat16), topk_idx,
                         torch.rand(tokens, num_topk, generator=g)))
    x, topk_idx, weights = (t.to(device) for t in everyone[rank])
    expect = reference.dispatch([e[0] for e in everyone], [e[1] for e in everyone], [e[2] for e in everyone],
                                num_experts)
    expect_combined = reference.combine([e.recv_x for e in expect], [e[1] for e in everyone], num_experts)[rank][0]
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    operations = 0
    for _ in range(3):  # both heap halves, twice
        recv_x, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights,
                                                     num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                     num_tokens_per_expert=per_expert)
        cached_x = buffer.dispatch(x, handle=handle)[0]
        combined = buffer.combine(recv_x, handle)[0]
        operations += 3
        assert int(backend.epoch) == operations, (int(backend.epoch), operations)
        assert int(backend.arrivals) == 0
        assert_same(recv_x.cpu(), expect[rank].recv_x, "recv_x")
        assert_same(cached_x.cpu(), expect[rank].recv_x, "cached recv_x")
        assert_same(combined.cpu(), expect_combined, "combined_x")
    buffer.destroy()


@pytest.mark.parametrize("world_size", [1, 2])
def test_kernels_advance_the_epoch(world_size, seed):
    run_ranks(world_size, epoch_body, seed, backend="triton")
