"""Speculative decoding with the MTP modules as the draft model (DeepSeek-V3 §5.4.3).

The MTP module k was trained to predict token t_{i+k+1} from the main model's path at position i and the embedding
of t_{i+k}. At inference it can *draft* the tokens after the next one, and the main model *verifies* them all in one
forward pass:

    round (n = index of the newest accepted token t_n, which the main model has not processed yet)
      draft    d_1 = argmax MTP_1(h^0_{n-1}, Emb(t_n)),  d_2 = argmax MTP_2(h^1_{n-1}, Emb(d_1)), … (D drafts)
      verify   one main forward on [t_n, d_1, …, d_D] at positions n … n+D  ->  y_0 … y_D (greedy choices)
      accept   the longest prefix with d_i = y_{i-1}; then y_a (a correction, or a bonus token when all matched)

so each main-model forward yields between 1 and D + 1 tokens, and the output is *exactly* plain greedy decoding:
every accepted token is the main model's argmax given the correct prefix.

With ``temperature > 0`` (and optionally top-k / top-p) the drafts are *sampled* from the MTP modules' filtered
distributions q_k and verified by speculative sampling (Leviathan et al. 2023; Chen et al. 2023): draft d_i is
accepted with probability min(1, p_i(d_i) / q_i(d_i)), where p_i is the main model's filtered distribution at that
position; at the first rejection the token is drawn from max(0, p_i − q_i) renormalised, and when every draft is
accepted a bonus token is drawn from p_D. Each emitted token then has exactly the distribution that plain sampling
from the main model gives (:func:`accept_or_resample`; the tests check it against an exact enumeration).

Caches stay consistent by position bookkeeping alone, with no copying. A cache entry at position p is written by the
forward that processes p and read only by forwards that start at a later position; every forward starts at the first
position that is not yet final, so entries computed from rejected drafts are overwritten before anyone reads them:

* main model: the verify forward writes positions n … n+D; only n … n+a are kept (the next forward starts at n+a+1);
* MTP module k: its entry at position j mixes h^{k-1}_j with the *token* t_{j+k}, so it is final once that token is
  accepted (j <= n - k). ``final[k]`` counts final positions; each round runs module k from ``final[k]`` to n - 1
  (the tail beyond n - k uses drafts and is rewritten next round) and keeps the final hidden states h^k that module
  k+1 still needs in ``pending[k]``.

Batch size 1; greedy by default (the setting of the paper's acceptance numbers). :func:`mtp_decode` is the core;
users call ``dsv3lab.generate(..., speculative="mtp")`` (or ``speculative_generate``), which returns a
``Generation`` whose ``speculative`` field holds the :class:`SpeculativeStats` (acceptance rate, acceptance per
depth, tokens per main-model forward).

Notebook: 10_inference.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..model import DeepSeekV3
from .sampling import TokenCallback, make_generator, next_token_probs


@dataclass
class SpeculativeStats:
    """Counts of one speculative run. ``accepted_per_round[r]`` is how many drafts round r accepted (0 … D)."""

    depth: int
    new_tokens: int = 0
    produced: int = 0  # new tokens including a final eos (what the forwards yielded, up to the token limit)
    main_forwards: int = 0  # the prefill counts: plain greedy decoding has exactly 1 token per forward
    drafted: int = 0
    accepted: int = 0
    reached: list[int] = field(default_factory=list)  # per depth k: rounds in which drafts 1..k-1 were all accepted
    accepted_at: list[int] = field(default_factory=list)  # per depth k: rounds in which draft k was accepted
    accepted_per_round: list[int] = field(default_factory=list)
    history: list[tuple[int, list[int], int]] = field(default_factory=list)  # per round: (n, drafts, accepted)
    seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / drafted tokens."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def acceptance_per_depth(self) -> list[float]:
        """P(draft k accepted | drafts 1..k-1 accepted). Depth 1 is the paper's "second token" acceptance."""
        return [a / r if r else 0.0 for a, r in zip(self.accepted_at, self.reached)]

    @property
    def tokens_per_forward(self) -> float:
        """Tokens produced per main-model forward (prefill included): 1.0 for plain decoding, up to D + 1."""
        return self.produced / self.main_forwards if self.main_forwards else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            acceptance_rate=self.acceptance_rate,
            acceptance_per_depth=self.acceptance_per_depth,
            tokens_per_forward=self.tokens_per_forward,
        )
        return d


