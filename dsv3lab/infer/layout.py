"""The official Hugging Face weight layout of DeepSeek-V3, and how it maps onto dsv3lab's parameters.

Official names (README_WEIGHTS.md, transformers' ``DeepseekV3ForCausalLM``)::

    model.embed_tokens.weight                          embed.weight
    model.layers.{i}.input_layernorm.weight            layers.{i}.attn_norm.weight
    model.layers.{i}.self_attn.q_a_proj.weight         layers.{i}.attn.wq_a.weight   (q_proj -> wq when q_lora_rank=0)
    model.layers.{i}.self_attn.q_a_layernorm.weight    layers.{i}.attn.q_norm.weight
    model.layers.{i}.self_attn.q_b_proj.weight         layers.{i}.attn.wq_b.weight
    model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight  layers.{i}.attn.wkv_a.weight
    model.layers.{i}.self_attn.kv_a_layernorm.weight   layers.{i}.attn.kv_norm.weight
    model.layers.{i}.self_attn.kv_b_proj.weight        layers.{i}.attn.wkv_b.weight
    model.layers.{i}.self_attn.o_proj.weight           layers.{i}.attn.wo.weight
    model.layers.{i}.post_attention_layernorm.weight   layers.{i}.ffn_norm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight    layers.{i}.ffn.{w1,w3,w2}.weight          (dense layers)
    model.layers.{i}.mlp.gate.weight                   layers.{i}.ffn.gate.weight
    model.layers.{i}.mlp.gate.e_score_correction_bias  layers.{i}.ffn.gate.bias                  (fp32 buffer)
    model.layers.{i}.mlp.experts.{j}.gate_proj.weight  layers.{i}.ffn.experts.w1[j]              (stacked [E, ...])
    model.layers.{i}.mlp.shared_experts.*              layers.{i}.ffn.shared_experts.{w1,w3,w2}.weight
    model.norm.weight, lm_head.weight                  norm.weight, head.weight

MTP module k (1-based) sits at ``model.layers.{n_layers + k - 1}``: ``enorm``, ``hnorm``, ``eh_proj``, a full block
(``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, ``mlp``), ``shared_head.norm`` and — as in the
released file — copies of the shared ``embed_tokens`` and ``shared_head.head``. dsv3lab shares one embedding and one
head (§2.2), so it *writes* the copies (other loaders such as vLLM expect them) and on *reading* accepts them when
they are absent, and checks that they equal the main tensors when they are present.

RoPE layout. dsv3lab, the official inference code and the released weights rotate adjacent pairs (interleaved; HF
``rope_interleave=true``). A checkpoint in the rotate-half layout (``rope_interleave=false``) pairs dimension i with
i + d/2; loading permutes the RoPE rows of ``q_b_proj``/``q_proj`` (per head) and ``kv_a_proj_with_mqa`` back, and
saving with ``rope_interleave=False`` permutes them forward. q·k is unchanged because both sides move alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig

# (HF suffix, dsv3lab suffix, rope rows, FP8 in the official checkpoint)
_ATTN_Q_LORA = [
    ("self_attn.q_a_proj.weight", "attn.wq_a.weight", None, True),
    ("self_attn.q_a_layernorm.weight", "attn.q_norm.weight", None, False),
    ("self_attn.q_b_proj.weight", "attn.wq_b.weight", "q", True),
]
_ATTN_Q_PLAIN = [("self_attn.q_proj.weight", "attn.wq.weight", "q", True)]
_ATTN_KV = [
    ("self_attn.kv_a_proj_with_mqa.weight", "attn.wkv_a.weight", "kv", True),
    ("self_attn.kv_a_layernorm.weight", "attn.kv_norm.weight", None, False),
    ("self_attn.kv_b_proj.weight", "attn.wkv_b.weight", None, True),
    ("self_attn.o_proj.weight", "attn.wo.weight", None, True),
]
_NORMS = [("input_layernorm.weight", "attn_norm.weight"), ("post_attention_layernorm.weight", "ffn_norm.weight")]
_SWIGLU = [("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")]  # HF name -> official/dsv3lab name


@dataclass(frozen=True)
class Slot:
    """Where one tensor of the official layout lives in dsv3lab.

    ``name``: the dsv3lab state_dict key; ``index``: the expert index into a stacked [E, ...] tensor (None if not
    stacked); ``rope``: ``"q"`` or ``"kv"`` when some rows are RoPE dimensions; ``fp8``: stored as E4M3 + scales in
    an FP8 checkpoint (every projection of attention and FFN; never norms, router, embedding, head or ``eh_proj``).
    """

    name: str
    index: int | None = None
    rope: str | None = None
    fp8: bool = False


def _block(cfg: ModelConfig, hf: str, ds: str, moe: bool) -> dict[str, Slot]:
    out: dict[str, Slot] = {}
    for h, d in _NORMS:
        out[hf + h] = Slot(ds + d)
    attn = (_ATTN_Q_LORA if cfg.q_lora_rank else _ATTN_Q_PLAIN) + _ATTN_KV
    for h, d, rope, fp8 in attn:
        out[hf + h] = Slot(ds + d, rope=rope, fp8=fp8)
    if not moe:
        for h, d in _SWIGLU:
            out[f"{hf}mlp.{h}.weight"] = Slot(f"{ds}ffn.{d}.weight", fp8=True)
        return out
    out[hf + "mlp.gate.weight"] = Slot(ds + "ffn.gate.weight")
    if cfg.gate_bias:
        out[hf + "mlp.gate.e_score_correction_bias"] = Slot(ds + "ffn.gate.bias")
    for j in range(cfg.n_routed_experts):
        for h, d in _SWIGLU:
            out[f"{hf}mlp.experts.{j}.{h}.weight"] = Slot(f"{ds}ffn.experts.{d}", index=j, fp8=True)
    if cfg.n_shared_experts:
        for h, d in _SWIGLU:
            out[f"{hf}mlp.shared_experts.{h}.weight"] = Slot(f"{ds}ffn.shared_experts.{d}.weight", fp8=True)
    return out


def layout(cfg: ModelConfig, mtp: bool = True) -> dict[str, Slot]:
    """Every tensor of the official layout for ``cfg`` (in file order), mapped to its dsv3lab slot.

    With ``mtp`` the MTP modules (``model.layers.{n_layers + k - 1}``) are included, without their duplicated
    embedding and head (see :func:`mtp_duplicates`).
    """
    out: dict[str, Slot] = {"model.embed_tokens.weight": Slot("embed.weight")}
    for i in range(cfg.n_layers):
        out.update(_block(cfg, f"model.layers.{i}.", f"layers.{i}.", moe=i >= cfg.n_dense_layers))
    out["model.norm.weight"] = Slot("norm.weight")
    out["lm_head.weight"] = Slot("head.weight")
    if mtp:
        for k in range(cfg.n_mtp):
            hf, ds = f"model.layers.{cfg.n_layers + k}.", f"mtp.{k}."
            out[hf + "enorm.weight"] = Slot(ds + "enorm.weight")
            out[hf + "hnorm.weight"] = Slot(ds + "hnorm.weight")
            out[hf + "eh_proj.weight"] = Slot(ds + "eh_proj.weight")  # BF16 in the released file, as vLLM loads it
            out.update(_block(cfg, hf, ds + "block.", moe=True))
            out[hf + "shared_head.norm.weight"] = Slot(ds + "norm.weight")
    return out


def mtp_duplicates(cfg: ModelConfig) -> dict[str, str]:
    """The MTP layers' copies of the shared embedding and head: HF name -> the dsv3lab tensor they duplicate."""
    out = {}
    for k in range(cfg.n_mtp):
        hf = f"model.layers.{cfg.n_layers + k}."
        out[hf + "embed_tokens.weight"] = "embed.weight"
        out[hf + "shared_head.head.weight"] = "head.weight"
    return out


