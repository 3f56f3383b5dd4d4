"""Low-latency Triton kernels under the interpreter, 2-4 processes, against the oracle (flashep.reference).

The backend is driven directly (not through Buffer), so these tests cover the kernels and their protocol:
exact FP8/BF16 payloads and scales, the packed layout in canonical (source rank, token, k) order,
statistics, the weighted combine (bit-exact here: the interpreter does not fuse multiply-adds), the
pre-reducing combine (the default; FLASHEP_LL_PREREDUCE=0 sums every row at the home), both halves of the double buffer
with ranks out of step, the combine fallback without the per-row top-k slot, zero-copy combine, heap growth,
timeouts and recovery with clean_low_latency_buffer.
"""
import os
import time
import types

import pytest
import torch
import torch.distributed as dist

from flashep import Buffer, reference
from flashep.backends.triton_low_latency import heap_bytes
from harness import (TRITON_LOW_LATENCY, CombineLaunches, assert_same, generator, logfmt_rows, run_ranks,
                     triton_available)

pytestmark = pytest.mark.skipif(not triton_available(TRITON_LOW_LATENCY), reason="Triton low-latency backend missing")

HIDDEN = 512
MODES = {"bf16": (False, False, False), "fp8": (True, False, False), "fp8_round": (True, True, False),
         "fp8_ue8m0": (True, True, True)}
# The interpreter's defaults are one program per destination / local expert with large tiles (fastest
# there); these launch shapes exercise several token groups per destination, several parts per expert and
# tiles that straddle source blocks, as on the GPU.
MANY_PROGRAMS = {"FLASHEP_LL_SEND_PROGRAMS": "8", "FLASHEP_LL_RECV_PROGRAMS": "8", "FLASHEP_LL_TILE_TOKENS": "2",
                 "FLASHEP_LL_COMBINE_RECV_PROGRAMS": "8", "FLASHEP_LL_TILE_ROWS": "2",
                 "FLASHEP_LL_COMBINE_TILE_ROWS": "2", "FLASHEP_LL_PREREDUCE_TOKENS": "2"}
PLAIN = {"FLASHEP_LL_PREREDUCE": "0"}


def _prereduces(hook: bool) -> bool:
    """Whether the backend pre-reduces this combine: not switched off, and no receive hook (LogFMT never does)."""
    return os.environ.get("FLASHEP_LL_PREREDUCE", "1") == "1" and not hook


def _backend(rank, world, group):
    from flashep.backends.triton_low_latency import TritonLowLatencyBackend

    buffer = types.SimpleNamespace(group=group, rank=rank, group_size=world, device=torch.device("cpu"))
    return TritonLowLatencyBackend(buffer)


def _inputs(seed, world, t_max, num_experts, topk, step=0, topk_dtype=torch.int64, duplicates=False, hidden=HIDDEN):
    """Every rank's (x, topk_idx, topk_weights): token counts differ per rank (rank 2 has none), ~15% of
    the top-k entries are -1. With `duplicates`, some tokens select one expert twice."""
    xs, idxs, weights = [], [], []
    for r in range(world):
        g = generator(seed, r, step)
        num_tokens = [t_max, int(torch.randint(1, t_max, (1,), generator=g)), 0][r] if r < 3 else \
            int(torch.randint(0, t_max + 1, (1,), generator=g))
        xs.append((torch.randn(num_tokens, hidden, generator=g) * 3).to(torch.bfloat16))
        idx = torch.rand(num_tokens, num_experts, generator=g).topk(topk, dim=1).indices
        if duplicates and num_tokens:
            idx[::2, -1] = idx[::2, 0]
        idx[torch.rand(num_tokens, topk, generator=g) < 0.15] = -1
        idxs.append(idx.to(topk_dtype).contiguous())
        weights.append(torch.rand(num_tokens, topk, generator=g))
    return xs, idxs, weights


def _dispatch(backend, xs, idxs, rank, t_max, num_experts, mode, stats=None, with_hook=False):
    """Without a hook the backend launches both phases at once and `receive` is a no-op."""
    use_fp8, round_scale, ue8m0 = MODES[mode]
    return backend.low_latency_dispatch(xs[rank], idxs[rank], t_max, num_experts, use_fp8, round_scale, ue8m0,
                                        *(stats or (None, None)), with_hook)


