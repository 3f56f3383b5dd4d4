"""Bad inputs raise clear exceptions that name the argument, before any communication.

Most checks run in this process on a one-rank gloo group. `test_errors_come_before_communication` makes
rank 0 of a two-rank group issue bad calls that rank 1 never matches: a check that came after a
collective would hang there instead of raising.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import flashep
from harness import TRITON_LOW_LATENCY, TRITON_NORMAL, backend_params, environment, free_port, run_ranks

T, H, K, E = 6, 128, 2, 4
BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn


@pytest.fixture(scope="module")
def buffer():
    with environment({"FLASHEP_BACKEND": "collective"}):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        try:
            yield flashep.Buffer(dist.group.WORLD, num_nvl_bytes=1 << 20, num_rdma_bytes=1 << 20,
                                 low_latency_mode=True)
        finally:
            dist.destroy_process_group()


class Inputs:
    """Valid arguments of every call on a one-rank group; each case breaks one of them."""

    def __init__(self, buffer):
        g = torch.Generator().manual_seed(0)
        self.buffer = buffer
        self.x = torch.randn(T, H, generator=g).to(BF16)
        self.x_fp8 = (torch.randn(T, H, generator=g).to(FP8), torch.rand(T, H // 128, generator=g))
        self.topk_idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        self.topk_weights = torch.rand(T, K, generator=g)
        self.layout = buffer.get_dispatch_layout(self.topk_idx, E)[:4]
        self.ll_x = torch.randn(T, 512, generator=g).to(BF16)

    def layout_args(self, **changes) -> dict:
        per_rank, per_rdma_rank, per_expert, in_rank = self.layout
        args = dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank,
                    num_tokens_per_expert=per_expert)
        args.update(changes)
        return args

    def dispatch(self, x=None, **changes):
        args = dict(self.layout_args(), topk_idx=self.topk_idx, topk_weights=self.topk_weights)
        args.update(changes)
        return self.buffer.dispatch(self.x if x is None else x, **args)

    def handle(self):
        return self.dispatch()[4]

    def combine(self, x=None, **changes):
        handle = self.handle()
        args = dict(handle=handle)
        args.update(changes)
        rows = handle[3].size(0)
        return self.buffer.combine(torch.randn(rows, H).to(BF16) if x is None else x, **args)

    def ll_dispatch(self, x=None, **changes):
        args = dict(topk_idx=self.topk_idx, num_max_dispatch_tokens_per_rank=8, num_experts=E)
        args.update(changes)
        return self.buffer.low_latency_dispatch(self.ll_x if x is None else x, **args)

    def ll_combine(self, x=None, **changes):
        handle = self.ll_dispatch(use_fp8=False)[2]
        args = dict(topk_idx=self.topk_idx, topk_weights=self.topk_weights, handle=handle)
        args.update(changes)
        return self.buffer.low_latency_combine(torch.randn(E, 8, 512).to(BF16) if x is None else x, **args)


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


CASES = {
    # get_dispatch_layout
    "layout topk float": (lambda i: i.buffer.get_dispatch_layout(i.topk_idx.float(), E), TypeError, "topk_idx"),
    "layout topk 1-D": (lambda i: i.buffer.get_dispatch_layout(i.topk_idx[:, 0].contiguous(), E), ValueError,
                        "topk_idx"),
    "layout topk strided": (lambda i: i.buffer.get_dispatch_layout(_non_contiguous(i.topk_idx), E), ValueError,
                            "topk_idx"),
    "layout topk device": (lambda i: i.buffer.get_dispatch_layout(i.topk_idx.to("meta"), E), ValueError, "topk_idx"),
    "layout expert id too large": (lambda i: i.buffer.get_dispatch_layout(i.topk_idx + E, E), ValueError,
                                   "topk_idx"),
    "layout expert id below -1": (lambda i: i.buffer.get_dispatch_layout(i.topk_idx - E, E), ValueError,
                                  "topk_idx"),
    "layout num_experts 0": (lambda i: i.buffer.get_dispatch_layout(i.topk_idx, 0), ValueError, "num_experts"),
    "layout topk > 32": (lambda i: i.buffer.get_dispatch_layout(torch.zeros(T, 33, dtype=torch.int64), E),
                         ValueError, "topk_idx"),
    "layout allocate_on_comm_stream alone": (
        lambda i: i.buffer.get_dispatch_layout(i.topk_idx, E, allocate_on_comm_stream=True), ValueError,
        "allocate_on_comm_stream"),
    "layout previous_event type": (lambda i: i.buffer.get_dispatch_layout(i.topk_idx, E, previous_event=object()),
                                   TypeError, "previous_event"),
    # dispatch
    "dispatch x float32": (lambda i: i.dispatch(i.x.float()), TypeError, "x"),
    "dispatch x 3-D": (lambda i: i.dispatch(i.x.view(T, 1, H)), ValueError, "x"),
    "dispatch x strided": (lambda i: i.dispatch(i.x[:, ::2]), ValueError, "x"),
    "dispatch x tuple of 3": (lambda i: i.dispatch((*i.x_fp8, i.x)), ValueError, "x"),
    "dispatch fp8 scales rows": (lambda i: i.dispatch((i.x_fp8[0], i.x_fp8[1][:-1])), ValueError, r"x\[1\]"),
    "dispatch fp8 scales dtype": (lambda i: i.dispatch((i.x_fp8[0], i.x_fp8[1].double())), TypeError, r"x\[1\]"),
    "dispatch fp8 data dtype": (lambda i: i.dispatch((i.x, i.x_fp8[1])), TypeError, r"x\[0\]"),
    "dispatch per-rank counts dtype": (
        lambda i: i.dispatch(**i.layout_args(num_tokens_per_rank=i.layout[0].long())), TypeError,
        "num_tokens_per_rank"),
    "dispatch is_token_in_rank shape": (
        lambda i: i.dispatch(**i.layout_args(is_token_in_rank=i.layout[3][:-1])), ValueError, "is_token_in_rank"),
    "dispatch per-expert counts dtype": (
        lambda i: i.dispatch(**i.layout_args(num_tokens_per_expert=i.layout[2].float())), TypeError,
        "num_tokens_per_expert"),
    "dispatch topk without weights": (lambda i: i.dispatch(topk_weights=None), ValueError, "topk_weights"),
    "dispatch weights dtype": (lambda i: i.dispatch(topk_weights=i.topk_weights.half()), TypeError, "topk_weights"),
    "dispatch weights shape": (lambda i: i.dispatch(topk_weights=i.topk_weights[:, :1].contiguous()), ValueError,
                               "topk_weights"),
    "dispatch topk rows": (lambda i: i.dispatch(topk_idx=i.topk_idx[:-1], topk_weights=i.topk_weights[:-1]),
                           ValueError, "topk_idx"),
    "dispatch expert id too large": (lambda i: i.dispatch(topk_idx=i.topk_idx + E), ValueError, "topk_idx"),
    "dispatch expert_alignment 0": (lambda i: i.dispatch(expert_alignment=0), ValueError, "expert_alignment"),
    "dispatch num_worst_tokens negative": (lambda i: i.dispatch(num_worst_tokens=-1), ValueError,
                                           "num_worst_tokens"),
    "dispatch num_worst_tokens without topk": (
        lambda i: i.dispatch(topk_idx=None, topk_weights=None, num_worst_tokens=T), ValueError, "num_worst_tokens"),
    "dispatch config odd num_sms": (lambda i: i.dispatch(config=flashep.Config(23, 6, 256)), ValueError, "num_sms"),
    "dispatch config type": (lambda i: i.dispatch(config=(24, 6, 256)), TypeError, "config"),
    "cached dispatch with topk": (lambda i: i.buffer.dispatch(i.x, handle=i.handle(), topk_idx=i.topk_idx,
                                                              topk_weights=i.topk_weights), ValueError, "topk_idx"),
    "cached dispatch rows": (lambda i: i.buffer.dispatch(i.x[:-1], handle=i.handle()), ValueError, "x"),
    "cached dispatch other num_sms": (lambda i: i.buffer.dispatch(i.x, handle=i.handle(),
                                                                  config=flashep.Config(12, 6, 256)),
                                      ValueError, "num_sms"),
    "cached dispatch bad handle": (lambda i: i.buffer.dispatch(i.x, handle=list(i.handle())), ValueError, "handle"),
    # combine
    "combine no handle": (lambda i: i.buffer.combine(i.x, None), ValueError, "handle"),
    "combine x rows": (lambda i: i.combine(torch.randn(T + 7, H).to(BF16)), ValueError, "x"),
    "combine x dtype": (lambda i: i.combine(torch.randn(T, H)), TypeError, "x"),
    "combine weights rows": (lambda i: i.combine(topk_weights=torch.rand(1, K)), ValueError, "topk_weights"),
    "combine weights dtype": (lambda i: i.combine(topk_weights=torch.rand(T, K).double()), TypeError,
                              "topk_weights"),
    "combine bias shape": (lambda i: i.combine(bias=torch.randn(T, H + 8).to(BF16)), ValueError, r"bias\[0\]"),
    "combine bias dtype": (lambda i: i.combine(bias=(torch.randn(T, H).to(BF16), torch.randn(T, H))), TypeError,
                           r"bias\[1\]"),
    "combine bias of 3": (lambda i: i.combine(bias=(i.x, i.x, i.x)), ValueError, "bias"),
    # low-latency dispatch
    "ll x float32": (lambda i: i.ll_dispatch(i.ll_x.float()), TypeError, "x"),
    "ll too many tokens": (lambda i: i.ll_dispatch(num_max_dispatch_tokens_per_rank=T - 1), ValueError,
                           "num_max_dispatch_tokens_per_rank"),
    "ll num_max 0": (lambda i: i.ll_dispatch(num_max_dispatch_tokens_per_rank=0), ValueError,
                     "num_max_dispatch_tokens_per_rank"),
    "ll hidden not multiple of 128": (lambda i: i.ll_dispatch(torch.randn(T, 200).to(BF16), use_fp8=False),
                                      ValueError, "hidden"),
    "ll fp8 hidden not multiple of 512": (lambda i: i.ll_dispatch(torch.randn(T, 384).to(BF16), use_fp8=True),
                                          ValueError, "hidden"),
    "ll ue8m0 without round_scale": (lambda i: i.ll_dispatch(use_ue8m0=True), ValueError, "use_ue8m0"),
    "ll async with hook": (lambda i: i.ll_dispatch(async_finish=True, return_recv_hook=True), ValueError,
                           "async_finish"),
    "ll expert id too large": (lambda i: i.ll_dispatch(topk_idx=i.topk_idx + E), ValueError, "topk_idx"),
    "ll expert id below -1": (lambda i: i.ll_dispatch(topk_idx=i.topk_idx - E), ValueError, "topk_idx"),
    "ll topk dtype": (lambda i: i.ll_dispatch(topk_idx=i.topk_idx.short()), TypeError, "topk_idx"),
    "ll stats dtype": (lambda i: i.ll_dispatch(cumulative_local_expert_recv_stats=torch.zeros(E, dtype=torch.int64)),
                       TypeError, "cumulative_local_expert_recv_stats"),
    "ll stats shape": (lambda i: i.ll_dispatch(cumulative_local_expert_recv_stats=torch.zeros(E + 1,
                                                                                              dtype=torch.int32)),
                       ValueError, "cumulative_local_expert_recv_stats"),
    "ll wait stats shape": (lambda i: i.ll_dispatch(dispatch_wait_recv_cost_stats=torch.zeros(2, 2,
                                                                                              dtype=torch.int64)),
                            ValueError, "dispatch_wait_recv_cost_stats"),
    # low-latency combine
    "ll combine x shape": (lambda i: i.ll_combine(torch.randn(E, 8, 256).to(BF16)), ValueError, "x"),
    "ll combine out shape": (lambda i: i.ll_combine(out=torch.empty(T + 1, 512, dtype=BF16)), ValueError, "out"),
    "ll combine handle": (lambda i: i.ll_combine(handle=(None, None, 8)), ValueError, "handle"),
    "ll combine weights dtype": (lambda i: i.ll_combine(topk_weights=i.topk_weights.double()), TypeError,
                                 "topk_weights"),
    "ll combine async with hook": (lambda i: i.ll_combine(async_finish=True, return_recv_hook=True), ValueError,
                                   "async_finish"),
    "ll combine wait stats dtype": (lambda i: i.ll_combine(combine_wait_recv_cost_stats=torch.zeros(1)), TypeError,
                                    "combine_wait_recv_cost_stats"),
    "ll combine logfmt with zero_copy": (lambda i: i.ll_combine(use_logfmt=True, zero_copy=True), ValueError,
                                         "zero_copy and use_logfmt"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_argument(buffer, name):
    call, error, argument = CASES[name]
    inputs = Inputs(buffer)
    with pytest.raises(error, match=argument):
        call(inputs)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(num_nvl_bytes=100), "num_nvl_bytes"),
    (dict(num_rdma_bytes=130, low_latency_mode=True), "num_rdma_bytes"),
    (dict(num_nvl_bytes=-128), "num_nvl_bytes"),
    (dict(num_nvl_bytes=1.5), "num_nvl_bytes"),
    (dict(num_qps_per_rank=0), "num_qps_per_rank"),
])
def test_bad_buffer_arguments(buffer, kwargs, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        flashep.Buffer(dist.group.WORLD, **kwargs)


@pytest.mark.parametrize("args, argument", [
    ((-2,), "num_sms"),
    (("20",), "num_sms"),
    ((20, 8, 8), "num_max_nvl_chunked"),
    ((20, 0, 256), "num_max_nvl_chunked"),
    ((20, 6, 256, 0, 128), "RDMA"),
    ((20, 6, 256, 128, 128), "num_max_rdma_chunked"),
])
def test_bad_config(args, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        flashep.Config(*args)


def test_set_num_sms_must_be_even():
    with pytest.raises(ValueError, match="new_num_sms"):
        flashep.Buffer.set_num_sms(3)


def test_hook_runs_once(buffer):
    inputs = Inputs(buffer)
    hook = inputs.ll_dispatch(return_recv_hook=True)[4]
    hook()
    with pytest.raises(RuntimeError, match="hook"):
        hook()


def test_no_low_latency_call_while_a_hook_is_pending(buffer):
    inputs = Inputs(buffer)
    recv_x, _, handle, _, hook = inputs.ll_dispatch(use_fp8=False, return_recv_hook=True)
    with pytest.raises(RuntimeError, match="hook"):
        inputs.ll_dispatch()
    with pytest.raises(RuntimeError, match="hook"):
        buffer.low_latency_combine(torch.randn(E, 8, 512).to(BF16), inputs.topk_idx, inputs.topk_weights, handle)
    hook()
    inputs.ll_dispatch()  # the hook ran: calls are allowed again


def test_destroy_rules(buffer):
    implicit = flashep.Buffer(dist.group.WORLD, num_nvl_bytes=1 << 20)
    with pytest.raises(RuntimeError, match="explicitly_destroy"):
        implicit.destroy()
    explicit = flashep.Buffer(dist.group.WORLD, num_nvl_bytes=1 << 20, explicitly_destroy=True)
    explicit.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        explicit.get_dispatch_layout(torch.zeros(2, 1, dtype=torch.int64), 2)


def test_dispatch_does_not_read_ids_the_layout_just_read(buffer, monkeypatch):
    """The expert-id check reads the values (a device sync on a GPU): a dispatch right after
    get_dispatch_layout with the same, unchanged topk_idx skips it, once; any other call reads them."""
    reads = []
    aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: reads.append(t) or aminmax(t))
    g = torch.Generator().manual_seed(3)
    topk_idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(6)])
    x, weights = torch.randn(6, 128, generator=g).to(BF16), torch.rand(6, 2, generator=g)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, 8)
    assert len(reads) == 1

    def dispatch(ids):
        return buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                               num_tokens_per_expert=per_expert, topk_idx=ids, topk_weights=weights)

    dispatch(topk_idx)
    assert len(reads) == 1, "the dispatch read the ids the layout had just read"
    dispatch(topk_idx)
    assert len(reads) == 2, "a second dispatch must read them again"
    buffer.get_dispatch_layout(topk_idx, 8)
    topk_idx[0, 0] = 9  # changed in place after the layout read it: the dispatch must see it
    with pytest.raises(ValueError, match="topk_idx"):
        dispatch(topk_idx)


def test_low_latency_combine_does_not_read_ids_the_dispatch_just_read(buffer, monkeypatch):
    """The same for a low-latency dispatch and the combine that follows it with the same topk_idx."""
    reads = []
    aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: reads.append(t) or aminmax(t))
    g = torch.Generator().manual_seed(4)
    topk_idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(6)])
    weights = torch.rand(6, 2, generator=g)
    handle = buffer.low_latency_dispatch(torch.randn(6, 512, generator=g).to(BF16), topk_idx, 8, 8,
                                         use_fp8=False)[2]
    assert len(reads) == 1
    expert_out = torch.randn(8, 8, 512, generator=g).to(BF16)
    buffer.low_latency_combine(expert_out, topk_idx, weights, handle)
    assert len(reads) == 1, "the combine read the ids the dispatch had just read"
    buffer.low_latency_combine(expert_out, topk_idx, weights, handle)
    assert len(reads) == 2, "a second combine must read them again"


# ---- several ranks ----------------------------------------------------------------------------------------------
def bad_calls_body(rank: int, num_ranks: int, group) -> list:
    """Rank 0 makes bad calls that rank 1 never matches; both make calls that are bad on every rank."""
    buffer = flashep.Buffer(group, num_nvl_bytes=1 << 20, num_rdma_bytes=1 << 20, low_latency_mode=True)
    x = torch.randn(4, 512).to(BF16)
    topk_idx = torch.tensor([[0, 1], [2, 3], [1, -1], [3, 0]])
    weights = torch.rand(4, 2)
    num_experts = 2 * num_ranks
    raised = []

    def expect(error, argument, call):
        with pytest.raises(error, match=argument):
            call()
        raised.append(argument)

    # num_experts not divisible by the group size: every rank raises the same error
    expect(ValueError, "num_experts", lambda: buffer.get_dispatch_layout(topk_idx, indivisible_experts(num_ranks)))
    expect(ValueError, "num_experts",
           lambda: buffer.low_latency_dispatch(x, topk_idx, 8, indivisible_experts(num_ranks)))
    if rank == 0:  # rank 1 makes no matching call: a check after any collective would hang
        layout = buffer.get_dispatch_layout(topk_idx, num_experts)  # local, no communication
        expect(ValueError, "topk_idx", lambda: buffer.get_dispatch_layout(topk_idx + num_experts, num_experts))
        expect(TypeError, "x", lambda: buffer.dispatch(x.float(), num_tokens_per_rank=layout[0],
                                                       is_token_in_rank=layout[3], num_tokens_per_expert=layout[2]))
        expect(ValueError, "topk_idx", lambda: buffer.dispatch(
            x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
            topk_idx=topk_idx + num_experts, topk_weights=weights))
        expect(ValueError, "num_max_dispatch_tokens_per_rank", lambda: buffer.low_latency_dispatch(
            x, topk_idx, 2, num_experts))
        expect(ValueError, "topk_idx", lambda: buffer.low_latency_dispatch(x, topk_idx - 5, 8, num_experts))
        expect(ValueError, "use_ue8m0", lambda: buffer.low_latency_dispatch(x, topk_idx, 8, num_experts,
                                                                            use_ue8m0=True))
    dist.barrier(group)
    return raised


def indivisible_experts(num_ranks: int) -> int:
    """An expert count that is not a multiple of the group size."""
    return 2 * num_ranks + 1


@pytest.mark.parametrize("backend", backend_params(TRITON_NORMAL, TRITON_LOW_LATENCY))
def test_errors_come_before_communication(backend):
    raised = run_ranks(2, bad_calls_body, backend=backend, timeout=300)
    assert len(raised[0]) == 8 and len(raised[1]) == 2


@pytest.mark.parametrize("variable, raw, message", [
    ("FLASHEP_LL_TILE_ROWS", "3", "FLASHEP_LL_TILE_ROWS must be a power of two, got 3"),
    ("FLASHEP_LL_SCAN_ROWS", "many", "FLASHEP_LL_SCAN_ROWS must be a power of two, got 'many'"),
    ("FLASHEP_LL_SEND_PROGRAMS", "0", "FLASHEP_LL_SEND_PROGRAMS must be >= 1, got 0"),
    ("FLASHEP_LL_FUSED", "2", "FLASHEP_LL_FUSED must be 0 or 1, got 2"),
    ("FLASHEP_LL_BLOCK_H", "256", "FLASHEP_LL_BLOCK_H must be >= 512, got 256"),
])
def test_low_latency_knobs_name_the_variable(variable, raw, message):
    from flashep.backends.triton_low_latency import Tuning

    with environment({variable: raw}):
        with pytest.raises(ValueError, match=message):
            Tuning.from_env()
    assert Tuning.from_env().fused in (0, 1)  # unset again: the defaults parse


@pytest.mark.parametrize("variable, raw, parser, message", [
    ("FLASHEP_TIMEOUT_S", "soon", "timeout_seconds", "FLASHEP_TIMEOUT_S must be a number of seconds, got 'soon'"),
    ("FLASHEP_NODE_SIZE", "0", "node_size", "FLASHEP_NODE_SIZE must be >= 1, got 0"),
])
def test_process_knobs_name_the_variable(variable, raw, parser, message):
    from flashep import _env

    with environment({variable: raw}):
        with pytest.raises(ValueError, match=message):
            getattr(_env, parser)()
