"""The interface every backend implements, and the routing state shared by all of them.

`Buffer` validates arguments, manages streams/events and the low-latency hook rules, then calls one
backend. Backends move data; they may assume their inputs are valid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class Routing:
    """Routing of one normal-mode dispatch, in flashep's internal form (spec 4.6 names in brackets).

    Shapes: R ranks, T tokens on this rank, C channels (= num_sms // 2), M rows received (W rows in
    `num_worst_tokens` mode, of which the first M are valid).
    """

    rank_prefix_matrix: torch.Tensor  # [R, R] int32; [i][j] = sum over sources s <= i of n(s -> j).
    # Column `rank` is always valid; `full_matrix` says whether every column is (Triton backend).
    channel_prefix_matrix: torch.Tensor  # [R, C] int32, sender side, inclusive prefix over channels
    recv_channel_prefix_matrix: torch.Tensor  # [R, C] int32, exclusive start of channel c in source s's block
    recv_src_idx: torch.Tensor  # [M or W] int32, source token index of each received row
    is_token_in_rank: torch.Tensor  # [T, R] bool, the caller's tensor
    send_head: torch.Tensor  # [T, R] int32, position of token t among the tokens this rank sends to j, or -1
    full_matrix: bool = False

    @property
    def num_recv_rows(self) -> int:
        return self.recv_src_idx.size(0)

    @property
    def num_tokens(self) -> int:
        return self.is_token_in_rank.size(0)


@dataclass
class DispatchResult:
    recv_x: torch.Tensor  # [M or W, H] bf16 or fp8
    recv_x_scales: Optional[torch.Tensor]  # [M or W, S] contiguous, dtype of the input scales
    recv_topk_idx: Optional[torch.Tensor]  # [M or W, K] topk dtype, local expert ids or -1
    recv_topk_weights: Optional[torch.Tensor]  # [M or W, K] float32, 0 where the index is -1
    num_recv_tokens_per_expert: Optional[list]  # aligned per local expert; [] in worst mode; None cached
    routing: Optional[Routing]  # None in cached mode


@dataclass
class LowLatencyDispatchResult:
    """Outputs are allocated by the send phase and filled by the receive phase."""

    recv_x: torch.Tensor  # [L, R*T_max, H] bf16 or fp8
    recv_x_scales: Optional[torch.Tensor]  # [L, R*T_max, S] float32 or int32, column-major in the last 2 dims
    recv_count: torch.Tensor  # [L] int32
    src_info: torch.Tensor  # [L, R*T_max] int32
    layout_range: torch.Tensor  # [L, R] int64, (begin << 32) | count
    receive: Callable[[], None]  # runs the receive phase (the hook), exactly once


class Backend:
    """Data movement for one `Buffer`. All tensors are on the buffer's device; calls are collective."""

    name = "abstract"

    # ---- normal mode -------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        """-> (num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool).
        Local computation; -1 entries are ignored."""
        raise NotImplementedError

    def dispatch(self, x: torch.Tensor, x_scales: Optional[torch.Tensor], topk_idx: Optional[torch.Tensor],
                 topk_weights: Optional[torch.Tensor], num_tokens_per_rank: Optional[torch.Tensor],
                 is_token_in_rank: Optional[torch.Tensor], num_tokens_per_expert: Optional[torch.Tensor],
                 expert_alignment: int, num_worst_tokens: int, num_channels: int,
                 cached: Optional[Routing]) -> DispatchResult:
        """Normal dispatch (spec 4). With `cached`, re-send with that routing (no top-k, no counts)."""
        raise NotImplementedError

    def combine(self, x: torch.Tensor, routing: Routing, topk_weights: Optional[torch.Tensor],
                bias0: Optional[torch.Tensor], bias1: Optional[torch.Tensor]):
        """Normal combine (spec 5) -> (combined_x [T, H] bf16, combined_topk_weights [T, K] float32 or None)."""
        raise NotImplementedError

    # ---- low-latency mode --------------------------------------------------------------------------
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_tokens: int,
                             num_experts: int, use_fp8: bool, round_scale: bool, use_ue8m0: bool,
                             cumulative_local_expert_recv_stats: Optional[torch.Tensor],
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor],
                             with_hook: bool) -> LowLatencyDispatchResult:
        """Send phase now; the returned `receive` runs the receive phase (spec 7.2). Without a hook the
        caller runs `receive` right away, so a backend may do both phases now and return a no-op."""
        raise NotImplementedError

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: tuple, zero_copy: bool, out: torch.Tensor,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor],
                            with_hook: bool, use_logfmt: bool = False) -> Callable[[], None]:
        """Send phase now; returns the receive phase, which writes the weighted sum into `out` (spec 7.6).
        `with_hook` as in low_latency_dispatch; with `use_logfmt` each expert row arrives as
        `flashep.logfmt.roundtrip` of itself."""
        raise NotImplementedError

    def get_next_low_latency_combine_buffer(self, num_max_tokens: int, hidden: int, num_experts: int) -> torch.Tensor:
        raise NotImplementedError

    def clean_low_latency_buffer(self, num_max_tokens: int, hidden: int, num_experts: int) -> None:
        pass

    def destroy(self) -> None:
        pass
