"""What a run measures: a metrics row per optimizer step, validation per domain, and expert loads.

Files in a run folder (all written atomically, see :func:`atomic_write_csv`):

* ``metrics.csv``      one row per optimizer step: lr, batch size, tokens, losses main / mtp_k / aux / total, train
                       accuracy, grad norm, tokens/s, MaxVio over the step's batch and per sequence, λ, γ, bias size;
* ``val.csv``          one row per evaluation and domain: main-model loss and next-token accuracy, MTP loss and
                       accuracy per depth, MaxVio of the domain's validation tokens;
* ``expert_load.csv``  one row per evaluation, domain, MoE layer and expert: tokens and relative load (Fig. 9);
* ``loads.npz``        ``counts`` [steps, layers, experts] (int32, every MoE layer including MTP blocks) and ``bias``
                       [steps, layers, experts] (float32, after the step's update): the load heatmaps and bias paths.

MaxVio (§4.5.3, after Wang et al. 2024): max_i load_i / mean load − 1, "batch" over all tokens of a step's global
batch, "seq" over each sequence's own tokens and averaged over sequences; both averaged over the main model's MoE
layers (per-layer values are in loads.npz).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..balance import max_violation, max_violation_per_sequence, relative_load
from ..files import atomic_path
from ..model.moe import MoE
from ..model.transformer import IGNORE_INDEX


def atomic_write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def atomic_write_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz") as tmp:  # numpy appends .npz to a name without it
        np.savez_compressed(tmp, **arrays)


@dataclass
class RunMetrics:
    """Accumulates a run's measurements; ``save``/``load`` a run folder; ``truncate`` for resuming."""

    rows: list[dict] = field(default_factory=list)
    val_rows: list[dict] = field(default_factory=list)
    load_rows: list[dict] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)  # per step [layers, experts]
    bias: list[np.ndarray] = field(default_factory=list)

    @property
    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    @property
    def val(self) -> pd.DataFrame:
        return pd.DataFrame(self.val_rows)

    @property
    def expert_load(self) -> pd.DataFrame:
        return pd.DataFrame(self.load_rows)

    def loads(self) -> dict[str, np.ndarray]:
        if not self.counts:
            return {"counts": np.zeros((0, 0, 0), np.int32), "bias": np.zeros((0, 0, 0), np.float32)}
        return {"counts": np.stack(self.counts).astype(np.int32), "bias": np.stack(self.bias).astype(np.float32)}

    def save(self, run_dir: Path) -> None:
        atomic_write_csv(self.frame, run_dir / "metrics.csv")
        atomic_write_csv(self.val, run_dir / "val.csv")
        atomic_write_csv(self.expert_load, run_dir / "expert_load.csv")
        atomic_write_npz(run_dir / "loads.npz", **self.loads())

    @classmethod
    def load(cls, run_dir: Path) -> RunMetrics:
        def rows(name):
            path = run_dir / name
            if not path.exists() or path.stat().st_size <= 1:
                return []
            try:
                return pd.read_csv(path).to_dict("records")
            except pd.errors.EmptyDataError:
                return []

        m = cls(rows("metrics.csv"), rows("val.csv"), rows("expert_load.csv"))
        if (run_dir / "loads.npz").exists():
            with np.load(run_dir / "loads.npz") as z:
                m.counts, m.bias = list(z["counts"]), list(z["bias"])
        return m

    def truncate(self, steps_done: int) -> None:
        """Keep what was measured in the first ``steps_done`` optimizer steps (resuming from that checkpoint)."""
        self.rows = [r for r in self.rows if r["step"] < steps_done]
        self.val_rows = [r for r in self.val_rows if r["step"] <= steps_done]
        self.load_rows = [r for r in self.load_rows if r["step"] <= steps_done]
        self.counts, self.bias = self.counts[:steps_done], self.bias[:steps_done]


def moe_layer_ids(model, include_mtp: bool = False) -> list[int]:
    """The layer index of every MoE module, in ``model.moe_layers()`` order (MTP blocks count after the last layer)."""
    blocks = list(model.layers) + ([m.block for m in model.mtp] if include_mtp else [])
    return [b.layer_id for b in blocks if isinstance(b.ffn, MoE)]


def step_load_metrics(counts: torch.Tensor, n_main: int) -> float:
    """Mean MaxVio over the first ``n_main`` MoE layers (the main model) of a step's counts [layers, E]."""
    if n_main == 0:
        return float("nan")
    return float(max_violation(counts[:n_main]).mean())


