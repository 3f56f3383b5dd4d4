"""Spawns the benchmark's ranks (one process per GPU with NCCL, or CPU processes with gloo) and brings
rank 0's record of the run back to the parent process."""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import socket
import tempfile
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .. import __version__
from . import metrics
from .checks import CheckLog
from .context import Progress, RankContext
from .low_latency import run_low_latency
from .normal import run_normal
from .options import Options
from .timing import Timer

RUNNERS = {"normal": run_normal, "low-latency": run_low_latency}


def run(options: Options) -> dict:
    """Runs the benchmark on `options.num_ranks` local ranks -> rank 0's record (see `_record`)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(_free_port())
    if options.backend:
        os.environ["FLASHEP_BACKEND"] = options.backend
        if options.backend == "triton" and not options.on_gpu:
            os.environ["TRITON_INTERPRET"] = "1"  # the children inherit it before they import Triton
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "record.json")
        mp.spawn(_rank_main, args=(options, path), nprocs=options.num_ranks, join=True)
        with open(path) as f:
            return json.load(f)


def _rank_main(rank: int, options: Options, record_path: str) -> None:
    world = options.num_ranks
    if options.on_gpu:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    else:
        torch.set_num_threads(1)  # several ranks share the CPU cores
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.group.WORLD
    progress = Progress(enabled=rank == 0, total=options.num_configs)
    ctx = RankContext(rank=rank, group=group, device=device, options=options,
                      timer=Timer(group, device, options.warmups, options.iters, options.profile_iters),
                      progress=progress, checks=CheckLog(rank),
                      card=torch.cuda.get_device_name(device) if options.on_gpu else None)
    results, skipped = [], []
    try:
        for mode in options.modes:
            try:
                results += RUNNERS[mode](ctx)
            except NotImplementedError as error:
                skipped.append({"mode": mode, "reason": f"NotImplementedError: {error}"})
                progress.note(f"{mode} mode skipped: the backend raised NotImplementedError: {error}")
    finally:
        progress.close()
    all_checks: list = [None] * world
    dist.all_gather_object(all_checks, [c.as_dict() for c in ctx.checks.checks], group=group)
    if rank == 0:
        record = _record(ctx, results, [c for per_rank in all_checks for c in per_rank], skipped)
        with open(record_path, "w") as f:
            json.dump(record, f)
    ctx.timer.barrier()
    dist.destroy_process_group()


def _record(ctx: RankContext, results: list, checks: list, skipped: list) -> dict:
    """Everything the run measured and checked (the `--json` file)."""
    options = ctx.options
    failed = [c for c in checks if not c["ok"]]
    return {
        "header": _header(ctx),
        "results": [r.summary() for r in results],
        "checks": checks,
        "skipped": skipped,
        "ok": not failed,
        "num_checks": len(checks),
        "num_failed": len(failed),
        "options": dataclasses.asdict(options),
    }


def _header(ctx: RankContext) -> dict:
    options = ctx.options
    triton_version: Optional[str]
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    kind = metrics.card_kind(ctx.card)
    return {
        "card": ctx.card or f"CPU ({platform.processor() or platform.machine()})",
        "device": options.device,
        "num_gpus": ctx.world if options.on_gpu else 0,
        "num_ranks": ctx.world,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "torch": torch.__version__,
        "triton": triton_version,
        "flashep": __version__,
        "backend_env": os.environ.get("FLASHEP_BACKEND", ""),
        "baseline": "NCCL" if options.on_gpu else "gloo",
        "backends": ctx.backends,
        "num_sms": options.num_sms,
        "buffer_bytes": ctx.buffer_bytes,
        "seed": options.seed,
        "command": options.command,
        "deepep_figures": f"{metrics.DEEPEP_SOURCE} ({kind})" if kind else "n/a for this card",
    }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
