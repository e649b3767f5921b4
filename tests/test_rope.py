import math

import pytest
import torch

from dsv3lab import ModelConfig
from dsv3lab.infer.hf import config_to_hf
from dsv3lab.model.rope import apply_rope, precompute_rope, rope_frequencies, yarn_correction_range


def test_yarn_reference_numbers_671b():
    cfg = ModelConfig.preset("671B")
    assert yarn_correction_range(cfg) == (10, 23)
    assert cfg.softmax_scale == pytest.approx(0.135234, abs=1e-6)
    m = 0.1 * math.log(40) + 1
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * m * m)
    freqs = rope_frequencies(cfg)
    base = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    torch.testing.assert_close(freqs[:11], base[:11])  # index <= low keeps its frequency
    torch.testing.assert_close(freqs[23:], base[23:] / 40)  # index >= high is divided by s
    assert ((freqs[11:23] < base[11:23]) & (freqs[11:23] > base[11:23] / 40)).all()  # blended in between


def test_yarn_matches_transformers():
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ModelConfig.preset("671B", max_seq_len=163840)
    hf = DeepseekV3Config(
        rope_parameters=dict(config_to_hf(cfg)["rope_scaling"], rope_theta=10000.0), max_position_embeddings=163840
    )
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    torch.testing.assert_close(rope_frequencies(cfg), inv_freq.float())
    assert attention_factor == pytest.approx(1.0)  # mscale == mscale_all_dim: cos/sin are not scaled


def test_no_yarn_without_longer_context():
    cfg = ModelConfig.preset("toy")
    assert not cfg.yarn_enabled
    assert cfg.softmax_scale == pytest.approx(cfg.qk_head_dim**-0.5)


def test_apply_rope_equals_complex_multiplication():
    """The official code rotates adjacent pairs as complex numbers: (x0 + i x1) · e^{i m θ}."""
    cfg = ModelConfig.preset("tiny")
    cos, sin = precompute_rope(cfg)
    x = torch.randn(2, 10, 3, cfg.qk_rope_head_dim)
    ours = apply_rope(x, cos[:10], sin[:10])
    freqs_cis = torch.polar(torch.ones_like(cos[:10]), torch.atan2(sin[:10], cos[:10]))  # [s, d/2]
    xc = torch.view_as_complex(x.float().reshape(2, 10, 3, -1, 2))
    ref = torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)
    torch.testing.assert_close(ours, ref)
    # a rotation preserves norms, and relative positions are all that queries·keys see
    torch.testing.assert_close(ours.norm(dim=-1), x.norm(dim=-1))


def test_position_interpolation_by_hand():
    """rope_type="linear": every frequency divided by s, i.e. position m rotates as m / s did before; the softmax
    scale keeps 1/sqrt(d_h + d_h^R) (no √t term). Checked against math written out for each pair."""
    cfg = ModelConfig.preset("tiny", rope_type="linear")  # tiny: d_h^R = 8, original 64, max 256, s = 4
    assert cfg.rope_scaled and not cfg.yarn_enabled
    d, s = cfg.qk_rope_head_dim, cfg.rope_factor
    by_hand = torch.tensor([1.0 / 10000 ** (2 * i / d) / s for i in range(d // 2)])
    torch.testing.assert_close(rope_frequencies(cfg), by_hand)
    cos, sin = precompute_rope(cfg)
    for m in (0, 1, 63, 200, 255):
        angles = torch.tensor([(m / s) * 10000 ** (-2 * i / d) for i in range(d // 2)])
        torch.testing.assert_close(cos[m], angles.cos(), atol=1e-5, rtol=0)
        torch.testing.assert_close(sin[m], angles.sin(), atol=1e-5, rtol=0)
    assert cfg.softmax_scale == pytest.approx(cfg.qk_head_dim**-0.5)
    # the same config as YaRN differs: the highest frequency is kept, and the softmax gains mscale^2
    yarn = cfg.replace(rope_type="yarn")
    assert rope_frequencies(yarn)[0] == pytest.approx(1.0) and rope_frequencies(cfg)[0] == pytest.approx(1 / s)
    assert yarn.softmax_scale == pytest.approx(cfg.qk_head_dim**-0.5 * (0.1 * math.log(s) + 1) ** 2)


def test_position_interpolation_matches_transformers_and_round_trips():
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from dsv3lab.infer.hf import config_from_hf

    cfg = ModelConfig.preset("tiny", rope_type="linear")
    hf = config_to_hf(cfg)
    assert hf["rope_scaling"]["type"] == "linear" and hf["rope_scaling"]["factor"] == cfg.rope_factor
    back = config_from_hf(hf)
    assert (back.rope_type, back.rope_factor, back.original_seq_len, back.max_seq_len) == ("linear", 4.0, 64, 256)
    ref = DeepseekV3Config(
        rope_parameters=dict(hf["rope_scaling"], rope_theta=cfg.rope_theta),
        max_position_embeddings=cfg.max_seq_len,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
    )
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["linear"](ref, "cpu")
    torch.testing.assert_close(rope_frequencies(cfg), inv_freq.float())
    assert attention_factor == pytest.approx(1.0)


def test_rope_type_is_off_without_a_longer_context():
    """The type only matters when the context is extended: at max_seq_len == original_seq_len both are plain RoPE."""
    a = ModelConfig.preset("tiny", max_seq_len=64, rope_type="linear")
    b = ModelConfig.preset("tiny", max_seq_len=64)
    assert not a.rope_scaled and not b.rope_scaled
    torch.testing.assert_close(rope_frequencies(a), rope_frequencies(b))
    with pytest.raises(ValueError, match="rope_type must be one of"):
        ModelConfig.preset("tiny", rope_type="ntk")
