"""LogFMT: the optional 10-bit wire format of low-latency combine (`use_logfmt=True`), as torch code.

Per group of 128 channels of a bf16 row, with `a` the bf16 bit pattern of |v| (15 bits; it grows with |v|
and is linear in |v| inside each octave, a piecewise-linear log2 that integer code computes exactly):
  amax = max a, amin = max(min a, amax - 32 octaves);
  if |v| >= 1 somewhere in the group (amax >= bits(1.0)) or amin == amax, the group goes as plain bf16;
  else each value becomes sign + a 9-bit code q = 0 for v == 0, else 1 + round(510 * (a - amin) / (amax - amin))
  and is decoded as the bf16 with sign and magnitude bits amin + round((q - 1) * (amax - amin) / 510).
Rounding is half up, in integers, so the Triton kernels (GPU and interpreter) and this module agree bit for
bit. A group whose magnitudes span at most ~4 octaves (510 bf16 steps) comes back exactly; wider groups
lose about log2(span / 510) bits of mantissa.

On the wire a LogFMT group takes 160 bytes (the low 8 bits of its codes, then 32 bytes where byte j holds the
top 2 bits of channels j + 32 i in bits 2 i) instead of 256, plus 4 bytes of group metadata (amin | amax << 16,
or -1 for a plain group) that every group carries: `1.25 H + H / 32` bytes per row when every group is LogFMT,
as DeepEP counts it.
"""
from __future__ import annotations

import torch

GROUP = 128  # channels per group
LEVELS = 510  # code steps between amin (q = 1) and amax (q = 511)
OCTAVES = 32  # widest range of one group: smaller magnitudes go to the code of amin
ONE_BITS = 0x3F80  # bf16 bits of 1.0: groups reaching it stay plain
BF16_MANTISSA = 7


def roundtrip(y: torch.Tensor) -> torch.Tensor:
    """bf16 [..., H] (H a multiple of 128) -> what the receiver decodes after LogFMT encoding."""
    if y.dtype != torch.bfloat16 or y.size(-1) % GROUP:
        raise ValueError(f"LogFMT needs bf16 rows of a multiple of {GROUP} channels, got {y.dtype} {tuple(y.shape)}")
    bits = y.contiguous().view(torch.int16).to(torch.int32).reshape(-1, GROUP)
    magnitude = bits & 0x7FFF
    amax = magnitude.amax(dim=1, keepdim=True)
    amin = torch.maximum(magnitude.amin(dim=1, keepdim=True), amax - (OCTAVES << BF16_MANTISSA))
    plain = (amax >= ONE_BITS) | (amax == amin)
    span = (amax - amin).clamp(min=1)
    offset = (magnitude - amin).clamp(min=0)
    code = torch.where(magnitude == 0, 0, 1 + torch.div(2 * LEVELS * offset + span, 2 * span, rounding_mode="floor"))
    decoded = torch.where(code == 0, 0,
                          amin + torch.div(2 * (code - 1) * span + LEVELS, 2 * LEVELS, rounding_mode="floor"))
    out = torch.where(plain, bits, torch.where(bits < 0, decoded - 0x8000, decoded))  # int16 sign = bf16 sign
    return out.to(torch.int16).view(torch.bfloat16).view(y.shape)


def message_bytes(hidden: int) -> int:
    """Bytes per combined row in DeepEP's LogFMT count (every group encoded)."""
    return hidden * 5 // 4 + hidden // 32
