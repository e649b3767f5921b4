"""Text generation with the latent KV cache: prefill, then one token per main-model forward (DeepSeek-V3 §3.4).

    cache = model.new_cache(batch, max_len, layout="latent")   # kv_norm(c_KV) and roped k^R per layer
    prefill   tokens[:, 0 : min_prompt_len]           -> logits of the last position -> next token
    decode    tokens[:, p : p + 1] at start_pos = p   -> next token, for p = min_prompt_len, …

The absorbed path reads d_c + d_h^R values per cached token per layer (576 for V3) instead of per-head K and V
(40,960), which is what makes decoding cheap at long context. A model configured ``naive`` still decodes this way:
the cache layout selects the path (``MLA.attention_path``).

Prompts of different lengths use the official scheme (``inference/generate.py``): prefill up to the *shortest*
prompt, then advance all sequences one position at a time; where a position still lies inside a sequence's prompt,
the prompt token is kept instead of the sampled one. No padding or attention mask is needed, every sequence sees
exactly its own tokens at their true positions, and a batch gives the same tokens as each prompt alone. The price:
the rest of the longer prompts is processed one token per step instead of in one prefill.

Sampling: greedy (``temperature=0``), or softmax(logits / T) restricted to the ``top_k`` most likely tokens and/or
the smallest set whose probability reaches ``top_p``. A sequence stops at ``eos`` or after ``max_new_tokens``.

One API: :func:`generate` decodes plainly or, with ``speculative="mtp"``, drafts with the MTP modules
(``speculative.py``); :func:`dsv3lab.infer.speculative_generate` is the same call with ``speculative="mtp"``. Both
return a :class:`Generation`: new tokens, texts, finish reasons, timings and — when speculating — the acceptance
statistics.

Notebook: 10_inference.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import Tokenizer
from ..data.tokenizer import read_tokenizer_json
from ..model import DeepSeekV3
from ..model.mla import cache_layout as cache_layout_of
from .sampling import TokenCallback, make_generator, sample
from .speculative import mtp_decode

Prompt = str | Sequence[int] | torch.Tensor


# ---------------------------------------------------------------------- tokenizer
def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a checkpoint folder (its ``tokenizer.json``), a tokenizer.json path, or a training run
    folder (its ``tokenizer/``): a ``dsv3lab.data.Tokenizer`` when the file has dsv3lab's special tokens, else the
    plain ``tokenizers.Tokenizer`` (e.g. the official DeepSeek-V3 one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json" if (p / "tokenizer.json").exists() else p / "tokenizer" / "tokenizer.json"
    if not p.exists():
        raise FileNotFoundError(f"no tokenizer.json in {path}; pass token ids instead of text (--ids)")
    hf = read_tokenizer_json(p)
    try:
        return Tokenizer(hf)
    except ValueError:  # not one of dsv3lab's tokenizers: no bos/eos/FIM specials
        return hf


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` from a ``tokenizers.Tokenizer`` (``.encode(text).ids``) or a wrapper returning ids."""
    out = tokenizer.encode(text)
    return list(out.ids if hasattr(out, "ids") else out)


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids))


