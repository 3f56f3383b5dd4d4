"""Cross-rank signalling helpers for the Triton kernels, and the error word that turns hangs into errors.

Protocol: a writer stores its data, `tl.debug_barrier()`, then raises a flag with a release atomic at
system scope; a reader spins until the flag holds the value it expects, and reads it with acquire
semantics. Flags carry `tag(epoch) << 32` (the epoch rises by one per call), so nothing is ever reset; tags
run 1 .. 2^31 - 1 and start over, and readers compare them for equality (this operation's, or the next
one's where a peer may already be one operation ahead), so they never overflow and a flag never written
(0) never matches.

Every wait is bounded: on the GPU by `%globaltimer`, under the interpreter by a spin count. A wait that
runs out records (phase, rank, peer) in the error word and returns False; the kernel then skips the rest
of its work and the host raises `PeerTimeoutError` naming the rank and phase.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _env

# phase codes written into the error word
PHASES = {
    1: "normal barrier",
    2: "notify (count exchange)",
    3: "dispatch receive",
    4: "combine receive",
    5: "low-latency dispatch receive",
    6: "low-latency combine receive",
    7: "low-latency barrier",
    8: "dispatch output address exchange",
}
PHASE_BARRIER, PHASE_NOTIFY, PHASE_DISPATCH, PHASE_COMBINE = 1, 2, 3, 4
PHASE_LL_DISPATCH, PHASE_LL_COMBINE, PHASE_LL_BARRIER = 5, 6, 7
PHASE_DISPATCH_OUTPUTS = 8

# interpreter: one spin of a wait loop costs tens of microseconds, so a spin budget stands in for time
_INTERPRET_SPINS_PER_SECOND = 2000


class PeerTimeoutError(RuntimeError):
    pass


@triton.jit
def now_ns(USE_TIMER: tl.constexpr):
    if USE_TIMER:
        t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                      pack=1)
    else:
        t = tl.full((), 0, tl.int64)
    return t


@triton.jit
def now_cycles():
    """This SM's cycle counter (GPU only: for probes that time the steps inside one program)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def load_acquire(ptr):
    return tl.atomic_add(ptr, 0, sem="acquire", scope="sys")


@triton.jit
def acquire_flags(ptrs, mask, USE_TIMER: tl.constexpr):
    """int64 or int32 flags read with acquire semantics at system scope (masked-off lanes give 0). On the GPU
    these are acquire loads, which many programs can issue at the same flags at once; acquire RMWs on one
    address queue up in L2 (128 programs x 128 flags took ~2 us). The interpreter has no inline asm: an
    acquire RMW."""
    if USE_TIMER:
        if ptrs.dtype.element_ty.primitive_bitwidth == 64:
            values = tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.b32 p, $2, 0; mov.b64 $0, 0; @p ld.acquire.sys.global.b64 $0, [$1]; }",
                "=l,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int64, is_pure=False, pack=1)
        else:
            values = tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.b32 p, $2, 0; mov.b32 $0, 0; @p ld.acquire.sys.global.b32 $0, [$1]; }",
                "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
    else:
        values = tl.atomic_add(ptrs, 0, mask=mask, sem="acquire", scope="sys")
        values = tl.where(mask, values, 0)
    return values


@triton.jit
def signal(ptr, value):
    """Publish `value` at `ptr` (release, system scope): everything this CTA stored before is visible first."""
    tl.debug_barrier()
    tl.atomic_xchg(ptr, value, sem="release", scope="sys")