def accept_or_resample(
    p: torch.Tensor, q: torch.Tensor, draft: int, generator: torch.Generator | None = None
) -> tuple[bool, int]:
    """One step of speculative sampling: target distribution ``p`` [V], draft distribution ``q`` [V], ``draft`` ~ q.

    Returns (True, draft) with probability min(1, p(draft) / q(draft)), else (False, a token drawn from
    max(0, p − q) renormalised). Over draft ~ q, the returned token is distributed exactly as p."""
    u = torch.rand((), generator=generator, device=p.device)
    if u * q[draft] <= p[draft]:  # u < p/q without dividing (q[draft] > 0 since draft was drawn from q)
        return True, draft
    residual = (p - q).clamp_min(0)
    if residual.sum() <= 0:  # p == q up to rounding: a rejection has probability ~0; fall back to p itself
        residual = p
    return False, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))


@torch.inference_mode()
def mtp_decode(
    model: DeepSeekV3,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    depth: int | None,
    eos: int,
    stop_at_eos: bool,
    cache_layout: str,
    on_token: TokenCallback | None,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
) -> tuple[list[int], str, dict[str, float], SpeculativeStats]:
    """Decode one prompt with MTP drafts of ``depth`` tokens (default: all ``cfg.n_mtp`` modules).

    Greedy (``temperature=0``): the tokens equal plain greedy decoding. Sampling (``temperature > 0``, optional
    ``top_k``/``top_p``, ``seed``): speculative sampling, distributed as plain sampling from the main model.
    Returns (new token ids without the prompt and without eos, finish reason, timing stats, acceptance stats).
    """
    cfg = model.cfg
    D = len(model.mtp) if depth is None else depth
    if not model.mtp:
        raise ValueError("this checkpoint has no MTP module (n_mtp=0): speculative decoding drafts with it")
    if not 1 <= D <= len(model.mtp):
        raise ValueError(
            f"speculative decoding drafts with the MTP modules: depth must be in [1, {len(model.mtp)}] "
            f"(the model has n_mtp={len(model.mtp)}), got {D}"
        )
    seq = [int(t) for t in prompt_ids]
    max_len = len(seq) + max_new_tokens + D
    if max_len > cfg.max_seq_len:
        raise ValueError(
            f"prompt ({len(seq)}) + max_new_tokens ({max_new_tokens}) + depth ({D}) = {max_len} exceeds "
            f"max_seq_len={cfg.max_seq_len}"
        )
    device = model.embed.weight.device
    generator = make_generator(seed, device)
    stats = SpeculativeStats(depth=D, reached=[0] * D, accepted_at=[0] * D)

    def probs(logits: torch.Tensor) -> torch.Tensor:  # [..., V] -> the filtered sampling distribution [..., V]
        return next_token_probs(logits, temperature, top_k, top_p)

    def choose(logits: torch.Tensor) -> int:  # logits [1, V]: argmax, or a draw from the filtered distribution
        if temperature == 0:
            return int(logits.argmax(-1))
        return int(torch.multinomial(probs(logits)[0], 1, generator=generator))

    new: list[int] = []
    finish = ["length"]  # becomes "eos" when the model ends the sequence

    def ids(xs: list[int]) -> torch.Tensor:
        return torch.tensor([xs], dtype=torch.long, device=device)

    def emit(tokens: list[int]) -> bool:
        """Append accepted tokens; True when generation must stop (eos or the token limit)."""
        for t in tokens:
            stats.produced += 1
            if stop_at_eos and t == eos:
                finish[0] = "eos"
                return True
            new.append(t)
            if on_token is not None:
                on_token(0, t)
            if len(new) >= max_new_tokens:
                return True
        return False

    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        cache = model.new_cache(1, max_len, mtp=True, layout=cache_layout)
        # prefill: the main model over the whole prompt gives h^0_0..h^0_{P-1} and the first new token
        model.check_tokens(ids(seq))  # once, where the prompt enters; the rounds below make no host-side checks
        h0 = model.hidden(ids(seq), 0, cache, check=False)  # [1, P, d]
        stats.main_forwards += 1
        first = choose(model.logits(h0[:, -1]))
        seq.append(first)
        done = emit([first])
        final = [len(seq) - 1] + [0] * D  # final[0]: main-model positions in the cache; final[k]: MTP module k
        pending = [h0] + [h0[:, :0]] * D  # pending[k-1]: final h^{k-1} for positions [final[k], final[k-1])
        while not done:
            n = len(seq) - 1  # index of the newest token t_n; the main cache holds positions < n
            # 1) bring every MTP module up to date and draft D tokens (module k predicts t_{n+k})
            ext = list(seq)
            spec = h0[:, :0]  # non-final h^{k-1} at the positions after final[k-1], from the run of module k-1
            q = []  # sampling: the distribution each draft was drawn from
            for k in range(1, D + 1):
                lo = final[k]
                x = torch.cat([pending[k - 1], spec], dim=1)  # h^{k-1} for positions lo .. n-1
                hk = model.mtp_hidden(k, x, ids(ext[lo + k : n + k]), start_pos=lo, cache=cache)  # [1, n - lo, d]
                hi = min(final[k - 1], n - k + 1)  # positions whose input token t_{j+k} is accepted are final
                pending[k - 1] = pending[k - 1][:, hi - lo :]
                if k < D:
                    pending[k] = torch.cat([pending[k], hk[:, : hi - lo]], dim=1)
                spec = hk[:, hi - lo :]
                final[k] = hi
                draft_logits = model.mtp_logits(k, hk[:, -1])  # [1, V]
                if temperature > 0:
                    q.append(probs(draft_logits)[0])
                ext.append(choose(draft_logits))
            drafts = ext[n + 1 :]
            # 2) verify all drafts in one main-model forward at positions n .. n+D
            h = model.hidden(ids([seq[n]] + drafts), n, cache, check=False)  # [1, D + 1, d]
            stats.main_forwards += 1
            logits = model.logits(h)[0]  # [D + 1, V]; row i: the main model's prediction for position n+1+i
            a = 0
            if temperature == 0:
                y = logits.argmax(-1).tolist()
                while a < D and drafts[a] == y[a]:
                    a += 1
                last = y[a]  # the correction, or the bonus token when every draft matched
            else:
                p = probs(logits)
                last = None
                while a < D:
                    ok, token = accept_or_resample(p[a], q[a], drafts[a], generator)
                    if not ok:
                        last = token  # drawn from max(0, p - q): the rejected position's token
                        break
                    a += 1
                if last is None:  # every draft accepted: a bonus token from the main model
                    last = int(torch.multinomial(p[D], 1, generator=generator))
            stats.drafted += D
            stats.accepted += a
            stats.accepted_per_round.append(a)
            stats.history.append((n, drafts, a))
            for k in range(min(a + 1, D)):
                stats.reached[k] += 1
                stats.accepted_at[k] += int(k < a)
            # 3) keep what is final: main positions n..n+a were computed from accepted tokens
            pending[0] = torch.cat([pending[0], h[:, : a + 1]], dim=1)
            accepted = drafts[:a] + [last]
            seq.extend(accepted)
            final[0] = n + a + 1
            done = emit(accepted)
    finally:
        model.train(was_training)
    stats.new_tokens = len(new)
    stats.seconds = time.perf_counter() - t0
    timing = {
        "seconds": stats.seconds,
        "forwards": stats.main_forwards,
        "new_tokens": stats.new_tokens,
        "tokens_per_forward": stats.tokens_per_forward,
    }
    return new, finish[0], timing, stats