def normalize_prompts(prompts: Prompt | Sequence[Prompt], tokenizer: Any = None) -> tuple[list[list[int]], bool]:
    """Text, ids, a list of either, or a [b, s] tensor -> (list of id lists, whether a single prompt was given)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            return [prompts.tolist()], True
        if prompts.dim() == 2:
            return prompts.tolist(), False
        raise ValueError(f"a prompt tensor must be [s] or [b, s], got shape {tuple(prompts.shape)}")
    single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
    items = [prompts] if single else list(prompts)
    out = []
    for p in items:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer (tokenizer=...); or pass token ids")
            out.append(encode(tokenizer, p))
        elif isinstance(p, torch.Tensor):
            out.append(p.flatten().tolist())
        else:
            out.append([int(t) for t in p])
    if not out or any(len(p) == 0 for p in out):
        raise ValueError("every prompt needs at least one token")
    return out, single


# ---------------------------------------------------------------------- generation
@dataclass
class Generation:
    """The result of :func:`generate`: new tokens per prompt (eos not included), texts when a tokenizer was given,
    why each sequence stopped (``eos`` or ``length``), timings and counts in ``stats``, and the acceptance statistics
    of speculative decoding (``speculative``; None for plain decoding)."""

    prompt_ids: list[list[int]]
    ids: list[list[int]]
    finish: list[str]
    texts: list[str] | None = None
    stats: dict[str, float] = field(default_factory=dict)
    speculative: Any = None  # SpeculativeStats when decoded with speculative="mtp"

    @property
    def text(self) -> str | None:
        return None if self.texts is None else self.texts[0]

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted MTP drafts / drafted tokens (None for plain decoding)."""
        return None if self.speculative is None else self.speculative.acceptance_rate

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per main-model forward, the prefill included: 1.0 for plain decoding, up to D + 1."""
        return self.stats.get("tokens_per_forward", 1.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, the same keys for plain and speculative decoding: ``ids``, ``texts`` (with a tokenizer),
        ``finish``, ``new_tokens``, ``main_forwards``, ``seconds``, ``tokens_per_forward``, ``acceptance_rate`` and
        ``acceptance_per_depth`` (None for plain decoding)."""
        spec = self.speculative
        out: dict[str, Any] = {
            "ids": self.ids,
            "finish": self.finish,
            "new_tokens": int(self.stats["new_tokens"]),
            "main_forwards": int(self.stats["forwards"]),
            "seconds": self.stats["seconds"],
            "tokens_per_forward": self.tokens_per_forward,
            "acceptance_rate": self.acceptance_rate,
            "acceptance_per_depth": None if spec is None else spec.acceptance_per_depth,
        }
        if self.texts is not None:
            out["texts"] = self.texts
        return out


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, seed: int | None = None
) -> None:
    """Refuse sampling arguments that are out of range or that would have no effect: top-k and top-p filter the
    sampling distribution, so with temperature 0 (greedy) they are errors rather than silently ignored."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None for no top-k filter), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (or None for no nucleus filter), got {top_p!r}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise ValueError("top_k and top_p filter the sampling distribution: they need temperature > 0 (0 is greedy)")
    if temperature == 0 and seed is not None:
        raise ValueError("seed makes sampling reproducible: it has no effect with temperature 0 (greedy)")


def resolve_cache_layout(cache_layout: str, attn_impl: str | None) -> str:
    """``attn_impl="absorb"/"naive"`` is the deprecated spelling of ``cache_layout="latent"/"per_head"``."""
    return cache_layout_of(None, attn_impl) or cache_layout


@torch.inference_mode()
def generate(
    model: DeepSeekV3,
    prompts: Prompt | Sequence[Prompt],
    *,
    tokenizer: Any = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    stop_at_eos: bool = True,
    add_bos: bool = False,
    seed: int | None = None,
    cache_layout: str = "latent",
    speculative: str | None = None,
    depth: int | None = None,
    on_token: TokenCallback | None = None,
    attn_impl: str | None = None,
) -> Generation:
    """Generate up to ``max_new_tokens`` for each prompt with the KV cache (``cache_layout``: ``latent`` or
    ``per_head``).

    ``prompts``: text (needs ``tokenizer``), token ids, a list of either, or a [b, s] tensor. ``eos_id`` defaults to
    the config's ``eos_token_id``; ``add_bos`` puts the config's ``bos_token_id`` before every prompt (documents
    start with it in dsv3lab's training data). ``on_token(i, token)`` is called for every new token of sequence i.
    ``speculative="mtp"`` drafts ``depth`` tokens (default: every MTP module) per main-model forward and verifies
    them (one prompt at a time); the tokens are those of plain decoding (greedy) or have its distribution
    (sampling). ``attn_impl`` is the deprecated name of ``cache_layout``.
    """
    cache_layout = resolve_cache_layout(cache_layout, attn_impl)
    if speculative not in (None, "mtp"):
        raise ValueError(f"speculative must be None or 'mtp' (draft with the MTP modules), got {speculative!r}")
    if depth is not None and speculative is None:
        raise ValueError("depth is the number of MTP drafts per round: it needs speculative='mtp'")
    prompt_ids, _ = normalize_prompts(prompts, tokenizer)
    if add_bos:
        prompt_ids = [[model.cfg.bos_token_id] + p for p in prompt_ids]
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    eos = model.cfg.eos_token_id if eos_id is None else eos_id
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if speculative == "mtp":
        if len(prompt_ids) != 1:
            raise ValueError(f"speculative decoding takes one prompt at a time, got {len(prompt_ids)}")
        ids, finish, stats, spec = mtp_decode(
            model, prompt_ids[0], max_new_tokens, depth, eos, stop_at_eos, cache_layout, on_token, **sampling
        )
        ids, finish = [ids], [finish]
    else:
        ids, finish, stats = _decode(
            model, prompt_ids, max_new_tokens, eos, stop_at_eos, cache_layout, on_token, **sampling
        )
        spec = None
    texts = [decode(tokenizer, x) for x in ids] if tokenizer is not None else None
    return Generation(prompt_ids, ids, finish, texts, stats, spec)


def _decode(
    model, prompt_ids, max_new_tokens, eos, stop_at_eos, cache_layout, on_token, temperature, top_k, top_p, seed
):
    """Plain batched decoding: prefill to the shortest prompt, then one position per forward for every sequence."""
    cfg = model.cfg
    device = model.embed.weight.device
    lens = [len(p) for p in prompt_ids]
    b, total = len(prompt_ids), max(lens) + max_new_tokens
    if total > cfg.max_seq_len:
        raise ValueError(
            f"the longest prompt ({max(lens)} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
            f"exceeds max_seq_len={cfg.max_seq_len}"
        )
    tokens = torch.zeros(b, total, dtype=torch.long, device=device)
    for i, p in enumerate(prompt_ids):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    model.check_tokens(tokens)  # once, where the prompts enter; the decode loop below makes no host-side checks
    in_prompt = torch.arange(total, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]  # [b, total]
    gen = make_generator(seed, device)
    ids: list[list[int]] = [[] for _ in range(b)]
    finish = ["" for _ in range(b)]
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(b, total, layout=cache_layout)
        prev, forwards = 0, 0
        t0 = time.perf_counter()
        t_prefill = None
        for cur in range(min(lens), total):
            h = model.hidden(tokens[:, prev:cur], start_pos=prev, cache=cache, check=False)  # [b, cur - prev, dim]
            logits = model.logits(h[:, -1])  # [b, V]: only the last position is needed
            forwards += 1
            nxt = sample(logits, temperature, top_k, top_p, gen)  # [b]
            tokens[:, cur] = torch.where(in_prompt[:, cur], tokens[:, cur], nxt)
            if t_prefill is None:
                t_prefill = time.perf_counter() - t0
            chosen = nxt.tolist()  # the one host transfer of a step: the tokens to hand back
            for i in range(b):
                if finish[i] or cur < lens[i]:
                    continue
                tok = chosen[i]
                if stop_at_eos and tok == eos:
                    finish[i] = "eos"
                    continue
                ids[i].append(tok)
                if on_token is not None:
                    on_token(i, tok)
                if len(ids[i]) >= max_new_tokens:
                    finish[i] = "length"
            prev = cur
            if all(finish):
                break
        elapsed = time.perf_counter() - t0
    finally:
        model.train(was_training)
    new = sum(len(x) for x in ids)
    decode_s = elapsed - (t_prefill or 0.0)
    decoded = (forwards - 1) * b  # positions processed one per forward after the prefill, over the batch
    stats = {
        "prefill_s": t_prefill or 0.0,
        "decode_s": decode_s,
        "seconds": elapsed,
        "forwards": forwards,
        "new_tokens": new,
        "tokens_per_forward": 1.0,
        "decode_tokens_per_s": decoded / decode_s if decoded and decode_s > 0 else 0.0,
    }
    return ids, finish, stats


@torch.inference_mode()
def greedy_reference(model: DeepSeekV3, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by full recomputation, no cache (slow; the test reference for :func:`generate`)."""
    seq = list(prompt)
    device = model.embed.weight.device
    for _ in range(max_new_tokens):
        logits, _ = model(torch.tensor([seq], device=device))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]


def speculative_generate(model: DeepSeekV3, prompts: Prompt | Sequence[Prompt], **kwargs: Any) -> Generation:
    """:func:`generate` with ``speculative="mtp"``: the MTP modules draft, the main model verifies (§5.4.3). Takes the
    same arguments (one prompt) and returns the same :class:`Generation`, with ``speculative`` holding the acceptance
    statistics (acceptance rate, per depth, tokens per main-model forward)."""
    if kwargs.setdefault("speculative", "mtp") != "mtp":
        raise ValueError("speculative_generate drafts with the MTP modules: speculative must be 'mtp'")
    return generate(model, prompts, **kwargs)
