"""`python -m flashep.bench` on CPU (4 gloo ranks, tiny shapes), and the parts it is built from.

The end-to-end runs use the collective backend; one of them corrupts the oracle in the rank processes
(through a `sitecustomize` module) to show that a mismatch is reported and fails the run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from flashep.bench import metrics
from flashep.bench.checks import bitwise_equal
from flashep.bench.cli import main
from flashep.bench.report import plot_sweep
from flashep.bench.results import OpResult
from flashep.bench.timing import KernelProfile, kernels_from_trace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_TIMEOUT_S = 240


def run_bench(args: list, extra_path: str = "") -> subprocess.CompletedProcess:
    """Runs the benchmark as users do; on timeout the whole process group (ranks included) is killed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, REPO, env.get("PYTHONPATH", "")) if p)
    env.pop("FLASHEP_BACKEND", None)
    proc = subprocess.Popen([sys.executable, "-m", "flashep.bench", "--device", "cpu", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the benchmark did not finish in {RUN_TIMEOUT_S} s:\n{output}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, output)


# ---- end to end ---------------------------------------------------------------------------------------------
def test_quick_sweep_checks_and_times_every_op(tmp_path):
    out, plot = tmp_path / "bench.json", tmp_path / "sweep.png"
    done = run_bench(["--quick", "--sweep", "--backend", "collective", "--json", str(out), "--plot", str(plot)])
    assert done.returncode == 0, done.stdout
    record = json.loads(out.read_text())
    assert record["ok"] and record["num_failed"] == 0
    assert record["num_checks"] >= 100, "every rank checks layout, dispatch, combine and low-latency outputs"
    assert {c["rank"] for c in record["checks"]} == {0, 1, 2, 3}
    header = record["header"]
    assert header["num_ranks"] == 4 and header["baseline"] == "gloo" and header["device"] == "cpu"
    assert set(header["backends"]) == {"normal", "low-latency (8 tokens)"}

    normal_tokens = sorted({r["config"]["tokens"] for r in record["results"] if r["mode"] == "normal"})
    assert normal_tokens == [32, 64, 128, 256, 512]
    assert f"wrote {plot}" in done.stdout or "no plot: matplotlib is not installed" in done.stdout
    ops = {(r["mode"], r["op"]): r for r in record["results"] if r["config"]["tokens"] in (32, 8)}
    expected_ops = {("normal", op) for op in (metrics.DISPATCH_FP8, metrics.DISPATCH_BF16, metrics.DISPATCH_FP8_FRESH,
                                              metrics.DISPATCH_BF16_FRESH, metrics.COMBINE)}
    expected_ops |= {("low-latency", op) for op in (metrics.LL_DISPATCH, metrics.LL_COMBINE, metrics.LL_COMBINE_LOGFMT,
                                                    metrics.LL_BOTH)}
    assert set(ops) == expected_ops  # no kernels, no CUDA graph and no hook timings on CPU
    for row in record["results"]:
        assert row["e2e_us"] > 0 and row["baseline_e2e_us"] > 0
        assert row["kernel_us"] is None and row["time_kind"] == "e2e"
        assert 0 <= row["remote_bytes"] < row["metric_bytes"]
        assert row["gbps"] == pytest.approx(row["metric_bytes"] / 1e3 / row["e2e_us"])
        assert row["deepep_us"] is None  # DeepEP's figures are for H200/H100 SXM only

    hidden = record["options"]["hidden"]
    fp8, bf16 = ops[("normal", metrics.DISPATCH_FP8)], ops[("normal", metrics.DISPATCH_BF16)]
    # the same rows, counted as FP8 (H + 4 bytes per 128-channel scale) and as BF16 (2H)
    assert fp8["metric_bytes"] * 2 * hidden == bf16["metric_bytes"] * (hidden + 4 * (hidden // 128))
    assert ops[("normal", metrics.COMBINE)]["metric_bytes"] == bf16["metric_bytes"]
    assert ops[("normal", metrics.DISPATCH_FP8_FRESH)]["metric_bytes"] == fp8["metric_bytes"]
    ll_dispatch, ll_combine = ops[("low-latency", metrics.LL_DISPATCH)], ops[("low-latency", metrics.LL_COMBINE)]
    selections = ll_combine["metric_bytes"] // (2 * hidden)
    assert ll_dispatch["metric_bytes"] == selections * metrics.ll_dispatch_message_bytes(hidden)
    logfmt_bytes = ops[("low-latency", metrics.LL_COMBINE_LOGFMT)]["metric_bytes"]
    assert logfmt_bytes == selections * (hidden * 5 // 4 + hidden // 32)  # DeepEP's LogFMT count
    # 8 tokens of top-4, minus up to 4 dropped selections (min(10, T * K // 8) positions, maybe repeated)
    assert 8 * 4 - 4 <= selections < 8 * 4

    assert "checks against flashep.reference: all" in done.stdout
    assert "flashep.bench: OK (" in done.stdout


def test_a_wrong_result_fails_the_run_and_a_missing_mode_is_skipped(tmp_path):
    # every rank process imports sitecustomize at start-up: make the oracle expect one different byte of
    # every normal dispatch, and make the backend's low-latency mode unavailable
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent("""
        import torch
        import flashep.reference as reference
        from flashep.backends.collective import CollectiveBackend

        _dispatch = reference.dispatch

        def corrupted_dispatch(*args, **kwargs):
            expects = _dispatch(*args, **kwargs)
            for expect in expects:
                if expect.recv_x.numel():
                    expect.recv_x.view(-1).view(torch.uint8)[0] ^= 1
            return expects

        def unavailable(*args, **kwargs):
            raise NotImplementedError("switched off by the test")

        reference.dispatch = corrupted_dispatch
        CollectiveBackend.low_latency_dispatch = unavailable
    """))
    out = tmp_path / "bench.json"
    done = run_bench(["--quick", "--num-sms", "24,12", "--json", str(out)], extra_path=str(tmp_path))
    assert done.returncode == 1, done.stdout
    assert "MISMATCH" in done.stdout and "flashep.bench: FAILED" in done.stdout
    record = json.loads(out.read_text())
    failed = {c["what"] for c in record["checks"] if not c["ok"]}
    assert {c["config"] for c in record["checks"] if not c["ok"]} == {"24 SMs, 32 tokens", "12 SMs, 32 tokens"}
    assert f"{metrics.DISPATCH_BF16_FRESH}: recv_x" in failed
    assert f"{metrics.DISPATCH_FP8}: recv_x" in failed
    assert not any("layout" in what for what in failed)  # combine is checked against the corrupted rows too

    assert record["skipped"] == [{"mode": "low-latency", "reason": "NotImplementedError: switched off by the test"}]
    assert "low-latency mode skipped" in done.stdout
    assert {r["mode"] for r in record["results"]} == {"normal"}


def test_bad_arguments_are_rejected_before_any_rank_starts(capsys):
    assert main(["--device", "cpu", "--num-ranks", "3", "--experts", "16"]) == 2
    assert "--experts 16 must be divisible by the number of ranks (3)" in capsys.readouterr().err
    assert main(["--device", "cpu", "--hidden", "640"]) == 2
    assert "--hidden 640 must be a multiple of 512" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--num-sms", "24,x"])


# ---- parts --------------------------------------------------------------------------------------------------
def test_normal_traffic_counts_received_rows_and_remote_part():
    counts = [[5, 2, 0], [1, 4, 3], [6, 0, 2]]  # counts[s][j]: tokens rank s sends to rank j
    t = metrics.normal_dispatch_traffic(counts, rank=1, row_bytes=10)
    assert t.recv_split == [20, 40, 0] and t.send_split == [10, 40, 30]
    assert (t.metric_bytes, t.remote_bytes) == (60, 20)
    c = metrics.normal_combine_traffic(counts, rank=1, row_bytes=10)
    assert c.send_split == [20, 40, 0] and c.recv_split == [10, 40, 30]
    assert (c.metric_bytes, c.remote_bytes) == (60, 20)


def test_low_latency_traffic_counts_selections_of_own_tokens():
    selections = [[3, 1], [2, 7]]  # selections[s][j]: of rank s's tokens, on experts of rank j
    t = metrics.ll_dispatch_traffic(selections, rank=0, message_bytes=100)
    assert (t.metric_bytes, t.remote_bytes, t.send_split, t.recv_split) == (400, 100, [300, 100], [300, 200])
    c = metrics.ll_combine_traffic(selections, rank=0, message_bytes=10)
    assert (c.metric_bytes, c.remote_bytes, c.send_split, c.recv_split) == (40, 10, [30, 20], [30, 10])
    assert metrics.ll_dispatch_message_bytes(7168) == 7168 + 56 * 4 + 16
    assert metrics.fp8_row_bytes(7168, 56) == 7168 + 7168 // 32


def test_deepep_figures_apply_only_to_their_card_ranks_and_shape():
    shape = dict(tokens=4096, hidden=7168, topk=8, experts=256, num_sms=24)
    figure = metrics.deepep_figure("NVIDIA H200", 4, metrics.DISPATCH_FP8, shape)
    assert (figure.micros, figure.gbps) == (428, 255)
    assert metrics.deepep_figure("NVIDIA H100 80GB HBM3", 2, metrics.COMBINE, shape).micros == 406
    assert metrics.deepep_figure("NVIDIA A100-SXM4-80GB", 4, metrics.DISPATCH_FP8, shape) is None
    assert metrics.deepep_figure("NVIDIA H100 PCIe", 4, metrics.DISPATCH_FP8, shape) is None
    assert metrics.deepep_figure("NVIDIA H200", 8, metrics.DISPATCH_FP8, shape) is None
    assert metrics.deepep_figure("NVIDIA H200", 4, metrics.DISPATCH_FP8, dict(shape, num_sms=12)) is None
    assert metrics.deepep_figure("NVIDIA H200", 4, metrics.DISPATCH_FP8_FRESH, shape) is None
    ll_shape = dict(tokens=128, hidden=7168, topk=8, experts=256)
    assert metrics.deepep_figure("NVIDIA H200", 4, metrics.LL_COMBINE, ll_shape).micros == 57
    assert metrics.deepep_figure("NVIDIA H200", 4, metrics.LL_COMBINE, dict(ll_shape, tokens=256)) is None


def test_headline_time_is_the_kernel_time_where_deepep_reports_one():
    ll = OpResult("low-latency", {}, metrics.LL_DISPATCH, e2e_us=80.0, kernel_us=20.0, metric_bytes=2_000_000,
                  baseline_e2e_us=100.0, baseline_kernel_us=40.0, deepep_us=30.0, prefer_kernel_time=True)
    row = ll.summary()
    assert (row["time_kind"], row["time_us"], row["baseline_us"]) == ("kernel", 20.0, 40.0)
    assert row["gbps"] == pytest.approx(100.0) and row["speedup_vs_deepep"] == pytest.approx(1.5)
    assert row["deepep_gbps"] == pytest.approx(2_000_000 / 1e3 / 30.0)  # DeepEP's time on this run's bytes
    assert row["speedup_vs_baseline"] == pytest.approx(2.0)
    normal = OpResult("normal", {}, metrics.DISPATCH_FP8, e2e_us=500.0, kernel_us=400.0, metric_bytes=100_000_000,
                      baseline_e2e_us=1000.0, baseline_kernel_us=900.0)
    row = normal.summary()
    assert (row["time_kind"], row["time_us"], row["baseline_us"]) == ("e2e", 500.0, 1000.0)
    assert row["gbps"] == pytest.approx(200.0) and row["speedup_vs_deepep"] is None


def _trace_event(cat, name, ts, dur, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}


def test_kernels_are_attributed_to_the_phase_that_launched_them():
    events = [
        _trace_event("user_annotation", "flashep.bench:op", 0, 100),
        _trace_event("user_annotation", "flashep.bench:dispatch send", 10, 10),
        _trace_event("user_annotation", "flashep.bench:dispatch receive", 40, 10),
        _trace_event("cuda_driver", "cuLaunchKernel", 12, 1, correlation=1),
        _trace_event("cuda_runtime", "cudaLaunchKernel", 30, 1, correlation=2),
        _trace_event("cuda_driver", "cuLaunchKernel", 42, 1, correlation=3),
        _trace_event("kernel", "ep_ll_dispatch_kernel", 50, 7.0, correlation=1),
        _trace_event("kernel", "ampere_bf16_gemm", 60, 900.0, correlation=2),
        _trace_event("kernel", "ep_ll_dispatch_kernel", 960, 5.0, correlation=3),
        _trace_event("kernel", "ncclDevKernel_AllReduce", 0, 3.0, correlation=99),
    ]
    profile = KernelProfile(kernels_from_trace(events), calls=1)
    assert profile.phases_known
    assert profile.per_call_us(("dispatch",), "dispatch send") == 7.0
    assert profile.per_call_us(("dispatch",), "dispatch receive") == 5.0
    assert profile.per_call_us(("dispatch",)) == 12.0
    assert profile.per_call_us(("combine",)) is None
    assert profile.breakdown(("gemm",), "op") == {"ampere_bf16_gemm": 900.0}


def test_kernel_time_is_the_median_over_calls():
    events = []
    for call, (start, durations) in enumerate(((0, (4.0, 6.0)), (1000, (5.0, 6.0)), (2000, (40.0, 6.0)))):
        events.append(_trace_event("user_annotation", "flashep.bench:op", start, 100))
        for i, duration in enumerate(durations):
            correlation = 10 * call + i
            events.append(_trace_event("cuda_runtime", "cudaLaunchKernel", start + 10 + i, 1, correlation=correlation))
            events.append(_trace_event("kernel", "ep_ll_combine_kernel", start + 500 + 50 * i, duration,
                                       correlation=correlation))
    profile = KernelProfile(kernels_from_trace(events), calls=3)
    assert sorted(profile.per_call_sums(profile.matching(("combine",)))) == [10.0, 11.0, 46.0]
    assert profile.per_call_us(("combine",)) == 11.0  # the mean, 22.3, would count the one slow call
    short = KernelProfile(kernels_from_trace(events), calls=4)  # a call launched nothing: mean over 4 calls
    assert short.per_call_us(("combine",)) == pytest.approx(67.0 / 4)


def test_kernels_fall_back_to_gpu_annotations_without_launch_records():
    events = [
        _trace_event("gpu_user_annotation", "flashep.bench:combine send", 100, 20),
        _trace_event("kernel", "ep_ll_combine_kernel", 105, 4.0),
        _trace_event("kernel", "ep_ll_combine_kernel", 200, 6.0),
    ]
    profile = KernelProfile(kernels_from_trace(events), calls=2)
    assert profile.per_call_us(("combine",), "combine send") == 2.0
    assert profile.per_call_us(("combine",)) == 5.0


def test_bitwise_equal_compares_bytes_shape_and_dtype():
    x = torch.randn(4, 8).to(torch.float8_e4m3fn)
    assert bitwise_equal(x, x.clone()) == (True, "")
    y = x.clone()
    y.view(torch.uint8)[2, 5] ^= 0x01
    ok, detail = bitwise_equal(y, x)
    assert not ok and "element (2, 5)" in detail
    assert not bitwise_equal(x.float(), x.float().view(8, 4))[0]
    assert not bitwise_equal(x, x.view(torch.uint8))[0]
    zero = torch.zeros(3)
    assert not bitwise_equal(-zero, zero)[0]  # -0.0 and 0.0 are different bits
    assert bitwise_equal(None, None)[0] and not bitwise_equal(None, zero)[0]


def test_plot_of_a_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for tokens, gbps in ((256, 100.0), (512, 150.0), (1024, 180.0)):
        result = OpResult("normal", dict(tokens=tokens, num_sms=24), metrics.DISPATCH_FP8, e2e_us=100.0,
                          metric_bytes=int(gbps * 1e5), baseline_e2e_us=200.0)
        rows.append(result.summary())
    record = {"results": rows, "header": {"num_ranks": 4, "card": "NVIDIA H200", "date": "2026-11-28",
                                          "baseline": "NCCL"}}
    path = tmp_path / "sweep.png"
    assert plot_sweep(record, str(path)) is None
    assert path.stat().st_size > 1000
    assert plot_sweep({"results": rows[:1], "header": record["header"]}, str(path)) is not None
