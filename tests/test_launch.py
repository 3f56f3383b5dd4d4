"""flashep.launch on the CPU: the specialisation key, the JIT / compiled-kernel choice against a stand-in JIT
function, the fallbacks, and the key checked against Triton's own specialisation (its binder in this
process; its JIT and CompiledKernel with a stand-in sm_90 driver in a child process)."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from flashep import launch as fl

HERE = os.path.dirname(os.path.abspath(__file__))


def key(value):
    return fl.runtime_key([value])


def aligned(dtype=torch.float32):
    t = torch.zeros(64, dtype=dtype)
    assert t.data_ptr() % 16 == 0
    return t


def misaligned(dtype=torch.float32):
    t = aligned(dtype)[1:]
    assert t.data_ptr() % 16 != 0
    return t


# ---- the key -------------------------------------------------------------------------------------------------
def test_tensor_key_follows_dtype_and_alignment():
    assert key(aligned()) == key(aligned())  # another tensor, same specialisation
    assert key(misaligned()) == key(aligned()[3:])
    assert key(aligned()) != key(misaligned())
    assert key(aligned()) != key(aligned(torch.bfloat16))
    assert key(aligned(torch.int32)) != key(aligned(torch.float32))  # same element size


def test_int_key_follows_one_divisibility_and_width():
    distinct = [1, 16, 17, -1, 2**31, 2**31 + 1, 2**40, 2**40 + 1, 2**63, 2**63 + 1]
    keys = [key(v) for v in distinct]
    assert len(set(map(tuple, keys))) == len(distinct), keys
    for a, b in ((16, 32), (17, 33), (0, 48), (2**40, 2**40 + 16), (2**63, 2**63 + 16), (-16, -32)):
        assert key(a) == key(b), (a, b)


def test_other_scalars():
    assert key(True) != key(False) and key(True) != key(1) and key(None) != key(False)
    assert key(1.5) == key(2.5) and key(1.0) != key(1)
    with pytest.raises(fl.Unsupported):
        key((1, 2))


# ---- a stand-in JIT function --------------------------------------------------------------------------------
@dataclass
class Param:
    name: str
    is_constexpr: bool
    default: object


class FakeCompiled:
    """What the fast path uses of Triton's CompiledKernel: run, function, [grid](*args, stream=)."""

    function = "cu-function"

    def __init__(self, log, number):
        self.log, self.number = log, number

    def run(self, *args):
        raise AssertionError("the launcher calls compiled[grid](...), not run")

    def __getitem__(self, grid):
        return lambda *args, stream=None: self.log.append(("compiled", self.number, grid, args, stream))


class FakeJit:
    """Records `kernel[grid](*args, **kwargs)` and returns a new FakeCompiled each time (`result` overrides)."""

    def __init__(self, fn, result="compiled"):
        self.params = [Param(name, "constexpr" in str(p.annotation), p.default)
                       for name, p in inspect.signature(fn).parameters.items()]
        self.log = []
        self.result = result
        self.pre_run_hooks = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            inspect.signature(_kernel).bind(*args, **{k: v for k, v in kwargs.items() if k != "num_warps"})
            self.log.append(("jit", grid, args, kwargs))
            return FakeCompiled(self.log, len(self.log)) if self.result == "compiled" else self.result
        return run


def _kernel(x_ptr, n, scale, flag, BLOCK: "tl.constexpr", MODE: "tl.constexpr" = 3, extra=None):
    pass


@pytest.fixture
def device(monkeypatch):
    """The current CUDA device and stream as the launcher sees them (no GPU here)."""
    state = {"device": 0}
    monkeypatch.setattr(fl, "current_device", lambda: state["device"])
    monkeypatch.setattr(fl, "current_stream", lambda device: 1000 + device)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FLASHEP_FAST_LAUNCH", raising=False)
    return state


def kinds(jit):
    return [entry[0] for entry in jit.log]


