"""Every Triton kernel, with the specialisations real calls produce, compiles for Hopper (sm_90).

The interpreter (CI) runs kernels without compiling them; this test records the launches of a set of
representative calls under the interpreter and compiles each one for sm_90 in a fresh process.
"""
import os
import subprocess
import sys
import tarfile

import pytest
import torch

import flashep
from flashep.fp8 import per_token_cast_to_fp8

from harness import TRITON_LOW_LATENCY, TRITON_NORMAL, run_ranks, triton_available

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = pytest.mark.skipif(not triton_available(TRITON_NORMAL, TRITON_LOW_LATENCY),
                                reason="Triton backends not present")


def _normal_calls(rank, world, group, hidden, num_tokens, record_path):
    import gpu_compile

    gpu_compile.install_recorder(record_path)
    torch.manual_seed(rank)
    num_experts, num_topk = 8, 3
    buffer = flashep.Buffer(group, int(64e6))
    x = torch.randn(num_tokens, hidden).to(torch.bfloat16)
    scores = torch.rand(num_tokens, num_experts)
    topk_idx = torch.topk(scores, num_topk, dim=1).indices
    topk_idx[0, 0] = -1
    weights = torch.rand(num_tokens, num_topk)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
    buffer.combine(recv_x, handle, topk_weights=recv_w, bias=(x, x))
    buffer.combine(recv_x, handle)
    buffer.dispatch(x, handle=handle)
    data, scales = per_token_cast_to_fp8(x)
    buffer.dispatch((data, scales.T.contiguous().T), topk_idx=topk_idx, topk_weights=weights, **layout)
    ue8m0 = torch.randint(0, 2**31 - 1, (num_tokens, max(1, hidden // 512)), dtype=torch.int32)
    buffer.dispatch((data, ue8m0), handle=handle)
    worst = num_tokens * world
    worst_x, _, worst_w, _, worst_handle, _ = buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights,
                                                              num_worst_tokens=worst, **layout)
    buffer.combine(worst_x, worst_handle, topk_weights=worst_w, bias=(x, x))  # no host counts: SM pushers
    buffer._normal.direct = True  # direct-write dispatches, bf16 and fp8 (FLASHEP_DIRECT_DISPATCH)
    buffer.dispatch(x, topk_idx=topk_idx, topk_weights=weights, **layout)
    buffer.dispatch((data, scales), topk_idx=topk_idx, topk_weights=weights, **layout)
    buffer.dispatch(x, handle=handle)  # cached
    assert buffer._normal.direct_dispatches == 3
    return True


def _low_latency_calls(rank, world, group, hidden, num_tokens, record_path):
    import gpu_compile

    gpu_compile.install_recorder(record_path)
    torch.manual_seed(rank)
    num_experts, num_topk, t_max = 8, 3, num_tokens
    size = flashep.Buffer.get_low_latency_rdma_size_hint(t_max, hidden, world, num_experts)
    buffer = flashep.Buffer(group, 0, size, low_latency_mode=True)
    x = torch.randn(num_tokens, hidden).to(torch.bfloat16)
    topk_idx = torch.topk(torch.rand(num_tokens, num_experts), num_topk, dim=1).indices
    weights = torch.rand(num_tokens, num_topk)
    for use_fp8, round_scale, ue8m0, hook in ((False, False, False, False), (True, False, False, True),
                                              (True, True, False, False), (True, True, True, True)):
        recv, _, handle, _, h = buffer.low_latency_dispatch(x, topk_idx, t_max, num_experts, use_fp8=use_fp8,
                                                            round_scale=round_scale, use_ue8m0=ue8m0,
                                                            return_recv_hook=hook)
        if h is not None:
            h()
        expert_out = torch.randn(num_experts // world, world * t_max, hidden).to(torch.bfloat16)
        for use_logfmt in (False, True):
            _, _, h = buffer.low_latency_combine(expert_out, topk_idx, weights, handle, use_logfmt=use_logfmt,
                                                 return_recv_hook=hook)
            if h is not None:
                h()
    buffer.get_next_low_latency_combine_buffer(handle).copy_(expert_out)
    buffer.low_latency_combine(expert_out, topk_idx, weights, handle, zero_copy=True)
    # a copied handle (no per-row top-k slots, no row map): the plain combine that reads the published top-k
    buffer.low_latency_combine(expert_out, topk_idx, weights, (handle[0].clone(), *handle[1:]))
    return True


def test_kernels_compile_for_sm90(tmp_path):
    # combines with an exact handle by copy engine (the reduction kernel), the worst-token one by SM pushers
    env = {"PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]), "FLASHEP_COPY_ENGINE": "1"}
    records = []
    for name, fn, hidden, tokens in (("normal-small", _normal_calls, 256, 6), ("normal-dsv3", _normal_calls, 7168, 2),
                                     ("ll-small", _low_latency_calls, 512, 3), ("ll-dsv3", _low_latency_calls, 7168, 2)):
        path = str(tmp_path / f"{name}.jsonl")
        run_ranks(2, fn, hidden, tokens, path, backend="triton", env=env, timeout=900)
        records.append(path)
    child_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child_env["PYTHONPATH"] = env["PYTHONPATH"]
    proc = subprocess.run([sys.executable, os.path.join(HERE, "gpu_compile.py"), *records], env=child_env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    compiled = proc.stdout.split("\n")
    for kernel in ("ep_layout_kernel", "ep_notify_kernel", "ep_dispatch_kernel", "ep_combine_kernel",
                   "ep_combine_reduce_kernel", "ep_ll_dispatch_kernel", "ep_ll_combine_kernel"):
        assert any(line.startswith(kernel + ":") for line in compiled), f"{kernel} was not compiled:\n{proc.stdout}"
    for kernel in ("ep_ll_dispatch_kernel", "ep_ll_combine_kernel"):  # gpu_compile.PROBE_OPTIONS
        assert any(line.startswith(kernel + ":") and "(probe options)" in line for line in compiled), proc.stdout


def _one_low_latency_call(rank, world, group):
    buffer = flashep.Buffer(group, 0, flashep.Buffer.get_low_latency_rdma_size_hint(2, 512, world, 4),
                            low_latency_mode=True)
    x = torch.randn(2, 512).to(torch.bfloat16)
    topk_idx = torch.topk(torch.rand(2, 4), 2, dim=1).indices
    buffer.low_latency_dispatch(x, topk_idx, 2, 4)
    buffer.low_latency_dispatch(x, topk_idx, 2, 4)  # the same launch again: recorded once
    return True


def test_recorded_launches_warm_a_cache(tmp_path):
    """FLASHEP_RECORD_LAUNCHES makes every test rank record its distinct launches; warm_triton_cache.py
    compiles them for sm_90 into a tarball of a Triton cache (.triton_cache/...) holding their cubins."""
    records = tmp_path / "launches"
    run_ranks(2, _one_low_latency_call, backend="triton", env={"FLASHEP_RECORD_LAUNCHES": str(records)})
    files = sorted(records.glob("*.jsonl"))
    assert len(files) == 2, files
    for path in files:
        lines = path.read_text().splitlines()
        assert len(lines) == len(set(lines)) == 1, lines  # one distinct launch per rank
        assert '"kernel": "ep_ll_dispatch_kernel"' in lines[0]
    out = tmp_path / "cache.tar.xz"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "..", "scripts", "warm_triton_cache.py"), "--jobs", "2",
                           "--out", str(out), str(records)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 skipped" in proc.stdout, proc.stdout
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert all(n.startswith(".triton_cache") for n in names), names[:5]
    assert any(n.endswith("ep_ll_dispatch_kernel.cubin") for n in names), names
