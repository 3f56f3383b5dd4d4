"""`EventOverlap` and the comm-stream discipline shared by every normal-mode call (spec 2.9)."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Optional

import torch


class _DoneEvent:
    """Stand-in for a CUDA event on the CPU: work there is synchronous, so it is always complete."""

    def current_stream_wait(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class EventHandle:
    """An event recorded on a stream (CUDA), or an always-complete event on the CPU."""

    def __init__(self, device: torch.device, stream: Optional[torch.cuda.Stream] = None):
        if device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record(stream if stream is not None else torch.cuda.current_stream(device))
        else:
            self._event = _DoneEvent()

    def current_stream_wait(self) -> None:
        if isinstance(self._event, _DoneEvent):
            return
        torch.cuda.current_stream().wait_event(self._event)

    def wait_on(self, stream: torch.cuda.Stream) -> None:
        if not isinstance(self._event, _DoneEvent):
            stream.wait_event(self._event)

    def query(self) -> bool:
        return self._event.query()

    def synchronize(self) -> None:
        self._event.synchronize()


class EventOverlap:
    """Wraps an event so that communication can overlap with compute (DeepEP's `EventOverlap`).

    `extra_tensors` are only kept alive by this object (low-latency calls use it instead of
    `record_stream`, which cannot run under CUDA-graph capture).
    """

    def __init__(self, event: Optional[EventHandle] = None, extra_tensors: Optional[tuple] = None):
        self.event = event
        self.extra_tensors = extra_tensors
        self._release_on_exit = False
        self._hooks_after_wait: list[Callable[[], Any]] = []

    def current_stream_wait(self, release_handle: bool = False) -> None:
        assert self.event is not None, "EventOverlap.current_stream_wait: no event (the call was not async)"
        self.event.current_stream_wait()
        for hook in self._hooks_after_wait:
            hook()
        self._hooks_after_wait.clear()
        if release_handle:
            self.event = None
            self.extra_tensors = None

    def register_hook_after_wait(self, fn: Callable[[], Any]) -> None:
        self._hooks_after_wait.append(fn)

    def __call__(self, release_handle: bool = False) -> "EventOverlap":
        self._release_on_exit = release_handle
        return self

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        if self.event is not None:
            self.current_stream_wait(release_handle=self._release_on_exit)
        self._release_on_exit = False


class OpOrder:
    """Keeps one buffer's operations in issue order, whichever stream each runs on (DeepEP runs them all on
    one comm stream; flashep runs synchronous calls on the current stream, so they stay capturable).

    An operation on the stream of the previous one follows it by stream order, at no cost; on another
    stream, that stream first waits for everything enqueued so far on the previous one's (which includes it).
    """

    def __init__(self):
        self._last: Optional[torch.cuda.Stream] = None

    def wait_previous(self, stream: torch.cuda.Stream) -> None:
        # work captured in a CUDA graph cannot wait on work outside it; inside, the capture orders it
        last = self._last
        if last is not None and last != stream and not torch.cuda.is_current_stream_capturing():
            stream.wait_stream(last)

    def record(self, stream: torch.cuda.Stream) -> None:
        self._last = stream


class StreamScope:
    """Runs one normal-mode call with DeepEP's stream and event semantics (spec 2.9).

    With `async_finish` or a `previous_event` the work goes to the comm stream: it waits on
    `previous_event` (else on the current stream), and either returns an event (`async_finish`) or makes
    the current stream wait for it. Otherwise the work is enqueued on the current stream directly, which is
    observably the same and keeps the call capturable in a CUDA graph. Either way it follows the buffer's
    previous operation (`order`).

    Usage: `with StreamScope(...) as scope:` enqueue the work, `scope.keep(...)` every input and output;
    read `scope.event` (an `EventOverlap`) after the block.
    """

    def __init__(self, device: torch.device, comm_stream: Optional[torch.cuda.Stream],
                 previous_event: Optional[EventOverlap], async_finish: bool, allocate_on_comm_stream: bool,
                 order: Optional[OpOrder] = None):
        if allocate_on_comm_stream and not (previous_event is not None and async_finish):
            raise ValueError("allocate_on_comm_stream=True requires previous_event and async_finish=True")
        if previous_event is not None and not isinstance(previous_event, EventOverlap):
            raise TypeError(f"previous_event must be an EventOverlap, got {type(previous_event).__name__}")
        self.device = device
        self.previous_event = previous_event
        self.async_finish = async_finish
        self.on_gpu = comm_stream is not None
        use_comm = self.on_gpu and (async_finish or previous_event is not None)
        self.comm_stream = comm_stream if use_comm else None
        self.order = order if order is not None else OpOrder()
        self.event = EventOverlap(None)
        self._kept: list[tuple] = []
        self._stack = contextlib.ExitStack()

    def keep(self, *tensors: Any) -> None:
        self._kept.append(tensors)  # flattened only where the comm stream needs them (at exit)

    def __enter__(self) -> "StreamScope":
        if not self.on_gpu:
            return self
        self._compute = torch.cuda.current_stream(self.device)
        if self.comm_stream is None:
            self.order.wait_previous(self._compute)
            return self
        if self.previous_event is not None and self.previous_event.event is not None:
            self.previous_event.event.wait_on(self.comm_stream)
        else:
            self.comm_stream.wait_stream(self._compute)
        self.order.wait_previous(self.comm_stream)
        self._stack.enter_context(torch.cuda.stream(self.comm_stream))
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        self._stack.close()
        if exc_type is not None:
            return
        if not self.on_gpu:
            if self.async_finish:  # CPU: the work is already done
                self.event = EventOverlap(EventHandle(self.device))
            return
        if self.comm_stream is None:
            self.order.record(self._compute)
            return
        self.order.record(self.comm_stream)
        if self.async_finish:
            self.event = EventOverlap(EventHandle(self.device, self.comm_stream))
            # tensors touched on the comm stream must not be recycled before it is done with them,
            # and outputs made there must outlive their use on the compute stream
            for t in _flatten(self._kept):
                t.record_stream(self.comm_stream)
                t.record_stream(self._compute)
        else:
            self._compute.wait_stream(self.comm_stream)
            for t in _flatten(self._kept):
                t.record_stream(self._compute)


def _flatten(items: Iterable[Any]):
    for item in items:
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, (tuple, list)):
            yield from _flatten(item)
