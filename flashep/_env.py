"""Process-wide environment guards, applied before torch.distributed or NVSHMEM initialise anything.

NVLink multicast (NVLS) can take a shared host's GPUs out of service, so flashep switches it off in
NCCL, torch symmetric memory and NVSHMEM unless the user has set the variables explicitly.
"""
import os
from typing import Optional

MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def apply() -> None:
    for key, value in MULTICAST_OFF.items():
        os.environ.setdefault(key, value)


def multicast_disabled() -> bool:
    return all(os.environ.get(k) == v for k, v in MULTICAST_OFF.items())


def interpret_mode() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def timeout_seconds() -> float:
    """Bound of every wait on a peer, host or device side (FLASHEP_TIMEOUT_S, default 100 s as DeepEP)."""
    return value("FLASHEP_TIMEOUT_S", 100.0, float, "a number of seconds")


def node_size() -> int:
    """Ranks per NVLink node for the internode forms (FLASHEP_NODE_SIZE, default 8 as DeepEP)."""
    return integer("FLASHEP_NODE_SIZE", 8, minimum=1)


# ---- tuning knobs: one parser each, errors name the variable --------------------------------------------------
def value(name: str, default, parse, what: str):
    """The environment variable `name` parsed by `parse` (`default` when unset or empty); a value `parse`
    rejects raises a ValueError naming the variable and `what` it must be."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return parse(raw)
    except ValueError:
        raise ValueError(f"{name} must be {what}, got {raw!r}") from None


def integer(name: str, default: Optional[int], minimum: int) -> Optional[int]:
    number = value(name, default, int, "an integer")
    if number is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def power_of_two(name: str, default: int) -> int:
    number = value(name, default, int, "a power of two")
    if number < 1 or number & (number - 1):
        raise ValueError(f"{name} must be a power of two, got {number}")
    return number


def share(name: str, default: float) -> float:
    between = "a number between 0 and 1 (exclusive)"
    fraction = value(name, default, float, between)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"{name} must be {between}, got {fraction!r}")
    return fraction


apply()
