"""Timing one collective call on every rank of the group.

- End to end: CUDA events around each call, the L2 cache flushed before each (a 256 MB write, as
  DeepEP's benchmark does), median of N. Includes the host's work of the call. On CPU: wall clock.
- Kernel time: torch.profiler (CUDA activity) over N calls; sum of the durations of the kernels whose
  names contain given substrings (case-sensitive, so CUB's `Dispatch...` templates do not match),
  divided by N. Before each profiled call the ranks line up on the GPU (an all_reduce) and the GPU then
  idles 1 ms (by %globaltimer), so every rank has its kernels queued and they start together.

Phases: code inside `phase(label)` is marked in the profile, and each kernel is attributed to the
innermost phase that launched it (through the launch's correlation id, or else the GPU-side copy of
the annotation), so one profiled round can time a send kernel and its receive kernel separately.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import triton

from ..kernels.sync import now_ns
from ..validate import values_unchecked

KERNEL_PATTERNS = ("notify", "dispatch", "combine")
NCCL_PATTERNS = ("SendRecv", "AllToAll")  # NCCL's all_to_all kernels (not the all_reduce that lines ranks up)
_LABEL_PREFIX = "flashep.bench:"
OP_PHASE = "op"  # every profiled call runs inside this phase
_PROFILER_WARMUP = 2  # profiled calls run before the recorded ones
L2_FLUSH_BYTES = int(256e6)
_IDLE_NS = 5_000_000  # time for the host to queue the call's kernels before they start; a rank that starts late
# inflates its peers' kernel times (a low-latency call costs its host ~0.3 ms, more under the profiler).


@triton.jit
def _idle_kernel(duration_ns):
    start = now_ns(True)
    while now_ns(True) - start < duration_ns:
        pass


def line_up_ranks(group: dist.ProcessGroup, token: torch.Tensor) -> None:
    """Make the kernels queued next start at the same moment on every rank (GPU): idle first, then an
    all_reduce of `token`. The host queues the call while the GPU idles, and every rank's kernels start when
    the all_reduce ends, which is the same moment on every rank whenever each host got there."""
    _idle_kernel[(1,)](_IDLE_NS)
    dist.all_reduce(token, group=group)


@contextlib.contextmanager
def _gc_paused():
    """Python's garbage collector off inside the block: a collection pause on one rank's host would delay
    that rank's kernels."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def phase(label: str):
    """Mark a region of a profiled call (no cost when the profiler is off)."""
    return torch.profiler.record_function(_LABEL_PREFIX + label)


@dataclass
class Kernel:
    name: str
    start_us: float
    duration_us: float
    phase: Optional[str]  # innermost `phase` that launched it, None if unknown
    call: Optional[float] = None  # start of the profiled call (its OP_PHASE span) that launched it


@dataclass
class KernelProfile:
    kernels: list
    calls: int
    phases_known: bool = field(init=False)

    def __post_init__(self):
        self.phases_known = any(k.phase is not None for k in self.kernels)

    def matching(self, patterns: Sequence[str], phase_label: Optional[str] = None) -> list:
        """Kernels whose name contains one of `patterns`, launched in `phase_label` (when phases are known)."""
        found = [k for k in self.kernels if any(p in k.name for p in patterns)]
        if phase_label is not None and self.phases_known:
            found = [k for k in found if k.phase == phase_label]
        return sorted(found, key=lambda k: k.start_us)

    def per_call_us(self, patterns: Sequence[str], phase_label: Optional[str] = None) -> Optional[float]:
        """Median over the profiled calls of the matching kernels' summed time (one call where a peer
        started late does not move it); the mean where kernels cannot be told apart by call."""
        found = self.matching(patterns, phase_label)
        if not found:
            return None
        sums = self.per_call_sums(found)
        return statistics.median(sums) if sums else sum(k.duration_us for k in found) / self.calls

    def per_call_sums(self, found: list) -> Optional[list]:
        """Summed duration per profiled call, or None unless every call launched some of `found`."""
        if any(k.call is None for k in found):
            return None
        sums: dict = {}
        for k in found:
            sums[k.call] = sums.get(k.call, 0.0) + k.duration_us
        return list(sums.values()) if len(sums) == self.calls else None

    def breakdown(self, patterns: Sequence[str], phase_label: Optional[str] = None) -> dict:
        """us per call of each matching kernel name."""
        totals: dict = {}
        for k in self.matching(patterns, phase_label):
            totals[k.name] = totals.get(k.name, 0.0) + k.duration_us / self.calls
        return totals


