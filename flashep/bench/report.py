"""Presentation of a benchmark record: rich tables per mode, the checks, a short summary, the plot."""
from __future__ import annotations

from typing import Optional

from rich.console import Console
from rich.table import Table

from . import metrics

_MODES = (("normal", "normal mode"), ("low-latency", "low-latency mode"))
_HEADLINE_OPS = (metrics.DISPATCH_FP8, metrics.DISPATCH_BF16, metrics.COMBINE, metrics.LL_DISPATCH,
                 metrics.LL_COMBINE)
_SWEEP_OPS = (metrics.DISPATCH_FP8, metrics.DISPATCH_BF16, metrics.COMBINE)


def make_console() -> Console:
    console = Console()
    if not console.is_terminal:  # logs: wide enough for the tables
        console = Console(width=180)
    return console


def print_record(record: dict, console: Console) -> None:
    _print_header(record["header"], console)
    baseline = record["header"]["baseline"]
    for mode, title in _MODES:
        rows = [r for r in record["results"] if r["mode"] == mode]
        if rows:
            console.print(_mode_table(title, rows, baseline))
    for skip in record["skipped"]:
        console.print(f"[yellow]{skip['mode']} mode skipped[/]: {skip['reason']}")
    _print_checks(record, console)
    _print_summary(record, console)


def _print_header(header: dict, console: Console) -> None:
    buffers = ", ".join(f"{kind}: {_bytes(n)}" for kind, n in header["buffer_bytes"].items()) or "n/a"
    backends = ", ".join(f"{kind}: {names}" for kind, names in header["backends"].items()) or "n/a"
    gpus = f"{header['num_gpus']} GPUs" if header["num_gpus"] else f"{header['num_ranks']} CPU ranks (gloo)"
    console.print(f"[bold]flashep {header['flashep']} benchmark[/] on {header['card']}, {gpus}, {header['date']}")
    console.print(f"torch {header['torch']}, triton {header['triton']}; backends: {backends}; "
                  f"SMs {', '.join(map(str, header['num_sms']))}")
    console.print(f"communication buffer bytes per rank: {buffers}; seed {header['seed']}")
    console.print(f"DeepEP figures: {header['deepep_figures']}; command: {header['command']}", highlight=False)


def _mode_table(title: str, rows: list, baseline: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("config", "op", "kernel us", "e2e us", "host us", "GB/s", "GB/s remote", f"{baseline} us",
                 f"{baseline} GB/s", "DeepEP us", "DeepEP GB/s", f"vs {baseline}", "vs DeepEP"):
        table.add_column(name, justify="left" if name in ("config", "op") else "right", no_wrap=True)
    for row in rows:
        config = row["config"]
        name = f"{config['tokens']} tok" + (f", {config['num_sms']} SMs" if "num_sms" in config else "")
        table.add_row(name, row["op"] + ("" if row["time_kind"] == "e2e" else " *"),
                      _number(row["kernel_us"]), _number(row["e2e_us"]), _number(row["host_us"]),
                      _number(row["gbps"]), _number(row["gbps_remote"]), _number(row["baseline_us"]),
                      _number(row["baseline_gbps"]), _number(row["deepep_us"]), _number(row["deepep_gbps"]),
                      _speedup(row["speedup_vs_baseline"]), _speedup(row["speedup_vs_deepep"]))
    table.caption = (f"GB/s, {baseline} and speedups use the end-to-end time of one call, or the kernel time for "
                     f"ops marked *; host us: the host side of one call in the end-to-end loop (GPU only). GB/s in "
                     f"DeepEP's metric (received rows incl. self / selections); GB/s remote "
                     f"counts only bytes that cross ranks; {baseline} = all_to_all_single moving the same bytes.")
    table.caption_justify = "left"
    return table


def _print_checks(record: dict, console: Console) -> None:
    failed = [c for c in record["checks"] if not c["ok"]]
    if not failed:
        console.print(f"[green]checks against flashep.reference: all {record['num_checks']} passed[/]")
        return
    console.print(f"[bold red]MISMATCH: {len(failed)} of {record['num_checks']} checks against "
                  f"flashep.reference failed[/]")
    for c in failed:
        console.print(f"[red]  rank {c['rank']} {c['mode']} ({c['config']}) {c['what']}: {c['detail']}[/]",
                      highlight=False)


def _print_summary(record: dict, console: Console) -> None:
    """The last lines: each mode's headline ops at the configuration DeepEP published figures for (else the
    first configuration), then the verdict."""
    chosen = {}
    for row in record["results"]:
        if row["op"] not in _HEADLINE_OPS:
            continue
        key = (row["mode"], row["op"])
        if key not in chosen or (row["speedup_vs_deepep"] and not chosen[key]["speedup_vs_deepep"]):
            chosen[key] = row
    for row in chosen.values():
        deepep = f", {_speedup(row['speedup_vs_deepep'])} DeepEP" if row["speedup_vs_deepep"] else ""
        console.print(f"flashep.bench: {row['op']}: {_number(row['time_us'])} us ({row['time_kind']}), "
                      f"{_number(row['gbps'])} GB/s, {_speedup(row['speedup_vs_baseline'])} "
                      f"{record['header']['baseline']}{deepep}", highlight=False)
    verdict = "OK" if record["ok"] else "FAILED"
    skipped = f", skipped: {', '.join(s['mode'] for s in record['skipped'])}" if record["skipped"] else ""
    console.print(f"flashep.bench: {verdict} ({record['num_checks'] - record['num_failed']}/{record['num_checks']} "
                  f"checks passed{skipped})", highlight=False)


def plot_sweep(record: dict, path: str) -> Optional[str]:
    """GB/s against tokens per rank for the normal-mode ops -> None, or why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    rows = [r for r in record["results"] if r["mode"] == "normal" and r["op"] in _SWEEP_OPS and r["gbps"]]
    if len({r["config"]["tokens"] for r in rows}) < 2:
        return "the plot needs several token counts (use --sweep)"
    fig, ax = plt.subplots(figsize=(8, 5))
    series = sorted({(r["op"], r["config"]["num_sms"]) for r in rows})
    for op, sms in series:
        points = sorted((r["config"]["tokens"], r["gbps"], r["baseline_gbps"]) for r in rows
                        if r["op"] == op and r["config"]["num_sms"] == sms)
        line, = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{op}, {sms} SMs")
        if all(p[2] for p in points):
            ax.plot([p[0] for p in points], [p[2] for p in points], linestyle="--", color=line.get_color(),
                    alpha=0.5, label=f"{record['header']['baseline']} all_to_all ({op})")
    header = record["header"]
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("GB/s (DeepEP metric)")
    ax.set_title(f"flashep on {header['num_ranks']}x {header['card']} ({header['date'][:10]})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _number(value) -> str:
    if value is None:
        return "n/a"
    if value >= 1000:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def _speedup(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _bytes(n) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"