@torch.no_grad()
def evaluate(
    model, val: dict[str, torch.Tensor], batch_size: int = 8, step: int = 0, autocast_dtype: torch.dtype | None = None
) -> tuple[list[dict], list[dict]]:
    """Validation per domain in eval mode (the selection bias and the training counters are not touched).

    ``val`` maps domain -> LongTensor [n, T+1] (tokens = row[:, :-1], targets = row[:, 1:]), or -> a pair
    (tokens [n, T], targets [n, T]) whose targets may hold IGNORE_INDEX (e.g. SFT's masked prompts). Returns the rows of
    ``val.csv`` (loss, acc, mtp_k_loss, mtp_k_acc, maxvio …) and of ``expert_load.csv`` (relative load per layer and
    expert, from each forward's ``last_counts``).
    """
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    moes = model.moe_layers(include_mtp=False)
    layer_ids = moe_layer_ids(model)
    n_experts, k_act = model.cfg.n_routed_experts, model.cfg.n_activated_experts
    depth = len(model.mtp)
    val_rows, load_rows = [], []
    try:
        for domain, rows in val.items():
            all_tokens, all_targets = rows if isinstance(rows, tuple) else (rows[:, :-1], rows[:, 1:])
            if all_tokens.numel() == 0:
                continue
            loss_sum = torch.zeros(depth + 1, dtype=torch.float64)
            correct = torch.zeros(depth + 1, dtype=torch.float64)
            n_tok = torch.zeros(depth + 1, dtype=torch.float64)
            counts = torch.zeros(len(moes), n_experts, dtype=torch.int64)
            seq_vio, n_seq = 0.0, 0
            for tokens, targets in zip(all_tokens.split(batch_size), all_targets.split(batch_size)):
                tokens, targets = tokens.to(device), targets.to(device)
                s = tokens.shape[1]
                with torch.autocast(
                    device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
                ):
                    h = model.hidden(tokens)
                    heads = [(model.logits(h), targets)]
                    if moes:
                        counts += torch.stack([m.last_counts.cpu() for m in moes])
                        seq_vio += (
                            sum(float(max_violation_per_sequence(m.last_indices, n_experts)) for m in moes)
                            / len(moes)
                            * tokens.shape[0]
                        )
                        n_seq += tokens.shape[0]
                    h_prev = h
                    for k in range(1, depth + 1):
                        if s - k <= 0:
                            break
                        h_prev = model.mtp_hidden(k, h_prev[:, : s - k], tokens[:, k:])
                        heads.append((model.mtp_logits(k, h_prev), targets[:, k:]))
                for d, (logits, tgt) in enumerate(heads):
                    mask = tgt != IGNORE_INDEX
                    loss_sum[d] += (
                        F.cross_entropy(
                            logits.float().flatten(0, 1), tgt.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                        )
                        .double()
                        .cpu()
                    )
                    correct[d] += ((logits.argmax(-1) == tgt) & mask).sum().double().cpu()
                    n_tok[d] += mask.sum().double().cpu()
            row = {
                "step": step,
                "domain": domain,
                "loss": float(loss_sum[0] / n_tok[0]),
                "acc": float(correct[0] / n_tok[0]),
                "tokens": int(n_tok[0]),
            }
            for d in range(1, depth + 1):
                if n_tok[d] > 0:
                    row[f"mtp_{d}_loss"] = float(loss_sum[d] / n_tok[d])
                    row[f"mtp_{d}_acc"] = float(correct[d] / n_tok[d])
            if moes:
                row["maxvio_batch"] = float(max_violation(counts).mean())
                row["maxvio_seq"] = seq_vio / max(n_seq, 1)
                rel = relative_load(counts, k_act)
                for j, layer in enumerate(layer_ids):
                    for e in range(n_experts):
                        load_rows.append(
                            {
                                "step": step,
                                "domain": domain,
                                "layer": layer,
                                "expert": e,
                                "tokens": int(counts[j, e]),
                                "relative_load": float(rel[j, e]),
                            }
                        )
            val_rows.append(row)
    finally:
        model.train(was_training)
    return val_rows, load_rows


