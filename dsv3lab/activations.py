"""What a training step keeps for its backward pass, per token, and how many bytes each piece costs under a recipe.

:func:`activation_table` lists every tensor a block (or the MTP module, or the output head) keeps for its backward
pass per token, from the model's shapes, each with a *role*; a :class:`Recipe` gives the bytes per element of each
role (0 for a tensor that is recomputed or not kept), and of the weights, gradients and optimizer states.
:mod:`dsv3lab.plan` adds these up per pipeline rank.

**Recipes (derived where the paper is silent).** ``fp32``, ``bf16`` and ``fp8`` are what dsv3lab's own trainer
keeps (``dtype=fp32``; BF16 autocast; ``fp8=true``, whose FP8 values sit in FP32 tensors), checked against the CPU
allocation trace of a real step (tests/test_plan.py). ``paper`` is DeepSeek-V3's recipe as §3.2.3 and §3.3 describe
it, with these stated assumptions:

* RMSNorm is recomputed: a norm keeps only its input (the BF16 residual stream, or the MLA latent c_Q / c_KV), and
  the GEMM inputs that are norm outputs are recomputed (and re-quantized) in the backward pass;
* the MLA up-projections are recomputed: q, k and v are rebuilt from the latents, so attention keeps only its output
  (the input of ``wo``, cached in E5M6: 1.5 bytes + an FP32 scale per 128) and the FP32 log-sum-exp of a
  flash-attention kernel, never the probabilities;
* the SwiGLU input (the outputs of ``w1`` and ``w3``) is cached in FP8 and its output (the input of ``w2``)
  recomputed; routed experts keep their dispatched FP8 input; FP8 tensors cost 1 byte + 4/128 for the 1×128 scales;
* the gate weight is applied to the SwiGLU output (before ``w2``), so no routed expert output is kept for the
  gate's gradient; router scores stay FP32;
* the output head keeps its BF16 logits (main and MTP) for one micro-batch only (the last stage runs that
  micro-batch's backward right after its forward) and needs two more FP32 vocabulary-wide tensors in the backward
  (the gradients of the log-probabilities and of the logits);
* FP8 copies of the projection weights (1 byte + one FP32 scale per 128×128 block) are made once per step and kept
  for the Dgrad GEMMs; communication buffers, the CUDA context and allocator fragmentation are not counted.

Paper: §3.2.3 (recomputation), §3.3 (FP8 training, low-precision optimizer states and activations). Notebook:
11_scale_to_full.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .config import ModelConfig

FP8 = 1 + 4 / 128  # one E4M3 byte per element + an FP32 scale per 1×128 tile
E5M6 = 1.5 + 4 / 128  # the input of the Linear after attention (§3.3.3)
FP8_WEIGHT = 1 + 4 / 128**2  # an E4M3 weight + an FP32 scale per 128×128 block
FP32_HELD_FP8 = 4 + 4 / 128  # an FP8 value kept in an FP32 tensor, as dsv3lab's emulation and kernels keep them
FP32_HELD_FP8_WEIGHT = 4 + 4 / 128**2


# ---------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class Recipe:
    """Bytes per element of everything a training rank stores. 0 = not kept (recomputed, or never made).

    Weights and optimizer: ``weight`` (the copy the GEMMs read), ``master`` (a separate FP32 master copy; 0 when the
    weights are the master), ``grad``, ``moment`` (each of AdamW's m and v), ``weight_cast`` (autocast's BF16
    copies of the head and projection weights, kept for the backward pass), ``fp8_weight`` (FP8 copies of the
    projection weights; projections that have them are not autocast). Activations, by the role of a tensor in
    :func:`activation_table`: ``stream`` (residual stream kept as a norm's input), ``stream_norm`` (a norm's
    normalised x and 1/rms), ``norm_out`` (a norm output kept as a GEMM input), ``latent`` (c_Q, c_KV kept as the
    input of q_norm / kv_norm), ``latent_norm``, ``up`` (q, k, v: the attention inputs), ``probs`` (attention
    probabilities, h·T per token), ``lse`` (log-sum-exp), ``attn_out`` (input of ``wo``), ``swiglu_in`` (outputs of
    ``w1`` and ``w3``), ``swiglu_mid`` (silu output), ``swiglu_out`` (input of ``w2``), ``dispatch`` (a routed
    expert's input), ``expert_out`` (a routed expert's output, and the same weighted by the gate), ``router`` (FP32
    scores, gate weights, indices) and ``logits`` (logits or log-probabilities per vocabulary entry). ``fp8_roles``
    names the roles counted as FP8 activation caches.
    """

    name: str
    description: str
    weight: float
    master: float
    grad: float
    moment: float
    weight_cast: float
    fp8_weight: float
    stream: float
    stream_norm: float
    norm_out: float
    latent: float
    latent_norm: float
    up: float
    probs: float
    lse: float
    attn_out: float
    swiglu_in: float
    swiglu_mid: float
    swiglu_out: float
    dispatch: float
    expert_out: float
    router: float = 4.0
    logits: float = 4.0
    fp8_roles: tuple[str, ...] = ()

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)


# Bytes per element, one column per recipe (names: the per-element sizes defined above).
#   fp32   dsv3lab's trainer in FP32 (dtype=fp32): every activation FP32, attention probabilities kept (SDPA's math
#          path, as on a CPU)
#   bf16   dsv3lab's trainer with dtype=bf16 on CUDA: BF16 autocast over FP32 weights (the residual stream and norms
#          stay FP32, a norm over a BF16 latent keeps an FP32 copy, GEMM inputs are BF16 copies), memory-efficient
#          attention (log-sum-exp kept); expert_out 3 = the BF16 output and its FP32 gate-weighted copy
#   fp8    dsv3lab's trainer with fp8=true, dtype=bf16, adam_moments=bf16: dsv3lab.fp8.quantize keeps FP8 values in
#          FP32 tensors (QuantizedTensor.values), so a cached input or weight copy costs 4 bytes per element, not 1
#   paper  DeepSeek-V3 (§3.2.3, §3.3): BF16 weights, FP32 gradients and master weights, BF16 AdamW moments; RMSNorm
#          and the MLA up-projections recomputed; FP8 caches for the SwiGLU and expert inputs, E5M6 for wo's input;
#          logits 2 = the head's BF16 output (the cross-entropy works in FP32 on the fly: loss_transient_bytes)
RECIPE_TABLE = """
role          fp32   bf16   fp8                    paper
weight        4      4      4                      2
master        0      0      0                      4
grad          4      4      4                      4
moment        4      4      2                      2
weight_cast   0      2      2                      0
fp8_weight    0      0      FP32_HELD_FP8_WEIGHT   FP8_WEIGHT
stream        4      4      4                      2
stream_norm   4      4      4                      0
norm_out      4      2      FP32_HELD_FP8          0
latent        4      4      4                      2
latent_norm   4      2      2                      0
up            4      2      2                      0
probs         4      0      0                      0
lse           0      4      4                      4
attn_out      4      2      FP32_HELD_FP8          E5M6
swiglu_in     4      2      2                      FP8
swiglu_mid    4      2      2                      0
swiglu_out    4      2      FP32_HELD_FP8          0
dispatch      4      2      FP32_HELD_FP8          FP8
expert_out    4      3      3                      0
router        4      4      4                      4
logits        4      4      4                      2
"""
RECIPE_DESCRIPTIONS = {
    "fp32": "dsv3lab's trainer in FP32 (dtype=fp32)",
    "bf16": "dsv3lab's trainer with dtype=bf16 on CUDA (BF16 autocast over FP32 weights)",
    "fp8": "dsv3lab's trainer with fp8=true, dtype=bf16, adam_moments=bf16 (FP8 values held in FP32 tensors)",
    "paper": "DeepSeek-V3 (§3.2.3, §3.3): recomputation, FP8 and E5M6 activation caches, BF16 moments",
}
FP8_ROLES = {"fp8": ("norm_out", "attn_out", "swiglu_out", "dispatch"), "paper": ("attn_out", "swiglu_in", "dispatch")}
_SIZES = {
    "FP8": FP8,
    "E5M6": E5M6,
    "FP8_WEIGHT": FP8_WEIGHT,
    "FP32_HELD_FP8": FP32_HELD_FP8,
    "FP32_HELD_FP8_WEIGHT": FP32_HELD_FP8_WEIGHT,
}


def parse_recipe_table(text: str) -> dict[str, Recipe]:
    """The recipes of a table like :data:`RECIPE_TABLE`: one column per recipe, one row per role."""
    rows = [line.split() for line in text.strip().splitlines()]
    names = rows[0][1:]
    values = {name: {} for name in names}
    for role, *cells in rows[1:]:
        for name, cell in zip(names, cells):
            values[name][role] = _SIZES[cell] if cell in _SIZES else float(cell)
    return {n: Recipe(n, RECIPE_DESCRIPTIONS[n], **values[n], fp8_roles=FP8_ROLES.get(n, ())) for n in names}


RECIPES: dict[str, Recipe] = parse_recipe_table(RECIPE_TABLE)
# What the paper's recipe would keep without its recomputation: the memo items of a plan compare against it.
PAPER_WITHOUT_RECOMPUTATION = RECIPES["paper"].replace(
    name="paper-no-recompute", stream_norm=4.0, norm_out=FP8, latent_norm=2.0, up=2.0, swiglu_mid=2.0, swiglu_out=FP8
)


def recipe(name_or_recipe: str | Recipe) -> Recipe:
    if isinstance(name_or_recipe, Recipe):
        return name_or_recipe
    if name_or_recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {name_or_recipe!r}")
    return RECIPES[name_or_recipe]


# ---------------------------------------------------------------------- activations
def _norm(name: str, width: int, stream: bool) -> list[tuple[str, int, str]]:
    """An RMSNorm over ``width`` channels: its input, and the normalised x with the 1/rms (fp32) it keeps."""
    if stream:
        return [
            (f"{name} input (residual stream)", width, "stream"),
            (f"{name}: x/rms and 1/rms", width + 1, "stream_norm"),
        ]
    return [(f"{name} input (latent)", width, "latent"), (f"{name}: x/rms and 1/rms", width + 1, "latent_norm")]


def _swiglu(name: str, inter: int) -> list[tuple[str, int, str]]:
    return [
        (f"{name} SwiGLU input (w1, w3 outputs)", 2 * inter, "swiglu_in"),
        (f"{name} silu output", inter, "swiglu_mid"),
        (f"{name} w2 input", inter, "swiglu_out"),
    ]


def activation_table(cfg: ModelConfig, seq: int, part: str) -> list[tuple[str, float, str]]:
    """The tensors one token keeps for the backward pass in ``part``: ``"mla"`` (attention half of a block),
    ``"dense"`` (dense SwiGLU MLP), ``"moe"`` (router, shared and routed experts), ``"mtp"`` (one MTP module without
    its block) or ``"head"`` (final norm, output head, log-probabilities of one loss).

    Rows are ``(tensor, elements per token, role)``; bytes per element come from a :class:`Recipe`. Counted from the
    shapes of dsv3lab's modules: per token, attention probabilities take h·T elements (T = ``seq``); each routed
    (token, expert) pair keeps its own input, SwiGLU tensors and output (K_r pairs per token).
    """
    d, h = cfg.dim, cfg.n_heads
    if part == "mla":
        rows = _norm("attn_norm", d, stream=True)
        rows.append(("attn_norm output (input of wq_a/wq, wkv_a)", d, "norm_out"))
        if cfg.q_lora_rank:
            rows += _norm("q_norm", cfg.q_lora_rank, stream=False)
            rows.append(("q_norm output (input of wq_b)", cfg.q_lora_rank, "norm_out"))
        rows += [
            ("kv_norm input: [c_KV; k^R] (wkv_a output)", cfg.kv_lora_rank + cfg.qk_rope_head_dim, "latent"),
            ("kv_norm: x/rms and 1/rms", cfg.kv_lora_rank + 1, "latent_norm"),
            ("kv_norm output (input of wkv_b)", cfg.kv_lora_rank, "norm_out"),
            ("q and k per head (up-projections + RoPE)", 2 * h * cfg.qk_head_dim, "up"),
            ("v per head (up-projection)", h * cfg.v_head_dim, "up"),
            ("attention probabilities (h x T)", h * seq, "probs"),
            ("attention log-sum-exp", h, "lse"),
            ("attention output (input of wo)", h * cfg.v_head_dim, "attn_out"),
        ]
        return rows + _norm("ffn_norm", d, stream=True) + [("ffn_norm output (FFN input)", d, "norm_out")]
    if part == "dense":
        return _swiglu("dense MLP", cfg.inter_dim)
    if part == "moe":
        k, inter = cfg.n_activated_experts, cfg.moe_inter_dim
        e = cfg.n_routed_experts
        rows = [("router: scores, top-k indices (int64) and weights", e + 3 * k + 1, "router")]
        if cfg.n_shared_experts:
            rows += _swiglu("shared experts", cfg.n_shared_experts * inter)
        rows += [
            (f"routed experts: inputs of {k} (token, expert) pairs", k * d, "dispatch"),
            *[(f"routed experts ({k} pairs): {n}", k * m, r) for n, m, r in _swiglu("", inter)],
            (f"routed experts: outputs and gated outputs of {k} pairs", k * 2 * d, "expert_out"),
            (f"routed experts: gate weight and indices of {k} pairs", k * 5, "router"),
        ]
        return rows
    if part == "mtp":
        return [
            *_norm("enorm (embedding of t+k)", d, stream=True),
            ("hnorm: x/rms and 1/rms", d + 1, "stream_norm"),
            ("eh_proj input [enorm; hnorm]", 2 * d, "norm_out"),
        ]
    if part == "head":
        return [
            *_norm("final norm", d, stream=True),
            ("head input", d, "norm_out"),
            ("log-probabilities", cfg.vocab_size, "logits"),
        ]
    raise ValueError(f"part must be one of mla, dense, moe, mtp, head; got {part!r}")


def activation_bytes_per_token(cfg: ModelConfig, seq: int, part: str, rec: Recipe) -> dict[str, float]:
    """Bytes one token keeps in ``part`` under ``rec``: ``{"high_precision": …, "fp8_caches": …}``."""
    out = {"high_precision": 0.0, "fp8_caches": 0.0}
    for _, n, role in activation_table(cfg, seq, part):
        out["fp8_caches" if role in rec.fp8_roles else "high_precision"] += n * getattr(rec, role)
    return out


def block_activation_bytes(cfg: ModelConfig, seq: int, layer_id: int, rec: Recipe) -> dict[str, float]:
    """Per token, one block (``layer_id >= n_layers`` is an MTP block, MoE like the last layers)."""
    parts = ["mla", "dense" if layer_id < cfg.n_dense_layers else "moe"]
    per = [activation_bytes_per_token(cfg, seq, p, rec) for p in parts]
    return {k: sum(p[k] for p in per) for k in per[0]}


def loss_transient_bytes(cfg: ModelConfig, batch: int, seq: int) -> float:
    """The backward of one cross-entropy: FP32 gradients of its log-probabilities and of its logits."""
    return 2 * 4 * batch * seq * cfg.vocab_size
