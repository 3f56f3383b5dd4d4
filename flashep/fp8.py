"""FP8 helpers for callers of flashep: per-token casts, UE8M0 scale packing, and a similarity metric.

Format (the one normal-mode dispatch forwards and low-latency dispatch produces): per token and per group
of 128 channels, an e4m3 value `q` and a scale `s` with `x ~= float(q) * s`. Scales are float32, or
UE8M0 exponent bytes (`2^(b - 127)`) packed four groups to an int32, group `4p + j` in byte `j`.
"""
from __future__ import annotations

import torch

GROUP = 128  # channels per scale
FP8_MAX = 448.0  # largest finite float8_e4m3fn
AMAX_FLOOR = 1e-4  # keeps all-zero groups from dividing by zero


def per_token_cast_to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 [T, H] -> (float8_e4m3fn [T, H], float32 scales [T, ceil(H / 128)]).

    Channels past H are treated as zeros, so any H works.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [tokens, hidden], got shape {tuple(x.shape)}")
    num_tokens, hidden = x.shape
    groups = _groups(hidden)
    padded = torch.zeros(num_tokens, groups * GROUP, dtype=torch.float32, device=x.device)
    padded[:, :hidden] = x.float()
    grouped = padded.view(num_tokens, groups, GROUP)
    amax = grouped.abs().amax(dim=2).clamp(min=AMAX_FLOOR)
    q = (grouped * (FP8_MAX / amax).unsqueeze(2)).to(torch.float8_e4m3fn)
    return q.view(num_tokens, groups * GROUP)[:, :hidden].contiguous(), amax / FP8_MAX


def per_token_cast_back(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dequantize fp8 [..., H] with scales [..., ceil(H / 128)] float32 or [..., ceil(H / 512)] int32 UE8M0
    (any strides) -> bf16 [..., H]."""
    hidden = q.size(-1)
    groups = _groups(hidden)
    if scales.dtype == torch.int32:
        scales = ue8m0_to_float(unpack_ue8m0(scales)[..., :groups])
    elif scales.dtype != torch.float32:
        raise TypeError(f"scales must be float32 or int32 (UE8M0), got {scales.dtype}")
    if scales.size(-1) != groups:
        raise ValueError(f"scales has {scales.size(-1)} groups, expected {groups} for hidden {hidden}")
    per_channel = scales.repeat_interleave(GROUP, dim=-1)[..., :hidden]
    return (q.float() * per_channel).to(torch.bfloat16)


def pack_ue8m0(exponent_bytes: torch.Tensor) -> torch.Tensor:
    """[..., G] biased exponents (0..255, any integer dtype) -> int32 [..., ceil(G / 4)], group 4p + j in
    byte j of word p (little-endian)."""
    if exponent_bytes.dtype.is_floating_point:
        raise TypeError(f"exponent_bytes must be an integer tensor, got {exponent_bytes.dtype}")
    values = exponent_bytes.to(torch.int64)
    if values.numel() and (int(values.min()) < 0 or int(values.max()) > 255):
        raise ValueError("exponent_bytes must hold values in [0, 255]")
    groups = values.size(-1)
    words = -(-groups // 4)
    padded = torch.zeros(*values.shape[:-1], words * 4, dtype=torch.int64, device=values.device)
    padded[..., :groups] = values
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64, device=values.device)
    packed = (padded.view(*values.shape[:-1], words, 4) << shifts).sum(dim=-1)
    return _wrap_int32(packed)


def unpack_ue8m0(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., P] -> uint8 [..., 4P] biased exponents (inverse of `pack_ue8m0`, with its padding)."""
    if packed.dtype != torch.int32:
        raise TypeError(f"packed must be int32, got {packed.dtype}")
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.tensor([0, 8, 16, 24], dtype=torch.int64, device=packed.device)
    exponent_bytes = (words.unsqueeze(-1) >> shifts) & 0xFF
    return exponent_bytes.flatten(-2).to(torch.uint8)


def ue8m0_to_float(exponent_bytes: torch.Tensor) -> torch.Tensor:
    """Biased exponent bytes -> float32 2^(b - 127) (the float whose bit pattern is b << 23)."""
    return (exponent_bytes.to(torch.int32) << 23).view(torch.float32)


def to_column_major(scales: torch.Tensor) -> torch.Tensor:
    """Same values, token stride 1 (the layout GEMM kernels want and DeepEP-style callers pass)."""
    return scales.T.contiguous().T


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - cosine-like similarity of x + 1 and y + 1 in float64: 0 means identical."""
    x, y = x.double() + 1, y.double() + 1
    denominator = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denominator)


def _groups(hidden: int) -> int:
    return -(-hidden // GROUP)


def _wrap_int32(values: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit words -> int32 with the same bits."""
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)
