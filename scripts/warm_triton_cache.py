"""Compile recorded kernel launches for Hopper (sm_90) on a machine without a GPU, into a Triton cache that a
GPU machine can use from its first test (the GPU suites spend most of their time compiling).

    python scripts/warm_triton_cache.py [--jobs N] [--out .devcache/triton-cache.tar.xz] RECORDS ...

RECORDS: JSON-lines files or folders of them, as `FLASHEP_RECORD_LAUNCHES=DIR` writes them in every test rank
(`RECORD_LAUNCHES=1 scripts/gpu_check.sh tests` returns them as launches.tar.xz). Each distinct launch is
compiled once through Triton's JIT with a stand-in Hopper driver (tests/gpu_compile.py), in N processes; a
launch whose kernel changed its arguments since it was recorded is skipped. The cache goes into a tarball whose
top folder is `.triton_cache`, which `scripts/gpu_check.sh` unpacks (carry `.devcache` with the device tool).
Cache entries are keyed by kernel source and specialisation, so only launches of unchanged kernels hit.
Known limit (session 12): the key also holds the compile options, among them the path of Triton's libdevice,
i.e. where Python and Triton are installed. The lent GPU machines use /opt/torch/.venv (Python 3.12); a cache
built elsewhere had no key in common with theirs (0 of 86 entries), so it only helps from a machine whose
Triton sits at the same path.
"""
import argparse
import glob
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def read_records(paths: list[str]) -> list[str]:
    files = []
    for path in paths:
        files += sorted(glob.glob(os.path.join(path, "*.jsonl"))) if os.path.isdir(path) else [path]
    lines = set()
    for name in files:
        with open(name) as f:
            lines.update(line.strip() for line in f if line.strip())
    return sorted(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("records", nargs="+")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=os.path.join(ROOT, ".devcache", "triton-cache.tar.xz"))
    args = p.parse_args()
    records = read_records(args.records)
    if not records:
        sys.exit("warm_triton_cache: no recorded launches in " + " ".join(args.records))
    with tempfile.TemporaryDirectory() as work:
        cache = os.path.join(work, ".triton_cache")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(TRITON_CACHE_DIR=cache, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "tests"), ROOT]))
        jobs = max(1, min(args.jobs, len(records)))
        procs = []
        for j in range(jobs):
            chunk = os.path.join(work, f"chunk-{j}.jsonl")
            with open(chunk, "w") as f:
                f.write("\n".join(records[j::jobs]) + "\n")
            procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "gpu_compile.py"),
                                           "--keep-going", chunk], env=env, stdout=subprocess.PIPE, text=True))
        lines = []
        for proc in procs:
            out, _ = proc.communicate()
            if proc.returncode != 0:
                sys.exit(f"warm_triton_cache: a compile process failed (exit {proc.returncode})")
            lines += out.splitlines()
        skipped = [line for line in lines if ": skipped" in line]
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        subprocess.run(["tar", "cJf", args.out, "-C", work, ".triton_cache"], check=True,
                       env=dict(os.environ, XZ_OPT="-T0"))
    print(f"warm_triton_cache: {len(records)} recorded launches, {len(lines) - len(skipped)} compiled, "
          f"{len(skipped)} skipped; wrote {args.out}")
    for line in skipped:
        print("  " + line)


if __name__ == "__main__":
    main()
