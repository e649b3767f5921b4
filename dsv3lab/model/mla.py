"""Multi-head Latent Attention (DeepSeek-V3 §2.1.1, Eq. 1–11).

Keys and values are compressed jointly into a latent c_KV of width d_c = ``kv_lora_rank`` (``wkv_a``, then
``kv_norm``); per-head keys and values are up-projected from it by ``wkv_b`` = [W_UK; W_UV]. Queries go through their
own low-rank bottleneck (``wq_a`` → ``q_norm`` → ``wq_b``; a plain ``wq`` when ``q_lora_rank == 0``). Position enters
only through a *decoupled* RoPE part: each head has a d_h^R-wide rotary query, and one rotary key k^R (``k_pe``) is
shared by all heads.

Two words, two meanings:

* the **attention path** (``ModelConfig.attn_impl``, the official code's name): ``naive`` materialises per-head
  K = [W_UK c; k^R] and V = W_UV c and runs ordinary attention (cheap for training and prefill); ``absorb`` folds W_UK
  into the query (q̃ = q^C·W_UK, width d_c) and applies W_UV after attention, so attention runs directly on the latent
  (cheap at decode, where the cache is read for every new token). The two are mathematically equal.
* the **cache layout** (``new_cache(layout=...)``): ``latent`` keeps only kv_norm(c_KV) and the roped k^R, d_c + d_h^R
  values per token (576 for V3); ``per_head`` keeps per-head K and V, n_h·(d_h + d_h^R) + n_h·d_h values (40,960).

:meth:`MLA.attention_path` is the one rule that turns (configured path, cache layout, chunk size) into the path a
forward takes: a per-head cache can only be read by ``naive``; a latent cache by ``absorb`` — or, for a chunk of many
queries on a model configured ``naive``, by ``expand``: up-project the cached latents to per-head K/V once and attend
as in ``naive``, when that needs fewer multiply-accumulates (``accounting.mla_attention_macs``: absorbed attention
costs ~s·t·h·(2·d_c + d_h^R), up-projection ~t·h·d_c·(d_h + d_v)). Both read the same cache, so the numbers agree to
rounding. A model configured ``absorb`` always computes absorbed.

Einsum letters: b batch, s query positions, t key positions, h heads, d per-head width, c latent (d_c), r rope (d_h^R).

Notebook: 02_mla.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..accounting import mla_attention_macs
from ..config import ModelConfig
from .linear import linear
from .norm import RMSNorm
from .rope import apply_rope

CACHE_LAYOUTS = ("latent", "per_head")
_OLD_CACHE_NAMES = {"absorb": "latent", "naive": "per_head"}  # the cache's name before it had its own vocabulary


def cache_layout(layout: str | None = None, attn_impl: str | None = None) -> str | None:
    """Resolve a cache layout argument; ``attn_impl="absorb"/"naive"`` (the old spelling) still works, with a
    ``DeprecationWarning``."""
    if attn_impl is not None:
        if layout is not None:
            raise ValueError("give the cache layout once: layout='latent'|'per_head' (attn_impl= is its old name)")
        if attn_impl not in _OLD_CACHE_NAMES:
            raise ValueError(f"attn_impl must be 'absorb' or 'naive', got {attn_impl!r}")
        layout = _OLD_CACHE_NAMES[attn_impl]
        warnings.warn(
            f"new_cache(attn_impl={attn_impl!r}) is deprecated: the cache layout is layout={layout!r}",
            DeprecationWarning,
            stacklevel=3,
        )
    if layout is not None and layout not in CACHE_LAYOUTS:
        raise ValueError(f"cache layout must be one of {CACHE_LAYOUTS}, got {layout!r}")
    return layout


class MLACache:
    """The KV cache of one MLA layer, preallocated for ``batch_size`` sequences of up to ``max_len`` tokens.

    ``latent`` keeps ``kv`` [b, t, d_c] (= kv_norm(c_KV)) and ``pe`` [b, t, d_h^R] (= k^R after RoPE);
    ``per_head`` keeps per-head ``k`` [b, t, h, d_h + d_h^R] and ``v`` [b, t, h, d_h].
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        layout: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        if layout not in CACHE_LAYOUTS:
            raise ValueError(f"cache layout must be one of {CACHE_LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.batch_size = batch_size
        self.max_len = max_len
        if layout == "latent":
            self.kv = torch.zeros(batch_size, max_len, cfg.kv_lora_rank, device=device, dtype=dtype)
            self.pe = torch.zeros(batch_size, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype)
        else:
            self.k = torch.zeros(batch_size, max_len, cfg.n_heads, cfg.qk_head_dim, device=device, dtype=dtype)
            self.v = torch.zeros(batch_size, max_len, cfg.n_heads, cfg.v_head_dim, device=device, dtype=dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.kv, self.pe] if self.layout == "latent" else [self.k, self.v]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def check(self, batch_size: int, start_pos: int, seqlen: int) -> None:
        if batch_size > self.batch_size:
            raise ValueError(f"batch of {batch_size} sequences does not fit a cache made for {self.batch_size}")
        if start_pos < 0 or start_pos + seqlen > self.max_len:
            raise ValueError(
                f"cache positions [{start_pos}, {start_pos + seqlen}) are past the cache size "
                f"{self.max_len}; allowed: 0 <= start_pos and start_pos + seqlen <= {self.max_len}"
            )


def causal_mask(seqlen: int, start_pos: int, device: torch.device) -> torch.Tensor:
    """Boolean [s, start_pos + s]: query i (at absolute position start_pos + i) sees keys 0..start_pos + i."""
    q_pos = torch.arange(seqlen, device=device)[:, None] + start_pos
    k_pos = torch.arange(start_pos + seqlen, device=device)[None, :]
    return k_pos <= q_pos


class MLA(nn.Module):
    """Multi-head Latent Attention with naive and absorbed paths and an optional latent or per-head KV cache."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.q_lora_rank == 0:
            self.wq = linear(cfg, cfg.dim, cfg.n_heads * cfg.qk_head_dim)  # W^Q
        else:
            self.wq_a = linear(cfg, cfg.dim, cfg.q_lora_rank)  # W^DQ
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = linear(cfg, cfg.q_lora_rank, cfg.n_heads * cfg.qk_head_dim)  # [W^UQ; W^QR]
        self.wkv_a = linear(cfg, cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # [W^DKV; W^KR]
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = linear(cfg, cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim))
        self.wo = linear(cfg, cfg.n_heads * cfg.v_head_dim, cfg.dim)  # W^O

    def init_weights(self, std: float) -> None:
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=std)
            elif isinstance(mod, RMSNorm):
                mod.init_weights()

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        device=None,
        dtype=torch.float32,
        layout: str | None = None,
        *,
        attn_impl: str | None = None,
    ) -> MLACache:
        """A cache for this layer: ``layout`` ``latent`` or ``per_head`` (default: the layout of the configured
        path, ``absorb`` → latent, ``naive`` → per-head). ``attn_impl=`` is the deprecated name of ``layout``."""
        layout = cache_layout(layout, attn_impl) or _OLD_CACHE_NAMES[self.cfg.attn_impl]
        return MLACache(self.cfg, batch_size, max_len, layout, device=device, dtype=dtype)

    def attention_path(self, s: int, t: int, cache: MLACache | None) -> str:
        """The path a forward of ``s`` new queries over ``t`` keys takes: ``naive``, ``absorb`` or ``expand``.

        Without a cache: the configured ``attn_impl``. A per-head cache: ``naive``. A latent cache: ``absorb``,
        except on a model configured ``naive`` for a chunk of s > 1 queries where up-projecting the t cached latents
        (``expand``) needs fewer multiply-accumulates than absorbed attention.
        """
        if cache is None:
            return self.cfg.attn_impl
        if cache.layout == "per_head":
            return "naive"
        if self.cfg.attn_impl == "naive" and s > 1:
            macs = mla_attention_macs(self.cfg, s, t)
            if macs["expand"] < macs["absorb"]:
                return "expand"
        return "absorb"

    def wkv_b_weight(self) -> torch.Tensor:
        """W_UK and W_UV as one [h, d_h + d_v, d_c] view of ``wkv_b`` (a hook for quantized subclasses).

        With ``cfg.fp8`` this is still the high-precision master weight: the absorbed path's einsums are part of the
        attention computation, which stays in high precision (so naive and absorb differ by the FP8 error of the
        ``wkv_b`` GEMM that only the naive path runs)."""
        c = self.cfg
        return self.wkv_b.weight.view(c.n_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)

    def forward(
        self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor, cache: MLACache | None = None
    ) -> torch.Tensor:
        """x: [b, s, dim] at absolute positions start_pos..start_pos+s-1; cos/sin: [s, d_h^R/2]. Returns [b, s, dim]."""
        c = self.cfg
        b, s, _ = x.shape
        # 1) queries: [b, s, h, d_h + d_h^R], split into the non-positional and the rotary part
        q = self.wq(x) if c.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(b, s, c.n_heads, c.qk_head_dim)
        q_nope, q_pe = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        # 2) the joint KV latent c_KV [b, s, d_c] and the shared rotary key k^R [b, s, d_h^R]
        kv, k_pe = self.wkv_a(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        kv = self.kv_norm(kv)
        k_pe = apply_rope(k_pe, cos, sin)
        end = start_pos + s
        if cache is not None:
            cache.check(b, start_pos, s)
        mask = None if s == 1 else causal_mask(s, start_pos, x.device)  # [s, end]
        path = self.attention_path(s, end, cache)
        if path == "expand":
            # store the new latents, then up-project all cached latents once and attend as in naive
            cache.kv[:b, start_pos:end] = kv
            cache.pe[:b, start_pos:end] = k_pe
            kv, k_pe = cache.kv[:b, :end].to(q.dtype), cache.pe[:b, :end].to(q.dtype)  # [b, t, d_c], [b, t, d_h^R]
            out = self._naive(q_nope, q_pe, kv, k_pe, start_pos, end, mask, None)
        elif path == "naive":
            out = self._naive(q_nope, q_pe, kv, k_pe, start_pos, end, mask, cache)
        else:
            out = self._absorb(q_nope, q_pe, kv, k_pe, start_pos, end, mask, cache)
        return self.wo(out.flatten(2))  # [b, s, h * d_v] -> [b, s, dim]

    def _naive(self, q_nope, q_pe, kv, k_pe, start_pos, end, mask, cache):
        c = self.cfg
        b, s = kv.shape[:2]  # s: the positions of kv (the new tokens, or all t cached ones when expanding a latent)
        kv = self.wkv_b(kv).view(b, s, c.n_heads, c.qk_nope_head_dim + c.v_head_dim)  # [b, s, h, d_h + d_v]
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)  # [b, s, h, d_h + d_h^R]
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(-1, -1, c.n_heads, -1)], dim=-1)  # k^R shared by heads
        if cache is not None:
            cache.k[:b, start_pos:end] = k
            cache.v[:b, start_pos:end] = v
            k, v = cache.k[:b, :end], cache.v[:b, :end]  # [b, t, h, ·]
        # SDPA wants [b, h, s, d]; the softmax runs in fp32 inside it for fp32 inputs
        causal = mask is not None and start_pos == 0  # square causal mask: let SDPA use its fused causal kernel
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2).to(q.dtype),
            v.transpose(1, 2).to(q.dtype),
            attn_mask=None if causal else mask,
            is_causal=causal,
            scale=c.softmax_scale,
        )
        return out.transpose(1, 2)  # [b, s, h, d_v]

    def _absorb(self, q_nope, q_pe, kv, k_pe, start_pos, end, mask, cache):
        c = self.cfg
        b = kv.shape[0]
        wkv_b = self.wkv_b_weight()  # [h, d_h + d_v, d_c]
        w_uk, w_uv = wkv_b[:, : c.qk_nope_head_dim], wkv_b[:, -c.v_head_dim :]
        q_abs = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # W_UK absorbed: [b, s, h, d_c]
        if cache is not None:
            cache.kv[:b, start_pos:end] = kv
            cache.pe[:b, start_pos:end] = k_pe
            kv, k_pe = cache.kv[:b, :end], cache.pe[:b, :end]  # [b, t, d_c], [b, t, d_h^R]
        kv, k_pe = kv.to(q_abs.dtype), k_pe.to(q_abs.dtype)
        scores = torch.einsum("bshc,btc->bsht", q_abs, kv) + torch.einsum("bshr,btr->bsht", q_pe, k_pe)
        scores = scores.float() * c.softmax_scale  # [b, s, h, t] in fp32
        if mask is not None:
            scores = scores.masked_fill(~mask[None, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(kv.dtype)
        out = torch.einsum("bsht,btc->bshc", probs, kv)  # attention over the latent: [b, s, h, d_c]
        return torch.einsum("bshc,hdc->bshd", out, w_uv)  # W_UV applied after attention: [b, s, h, d_v]
