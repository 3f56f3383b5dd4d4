"""Bulk moves into peers' symmetric heaps by copy engine.

A copy into a peer's heap view is a device-to-device cudaMemcpy that the GPU's copy engines carry over
NVLink: no SM takes part (design.md: a peer copy reached 356 GB/s on 2x H200, more than SM stores). Behind
the copies a 32-bit flag is written into the peer's signal heap from the same stream (cuStreamWriteValue32,
which fences the stream's earlier writes first), and the peer's kernel waits for it.

Every peer has its own stream, so copies to different peers run on different copy engines at once. The
streams start after the caller's stream's earlier work (`begin`) and the caller's stream waits for all of
them (`join`). CPU twin (TRITON_INTERPRET=1): the copies and flag writes happen at once, in order, on the
peers' shared-memory segments.
"""
from __future__ import annotations

import contextlib

import torch

from .heap import SymmetricHeap


class PeerCopier:
    def __init__(self, signal_heap: SymmetricHeap, flags_offset: int, num_flags: int, rank: int, num_ranks: int,
                 device: torch.device):
        """`flags_offset`: byte offset of `num_flags` 32-bit flags in every rank's signal heap."""
        self.device = device
        self.on_gpu = device.type == "cuda"
        flag_dtype = torch.uint32 if self.on_gpu else torch.int32  # the stream write takes uint32 tensors
        self._flags = [signal_heap.peer_view(p, flags_offset, (num_flags,), flag_dtype) for p in range(num_ranks)]
        self._streams = {}
        if self.on_gpu:
            self._streams = {p: torch.cuda.Stream(device) for p in range(num_ranks) if p != rank}
            self._values = torch.zeros(num_ranks, num_flags, dtype=torch.int32, device=device)  # _write_by_copy
        self._stream_writes = self.on_gpu

    def begin(self) -> None:
        """The peers' streams start after the current stream's work so far."""
        if self.on_gpu:
            current = torch.cuda.current_stream(self.device)
            for stream in self._streams.values():
                stream.wait_stream(current)

    def send(self, peer: int, parts, value: int, keep=()) -> None:
        """On `peer`'s stream, part by part: its copies (destination, a view of `peer`'s heap, <- source),
        then flag `index` of `peer` <- value (0 < value < 2**31). `parts`: [([(destination, source)], index)].
        `keep`: tensors the copies read, kept alive for the stream (the caller may free them at once)."""
        stream = self._streams.get(peer)  # None on CPU: copies and flags happen at once, in order
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if stream is not None:
                for tensor in keep:
                    tensor.record_stream(stream)
            for copies, index in parts:
                for destination, source in copies:
                    destination.copy_(source)
                self._write_flag(peer, index, value)

    def _write_flag(self, peer: int, index: int, value: int) -> None:
        if not self.on_gpu:
            self._flags[peer][index] = value
            return
        if self._stream_writes:
            try:
                torch._C._distributed_c10d._SymmetricMemory.stream_write_value32(self._flags[peer], index, value)
                return
            except (AttributeError, RuntimeError):
                self._stream_writes = False  # this torch or driver cannot: a 4-byte copy does the same
        self._write_by_copy(peer, index, value)

    def _write_by_copy(self, peer: int, index: int, value: int) -> None:
        staged = self._values[peer, index:index + 1]
        staged.fill_(value)
        self._flags[peer][index:index + 1].view(torch.int32).copy_(staged)

    def join(self) -> None:
        """The current stream waits for every copy and flag so far."""
        if self.on_gpu:
            current = torch.cuda.current_stream(self.device)
            for stream in self._streams.values():
                current.wait_stream(stream)
