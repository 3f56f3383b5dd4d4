"""One measured op, and the figures derived from it (time, GB/s, comparisons)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from .metrics import Figure, Traffic, gbps


@dataclass
class OpResult:
    mode: str  # "normal" or "low-latency"
    config: dict  # tokens, hidden, topk, experts (and num_sms in normal mode)
    op: str
    e2e_us: Optional[float] = None  # one call, CUDA events (wall clock on CPU), median
    kernel_us: Optional[float] = None  # sum of the op's kernels per call (GPU profiler)
    host_us: Optional[float] = None  # host time of one call in the e2e loop (GPU only), median
    kernels: dict = field(default_factory=dict)  # kernel name -> us per call
    metric_bytes: Optional[int] = None  # DeepEP's accounting
    remote_bytes: Optional[int] = None
    baseline_e2e_us: Optional[float] = None  # all_to_all_single moving the same bytes
    baseline_kernel_us: Optional[float] = None
    deepep_us: Optional[float] = None
    deepep_gbps: Optional[float] = None
    prefer_kernel_time: bool = False  # the figure DeepEP reports for this op is a kernel time

    def attach_traffic(self, traffic: Traffic) -> None:
        self.metric_bytes, self.remote_bytes = traffic.metric_bytes, traffic.remote_bytes

    def attach_baseline(self, baseline) -> None:
        """`baseline`: a `baseline.BaselineTiming` of all_to_all_single moving the same bytes."""
        self.baseline_e2e_us, self.baseline_kernel_us = baseline.e2e_us, baseline.kernel_us

    def attach_deepep(self, figure: Optional[Figure]) -> None:
        if figure is not None:
            self.deepep_us, self.deepep_gbps = figure.micros, figure.gbps

    @property
    def time_kind(self) -> str:
        """Which time the headline figures use: the kernel time where DeepEP reports one and we have it,
        else the end-to-end time of one call."""
        return "kernel" if self.prefer_kernel_time and self.kernel_us is not None else "e2e"

    @property
    def time_us(self) -> Optional[float]:
        return self.kernel_us if self.time_kind == "kernel" else self.e2e_us

    @property
    def baseline_us(self) -> Optional[float]:
        if self.time_kind == "kernel" and self.baseline_kernel_us is not None:
            return self.baseline_kernel_us
        return self.baseline_e2e_us

    def summary(self) -> dict:
        """Every number, raw and derived (the JSON row)."""
        row = asdict(self)
        time_us, baseline_us = self.time_us, self.baseline_us
        row.update(
            time_kind=self.time_kind,
            time_us=time_us,
            gbps=gbps(self.metric_bytes, time_us),
            gbps_remote=gbps(self.remote_bytes, time_us),
            baseline_us=baseline_us,
            baseline_gbps=gbps(self.metric_bytes, baseline_us),
            speedup_vs_baseline=_ratio(baseline_us, time_us),
            speedup_vs_deepep=_ratio(self.deepep_us, time_us),
        )
        if self.deepep_gbps is None:  # DeepEP published a time only: its rate on this run's bytes
            row["deepep_gbps"] = gbps(self.metric_bytes, self.deepep_us)
        return row


def _ratio(reference_us: Optional[float], our_us: Optional[float]) -> Optional[float]:
    if not reference_us or not our_us:
        return None
    return reference_us / our_us
