"""Backend selection: FLASHEP_BACKEND = collective | triton | unset (the fastest available)."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from .. import _env
from ..transport.heap import HostMeeting
from .base import Backend

CHOICES = ("", "auto", "collective", "triton")


def select_backends(buffer) -> tuple[Backend, Backend]:
    """-> (normal-mode backend, low-latency backend) for a new `Buffer`."""
    from .collective import CollectiveBackend

    choice = os.environ.get("FLASHEP_BACKEND", "").strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"FLASHEP_BACKEND must be one of collective, triton or unset, got {choice!r}")
    collective = CollectiveBackend(buffer)
    if choice == "collective":
        return collective, collective
    ok, why = triton_supported(buffer, explicit=choice == "triton")
    if not ok:
        if choice == "triton":
            raise RuntimeError(f"FLASHEP_BACKEND=triton is not usable here: {why}")
        return collective, collective
    normal = low_latency = collective
    # one rank has nothing to move over NVLink: its kernels run only when asked for (tests and probes on one GPU)
    use_normal = not buffer.is_internode and (buffer.group_size > 1 or choice == "triton")
    if not (use_normal or buffer.low_latency_mode):
        return normal, low_latency
    meeting = HostMeeting(buffer.group)  # the Triton backends' host-side waits on peers time out
    if use_normal:
        from .triton_normal import TritonNormalBackend

        normal = TritonNormalBackend(buffer, meeting)
    if buffer.low_latency_mode:
        from .triton_low_latency import TritonLowLatencyBackend

        low_latency = TritonLowLatencyBackend(buffer, meeting)
    return normal, low_latency


def triton_supported(buffer, explicit: bool) -> tuple[bool, str]:
    """The Triton kernels need every peer's memory mapped: GPUs of one host with peer access, or CPU
    processes of one host under TRITON_INTERPRET=1 (CI)."""
    if buffer.device.type == "cpu":
        if not _env.interpret_mode():
            return False, "CPU tensors need TRITON_INTERPRET=1 for the Triton kernels"
        if not explicit:
            return False, "the Triton interpreter is for tests; it is used only when asked for"
        return _same_host(buffer.group)
    ok, why = _same_host(buffer.group)
    if not ok:
        return ok, why
    devices = [None] * buffer.group_size
    dist.all_gather_object(devices, torch.cuda.current_device(), group=buffer.group)
    me = torch.cuda.current_device()
    for peer in devices:
        if peer != me and not torch.cuda.can_device_access_peer(me, peer):
            return False, f"GPU {me} cannot access GPU {peer} directly (no NVLink/P2P)"
    return True, ""


def _same_host(group) -> tuple[bool, str]:
    hosts = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    if len(set(hosts)) != 1:
        return False, "the group spans several hosts (the Triton kernels are intranode)"
    return True, ""
