"""The LogFMT codec (flashep.logfmt) against a scalar transcription of its definition, and its error bounds."""
from fractions import Fraction
import math

import torch

from flashep import logfmt
from flashep.fp8 import calc_diff
from harness import generator, logfmt_rows


def _bits(value: torch.Tensor) -> list:
    return [int(b) & 0xFFFF for b in value.view(torch.int16).tolist()]


def _scalar_roundtrip(group_bits: list) -> list:
    """One group of 128 bf16 bit patterns, decoded per the definition, with exact rational rounding (half up)."""
    magnitudes = [b & 0x7FFF for b in group_bits]
    amax = max(magnitudes)
    amin = max(min(magnitudes), amax - 32 * 128)
    if amax >= 0x3F80 or amax == amin:
        return list(group_bits)
    span = amax - amin
    out = []
    for bits, magnitude in zip(group_bits, magnitudes):
        if magnitude == 0:
            out.append(bits & 0x8000)
            continue
        code = 1 + math.floor(Fraction(510 * max(magnitude - amin, 0), span) + Fraction(1, 2))
        assert 1 <= code <= 511
        decoded = amin + math.floor(Fraction((code - 1) * span, 510) + Fraction(1, 2))
        out.append((bits & 0x8000) | decoded)
    return out


def test_roundtrip_matches_the_definition(seed):
    y = logfmt_rows(48, 512, generator(seed, 0))
    got = logfmt.roundtrip(y)
    assert got.shape == y.shape and got.dtype == torch.bfloat16
    for row in range(y.size(0)):
        for start in range(0, y.size(1), 128):
            want = _scalar_roundtrip(_bits(y[row, start:start + 128]))
            assert _bits(got[row, start:start + 128]) == want, f"row {row}, channels {start}..{start + 127}"


def test_plain_groups_and_narrow_groups_come_back_exactly(seed):
    g = generator(seed, 1)
    big = (torch.randn(16, 256, generator=g) * 4).to(torch.bfloat16)
    big[:, ::128] = 1.0  # every group reaches |v| >= 1
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5] * 32, dtype=torch.bfloat16)
    # magnitudes within 2 octaves: at most 256 bf16 steps apart, fewer than the 510 code steps
    narrow = ((torch.rand(16, 256, generator=g) + 1) * 2.0**-5 * torch.sign(torch.randn(16, 256, generator=g)))
    for y in (big, special.view(1, 128), narrow.to(torch.bfloat16)):
        assert torch.equal(logfmt.roundtrip(y).view(torch.int16), y.view(torch.int16))


def test_error_is_half_a_code_step(seed):
    """Wide groups lose precision: every decoded magnitude (in bf16 bits) within half a code step of the
    input's, and the signs kept; values below the 32-octave floor go to its code."""
    y = logfmt_rows(64, 1024, generator(seed, 2))
    got = logfmt.roundtrip(y)
    a = y.view(torch.int16).int().view(-1, 128)
    b = got.view(torch.int16).int().view(-1, 128)
    mag_a, mag_b = a & 0x7FFF, b & 0x7FFF
    amax = mag_a.amax(dim=1, keepdim=True)
    amin = torch.maximum(mag_a.amin(dim=1, keepdim=True), amax - 32 * 128)
    coded = (amax < 0x3F80) & (amax > amin)
    assert coded.any() and (~coded).any(), "inputs must take both paths"
    half_step = (amax - amin + 1019) // 1020  # ceil(span / 510 / 2) bf16 steps
    inside = coded & (mag_a >= amin)
    assert torch.all(((mag_b - mag_a).abs() <= half_step)[inside])
    below = coded & (mag_a < amin) & (mag_a > 0)
    assert torch.equal(mag_b[below], amin.expand_as(mag_a)[below])
    nonzero = mag_a > 0
    assert torch.equal((a & 0x8000)[nonzero], (b & 0x8000)[nonzero]), "signs"


def test_deepep_inputs_stay_within_its_bound(seed):
    """DeepEP's LogFMT inputs (randn * 0.5 * U(0, 1) and its perf input randn * 0.1) against its combine bound
    for BF16 dispatch: calc_diff of the weighted sum < 1e-5."""
    g = generator(seed, 3)
    weights = torch.rand(128, 8, generator=g).sum(dim=1, keepdim=True)
    for factor in [0.5 * float(torch.rand(1, generator=g)) for _ in range(4)] + [0.1]:
        x = (torch.randn(128, 7168, generator=g) * factor).to(torch.bfloat16)
        combined = (logfmt.roundtrip(x).float() * weights).to(torch.bfloat16)
        diff = calc_diff(x.float() * weights, combined.float())
        assert diff < 1e-5, f"factor {factor}: calc_diff {diff}"


def test_message_bytes():
    assert logfmt.message_bytes(7168) == 7168 * 5 // 4 + 7168 // 32 == 9184