@torch.no_grad()
def mtp_acceptance(model, rows: torch.Tensor, batch_size: int = 16, stride: int = 1) -> dict[str, float]:
    """How often the depth-1 MTP draft of the *second* token equals the main model's own greedy choice (§5.4.3).

    For each validation row (tokens t = row[:-1], length T) and position i (0 ≤ i ≤ T − 2, every ``stride``-th):
      a = argmax P_main(· | t_≤i)                    the main model's greedy next token,
      d = argmax P_MTP1(· | h_i, Emb(a))             the MTP module's draft for the token after a, computed with the
                                                     true tokens at every earlier position of its own block,
      b = argmax P_main(· | t_≤i, a)                 what the main model itself picks after appending a,
    and the acceptance rate is mean(d == b): the share of drafted second tokens that greedy speculative decoding
    would accept. Both b and d come from single-token decodes against KV caches prefilled with the true tokens;
    the cache slot a decode overwrites is restored before the next position.

    Returns ``{"acceptance": ..., "positions": n, "constant_baseline": ...}``; the baseline is the acceptance a
    drafter would get by always proposing the single token the main model most often picks as b (a weak model that
    repeats frequent tokens is easy to agree with; this says how easy).
    """
    if len(model.mtp) == 0:
        raise ValueError("mtp_acceptance needs a model with MTP modules (n_mtp >= 1)")
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    hits, total = 0, 0
    picked: list[torch.Tensor] = []
    try:
        for chunk in rows.split(batch_size):
            tokens = chunk[:, :-1].to(device)
            b, t = tokens.shape
            if t < 2:
                continue
            cache = model.new_cache(b, max_len=t, mtp=True)
            h = model.hidden(tokens, 0, cache)  # [b, t, d]; main caches hold the true tokens 0..t-1
            a = model.logits(h).argmax(-1)  # [b, t]
            model.mtp_hidden(1, h[:, : t - 1], tokens[:, 1:], 0, cache)  # MTP cache: (h_j, t_{j+1}), j < t-1
            saved_main = [[x.clone() for x in c.tensors()] for c in cache.layers]
            saved_mtp = [[x.clone() for x in c.tensors()] for c in cache.mtp]
            for i in range(0, t - 1, stride):
                h_a = model.hidden(a[:, i : i + 1], i + 1, cache)  # decode a at position i+1
                b_tok = model.logits(h_a)[:, 0].argmax(-1)
                h_d = model.mtp_hidden(1, h[:, i : i + 1], a[:, i : i + 1], i, cache)  # draft at position i
                d_tok = model.mtp_logits(1, h_d)[:, 0].argmax(-1)
                hits += int((d_tok == b_tok).sum())
                picked.append(b_tok.cpu())
                total += b
                for c, saved in zip(cache.layers, saved_main):  # restore the true token's slot i+1
                    for x, s in zip(c.tensors(), saved):
                        x[:, i + 1] = s[:, i + 1]
                for c, saved in zip(cache.mtp, saved_mtp):  # and the MTP block's slot i
                    for x, s in zip(c.tensors(), saved):
                        x[:, i] = s[:, i]
    finally:
        model.train(was_training)
    baseline = 0.0
    if picked:
        baseline = float(torch.bincount(torch.cat(picked)).max()) / total
    return {"acceptance": hits / max(total, 1), "positions": total, "constant_baseline": baseline}


# ---------------------------------------------------------------------- summaries of a finished run
def val_loss(run) -> float:
    """Main-model validation loss of the last evaluation: the token-weighted mean over domains."""
    v = run.final_val()
    return float((v.loss * v.tokens).sum() / v.tokens.sum())


def val_acc(run) -> float:
    v = run.final_val()
    return float((v.acc * v.tokens).sum() / v.tokens.sum())


def tail_mean(run, column: str, frac: float = 0.1) -> float:
    """Mean of a metrics column over the last ``frac`` of the optimizer steps (at least one step)."""
    m = run.metrics[column].to_numpy()
    n = max(1, int(round(frac * len(m))))
    return float(np.mean(m[-n:]))


def router_score_stats(run, rows) -> dict[str, float]:
    """Affinity statistics of the main-model routers on validation ``rows`` (the scale γ must be compared with):
    the spread (std) across experts of each expert's mean score, and the mean gap between the K-th and (K+1)-th
    highest score of a token."""
    model, k = run.model, run.model_cfg.n_activated_experts
    scores = []
    hooks = [
        m.gate.register_forward_hook(lambda mod, inp, out: scores.append(out[2].detach()))
        for m in model.moe_layers(include_mtp=False)
    ]
    try:
        with torch.no_grad():
            model.eval()
            model(rows[:, :-1])
    finally:
        for h in hooks:
            h.remove()
    spread = float(np.mean([float(s.mean(0).std()) for s in scores]))
    gap = float(
        np.mean([float((s.topk(k + 1, -1).values[:, k - 1] - s.topk(k + 1, -1).values[:, k]).mean()) for s in scores])
    )
    return {"expert_mean_spread": spread, "topk_gap": gap}


def specialization_score(expert_load: pd.DataFrame) -> float:
    """Mean over MoE layers and experts of the standard deviation, across domains, of the relative expert load.

    0 when every expert takes the same share of every domain's tokens; larger when experts prefer some domains.
    ``expert_load``: the rows of one evaluation (columns domain, layer, expert, relative_load).
    """
    spread = expert_load.groupby(["layer", "expert"]).relative_load.std(ddof=0)
    return float(spread.mean())
