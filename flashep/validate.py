"""Argument checks that run before any communication; each error names the offending argument."""
from __future__ import annotations

import contextlib
import os
import weakref
from typing import Optional

import torch

_TOPK_DTYPES = (torch.int64, torch.int32)
_SCALE_DTYPES = (torch.float32, torch.int32)


def check_int(name: str, value, minimum: Optional[int] = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_tensor(name: str, t, dtype=None, shape=None, dim=None, device=None, contiguous=False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,) if dtype is not None else ()
    if dtypes and t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {want}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if device is not None and not _same_device(t.device, device):
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_topk(name: str, topk_idx, num_tokens: Optional[int], device, weights=None) -> None:
    check_tensor(name, topk_idx, dtype=_TOPK_DTYPES, dim=2, device=device, contiguous=True)
    if num_tokens is not None and topk_idx.size(0) != num_tokens:
        raise ValueError(f"{name} has {topk_idx.size(0)} rows, expected {num_tokens} (one per token)")
    if not 1 <= topk_idx.size(1) <= 32:
        raise ValueError(f"{name}: top-k must be between 1 and 32, got {topk_idx.size(1)}")
    if weights is not None:
        check_tensor("topk_weights", weights, dtype=torch.float32, shape=tuple(topk_idx.shape), device=device,
                     contiguous=True)


_values_unchecked = 0  # > 0 inside `values_unchecked()`


@contextlib.contextmanager
def values_unchecked():
    """Skip the value checks (not the shape and type checks) inside this block: the benchmark profiles
    kernels this way, since a check's device sync would make every rank start its kernels at a different
    time."""
    global _values_unchecked
    _values_unchecked += 1
    try:
        yield
    finally:
        _values_unchecked -= 1


def check_expert_ids(name: str, topk_idx: torch.Tensor, num_experts: int) -> bool:
    """Expert ids must be -1 or in [0, num_experts). Reading the values costs a device sync, so the check
    is skipped inside CUDA-graph capture, inside `values_unchecked()` and when FLASHEP_CHECK_VALUES=0.
    -> whether the values were read."""
    if os.environ.get("FLASHEP_CHECK_VALUES", "1") == "0" or _values_unchecked or topk_idx.numel() == 0:
        return False
    if topk_idx.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    low, high = torch.stack(torch.aminmax(topk_idx)).tolist()  # one device-to-host copy
    if low < -1 or high >= num_experts:
        raise ValueError(f"{name} holds expert ids outside [-1, {num_experts}): min {low}, max {high}")
    return True


class CheckedIds:
    """The expert ids read last (by `get_dispatch_layout`, or a low-latency dispatch), so that the call that
    follows with the same tensor, unchanged since (same version counter), does not read them again (the
    dispatch, or the low-latency combine): one device sync fewer per step. One-shot: any later call checks
    again."""

    def __init__(self):
        self._last: Optional[tuple] = None

    def remember(self, topk_idx: torch.Tensor, num_experts: int) -> None:
        self._last = (weakref.ref(topk_idx), topk_idx._version, num_experts)

    def take(self, topk_idx: torch.Tensor, num_experts: int) -> bool:
        """-> whether `topk_idx` is the tensor remembered, unchanged, for the same expert count (forgets it)."""
        last, self._last = self._last, None
        return (last is not None and last[0]() is topk_idx and last[1] == topk_idx._version
                and last[2] == num_experts)


def check_dispatch_x(name: str, x, device):
    """x is a bf16 [T, H] tensor or an (fp8 [T, H], scales [T, S]) tuple -> (data, scales or None)."""
    if isinstance(x, tuple):
        if len(x) != 2:
            raise ValueError(f"{name} must be a tensor or a (data, scales) tuple, got a tuple of {len(x)}")
        data, scales = x
        check_tensor(f"{name}[0]", data, dtype=torch.float8_e4m3fn, dim=2, device=device, contiguous=True)
        if data.size(1) % 16:
            raise ValueError(f"{name}[0]: hidden size {data.size(1)} must be a multiple of 16 for FP8")
        check_tensor(f"{name}[1]", scales, dtype=_SCALE_DTYPES, dim=2, device=device)
        if scales.size(0) != data.size(0):
            raise ValueError(f"{name}[1] has {scales.size(0)} rows, expected {data.size(0)}")
        return data, scales
    check_tensor(name, x, dtype=torch.bfloat16, dim=2, device=device, contiguous=True)
    if (x.size(1) * 2) % 16:
        raise ValueError(f"{name}: hidden size {x.size(1)} must be a multiple of 8 for BF16")
    return x, None


def check_bf16_rows(name: str, x, rows: int, device) -> None:
    check_tensor(name, x, dtype=torch.bfloat16, dim=2, device=device, contiguous=True)
    if x.size(0) != rows:
        raise ValueError(f"{name} has {x.size(0)} rows, expected {rows} (the rows dispatch returned)")


def check_stats(name: str, t, dtype, size: int, device) -> None:
    if t is not None:
        check_tensor(name, t, dtype=dtype, shape=(size,), device=device)


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return a.type != "cuda" or (a.index if a.index is not None else 0) == (b.index if b.index is not None else 0)