def test_first_launch_through_jit_then_compiled_kernel_in_parameter_order(device):
    jit = FakeJit(_kernel)
    launcher = fl.Launcher(jit)
    x = aligned()
    launcher((4,), x, 32, 0.5, True, BLOCK=16, num_warps=4)
    assert jit.log == [("jit", (4,), (x, 32, 0.5, True), {"BLOCK": 16, "num_warps": 4})]
    y = aligned()  # another tensor of the same specialisation, other values of the same classes
    launcher((4,), y, 48, 0.25, True, BLOCK=16, num_warps=4)
    # every parameter in order, the constexprs and the defaults (MODE=3, extra=None) included, a 3-d grid,
    # the current stream, and the compiled kernel that the first launch returned
    assert jit.log[1] == ("compiled", 1, (4, 1, 1), (y, 48, 0.25, True, 16, 3, None), 1000)
    launcher((2, 3), x_ptr=y, n=48, scale=0.25, flag=True, BLOCK=16, num_warps=4)  # keywords: the same key
    assert jit.log[2] == ("compiled", 1, (2, 3, 1), (y, 48, 0.25, True, 16, 3, None), 1000)


@pytest.mark.parametrize("change", [
    dict(x_ptr=misaligned()), dict(x_ptr=aligned(torch.bfloat16)), dict(n=1), dict(n=17), dict(n=2**40),
    dict(flag=False), dict(BLOCK=32), dict(MODE=4), dict(extra=7), dict(num_warps=8)])
def test_a_changed_specialisation_goes_through_the_jit(device, change):
    jit = FakeJit(_kernel)
    launcher = fl.Launcher(jit)
    base = dict(x_ptr=aligned(), n=32, scale=0.5, flag=True, BLOCK=16, num_warps=4)
    launcher((1,), **base)
    launcher((1,), **base)
    launcher((1,), **dict(base, **change))
    launcher((1,), **dict(base, **change))
    assert kinds(jit) == ["jit", "compiled", "jit", "compiled"]
    assert jit.log[3][1] == 3  # the kernel that the second JIT launch returned
    launcher((1,), **base)
    assert jit.log[4][:2] == ("compiled", 1)


def test_another_device_goes_through_the_jit(device):
    jit = FakeJit(_kernel)
    launcher = fl.Launcher(jit)
    launcher((1,), aligned(), 32, 0.5, True, BLOCK=16)
    device["device"] = 1
    launcher((1,), aligned(), 32, 0.5, True, BLOCK=16)
    launcher((1,), aligned(), 32, 0.5, True, BLOCK=16)
    assert kinds(jit) == ["jit", "jit", "compiled"] and jit.log[2][4] == 1001


def test_disabled_paths_always_use_the_jit(device, monkeypatch):
    def launches(jit, n=3):
        launcher = fl.Launcher(jit)
        for _ in range(n):
            launcher((1,), aligned(), 32, 0.5, True, BLOCK=16)
        return kinds(jit)

    monkeypatch.setenv("FLASHEP_FAST_LAUNCH", "0")
    assert launches(FakeJit(_kernel)) == ["jit"] * 3
    monkeypatch.delenv("FLASHEP_FAST_LAUNCH")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert launches(FakeJit(_kernel)) == ["jit"] * 3
    monkeypatch.delenv("TRITON_INTERPRET")
    assert launches(FakeJit(_kernel)) == ["jit", "compiled", "compiled"]
    hooked = FakeJit(_kernel)
    hooked.pre_run_hooks.append(lambda *a, **k: None)  # e.g. tests/gpu_compile.py's recorder
    assert launches(hooked) == ["jit"] * 3


def test_a_jit_that_returns_no_compiled_kernel_turns_the_fast_path_off(device):
    jit = FakeJit(_kernel, result=None)  # e.g. the interpreter, or another Triton's API
    launcher = fl.Launcher(jit)
    for _ in range(3):
        launcher((1,), aligned(), 32, 0.5, True, BLOCK=16)
    assert kinds(jit) == ["jit"] * 3 and not launcher.fast and not launcher.compiled


def test_uncovered_arguments_and_errors_go_through_the_jit(device):
    jit = FakeJit(_kernel)
    launcher = fl.Launcher(jit)
    for _ in range(2):
        launcher((1,), aligned(), 32, 0.5, True, BLOCK=16, extra=(1, 2))  # a tuple: not in the key
    launcher((1,), aligned(), 32, 0.5, True, BLOCK=16)
    with pytest.raises(TypeError):
        launcher((1,), aligned(), 32, 0.5, True)  # BLOCK missing: the JIT raises
    with pytest.raises(TypeError):
        launcher((1,), aligned(), 32, 0.5, True, BLOCK=16, n=32)  # n twice
    assert kinds(jit) == ["jit", "jit", "jit"]
    launcher((1,), aligned(), 32, 0.5, True, BLOCK=16)
    assert kinds(jit)[-1] == "compiled"


