"""A symmetric heap: one byte buffer per rank, mapped into every peer, carved into named regions.

GPU: torch symmetric memory (CUDA backend, NVLink peers, multicast never mapped).
CPU: a twin over named POSIX shared memory, one segment per rank, so that the same Triton kernels run
across processes under TRITON_INTERPRET=1 (CI).

Kernels receive `peer_bases` (int64 [R] tensor of each rank's base address) and byte offsets, and form
peer pointers as `tl.load(peer_bases + p) + offset`.
"""
from __future__ import annotations

import uuid
from datetime import timedelta
from multiprocessing import shared_memory
from typing import Optional

import torch
import torch.distributed as dist

from .. import _env
from ..kernels.sync import PeerTimeoutError

ALIGN = 128


class HostMeeting:
    """Host-side meeting points of a group's ranks that end in PeerTimeoutError, naming the missing ranks
    and the phase, when a peer does not arrive within FLASHEP_TIMEOUT_S (instead of hanging in a
    collective). A gloo twin of the group's ranks carries them (a monitored barrier). Creating the twin is
    collective, so it happens when the first Buffer of those ranks is made, while every rank is there; all
    later Buffers of the same ranks share it and it lives as long as the process group. (A second gloo
    group of the same ranks would get the same name, hashed from the ranks, and meet the first one's stale
    addresses in the store: two Buffers on one group, or a Buffer made again after destroy(), failed so.)"""

    _twins: dict = {}  # (default process group, ranks) -> gloo group

    def __init__(self, group: dist.ProcessGroup):
        self.rank = dist.get_rank(group)
        ranks = tuple(dist.get_process_group_ranks(group))
        key = (id(dist.group.WORLD), ranks)  # a re-initialised default group starts afresh
        if key not in HostMeeting._twins:
            HostMeeting._twins[key] = dist.new_group(list(ranks), backend="gloo", use_local_synchronization=True)
        self._twin = HostMeeting._twins[key]

    def __call__(self, phase: str) -> None:
        seconds = _env.timeout_seconds()
        try:
            dist.monitored_barrier(self._twin, timeout=timedelta(seconds=seconds), wait_all_ranks=True)
        except RuntimeError as error:
            raise PeerTimeoutError(f"flashep rank {self.rank}: peers did not reach the {phase} within {seconds:g} s "
                                   f"(FLASHEP_TIMEOUT_S): {error}") from None


class SymmetricHeap:
    def __init__(self, group: dist.ProcessGroup, nbytes: int, device: torch.device,
                 meeting: Optional[HostMeeting] = None, phase: str = "symmetric heap allocation"):
        """Collective over `group`. With a `meeting`, a rank that never arrives raises PeerTimeoutError
        naming `phase` on the others instead of leaving them in the mapping's collectives."""
        if nbytes <= 0:
            raise ValueError(f"symmetric heap size must be > 0, got {nbytes}")
        if meeting is not None:
            meeting(phase)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = device
        self.nbytes = _align(nbytes)
        self._segments: list[shared_memory.SharedMemory] = []
        if device.type == "cuda":
            self.local, bases = self._map_cuda()
        else:
            self.local, bases = self._map_shared_memory()
        self.peer_bases = torch.tensor(bases, dtype=torch.int64, device=device)
        self.local.zero_()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier(group)  # everybody's memory is zeroed before anybody writes into it

    def _map_cuda(self):
        import torch.distributed._symmetric_memory as symm_mem

        if not _env.multicast_disabled():
            raise RuntimeError("NVLink multicast guards are not set (NCCL_NVLS_ENABLE=0, "
                               "TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1)")
        local = symm_mem.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        handle = symm_mem.rendezvous(local, self.group)
        if handle.multicast_ptr != 0:
            raise RuntimeError("symmetric memory mapped a multicast address although multicast must stay off")
        # torch >= 2.11 sub-allocates from a pool: the tensor need not sit at the allocation base, and nothing
        # makes every rank's offset the same (a rank whose pool holds other symmetric tensors has another one),
        # so each rank's offset is exchanged rather than assumed equal to this rank's
        offset = local.data_ptr() - handle.buffer_ptrs[self.rank]
        offsets: list = [None] * self.world_size
        dist.all_gather_object(offsets, offset, group=self.group)
        if any(p == 0 for p in handle.buffer_ptrs):
            raise RuntimeError("a peer's symmetric buffer is not load/store reachable")
        bases = [p + o for p, o in zip(handle.buffer_ptrs, offsets)]
        self._handle = handle
        self._peer_views = [handle.get_buffer(r, (self.nbytes,), torch.uint8, storage_offset=offsets[r])
                            for r in range(self.world_size)]
        if [v.data_ptr() for v in self._peer_views] != bases:
            raise RuntimeError("symmetric memory: peer views do not start at the peers' heap bases")
        return local, bases

    def _map_shared_memory(self):
        name = f"flashep_{uuid.uuid4().hex[:16]}_{self.rank}"
        mine = shared_memory.SharedMemory(name=name, create=True, size=self.nbytes)
        names: list[Optional[str]] = [None] * self.world_size
        dist.all_gather_object(names, name, group=self.group)
        segments = []
        for r, n in enumerate(names):
            segments.append(mine if r == self.rank else shared_memory.SharedMemory(name=n))
        self._segments = segments
        self._owned = mine
        views = [torch.frombuffer(s.buf, dtype=torch.uint8, count=self.nbytes) for s in segments]
        self._peer_views = views
        dist.barrier(self.group)  # every rank has opened every segment: the names can go
        mine.unlink()
        return views[self.rank], [v.data_ptr() for v in views]

    def view(self, offset: int, shape, dtype: torch.dtype) -> torch.Tensor:
        """This rank's region at byte `offset` as a tensor."""
        return self._region(self.local, offset, shape, dtype)

    def _region(self, heap: torch.Tensor, offset: int, shape, dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        end = offset + numel * dtype.itemsize
        if offset % dtype.itemsize or end > self.nbytes:
            raise ValueError(f"region [{offset}, {end}) does not fit the {self.nbytes}-byte heap")
        return heap[offset:end].view(dtype).view(shape)

    def peer_view(self, rank: int, offset: int, shape, dtype: torch.dtype) -> torch.Tensor:
        """`rank`'s region at byte `offset` as a tensor on this device (a copy into it is a peer copy: the
        copy engine moves it over NVLink)."""
        return self._region(self._peer_views[rank], offset, shape, dtype)

    def close(self) -> None:
        self._peer_views = []
        self.local = None
        for s in self._segments:
            try:
                s.close()
            except BufferError:  # a tensor view is still alive; the mapping goes with the process
                pass
        self._segments = []


class Layout:
    """A bump allocator of byte offsets, identical on every rank (same calls, same order)."""

    def __init__(self, start: int = 0):
        self.size = _align(start)
        self.regions: dict[str, tuple[int, int]] = {}

    def add(self, name: str, nbytes: int) -> int:
        offset = self.size
        self.regions[name] = (offset, nbytes)
        self.size = _align(offset + nbytes)
        return offset

    def __getitem__(self, name: str) -> int:
        return self.regions[name][0]


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
