"""Kernel launches that skip Triton's per-call argument binding when a launch repeats.

`kernel[grid](...)` through Triton's JIT binds the arguments to the signature, specialises each of them and
hashes the result on every call (~45 us of host time on the GPU machines' CPUs); calling the compiled
kernel that the JIT returned costs ~18 us. `launch(kernel, grid, *args, **kwargs)` keys a launch by a
specialisation at least as fine as Triton's own: a known key launches the compiled kernel stored under it,
an unknown key goes through the JIT (which compiles, or fetches from its caches) and stores what it returned.

The key (Triton 3.4-3.6 specialise an int on == 1, on divisibility by 16 and on its width i32 / i64 / u64,
a tensor on its dtype and 16-byte alignment, a float and a bool on their type only, a constexpr on its value):
- each non-constexpr argument, in the kernel's parameter order: a tensor's dtype and whether data_ptr() is a
  multiple of 16; an int's == 1, multiple of 16, fits int32, fits uint32, fits int64; a bool's or None's
  type and value; a float's type;
- the constexpr values (compared as Triton compares them, so 1 == True), the launch options (num_warps, ...)
  and the current CUDA device.
Other arguments (tuples, tensor descriptors) and callable grids take the JIT path. Not in the key: Triton's
process-wide knobs (debug, instrumentation mode) and the values of globals a kernel reads, which the JIT
checks at every launch; flashep changes neither after its first launch.

The key costs time too (Python, per argument): on a 2-core CPU host with a stand-in driver, a kernel of 38
arguments and 17 constexprs took ~40-50 us per launch through the JIT, ~22-30 us per hit here, ~5 us through
its compiled kernel alone.

A caller that launches the same kernel again and again with the same arguments but a few new tensors (a
cached dispatch: new inputs and outputs, the same handle and buffers) can keep a `Replay` of a launch
(`launch_replayable`): it skips the key and the caller's own argument building, and checks only what the key
would have checked of the swapped values (a tensor's dtype and alignment, an int's class). Which other
arguments the replay stands for is the caller's business: it keys its replays by everything else it passes.

Always the JIT path: under the interpreter (TRITON_INTERPRET=1), with FLASHEP_FAST_LAUNCH=0 (both read at a
kernel's first launch), while the kernel has pre-run hooks, and for good once the JIT returned something that
is not a compiled kernel (another Triton version's API).
"""
from __future__ import annotations

import operator
from typing import Optional

import torch

from . import _env

MAX_ENTRIES = 256  # compiled kernels kept per launcher; past that the cache starts again
_Tensor = torch.Tensor

try:  # how Triton's CUDA driver reads torch's current stream (the capturing stream inside graph capture)
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:  # CPU builds of torch
    def _raw_stream(device: int) -> int:
        return torch.cuda.current_stream(device).cuda_stream


def current_device() -> int:
    return torch.cuda.current_device()


def current_stream(device: int) -> int:
    return _raw_stream(device)


class Unsupported(Exception):
    """An argument the key does not cover: this launch takes the JIT path."""


def enabled() -> bool:
    return not _env.interpret_mode() and _env.integer("FLASHEP_FAST_LAUNCH", 1, minimum=0) != 0


def runtime_key(values) -> list:
    """Specialisation keys of non-constexpr argument values (see the module docstring); Unsupported for
    another type. One loop without a call per value: it runs at every launch, for every argument. A tensor
    adds two items, the others one; the key stays unambiguous since a dtype comes only from a tensor."""
    key = []
    append = key.append
    for value in values:
        kind = type(value)
        if kind is int:
            append((value == 1, value % 16 == 0, -2**31 <= value < 2**31, 0 <= value < 2**32, -2**63 <= value < 2**63))
        elif isinstance(value, _Tensor):
            append(value.dtype)
            append(value.data_ptr() % 16 == 0)
        elif kind is bool or value is None:
            append((kind, value))
        elif kind is float:
            append(kind)
        else:
            raise Unsupported(kind)
    return key


def looks_compiled(kernel) -> bool:
    """What the fast path uses of Triton's CompiledKernel."""
    return all(hasattr(kernel, name) for name in ("run", "__getitem__", "function"))


def _picker(indices: list):
    """values -> tuple of values[i] for i in indices (operator.itemgetter returns no tuple for one index)."""
    if len(indices) >= 2:
        return operator.itemgetter(*indices)
    return lambda values: tuple(values[i] for i in indices)


