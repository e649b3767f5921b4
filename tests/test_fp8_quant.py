"""Fine-grained quantization: shapes, padding, error bounds per format and granularity, UE8M0, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from dsv3lab import ModelConfig
from dsv3lab.fp8 import fp8_format
from dsv3lab.fp8.linear import FP8Recipe
from dsv3lab.fp8.quant import (
    BLOCK2D,
    TILE,
    fake_quantize,
    outlier_scaling_demo,
    pow2_ceil,
    quant_error,
    quantize,
    tiles_on_grid,
)

GRANULARITIES = [None, TILE, BLOCK2D, (128, 1)]


def _x(shape=(300, 260), seed=0, spread=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if spread:  # magnitudes over many binades, so subnormals and every exponent are exercised
        x = x * torch.exp2(torch.randint(-8, 8, shape, generator=g).float())
    return x


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("block", GRANULARITIES, ids=str)
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_elementwise_error_is_at_most_half_a_grid_step(fmt, block, scale_fmt):
    x = _x()
    q = quantize(x, block, fmt, scale_fmt)
    info = fp8_format(fmt)
    s = q.expanded_scale().double()
    y = x.double() / s  # the value that was rounded
    assert y.abs().max() <= info.max * (1 + 1e-6)
    half_step = info.spacing(y) / 2  # grid spacing at |y| (subnormal spacing below the normal range)
    err = (q.data.double() - y).abs()
    assert (err <= half_step * (1 + 1e-9)).all()
    # and in relative terms, in the normal range: at most 2^-(m+1)
    normal = y.abs() >= info.min_normal
    assert ((err / y.abs())[normal] <= info.max_rel_error * (1 + 1e-6)).all()
    # the largest |x| of every group lands on (or within one rounding of) the top of the format
    assert q.data.float().abs().max() <= info.max


@pytest.mark.parametrize("block", GRANULARITIES, ids=str)
def test_typical_relative_error_per_format(block):
    x = _x(spread=False)
    e4 = quant_error(x, fake_quantize(x, block, "e4m3"))["rel_error"]
    e5 = quant_error(x, fake_quantize(x, block, "e5m2"))["rel_error"]
    # RMS rounding error of a uniform grid step 2^-m relative: ~2^-m / sqrt(12) relative to values in [1, 2)
    assert 0.015 < e4 < 0.04 and 0.03 < e5 < 0.08 and e5 > 1.7 * e4


def test_scale_shapes_padding_and_cropping():
    x = _x((300, 260))
    q = quantize(x, TILE)
    assert q.data.shape == x.shape and q.data.dtype == torch.float8_e4m3fn
    assert q.scale.shape == (300, 3) and q.scale.dtype == torch.float32
    w = quantize(x, BLOCK2D)
    assert w.scale.shape == (3, 3)  # ceil(300/128) x ceil(260/128), like the official weight_scale_inv
    # zero-padding to full blocks changes nothing: quantizing the padded tensor gives the same values and scales
    padded = F.pad(x, (0, 384 - 260, 0, 384 - 300))
    wp = quantize(padded, BLOCK2D)
    assert torch.equal(wp.scale, w.scale)
    assert torch.equal(wp.data[:300, :260].float(), w.data.float())
    assert torch.equal(wp.data[300:].float(), torch.zeros(84, 384))
    # the scale of each block is its amax / 448, computed by hand for the corner block
    corner = x[256:, 256:]
    assert w.scale[2, 2].item() == pytest.approx(corner.abs().max().item() / 448, rel=1e-7)
    # leading dims are batch dims: a [E, out, in] expert stack is quantized per expert
    stack = torch.stack([x, 2 * x])
    qs = quantize(stack, BLOCK2D)
    assert qs.scale.shape == (2, 3, 3) and torch.allclose(qs.scale[1], 2 * w.scale)


def test_per_tensor_scale_and_tile_independence():
    x = _x(spread=False)
    x[5, 7] = 1000.0  # an outlier
    q = quantize(x, None)
    assert q.scale.shape == () and q.scale.item() == pytest.approx(1000 / 448, rel=1e-7)
    t = quantize(x, TILE)
    assert t.scale[5, 0].item() == pytest.approx(1000 / 448, rel=1e-7)
    assert t.scale[5, 1].item() < 0.02 and t.scale[4, 0].item() < 0.02  # other tiles untouched by it


def test_ue8m0_scales_are_powers_of_two_not_below_amax_over_max():
    x = _x()
    q = quantize(x, TILE, scale_fmt="ue8m0")
    ref = quantize(x, TILE)
    mant, _ = torch.frexp(q.scale)
    assert (mant == 0.5).all()
    assert (q.scale >= ref.scale).all() and (q.scale < 2 * ref.scale).all()
    s = torch.tensor([1.0, 0.75, 2**-20, 3 * 2**10, 2.0**40 * (1 + 2**-23)])
    assert pow2_ceil(s).tolist() == [1.0, 1.0, 2**-20, 2.0**12, 2.0**41]


def test_zero_tiles_and_empty_tensors():
    x = torch.zeros(3, 256)
    q = quantize(x, TILE)
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
    assert torch.equal(q.dequantize(), x)
    e = quantize(torch.zeros(0, 256), TILE)
    assert e.data.shape == (0, 256) and e.scale.shape == (0, 2)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_is_an_error(bad):
    x = torch.ones(4, 256)
    x[2, 130] = bad
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\) \(first at index \(2, 130\)"):
        quantize(x, TILE)


def test_bad_arguments():
    with pytest.raises(ValueError, match="block must be"):
        quantize(torch.ones(4, 4), (0, 128))
    with pytest.raises(ValueError, match="last two dimensions"):
        quantize(torch.ones(256), TILE)
    with pytest.raises(ValueError, match="scale_fmt must be one of"):
        quantize(torch.ones(4, 128), TILE, scale_fmt="e8m0")
    with pytest.raises(ValueError, match="unknown FP8 format"):
        quantize(torch.ones(4, 128), TILE, fmt="fp8")


def test_tiles_on_grid_detects_quantized_operands_and_only_them():
    x = _x(spread=False)
    for block in (TILE, BLOCK2D, (128, 1)):
        q = quantize(x, block)
        assert tiles_on_grid(q.dequantize(), block, scale=q.scale)
        assert not tiles_on_grid(x, block, scale=q.scale)
        p = quantize(x, block, scale_fmt="ue8m0")
        assert tiles_on_grid(p.dequantize(), block)  # scale found without being told
    # 1×128 tiles are not 128×128 blocks: a tile-quantized matrix is not on a block grid
    assert not tiles_on_grid(quantize(x, TILE, scale_fmt="ue8m0").dequantize(), BLOCK2D)


def test_fine_grained_scaling_beats_per_tensor_with_outliers():
    df = outlier_scaling_demo(magnitudes=(1, 1e5), tokens=128, channels=1024).set_index(["magnitude", "granularity"])
    typical, flushed = df["rel_error_typical"], df["flushed_to_zero"]
    # no outliers: every granularity has the plain E4M3 rounding error (~2.6%), nothing flushed
    assert typical.loc[1.0].between(0.02, 0.03).all() and (flushed.loc[1.0] == 0).all()
    # 10^5× outlier channels: one scale per tensor pushes ordinary values into subnormals/zero; 1×128 tiles only
    # hurt the tiles that hold an outlier
    assert typical.loc[(1e5, "per tensor")] > 2.5 * typical.loc[(1e5, "1×128 tile")]
    assert flushed.loc[(1e5, "per tensor")] > 4 * flushed.loc[(1e5, "1×128 tile")]
    assert typical.loc[(1e5, "per token (1×K)")] > typical.loc[(1e5, "1×128 tile")]


def test_block_quantization_equals_the_checkpoint_path():
    """Two implementations of the 128×128 weight format agree: dsv3lab.fp8 (training) and dsv3lab.infer.blockfp8
    (the official checkpoint's weight_scale_inv), bit for bit, edge blocks included."""
    from dsv3lab.infer import blockfp8

    w = _x((300, 200), seed=5)
    ours = quantize(w, BLOCK2D)
    data, scale_inv = blockfp8.quantize_blocks(w)
    assert torch.equal(ours.scale, scale_inv)
    assert torch.equal(ours.data.view(torch.uint8), data.view(torch.uint8))
    back = blockfp8.dequantize_blocks(data, scale_inv, dtype=torch.float32)
    assert torch.equal(back, ours.dequantize())


def test_scale_format_has_one_vocabulary():
    """Scales are "fp32" or "ue8m0" everywhere (ModelConfig.fp8_scale_fmt, quantize, FP8Recipe, the kernels);
    None, the old spelling of "fp32", still works with a DeprecationWarning."""
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    with pytest.warns(DeprecationWarning, match='scale_fmt="fp32"'):
        old = quantize(x, TILE, scale_fmt=None)
    torch.testing.assert_close(old.scale, quantize(x, TILE, scale_fmt="fp32").scale, rtol=0, atol=0)
    assert FP8Recipe.from_config(ModelConfig.preset("tiny", fp8=True)).scale_fmt == "fp32"
