"""A pool of symmetric memory that dispatch outputs are carved from, so that peers' pushers can store the
rows straight into them (the direct-write dispatch, docs/design.md).

A carved block is one uint8 tensor over a range of this rank's pool; the output tensors are views of it.
The range goes back to the pool when the last view dies: the tensor is made with `torch.as_tensor` over a
small owner object (`__cuda_array_interface__` on a GPU, `__array_interface__` through numpy on the CPU
twin), and the tensor's storage holds the only reference to that owner. Like memory of torch's caching
allocator, a freed range is written again only by work ordered after the caller's stream (the next
dispatch's kernel, which publishes the range to the peers at its start); a view used on another stream
must be synchronised with the caller's stream before it is dropped.

The pool's heap stays mapped while any of its blocks lives, also after the backend replaced the pool with
a larger one or was destroyed.
"""
from __future__ import annotations

import threading
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .heap import HostMeeting, SymmetricHeap

UNIT = 64  # bytes; block offsets travel to the peers in these units


class OutputPool:
    def __init__(self, group: dist.ProcessGroup, nbytes: int, device: torch.device, meeting: HostMeeting):
        """Collective over `group` (every rank maps a pool of the same size)."""
        self.heap = SymmetricHeap(group, nbytes, device, meeting, "dispatch output pool allocation")
        self.nbytes = self.heap.nbytes // UNIT * UNIT
        self._free = [(0, self.nbytes)]  # (offset, size), sorted by offset, never adjacent
        self._pending: list[tuple[int, int]] = []  # released ranges not yet merged (see _release)
        self._live = 0  # blocks carved and not yet released
        self._retired = self._unmapped = False
        self._lock = threading.Lock()

    @property
    def peer_bases(self) -> torch.Tensor:
        return self.heap.peer_bases

    def largest_free(self) -> int:
        """Bytes of the largest free range (what one block may take now)."""
        with self._lock:
            self._drain()
            return max((size for _, size in self._free), default=0)

    def carve(self, nbytes: int) -> tuple[int, torch.Tensor]:
        """A block of `nbytes` (rounded up to UNIT) -> (its offset in the pool, a uint8 tensor over it that owns
        it). First fit; raises when no free range is large enough (callers check `largest_free` first)."""
        size = max(UNIT, -(-nbytes // UNIT) * UNIT)
        with self._lock:
            self._drain()
            fits = [i for i, (_, free) in enumerate(self._free) if free >= size]
            if not fits:
                raise RuntimeError(f"flashep: the dispatch output pool has no free range of {size} bytes")
            offset, free = self._free[fits[0]]
            self._free[fits[0]:fits[0] + 1] = [(offset + size, free - size)] if free > size else []
            self._live += 1
        owner = _Block(self, offset, size)
        if self.heap.device.type == "cuda":
            block = torch.as_tensor(owner, device=self.heap.device)
        else:
            block = torch.from_numpy(np.asarray(owner))
        return offset, block[:nbytes]

    def retire(self) -> None:
        """The backend no longer carves from this pool: unmap it once its last block is gone."""
        with self._lock:
            self._retired = True
            unmap = self._drain()
        if unmap:
            self.heap.close()

    def _release(self, offset: int, size: int) -> None:
        # A block may die anywhere, even inside this pool's own locked code (a garbage collection there): the
        # range is queued, and merged now only if the lock is free, else by the next call that takes it.
        self._pending.append((offset, size))
        if self._lock.acquire(blocking=False):
            try:
                unmap = self._drain()
            finally:
                self._lock.release()
            if unmap:
                self.heap.close()

    def _drain(self) -> bool:
        """Merge the queued ranges into the free list (lock held) -> whether the pool is now to be unmapped."""
        while self._pending:
            offset, size = self._pending.pop()
            at = 0
            while at < len(self._free) and self._free[at][0] < offset:
                at += 1
            self._free.insert(at, (offset, size))
            if at + 1 < len(self._free) and offset + size == self._free[at + 1][0]:  # merge with the next range
                self._free[at] = (offset, size + self._free.pop(at + 1)[1])
            if at > 0 and sum(self._free[at - 1]) == offset:  # and with the previous one
                before = self._free.pop(at - 1)
                self._free[at - 1] = (before[0], before[1] + self._free[at - 1][1])
            self._live -= 1
        unmap = self._retired and self._live == 0 and not self._unmapped
        self._unmapped |= unmap
        return unmap


class _Block:
    """Owner of one carved range: the tensor made over it keeps it alive; its death frees the range."""

    def __init__(self, pool: OutputPool, offset: int, size: int):
        self.pool: Optional[OutputPool] = pool
        self.offset, self.size = offset, size
        interface = {"shape": (size,), "typestr": "|u1", "data": (pool.heap.local.data_ptr() + offset, False),
                     "version": 3}
        if pool.heap.device.type == "cuda":
            self.__cuda_array_interface__ = dict(interface, strides=None)
        else:
            self.__array_interface__ = interface

    def __del__(self):
        pool, self.pool = self.pool, None
        if pool is not None:
            pool._release(self.offset, self.size)
