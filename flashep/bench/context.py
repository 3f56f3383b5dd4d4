"""What every measuring step of one rank needs: the group, the timer, the check log, the progress display."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from .checks import CheckLog
from .options import Options
from .results import OpResult
from .timing import Timer


class Progress:
    """Progress of the run on rank 0: a rich progress bar on a terminal, one line per step otherwise
    (logs). Other ranks stay quiet."""

    def __init__(self, enabled: bool, total: int):
        self.enabled = enabled
        self.total = max(total, 1)
        self.done = 0
        self.started = time.monotonic()
        self._bar = None
        if not enabled:
            return
        from rich.console import Console

        console = Console(stderr=True)
        self.console = console if console.is_terminal else Console(stderr=True, width=180)  # logs: wide lines
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, \
                TimeElapsedColumn

            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=self.console, transient=True)
            self._bar.start()
            self._task = self._bar.add_task("starting", total=self.total)

    def step(self, description: str) -> None:
        """A new step of the current configuration."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, description=description)
        else:
            elapsed = time.monotonic() - self.started
            self.console.print(f"[{self.done + 1}/{self.total} {elapsed:6.1f}s] {description}", highlight=False)

    def advance(self) -> None:
        """The current configuration is finished."""
        self.done += 1
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@dataclass
class RankContext:
    rank: int
    group: dist.ProcessGroup
    device: torch.device
    options: Options
    timer: Timer
    progress: Progress
    checks: CheckLog
    card: Optional[str]  # GPU name, None on CPU
    backends: dict = field(default_factory=dict)  # Buffer kind -> name of the backend that served it
    buffer_bytes: dict = field(default_factory=dict)  # Buffer kind -> bytes of communication buffer

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    def seed_for(self, salt: int) -> int:
        """A seed per rank and configuration, derived from the run's seed."""
        return (self.options.seed * 1_000_003 + self.rank * 7919 + salt) % 2**62

    def note_buffer(self, kind: str, buffer, part: str) -> None:
        """Remember the backend that served `part` ("normal" or "low_latency") of a Buffer, and its bytes."""
        normal_name, low_latency_name = buffer.backend_name.split("/")
        if part == "normal" and getattr(buffer.runtime, "direct_dispatches", 0):  # FLASHEP_DIRECT_DISPATCH
            normal_name += f" ({buffer.runtime.direct_dispatches} direct-write dispatches)"
        self.backends[kind] = normal_name if part == "normal" else low_latency_name
        self.buffer_bytes[kind] = buffer.buffer_bytes()[part]

    def measure(self, result: OpResult, fn: Callable[[], object], patterns: Sequence[str]) -> None:
        """End-to-end time of `fn`, and on GPUs the time of its kernels whose names contain `patterns`."""
        result.e2e_us = self.timer.end_to_end_us(fn)
        result.host_us = self.timer.last_host_us
        profile = self.timer.profile(fn)
        if profile is not None:
            result.kernel_us = profile.per_call_us(patterns)
            result.kernels = profile.breakdown(patterns)
