"""Multi-process test harness: run a function on N ranks of a fresh process group, plus shared helpers.

`run_ranks(world_size, fn, *args)` spawns one process per rank (gloo on CPU, NCCL with one GPU per rank),
calls `fn(rank, world_size, group, *args)` in each and returns the per-rank results. A failure or a
timeout on any rank kills the others and raises `RankFailure` with that rank's traceback.

With FLASHEP_TEST_SHARED_GPU=1, a GPU world larger than the GPUs visible puts several ranks on one GPU:
separate processes, which the GPU time-slices (a kernel spinning on a peer's flag is preempted, so the peer's
kernel runs), over a gloo group that carries CUDA tensors (NCCL refuses two ranks on one GPU). That checks the
multi-rank kernels for correctness on a machine with fewer GPUs; it says nothing about speed, and it runs
only the Triton backend (gloo has no all-to-all of CUDA tensors for the portable one).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import faulthandler
import importlib.util
import os
import pickle
import queue
import random
import signal
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 600

TRITON_NORMAL = "flashep.backends.triton_normal"
TRITON_LOW_LATENCY = "flashep.backends.triton_low_latency"


class RankFailure(AssertionError):
    """A rank raised, crashed or did not finish in time."""


def run_ranks(world_size: int, fn: Callable, *args, backend: str = "collective", device: str = "cpu",
              env: Optional[dict] = None, timeout: float = DEFAULT_TIMEOUT_S) -> list:
    """Run `fn(rank, world_size, group, *args)` on `world_size` spawned ranks -> [result of rank r].

    `fn` must be a module-level function and results must pickle. `backend` sets FLASHEP_BACKEND; the
    Triton backend on CPU also gets TRITON_INTERPRET=1. `env` adds variables. The children inherit the
    environment at spawn time, so it is set here and restored afterwards.
    """
    overrides = {"FLASHEP_BACKEND": backend}
    if backend == "triton" and device == "cpu":
        overrides["TRITON_INTERPRET"] = "1"
    if device == "cuda" and world_size > torch.cuda.device_count():
        if not shared_gpu():
            raise ValueError(f"{world_size} ranks on {torch.cuda.device_count()} GPUs need FLASHEP_TEST_SHARED_GPU=1")
        if backend != "triton":
            pytest.skip("ranks sharing a GPU run the Triton backend only (gloo has no all-to-all of CUDA tensors)")
        # torch symmetric memory refuses two ranks' allocations on one device unless told this is intended
        overrides["TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES"] = "1"
    overrides.update(env or {})
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    with environment(overrides):
        procs = [ctx.Process(target=_rank_main, args=(rank, world_size, port, device, timeout, fn, args, results),
                             daemon=True) for rank in range(world_size)]
        for p in procs:
            p.start()
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    finished = False
    try:
        while len(outputs) < world_size:
            try:
                kind, rank, payload = results.get(timeout=0.5)
            except queue.Empty:
                _check_alive(procs, outputs, deadline, timeout)
                continue
            if kind == "error":
                raise RankFailure(f"rank {rank} of {world_size} ({backend}, {device}) failed:\n{payload}")
            outputs[rank] = pickle.loads(payload)
        finished = True
    finally:
        _stop(procs, grace_s=30 if finished else 0)
    return [outputs[r] for r in range(world_size)]


def _rank_main(rank, world_size, port, device, timeout, fn, args, results):
    _die_with_parent()
    # a rank that hangs prints where it is stuck shortly before the parent gives up on it
    faulthandler.dump_traceback_later(max(1.0, timeout - 5), exit=False)
    try:
        if device == "cuda" and world_size > torch.cuda.device_count():  # FLASHEP_TEST_SHARED_GPU
            torch.cuda.set_device(rank % torch.cuda.device_count())
            dist.init_process_group("cpu:gloo,cuda:gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=world_size, timeout=timedelta(seconds=timeout))
        elif device == "cuda":
            torch.cuda.set_device(rank)
            dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout), device_id=torch.device("cuda", rank))
        else:
            torch.set_num_threads(1)  # ranks share the CPU cores: intra-op thread pools would only contend
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=timeout))
        record_dir = os.environ.get("FLASHEP_RECORD_LAUNCHES")
        if record_dir:  # the kernel specialisations of this run, for scripts/warm_triton_cache.py
            import gpu_compile

            os.makedirs(record_dir, exist_ok=True)
            gpu_compile.install_recorder(os.path.join(record_dir, f"launches-{os.getpid()}.jsonl"))
        out = fn(rank, world_size, dist.group.WORLD, *args)
        payload = pickle.dumps(out)  # by value: no shared-memory handles that die with this process
    except BaseException:
        results.put(("error", rank, traceback.format_exc()))
        return
    results.put(("ok", rank, payload))
    dist.barrier()
    dist.destroy_process_group()


def _die_with_parent() -> None:
    """Linux: this rank gets SIGKILL when the test process ends. A test process killed from outside (a time
    limit's SIGTERM) runs no cleanup, and its ranks would otherwise live on, spinning in GPU kernels that the
    next tests' ranks share the GPU with (session 17)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError, TypeError):  # not Linux: ranks end with their timeouts as before
        return
    if os.getppid() == 1:  # the parent was already gone before the prctl
        os._exit(1)


def _check_alive(procs, outputs, deadline, timeout):
    for rank, p in enumerate(procs):
        # exit code 0: the rank reported, and its message may still be in flight
        if rank not in outputs and p.exitcode not in (None, 0):
            raise RankFailure(f"rank {rank} exited with code {p.exitcode} without reporting a result")
    if time.monotonic() > deadline:
        missing = [r for r in range(len(procs)) if r not in outputs]
        raise RankFailure(f"ranks {missing} did not finish within {timeout} s")


def _stop(procs, grace_s: float):
    """Let finished ranks leave the process group, then end whatever is left."""
    end = time.monotonic() + grace_s
    for p in procs:
        p.join(timeout=max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def environment(overrides: dict):
    """Set environment variables for the duration of a `with` block."""
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update({k: str(v) for k, v in overrides.items()})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---- parametrization ----------------------------------------------------------------------------------------
def triton_available(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def backend_params(*triton_modules: str) -> list:
    """`collective` always; `triton` when the given Triton backend modules exist."""
    missing = [m for m in triton_modules if importlib.util.find_spec(m) is None]
    skip = pytest.mark.skipif(bool(missing), reason=f"Triton backend not present yet ({', '.join(missing)})")
    return [pytest.param("collective", id="collective"), pytest.param("triton", id="triton", marks=skip)]


def shared_gpu() -> bool:
    """FLASHEP_TEST_SHARED_GPU=1: GPU worlds larger than the GPUs visible share them (module docstring)."""
    return os.environ.get("FLASHEP_TEST_SHARED_GPU", "0") == "1"


def gpu_world(world_size: int):
    """A GPU world size: marked gpu, skipped when fewer GPUs are visible (unless ranks may share a GPU)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    enough = count >= world_size or (count > 0 and shared_gpu())
    return pytest.param(world_size, id=f"gpu{world_size}", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not enough, reason=f"needs {world_size} GPUs, found {count}")])


# ---- seeds and data -----------------------------------------------------------------------------------------
def fresh_seed() -> int:
    """A new seed per run (FLASHEP_TEST_SEED reproduces one); printed so a failure can be replayed."""
    fixed = os.environ.get("FLASHEP_TEST_SEED")
    seed = int(fixed) if fixed else random.SystemRandom().randrange(2**31)
    print(f"seed={seed} (rerun with FLASHEP_TEST_SEED={seed})")
    return seed


def generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator for (seed, rank, ...): every rank can regenerate any rank's inputs."""
    mixed = seed
    for key in keys:
        mixed = (mixed * 1_000_003 + key + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def logfmt_rows(rows: int, hidden: int, g: torch.Generator) -> torch.Tensor:
    """bf16 [rows, hidden >= 384] that take every LogFMT path: rows of magnitudes 2^-29 .. 2^2 (groups below 1 are
    encoded, the others go plain), scattered zeros, groups wider than 32 octaves, constant and all-zero groups."""
    scale = torch.pow(2.0, -torch.randint(-2, 30, (rows, 1), generator=g).float())
    y = torch.randn(rows, hidden, generator=g) * scale
    y[torch.rand(y.shape, generator=g) < 0.05] = 0.0
    y[::4, 5] *= 2.0**-60  # groups wider than 32 octaves
    y[1::6, 128:256] = -0.375  # constant magnitude: plain
    y[2::6, 256:384] = 0.0  # all zero: plain
    return y.to(torch.bfloat16)


def rank_device(group) -> torch.device:
    """The device of this rank's tensors: its GPU where the group carries CUDA tensors, else the CPU."""
    from flashep.buffer import group_device

    return group_device(group)


def as_bf16(x) -> torch.Tensor:
    """A dispatch input or output as bf16: FP8 (data, scales) tuples are cast back with their scales."""
    from flashep.fp8 import per_token_cast_back

    return per_token_cast_back(*x) if isinstance(x, tuple) else x


def expert_popularity(num_experts: int, skew: float, seed: int) -> torch.Tensor:
    """Per-expert score multipliers (i + 1)^-skew in a random expert order, the same on every rank: with
    skew > 0 a few experts take most tokens."""
    weights = (torch.arange(num_experts, dtype=torch.float32) + 1) ** -skew
    return weights[torch.randperm(num_experts, generator=generator(seed, -1))]


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit-exact equality (fp8 compared as bytes; values elsewhere, so -0.0 == 0.0)."""
    assert isinstance(actual, torch.Tensor), f"{what}: expected a tensor, got {type(actual).__name__}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        a, e = a.view(torch.uint8), e.view(torch.uint8)
    if not torch.equal(a, e):
        wrong = a != e
        first = tuple(wrong.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(wrong.sum())} of {a.numel()} elements differ; first at {first}: "
                             f"got {a[first].item()}, expected {e[first].item()}")


class CombineLaunches:
    """Records, in this process, whether each low-latency combine launch pre-reduces (its PREREDUCE)."""

    def __init__(self):
        from flashep.backends import triton_low_latency as module

        self.values = []
        launch = module.launch

        def spy(kernel, grid, **kwargs):
            if kernel is module.kernels.ep_ll_combine_kernel:
                self.values.append(kwargs["PREREDUCE"])
            return launch(kernel, grid, **kwargs)

        module.launch = spy

    def take(self) -> list:
        values, self.values = self.values, []
        return values
