"""The DeepSeek-V3 model: embedding → n_layers Blocks (``block.py``: MLA + dense MLP or MoE) → RMSNorm → head,
plus the MTP modules (``mtp.py``).

``__init__`` only allocates shapes (every preset, 671B included, builds on ``torch.device("meta")``);
``init_weights()`` fills them (normal with the paper's std 0.006, norms at 1, the selection bias at 0).

Paper: DeepSeek-V3 §2 (architecture), §2.2 (MTP). Notebook: 00_tour.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ModelConfig
from ..files import CheckpointError, names_list
from .block import Block
from .loss import IGNORE_INDEX, cross_entropy, linear_cross_entropy
from .mla import MLACache, cache_layout
from .moe import MoE
from .mtp import MTPModule
from .norm import RMSNorm
from .rope import precompute_rope

__all__ = ["IGNORE_INDEX", "DeepSeekV3", "ModelCache", "build_model", "cross_entropy", "load_state_dict_strict"]


@dataclass
class ModelCache:
    """Per-layer MLA caches of the main model (``layers``) and, when asked for, of the MTP modules (``mtp``)."""

    layers: list[MLACache]
    mtp: list[MLACache] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers + self.mtp)

    @property
    def max_len(self) -> int:
        return self.layers[0].max_len


class DeepSeekV3(nn.Module):
    """DeepSeek-V3 (any size). ``forward(tokens, targets)`` returns ``(logits, losses)``.

    losses (when targets are given): ``main`` (next-token cross-entropy), ``mtp_1`` … ``mtp_D``, ``aux`` (the
    α-weighted balance losses, 0 when off) and ``total`` = main + λ/D · Σ_k mtp_k + aux.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(i, cfg) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg, k) for k in range(1, cfg.n_mtp + 1))
        self.last_predictions: torch.Tensor | None = None  # [b, s] argmax of the logits, set by a fused-loss forward
        half = cfg.qk_rope_head_dim // 2
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, half), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, half), persistent=False)

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_weights(self) -> None:
        """Fill every parameter: N(0, init_std) for projections, experts, router and embedding; 1 for norms."""
        std = self.cfg.init_std
        nn.init.normal_(self.embed.weight, std=std)
        nn.init.normal_(self.head.weight, std=std)
        self.norm.init_weights()
        for block in self.layers:
            block.init_weights(std)
        for module in self.mtp:
            module.init_weights(std)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Refill the non-persistent buffers — the RoPE tables and the MoE token counters — which ``to_empty``
        leaves uninitialised when a model is built on meta and loaded from a checkpoint."""
        cos, sin = precompute_rope(self.cfg, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        for moe in self.moe_layers():
            moe.tokens_per_expert.zero_()

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) must not round the RoPE tables: positions stay exact in fp32 (device moves still apply)
        saved = {name: self._buffers[name] for name in ("rope_cos", "rope_sin")}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            if self._buffers[name].dtype != old.dtype:
                self._buffers[name] = old.to(self._buffers[name].device)
        return self

    # ------------------------------------------------------------------ helpers
    def moe_layers(self, include_mtp: bool = True) -> list[MoE]:
        """Every MoE module in layer order (main layers, then MTP blocks)."""
        blocks = list(self.layers) + ([m.block for m in self.mtp] if include_mtp else [])
        return [b.ffn for b in blocks if isinstance(b.ffn, MoE)]

    def num_params(self, include_mtp: bool = False) -> int:
        """Parameters of the main model (embedding and head included); MTP modules only when asked."""
        n = sum(p.numel() for p in self.parameters())
        if not include_mtp:
            n -= sum(p.numel() for p in self.mtp.parameters())
        return n

    def new_cache(
        self,
        batch_size: int | None = None,
        max_len: int | None = None,
        *,
        mtp: bool = False,
        device=None,
        dtype: torch.dtype | None = None,
        layout: str | None = None,
        attn_impl: str | None = None,
    ) -> ModelCache:
        """Preallocate KV caches for every layer (and MTP module when ``mtp``).

        ``layout`` (default: the configured path's) is ``"latent"`` — only d_c + d_h^R values per token per layer,
        read by the absorbed path — or ``"per_head"`` — per-head K and V, read by the naive path (see
        ``MLA.attention_path``). ``attn_impl="absorb"/"naive"`` is the deprecated spelling of the same choice.
        """
        layout = cache_layout(layout, attn_impl)
        batch_size = batch_size or self.cfg.max_batch_size
        max_len = max_len or self.cfg.max_seq_len
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"cache max_len {max_len} exceeds max_seq_len {self.cfg.max_seq_len}")
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        layers = [b.attn.new_cache(batch_size, max_len, device, dtype, layout) for b in self.layers]
        mtp_modules = self.mtp if mtp else []
        mtp_caches = [m.block.attn.new_cache(batch_size, max_len, device, dtype, layout) for m in mtp_modules]
        return ModelCache(layers, mtp_caches)

    def check_shapes(self, tokens: torch.Tensor, start_pos: int = 0) -> None:
        """Shape, dtype and position checks: metadata only, so they cost no device synchronisation."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seqlen], got shape {tuple(tokens.shape)}")
        if tokens.numel() == 0:
            raise ValueError(
                f"tokens must hold at least one sequence of at least one token, got shape {tuple(tokens.shape)}"
            )
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be integer ids (int64), got {tokens.dtype}")
        if start_pos < 0:
            raise ValueError(f"start_pos must be >= 0, got {start_pos}")
        end = start_pos + tokens.shape[1]
        if end > self.cfg.max_seq_len:
            raise ValueError(
                f"positions up to {end} exceed max_seq_len={self.cfg.max_seq_len}; "
                f"allowed: start_pos + seqlen <= {self.cfg.max_seq_len}"
            )

    def check_tokens(self, tokens: torch.Tensor, start_pos: int = 0, targets: torch.Tensor | None = None) -> None:
        """Every check on the ids, values included: token ids in [0, vocab_size), targets in [0, vocab_size) or
        IGNORE_INDEX. Reading the values synchronises with the device, so this runs once where data enters (the
        public forward, the trainer's batches, a prompt) — never inside a decode or training loop."""
        self.check_shapes(tokens, start_pos)
        vocab = self.cfg.vocab_size
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"token id {lo if lo < 0 else hi} is outside the vocabulary; allowed: 0 <= id < vocab_size={vocab}"
            )
        if targets is None:
            return
        if targets.shape != tokens.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal tokens shape {tuple(tokens.shape)}")
        valid = targets[targets != IGNORE_INDEX]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab):
            raise ValueError(f"target ids must be in [0, {vocab}) or {IGNORE_INDEX} (ignored)")

    def rope(self, start_pos: int, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope_cos[start_pos : start_pos + seqlen], self.rope_sin[start_pos : start_pos + seqlen]

    # ------------------------------------------------------------------ forward
    def hidden(
        self, tokens: torch.Tensor, start_pos: int = 0, cache: ModelCache | None = None, *, check: bool = True
    ) -> torch.Tensor:
        """Embedding and all blocks: the last hidden state h [b, s, dim] *before* the final norm (MTP input).

        ``check=False`` skips the value checks of :meth:`check_tokens` (for callers that checked their ids once)."""
        if check:
            self.check_tokens(tokens, start_pos)
        else:
            self.check_shapes(tokens, start_pos)
        cos, sin = self.rope(start_pos, tokens.shape[1])
        h = self.embed(tokens)  # [b, s, dim]
        for i, block in enumerate(self.layers):
            h = block(h, start_pos, cos, sin, None if cache is None else cache.layers[i])
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output head on the final norm: [b, s, dim] -> [b, s, vocab] (fp32)."""
        return self.head(self.norm(h)).float()

    def mtp_hidden(
        self,
        depth: int,
        h_prev: torch.Tensor,
        next_tokens: torch.Tensor,
        start_pos: int = 0,
        cache: ModelCache | None = None,
    ) -> torch.Tensor:
        """Run MTP module ``depth`` (1-based) on h^{depth-1} [b, s, d] and the tokens t_{i+depth} [b, s]."""
        module = self.mtp[depth - 1]
        cos, sin = self.rope(start_pos, next_tokens.shape[1])
        c = None if cache is None or not cache.mtp else cache.mtp[depth - 1]
        return module(h_prev, self.embed(next_tokens), start_pos, cos, sin, c)

    def mtp_logits(self, depth: int, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.mtp[depth - 1].norm(h)).float()

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        start_pos: int = 0,
        cache: ModelCache | None = None,
        mtp_lambda: float | None = None,
        check: bool = True,
        fused_loss: bool = False,
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """tokens [b, s] (ids), targets [b, s] with targets[:, i] the token after tokens[:, i] (or IGNORE_INDEX).

        Returns logits [b, s, vocab] (fp32) and a dict of losses (empty without targets; MTP runs only then).
        ``check=False``: the caller has already run :meth:`check_tokens` on these ids (the trainer does, once per
        batch on the host), so the forward reads no values back from the device.

        ``fused_loss=True`` (with targets; a fast path of training): the output head and every cross-entropy run fused
        and chunked (:func:`dsv3lab.model.loss.linear_cross_entropy`), the full logits are never made and ``None`` is
        returned in their place; the argmax of the main head's logits is left in ``last_predictions`` [b, s]. The
        losses equal the reference path's to rounding (``tests/test_fast_paths.py``).
        """
        if check:
            self.check_tokens(tokens, start_pos, targets)
        elif targets is not None and targets.shape != tokens.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must equal tokens shape {tuple(tokens.shape)}")
        for moe in self.moe_layers():
            moe.last_aux_loss = None
        h = self.hidden(tokens, start_pos, cache, check=False)
        losses: dict[str, torch.Tensor] = {}
        fused = fused_loss and targets is not None
        self.last_predictions = None
        if fused:
            logits = None
            losses["main"], self.last_predictions = linear_cross_entropy(self.norm(h), self.head.weight, targets)
        else:
            logits = self.logits(h)
            if targets is None:
                return logits, losses
            losses["main"] = cross_entropy(logits, targets)
        mtp_terms = []
        s = tokens.shape[1]
        h_prev = h
        for k in range(1, len(self.mtp) + 1):
            if s - k <= 0:
                break
            # depth k at positions i = 0..s-k-1: h^{k-1}_i and Emb(t_{i+k}) predict t_{i+k+1} = targets[:, i+k]
            h_prev = self.mtp_hidden(k, h_prev[:, : s - k], tokens[:, k:], start_pos)
            if fused:
                normed = self.mtp[k - 1].norm(h_prev)
                losses[f"mtp_{k}"] = linear_cross_entropy(normed, self.head.weight, targets[:, k:])[0]
            else:
                losses[f"mtp_{k}"] = cross_entropy(self.mtp_logits(k, h_prev), targets[:, k:])
            mtp_terms.append(losses[f"mtp_{k}"])
        aux = [m.last_aux_loss for m in self.moe_layers() if m.last_aux_loss is not None]
        losses["aux"] = torch.stack(aux).sum() if aux else h.new_zeros((), dtype=torch.float32)
        total = losses["main"] + losses["aux"]
        if mtp_terms:
            lam = self.cfg.mtp_lambda if mtp_lambda is None else mtp_lambda
            total = total + lam / len(self.mtp) * torch.stack(mtp_terms).sum()
        losses["total"] = total
        return logits, losses


def build_model(
    cfg: ModelConfig,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> DeepSeekV3:
    """Construct on the meta device, materialise on ``device`` and initialise (fast at any size that fits)."""
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    model.to_empty(device=device or "cpu")
    if seed is not None:
        torch.manual_seed(seed)
    model.init_weights()
    if dtype is not None:
        model.to(dtype)
    return model


def load_state_dict_strict(model: DeepSeekV3, sd: dict[str, torch.Tensor], where: str = "state_dict") -> None:
    """Copy ``sd`` into ``model`` after checking names and shapes; every problem in one ``CheckpointError`` naming
    ``where`` (a file or folder). Checkpoints of every kind load through here."""
    targets = model.state_dict()
    missing = sorted(set(targets) - set(sd))
    unexpected = sorted(set(sd) - set(targets))
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(targets[k].shape)}"
        for k in targets
        if k in sd and sd[k].shape != targets[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing: {names_list(missing)}"] if missing else []
        parts += [f"{len(unexpected)} unexpected: {names_list(unexpected)}"] if unexpected else []
        parts += [f"shape mismatch: {names_list(shapes)}"] if shapes else []
        raise CheckpointError(f"{where} does not match the model ({model.cfg.summary()}): " + "; ".join(parts))
    with torch.no_grad():
        for k, t in targets.items():
            t.copy_(sd[k])
