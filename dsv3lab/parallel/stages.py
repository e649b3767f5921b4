"""DeepSeek-V3 cut into pipeline stages (§3.2.1): the stage modules, the balance losses they carry, the loss.

``split_model`` cuts the blocks into contiguous runs. The first stage also holds the embedding; the last holds the
final norm, the output head and the MTP modules, and its output goes to :class:`PipelineLoss`. MTP module k needs
Emb(t_{i+k}): the first stage embeds every token once and passes that embedding down the pipeline beside the hidden
state, so the embedding stays one parameter on one rank and MTP's gradient for it flows back through the stages
(DeepSeek-V3 places the shallowest and deepest layers on one rank for the same reason; DualPipeV does too). An MoE
layer's balance loss is added to the gradient where it is computed: :func:`attach_aux` returns the stage's hidden
state unchanged and, in the backward, also sends gradient 1 into the loss term (Megatron's ``MoEAuxLossAutoScaler``),
so the complementary sequence-wise loss stays correct under any schedule.

The stages run one after the other give the model's own outputs (tested). Notebook: 08_dualpipe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..model import IGNORE_INDEX, DeepSeekV3, MoE


class AttachAux(torch.autograd.Function):
    """``attach_aux(h, aux)`` is h; its backward returns h's gradient and a gradient of 1 for ``aux``."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape = aux.shape
        return h.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones(ctx.aux_shape, dtype=grad.dtype, device=grad.device)


def attach_aux(h: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
    """Make the loss term ``aux`` (a scalar computed from h's graph) part of the backward through ``h``."""
    return h if aux is None else AttachAux.apply(h, aux)


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous runs of blocks, as even as possible; the earlier stages take the extra blocks (the last stage
    already carries the head and the MTP modules)."""
    if n_stages < 1 or n_stages > n_layers:
        raise ValueError(f"n_stages must be in 1..n_layers={n_layers}, got {n_stages}")
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


class StageModule(nn.Module):
    """One pipeline stage of a :class:`DeepSeekV3` (its modules are the model's own, not copies).

    first stage: ``forward(tokens [b, s])`` -> ``(h, emb)``; later stages: ``forward(h, emb)``; without MTP there is
    no ``emb``. The last stage returns ``(logits [b, s, V], mtp_logits_1 [b, s-1, V], …)`` for :class:`PipelineLoss`.
    ``aux_log`` collects each forward's balance-loss value (the sum over this stage's MoE layers).
    """

    def __init__(self, model: DeepSeekV3, index: int, n_stages: int):
        super().__init__()
        cfg = model.cfg
        self.cfg, self.index, self.n_stages = cfg, index, n_stages
        self.is_first, self.is_last = index == 0, index == n_stages - 1
        self.layer_ids = stage_layers(cfg.n_layers, n_stages)[index]
        self.embed = model.embed if self.is_first else None
        self.layers = nn.ModuleList(model.layers[i] for i in self.layer_ids)
        self.norm = model.norm if self.is_last else None
        self.head = model.head if self.is_last else None
        self.mtp = model.mtp if self.is_last else nn.ModuleList()
        self.register_buffer("rope_cos", model.rope_cos.clone(), persistent=False)
        self.register_buffer("rope_sin", model.rope_sin.clone(), persistent=False)
        self.aux_log: list[float] = []

    def moe_layers(self) -> list[MoE]:
        """This stage's MoE modules in model order (main layers, then MTP blocks)."""
        blocks = list(self.layers) + [m.block for m in self.mtp]
        return [b.ffn for b in blocks if isinstance(b.ffn, MoE)]

    def rope(self, seqlen: int):
        return self.rope_cos[:seqlen], self.rope_sin[:seqlen]

    # the units the stage runs, in order (dsv3lab's executor runs them one by one)
    def embed_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.embed(tokens)  # [b, s, d]
        return (h, self.embed(tokens)) if self.cfg.n_mtp else (h,)  # the second: Emb(t) for the MTP modules

    def run_block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Block i of this stage on h [b, s, d], its balance loss attached to the output."""
        block = self.layers[i]
        h = block(h, 0, *self.rope(h.shape[1]))
        aux = block.ffn.last_aux_loss if isinstance(block.ffn, MoE) else None
        self._aux = self._aux + float(aux.detach()) if aux is not None else self._aux
        return attach_aux(h, aux)

    def run_head(self, h: torch.Tensor, emb: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Final norm and output head, then the MTP chain (as ``DeepSeekV3.forward``): depth k at positions
        i < s-k combines h^{k-1}_i with Emb(t_{i+k}) and predicts t_{i+k+1}."""
        s = h.shape[1]
        outs = [self.head(self.norm(h)).float()]  # [b, s, V]
        h_prev = h
        for k, module in enumerate(self.mtp, start=1):
            if s - k <= 0:
                break
            h_prev = module(h_prev[:, : s - k], emb[:, k:], 0, *self.rope(s - k))  # [b, s-k, d]
            aux = module.block.ffn.last_aux_loss if isinstance(module.block.ffn, MoE) else None
            self._aux = self._aux + float(aux.detach()) if aux is not None else self._aux
            h_prev = attach_aux(h_prev, aux)
            outs.append(self.head(module.norm(h_prev)).float())  # [b, s-k, V]
        return tuple(outs)

    def begin(self) -> None:
        self._aux = 0.0

    def end(self) -> None:
        self.aux_log.append(self._aux)

    def forward(self, *inputs: torch.Tensor):
        self.begin()
        x = self.embed_tokens(inputs[0]) if self.is_first else inputs
        h, emb = x[0], (x[1] if len(x) > 1 else None)
        for i in range(len(self.layers)):
            h = self.run_block(i, h)
        out = self.run_head(h, emb) if self.is_last else ((h, emb) if emb is not None else (h,))
        self.end()
        return out if len(out) > 1 else out[0]


def split_model(model: DeepSeekV3, n_stages: int) -> list[StageModule]:
    """Every stage of ``model`` (sharing its parameters)."""
    return [StageModule(model, s, n_stages) for s in range(n_stages)]


class PipelineLoss:
    """The loss of the last stage: main cross-entropy + λ/D · Σ_k MTP cross-entropy of one micro-batch (the balance
    losses reach the gradient through :func:`attach_aux`). ``log`` keeps each call's terms."""

    def __init__(self, cfg: ModelConfig):
        self.lam, self.depth = cfg.mtp_lambda, cfg.n_mtp
        self.log: list[dict[str, float]] = []

    def __call__(self, outputs, targets: torch.Tensor) -> torch.Tensor:
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)

        def ce(logits, tgt):  # [b, s, V], [b, s]
            return F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=IGNORE_INDEX)

        terms = {"main": ce(outputs[0], targets)}
        for k, logits in enumerate(outputs[1:], start=1):
            terms[f"mtp_{k}"] = ce(logits, targets[:, k:])  # depth k predicts t_{i+k+1} = targets[:, i+k]
        total = terms["main"]
        mtp = [v for k, v in terms.items() if k.startswith("mtp_")]
        if mtp:
            total = total + self.lam / self.depth * torch.stack(mtp).sum()
        self.log.append({k: float(v.detach()) for k, v in terms.items()})
        return total
