"""flashep.fp8 against hand-computed values."""
import random

import pytest
import torch

from flashep.fp8 import (calc_diff, pack_ue8m0, per_token_cast_back, per_token_cast_to_fp8, to_column_major,
                         unpack_ue8m0, ue8m0_to_float)


def test_cast_to_fp8_known_values():
    x = torch.zeros(2, 256, dtype=torch.bfloat16)
    x[0, :4] = torch.tensor([2.0, -0.5, 1.0, 0.25])  # group 0 of token 0: amax 2 -> multiply by 224
    x[0, 128] = 448.0  # group 1 of token 0: amax 448 -> multiply by 1
    x[0, 129] = -3.0
    q, scales = per_token_cast_to_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (2, 256)
    assert scales.dtype == torch.float32 and scales.shape == (2, 2)
    assert q[0, :4].float().tolist() == [448.0, -112.0, 224.0, 56.0]
    assert q[0, 128:130].float().tolist() == [448.0, -3.0]
    assert scales[0].tolist() == [torch.tensor(2.0 / 448.0).item(), 1.0]
    # an all-zero group uses the 1e-4 floor and quantizes to zeros
    assert scales[1].tolist() == [torch.tensor(1e-4 / 448.0).item()] * 2
    assert torch.count_nonzero(q[1].float()) == 0


def test_cast_to_fp8_pads_partial_group():
    x = torch.zeros(1, 200, dtype=torch.bfloat16)
    x[0, 130] = -4.0  # second group has 72 real channels and 56 padding zeros
    x[0, 5] = 1.0
    q, scales = per_token_cast_to_fp8(x)
    assert q.shape == (1, 200) and scales.shape == (1, 2)
    assert q[0, 130].float().item() == -448.0 and q[0, 5].float().item() == 448.0
    assert scales[0].tolist() == [torch.tensor(1.0 / 448.0).item(), torch.tensor(4.0 / 448.0).item()]


def test_cast_round_trip_error_is_bounded():
    seed = random.SystemRandom().randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(16, 384, generator=g) * torch.rand(16, 1, generator=g) * 10).to(torch.bfloat16)
    q, scales = per_token_cast_to_fp8(x)
    back = per_token_cast_back(q, scales).float()
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values, plus bf16 rounding of the result;
    # tiny values fall into subnormals whose spacing is 2^-9 * scale
    bound = x.float().abs() * (2**-4 + 2**-8) + scales.repeat_interleave(128, dim=1) * 2**-9
    assert torch.all((back - x.float()).abs() <= bound), f"seed {seed}"
    assert calc_diff(back, x) < 1e-3, f"seed {seed}"


def test_cast_back_column_major_scales():
    x = torch.randn(8, 256).to(torch.bfloat16)
    q, scales = per_token_cast_to_fp8(x)
    column_major = to_column_major(scales)
    assert column_major.stride() == (1, 8) and torch.equal(column_major, scales)
    assert torch.equal(per_token_cast_back(q, column_major), per_token_cast_back(q, scales))


def test_pack_ue8m0_byte_layout():
    packed = pack_ue8m0(torch.tensor([[127, 128, 1, 255, 130]], dtype=torch.uint8))
    # word 0 = bytes (127, 128, 1, 255) little-endian = 0xFF01807F; word 1 = 130 with zero padding
    assert packed.dtype == torch.int32 and packed.tolist() == [[-16678785, 130]]
    assert unpack_ue8m0(packed).tolist() == [[127, 128, 1, 255, 130, 0, 0, 0]]
    assert pack_ue8m0(torch.tensor([1, 2, 3, 4], dtype=torch.int64)).tolist() == [0x04030201]


def test_pack_ue8m0_rejects_out_of_range():
    with pytest.raises(ValueError, match="exponent_bytes"):
        pack_ue8m0(torch.tensor([256]))
    with pytest.raises(TypeError, match="exponent_bytes"):
        pack_ue8m0(torch.tensor([1.0]))
    with pytest.raises(TypeError, match="packed"):
        unpack_ue8m0(torch.tensor([1], dtype=torch.int64))


def test_ue8m0_decodes_powers_of_two():
    assert ue8m0_to_float(torch.tensor([127, 128, 126, 117, 137], dtype=torch.uint8)).tolist() == \
        [1.0, 2.0, 0.5, 2.0**-10, 2.0**10]


def test_cast_back_ue8m0_scales():
    q = torch.full((1, 1024), 3.0).to(torch.float8_e4m3fn)  # 8 groups -> 2 int32 words
    exponents = torch.tensor([[127, 128, 126, 129, 125, 127, 130, 120]], dtype=torch.uint8)
    back = per_token_cast_back(q, pack_ue8m0(exponents))
    expected = 3.0 * torch.tensor([1, 2, 0.5, 4, 0.25, 1, 8, 2.0**-7]).repeat_interleave(128)
    assert torch.equal(back, expected.to(torch.bfloat16).unsqueeze(0))


def test_cast_back_checks_scales():
    q = torch.zeros(2, 256, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="groups"):
        per_token_cast_back(q, torch.ones(2, 3))
    with pytest.raises(TypeError, match="scales"):
        per_token_cast_back(q, torch.ones(2, 2, dtype=torch.float64))


def test_calc_diff_known_values():
    x = torch.randn(100)
    assert calc_diff(x, x) == pytest.approx(0.0, abs=1e-12)
    # x + 1 = 1 and y + 1 = 2: 1 - 2 * 2 / (1 + 4) = 0.2
    assert calc_diff(torch.zeros(1), torch.ones(1)) == pytest.approx(0.2)
    # opposite shifted vectors: 1 - 2 * (-|a|^2) / (2 |a|^2) = 2
    assert calc_diff(x, -x - 2) == pytest.approx(2.0)
