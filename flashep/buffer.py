"""`Buffer`: DeepEP V1's communication object, with argument checks, streams, events and hook rules.

The data movement itself is delegated to a backend (`flashep.backends`): the portable one built on
torch.distributed collectives, or the Triton kernels over NVLink symmetric memory.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional, Union

from . import _env  # noqa: F401  (sets the multicast guards before torch.distributed initialises)

import torch
import torch.distributed as dist

from . import handles
from .backends.base import Backend, Routing
from .config import INT32_MAX, Config, default_combine_config, default_dispatch_config
from .event import EventHandle, EventOverlap, OpOrder, StreamScope
from .validate import (CheckedIds, check_bf16_rows, check_dispatch_x, check_expert_ids, check_int, check_stats,
                       check_tensor, check_topk)

topk_idx_t = torch.int64
_TOPK_DTYPES = (torch.int64, torch.int32)


class Buffer:
    """Expert-parallel dispatch/combine over one process group (DeepEP V1 `deep_ep.Buffer` API)."""

    num_sms: int = 20

    def __init__(self, group: Optional[dist.ProcessGroup] = None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: bool = False, explicitly_destroy: bool = False, enable_shrink: bool = False,
                 comm=None):
        if group is None:
            if comm is None and not dist.is_initialized():
                raise ValueError("group: pass a torch.distributed ProcessGroup (torch.distributed is not initialised)")
            group = dist.group.WORLD
        if comm is not None and comm.Get_size() != dist.get_world_size(group):
            raise ValueError("comm: the MPI communicator's size differs from the process group's size")
        self.group = group
        self.rank = dist.get_rank(group)
        self.group_size = dist.get_world_size(group)
        check_int("num_nvl_bytes", num_nvl_bytes, minimum=0)
        check_int("num_rdma_bytes", num_rdma_bytes, minimum=0)
        check_int("num_qps_per_rank", num_qps_per_rank, minimum=1)
        if num_nvl_bytes % 128 or num_rdma_bytes % 128:
            raise ValueError(f"num_nvl_bytes and num_rdma_bytes must be multiples of 128, "
                             f"got {num_nvl_bytes} and {num_rdma_bytes}")
        if num_rdma_bytes > 0 and num_nvl_bytes > INT32_MAX:
            raise ValueError(f"num_nvl_bytes must be <= {INT32_MAX} when num_rdma_bytes > 0, got {num_nvl_bytes}")
        if not low_latency_mode and num_rdma_bytes > INT32_MAX:
            raise ValueError(f"num_rdma_bytes must be <= {INT32_MAX} outside low-latency mode, got {num_rdma_bytes}")
        self.node_size = _env.node_size()
        if not (self.group_size <= self.node_size or self.group_size % self.node_size == 0):
            raise ValueError(f"group size {self.group_size} must be <= the node size ({self.node_size}) or a multiple "
                             f"of it (set FLASHEP_NODE_SIZE to change the node size)")
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.num_qps_per_rank = num_qps_per_rank
        self.allow_nvlink_for_low_latency_mode = allow_nvlink_for_low_latency_mode
        self.allow_mnnvl = allow_mnnvl
        self.explicitly_destroy = explicitly_destroy
        self.enable_shrink = enable_shrink
        self.device = group_device(group)
        self.comm_stream = torch.cuda.Stream(self.device, priority=-1) if self.device.type == "cuda" else None
        self._order = OpOrder()  # the normal-mode calls of this buffer run one after another
        self._checked_ids = CheckedIds()
        from .backends import select_backends  # deferred: backends import this module's helpers
        self._normal, self._low_latency = select_backends(self)
        self.runtime = self._normal  # DeepEP exposes its native object here; destroy() sets it to None
        self._ll_pending_hook: Optional["_Hook"] = None
        self._ll_mask = torch.zeros(self.group_size, dtype=torch.int32, device=self.device)

    # ---- properties and static helpers ------------------------------------------------------------
    @property
    def num_rdma_ranks(self) -> int:
        return max(1, self.group_size // self.node_size)

    @property
    def is_internode(self) -> bool:
        return self.group_size > self.node_size

    @property
    def backend_name(self) -> str:
        """Names of the backends in use: normal mode / low-latency mode."""
        return f"{self._normal.name}/{self._low_latency.name}"

    def buffer_bytes(self) -> dict:
        """Communication buffer bytes this rank holds now, per mode: {"normal": n, "low_latency": n}.
        Backends map their buffers at first use and may grow them; each reports its `nbytes` (0 if none)."""
        normal = getattr(self._normal, "nbytes", 0)
        low_latency = 0 if self._low_latency is self._normal else getattr(self._low_latency, "nbytes", 0)
        return {"normal": normal, "low_latency": low_latency}

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        check_int("new_num_sms", new_num_sms, minimum=2)
        if new_num_sms % 2:
            raise ValueError(f"new_num_sms must be even, got {new_num_sms}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def is_sm90_compiled() -> bool:
        """FP8 paths exist everywhere in flashep (nothing is compiled ahead of time)."""
        return True

    @staticmethod
    def capture() -> EventOverlap:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return EventOverlap(EventHandle(device))

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """DeepEP's low-latency buffer size (spec 7.1); flashep's own layout fits in this."""
        t_max, e = num_max_dispatch_tokens_per_rank, num_experts
        scales = hidden // 128
        dispatch_msg = 16 + max(2 * hidden, hidden + 4 * scales)
        combine_msg = 4 * scales + 2 * hidden
        send = max(t_max * dispatch_msg, e * t_max * combine_msg)
        recv = max(e * t_max * dispatch_msg, e * t_max * combine_msg)
        signaling = -(-(e * 4) // 128) * 128
        total = 2 * send + 2 * recv + 2 * signaling
        return (total + 128) // 128 * 128

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        return default_dispatch_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return default_combine_config(num_ranks, Buffer.num_sms)

    def get_comm_stream(self) -> Optional[torch.cuda.Stream]:
        return self.comm_stream

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: Optional[torch.Size] = None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        """A view of this rank's raw buffer (`offset` in bytes, as DeepEP's implementation does)."""
        raw = self._raw_buffer(use_rdma_buffer)
        view = raw[offset:]
        view = view[: view.numel() // dtype.itemsize * dtype.itemsize].view(dtype)
        if size is None:
            return view
        return view[: torch.Size(size).numel()].view(size)

    def _raw_buffer(self, use_rdma_buffer: bool) -> torch.Tensor:
        backend = self._low_latency if use_rdma_buffer else self._normal
        raw = getattr(backend, "raw_buffer", None)
        if raw is None:
            nbytes = self.num_rdma_bytes if use_rdma_buffer else self.num_nvl_bytes
            raw = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
            backend.raw_buffer = raw
        return raw

    def destroy(self) -> None:
        if not self.explicitly_destroy:
            raise RuntimeError("destroy() needs a Buffer created with explicitly_destroy=True")
        if self.runtime is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dist.barrier(self.group)
        self._normal.destroy()
        if self._low_latency is not self._normal:
            self._low_latency.destroy()
        self.runtime = None

    def _check_alive(self) -> None:
        if self.runtime is None:
            raise RuntimeError("this Buffer was destroyed")

    # ---- normal mode --------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                            allocate_on_comm_stream: bool = False):
        """-> (num_tokens_per_rank, num_tokens_per_rdma_rank or None, num_tokens_per_expert,
        is_token_in_rank, event)."""
        self._check_alive()
        check_topk("topk_idx", topk_idx, None, self.device)
        self._check_num_experts(num_experts)
        if check_expert_ids("topk_idx", topk_idx, num_experts):
            self._checked_ids.remember(topk_idx, num_experts)
        with StreamScope(self.device, self.comm_stream, previous_event, async_finish,
                         allocate_on_comm_stream, self._order) as scope:
            per_rank, per_expert, in_rank = self._normal.get_dispatch_layout(topk_idx, num_experts)
            per_rdma_rank = None
            if self.is_internode:
                nodes = in_rank.view(in_rank.size(0), self.num_rdma_ranks, self.node_size).any(dim=2)
                per_rdma_rank = nodes.sum(0, dtype=torch.int32)
            scope.keep(topk_idx, per_rank, per_expert, in_rank, per_rdma_rank)
        return per_rank, per_rdma_rank, per_expert, in_rank, scope.event

    def dispatch(self, x: Union[torch.Tensor, tuple], handle: Optional[tuple] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False):
        """-> (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event)."""
        self._check_alive()
        data, scales = check_dispatch_x("x", x, self.device)
        num_tokens = data.size(0)
        config = config if config is not None else _default_config("dispatch", self.group_size, Buffer.num_sms)
        _check_config("config", config)
        check_int("expert_alignment", expert_alignment, minimum=1)
        check_int("num_worst_tokens", num_worst_tokens, minimum=0)
        cached = None
        if handle is not None:
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("topk_idx/topk_weights must be None when dispatching with a cached handle")
            cached = handles.from_tuple(handle, self.rank)
            if cached.num_tokens != num_tokens:
                raise ValueError(f"x has {num_tokens} rows but the handle was made for {cached.num_tokens} tokens")
            if cached.channel_prefix_matrix.size(1) != config.num_channels:
                raise ValueError(f"config.num_sms={config.num_sms} differs from the num_sms the handle was made with "
                                 f"({2 * cached.channel_prefix_matrix.size(1)})")
        else:
            if (topk_idx is None) != (topk_weights is None):
                raise ValueError("topk_idx and topk_weights must be given together or both omitted")
            if num_worst_tokens > 0 and topk_idx is None:
                raise ValueError("num_worst_tokens > 0 needs topk_idx and topk_weights")
            num_experts = self._check_layout_args(num_tokens, num_tokens_per_rank, num_tokens_per_rdma_rank,
                                                  is_token_in_rank, num_tokens_per_expert)
            if topk_idx is not None:
                check_topk("topk_idx", topk_idx, num_tokens, self.device, weights=topk_weights)
                if not self._checked_ids.take(topk_idx, num_experts):  # read already by get_dispatch_layout
                    check_expert_ids("topk_idx", topk_idx, num_experts)
        with StreamScope(self.device, self.comm_stream, previous_event, async_finish,
                         allocate_on_comm_stream, self._order) as scope:
            result = self._normal.dispatch(data, scales, topk_idx, topk_weights, num_tokens_per_rank,
                                           is_token_in_rank, num_tokens_per_expert, expert_alignment,
                                           num_worst_tokens, config.num_channels, cached)
            recv_x = result.recv_x if scales is None else (result.recv_x, result.recv_x_scales)
            scope.keep(x, recv_x, topk_idx, topk_weights, result.recv_topk_idx, result.recv_topk_weights,
                       is_token_in_rank, num_tokens_per_rank, num_tokens_per_expert)
        if cached is not None:
            return recv_x, None, None, None, None, scope.event
        routing = result.routing
        if self.is_internode:
            out_handle = handles.to_internode_tuple(routing, self.rank, self.node_size)
        else:
            out_handle = handles.to_intranode_tuple(routing)
        return (recv_x, result.recv_topk_idx, result.recv_topk_weights, result.num_recv_tokens_per_expert,
                out_handle, scope.event)

    def combine(self, x: torch.Tensor, handle: tuple, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[torch.Tensor, tuple, None] = None, config: Optional[Config] = None,
                previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False):
        """-> (combined_x, combined_topk_weights, event)."""
        self._check_alive()
        if handle is None:
            raise ValueError("handle: combine needs the handle returned by dispatch")
        routing = handles.from_tuple(handle, self.rank)
        config = config if config is not None else _default_config("combine", self.group_size, Buffer.num_sms)
        _check_config("config", config)
        check_bf16_rows("x", x, routing.num_recv_rows, self.device)
        if topk_weights is not None:
            check_tensor("topk_weights", topk_weights, dtype=torch.float32, dim=2, device=self.device,
                         contiguous=True)
            if topk_weights.size(0) != routing.num_recv_rows:
                raise ValueError(f"topk_weights has {topk_weights.size(0)} rows, expected {routing.num_recv_rows}")
        biases = _split_bias(bias)
        for i, b in enumerate(biases):
            if b is not None:
                check_tensor(f"bias[{i}]", b, dtype=torch.bfloat16, dim=2, device=self.device, contiguous=True)
                if tuple(b.shape) != (routing.num_tokens, x.size(1)):
                    raise ValueError(f"bias[{i}] must have shape {(routing.num_tokens, x.size(1))}, "
                                     f"got {tuple(b.shape)}")
        with StreamScope(self.device, self.comm_stream, previous_event, async_finish,
                         allocate_on_comm_stream, self._order) as scope:
            combined_x, combined_w = self._normal.combine(x, routing, topk_weights, biases[0], biases[1])
            scope.keep(x, topk_weights, biases[0], biases[1], combined_x, combined_w)
        return combined_x, combined_w, scope.event

    # DeepEP exposes these too; users should call dispatch/combine.
    internode_dispatch = dispatch
    internode_combine = combine

    def _check_num_experts(self, num_experts: int) -> None:
        check_int("num_experts", num_experts, minimum=1)
        if num_experts % self.group_size:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by the group size ({self.group_size})")

    def _check_layout_args(self, num_tokens, per_rank, per_rdma_rank, in_rank, per_expert) -> int:
        r = self.group_size
        check_tensor("num_tokens_per_rank", per_rank, dtype=torch.int32, shape=(r,), device=self.device)
        check_tensor("is_token_in_rank", in_rank, dtype=torch.bool, shape=(num_tokens, r), device=self.device,
                     contiguous=True)
        check_tensor("num_tokens_per_expert", per_expert, dtype=torch.int32, dim=1, device=self.device)
        num_experts = per_expert.size(0)
        self._check_num_experts(num_experts)
        if num_experts // r > 1024:
            raise ValueError(f"at most 1024 experts per rank are supported, got {num_experts // r}")
        if self.is_internode:
            check_tensor("num_tokens_per_rdma_rank", per_rdma_rank, dtype=torch.int32,
                         shape=(self.num_rdma_ranks,), device=self.device)
        return num_experts

    # ---- low-latency mode ---------------------------------------------------------------------------
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False):
        """-> (recv_x, recv_count, handle, event, hook)."""
        self._check_alive()
        self._check_low_latency_call(async_finish, return_recv_hook)
        t_max = num_max_dispatch_tokens_per_rank
        check_int("num_max_dispatch_tokens_per_rank", t_max, minimum=1)
        self._check_num_experts(num_experts)
        check_tensor("x", x, dtype=torch.bfloat16, dim=2, device=self.device, contiguous=True)
        num_tokens, hidden = x.shape
        if num_tokens > t_max:
            raise ValueError(f"x has {num_tokens} tokens, more than num_max_dispatch_tokens_per_rank={t_max}")
        if hidden % 128 or (use_fp8 and hidden % 512):
            raise ValueError(f"x: hidden size {hidden} must be a multiple of 128 (of 512 with use_fp8=True)")
        if use_ue8m0 and not (use_fp8 and round_scale):
            raise ValueError("use_ue8m0=True needs use_fp8=True and round_scale=True")
        check_topk("topk_idx", topk_idx, num_tokens, self.device)
        if check_expert_ids("topk_idx", topk_idx, num_experts):
            self._checked_ids.remember(topk_idx, num_experts)  # the combine of the same ids need not read them
        num_local = num_experts // self.group_size
        check_stats("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats, torch.int32,
                    num_local, self.device)
        check_stats("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats, torch.int64,
                    self.group_size, self.device)
        result = self._low_latency.low_latency_dispatch(
            x, topk_idx, t_max, num_experts, use_fp8, round_scale, use_ue8m0,
            cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, return_recv_hook)
        recv_x = (result.recv_x, result.recv_x_scales) if use_fp8 else result.recv_x
        handle = (result.src_info, result.layout_range, t_max, hidden, num_experts)
        keep = (x, topk_idx, result.recv_x, result.recv_x_scales, result.recv_count, result.src_info,
                result.layout_range, cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats)
        event, hook = self._finish_low_latency(result.receive, async_finish, return_recv_hook, keep)
        return recv_x, result.recv_count, handle, event, hook

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: tuple, use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False,
                            out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None):
        """-> (combined_x, event, hook)."""
        self._check_alive()
        self._check_low_latency_call(async_finish, return_recv_hook)
        if not isinstance(handle, tuple) or len(handle) != 5:
            raise ValueError("handle must be the 5-tuple returned by low_latency_dispatch")
        src_info, layout_range, t_max, hidden, num_experts = handle
        if zero_copy and use_logfmt:
            raise ValueError("zero_copy and use_logfmt cannot be combined")
        num_local = num_experts // self.group_size
        check_tensor("x", x, dtype=torch.bfloat16, shape=(num_local, self.group_size * t_max, hidden),
                     device=self.device, contiguous=True)
        check_topk("topk_idx", topk_idx, None, self.device, weights=topk_weights)
        if topk_idx.size(0) > t_max:
            raise ValueError(f"topk_idx has {topk_idx.size(0)} tokens, more than num_max_dispatch_tokens_per_rank="
                             f"{t_max}")
        if not self._checked_ids.take(topk_idx, num_experts):  # read already by the low-latency dispatch
            check_expert_ids("topk_idx", topk_idx, num_experts)
        num_tokens = topk_idx.size(0)
        if out is None:
            out = torch.empty(num_tokens, hidden, dtype=torch.bfloat16, device=self.device)
        else:
            check_tensor("out", out, dtype=torch.bfloat16, shape=(num_tokens, hidden), device=self.device,
                         contiguous=True)
        check_stats("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats, torch.int64, self.group_size,
                    self.device)
        receive = self._low_latency.low_latency_combine(x, topk_idx, topk_weights, handle, zero_copy, out,
                                                        combine_wait_recv_cost_stats, return_recv_hook,
                                                        use_logfmt=use_logfmt)
        keep = (x, topk_idx, topk_weights, src_info, layout_range, out, combine_wait_recv_cost_stats)
        event, hook = self._finish_low_latency(receive, async_finish, return_recv_hook, keep)
        return out, event, hook

    def get_next_low_latency_combine_buffer(self, handle: tuple) -> torch.Tensor:
        """bf16 view [L, R * T_max, H] (row stride H + H / 64) to write expert outputs into for zero_copy."""
        _, _, t_max, hidden, num_experts = handle
        return self._low_latency.get_next_low_latency_combine_buffer(t_max, hidden, num_experts)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        self._check_alive()
        self._ll_pending_hook = None
        self._low_latency.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        check_int("rank_to_mask", rank_to_mask, minimum=0)
        if rank_to_mask >= self.group_size:
            raise ValueError(f"rank_to_mask must be < {self.group_size}, got {rank_to_mask}")
        self._ll_mask[rank_to_mask] = int(bool(mask))

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        check_tensor("mask_status", mask_status, dtype=torch.int32, shape=(self.group_size,), device=self.device)
        mask_status.copy_(self._ll_mask)

    def low_latency_clean_mask_buffer(self) -> None:
        self._ll_mask.zero_()

    def _check_low_latency_call(self, async_finish: bool, return_recv_hook: bool) -> None:
        if async_finish and return_recv_hook:
            raise ValueError("async_finish and return_recv_hook cannot both be True")
        pending = self._ll_pending_hook
        if pending is not None and not pending.called:
            raise RuntimeError("a low-latency call was issued before the hook of the previous low-latency call ran: "
                               "call hook() first (at most one low-latency operation may wait for its hook)")

    def _finish_low_latency(self, receive: Callable[[], None], async_finish: bool, return_recv_hook: bool,
                            keep: tuple):
        if return_recv_hook:
            hook = _Hook(receive)
            self._ll_pending_hook = hook
            return EventOverlap(None), hook
        self._ll_pending_hook = None
        receive()
        if async_finish:
            return EventOverlap(EventHandle(self.device), extra_tensors=tuple(t for t in keep if t is not None)), None
        return EventOverlap(None), None

    def __del__(self):
        if getattr(self, "explicitly_destroy", False) and getattr(self, "runtime", None) is not None:
            import warnings
            warnings.warn("flashep.Buffer created with explicitly_destroy=True was not destroyed", ResourceWarning)


class _Hook:
    """The receive half of a low-latency call; callable exactly once."""

    def __init__(self, receive: Callable[[], None]):
        self._receive = receive
        self.called = False

    def __call__(self) -> None:
        if self.called:
            raise RuntimeError("this low-latency receive hook was already called (each hook runs once)")
        self.called = True
        self._receive()


def _split_bias(bias) -> tuple:
    if bias is None:
        return None, None
    if isinstance(bias, torch.Tensor):
        return bias, None
    if isinstance(bias, (tuple, list)) and len(bias) == 2:
        return bias[0], bias[1]
    raise ValueError("bias must be None, a tensor, or a tuple of two tensors")


@functools.lru_cache(maxsize=None)
def _default_config(kind: str, num_ranks: int, num_sms: int) -> Config:
    """The config a call without one uses (read only inside flashep; users get fresh ones from get_*_config)."""
    return (default_dispatch_config if kind == "dispatch" else default_combine_config)(num_ranks, num_sms)


def _check_config(name: str, config: Config) -> None:
    if not isinstance(config, Config):
        raise TypeError(f"{name} must be a flashep.Config, got {type(config).__name__}")
    if config.num_sms <= 0 or config.num_sms % 2:
        raise ValueError(f"{name}.num_sms must be even and > 0, got {config.num_sms}")


def group_device(group) -> torch.device:
    """The device of a group's tensors: the current GPU where the group's backend carries CUDA tensors (NCCL,
    or a device map such as "cpu:gloo,cuda:gloo"), else the CPU."""
    backend = str(dist.get_backend(group)).lower()
    if ("nccl" in backend or "cuda:" in backend) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
