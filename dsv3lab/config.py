"""ModelConfig: one dataclass for every DeepSeek-V3 size, from a unit-test toy to the full 671B model.

Field names follow the official inference code's ``ModelArgs`` (``dim``, ``n_routed_experts``, ``kv_lora_rank`` …) so
that a config read from ``inference/configs/config_671B.json`` drops in unchanged. The few behaviour switches the
official code hides in module globals or in a ``dim == 7168`` check are explicit fields here:

* ``attn_impl``   ``"naive"`` (per-head K/V, the training/prefill form) or ``"absorb"`` (latent cache, the decode form)
* ``moe_impl``    ``"loop"`` (readable per-expert loop) or ``"grouped"`` (one grouped GEMM over tokens sorted by expert)
* ``gate_bias``   the auxiliary-loss-free selection bias (V3) on or off (V2)
* ``n_mtp``       multi-token-prediction depth D (0 = no MTP modules)
* ``init_std``    the paper's 0.006
* ``fp8``         the FP8 training recipe (§3.3): the projections' GEMMs in FP8 with fine-grained scaling
  (``fp8_gemm``: ``auto``/``emulate``/``kernel``; ``fp8_scale_fmt``: ``fp32``/``ue8m0``)

Presets: ``ModelConfig.preset(name)`` for ``tiny`` (unit tests), ``toy`` (notebooks and ablations on a laptop CPU),
``small`` (~200M, a GPU or a patient CPU), and the exact official ``16B``, ``236B`` and ``671B``.

Paper: DeepSeek-V3 Technical Report §4.2 (hyper-parameters). Notebook: 00_tour.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

SCORE_FUNCS = ("softmax", "sigmoid")
ATTN_IMPLS = ("naive", "absorb")
MOE_IMPLS = ("loop", "grouped")
FP8_GEMMS = ("auto", "emulate", "kernel")
FP8_SCALE_FMTS = ("fp32", "ue8m0")


@dataclass
class ModelConfig:
    """All architecture hyper-parameters of a DeepSeek-V3-style model.

    Defaults equal the official ``ModelArgs`` defaults (a DeepSeek-V2-Lite-sized model); use :meth:`preset`.
    """

    # --- sizes ---
    vocab_size: int = 102400
    dim: int = 2048  # d, the hidden size
    inter_dim: int = 10944  # width of the dense SwiGLU MLP (first n_dense_layers layers)
    moe_inter_dim: int = 1408  # width of one expert
    n_layers: int = 27
    n_dense_layers: int = 1  # the first layers use a dense MLP instead of MoE
    n_heads: int = 16  # n_h
    # --- MoE (§2.1.2) ---
    n_routed_experts: int = 64  # N_r
    n_shared_experts: int = 2  # N_s
    n_activated_experts: int = 6  # K_r
    n_expert_groups: int = 1  # groups for group-limited (node-limited) routing
    n_limited_groups: int = 1  # M: groups a token may route to
    score_func: str = "softmax"  # "sigmoid" (V3) or "softmax" (V2)
    route_scale: float = 1.0  # scaling of the routed output
    # --- MLA (§2.1.1) ---
    q_lora_rank: int = 0  # d_c'; 0 = plain query projection wq
    kv_lora_rank: int = 512  # d_c
    qk_nope_head_dim: int = 128  # d_h
    qk_rope_head_dim: int = 64  # d_h^R
    v_head_dim: int = 128
    # --- RoPE / YaRN (§4.3) ---
    max_seq_len: int = 16384
    original_seq_len: int = 4096  # YaRN is applied when max_seq_len > original_seq_len
    rope_theta: float = 10000.0
    rope_factor: float = 40.0  # s
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0  # softmax-scale correction: scale *= (0.1 * mscale * ln s + 1)^2
    norm_eps: float = 1e-6
    max_batch_size: int = 8  # default cache batch size for generation
    # --- dsv3lab switches (no switch lives anywhere else) ---
    n_mtp: int = 0  # D: multi-token-prediction depth (§2.2)
    mtp_lambda: float = 0.3  # λ: weight of the MTP loss, total = main + λ/D Σ_k L_k
    gate_bias: bool = False  # aux-loss-free selection bias (a buffer, never a Parameter)
    aux_loss_alpha: float = 0.0  # conventional expert-level (batch-wise) balance loss weight
    seq_aux_loss_alpha: float = 0.0  # complementary sequence-wise balance loss weight (paper α = 1e-4)
    attn_impl: str = "naive"
    moe_impl: str = "loop"
    init_std: float = 0.006
    # FP8 training (§3.3): projections (MLA, dense MLP, shared and routed experts, MTP eh_proj) run their Fprop,
    # Dgrad and Wgrad GEMMs in FP8 E4M3 with 1×128 / 128×128 scaling; embedding, head, router, norms, attention
    # core stay in high precision. State-dict names are unchanged.
    fp8: bool = False
    fp8_gemm: str = "auto"  # "emulate" (quantize → dequantize → FP32 GEMM), "kernel" (Triton), "auto"
    fp8_scale_fmt: str = "fp32"  # "fp32" scales or "ue8m0" (powers of two)
    bos_token_id: int = 0
    eos_token_id: int = 1
    # free-form notes carried with the config (e.g. which preset it came from); not used by the model
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head: non-positional part plus the decoupled RoPE part (128 + 64 = 192 for V3)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_expert_groups

    @property
    def yarn_enabled(self) -> bool:
        """YaRN is on when the model is meant for longer contexts than it was pre-trained on (official rule)."""
        return self.max_seq_len > self.original_seq_len and self.rope_factor > 1.0

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_h + d_h^R), times the YaRN mscale² when YaRN is on (0.135234 for V3)."""
        scale = self.qk_head_dim**-0.5
        if self.yarn_enabled:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale = scale * m * m
        return scale

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and what is allowed for every inconsistent combination."""
        positive = [
            "vocab_size",
            "dim",
            "inter_dim",
            "moe_inter_dim",
            "n_layers",
            "n_heads",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_seq_len",
            "original_seq_len",
            "n_expert_groups",
            "n_limited_groups",
            "max_batch_size",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in (
            "n_dense_layers",
            "n_routed_experts",
            "n_shared_experts",
            "n_activated_experts",
            "q_lora_rank",
            "n_mtp",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {self.score_func!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
        if not isinstance(self.fp8, bool):
            raise ValueError(f"fp8 must be a bool (true/false), got {self.fp8!r}")
        if self.fp8_gemm not in FP8_GEMMS:
            raise ValueError(f"fp8_gemm must be one of {FP8_GEMMS}, got {self.fp8_gemm!r}")
        if self.fp8_scale_fmt not in FP8_SCALE_FMTS:
            raise ValueError(f"fp8_scale_fmt must be one of {FP8_SCALE_FMTS}, got {self.fp8_scale_fmt!r}")
        if self.n_dense_layers > self.n_layers:
            raise ValueError(
                f"n_dense_layers ({self.n_dense_layers}) must be <= n_layers ({self.n_layers}): "
                "the first n_dense_layers layers use a dense MLP"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.n_moe_layers > 0 or self.n_mtp > 0:
            if self.n_routed_experts < 1:
                raise ValueError(
                    "n_routed_experts must be >= 1 when the model has MoE layers (n_dense_layers < "
                    f"n_layers or n_mtp > 0), got {self.n_routed_experts}"
                )
            if not 1 <= self.n_activated_experts <= self.n_routed_experts:
                raise ValueError(
                    f"n_activated_experts must be in [1, n_routed_experts={self.n_routed_experts}], "
                    f"got {self.n_activated_experts}"
                )
            if self.n_routed_experts % self.n_expert_groups:
                raise ValueError(
                    f"n_routed_experts ({self.n_routed_experts}) must be divisible into n_expert_groups "
                    f"({self.n_expert_groups}) equal groups"
                )
            if self.n_limited_groups > self.n_expert_groups:
                raise ValueError(
                    f"n_limited_groups ({self.n_limited_groups}) must be <= n_expert_groups ({self.n_expert_groups})"
                )
            kept = self.n_limited_groups * self.experts_per_group
            if kept < self.n_activated_experts:
                raise ValueError(
                    f"the kept groups hold n_limited_groups * experts_per_group = {kept} experts, fewer "
                    f"than n_activated_experts ({self.n_activated_experts}); raise n_limited_groups"
                )
            if self.n_expert_groups > 1 and self.gate_bias and self.experts_per_group < 2:
                raise ValueError(
                    "group scores are the sum of the top-2 scores of a group: each of the "
                    f"n_expert_groups ({self.n_expert_groups}) groups needs >= 2 experts"
                )
        if self.beta_fast <= self.beta_slow:
            raise ValueError(f"beta_fast ({self.beta_fast}) must be > beta_slow ({self.beta_slow})")
        if self.rope_factor < 1.0:
            raise ValueError(f"rope_factor must be >= 1, got {self.rope_factor}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")
        if self.mtp_lambda < 0 or self.aux_loss_alpha < 0 or self.seq_aux_loss_alpha < 0:
            raise ValueError("mtp_lambda, aux_loss_alpha and seq_aux_loss_alpha must be >= 0")
        if self.route_scale <= 0:
            raise ValueError(f"route_scale must be > 0, got {self.route_scale}")
        for name in ("bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name} must be in [0, vocab_size={self.vocab_size}), got {getattr(self, name)}")

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a dict of dsv3lab/official field names; an unknown key is an error listing close matches."""
        _check_keys(d, cls.field_names(), what="ModelConfig field")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated; unknown keys are errors)."""
        _check_keys(changes, self.field_names(), what="ModelConfig field")
        return dataclasses.replace(self, **changes)

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> ModelConfig:
        """Apply ``key=value`` strings (as from ``--set``) or a dict, parsing values by the field's type."""
        if isinstance(overrides, dict):
            return self.replace(**overrides)
        changes = {}
        types = {f.name: f.type for f in fields(self)}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"expected key=value, got {item!r}")
            key, value = item.split("=", 1)
            key = key.strip()
            _check_keys({key: None}, self.field_names(), what="ModelConfig field")
            changes[key] = parse_value(value, types[key])
        return self.replace(**changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """One of :data:`PRESETS` (``tiny``, ``toy``, ``small``, ``16B``, ``236B``, ``671B``), optionally changed."""
        if name not in PRESETS:
            close = difflib.get_close_matches(name, list(PRESETS), n=3, cutoff=0.3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"unknown preset {name!r}{hint}; the presets are: {', '.join(PRESETS)}")
        d = dict(PRESETS[name])
        _check_keys(overrides, cls.field_names(), what="ModelConfig field")
        d.update(overrides)
        d.setdefault("name", name)
        return cls(**d)

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_official(cls, path_or_dict: str | os.PathLike | dict[str, Any], **overrides: Any) -> ModelConfig:
        """Read an official ``inference/configs/config_*.json`` (ModelArgs names; ``dtype`` is ignored)."""
        d = _load_json(path_or_dict)
        d = {k: v for k, v in d.items() if k not in ("dtype", "scale_fmt")}
        d.update(overrides)
        return cls.from_dict(d)

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict[str, Any], **overrides: Any) -> ModelConfig:
        """Map a Hugging Face DeepSeek-V3 ``config.json`` (a path, a folder holding one, or a dict) to a ModelConfig.

        Reads YaRN from ``rope_scaling`` (the official file) or ``rope_parameters`` (newer transformers). Settings
        that dsv3lab's model cannot represent raise ``ValueError`` instead of being silently ignored.
        """
        hf = _load_json(path_or_dict)
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
        n_kv = hf.get("num_key_value_heads", hf["num_attention_heads"])
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
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            inter_dim=hf["intermediate_size"],
            moe_inter_dim=hf["moe_intermediate_size"],
            n_layers=hf["num_hidden_layers"],
            n_dense_layers=hf.get("first_k_dense_replace", 0),
            n_heads=hf["num_attention_heads"],
            n_routed_experts=hf.get("n_routed_experts") or 0,
            n_shared_experts=hf.get("n_shared_experts") or 0,
            n_activated_experts=hf.get("num_experts_per_tok") or 0,
            n_expert_groups=hf.get("n_group") or 1,
            n_limited_groups=hf.get("topk_group") or 1,
            score_func=score_func,
            route_scale=float(hf.get("routed_scaling_factor", 1.0)),
            q_lora_rank=q_lora or 0,
            kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"],
            qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            n_mtp=hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0,
            gate_bias=topk_method == "noaux_tc",
            bos_token_id=hf.get("bos_token_id") if hf.get("bos_token_id") is not None else 0,
            eos_token_id=_first(hf.get("eos_token_id"), 1),
            name=hf.get("_name_or_path") or "hf",
        )
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        rope_type = rope.get("type", rope.get("rope_type", "default"))
        if "rope_theta" in rope:
            d["rope_theta"] = float(rope["rope_theta"])
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
                original_seq_len=rope["original_max_position_embeddings"],
                rope_factor=float(rope["factor"]),
                beta_fast=rope.get("beta_fast", 32),
                beta_slow=rope.get("beta_slow", 1),
                mscale=float(m_all),
            )
            if max_pos <= d["original_seq_len"]:
                raise ValueError(
                    "rope_scaling type yarn needs max_position_embeddings > original_max_position_embeddings"
                )
        elif rope_type in ("default", None):
            d.update(max_seq_len=max_pos, original_seq_len=max_pos, rope_factor=1.0)
        else:
            raise ValueError(f"rope type {rope_type!r} is not supported; allowed: 'yarn' or none")
        d.update(overrides)
        return cls.from_dict(d)

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dict (DeepseekV3ForCausalLM) for this config."""
        if self.gate_bias:
            topk_method = "noaux_tc"
        else:
            topk_method = "group_limited_greedy" if self.n_expert_groups > 1 else "greedy"
        hf: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.inter_dim,
            "moe_intermediate_size": self.moe_inter_dim,
            "num_hidden_layers": self.n_layers,
            "first_k_dense_replace": self.n_dense_layers,
            "moe_layer_freq": 1,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_heads,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.n_activated_experts,
            "n_group": self.n_expert_groups,
            "topk_group": self.n_limited_groups,
            "topk_method": topk_method,
            "scoring_func": self.score_func,
            "norm_topk_prob": self.score_func == "sigmoid",
            "routed_scaling_factor": self.route_scale,
            "q_lora_rank": self.q_lora_rank or None,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_interleave": True,
            "max_position_embeddings": self.max_seq_len,
            "num_nextn_predict_layers": self.n_mtp,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "initializer_range": self.init_std,
            "aux_loss_alpha": self.seq_aux_loss_alpha or self.aux_loss_alpha,
            "seq_aux": bool(self.seq_aux_loss_alpha),
            "ep_size": 1,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "bfloat16",
            "use_cache": True,
        }
        if self.yarn_enabled:
            hf["rope_scaling"] = {
                "type": "yarn",
                "rope_type": "yarn",
                "factor": self.rope_factor,
                "original_max_position_embeddings": self.original_seq_len,
                "beta_fast": self.beta_fast,
                "beta_slow": self.beta_slow,
                "mscale": self.mscale,
                "mscale_all_dim": self.mscale,
            }
        else:
            hf["rope_scaling"] = None
        return hf

    def summary(self) -> str:
        """A one-line description for tables and logs."""
        return (
            f"{self.name}: d={self.dim} L={self.n_layers} ({self.n_dense_layers} dense) heads={self.n_heads} "
            f"experts={self.n_shared_experts}+{self.n_routed_experts} top-{self.n_activated_experts} "
            f"groups={self.n_limited_groups}/{self.n_expert_groups} {self.score_func} MTP D={self.n_mtp}"
        )


# ---------------------------------------------------------------------- presets
_V3_COMMON: dict[str, Any] = dict(score_func="sigmoid", gate_bias=True, n_mtp=1)

PRESETS: dict[str, dict[str, Any]] = {
    # < 1M parameters: every unit test builds it in milliseconds. YaRN is on so tests cover it.
    "tiny": dict(
        vocab_size=512,
        dim=64,
        inter_dim=128,
        moe_inter_dim=32,
        n_layers=2,
        n_dense_layers=1,
        n_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        n_activated_experts=2,
        n_expert_groups=4,
        n_limited_groups=2,
        route_scale=2.5,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_seq_len=256,
        original_seq_len=64,
        rope_factor=4.0,
        max_batch_size=4,
        **_V3_COMMON,
    ),
    # Notebooks and ablations: trains on a 2-core CPU in minutes; 16 routed experts in 4 groups, 1 shared, MTP.
    "toy": dict(
        vocab_size=8192,
        dim=128,
        inter_dim=384,
        moe_inter_dim=64,
        n_layers=4,
        n_dense_layers=1,
        n_heads=4,
        n_routed_experts=16,
        n_shared_experts=1,
        n_activated_experts=4,
        n_expert_groups=4,
        n_limited_groups=2,
        route_scale=2.5,
        q_lora_rank=64,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_seq_len=4096,
        original_seq_len=4096,
        rope_factor=1.0,
        max_batch_size=8,
        **_V3_COMMON,
    ),
    # ~200M total / ~60M activated: a GPU (or a patient CPU).
    "small": dict(
        vocab_size=32768,
        dim=512,
        inter_dim=1536,
        moe_inter_dim=256,
        n_layers=12,
        n_dense_layers=1,
        n_heads=8,
        n_routed_experts=32,
        n_shared_experts=1,
        n_activated_experts=4,
        n_expert_groups=4,
        n_limited_groups=2,
        route_scale=2.5,
        q_lora_rank=256,
        kv_lora_rank=128,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        max_seq_len=4096,
        original_seq_len=4096,
        rope_factor=1.0,
        **_V3_COMMON,
    ),
    # Official inference/configs/config_16B.json (DeepSeek-V2-Lite); unspecified fields take ModelArgs defaults.
    "16B": dict(
        vocab_size=102400,
        dim=2048,
        inter_dim=10944,
        moe_inter_dim=1408,
        n_layers=27,
        n_dense_layers=1,
        n_heads=16,
        n_routed_experts=64,
        n_shared_experts=2,
        n_activated_experts=6,
        route_scale=1.0,
        q_lora_rank=0,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        mscale=0.707,
    ),
    # Official config_236B.json (DeepSeek-V2).
    "236B": dict(
        vocab_size=102400,
        dim=5120,
        inter_dim=12288,
        moe_inter_dim=1536,
        n_layers=60,
        n_dense_layers=1,
        n_heads=128,
        n_routed_experts=160,
        n_shared_experts=2,
        n_activated_experts=6,
        n_expert_groups=8,
        n_limited_groups=3,
        route_scale=16.0,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
    ),
    # Official config_671B.json (DeepSeek-V3) + the MTP module (D=1) of the released weights.
    "671B": dict(
        vocab_size=129280,
        dim=7168,
        inter_dim=18432,
        moe_inter_dim=2048,
        n_layers=61,
        n_dense_layers=3,
        n_heads=128,
        n_routed_experts=256,
        n_shared_experts=1,
        n_activated_experts=8,
        n_expert_groups=8,
        n_limited_groups=4,
        route_scale=2.5,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        **_V3_COMMON,
    ),
}


# ---------------------------------------------------------------------- helpers
def _check_keys(d: dict[str, Any], allowed: list[str], what: str) -> None:
    unknown = [k for k in d if k not in allowed]
    if unknown:
        parts = []
        for k in unknown:
            close = difflib.get_close_matches(k, allowed, n=3, cutoff=0.5)
            parts.append(f"{k!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ValueError(
            f"unknown {what}{'s' if len(unknown) > 1 else ''}: {'; '.join(parts)}. Allowed: {', '.join(allowed)}"
        )


def parse_value(text: str, typ: Any) -> Any:
    """Parse a ``--set`` value by the dataclass field's type annotation (a string under postponed annotations)."""
    typ = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    text = text.strip()
    if typ == "bool":
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {text!r}")
    if typ == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if typ == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    return text


def _load_json(path_or_dict: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict)
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config file at {path}")
    with open(path) as f:
        return json.load(f)


def _first(value: Any, default: Any) -> Any:
    if value is None:
        return default
    if isinstance(value, (list, tuple)):
        return value[0] if value else default
    return value