def test_a_replay_swaps_the_named_values_and_keeps_every_other_argument(device):
    jit = FakeJit(_kernel)
    x, first_out = aligned(), aligned(torch.int32)
    replay = fl.launch_replayable(jit, (4,), ("x_ptr", "extra", "n"), x, 32, 0.5, True, BLOCK=16, extra=first_out)
    assert kinds(jit) == ["jit"] and None in replay.values  # the first launch's swapped tensors are not kept
    y, out = aligned(), aligned(torch.int32)
    assert replay(y, out, 48)  # 48: the same class of int as 32 (a multiple of 16, not 1)
    assert jit.log[-1] == ("compiled", 1, (4, 1, 1), (y, 48, 0.5, True, 16, 3, out), 1000)
    assert fl.launch_replayable(jit, (4,), ("x_ptr",), x, 32, 0.5, True, BLOCK=16, extra=first_out) is not None
    assert kinds(jit) == ["jit", "compiled", "compiled"]  # a known key: the compiled kernel launches


@pytest.mark.parametrize("change", ["misaligned", "dtype", "int_class", "not_a_tensor", "device"])
def test_a_replay_refuses_what_the_kernel_was_not_specialised_for(device, change):
    jit = FakeJit(_kernel)
    replay = fl.launch_replayable(jit, (4,), ("x_ptr", "n"), aligned(), 32, 0.5, True, BLOCK=16)
    x, n = {"misaligned": (misaligned(), 32), "dtype": (aligned(torch.bfloat16), 32), "int_class": (aligned(), 17),
            "not_a_tensor": ((1, 2), 32)}.get(change, (aligned(), 32))
    if change == "device":
        device["device"] = 1
    assert not replay(x, n) and kinds(jit) == ["jit"]


def test_no_replay_where_the_jit_decides(device, monkeypatch):
    jit = FakeJit(_kernel)
    assert fl.launch_replayable(jit, (1,), ("x_ptr",), aligned(), 32, 0.5, True, BLOCK=16, extra=(1, 2)) is None
    with pytest.raises(ValueError, match="constexpr"):
        fl.launch_replayable(jit, (1,), ("BLOCK",), aligned(), 32, 0.5, True, BLOCK=16)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fl.launch_replayable(FakeJit(_kernel), (1,), ("x_ptr",), aligned(), 32, 0.5, True, BLOCK=16) is None


def test_the_cache_is_bounded(device, monkeypatch):
    monkeypatch.setattr(fl, "MAX_ENTRIES", 4)
    jit = FakeJit(_kernel)
    launcher = fl.Launcher(jit)
    for block in range(10):
        launcher((1,), aligned(), 32, 0.5, True, BLOCK=block)
        assert len(launcher.compiled) <= 4


def test_launch_keeps_one_launcher_per_kernel(device):
    jit = FakeJit(_kernel)
    for _ in range(2):
        fl.launch(jit, (1,), aligned(), 32, 0.5, True, BLOCK=16)
    assert kinds(jit) == ["jit", "compiled"]
    fl._launchers.pop(id(jit))


# ---- against Triton's own specialisation ---------------------------------------------------------------------
def _small(x_ptr, n, scale, flag, BLOCK: "tl.constexpr"):
    pass


VARIANTS = {
    "x_ptr": [aligned(), aligned(), misaligned(), aligned()[4:], aligned(torch.bfloat16),
              misaligned(torch.bfloat16), aligned(torch.int32)],
    "n": [0, 1, 2, 15, 16, 17, 32, 33, -1, -16, 2**31 - 1, 2**31, 2**31 + 16, 2**32, 2**40, 2**40 + 3, 2**63,
          2**63 + 16, -2**31, -2**31 - 16],
    "scale": [0.5, 1.0, 1e30],
    "flag": [True, False],
    "BLOCK": [16, 32, 1, True],
}


def _triton_binder():
    """Triton's own binder (signature -> specialisation) of `_small`; no GPU or driver needed."""
    import triton.language as tl  # noqa: F401 - the annotations name it
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    jit = JITFunction(_small)
    return jit, create_function_from_signature(jit.signature, jit.params, BaseBackend)


