"""DeepSeekMoE: shared experts plus fine-grained routed experts (DeepSeek-V3 §2.1.2, Eq. 12–16).

    h' = u + Σ_{i ≤ N_s} FFN^(s)_i(u) + Σ_{i ≤ N_r} g_i FFN^(r)_i(u)

Router (``Gate``), in fp32:
  1. affinities s_i = sigmoid(u·e_i) (V3) or softmax (V2);
  2. selection scores s_i + b_i, where b is the auxiliary-loss-free bias: a *buffer* used only to choose experts;
  3. group-limited routing: experts are split into ``n_expert_groups`` groups (nodes at training time); each group
     is scored by the sum of its top-2 selection scores (the max when there is no bias, as in V2) and only the best
     ``n_limited_groups`` groups stay eligible (others are masked with -inf);
  4. top-K_r experts among the eligible ones;
  5. gate weights g from the *unbiased* s of the chosen experts, normalised to sum 1 (sigmoid), times route_scale.
No token is dropped.

Experts are stored stacked, ``w1``/``w3`` [E, inter, dim] and ``w2`` [E, dim, inter], so the two implementations
share parameters: ``loop`` runs each expert on its tokens (the readable reference), ``grouped`` sorts the (token,
expert) pairs by expert and runs one grouped GEMM per projection (``torch.nn.functional.grouped_mm``).
With ``cfg.fp8`` every expert GEMM (forward and both backward GEMMs) runs in FP8: per expert with
``dsv3lab.fp8.fp8_linear`` in ``loop``, as FP8 grouped GEMMs with ``dsv3lab.fp8.fp8_grouped_linear`` in ``grouped``
(the weights stay the same stacked FP32 Parameters). The router stays in FP32.

Notebook: 03_deepseekmoe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..balance import balance_loss
from ..config import ModelConfig
from ..fp8.linear import fp8_grouped_linear, fp8_linear
from .linear import fp8_recipe
from .mlp import MLP


class Gate(nn.Module):
    """The router: returns gate weights [T, K_r], expert indices [T, K_r] and the unbiased scores [T, N_r] (fp32)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.topk = cfg.n_activated_experts
        self.n_groups = cfg.n_expert_groups
        self.topk_groups = cfg.n_limited_groups
        self.score_func = cfg.score_func
        self.route_scale = cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))  # the expert centroids e_i
        if cfg.gate_bias:
            # b_i: steers selection only; a persistent fp32 buffer (never a Parameter, never touched by autograd)
            self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.bias = None

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)
        if self.bias is not None:
            self.bias.zero_()

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) must not round the selection bias: keep it in fp32 (device moves still apply)
        bias = self.bias
        super()._apply(fn, recurse)
        if bias is not None and self.bias.dtype != bias.dtype:
            self._buffers["bias"] = bias.to(self.bias.device)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: [T, dim]
        logits = F.linear(x.float(), self.weight.float())  # [T, E] in fp32
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores.detach() if self.bias is None else scores.detach() + self.bias  # [T, E], selection only
        if self.n_groups > 1:
            grouped = choice.view(x.shape[0], self.n_groups, -1)  # [T, G, E/G]
            if self.bias is None:
                group_scores = grouped.amax(dim=-1)  # [T, G]
            else:
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]: sum of the top-2 per group
            keep = group_scores.topk(self.topk_groups, dim=-1).indices  # [T, M]
            drop = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)  # [T, G]
            choice = grouped.masked_fill(drop[..., None], float("-inf")).flatten(1)  # [T, E]
        indices = choice.topk(self.topk, dim=-1).indices  # [T, K]
        weights = scores.gather(1, indices)  # from the unbiased scores: [T, K]
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights * self.route_scale
        return weights.type_as(x), indices, scores