def _check_dispatch(result, xs, idxs, rank, world, t_max, num_experts, mode):
    """Exact equality with the oracle, rows in canonical order (this backend is deterministic)."""
    use_fp8, round_scale, ue8m0 = MODES[mode]
    hidden = xs[0].size(1)
    expect = reference.low_latency_dispatch(xs, idxs, num_experts, use_fp8, round_scale, ue8m0)[rank]
    assert_same(result.recv_count, expect.recv_count, f"{mode}: recv_count")
    rows = world * t_max
    if use_fp8:
        scales = result.recv_x_scales
        assert scales.shape == (num_experts // world, rows, hidden // (512 if ue8m0 else 128))
        assert scales.stride()[1:] == (1, rows), "scales must be column-major in the last two dims"
    for i, count in enumerate(expect.recv_count.tolist()):
        assert_same(result.src_info[i, :count].long(), expect.src_idx[i], f"{mode}: src_info of expert {i}")
        assert_same(result.recv_x[i, :count], expect.data[i], f"{mode}: data of expert {i}")
        if use_fp8:
            assert_same(result.recv_x_scales[i, :count], expect.scales[i], f"{mode}: scales of expert {i}")
        packed = result.layout_range[i]
        begins, sizes = (packed >> 32).tolist(), (packed & 0xFFFFFFFF).tolist()
        for src in range(world):
            want = int((expect.src_rank[i] == src).sum())
            first = int((expect.src_rank[i] < src).sum())
            assert sizes[src] == want and (want == 0 or begins[src] == first), \
                f"{mode}: layout_range[{i}][{src}] = ({begins[src]}, {sizes[src]}), expected ({first}, {want})"


def _expected_combine(world, t_max, num_experts, handles, ys, idxs, weights, prereduce=False):
    """Combine from first principles: the n-th row of (expert, source, token) in the owner's canonical
    block answers the n-th k of that token that selects the expert. With `prereduce`, each owner's terms
    are summed apart (fp32, k order), then those sums in owner order."""
    num_local = num_experts // world
    rows = {}
    for owner, (src_info, layout_range) in enumerate(handles):
        for i in range(num_local):
            for src in range(world):
                packed = int(layout_range[i, src])
                for row in range(packed >> 32, (packed >> 32) + (packed & 0xFFFFFFFF)):
                    rows.setdefault((owner * num_local + i, src, int(src_info[i, row])), []).append(row)
    outs = []
    for home, (idx, w) in enumerate(zip(idxs, weights)):
        acc = torch.zeros(idx.size(0), HIDDEN)
        for t in range(idx.size(0)):
            seen = {}
            partials = {}
            for k in range(idx.size(1)):
                e = int(idx[t, k])
                if e < 0:
                    continue
                n = seen.get(e, 0)
                seen[e] = n + 1
                owner = e // num_local
                term = w[t, k] * ys[owner][e % num_local, rows[(e, home, t)][n]].float()
                if prereduce:
                    partials[owner] = partials.get(owner, torch.zeros(HIDDEN)) + term
                else:
                    acc[t] = acc[t] + term
            for owner in sorted(partials):
                acc[t] = acc[t] + partials[owner]
        outs.append(acc.to(torch.bfloat16))
    return outs


def _gather(group, world, *tensors):
    items = [None] * world
    dist.all_gather_object(items, tensors, group=group)
    return items


# ---- rank bodies ------------------------------------------------------------------------------------------------
def _round_trip_body(rank, world, group, seed, t_max, num_experts, topk, topk_dtype, modes):
    """Dispatch (stats on) and combine from x, then from the zero-copy buffer, with `out`; every other
    mode with receive hooks (send and receive launched apart), the others in one launch."""
    backend = _backend(rank, world, group)
    launches = CombineLaunches()
    num_local = num_experts // world
    for step, mode in enumerate(modes):
        hook = step % 2 == 1
        xs, idxs, weights = _inputs(seed, world, t_max, num_experts, topk, step, topk_dtype)
        recv_stats = torch.randint(0, 100, (num_local,), dtype=torch.int32)
        wait_stats = torch.randint(0, 100, (world,), dtype=torch.int64)
        before_recv, before_wait = recv_stats.clone(), wait_stats.clone()
        result = _dispatch(backend, xs, idxs, rank, t_max, num_experts, mode, (recv_stats, wait_stats), hook)
        if hook:
            assert_same(recv_stats, before_recv, f"{mode}: cumulative_local_expert_recv_stats before the hook")
        result.receive()
        _check_dispatch(result, xs, idxs, rank, world, t_max, num_experts, mode)
        assert_same(recv_stats, before_recv + result.recv_count, f"{mode}: cumulative_local_expert_recv_stats")
        assert_same(wait_stats, before_wait, f"{mode}: wait stats (the interpreter has no clock: += 0)")

        handle = (result.src_info, result.layout_range, t_max, HIDDEN, num_experts)
        y = torch.randn(num_local, world * t_max, HIDDEN, generator=generator(seed, rank, step, 7)).to(torch.bfloat16)
        everyone = _gather(group, world, y, result.src_info, result.layout_range)
        owners = ([g[0] for g in everyone], [(g[1], g[2], t_max, HIDDEN, num_experts) for g in everyone])
        expect_all = reference.low_latency_combine(*owners, idxs, weights, num_experts, prereduce=_prereduces(hook))
        expect = expect_all[rank]
        out = torch.full((idxs[rank].size(0), HIDDEN), float("nan"), dtype=torch.bfloat16)
        combine_wait = torch.zeros(world, dtype=torch.int64)
        launches.take()
        backend.low_latency_combine(y, idxs[rank], weights[rank], handle, False, out, combine_wait, hook)()
        assert_same(out, expect, f"{mode}: combine")
        assert set(launches.take()) == {_prereduces(hook)}, f"{mode}: pre-reduced or not, as configured"
        _check_logfmt_combine(backend, group, rank, world, seed, step, t_max, num_experts, idxs, weights, handle,
                              hook)
        if step == 0:
            with pytest.raises(ValueError, match="get_next_low_latency_combine_buffer"):
                backend.low_latency_combine(y, idxs[rank], weights[rank], handle, True, out, None, hook)
        staged = backend.get_next_low_latency_combine_buffer(t_max, HIDDEN, num_experts)
        row = HIDDEN + HIDDEN // 64
        assert staged.shape == y.shape and staged.stride() == (world * t_max * row, row, 1)
        staged.copy_(y)
        out.fill_(float("nan"))
        backend.low_latency_combine(y.neg(), idxs[rank], weights[rank], handle, True, out, None, hook)()
        assert_same(out, expect, f"{mode}: zero-copy combine")
    return True


def _check_logfmt_combine(backend, group, rank, world, seed, step, t_max, num_experts, idxs, weights, handle, hook):
    """Combine with use_logfmt=True equals the oracle of the decoded rows bit for bit, and differs from the
    plain combine (the rows really went through the codec)."""
    src_info, layout_range = handle[0], handle[1]
    num_local = num_experts // world
    y = logfmt_rows(num_local * world * t_max, HIDDEN, generator(seed, rank, step, 11)).view(num_local, -1, HIDDEN)
    everyone = _gather(group, world, y, src_info, layout_range)
    owners = ([g[0] for g in everyone], [(g[1], g[2], t_max, HIDDEN, num_experts) for g in everyone])
    expect = reference.low_latency_combine(*owners, idxs, weights, num_experts, use_logfmt=True)
    plain = reference.low_latency_combine(*owners, idxs, weights, num_experts)
    assert any(not torch.equal(a, b) for a, b in zip(expect, plain)), "LogFMT inputs that the codec leaves alone"
    out = torch.full((idxs[rank].size(0), HIDDEN), float("nan"), dtype=torch.bfloat16)
    backend.low_latency_combine(y, idxs[rank], weights[rank], handle, False, out, None, hook, use_logfmt=True)()
    assert_same(out, expect[rank], "LogFMT combine")


def _out_of_step_body(rank, world, group, seed, t_max, num_experts, topk):
    """Two dispatches back to back, then both combines (four operations: both halves twice), while the
    ranks run out of step: each rank delays its receive phases by a different amount, so fast ranks
    write the next operation into a slow rank's other half before it has read the current one."""
    backend = _backend(rank, world, group)
    delay = 0.3 * ((rank + 1) % world)
    for rnd in range(2):
        batches = [_inputs(seed, world, t_max, num_experts, topk, 10 * rnd + b) for b in range(2)]
        results = []
        for b, (xs, idxs, _) in enumerate(batches):
            result = _dispatch(backend, xs, idxs, rank, t_max, num_experts, "fp8" if b else "bf16", with_hook=True)
            time.sleep(delay)
            result.receive()
            _check_dispatch(result, xs, idxs, rank, world, t_max, num_experts, "fp8" if b else "bf16")
            results.append(result)
        for b, ((xs, idxs, weights), result) in enumerate(zip(batches, results)):
            y = torch.randn(num_experts // world, world * t_max, HIDDEN,
                            generator=generator(seed, rank, rnd, b, 3)).to(torch.bfloat16)
            out = torch.empty(idxs[rank].size(0), HIDDEN, dtype=torch.bfloat16)
            receive = backend.low_latency_combine(y, idxs[rank], weights[rank],
                                                  (result.src_info, result.layout_range, t_max, HIDDEN, num_experts),
                                                  False, out, None, True)
            time.sleep(delay)
            receive()
            everyone = _gather(group, world, y, result.src_info, result.layout_range)
            expect = reference.low_latency_combine([g[0] for g in everyone],
                                                   [(g[1], g[2], t_max, HIDDEN, num_experts) for g in everyone],
                                                   idxs, weights, num_experts)[rank]
            assert_same(out, expect, f"round {rnd} batch {b}: combine")
    return True


def _late_peers_body(rank, world, group, seed, t_max, num_experts, topk):
    """Dispatches in one launch while the peers start late (rank r waits 0.4 r s): the receive finds only its
    own rank's data at first, copies those rows, then the rest once every peer's data came."""
    backend = _backend(rank, world, group)
    for step, mode in enumerate(("bf16", "fp8")):
        xs, idxs, _ = _inputs(seed, world, t_max, num_experts, topk, step)
        if step == 0:  # the first call maps the heap (a collective): the late starts come after it
            _dispatch(backend, xs, idxs, rank, t_max, num_experts, mode)
        dist.barrier(group)
        time.sleep(0.4 * rank)
        result = _dispatch(backend, xs, idxs, rank, t_max, num_experts, mode)
        _check_dispatch(result, xs, idxs, rank, world, t_max, num_experts, mode)
    return True


def _fallback_body(rank, world, group, seed, t_max, num_experts, topk):
    """Handles whose src_info lost the per-row top-k slot (here: cloned), and tokens that select one
    expert twice: the owners then read the home rank's published top-k rows."""
    backend = _backend(rank, world, group)
    xs, idxs, weights = _inputs(seed, world, t_max, num_experts, topk, duplicates=True)
    result = _dispatch(backend, xs, idxs, rank, t_max, num_experts, "bf16")
    result.receive()
    _check_dispatch(result, xs, idxs, rank, world, t_max, num_experts, "bf16")
    y = torch.randn(num_experts // world, world * t_max, HIDDEN, generator=generator(seed, rank, 5)).to(torch.bfloat16)
    everyone = _gather(group, world, y, result.src_info, result.layout_range)
    owners = ([(g[1], g[2]) for g in everyone], [g[0] for g in everyone])
    for src_info in (result.src_info, result.src_info.clone()):
        fallback = src_info is not result.src_info  # a copy lost the slots and the row map: never pre-reduced
        expect = _expected_combine(world, t_max, num_experts, *owners, idxs, weights,
                                   prereduce=_prereduces(False) and not fallback)[rank]
        out = torch.empty(idxs[rank].size(0), HIDDEN, dtype=torch.bfloat16)
        backend.low_latency_combine(y, idxs[rank], weights[rank],
                                    (src_info, result.layout_range, t_max, HIDDEN, num_experts), False, out, None,
                                    False)()
        assert_same(out, expect, "combine with duplicate experts" + (" (fallback)" if fallback else ""))
    return True


def _growth_body(rank, world, group, seed, num_experts, topk):
    """The heap is made by clean_low_latency_buffer, then grows (collectively) for a larger T_max and
    hidden size; results stay exact."""
    backend = _backend(rank, world, group)
    backend.clean_low_latency_buffer(2, 256, num_experts)
    first = backend.heap.nbytes
    for t_max, hidden in ((2, 256), (4, 512), (3, 512)):
        xs, idxs, _ = _inputs(seed, world, t_max, num_experts, topk, t_max, hidden=hidden)
        mode = "fp8_ue8m0" if hidden == 512 else "bf16"
        result = _dispatch(backend, xs, idxs, rank, t_max, num_experts, mode)
        result.receive()
        _check_dispatch(result, xs, idxs, rank, world, t_max, num_experts, mode)
    assert backend.heap.nbytes > first and backend.regions.capacity.num_max_tokens == 4
    return True


def _epoch_wrap_body(rank, world, group, seed, t_max, num_experts, topk):
    """Operations across the points where the flag tags wrap (dispatch tags at epoch 2^30, combine tags at
    2^31): results stay exact. The epochs are set by hand on every rank after a clean."""
    backend = _backend(rank, world, group)
    for first_epoch in (2**30 - 3, 2**31 - 3):
        backend.clean_low_latency_buffer(t_max, HIDDEN, num_experts)
        backend.epoch.fill_(first_epoch)
        for step in range(3):
            xs, idxs, weights = _inputs(seed, world, t_max, num_experts, topk, step)
            result = _dispatch(backend, xs, idxs, rank, t_max, num_experts, "fp8", with_hook=step == 1)
            result.receive()
            _check_dispatch(result, xs, idxs, rank, world, t_max, num_experts, "fp8")
            y = torch.randn(num_experts // world, world * t_max, HIDDEN,
                            generator=generator(seed, rank, step, 9)).to(torch.bfloat16)
            everyone = _gather(group, world, y, result.src_info, result.layout_range)
            expect = reference.low_latency_combine([g[0] for g in everyone],
                                                   [(g[1], g[2], t_max, HIDDEN, num_experts) for g in everyone],
                                                   idxs, weights, num_experts, prereduce=_prereduces(step == 2))[rank]
            out = torch.empty(idxs[rank].size(0), HIDDEN, dtype=torch.bfloat16)
            backend.low_latency_combine(y, idxs[rank], weights[rank],
                                        (result.src_info, result.layout_range, t_max, HIDDEN, num_experts),
                                        False, out, None, step == 2)()
            assert_same(out, expect, f"epoch {int(backend.epoch)}: combine")
    assert int(backend.epoch) == 2**31 + 3
    return True


def _timeout_body(rank, world, group, seed, t_max, num_experts, topk, with_hook):
    """Rank 1 skips a dispatch: rank 0's receive (the hook, or the one launch of both phases) raises
    PeerTimeoutError naming both ranks and the phase instead of hanging; clean_low_latency_buffer then
    brings every rank back in step."""
    from flashep.kernels.sync import PeerTimeoutError

    backend = _backend(rank, world, group)
    backend.clean_low_latency_buffer(t_max, HIDDEN, num_experts)
    xs, idxs, weights = _inputs(seed, world, t_max, num_experts, topk)
    message = ""
    if rank != 1:
        with pytest.raises(PeerTimeoutError) as error:
            result = _dispatch(backend, xs, idxs, rank, t_max, num_experts, "bf16", with_hook=with_hook)
            result.receive()
        message = str(error.value)
    backend.clean_low_latency_buffer(t_max, HIDDEN, num_experts)
    result = _dispatch(backend, xs, idxs, rank, t_max, num_experts, "fp8")
    result.receive()
    _check_dispatch(result, xs, idxs, rank, world, t_max, num_experts, "fp8")
    return message


def _combine_timeout_body(rank, world, group, seed, t_max, num_experts, topk):
    """Rank 1 skips a combine whose send must wait for it: a handle that lost its top-k slots (a copy:
    rank 0's send waits for rank 1's published top-k rows), or a pre-reducing combine (rank 0's send waits
    for rank 1's weights). Rank 0 raises PeerTimeoutError naming rank 1, not itself."""
    from flashep.kernels.sync import PeerTimeoutError

    backend = _backend(rank, world, group)
    xs, idxs, weights = _inputs(seed, world, t_max, num_experts, topk)
    result = _dispatch(backend, xs, idxs, rank, t_max, num_experts, "bf16")
    result.receive()
    y = torch.randn(num_experts // world, world * t_max, HIDDEN, generator=generator(seed, rank, 4)).to(torch.bfloat16)
    message = ""
    if rank == 0:
        out = torch.empty(idxs[rank].size(0), HIDDEN, dtype=torch.bfloat16)
        src_info = result.src_info if _prereduces(False) else result.src_info.clone()
        handle = (src_info, result.layout_range, t_max, HIDDEN, num_experts)
        with pytest.raises(PeerTimeoutError) as error:
            backend.low_latency_combine(y, idxs[rank], weights[rank], handle, False, out, None,
                                        not _prereduces(False))()
        message = str(error.value)
    dist.barrier(group)
    return message


# ---- tests ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world, num_experts, topk, topk_dtype", [
    (2, 8, 3, torch.int64), (3, 12, 4, torch.int32), (4, 16, 3, torch.int64)])
def test_round_trip_matches_oracle(seed, world, num_experts, topk, topk_dtype):
    assert all(run_ranks(world, _round_trip_body, seed, 6, num_experts, topk, topk_dtype, list(MODES),
                         backend="triton"))


@pytest.mark.parametrize("world, num_experts, topk, env", [
    (2, 8, 3, PLAIN), (3, 12, 4, dict(PLAIN, **MANY_PROGRAMS)), (4, 16, 5, PLAIN)])
def test_plain_combine_matches_oracle(seed, world, num_experts, topk, env):
    """FLASHEP_LL_PREREDUCE=0: the combines without a hook (steps 0 and 2) sum every row at the home, as
    those with a hook always do (test_round_trip_matches_oracle runs the default, pre-reducing one)."""
    assert all(run_ranks(world, _round_trip_body, seed, 6, num_experts, topk, torch.int64,
                         ["bf16", "fp8", "fp8_ue8m0"], backend="triton", env=env))


def test_round_trip_other_launch_shapes(seed):
    """One token and one row per tile, a token group per token, many parts per expert, two hidden chunks."""
    env = {"FLASHEP_LL_SEND_PROGRAMS": "64", "FLASHEP_LL_RECV_PROGRAMS": "16",
           "FLASHEP_LL_COMBINE_RECV_PROGRAMS": "16", "FLASHEP_LL_TILE_ROWS": "1",
           "FLASHEP_LL_COMBINE_TILE_ROWS": "1", "FLASHEP_LL_TILE_TOKENS": "1", "FLASHEP_LL_BLOCK_H": "512",
           "FLASHEP_LL_PREREDUCE_TOKENS": "1"}
    assert all(run_ranks(2, _round_trip_body, seed, 5, 4, 2, torch.int64, ["bf16", "fp8_round"], backend="triton",
                         env=env))


@pytest.mark.parametrize("world", [2, 3])
def test_double_buffer_with_ranks_out_of_step(seed, world):
    assert all(run_ranks(world, _out_of_step_body, seed, 4, 2 * world, 2, backend="triton", env=MANY_PROGRAMS))


def test_dispatch_with_late_peers(seed):
    assert all(run_ranks(3, _late_peers_body, seed, 6, 6, 3, backend="triton", env=MANY_PROGRAMS))


@pytest.mark.parametrize("env", [dict(MANY_PROGRAMS, **PLAIN), MANY_PROGRAMS], ids=["plain", "prereduce"])
def test_combine_fallback_and_duplicate_experts(seed, env):
    assert all(run_ranks(3, _fallback_body, seed, 6, 6, 3, backend="triton", env=env))


def test_heap_grows_collectively(seed):
    assert all(run_ranks(2, _growth_body, seed, 8, 3, backend="triton"))


@pytest.mark.parametrize("env", [dict(MANY_PROGRAMS, **PLAIN), MANY_PROGRAMS], ids=["plain", "prereduce"])
def test_flag_tags_wrap(seed, env):
    assert all(run_ranks(2, _epoch_wrap_body, seed, 4, 4, 2, backend="triton", env=env))


@pytest.mark.parametrize("with_hook", [False, True])
def test_timeout_names_rank_peer_and_phase(seed, with_hook):
    env = {"FLASHEP_TIMEOUT_S": "0.3"}
    messages = run_ranks(2, _timeout_body, seed, 4, 4, 2, with_hook, backend="triton", env=env)
    assert "rank 0" in messages[0] and "rank 1" in messages[0], messages[0]
    assert "low-latency dispatch receive" in messages[0], messages[0]


@pytest.mark.parametrize("env", [PLAIN, {}], ids=["published_topk", "prereduce"])
def test_combine_timeout_names_the_missing_home(seed, env):
    messages = run_ranks(2, _combine_timeout_body, seed, 4, 4, 2, backend="triton",
                         env=dict(env, FLASHEP_TIMEOUT_S="0.3"))
    assert "rank 0 timed out" in messages[0] and "waiting for rank 1" in messages[0], messages[0]
    assert "low-latency combine receive" in messages[0], messages[0]


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
@pytest.mark.parametrize("num_max_tokens, hidden, num_experts", [
    (1, 512, 2), (8, 512, 16), (128, 7168, 256), (128, 7168, 288), (256, 4096, 64), (32, 2048, 8)])
def test_heap_fits_in_deepep_hint(num_ranks, num_max_tokens, hidden, num_experts):
    if num_experts % num_ranks:
        pytest.skip("experts not divisible by ranks")
    hint = Buffer.get_low_latency_rdma_size_hint(num_max_tokens, hidden, num_ranks, num_experts)
    assert heap_bytes(num_ranks, num_max_tokens, hidden, num_experts) <= hint
