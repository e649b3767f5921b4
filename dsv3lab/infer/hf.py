"""Everything named the Hugging Face way, in one place: ``config.json`` <-> :class:`ModelConfig`, and the bridge to
transformers' ``DeepseekV3ForCausalLM`` (the reference for parity tests and speed comparisons).

Tensor names of the official checkpoint layout are in :mod:`dsv3lab.infer.layout`; files are read and written by
:mod:`dsv3lab.infer.checkpoint`. transformers itself is optional (the ``hf`` extra) and imported only on use.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..config import ModelConfig, load_json
from ..model import DeepSeekV3
from .layout import layout

# ---------------------------------------------------------------------- config.json
# ModelConfig fields the HF config cannot carry: written under "dsv3lab" in config.json and restored on load
DSV3LAB_ONLY = (
    "attn_impl",
    "moe_impl",
    "mtp_lambda",
    "aux_loss_alpha",
    "seq_aux_loss_alpha",
    "init_std",
    "max_batch_size",
    "name",
)


# dsv3lab field -> the config.json key it is read from (for error messages)
HF_KEYS = {
    "vocab_size": "vocab_size",
    "dim": "hidden_size",
    "inter_dim": "intermediate_size",
    "moe_inter_dim": "moe_intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_dense_layers": "first_k_dense_replace",
    "n_heads": "num_attention_heads",
    "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts",
    "n_activated_experts": "num_experts_per_tok",
    "n_expert_groups": "n_group",
    "n_limited_groups": "topk_group",
    "route_scale": "routed_scaling_factor",
    "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim",
    "rope_theta": "rope_theta",
    "norm_eps": "rms_norm_eps",
    "n_mtp": "num_nextn_predict_layers",
    "max_seq_len": "max_position_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
}


def _req(hf: dict[str, Any], key: str) -> Any:
    if key not in hf:
        raise ValueError(f"config.json has no {key!r}, which a DeepSeek-V3 config needs")
    return hf[key]


def _num(hf: dict[str, Any], key: str, default: float) -> float:
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    return float(value)


def config_from_hf(path_or_dict: str | os.PathLike | dict[str, Any], **overrides: Any) -> ModelConfig:
    """Map a Hugging Face DeepSeek-V3 ``config.json`` (a path, a folder holding one, or a dict) to a ModelConfig.

    Reads YaRN from ``rope_scaling`` (the official file) or ``rope_parameters`` (newer transformers), and the
    dsv3lab-only fields from the ``"dsv3lab"`` section (:data:`DSV3LAB_ONLY`); ``overrides`` come last. Settings
    that dsv3lab's model cannot represent raise ``ValueError`` instead of being silently ignored.
    """
    hf = load_json(path_or_dict)
    extra = hf.pop("dsv3lab", None) or {}
    if not isinstance(extra, dict):
        raise ValueError(f'the "dsv3lab" section must be an object of dsv3lab-only fields, got {extra!r}')
    unknown = sorted(set(extra) - set(DSV3LAB_ONLY))
    if unknown:
        raise ValueError(f'unknown key(s) {unknown} in the "dsv3lab" section; allowed: {", ".join(DSV3LAB_ONLY)}')
    overrides = {**extra, **overrides}
    arch = hf.get("architectures") or ["DeepseekV3ForCausalLM"]
    model_type = hf.get("model_type", "deepseek_v3")
    if model_type not in ("deepseek_v3", "deepseek_v2") or not any("Deepseek" in a for a in arch):
        raise ValueError(
            f"unsupported architecture {arch} / model_type {model_type!r}: dsv3lab reads "
            "DeepseekV3ForCausalLM (and DeepseekV2ForCausalLM) configs"
        )
    if hf.get("attention_bias", False):
        raise ValueError("attention_bias=true is not supported: DeepSeek-V3's projections have no bias")
    if hf.get("tie_word_embeddings", False):
        raise ValueError("tie_word_embeddings=true is not supported: DeepSeek-V3 has a separate output head")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act must be 'silu' (SwiGLU), got {hf['hidden_act']!r}")
    n_kv = hf.get("num_key_value_heads", _req(hf, "num_attention_heads"))
    if n_kv != hf["num_attention_heads"]:
        raise ValueError(
            f"num_key_value_heads ({n_kv}) must equal num_attention_heads "
            f"({hf['num_attention_heads']}): MLA has no grouped K/V heads"
        )
    if hf.get("moe_layer_freq", 1) != 1:
        raise ValueError(f"moe_layer_freq must be 1, got {hf['moe_layer_freq']}")
    score_func = hf.get("scoring_func", "sigmoid" if model_type == "deepseek_v3" else "softmax")
    norm_topk = hf.get("norm_topk_prob", score_func == "sigmoid")
    if bool(norm_topk) != (score_func == "sigmoid"):
        raise ValueError(
            f"norm_topk_prob={norm_topk} with scoring_func={score_func!r} is not supported: "
            "dsv3lab normalises the top-k gate weights exactly when scoring with sigmoid (official)"
        )
    topk_method = hf.get("topk_method", "noaux_tc" if model_type == "deepseek_v3" else "greedy")
    q_lora = hf.get("q_lora_rank")
    d: dict[str, Any] = dict(
        vocab_size=_req(hf, "vocab_size"),
        dim=_req(hf, "hidden_size"),
        inter_dim=_req(hf, "intermediate_size"),
        moe_inter_dim=_req(hf, "moe_intermediate_size"),
        n_layers=_req(hf, "num_hidden_layers"),
        n_dense_layers=hf.get("first_k_dense_replace", 0),
        n_heads=_req(hf, "num_attention_heads"),
        n_routed_experts=hf.get("n_routed_experts") or 0,
        n_shared_experts=hf.get("n_shared_experts") or 0,
        n_activated_experts=hf.get("num_experts_per_tok") or 0,
        n_expert_groups=hf.get("n_group") or 1,
        n_limited_groups=hf.get("topk_group") or 1,
        score_func=score_func,
        route_scale=_num(hf, "routed_scaling_factor", 1.0),
        q_lora_rank=q_lora or 0,
        kv_lora_rank=_req(hf, "kv_lora_rank"),
        qk_nope_head_dim=_req(hf, "qk_nope_head_dim"),
        qk_rope_head_dim=_req(hf, "qk_rope_head_dim"),
        v_head_dim=_req(hf, "v_head_dim"),
        rope_theta=_num(hf, "rope_theta", 10000.0),
        norm_eps=_num(hf, "rms_norm_eps", 1e-6),
        n_mtp=hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0,
        gate_bias=topk_method == "noaux_tc",
        bos_token_id=hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 0,
        eos_token_id=_first(hf.get("eos_token_id"), 1),
        name=hf.get("_name_or_path") or "hf",
    )
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"rope_scaling must be an object (or null), got {rope!r}")
    rope_type = rope.get("type", rope.get("rope_type", "default"))
    if "rope_theta" in rope:
        d["rope_theta"] = _num(rope, "rope_theta", 10000.0)
    max_pos = hf.get("max_position_embeddings", 4096)
    if rope_type == "yarn":
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        if m is None or m_all is None or float(m) != float(m_all):
            raise ValueError(
                f"YaRN with mscale={m} and mscale_all_dim={m_all} is not supported: dsv3lab (like "
                "the official code) scales only the softmax and needs both given and equal"
            )
        d.update(
            max_seq_len=max_pos,
            original_seq_len=_req(rope, "original_max_position_embeddings"),
            rope_factor=_num(rope, "factor", _req(rope, "factor")),
            beta_fast=rope.get("beta_fast", 32),
            beta_slow=rope.get("beta_slow", 1),
            mscale=float(m_all),
        )
        if max_pos <= d["original_seq_len"]:
            raise ValueError("rope_scaling type yarn needs max_position_embeddings > original_max_position_embeddings")
    elif rope_type == "linear":  # position interpolation: every frequency / factor, no softmax correction
        factor = float(rope["factor"])
        original = rope.get("original_max_position_embeddings") or max(1, round(max_pos / factor))
        d.update(max_seq_len=max_pos, original_seq_len=original, rope_factor=factor, rope_type="linear")
        if max_pos <= original:
            raise ValueError("rope_scaling type linear needs max_position_embeddings > the original context")
    elif rope_type in ("default", None):
        d.update(max_seq_len=max_pos, original_seq_len=max_pos, rope_factor=1.0)
    else:
        raise ValueError(f"rope type {rope_type!r} is not supported; allowed: 'yarn', 'linear' or none")
    d.update(overrides)
    try:
        return ModelConfig.from_dict(d)
    except ValueError as err:  # name the config.json key, not only dsv3lab's field
        field = str(err).split(" ", 1)[0]
        key = HF_KEYS.get(field)
        raise ValueError(f"{key} ({err})" if key and key not in overrides else str(err)) from None


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict (DeepseekV3ForCausalLM) for ``cfg``, with the dsv3lab-only fields under
    ``"dsv3lab"`` (other readers ignore the section)."""
    if cfg.gate_bias:
        topk_method = "noaux_tc"
    else:
        topk_method = "group_limited_greedy" if cfg.n_expert_groups > 1 else "greedy"
    hf: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": cfg.moe_inter_dim,
        "num_hidden_layers": cfg.n_layers,
        "first_k_dense_replace": cfg.n_dense_layers,
        "moe_layer_freq": 1,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.n_activated_experts,
        "n_group": cfg.n_expert_groups,
        "topk_group": cfg.n_limited_groups,
        "topk_method": topk_method,
        "scoring_func": cfg.score_func,
        "norm_topk_prob": cfg.score_func == "sigmoid",
        "routed_scaling_factor": cfg.route_scale,
        "q_lora_rank": cfg.q_lora_rank or None,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_interleave": True,
        "max_position_embeddings": cfg.max_seq_len,
        "num_nextn_predict_layers": cfg.n_mtp,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        "aux_loss_alpha": cfg.seq_aux_loss_alpha or cfg.aux_loss_alpha,
        "seq_aux": bool(cfg.seq_aux_loss_alpha),
        "ep_size": 1,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }
    if cfg.rope_scaled and cfg.rope_type == "linear":
        hf["rope_scaling"] = {
            "type": "linear",
            "rope_type": "linear",
            "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.original_seq_len,
        }
    elif cfg.yarn_enabled:
        hf["rope_scaling"] = {
            "type": "yarn",
            "rope_type": "yarn",
            "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.original_seq_len,
            "beta_fast": cfg.beta_fast,
            "beta_slow": cfg.beta_slow,
            "mscale": cfg.mscale,
            "mscale_all_dim": cfg.mscale,
        }
    else:
        hf["rope_scaling"] = None
    hf["dsv3lab"] = {k: getattr(cfg, k) for k in DSV3LAB_ONLY}
    return hf