class Launcher:
    """Launches of one @triton.jit function: `launcher(grid, *args, **kwargs)` as `kernel[grid](*args, **kwargs)`."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled = {}  # key -> CompiledKernel
        self.fast = enabled()
        try:
            params = kernel.params
            self.names = [p.name for p in params]
            constexpr = [i for i, p in enumerate(params) if p.is_constexpr]
            self.constexpr_indices = frozenset(constexpr)
            self.defaults = [p.default for p in params]  # inspect.Parameter.empty where there is none
        except AttributeError:  # not a JITFunction of a known shape
            self.fast = False
            return
        self.index = set(self.names)
        self.constexprs = _picker(constexpr)
        self.runtime_args = _picker([i for i in range(len(self.names)) if i not in constexpr])

    def __call__(self, grid, *args, **kwargs):
        return self.run(grid, args, kwargs)[0]

    def run(self, grid, args: tuple, kwargs: dict):
        """Launch -> (what the launch returned, every parameter's value in order, the key); the last two are None
        where the launch went through the JIT for good (no compiled kernel is kept for it)."""
        if not self.fast or callable(grid) or getattr(self.kernel, "pre_run_hooks", None):
            return self.kernel[grid](*args, **kwargs), None, None
        try:
            values, key = self.bind(args, kwargs)
            compiled = self.compiled.get(key)
        except (Unsupported, TypeError):  # TypeError: an unhashable constexpr or option
            return self.kernel[grid](*args, **kwargs), None, None
        if compiled is not None:
            # as JITFunction.run: every parameter in order, constexprs and defaults included, on the 3-d grid
            compiled[_grid3(grid)](*values, stream=current_stream(key[-1]))
            return compiled, values, key
        compiled = self.kernel[grid](*args, **kwargs)  # compiles or fetches; raises on bad arguments
        if not looks_compiled(compiled):
            self.fast = False
            self.compiled.clear()
            return compiled, None, None
        if len(self.compiled) >= MAX_ENTRIES:
            self.compiled.clear()
        self.compiled[key] = compiled
        return compiled, values, key

    def bind(self, args: tuple, kwargs: dict):
        """-> (every parameter's value in order, defaults filled in; the launch's key). Raises Unsupported where
        the JIT should decide (and raise if need be): an argument the key does not cover, one given twice or
        missing (a missing constexpr stays inspect.Parameter.empty in the key, and the JIT raises before anything
        is stored)."""
        n = len(args)
        if n > len(self.names) or (n and kwargs and not kwargs.keys().isdisjoint(self.names[:n])):
            raise Unsupported("too many arguments, or one given twice")
        values = [*args, *map(kwargs.get, self.names[n:], self.defaults[n:])]
        options = tuple((name, kwargs[name]) for name in sorted(kwargs.keys() - self.index)) if kwargs else ()
        key = runtime_key(self.runtime_args(values))
        key += (self.constexprs(values), options)  # constexprs by value, as Triton
        key.append(current_device())  # last: the stream is looked up for it
        return values, tuple(key)


class Replay:
    """A launch to repeat with the values of some non-constexpr parameters (`slots`: tensors or ints) replaced:
    `replay(*values)` launches the same compiled kernel on the same grid with every other argument as it was,
    on the current stream, and returns True; False (nothing launched) when the new values differ from the first
    launch's in what the kernel was specialised on (`runtime_key`: a tensor's dtype and 16-byte alignment, an
    int's class) or another device is current: the caller then launches in full. The first launch's values at
    `slots` are not kept (its tensors would stay alive)."""

    __slots__ = ("compiled", "grid", "values", "slots", "expected", "device")

    def __init__(self, compiled, grid: tuple, values: list, slots: list, device: int):
        self.compiled = compiled
        self.grid = grid
        self.slots = slots
        self.expected = runtime_key([values[i] for i in slots])
        self.values = list(values)
        for i in slots:
            self.values[i] = None
        self.device = device

    def __call__(self, *swapped) -> bool:
        try:
            if runtime_key(swapped) != self.expected or current_device() != self.device:
                return False
        except Unsupported:
            return False
        values = self.values.copy()
        for slot, value in zip(self.slots, swapped):
            values[slot] = value
        self.compiled[self.grid](*values, stream=current_stream(self.device))
        return True


_launchers: dict = {}  # id(kernel) -> Launcher (kernels are module globals: their ids stay taken)


def _launcher(kernel) -> Launcher:
    launcher = _launchers.get(id(kernel))
    if launcher is None or launcher.kernel is not kernel:
        launcher = _launchers[id(kernel)] = Launcher(kernel)
    return launcher


def launch(kernel, grid, *args, **kwargs):
    """`kernel[grid](*args, **kwargs)`, through the kernel's Launcher."""
    return _launcher(kernel)(grid, *args, **kwargs)


def launch_replayable(kernel, grid, swap: tuple, *args, **kwargs) -> Optional[Replay]:
    """`launch(kernel, grid, *args, **kwargs)`, and a Replay of it whose values of the parameters named in
    `swap` (non-constexpr) are replaced at each replay (in that order); None where the launch took the JIT path
    (interpreter, FLASHEP_FAST_LAUNCH=0, an argument the key does not cover)."""
    launcher = _launcher(kernel)
    compiled, values, key = launcher.run(grid, args, kwargs)
    if values is None:
        return None
    slots = [launcher.names.index(name) for name in swap]
    if not launcher.constexpr_indices.isdisjoint(slots):
        raise ValueError(f"launch_replayable: a constexpr cannot be swapped ({swap})")
    return Replay(compiled, _grid3(grid), values, slots, key[-1])


def _grid3(grid) -> tuple:
    return tuple(grid) + (1,) * (3 - len(grid))
