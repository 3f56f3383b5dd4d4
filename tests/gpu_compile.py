"""Compile flashep's Triton kernels for Hopper (sm_90) on a machine without a GPU.

1. `install_recorder(path)` runs inside a process whose kernels execute under TRITON_INTERPRET=1: every
   launch of a kernel of `flashep.kernels.*` appends its specialisation (argument dtypes, pointer
   alignment, integer values, constexprs, launch options) to `path`.
2. `compile_recorded(paths)` runs in a process WITHOUT the interpreter: it points Triton at a fake CUDA
   device of compute capability 9.0 and compiles each recorded launch through the normal JIT path
   (`kernel.warmup`), down to a cubin. Errors that only the GPU compiler sees (inline PTX, layouts,
   types the interpreter accepts) surface here, in CI.
"""
from __future__ import annotations

import importlib
import json
import os
import sys

KERNEL_MODULES = ("flashep.kernels.normal", "flashep.kernels.low_latency")
# constexprs that select interpreter-only code paths, and their values on a GPU
GPU_OVERRIDES = {"USE_TIMER": True, "EXACT_CASTS": False}
# probe options the interpreter never records (FLASHEP_LL_STAMPS): each kernel that takes them is also
# compiled once with them on
PROBE_OPTIONS = {"STAMPS": True}
# launch options a record may carry besides the kernel's own arguments
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "debug")


def _spec(value):
    import torch

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).replace("torch.", ""), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, bool):
        return {"bool": value}
    if isinstance(value, int):
        return {"int": value}
    if isinstance(value, float):
        return {"float": value}
    if value is None:
        return {"none": True}
    if hasattr(value, "value"):  # tl.constexpr
        return _spec(value.value)
    return {"repr": repr(value)}


def install_recorder(path: str) -> None:
    """Record every distinct kernel launch of this process into `path` (JSON lines)."""
    seen = set()
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        for attr in dir(module):
            fn = getattr(module, attr)
            if attr.startswith("ep_") and hasattr(fn, "add_pre_run_hook"):
                fn.add_pre_run_hook(_make_hook(path, name, attr, seen))


def _make_hook(path, module, kernel, seen):
    def hook(*args, **kwargs):
        record = {"module": module, "kernel": kernel, "args": [_spec(a) for a in args],
                  "kwargs": {k: _spec(v) for k, v in kwargs.items()}}
        line = json.dumps(record, sort_keys=True)
        if line not in seen:
            seen.add(line)
            with open(path, "a") as f:
                f.write(line + "\n")
    return hook


def _value(spec):
    import torch

    if "tensor" in spec:
        dtype = getattr(torch, spec["tensor"])
        base = torch.zeros(64, dtype=dtype)
        return base if spec["aligned"] else base[1:]  # reproduce a misaligned view's specialisation
    for key in ("bool", "int", "float"):
        if key in spec:
            return spec[key]
    if "none" in spec:
        return None
    raise ValueError(f"cannot rebuild argument {spec}")


class FakeHopper:
    """A stand-in Triton driver that names the sm_90 target (and device 0, stream `STREAM`); it launches nothing."""
    STREAM = 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return self.STREAM

    def get_device_interface(self):
        import torch

        return torch.cuda

    def is_active(self):
        return True


def use_hopper_target(stand_in: FakeHopper | None = None) -> None:
    """Make Triton compile for sm_90 without a GPU, through `stand_in` (a plain FakeHopper by default)."""
    from triton.runtime import driver

    driver.set_active(stand_in or FakeHopper())


def compile_recorded(paths: list[str], keep_going: bool = False) -> list[str]:
    """Compile every distinct recorded launch for sm_90 (into Triton's cache, TRITON_CACHE_DIR) -> list of
    'kernel: summary' lines. keep_going: a record that no longer compiles (the kernel's arguments changed since
    it was recorded) is reported as skipped instead of raising."""
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "compile outside the interpreter"
    use_hopper_target()  # this process compiles only; it never launches
    records = set()
    for path in paths:
        with open(path) as f:
            records.update(line.strip() for line in f if line.strip())
    done = []
    probed = set()
    for line in sorted(records):
        record = json.loads(line)
        fn = getattr(importlib.import_module(record["module"]), record["kernel"])
        args = [_value(s) for s in record["args"]]
        # a GPU launch also hands its hooks launcher-only options (e.g. instrumentation_mode); a constexpr removed
        # since the recording is dropped too
        kwargs = {k: _value(s) for k, s in record["kwargs"].items() if k in fn.arg_names or k in LAUNCH_OPTIONS}
        kwargs.update({k: v for k, v in GPU_OVERRIDES.items() if k in kwargs})
        variants = [kwargs]
        probe = {k: v for k, v in PROBE_OPTIONS.items() if k in kwargs}
        if probe and record["kernel"] not in probed:
            probed.add(record["kernel"])
            variants.append(dict(kwargs, **probe))
        for variant in variants:
            try:
                kernel = fn.warmup(*args, grid=(1,), **variant)
            except Exception as error:  # noqa: BLE001 - reported, and raised unless keep_going
                if not keep_going:
                    raise
                done.append(f"{record['kernel']}: skipped ({type(error).__name__}: {str(error)[:200]})")
                continue
            done.append(f"{record['kernel']}: warps={kernel.metadata.num_warps} shared={kernel.metadata.shared}"
                        + (" (probe options)" if variant is not kwargs else ""))
    return done


if __name__ == "__main__":
    keep = "--keep-going" in sys.argv[1:]
    for line in compile_recorded([a for a in sys.argv[1:] if a != "--keep-going"], keep_going=keep):
        print(line)
