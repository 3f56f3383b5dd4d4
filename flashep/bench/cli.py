"""Command line of `python -m flashep.bench`."""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
from typing import Optional

import torch

from . import options as defaults
from .options import MODES, Options


def parse_args(argv: Optional[list]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flashep.bench",
        description="Benchmark flashep's dispatch and combine (DeepEP's shapes and metric) against the oracle, "
                    "NCCL all_to_all_single and DeepEP's published figures. Uses every visible GPU (one process "
                    "each, NCCL), or 4 CPU processes (gloo) with small shapes when there is no GPU.")
    parser.add_argument("--num-ranks", type=int, help="local ranks (default: all GPUs, or 4 on CPU)")
    parser.add_argument("--mode", choices=("normal", "low-latency", "all"), default="all")
    parser.add_argument("--tokens", type=int, help="normal-mode tokens per rank (GPU default 4096)")
    parser.add_argument("--hidden", type=int, help="hidden size (GPU default 7168)")
    parser.add_argument("--topk", type=int, help="experts per token (GPU default 8)")
    parser.add_argument("--experts", type=int, help="number of experts (GPU default 256)")
    parser.add_argument("--num-sms", type=_int_list, default=[24], help="SMs of the normal kernels, e.g. 24,12")
    parser.add_argument("--ll-tokens", type=_int_list, help="low-latency tokens per rank, e.g. 1,32,128,256,512 "
                                                           "(GPU default 128)")
    parser.add_argument("--sweep", action="store_true", help="normal mode at 256..16384 tokens per rank (powers of "
                                                             "two; 32..512 on CPU)")
    parser.add_argument("--backend", choices=("collective", "triton"), help="sets FLASHEP_BACKEND for the ranks")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="cpu runs gloo ranks even where GPUs exist")
    parser.add_argument("--json", metavar="FILE", help="write every number to FILE")
    parser.add_argument("--plot", metavar="FILE.png", help="plot GB/s against tokens per rank (with --sweep)")
    parser.add_argument("--quick", action="store_true", help="few iterations (and tiny shapes on CPU)")
    parser.add_argument("--iters", type=int, help="timed iterations per op")
    parser.add_argument("--seed", type=int, help="seed of the inputs (default: random, printed)")
    parser.add_argument("--nvl-bytes", type=int, default=0,
                        help="num_nvl_bytes of the normal-mode Buffer (default 0: what the backend needs)")
    return parser.parse_args(argv)


def _int_list(text: str) -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def resolve(args: argparse.Namespace, argv: list) -> Options:
    """Machine-dependent defaults and checks of the arguments (errors name the option)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no GPU is visible")
    on_gpu = args.device != "cpu" and torch.cuda.is_available()
    if on_gpu:
        shape = defaults.GPU_SHAPE
        iterations = defaults.GPU_QUICK_ITERATIONS if args.quick else defaults.GPU_ITERATIONS
        num_ranks = args.num_ranks or torch.cuda.device_count()
        if num_ranks > torch.cuda.device_count():
            raise ValueError(f"--num-ranks {num_ranks}: only {torch.cuda.device_count()} GPUs are visible")
    else:
        shape = defaults.CPU_QUICK_SHAPE if args.quick else defaults.CPU_SHAPE
        iterations = defaults.CPU_QUICK_ITERATIONS if args.quick else defaults.CPU_ITERATIONS
        num_ranks = args.num_ranks or 4
    if num_ranks < 1:
        raise ValueError(f"--num-ranks must be >= 1, got {num_ranks}")
    modes = MODES if args.mode == "all" else (args.mode,)
    hidden = args.hidden or shape["hidden"]
    experts = args.experts or shape["experts"]
    topk = args.topk or shape["topk"]
    if experts % num_ranks:
        raise ValueError(f"--experts {experts} must be divisible by the number of ranks ({num_ranks})")
    if topk > experts:
        raise ValueError(f"--topk {topk} must be <= --experts {experts}")
    if "low-latency" in modes and hidden % 512:
        raise ValueError(f"--hidden {hidden} must be a multiple of 512 for the low-latency mode's FP8 dispatch "
                         f"(or use --mode normal)")
    if args.sweep:
        tokens = defaults.GPU_SWEEP if on_gpu else defaults.CPU_SWEEP
    else:
        tokens = [args.tokens or shape["tokens"]]
    warmups, iters, profile_iters = iterations
    return Options(
        device="cuda" if on_gpu else "cpu", num_ranks=num_ranks, modes=modes, tokens=tokens, hidden=hidden,
        topk=topk, experts=experts, num_sms=args.num_sms, ll_tokens=args.ll_tokens or shape["ll_tokens"],
        backend=args.backend, warmups=warmups, iters=args.iters or iters, profile_iters=profile_iters,
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(2**31),
        nvl_bytes=args.nvl_bytes, compute_size=8192 if on_gpu else 64, sweep=args.sweep,
        command=" ".join(["python -m flashep.bench"] + [shlex.quote(a) for a in argv]))


def main(argv: Optional[list] = None) -> int:
    """Runs the benchmark; exit status 0 when every check passed, 1 otherwise."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        options = resolve(args, argv)
    except ValueError as error:
        print(f"python -m flashep.bench: error: {error}", file=sys.stderr)
        return 2
    from .launch import run
    from .report import make_console, plot_sweep, print_record

    console = make_console()
    try:
        record = run(options)
    except Exception as error:  # a rank died: its traceback is printed above by torch.multiprocessing
        console.print(f"[bold red]flashep.bench: FAILED: a rank raised {type(error).__name__}[/]")
        console.print(str(error), highlight=False, markup=False)
        return 1
    print_record(record, console)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        console.print(f"wrote {args.json}", highlight=False)
    if args.plot:
        why_not = plot_sweep(record, args.plot)
        console.print(f"no plot: {why_not}" if why_not else f"wrote {args.plot}", highlight=False)
    return 0 if record["ok"] else 1
