"""Text generation with the latent KV cache: prefill, then one token per main-model forward (DeepSeek-V3 §3.4).

    cache = model.new_cache(batch, max_len, attn_impl="absorb")   # kv_norm(c_KV) and roped k^R per layer
    prefill   tokens[:, 0 : min_prompt_len]           -> logits of the last position -> next token
    decode    tokens[:, p : p + 1] at start_pos = p   -> next token, for p = min_prompt_len, …

The absorbed path reads d_c + d_h^R values per cached token per layer (576 for V3) instead of per-head K and V
(40,960), which is what makes decoding cheap at long context. A model configured ``naive`` still decodes this way:
the cache kind selects the path.

Prompts of different lengths use the official scheme (``inference/generate.py``): prefill up to the *shortest*
prompt, then advance all sequences one position at a time; where a position still lies inside a sequence's prompt,
the prompt token is kept instead of the sampled one. No padding or attention mask is needed, every sequence sees
exactly its own tokens at their true positions, and a batch gives the same tokens as each prompt alone. The price:
the rest of the longer prompts is processed one token per step instead of in one prefill.

Sampling: greedy (``temperature=0``), or softmax(logits / T) restricted to the ``top_k`` most likely tokens and/or
the smallest set whose probability reaches ``top_p``. A sequence stops at ``eos`` or after ``max_new_tokens``.

Notebook: 10_inference.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..model import DeepSeekV3

Prompt = str | Sequence[int] | torch.Tensor
TokenCallback = Callable[[int, int], None]  # (sequence index, token id), called as each new token is chosen


# ---------------------------------------------------------------------- tokenizer
def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a checkpoint folder (its ``tokenizer.json``), a tokenizer.json path, or a training run
    folder (its ``tokenizer/``): a ``dsv3lab.data.Tokenizer`` when the file has dsv3lab's special tokens, else the
    plain ``tokenizers.Tokenizer`` (e.g. the official DeepSeek-V3 one)."""
    from tokenizers import Tokenizer as HFTokenizer

    from ..data import Tokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json" if (p / "tokenizer.json").exists() else p / "tokenizer" / "tokenizer.json"
    if not p.exists():
        raise FileNotFoundError(f"no tokenizer.json in {path}; pass token ids instead of text (--ids)")
    hf = HFTokenizer.from_file(str(p))
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


# ---------------------------------------------------------------------- sampling
def next_token_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """softmax(logits / T) [b, V] with everything outside the top-k and the top-p nucleus set to 0, renormalised."""
    if temperature <= 0:
        raise ValueError("next_token_probs needs temperature > 0 (temperature 0 is greedy: use argmax)")
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p  # probability of the more likely tokens
        drop = mass_before >= top_p  # the nucleus already reached top_p without this token (the first always stays)
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of logits [b, V]: argmax when temperature is 0, else a draw from :func:`next_token_probs`."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------- generation
@dataclass
class Generation:
    """The result of :func:`generate`: new tokens per prompt (eos not included), texts when a tokenizer was given,
    why each sequence stopped (``eos`` or ``length``) and timings."""

    prompt_ids: list[list[int]]
    ids: list[list[int]]
    finish: list[str]
    texts: list[str] | None = None
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def text(self) -> str | None:
        return None if self.texts is None else self.texts[0]


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


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
    attn_impl: str = "absorb",
    on_token: TokenCallback | None = None,
) -> Generation:
    """Generate up to ``max_new_tokens`` for each prompt with the KV cache (``attn_impl="absorb"``: the latent one).

    ``prompts``: text (needs ``tokenizer``), token ids, a list of either, or a [b, s] tensor. ``eos_id`` defaults to
    the config's ``eos_token_id``; ``add_bos`` puts the config's ``bos_token_id`` before every prompt (documents
    start with it in dsv3lab's training data). ``on_token(i, token)`` is called for every new token of sequence i.
    """
    prompt_ids, _ = normalize_prompts(prompts, tokenizer)
    if add_bos:
        prompt_ids = [[model.cfg.bos_token_id] + p for p in prompt_ids]
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cfg = model.cfg
    eos = cfg.eos_token_id if eos_id is None else eos_id
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
    in_prompt = torch.arange(total, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]  # [b, total]
    gen = _generator(seed, device)
    ids: list[list[int]] = [[] for _ in range(b)]
    finish = ["" for _ in range(b)]
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(b, total, attn_impl=attn_impl)
        prev, forwards = 0, 0
        t0 = time.perf_counter()
        t_prefill = None
        for cur in range(min(lens), total):
            h = model.hidden(tokens[:, prev:cur], start_pos=prev, cache=cache)  # [b, cur - prev, dim]
            logits = model.logits(h[:, -1])  # [b, V]: only the last position is needed
            forwards += 1
            nxt = sample(logits, temperature, top_k, top_p, gen)  # [b]
            tokens[:, cur] = torch.where(in_prompt[:, cur], tokens[:, cur], nxt)
            if t_prefill is None:
                t_prefill = time.perf_counter() - t0
            for i in range(b):
                if finish[i] or cur < lens[i]:
                    continue
                tok = int(nxt[i])
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
        "forwards": forwards,
        "new_tokens": new,
        "decode_tokens_per_s": decoded / decode_s if decoded and decode_s > 0 else 0.0,
    }
    texts = [decode(tokenizer, x) for x in ids] if tokenizer is not None else None
    return Generation(prompt_ids, ids, finish, texts, stats)


@torch.inference_mode()
def greedy_reference(model: DeepSeekV3, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by full recomputation, no cache (slow; the test reference for :func:`generate`)."""
    seq = list(prompt)
    device = model.embed.weight.device
    for _ in range(max_new_tokens):
        logits, _ = model(torch.tensor([seq], device=device))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]
