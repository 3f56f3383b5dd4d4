"""A rank that skips a collective call makes its peers raise PeerTimeoutError instead of hanging.

Triton backend only (the collective backend's waits are torch.distributed's own), with
FLASHEP_TIMEOUT_S=3: after one dispatch on both ranks, rank 1 skips the next; rank 0 must raise, naming
itself, rank 1 and the phase. Also when rank 1 skips the very first low-latency call, which maps the
low-latency buffer (a host-side meeting, not a kernel wait).
"""
import re
import time

import pytest
import torch
import torch.distributed as dist

import flashep
from harness import TRITON_LOW_LATENCY, TRITON_NORMAL, run_ranks, triton_available

TIMEOUT_S = 3
NUM_TOKENS, HIDDEN, NUM_EXPERTS = 4, 128, 4


def skipped_dispatch_body(rank: int, num_ranks: int, group, low_latency: bool):
    from flashep.kernels.sync import PHASES, PeerTimeoutError

    buffer = flashep.Buffer(group, num_nvl_bytes=1 << 22, num_rdma_bytes=1 << 22, low_latency_mode=low_latency)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(NUM_TOKENS, HIDDEN, generator=g).to(torch.bfloat16)
    topk_idx = torch.stack([torch.randperm(NUM_EXPERTS, generator=g)[:2] for _ in range(NUM_TOKENS)])

    def dispatch():
        if low_latency:
            buffer.low_latency_dispatch(x, topk_idx, NUM_TOKENS, NUM_EXPERTS, use_fp8=False)
        else:
            per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
            buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                            num_tokens_per_expert=per_expert, topk_idx=topk_idx,
                            topk_weights=torch.rand(NUM_TOKENS, 2, generator=g))

    dispatch()  # both ranks: the buffers are set up (the low-latency heap is allocated at the first call)
    result = None
    if rank == 0:  # rank 1 never makes this call
        start = time.monotonic()
        with pytest.raises(PeerTimeoutError) as info:
            # the error surfaces in the call that waited, or at the check of the next call
            for _ in range(2):
                dispatch()
        message = str(info.value)
        assert "rank 0" in message and "rank 1" in message, f"the error must name both ranks: {message}"
        assert any(phase in message for phase in PHASES.values()), f"the error must name the phase: {message}"
        result = time.monotonic() - start
    dist.barrier(group)  # rank 1 keeps its memory mapped until rank 0 is done
    return result


@pytest.mark.skipif(not triton_available(TRITON_NORMAL), reason="Triton normal-mode backend not present yet")
def test_skipped_dispatch_times_out():
    elapsed = run_ranks(2, skipped_dispatch_body, False, backend="triton", env={"FLASHEP_TIMEOUT_S": TIMEOUT_S},
                        timeout=300)[0]
    assert elapsed < 100, f"rank 0 took {elapsed:.0f} s to notice the missing peer"


@pytest.mark.skipif(not triton_available(TRITON_NORMAL, TRITON_LOW_LATENCY),
                    reason="Triton low-latency backend not present yet")
def test_skipped_low_latency_dispatch_times_out():
    elapsed = run_ranks(2, skipped_dispatch_body, True, backend="triton", env={"FLASHEP_TIMEOUT_S": TIMEOUT_S},
                        timeout=300)[0]
    assert elapsed < 100, f"rank 0 took {elapsed:.0f} s to notice the missing peer"


def after_timeout_body(rank: int, num_ranks: int, group):
    """After a timeout, kernels already queued must not wait for the missing peer again: they read the device
    copy of the error word's 'failed' entry. Here the host forgets the error (its word cleared) and launches one
    more cached dispatch that rank 1 never joins: it must end without recording a new timeout."""
    from flashep.kernels.sync import PeerTimeoutError

    buffer = flashep.Buffer(group, num_nvl_bytes=1 << 22)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(NUM_TOKENS, HIDDEN, generator=g).to(torch.bfloat16)
    topk_idx = torch.stack([torch.randperm(NUM_EXPERTS, generator=g)[:2] for _ in range(NUM_TOKENS)])
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS)
    handle = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                             num_tokens_per_expert=per_expert, topk_idx=topk_idx,
                             topk_weights=torch.rand(NUM_TOKENS, 2, generator=g))[4]
    try:
        if rank == 0:  # rank 1 makes no more calls
            with pytest.raises(PeerTimeoutError):
                for _ in range(2):
                    buffer.dispatch(x, handle=handle)
            errors = buffer._normal.errors
            errors.host.zero_()
            buffer.dispatch(x, handle=handle)
            errors.check()  # raises if this dispatch waited for rank 1 and timed out again
    finally:
        dist.barrier(group)  # rank 1 keeps its memory mapped until rank 0 is done, also when rank 0 failed


