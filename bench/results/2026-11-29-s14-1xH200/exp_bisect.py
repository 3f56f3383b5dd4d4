"""Bisect the direct-write kernel's slowness at one rank: variants of kernels/normal.py, DIRECT kernel in
records state (16 pushers) and as built, cached FP8 / BF16, kernel time."""
import importlib.util, os, sys, torch, torch.distributed as dist
sys.path.insert(0, "scripts")
import local_ranks
import flashep
from flashep.backends import triton_normal as tn
from flashep.bench.timing import KERNEL_PATTERNS, Timer
import probe_normal_host as probe

SRC = open(os.path.join(os.path.dirname(flashep.__file__), "kernels", "normal.py")).read()
CALL = """            failed, direct, out_x, out_rows, out_scales, out_topk, out_weights, out_src = _direct_outputs(
                slots, out_bases_ptr, rank_prefix_ptr, e, num_scales, num_topk, tl.load(err_ptr + 3, volatile=True),
                err_ptr, rank, budget, NUM_RANKS, R_PAD, ROW_WORDS, TOPK_BYTES, USE_TIMER)"""
NO_CALL = """            failed = 0
            direct = tl.zeros([R_PAD], tl.int32)
            out_x = bases
            out_rows = caps"""
PUB = """    if DIRECT:
        if pid == 0:"""
ACQ = """    values = acquire_flags(slot_ptrs, peer_ok, USE_TIMER)"""
FAILED = ("tl.load(err_ptr + 3, volatile=True),\n                err_ptr, rank, budget, NUM_RANKS",
          "zero,\n                err_ptr, rank, budget, NUM_RANKS")
RESET = {
    "direct": "\n            direct = tl.zeros([R_PAD], tl.int32)",
    "x": "\n            out_x = bases",
    "rows": "\n            out_rows = caps",
    "fields": "\n            out_scales = bases\n            out_topk = bases\n            out_weights = bases\n            out_src = bases",
    "failed": "\n            failed = zero",
}
def keep(*names):
    return [(CALL, CALL + "".join(v for k, v in RESET.items() if k not in names))]
DEF = """@triton.jit
def _direct_outputs("""
NI = [(DEF, "@triton.jit(noinline=True)\ndef _direct_outputs("),
      ("def _direct_outputs(slot_ptrs, ", "def _direct_outputs(slots_base, "),
      ("    peer_ok = rank_ok & (ranks != rank)\n    values = acquire_flags(slot_ptrs",
       "    peer_ok = rank_ok & (ranks != rank)\n    slot_ptrs = (slots_base + ranks * 8).to(tl.pointer_type(tl.int64))\n    values = acquire_flags(slot_ptrs"),
      ("                slots, out_bases_ptr, rank_prefix_ptr, e,", "                my_signal_base + out_slots_offset, out_bases_ptr, rank_prefix_ptr, e,")]
WAIT_OLD = """    values = acquire_flags(slot_ptrs, peer_ok, USE_TIMER)
    behind = peer_ok & ((values >> 32) != tag(e))
    if (tl.max(behind.to(tl.int32), axis=0) > 0) & (failed == 0):
        start = now_ns(USE_TIMER)
        spins = 0
        alive = True
        while (tl.max(behind.to(tl.int32), axis=0) > 0) & alive:
            values = tl.where(behind, acquire_flags(slot_ptrs, behind, USE_TIMER), values)
            behind = peer_ok & ((values >> 32) != tag(e))
            spins += 1
            alive = within_budget(start, spins, budget, USE_TIMER)
        if tl.max(behind.to(tl.int32), axis=0) > 0:
            record_timeout(err_ptr, _phase_dispatch_outputs, rank, tl.min(tl.where(behind, ranks, R_PAD), axis=0))
            failed = 1
"""
WAIT_NEW = """    failed = _wait_slots(slots_base, e, failed, err_ptr, rank, budget, NUM_RANKS, R_PAD, USE_TIMER)
    values = acquire_flags(slot_ptrs, peer_ok, USE_TIMER)
"""
WAIT_FN = """@triton.jit(noinline=True)
def _wait_slots(slots_base, e, failed, err_ptr, rank, budget, NUM_RANKS: tl.constexpr, R_PAD: tl.constexpr,
                USE_TIMER: tl.constexpr):
    ranks = tl.arange(0, R_PAD)
    rank_ok = ranks < NUM_RANKS
    peer_ok = rank_ok & (ranks != rank)
    slot_ptrs = (slots_base + ranks * 8).to(tl.pointer_type(tl.int64))
""" + WAIT_OLD + """    return failed


@triton.jit
def _direct_outputs("""
NI2 = [(WAIT_OLD, WAIT_NEW), (DEF, WAIT_FN),
       ("def _direct_outputs(slot_ptrs, ", "def _direct_outputs(slots_base, "),
       ("    peer_ok = rank_ok & (ranks != rank)\n    failed = _wait_slots",
        "    peer_ok = rank_ok & (ranks != rank)\n    slot_ptrs = (slots_base + ranks * 8).to(tl.pointer_type(tl.int64))\n    failed = _wait_slots"),
       ("                slots, out_bases_ptr, rank_prefix_ptr, e,", "                my_signal_base + out_slots_offset, out_bases_ptr, rank_prefix_ptr, e,")]
VARIANTS = {
    "failed word not loaded": [FAILED],
    "neither failed nor acquire": [FAILED, (ACQ, "    values = tl.zeros([R_PAD], tl.int64)")],
    "only the layout loads": [FAILED, (WAIT_OLD, "    values = tl.zeros([R_PAD], tl.int64)\n")],
}


def load_variant(name, edits):
    src = SRC
    for a, b in edits:
        assert a in src, a
        src = src.replace(a, b)
    path = os.path.join(os.path.dirname(flashep.__file__), "kernels", f"_exp_{abs(hash(name))}.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"flashep.kernels._exp_{abs(hash(name))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker(rank, num_ranks, args):
    os.environ["FLASHEP_DIRECT_DISPATCH"] = "1"
    buffer, inputs = probe.build(num_ranks, 4096)
    table = probe.ops(buffer, inputs)
    backend = buffer._normal
    timer = Timer(dist.group.WORLD, torch.device("cuda", 0), 0, 0, profile_iters=10)
    real_carve = backend._carve
    for name, edits in VARIANTS.items():
        tn.kernels = load_variant(name, edits)
        for state, carve in (("direct state", real_carve), ("records state", lambda n: None)):
            backend._carve = carve
            for op in ("cached FP8",):
                fn = table[op]
                for _ in range(3): fn()
                us = timer.profile(fn).per_call_us(KERNEL_PATTERNS)
                print(f"{name:24s} {state:14s} {op}: {us:7.1f} us", flush=True)
    buffer.destroy()

if __name__ == "__main__":
    local_ranks.main(worker, __doc__, calls=10, tokens=4096)
