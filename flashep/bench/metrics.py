"""Byte accounting, bandwidth, and DeepEP's published figures on our GPU machines.

Two byte counts per op and rank:
- DeepEP's metric (spec 8.5): normal mode counts every row this rank receives, its own rows included
  (FP8 row = H bytes + 4 bytes per scale column, BF16 row = 2H); combine counts the BF16 rows of the
  dispatch. Low-latency mode counts every non -1 selection of this rank's tokens (dispatch FP8 message
  = H + H/128 * 4 + 16 bytes, combine = 2H).
- remote bytes: the same rows or selections, only those whose two ends are different ranks.
GB/s = bytes / 1e9 / seconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .. import logfmt

# op names, shared by the benchmark, the report and the DeepEP figures
DISPATCH_FP8 = "dispatch FP8"
DISPATCH_BF16 = "dispatch BF16"
DISPATCH_FP8_FRESH = "dispatch FP8 (non-cached)"
DISPATCH_BF16_FRESH = "dispatch BF16 (non-cached)"
COMBINE = "combine BF16"
LL_DISPATCH = "LL dispatch FP8"
LL_COMBINE = "LL combine BF16"
LL_COMBINE_LOGFMT = "LL combine LogFMT"
LL_BOTH = "LL dispatch+combine"
LL_GRAPH = "LL dispatch+combine (CUDA graph)"
LL_DISPATCH_SEND = "LL dispatch send (hook)"
LL_DISPATCH_RECV = "LL dispatch receive (hook)"
LL_COMBINE_SEND = "LL combine send (hook)"
LL_COMBINE_RECV = "LL combine receive (hook)"


@dataclass
class Traffic:
    """What one op moves, seen from one rank."""

    metric_bytes: int  # DeepEP's accounting
    remote_bytes: int  # the part that crosses to or from other ranks
    send_split: list  # bytes this rank sends to each rank (the all_to_all baseline moves the same)
    recv_split: list  # bytes this rank receives from each rank


def fp8_row_bytes(hidden: int, num_scales: int) -> int:
    return hidden + 4 * num_scales


def bf16_row_bytes(hidden: int) -> int:
    return 2 * hidden


def ll_dispatch_message_bytes(hidden: int) -> int:
    return hidden + hidden // 128 * 4 + 16


def ll_combine_message_bytes(hidden: int) -> int:
    return 2 * hidden


def ll_logfmt_message_bytes(hidden: int) -> int:
    """DeepEP's count, which is also flashep's wire bytes when every group is encoded (flashep.logfmt)."""
    return logfmt.message_bytes(hidden)


def normal_dispatch_traffic(counts: Sequence[Sequence[int]], rank: int, row_bytes: int) -> Traffic:
    """counts[s][j] = distinct tokens rank s sends to rank j; every received row counts."""
    num_ranks = len(counts)
    recv_split = [counts[s][rank] * row_bytes for s in range(num_ranks)]
    send_split = [counts[rank][j] * row_bytes for j in range(num_ranks)]
    return Traffic(sum(recv_split), sum(recv_split) - recv_split[rank], send_split, recv_split)


def normal_combine_traffic(counts: Sequence[Sequence[int]], rank: int, row_bytes: int) -> Traffic:
    """Combine sends every row received at dispatch back to its source: the dispatch reversed."""
    forward = normal_dispatch_traffic(counts, rank, row_bytes)
    return Traffic(forward.metric_bytes, forward.remote_bytes, forward.recv_split, forward.send_split)


def ll_dispatch_traffic(selections: Sequence[Sequence[int]], rank: int, message_bytes: int) -> Traffic:
    """selections[s][j] = non -1 (token, k) selections of rank s's tokens whose expert lives on rank j."""
    num_ranks = len(selections)
    send_split = [selections[rank][j] * message_bytes for j in range(num_ranks)]
    recv_split = [selections[s][rank] * message_bytes for s in range(num_ranks)]
    return Traffic(sum(send_split), sum(send_split) - send_split[rank], send_split, recv_split)


def ll_combine_traffic(selections: Sequence[Sequence[int]], rank: int, message_bytes: int) -> Traffic:
    """Combine returns one row per selection to the token's home: the dispatch pattern reversed."""
    forward = ll_dispatch_traffic(selections, rank, message_bytes)
    return Traffic(forward.metric_bytes, forward.remote_bytes, forward.recv_split, forward.send_split)


def gbps(num_bytes: Optional[int], micros: Optional[float]) -> Optional[float]:
    if num_bytes is None or not micros:
        return None
    return num_bytes / 1e3 / micros


# ---- DeepEP V1 on our machines (docs/design.md, measured 2026-11-28, 24 SMs) ------------------------------
@dataclass(frozen=True)
class Figure:
    micros: float
    gbps: Optional[float]


_DEEPEP_H200 = {
    4: {DISPATCH_FP8: Figure(428, 255), DISPATCH_BF16: Figure(811, 261), COMBINE: Figure(592, 358),
        LL_DISPATCH: Figure(33, None), LL_COMBINE: Figure(57, None)},
    2: {DISPATCH_FP8: Figure(244, 247), DISPATCH_BF16: Figure(344, 340), COMBINE: Figure(406, 288),
        LL_DISPATCH: Figure(28, None), LL_COMBINE: Figure(41, None)},
}
DEEPEP_SOURCE = "DeepEP V1 on H200 (NV18), measured 2026-11-28"
NORMAL_SHAPE = dict(tokens=4096, hidden=7168, topk=8, experts=256, num_sms=24)
LOW_LATENCY_SHAPE = dict(tokens=128, hidden=7168, topk=8, experts=256)


def card_kind(device_name: Optional[str]) -> Optional[str]:
    """The card family whose DeepEP figures apply: H200, or H100 SXM (same NVLink), else None."""
    if not device_name:
        return None
    name = device_name.upper()
    if "H200" in name:
        return "H200"
    if "H100" in name and ("SXM" in name or "HBM3" in name):
        return "H100 SXM"
    return None


def deepep_figure(device_name: Optional[str], num_ranks: int, op: str, shape: dict) -> Optional[Figure]:
    """DeepEP's figure for this op, card and rank count, only at the shape it was measured at."""
    if card_kind(device_name) is None:
        return None
    reference_shape = LOW_LATENCY_SHAPE if op.startswith("LL") else NORMAL_SHAPE
    if any(shape.get(key) != value for key, value in reference_shape.items()):
        return None
    return _DEEPEP_H200.get(num_ranks, {}).get(op)