def mtp_prefixes(cfg: ModelConfig, depth: int | None = None) -> list[str]:
    """``model.layers.{n_layers + k}.`` for every MTP module the checkpoint may hold (``depth`` of them, default
    cfg.n_mtp)."""
    return [f"model.layers.{cfg.n_layers + k}." for k in range(cfg.n_mtp if depth is None else depth)]


# ---------------------------------------------------------------------- RoPE row permutation
def rotate_half_order(d_rope: int) -> torch.Tensor:
    """Row order that turns interleaved RoPE pairs (0,1),(2,3),… into rotate-half pairs (i, i + d/2):
    [0, 2, 4, …, 1, 3, 5, …]."""
    return torch.cat([torch.arange(0, d_rope, 2), torch.arange(1, d_rope, 2)])


def _rope_rows(cfg: ModelConfig, kind: str, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the RoPE rows of a ``q`` or ``kv`` projection, and the same rows in rotate-half order."""
    r = cfg.qk_rope_head_dim
    order = rotate_half_order(r)
    if kind == "kv":  # kv_a_proj_with_mqa: [kv_lora_rank (latent) ; d_h^R (shared rotary key)]
        start = torch.tensor([cfg.kv_lora_rank])
    else:  # q_b_proj / q_proj: per head [d_h (nope) ; d_h^R (rope)]
        start = torch.arange(cfg.n_heads) * cfg.qk_head_dim + cfg.qk_nope_head_dim
    rows = (start[:, None] + torch.arange(r)[None, :]).flatten()
    permuted = (start[:, None] + order[None, :]).flatten()
    if int(rows.max()) >= n_rows:
        raise ValueError(f"a {kind} projection with {n_rows} rows has no room for the RoPE rows of this config")
    return rows, permuted


def to_rotate_half(w: torch.Tensor, cfg: ModelConfig, kind: str) -> torch.Tensor:
    """Interleaved (dsv3lab, official) -> rotate-half rows (``rope_interleave=false``)."""
    rows, permuted = _rope_rows(cfg, kind, w.shape[0])
    out = w.clone()
    out[rows] = w[permuted]
    return out


def from_rotate_half(w: torch.Tensor, cfg: ModelConfig, kind: str) -> torch.Tensor:
    """Rotate-half rows -> interleaved (the inverse of :func:`to_rotate_half`)."""
    rows, permuted = _rope_rows(cfg, kind, w.shape[0])
    out = w.clone()
    out[permuted] = w[rows]
    return out
