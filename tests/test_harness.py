"""The test harness itself: results come back, failures surface with the failing rank's traceback."""
import os
import time

import pytest

from harness import RankFailure, run_ranks


def report_env(rank, num_ranks, group, name):
    return rank, num_ranks, os.environ.get(name), os.environ.get("FLASHEP_BACKEND")


def fail_on_rank_one(rank, num_ranks, group):
    if rank == 1:
        raise ValueError("rank one broke")
    time.sleep(60)  # the harness must not wait for this rank


def crash_on_rank_zero(rank, num_ranks, group):
    if rank == 0:
        os._exit(3)
    time.sleep(60)


def hang(rank, num_ranks, group):
    time.sleep(60)


def test_results_and_environment():
    results = run_ranks(3, report_env, "FLASHEP_HARNESS_PROBE", env={"FLASHEP_HARNESS_PROBE": "on"})
    assert results == [(r, 3, "on", "collective") for r in range(3)]
    assert "FLASHEP_HARNESS_PROBE" not in os.environ


def test_exception_carries_the_traceback():
    start = time.monotonic()
    with pytest.raises(RankFailure, match="(?s)rank 1 of 2.*ValueError: rank one broke"):
        run_ranks(2, fail_on_rank_one)
    assert time.monotonic() - start < 50


def test_crash_and_timeout_are_reported():
    with pytest.raises(RankFailure, match="rank 0 exited with code 3"):
        run_ranks(2, crash_on_rank_zero)
    with pytest.raises(RankFailure, match=r"did not finish within 5 s"):
        run_ranks(1, hang, timeout=5)

def test_more_ranks_than_gpus_need_the_shared_gpu_switch(monkeypatch):
    import torch

    too_many = torch.cuda.device_count() + 1
    monkeypatch.delenv("FLASHEP_TEST_SHARED_GPU", raising=False)
    with pytest.raises(ValueError, match="FLASHEP_TEST_SHARED_GPU=1"):
        run_ranks(too_many, hang, device="cuda", backend="triton")
    monkeypatch.setenv("FLASHEP_TEST_SHARED_GPU", "1")
    with pytest.raises(pytest.skip.Exception, match="Triton backend only"):
        run_ranks(too_many, hang, device="cuda", backend="collective")


def record_pid_and_sleep(rank, num_ranks, group, folder):
    with open(os.path.join(folder, f"rank{rank}"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)


def test_ranks_end_with_a_killed_test_process(tmp_path):
    """A test process ended by SIGTERM (a time limit) takes its ranks with it instead of leaving them running."""
    import signal
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import harness, test_harness; "
              "harness.run_ranks(2, test_harness.record_pid_and_sleep, sys.argv[2])")
    parent = subprocess.Popen([sys.executable, "-c", script, here, str(tmp_path)])
    deadline = time.monotonic() + 60
    while len(os.listdir(tmp_path)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # both pid files written in full
    pids = [int((tmp_path / f"rank{r}").read_text()) for r in range(2)]
    parent.send_signal(signal.SIGTERM)
    parent.wait(timeout=30)
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_running(pid) for pid in pids), pids


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read()
    except FileNotFoundError:
        return False
