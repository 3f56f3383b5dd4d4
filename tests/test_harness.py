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