def test_key_at_least_as_fine_as_tritons_specialisation(device):
    """Wherever two launches share a key, Triton's binder gives them the same specialisation, so the kernel
    stored for the key is the one the JIT would pick."""
    try:
        jit, binder = _triton_binder()
    except (ImportError, AttributeError, TypeError) as error:  # another Triton's internals
        pytest.skip(f"Triton's binder is not reachable here: {error}")
    launcher = fl.Launcher(jit)
    base = dict(x_ptr=aligned(), n=32, scale=0.5, flag=True, BLOCK=16)
    seen = {}
    for name, values in VARIANTS.items():
        for value in values:
            kwargs = dict(base, **{name: value})
            _, ours = launcher.bind((), dict(kwargs, num_warps=4))
            _, specialisation, options = binder(**kwargs, num_warps=4)
            theirs = (tuple(specialisation), str(options))
            assert seen.setdefault(ours, theirs) == theirs, (name, value, seen[ours], theirs)
    # the key is finer than Triton's where it must not be coarser, and the check above saw both sides
    assert len(set(seen.values())) > 10


@pytest.mark.skipif(os.environ.get("FLASHEP_SKIP_SM90_COMPILE") == "1", reason="asked to skip")
def test_fast_path_calls_the_compiled_kernel_as_tritons_jit_does(tmp_path):
    """In a child process without the interpreter, with a stand-in sm_90 driver whose kernel launcher records
    its arguments: Triton's JIT compiles a small kernel; a repeated launch through the launcher must hand the
    compiled kernel's launcher what the JIT hands it (grid, stream, function, metadata, hooks, arguments)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([HERE, os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", "import test_launch as t; t.check_against_tritons_jit()"],
                          cwd=HERE, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "launches match" in done.stdout, done.stdout


def check_against_tritons_jit() -> None:
    import triton
    import triton.language as tl

    import gpu_compile

    calls = []

    class Utils:
        def load_binary(self, name, kernel, shared, device):
            return "module", f"function:{name}", 0, 0, 1024  # module, function, registers, spills, threads

        def get_device_properties(self, device):
            return {"max_shared_mem": 232448}

    class RecordingHopper(gpu_compile.FakeHopper):
        """Also loads binaries (nothing) and records every kernel launch instead of making it."""
        STREAM = 777
        utils = Utils()

        def launcher_cls(self, src, metadata):
            return lambda *args: calls.append(args)

    gpu_compile.use_hopper_target(RecordingHopper())
    fl.current_device = lambda: 0
    fl.current_stream = lambda device: 777

    @triton.jit
    def scale_rows(x_ptr, n, factor, FLAG: tl.constexpr, BLOCK: tl.constexpr, EXTRA: tl.constexpr = 2):
        i = tl.arange(0, BLOCK)
        v = tl.load(x_ptr + i, mask=i < n)
        tl.store(x_ptr + i, v * factor * EXTRA if FLAG else v, mask=i < n)

    def comparable(args):  # the launch-metadata object is new per launch: compare its type
        return tuple(type(a).__name__ if type(a).__name__ == "LazyDict" else a for a in args)

    launcher = fl.Launcher(scale_rows)
    assert launcher.fast
    variants = [(aligned(), 32, 2.0, True), (misaligned(), 32, 2.0, True), (aligned(), 1, 2.0, True),
                (aligned(), 17, 2.0, False), (aligned(torch.bfloat16), 2**40, 0.5, True)]
    kernels = {}
    for x, n, factor, flag in variants * 2:
        calls.clear()
        compiled = scale_rows[(3,)](x, n, factor, FLAG=flag, BLOCK=32, num_warps=2)  # Triton's JIT alone
        jit_call = comparable(calls[-1])
        calls.clear()
        launcher((3,), x, n, factor, FLAG=flag, BLOCK=32, num_warps=2)
        _, key = launcher.bind((x, n, factor), dict(FLAG=flag, BLOCK=32, num_warps=2))
        assert len(calls) == 1 and comparable(calls[-1]) == jit_call, (calls, jit_call)
        assert launcher.compiled[key] is compiled  # the JIT's own kernel for this specialisation
        assert kernels.setdefault(key, compiled) is compiled
    assert len(kernels) == len(variants)
    print("launches match")
