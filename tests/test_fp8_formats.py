"""FP8 formats: facts derived from torch agree with the OCP FP8 spec; rounding is nearest-even on the grid."""

import math

import pytest
import torch

from dsv3lab.fp8.formats import fp8_format, fp8_grid, is_representable, resolve_dtype, round_to_fp8

# The OCP 8-bit floating point spec (E4M3 "fn" and E5M2), written down independently of the code under test.
SPEC = {
    "e4m3": dict(
        exponent_bits=4,
        mantissa_bits=3,
        bias=7,
        max=448.0,
        min_normal=2.0**-6,
        min_subnormal=2.0**-9,
        has_inf=False,
        n_unique=253,
    ),  # 256 patterns − 2 NaN (±0x7F) − (−0 duplicate)
    "e5m2": dict(
        exponent_bits=5,
        mantissa_bits=2,
        bias=15,
        max=57344.0,
        min_normal=2.0**-14,
        min_subnormal=2.0**-16,
        has_inf=True,
        n_unique=247,
    ),  # 256 − 6 NaN − 2 inf − (−0)
}


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_facts_match_the_spec(name):
    fmt = fp8_format(name)
    for key, value in SPEC[name].items():
        if key != "n_unique":
            assert getattr(fmt, key) == value, key
    grid = fp8_grid(name)
    assert grid.numel() == SPEC[name]["n_unique"]
    assert grid.max().item() == fmt.max and grid.min().item() == -fmt.max
    assert fp8_grid(name, positive=True).min().item() == fmt.min_subnormal
    # normal values: m mantissa bits => 2^m values per binade; the biggest is (2 - 2^-m) * 2^emax except E4M3's
    # top binade, which gives its last pattern to NaN
    assert fmt.max_rel_error == 2.0 ** -(fmt.mantissa_bits + 1)


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_grid_spacing_per_binade(name):
    fmt = fp8_format(name)
    grid = fp8_grid(name, positive=True).double()
    normal = grid[grid >= fmt.min_normal]
    gaps = normal[1:] - normal[:-1]
    expected = fmt.spacing(normal[:-1])
    assert torch.equal(gaps, expected)
    sub = grid[grid < fmt.min_normal]  # subnormals: evenly spaced by the smallest subnormal
    assert torch.allclose(torch.diff(sub), torch.full_like(sub[1:], fmt.min_subnormal))


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_round_to_nearest_even_at_every_grid_midpoint(name):
    grid = fp8_grid(name).double()
    lo, hi = grid[:-1], grid[1:]
    mid = (lo + hi) / 2  # exactly representable in fp32 for these grids
    out = round_to_fp8(mid.float(), name).double()
    # ties go to the neighbour whose last mantissa bit is 0 (even bit pattern)
    lo_bits = lo.float().to(resolve_dtype(name)).view(torch.uint8).int()
    even_is_lo = (lo_bits % 2 == 0) | (lo == 0)
    expected = torch.where(even_is_lo, lo, hi)
    assert torch.equal(out, expected)
    # just off the midpoint rounds to the nearer neighbour
    eps = (hi - lo) * 1e-3
    assert torch.equal(round_to_fp8((mid - eps).float(), name).double(), lo)
    assert torch.equal(round_to_fp8((mid + eps).float(), name).double(), hi)


def test_carry_into_the_exponent_rounds_up_a_binade():
    # the values the Triton interpreter gets wrong: mantissa rounding that carries into the exponent
    x = torch.tensor([126.2, 127.9, 15.9, -126.2, 0.0155, 240.5])
    assert round_to_fp8(x, "e4m3").tolist() == [128.0, 128.0, 16.0, -128.0, 0.015625, 240.0]


def test_cast_saturates_e4m3_and_overflows_e5m2():
    # what torch does beyond the range (why dsv3lab's quantizers refuse non-finite input instead)
    x = torch.tensor([500.0, 1e6, math.inf, -math.inf])
    assert round_to_fp8(x, "e4m3").tolist() == [448.0, 448.0, 448.0, -448.0]
    assert round_to_fp8(torch.tensor([1e6, math.inf]), "e5m2").isinf().all()


def test_is_representable():
    grid = fp8_grid("e4m3")
    assert is_representable(grid).all()
    assert not is_representable(torch.tensor([126.2, 449.0, 1e-4, math.nan, math.inf])).any()


def test_bad_format_names():
    with pytest.raises(ValueError, match="unknown FP8 format 'e3m4'.*e4m3, e5m2"):
        fp8_format("e3m4")
    with pytest.raises(ValueError, match="expected an FP8 dtype"):
        fp8_format(torch.float16)


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_vectorised_rounding_equals_torchs_cast_bit_for_bit(name):
    from dsv3lab.fp8.formats import round_to_grid

    fmt = fp8_format(name)
    grid = fp8_grid(name).double()
    mids = (grid[:-1] + grid[1:]) / 2
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(100_000, generator=g, dtype=torch.float64) * torch.exp2(
        torch.randint(-24, 16, (100_000,), generator=g).double()
    )
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 126.2, 127.9, 15.9, 464.0, 465.0, -470.0])
    x = torch.cat([grid, mids, mids * (1 + 1e-6), mids * (1 - 1e-6), rand, special.double()]).float()
    x = x[x.abs() <= fmt.max * 1.03]  # within the range, plus the saturating band above max
    ours = round_to_grid(x, name)
    ref = x.to(fmt.dtype).float()
    if name == "e5m2":  # torch overflows E5M2 to inf above max; round_to_grid saturates (documented)
        ref = ref.clamp(-fmt.max, fmt.max)
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))  # bit for bit, signed zeros included