@pytest.mark.skipif(not triton_available(TRITON_NORMAL), reason="Triton normal-mode backend not present yet")
def test_kernels_after_a_timeout_do_not_wait_again():
    run_ranks(2, after_timeout_body, backend="triton", env={"FLASHEP_TIMEOUT_S": TIMEOUT_S}, timeout=300)


def skipped_first_low_latency_body(rank: int, num_ranks: int, group):
    from flashep.kernels.sync import PeerTimeoutError

    buffer = flashep.Buffer(group, num_nvl_bytes=0, num_rdma_bytes=1 << 22, low_latency_mode=True,
                            num_qps_per_rank=1)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(NUM_TOKENS, HIDDEN, generator=g).to(torch.bfloat16)
    topk_idx = torch.stack([torch.randperm(NUM_EXPERTS, generator=g)[:2] for _ in range(NUM_TOKENS)])
    result = None
    if rank == 0:  # rank 1 never makes its first low-latency call
        start = time.monotonic()
        with pytest.raises(PeerTimeoutError) as info:
            buffer.low_latency_dispatch(x, topk_idx, NUM_TOKENS, NUM_EXPERTS, use_fp8=False)
        message = str(info.value)
        assert "rank 0" in message, f"the error must name the waiting rank: {message}"
        assert re.search(r"\b[Rr]anks? 1\b", message), f"the error must name the missing rank: {message}"
        assert "low-latency buffer allocation" in message, f"the error must name the phase: {message}"
        result = time.monotonic() - start
    dist.barrier(group)
    return result


@pytest.mark.skipif(not triton_available(TRITON_LOW_LATENCY), reason="Triton low-latency backend not present yet")
def test_skipped_first_low_latency_call_times_out():
    elapsed = run_ranks(2, skipped_first_low_latency_body, backend="triton", env={"FLASHEP_TIMEOUT_S": TIMEOUT_S},
                        timeout=300)[0]
    assert elapsed < 60, f"rank 0 took {elapsed:.0f} s to notice the missing peer"


def several_buffers_body(rank: int, num_ranks: int, group):
    """Two live Buffers on one group (normal and low-latency, as DeepEP users make them), then a Buffer made
    again after both were destroyed: each maps its memory through the group's host meeting."""
    from flashep import reference

    g = torch.Generator().manual_seed(rank)
    x = torch.randn(NUM_TOKENS, HIDDEN, generator=g).to(torch.bfloat16)
    topk_idx = torch.stack([torch.randperm(NUM_EXPERTS * num_ranks, generator=g)[:2] for _ in range(NUM_TOKENS)])
    weights = torch.rand(NUM_TOKENS, 2, generator=g)
    everyone = [None] * num_ranks
    dist.all_gather_object(everyone, (x, topk_idx, weights), group=group)
    expect = reference.dispatch(*([e[i] for e in everyone] for i in range(3)), NUM_EXPERTS * num_ranks)[rank]

    def dispatch(buffer):
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, NUM_EXPERTS * num_ranks)
        recv_x = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                 num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=weights)[0]
        assert torch.equal(recv_x.view(torch.int16), expect.recv_x.view(torch.int16))

    normal = flashep.Buffer(group, 0, explicitly_destroy=True)
    low_latency = flashep.Buffer(group, 0, 1 << 22, low_latency_mode=True, explicitly_destroy=True)
    dispatch(normal)
    low_latency.low_latency_dispatch(x, topk_idx, NUM_TOKENS, NUM_EXPERTS * num_ranks, use_fp8=False)
    normal.destroy()
    low_latency.destroy()
    again = flashep.Buffer(group, 0, explicitly_destroy=True)
    dispatch(again)
    again.destroy()
    return True


@pytest.mark.skipif(not triton_available(TRITON_NORMAL, TRITON_LOW_LATENCY), reason="Triton backends not present")
def test_several_buffers_on_one_group():
    assert all(run_ranks(3, several_buffers_body, backend="triton", timeout=300))
