"""Comparisons of benchmark outputs with the oracle (`flashep.reference`), recorded per rank.

Normal dispatch and combine must match bit for bit; low-latency combine within `calc_diff` (GPU kernels
may fuse the multiply-add): below 1e-5 after a BF16 dispatch, 9e-4 after an FP8 one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from ..fp8 import calc_diff

LL_COMBINE_LIMIT = {"BF16": 1e-5, "FP8": 9e-4}


@dataclass
class Check:
    rank: int
    mode: str
    config: str
    what: str
    ok: bool
    detail: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


class CheckLog:
    """Collects the checks of one rank."""

    def __init__(self, rank: int):
        self.rank = rank
        self.checks: list = []

    def record(self, mode: str, config: str, what: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(self.rank, mode, config, what, bool(ok), detail))
        return ok

    def same_bits(self, mode: str, config: str, what: str, actual: Optional[torch.Tensor],
                  expected: Optional[torch.Tensor]) -> bool:
        return self.record(mode, config, what, *bitwise_equal(actual, expected))

    def same_value(self, mode: str, config: str, what: str, actual, expected) -> bool:
        ok = actual == expected
        detail = "" if ok else f"got {_short(actual)}, expected {_short(expected)}"
        return self.record(mode, config, what, ok, detail)

    def similar(self, mode: str, config: str, what: str, actual: torch.Tensor, expected: torch.Tensor,
                limit: float) -> bool:
        if actual.shape != expected.shape:
            return self.record(mode, config, what, False, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
        if torch.isnan(actual.float()).any():
            return self.record(mode, config, what, False, "NaN in the output")
        diff = calc_diff(actual, expected)
        return self.record(mode, config, what, diff < limit, f"calc_diff {diff:.3g} (limit {limit:g})")

    @property
    def failures(self) -> list:
        return [c for c in self.checks if not c.ok]


def bitwise_equal(actual: Optional[torch.Tensor], expected: Optional[torch.Tensor]) -> tuple:
    """(equal, detail): same shape, dtype and bytes. None equals only None."""
    if actual is None or expected is None:
        ok = actual is None and expected is None
        return ok, "" if ok else f"got {'None' if actual is None else 'a tensor'}, expected " \
                                 f"{'None' if expected is None else 'a tensor'}"
    if actual.dtype != expected.dtype:
        return False, f"dtype {actual.dtype} != {expected.dtype}"
    if actual.shape != expected.shape:
        return False, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.contiguous().view(torch.uint8).view(-1)
    b = expected.to(actual.device).contiguous().view(torch.uint8).view(-1)
    differ = a != b
    if not differ.any():
        return True, ""
    first_byte = int(differ.nonzero()[0])
    element = first_byte // actual.element_size()
    index = _unravel(element, actual.shape)
    return False, f"{int(differ.sum())} bytes differ, first at element {index}"


def _unravel(flat: int, shape) -> tuple:
    index = []
    for size in reversed(tuple(shape)):
        index.append(flat % size)
        flat //= size
    return tuple(reversed(index))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