def _first(value: Any, default: Any) -> Any:
    if value is None:
        return default
    if isinstance(value, (list, tuple)):
        return value[0] if value else default
    return value


# ---------------------------------------------------------------------- transformers
def transformers_config(cfg_hf: dict[str, Any]):
    """A ``DeepseekV3Config`` from our :func:`config_to_hf` dict (YaRN passed as ``rope_parameters``)."""
    from transformers import DeepseekV3Config  # transformers: the optional `hf` extra, imported on use

    hf = {k: v for k, v in cfg_hf.items() if k != "dsv3lab"}
    rope = hf.pop("rope_scaling", None)
    known = getattr(DeepseekV3Config, "__dataclass_fields__", None)
    kwargs = {k: v for k, v in hf.items() if known is None or k in known}
    kwargs["rope_parameters"] = dict(rope, rope_theta=hf["rope_theta"]) if rope else None
    return DeepseekV3Config(**kwargs)


def to_transformers(model: DeepSeekV3, attn_implementation: str = "sdpa"):
    """A transformers ``DeepseekV3ForCausalLM`` holding copies of ``model``'s main weights (MTP is not supported
    by transformers' model and is left out).

    The state dict is built from the same :func:`~dsv3lab.infer.layout.layout` as the checkpoint files, then the
    per-expert tensors are fused into transformers' in-memory layout (``experts.gate_up_proj`` [E, 2I, D] and
    ``experts.down_proj`` [E, D, I]), as its own checkpoint loader does."""
    from transformers import DeepseekV3ForCausalLM  # transformers: the optional `hf` extra, imported on use

    cfg = model.cfg
    config = transformers_config(config_to_hf(cfg))
    config._attn_implementation = attn_implementation
    with torch.device(model.embed.weight.device):
        hf = DeepseekV3ForCausalLM(config)
    own = model.state_dict()
    sd: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], list[torch.Tensor]] = {}  # (layer prefix, gate|up|down) -> per-expert matrices
    for name, slot in layout(cfg, mtp=False).items():
        t = own[slot.name] if slot.index is None else own[slot.name][slot.index]
        if slot.index is None:
            sd[name] = t
            continue
        prefix, rest = name.split(".mlp.experts.")  # "model.layers.{i}", "{j}.{gate,up,down}_proj.weight"
        experts.setdefault((prefix, rest.split(".")[1]), []).append(t)
    for prefix in {p for p, _ in experts}:
        gate, up, down = (torch.stack(experts[(prefix, k)]) for k in ("gate_proj", "up_proj", "down_proj"))
        sd[f"{prefix}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)  # [E, 2I, D]
        sd[f"{prefix}.mlp.experts.down_proj"] = down  # [E, D, I]
    hf.load_state_dict(sd, strict=True)  # copies
    return hf.to(model.embed.weight.dtype).eval()
