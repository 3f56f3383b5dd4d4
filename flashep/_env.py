"""Process-wide environment guards, applied before torch.distributed or NVSHMEM initialise anything.

NVLink multicast (NVLS) can take a shared host's GPUs out of service, so flashep switches it off in
NCCL, torch symmetric memory and NVSHMEM unless the user has set the variables explicitly.
"""
import os

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
    return float(os.environ.get("FLASHEP_TIMEOUT_S", "100"))


def node_size() -> int:
    """Ranks per NVLink node for the internode forms (FLASHEP_NODE_SIZE, default 8 as DeepEP)."""
    value = int(os.environ.get("FLASHEP_NODE_SIZE", "8"))
    if value < 1:
        raise ValueError(f"FLASHEP_NODE_SIZE must be >= 1, got {value}")
    return value


apply()