def expert_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens per expert [E] (int64) from expert indices of any shape. A scatter-add into a fixed-size vector:
    unlike ``torch.bincount``, whose output size depends on the data, it never waits for the device."""
    flat = indices.flatten()
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """``F.grouped_mm`` runs on CPU (fp32, bf16) and on CUDA in bf16 on compute capability >= 9.0."""
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return False


class Experts(nn.Module):
    """N_r SwiGLU experts with stacked weights; ``loop`` and ``grouped`` compute the same function."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.impl = cfg.moe_impl
        self.fp8 = fp8_recipe(cfg)  # None, or the FP8 recipe for every expert GEMM
        e, d, i = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        self.w1 = nn.Parameter(torch.empty(e, i, d))  # gate projections
        self.w2 = nn.Parameter(torch.empty(e, d, i))  # down projections
        self.w3 = nn.Parameter(torch.empty(e, i, d))  # up projections

    def init_weights(self, std: float) -> None:
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, std=std)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        # x: [T, dim]; weights, indices: [T, K] -> [T, dim]
        if self.impl == "grouped":
            return self.forward_grouped(x, weights, indices)
        return self.forward_loop(x, weights, indices)

    def weight_of(self, name: str, i: int | None = None):
        """Expert ``i``'s ``w1``/``w2``/``w3`` matrix, or all experts' [E, ...] stack when ``i`` is None (a hook for
        subclasses that store the weights in another form, e.g. FP8 checkpoints kept in FP8)."""
        w = getattr(self, name)
        return w if i is None else w[i]

    def _linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.fp8 is None:
            return F.linear(x, w)
        return fp8_linear(x, w, self.fp8)

    def forward_loop(self, x, weights, indices):
        y = torch.zeros_like(x)
        counts = expert_counts(indices, self.n_experts).tolist()  # the readable loop reads the counts on the host
        for i in range(self.n_experts):
            if counts[i] == 0:
                continue
            token, slot = torch.where(indices == i)  # the tokens routed to expert i, and in which top-k slot
            xi = x[token]  # [n_i, dim]
            h = F.silu(self._linear(xi, self.weight_of("w1", i))) * self._linear(xi, self.weight_of("w3", i))
            out = self._linear(h, self.weight_of("w2", i)) * weights[token, slot, None]  # [n_i, dim]
            y.index_add_(0, token, out.to(y.dtype))
        return y

    def forward_grouped(self, x, weights, indices):
        if self.fp8 is None and not grouped_mm_supported(x.device, x.dtype):
            raise ValueError(
                f"moe_impl='grouped' needs F.grouped_mm, which does not run on {x.device.type} in "
                f"{x.dtype}; use moe_impl='loop' (or bf16 on a GPU with compute capability >= 9.0)"
            )
        k = indices.shape[1]
        flat = indices.flatten()  # [T*K] expert of each (token, slot) pair
        order = flat.argsort(stable=True)  # pairs sorted by expert
        token = order // k  # [T*K] source token of each sorted pair
        offs = expert_counts(flat, self.n_experts).cumsum(0).to(torch.int32)  # [E] group ends
        xs = x[token]  # [T*K, dim], grouped by expert
        if self.fp8 is not None:  # FP8 grouped GEMMs on the FP32 master weights

            def gmm(a, w):
                return fp8_grouped_linear(a, w, offs, self.fp8)
        else:
            # grouped_mm is not on autocast's list: cast as autocast casts F.linear in the loop path (bf16 GEMMs)
            dev = x.device.type
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype

            def gmm(a, w):
                return F.grouped_mm(a.to(dtype), w.to(dtype).transpose(1, 2), offs=offs)

        h = F.silu(gmm(xs, self.weight_of("w1"))) * gmm(xs, self.weight_of("w3"))  # [T*K, inter]
        out = gmm(h, self.weight_of("w2"))  # [T*K, dim]
        out = out * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))


class MoE(nn.Module):
    """Shared experts + routed experts. Records per-expert token counts for balancing and plots.

    * ``last_counts`` [E]: tokens per expert in the latest forward (any mode);
    * ``last_indices`` [b, s, K]: the experts chosen for each token in the latest forward;
    * ``tokens_per_expert`` [E] (int64 buffer): counts accumulated in training mode only, for the bias updater to
      read and reset once per optimizer step;
    * ``last_aux_loss``: the α-weighted balance losses of the latest training forward (None when off).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        n_shared = cfg.n_shared_experts
        self.shared_experts = MLP(cfg.dim, n_shared * cfg.moe_inter_dim, cfg) if n_shared else None
        self.register_buffer(
            "tokens_per_expert", torch.zeros(cfg.n_routed_experts, dtype=torch.int64), persistent=False
        )
        self.last_counts: torch.Tensor | None = None
        self.last_indices: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None

    def init_weights(self, std: float) -> None:
        self.gate.init_weights(std)
        self.experts.init_weights(std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std)
        self.tokens_per_expert.zero_()

    def route(self, flat: torch.Tensor, b: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The router with its bookkeeping, for tokens ``flat`` [T = b·s, dim]: gate weights [T, K] and expert indices
        [T, K]; records ``last_counts``, ``last_indices``, the training counts for the bias update, and the
        α-weighted balance losses in ``last_aux_loss``. ``forward`` and the expert-parallel and pipeline-overlap
        layers (``dsv3lab.parallel``) all route through here."""
        weights, indices, scores = self.gate(flat)  # [T, K], [T, K], [T, E]
        with torch.no_grad():
            counts = expert_counts(indices, self.cfg.n_routed_experts)
            self.last_counts = counts
            self.last_indices = indices.view(b, s, -1)
            if self.training:
                self.tokens_per_expert += counts
        self.last_aux_loss = None
        if self.training and (self.cfg.aux_loss_alpha > 0 or self.cfg.seq_aux_loss_alpha > 0):
            scores_bs, idx_bs = scores.view(b, s, -1), indices.view(b, s, -1)
            aux = scores.new_zeros(())
            if self.cfg.aux_loss_alpha > 0:
                aux = aux + self.cfg.aux_loss_alpha * balance_loss(scores_bs, idx_bs, per_sequence=False)
            if self.cfg.seq_aux_loss_alpha > 0:
                aux = aux + self.cfg.seq_aux_loss_alpha * balance_loss(scores_bs, idx_bs, per_sequence=True)
            self.last_aux_loss = aux
        return weights, indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        flat = x.reshape(b * s, d)  # [T, dim]
        weights, indices = self.route(flat, b, s)  # [T, K], [T, K]
        y = self.experts(flat, weights, indices)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return y.view(b, s, d)
