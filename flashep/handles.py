"""Conversion between flashep's `Routing` and DeepEP's handle tuples (spec 4.6).

Intranode handles have 6 elements, element 0 being the rank prefix matrix. Internode handles have 10,
element -4 being `recv_gbl_rank_prefix_sum`. Other elements carry flashep's own routing state, in the
shapes DeepEP documents where that is cheap.
"""
from __future__ import annotations

import torch

from .backends.base import Routing


def to_intranode_tuple(r: Routing) -> tuple:
    return (r.rank_prefix_matrix, r.channel_prefix_matrix, r.recv_channel_prefix_matrix, r.recv_src_idx,
            r.is_token_in_rank, r.send_head)


def to_internode_tuple(r: Routing, rank: int, node_size: int) -> tuple:
    num_ranks = r.is_token_in_rank.size(1)
    num_nodes = num_ranks // node_size
    itir = r.is_token_in_rank
    recv_counts = _recv_counts(r.rank_prefix_matrix[:, rank])
    # per destination node: inclusive prefix over channels of distinct tokens sent to that node
    channels = r.channel_prefix_matrix.size(1)
    token_channel = _token_channels(itir.size(0), channels, itir.device)
    to_node = itir.view(itir.size(0), num_nodes, node_size).any(dim=2)
    rdma_channel_prefix = _channel_prefix(to_node, token_channel, channels)
    recv_rdma_channel_prefix = torch.zeros(num_nodes, channels, dtype=torch.int32, device=itir.device)
    recv_rdma_rank_prefix_sum = torch.cumsum(recv_counts.view(num_nodes, node_size).sum(1), 0).to(torch.int32)
    rows_before = torch.cumsum(recv_counts, 0) - recv_counts
    recv_gbl_channel_prefix = (rows_before.unsqueeze(1) + r.recv_channel_prefix_matrix).to(torch.int32)
    src_meta = torch.stack([r.recv_src_idx, _row_sources(r.rank_prefix_matrix[:, rank], r.num_recv_rows)], 1)
    recv_src_meta = src_meta.to(torch.int32).contiguous().view(torch.uint8)  # [M, 8]: src token, src rank
    send_rdma_head = torch.where(to_node, torch.cumsum(to_node.to(torch.int32), 0) - 1,
                                 torch.full_like(to_node, -1, dtype=torch.int32)).to(torch.int32)
    return (itir, rdma_channel_prefix, r.channel_prefix_matrix, recv_rdma_channel_prefix,
            recv_rdma_rank_prefix_sum, recv_gbl_channel_prefix, r.rank_prefix_matrix[:, rank].contiguous(),
            recv_src_meta, send_rdma_head, r.send_head)


def from_tuple(handle, rank: int) -> Routing:
    """Rebuild the routing from a handle made by `to_intranode_tuple` or `to_internode_tuple`."""
    if not isinstance(handle, tuple) or len(handle) not in (6, 10):
        raise ValueError(f"handle must be the 6-tuple (intranode) or 10-tuple (internode) that dispatch returned, "
                         f"got {type(handle).__name__} of length {len(handle) if isinstance(handle, tuple) else '?'}")
    if len(handle) == 6:
        rpm, cpm, rcpm, src_idx, itir, send_head = handle
        return Routing(rpm, cpm, rcpm, src_idx, itir, send_head, full_matrix=getattr(rpm, "_flashep_full", False))
    itir, _, cpm, _, _, recv_gbl_channel_prefix, recv_gbl_rank_prefix_sum, src_meta, _, send_head = handle
    num_ranks = itir.size(1)
    recv_counts = _recv_counts(recv_gbl_rank_prefix_sum)
    rows_before = torch.cumsum(recv_counts, 0) - recv_counts
    rcpm = (recv_gbl_channel_prefix - rows_before.unsqueeze(1)).to(torch.int32)
    rpm = torch.zeros(num_ranks, num_ranks, dtype=torch.int32, device=itir.device)
    rpm[:, rank] = recv_gbl_rank_prefix_sum
    src_idx = src_meta.view(torch.int32)[:, 0]
    return Routing(rpm, cpm, rcpm, src_idx, itir, send_head)


def _recv_counts(prefix: torch.Tensor) -> torch.Tensor:
    return torch.diff(prefix.to(torch.int64), prepend=prefix.new_zeros(1, dtype=torch.int64))


def _row_sources(prefix: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Source rank of each received row (rows past the valid prefix get -1)."""
    rows = torch.arange(num_rows, device=prefix.device)
    src = torch.searchsorted(prefix.to(torch.int64), rows, right=True)
    return torch.where(src < prefix.numel(), src, torch.full_like(src, -1))


def _token_channels(num_tokens: int, channels: int, device) -> torch.Tensor:
    per_channel = max(1, -(-num_tokens // channels))
    return torch.arange(num_tokens, device=device) // per_channel


def _channel_prefix(mask: torch.Tensor, token_channel: torch.Tensor, channels: int) -> torch.Tensor:
    """mask [T, D] bool -> [D, C] int32 inclusive prefix over channels of the masked tokens."""
    counts = torch.zeros(channels, mask.size(1), dtype=torch.int64, device=mask.device)
    counts.index_add_(0, token_channel, mask.to(torch.int64))
    return torch.cumsum(counts, 0).t().contiguous().to(torch.int32)


def channel_prefix_matrix(is_token_in_rank: torch.Tensor, channels: int) -> torch.Tensor:
    """Sender-side channel prefix matrix [R, C] (spec 4.6 element 1): channel c owns tokens
    [c * ceil(T / C), (c + 1) * ceil(T / C))."""
    token_channel = _token_channels(is_token_in_rank.size(0), channels, is_token_in_rank.device)
    return _channel_prefix(is_token_in_rank, token_channel, channels)


def send_head(is_token_in_rank: torch.Tensor) -> torch.Tensor:
    """[T, R] int32: position of each token among the tokens sent to each rank, -1 where not sent."""
    pos = torch.cumsum(is_token_in_rank.to(torch.int32), 0) - 1
    return torch.where(is_token_in_rank, pos, torch.full_like(pos, -1)).to(torch.int32)