@triton.jit
def end_operation(epoch_ptr, arrivals_ptr, e):
    """Every program of an operation's kernel calls this last: the last one to arrive stores the operation's
    epoch `e` for the next launch and re-arms the counter. Each program read the epoch at its start, before
    its release here, so none sees the new value (saves the host a launch per operation)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(arrivals_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(0) - 1:
        tl.store(arrivals_ptr, 0)
        tl.store(epoch_ptr, e)


TAG_CYCLE = tl.constexpr(0x7FFFFFFF)  # tags run 1 .. TAG_CYCLE


@triton.jit
def tag(n):
    """Flag tag of the rising counter n (an epoch, or a stage number): 1 + n mod (2^31 - 1), never 0."""
    return n % TAG_CYCLE + 1


@triton.jit
def within_budget(start, spins, budget, USE_TIMER: tl.constexpr):
    """Whether a wait that began at `start` (now_ns) and spun `spins` times may go on: `budget` is nanoseconds
    on the GPU, spins under the interpreter (see wait_budget)."""
    if USE_TIMER:
        alive = (now_ns(USE_TIMER) - start) < budget
    else:
        alive = spins < budget
    return alive


@triton.jit
def wait_tag(ptr, wanted, other, budget, USE_TIMER: tl.constexpr):
    """Spin until the tag (high 32 bits) of *ptr is `wanted` or `other`. `budget` is nanoseconds (GPU) or
    spins (interpreter). -> True when it came, False on timeout."""
    v = load_acquire(ptr) >> 32
    start = now_ns(USE_TIMER)
    spins = 0
    alive = True
    while (v != wanted) & (v != other) & alive:
        v = load_acquire(ptr) >> 32
        spins += 1
        alive = within_budget(start, spins, budget, USE_TIMER)
    return (v == wanted) | (v == other)


@triton.jit
def record_timeout(err_addr_ptr, phase, rank, peer):
    """First timeout wins: error word = [phase, rank, peer, 1] (host memory, `err_addr_ptr[0]` holds its
    address); the device copy of 'failed' (`err_addr_ptr[1]`) is set too, for the kernels that follow."""
    err_ptr = tl.load(err_addr_ptr).to(tl.pointer_type(tl.int32))
    old = tl.atomic_cas(err_ptr + 3, 0, 1, sem="relaxed", scope="sys")
    if old == 0:
        tl.store(err_ptr, phase)
        tl.store(err_ptr + 1, rank)
        tl.store(err_ptr + 2, peer)
    tl.store(err_addr_ptr + 1, 1)


@triton.jit
def failed_before(err_addr_ptr):
    """1 if a kernel already recorded a timeout: read from the device copy. (Every thread of a program reads a
    scalar; from the host word that took ~0.15 ms over PCIe for 24 programs, measured on H200.)"""
    return (tl.load(err_addr_ptr + 1) != 0).to(tl.int32)


def wait_budget() -> int:
    """Budget argument of the waits (`wait_tag` and the kernels' own loops) for this process."""
    seconds = _env.timeout_seconds()
    if _env.interpret_mode():
        return max(1, int(seconds * _INTERPRET_SPINS_PER_SECOND))
    return int(seconds * 1e9)


def use_timer() -> bool:
    return not _env.interpret_mode()


class ErrorWord:
    """int32[4] the kernels write on timeout; host-visible without a device sync (pinned memory on GPU)."""

    def __init__(self, device: torch.device):
        if device.type == "cuda":
            self.host = torch.zeros(4, dtype=torch.int32, pin_memory=True)
        else:
            self.host = torch.zeros(4, dtype=torch.int32)
        self._words = self.host.numpy()  # the same memory, read without a tensor operation per check
        # kernels get [the host word's address, a device copy of its 'failed' entry] on their own device
        self.address = torch.tensor([self.host.data_ptr(), 0], dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Forget a recorded timeout (collective cleaning, with the device idle)."""
        self.host.zero_()
        self.address[1] = 0

    def check(self) -> None:
        """Raise if a kernel recorded a timeout (cheap: reads host memory)."""
        if self._words[3] != 0:
            phase, rank, peer = (int(v) for v in self._words[:3])
            raise PeerTimeoutError(f"flashep: rank {rank} timed out after {_env.timeout_seconds():g} s waiting for "
                                   f"rank {peer} in phase '{PHASES.get(phase, phase)}' (a peer stopped answering "
                                   f"or skipped a collective call)")