def kernels_from_trace(events: list) -> list:
    """Kernels of a Chrome trace exported by torch.profiler, each with the phase that launched it."""
    annotations = _intervals(events, "user_annotation")
    gpu_annotations = _intervals(events, "gpu_user_annotation")
    calls = [s for s in annotations if s[2] == OP_PHASE]
    gpu_calls = [s for s in gpu_annotations if s[2] == OP_PHASE]
    launches = {}
    for ev in events:
        if ev.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in ev.get("args", {}):
            launches[ev["args"]["correlation"]] = float(ev["ts"])
    kernels = []
    for ev in events:
        if str(ev.get("cat", "")).lower() != "kernel" or ev.get("ph") != "X":
            continue
        start = float(ev["ts"])
        launched_at = launches.get(ev.get("args", {}).get("correlation"))
        label = _innermost(annotations, launched_at) if launched_at is not None else None
        call = _span_start(calls, launched_at) if launched_at is not None else None
        if label is None:
            label = _innermost(gpu_annotations, start)
            call = _span_start(gpu_calls, start)
        kernels.append(Kernel(ev.get("name", ""), start, float(ev.get("dur", 0.0)), label, call))
    return kernels


def _intervals(events: list, category: str) -> list:
    spans = []
    for ev in events:
        name = ev.get("name", "")
        if ev.get("cat") == category and name.startswith(_LABEL_PREFIX) and ev.get("ph") == "X":
            start = float(ev["ts"])
            spans.append((start, start + float(ev.get("dur", 0.0)), name[len(_LABEL_PREFIX):]))
    return spans


def _innermost(spans: list, t: float) -> Optional[str]:
    inside = [s for s in spans if s[0] <= t <= s[1]]
    return max(inside, key=lambda s: s[0])[2] if inside else None


def _span_start(spans: list, t: float) -> Optional[float]:
    """Start of the span of `spans` holding time t (None if none does)."""
    inside = [s[0] for s in spans if s[0] <= t <= s[1]]
    return min(inside) if inside else None


class Timer:
    """Times calls the same way on every rank; every method is collective."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, warmups: int, iters: int,
                 profile_iters: int):
        self.group = group
        self.device = device
        self.warmups = warmups
        self.iters = iters
        self.profile_iters = profile_iters
        self.on_gpu = device.type == "cuda"
        self.last_host_us: Optional[float] = None  # see end_to_end_us
        if self.on_gpu:
            self._flush_buffer = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
            self._token = torch.ones(1, dtype=torch.int32, device=device)

    def barrier(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize(self.device)
            dist.barrier(self.group, device_ids=[self.device.index])
        else:
            dist.barrier(self.group)

    def end_to_end_us(self, fn: Callable[[], object]) -> float:
        """Median time of one call, in microseconds. On a GPU it also sets `last_host_us`: the median host time
        of one call of that loop (the Python side and the launches; the GPU may still be busy): where it is
        close to the end-to-end time, the host, not the GPU, sets the pace."""
        for _ in range(self.warmups):
            fn()
        self.barrier()
        if not self.on_gpu:
            samples = []
            for _ in range(self.iters):
                start = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - start) * 1e6)
            return statistics.median(samples)
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                 for _ in range(self.iters)]
        host = []
        for start, end in pairs:
            self._flush_l2()
            start.record()
            began = time.perf_counter()
            fn()
            host.append((time.perf_counter() - began) * 1e6)
            end.record()
        torch.cuda.synchronize(self.device)
        self.last_host_us = statistics.median(host)
        return statistics.median(start.elapsed_time(end) * 1e3 for start, end in pairs)

    def profile(self, fn: Callable[[], object]) -> Optional[KernelProfile]:
        """Kernel profile of `profile_iters` calls (GPU only; None on CPU, which has no kernels). The value
        checks are off meanwhile: their device sync would let the ranks start their kernels apart."""
        if not self.on_gpu:
            return None
        fn()
        self.barrier()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        # the first profiled calls pay the profiler's own start-up on the host (milliseconds, longer than the
        # idle before a call): warm-up steps take them, only the active steps are recorded
        steps = torch.profiler.schedule(wait=0, warmup=_PROFILER_WARMUP, active=self.profile_iters, repeat=1)
        with torch.profiler.profile(activities=activities, schedule=steps) as prof, values_unchecked(), _gc_paused():
            for _ in range(_PROFILER_WARMUP + self.profile_iters):
                self._flush_l2()
                line_up_ranks(self.group, self._token)
                with phase(OP_PHASE):
                    fn()
                torch.cuda.synchronize(self.device)
                prof.step()
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "trace.json")
            prof.export_chrome_trace(path)
            with open(path) as f:
                events = json.load(f).get("traceEvents", [])
        return KernelProfile(kernels_from_trace(events), self.profile_iters)

    def _flush_l2(self) -> None:
        self._flush_buffer.zero_()

