"""Where the time of a low-latency kernel goes: per-program time stamps at the steps of each phase.

    python scripts/probe_ll_phases.py [--ranks 2] [--tokens 128] [--calls 20] [--logfmt]

Runs with FLASHEP_LL_STAMPS=1 (GPU only): every program of the low-latency kernels records %globaltimer and
%clock64 at its steps (flashep/kernels/low_latency.py, `_stamp`). Each rank makes dispatch + combine calls
(hidden 7168, top-8 of 256 experts, FP8 dispatch), in one launch per call and with hooks (send, then the
hook's receive), each launch after the benchmark's line-up (an idle kernel, then an all_reduce), so that
the ranks' kernels start together. Rank 0 prints, per kernel and role, the time of each step
from the first program's start (globaltimer; median and max over the programs, median over the calls),
and the median step durations inside a program from its cycle counter.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import local_ranks  # noqa: E402

os.environ["FLASHEP_LL_STAMPS"] = "1"
from flashep import validate  # noqa: E402
from flashep.bench.timing import line_up_ranks  # noqa: E402
from flashep.kernels.low_latency import STAMP_POINTS  # noqa: E402

POINTS = STAMP_POINTS.value
STEPS = {  # kernel -> role -> names of the stamped points, in order
    "ep_ll_dispatch_kernel": {"send": ["start", "top-k rows sent", "data sent"],
                              "receive": ["start", "top-k rows came", "rows laid out", "data came", "copied"]},
    "ep_ll_combine_kernel": {"send": ["start", "sent"], "receive": ["start", "rows came", "reduced"]},
}


def summarize(stamps: torch.Tensor, senders: int, kernel: str) -> dict:
    """One launch's stamps -> {role: (times [steps, 2] us (median, max over programs) from the first start,
    step durations [steps - 1] us (median over programs, cycle counter))}."""
    stamps = stamps.cpu()
    ns, cycles = stamps[:, :POINTS].double(), stamps[:, POINTS:].double()
    origin = ns[:, 0][ns[:, 0] > 0].min()
    out = {}
    for role, rows in (("send", slice(0, senders)), ("receive", slice(senders, None))):
        steps = len(STEPS[kernel][role])
        t = (ns[rows, :steps] - origin) / 1e3
        c = cycles[rows, :steps]
        # cycles -> us from the programs' own first-to-last spans
        span_ns, span_cycles = ns[rows, steps - 1] - ns[rows, 0], c[:, -1] - c[:, 0]
        us_per_cycle = (span_ns.sum() / span_cycles.sum()).item() / 1e3 if span_cycles.sum() > 0 else 0.0
        times = torch.stack([t.median(dim=0).values, t.max(dim=0).values], dim=1)
        durations = (c[:, 1:] - c[:, :-1]).median(dim=0).values * us_per_cycle
        out[role] = (times, durations)
    return out


def report(label: str, kernel: str, per_call: list) -> None:
    print(f"--- {label}: {kernel}, us (median over {len(per_call)} calls)")
    for role, names in STEPS[kernel].items():
        times = torch.stack([c[role][0] for c in per_call]).median(dim=0).values
        durations = torch.stack([c[role][1] for c in per_call]).median(dim=0).values
        print(f"  {role}:")
        for i, name in enumerate(names):
            step = f"   step {durations[i - 1].item():6.2f}" if i else ""
            print(f"    {name:>16}: at {times[i, 0].item():6.2f} (latest program {times[i, 1].item():6.2f}){step}")


def worker(rank, num_ranks, args):
    experts, tokens = 256, args.tokens
    buffer, x, idx, weights, y = local_ranks.decode_inputs(num_ranks, tokens, experts)
    if args.logfmt:
        y = (y.float() * 0.1).to(torch.bfloat16)

    token = torch.zeros(1, device="cuda")

    def line_up():
        """Every rank's next kernels start together (as the benchmark lines ranks up)."""
        torch.cuda.synchronize()
        line_up_ranks(dist.group.WORLD, token)

    def stamps_of(kernel: str):
        stamps, senders = buffer._low_latency.stamps[kernel]
        return stamps.clone(), senders

    def calls(hook: bool):
        """{kernel: (stamps, send programs)} of one dispatch + combine."""
        found = {}
        line_up()
        _, _, handle, _, receive = buffer.low_latency_dispatch(x, idx, tokens, experts, return_recv_hook=hook)
        if hook:
            line_up()
            receive()
        found["ep_ll_dispatch_kernel"] = stamps_of("ep_ll_dispatch_kernel")
        line_up()
        _, _, receive = buffer.low_latency_combine(y, idx, weights, handle, use_logfmt=args.logfmt,
                                                   return_recv_hook=hook)
        if hook:
            line_up()
            receive()
        found["ep_ll_combine_kernel"] = stamps_of("ep_ll_combine_kernel")
        torch.cuda.synchronize()
        return found

    with validate.values_unchecked():
        for label, hook in (("one launch per call", False), ("hooks (send, line-up, receive)", True)):
            for _ in range(5):
                calls(hook)
            results = {k: [] for k in STEPS}
            for _ in range(args.calls):
                found = calls(hook)
                for kernel, (stamps, senders) in found.items():
                    results[kernel].append(summarize(stamps, senders, kernel))
            if rank == 0:
                for kernel, per_call in results.items():
                    report(f"{num_ranks} ranks, {tokens} tokens, {label}{', LogFMT' if args.logfmt else ''}", kernel,
                           per_call)
    dist.barrier()
    buffer.destroy()


if __name__ == "__main__":
    local_ranks.main(worker, __doc__, calls=20)
