"""TrainConfig: every setting of a training run that is not the model's architecture.

A run is fully described by a ``TrainConfig``: the model is ``ModelConfig.preset(preset)`` changed by the ``model``
overrides and by the load-balancing variant (``balance``); the data, optimizer, schedules, evaluation and checkpoint
settings are fields here. ``--set key=value`` on the command line reaches either dataclass: a key names a TrainConfig
field or a ModelConfig field (an unknown key is an error listing close matches from both).

Schedules follow DeepSeek-V3 §4.2 with *fractions of the run* in place of token counts (14.8T tokens in the paper):

* learning rate: linear warm-up → constant → cosine decay to ``lr_min_ratio``·peak (from 10T/14.8T = 0.676 of the run
  to 14.3T/14.8T = 0.966) → constant → a last, lower constant (the final 167B tokens: 0.989 → end, 7.3e-6/2.2e-4);
* batch size: grows from ``batch_size_start`` to ``batch_size`` sequences over the first ``batch_ramp_frac``
  (469B/14.8T = 0.032 in the paper; longer here so that the ramp is visible in a few hundred steps);
* MTP weight λ: ``mtp_lambda`` (0.3) until 0.676 of the run, then ``mtp_lambda_final`` (0.1);
* bias update speed γ: ``bias_update_speed`` until 0.966 of the run, then 0.

Notebook: 06_pretraining.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

from ..balance import BIAS_RULES
from ..config import (
    BOOL,
    NONNEG_FLOAT,
    NONNEG_INT,
    POS_FLOAT,
    POS_INT,
    PRESETS,
    ModelConfig,
    Rule,
    _check_keys,
    check_fields,
    parse_value,
    without_later_defaults,
)
from ..data.math_problems import KINDS as MATH_KINDS

BALANCE_VARIANTS = ("none", "aux_loss", "aux_free", "aux_free_seq")
DTYPES = ("fp32", "bf16")
STAGES = ("pretrain", "sft", "grpo")
ADAM_MOMENTS = ("fp32", "bf16")

# Fields added after runs were first cached: part of a run's identity only when they differ from their default (which
# reproduces the earlier behaviour), so adding an option does not invalidate cached runs or refuse their resumption.
LATER_FIELDS = (
    "adam_moments",
    "init_from",
    "stage",
    "math_kinds",
    "group_size",
    "max_new_tokens",
    "temperature",
    "clip_eps",
    "kl_coef",
    "grpo_iterations",
    "reward_correct",
    "reward_format",
    "eval_problems",
)

# Fields that say where and how a run executes, not what it computes: excluded from the identity of a run
# (the run-cache hash and the resume check), so that a run can move folders or devices and still resume.
# The fast paths (``fused_loss``, ``compile``) are here too: each is tested equal to the eager reference within
# rounding (tests/test_fast_paths.py), so switching them changes the speed of a run, not what it computes.
ENVIRONMENT_FIELDS = (
    "out",
    "device",
    "progress",
    "checkpoint_every",
    "keep_checkpoints",
    "dp",
    "ep",
    "pp",
    "zero",
    "fused_loss",
    "compile",
)

DEFAULT_AUX_LOSS_ALPHA = 0.01  # balance="aux_loss" when the model overrides do not set aux_loss_alpha
DEFAULT_SEQ_AUX_LOSS_ALPHA = 1e-4  # balance="aux_free_seq": the paper's α


FRACTION = Rule(float, lo=0, hi=1)
TRAIN_RULES: dict[str, Rule] = {
    "preset": Rule(str, choices=tuple(PRESETS)),
    "balance": Rule(str, choices=BALANCE_VARIANTS),
    "bias_update_rule": Rule(str, choices=BIAS_RULES),
    "dtype": Rule(str, choices=DTYPES),
    "adam_moments": Rule(str, choices=ADAM_MOMENTS),
    "stage": Rule(str, choices=STAGES),
    "math_kinds": Rule(str),
    **dict.fromkeys(("group_size",), Rule(int, lo=2)),
    **dict.fromkeys(("max_new_tokens", "grpo_iterations", "eval_problems"), POS_INT),
    "temperature": POS_FLOAT,
    "clip_eps": Rule(float, lo=0, hi=1, lo_open=True, hi_open=True),
    **dict.fromkeys(("kl_coef", "reward_correct", "reward_format"), NONNEG_FLOAT),
    **dict.fromkeys(("steps", "batch_size", "micro_batch_size", "seq_len", "keep_checkpoints"), POS_INT),
    **dict.fromkeys(("batch_size_start", "eval_every", "checkpoint_every", "max_chars_per_domain"), NONNEG_INT),
    **dict.fromkeys(("val_seqs_per_domain", "data_seed", "seed"), NONNEG_INT),
    **dict.fromkeys(("warmup_frac", "lr_decay_start_frac", "lr_decay_end_frac", "lr_final_frac"), FRACTION),
    **dict.fromkeys(("batch_ramp_frac", "mtp_lambda_switch_frac", "bias_freeze_frac", "fim_rate"), FRACTION),
    **dict.fromkeys(("lr", "adam_eps"), POS_FLOAT),
    **dict.fromkeys(("bias_update_speed", "weight_decay", "mtp_lambda", "mtp_lambda_final"), NONNEG_FLOAT),
    "grad_clip": NONNEG_FLOAT,  # 0 switches clipping off, explicitly
    **dict.fromkeys(("lr_min_ratio", "lr_final_ratio"), FRACTION),
    **dict.fromkeys(("beta1", "beta2"), Rule(float, lo=0, hi=1, hi_open=True)),
    **dict.fromkeys(("log_loads", "progress", "fused_loss", "compile"), BOOL),
    "dp": NONNEG_INT,
    **dict.fromkeys(("ep", "pp"), POS_INT),
    "zero": Rule(int, lo=1, hi=3),
    **dict.fromkeys(("corpus", "out", "device", "init_from"), Rule(str)),
}


@dataclass
class TrainConfig:
    """A training run. ``train(TrainConfig(...))`` runs it; see the module docstring for the schedules."""

    # --- model ---
    preset: str = "toy"
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides, e.g. {"n_mtp": 0, "fp8": True}
    init_from: str = ""  # a stage: start from this run's latest checkpoint (or this ckpt folder); see train/stages.py
    # --- load balancing (§2.1.2, §4.5) ---
    balance: str = "aux_free"  # none | aux_loss | aux_free | aux_free_seq
    bias_update_speed: float = 1e-3  # γ
    bias_update_rule: str = "sign"  # sign (paper) | sign_centered (torchtitan: Σ b stays 0)
    bias_freeze_frac: float = 14.3 / 14.8  # γ -> 0 after this fraction of the run
    # --- data (dsv3lab.data) ---
    corpus: str = "builtin"  # "builtin" or a folder of .txt files
    seq_len: int = 256
    fim_rate: float = 0.1
    data_seed: int = 0
    max_chars_per_domain: int = 0  # 0 = the data pipeline's default
    val_seqs_per_domain: int = 16
    # --- optimisation (§4.2) ---
    steps: int = 200
    batch_size: int = 8  # sequences per optimizer step at the end of the ramp
    batch_size_start: int = 0  # sequences per step at step 0 (0 = batch_size // 5, the paper's 3072/15360)
    batch_ramp_frac: float = 0.1
    micro_batch_size: int = 8  # sequences per forward pass; gradient accumulation over ceil(batch / micro)
    lr: float = 2e-3  # peak learning rate
    warmup_frac: float = 0.05
    lr_decay_start_frac: float = 10.0 / 14.8
    lr_decay_end_frac: float = 14.3 / 14.8
    lr_final_frac: float = 14.633 / 14.8  # 333B of the last 500B tokens at lr_min, the final 167B lower
    lr_min_ratio: float = 2.2e-5 / 2.2e-4
    lr_final_ratio: float = 7.3e-6 / 2.2e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "fp32"  # fp32 | bf16 (autocast of the forward pass; master weights stay fp32)
    adam_moments: str = "fp32"  # fp32 | bf16: AdamW's m and v stored in BF16 (§3.3.3; dsv3lab.fp8.optim.AdamW)
    # --- speed (issue 14; each tested equal to the eager reference, so not part of a run's identity) ---
    fused_loss: bool = True  # head + cross-entropy fused and chunked, no full logits (dsv3lab.model.loss)
    compile: bool = False  # torch.compile the forward (artifacts cached in data/cache/inductor; eager on failure)
    # --- MTP (§2.2) ---
    mtp_lambda: float = 0.3
    mtp_lambda_final: float = 0.1
    mtp_lambda_switch_frac: float = 10.0 / 14.8
    # --- post-training (§5; dsv3lab.train.sft and dsv3lab.train.grpo) ---
    stage: str = "pretrain"  # pretrain | sft (worked math solutions, prompt masked) | grpo (§5.2.2)
    math_kinds: str = ""  # sft/grpo problems: comma-separated MathProblem kinds (e.g. "sqrt,power"); "" = all
    group_size: int = 8  # G: sampled completions per prompt (grpo; batch_size = prompts per step)
    max_new_tokens: int = 64  # longest sampled completion (grpo, and the accuracy evaluation)
    temperature: float = 1.0  # sampling temperature of the rollouts
    clip_eps: float = 0.2  # ε of the clipped ratio
    kl_coef: float = 0.04  # β of the KL term to the reference model
    grpo_iterations: int = 1  # μ: policy updates per batch of rollouts (1: π_old = π_θ, the ratio is 1)
    reward_correct: float = 1.0  # rule-based reward for a correct final answer
    reward_format: float = 0.5  # ... and for the format: one final "Answer: ..." line, then end of sequence
    eval_problems: int = 64  # held-out problems scored by greedy decoding at every evaluation (sft, grpo)
    # --- evaluation, logging, checkpoints ---
    eval_every: int = 50  # also at the last step; 0 = only at the end
    log_loads: bool = True  # per-layer per-expert loads and biases every step (loads.npz)
    seed: int = 0
    out: str = ""  # run folder ("" = no files)
    device: str = "cpu"
    progress: bool = True  # tqdm
    checkpoint_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 1
    # --- across processes (dsv3lab.train.distributed; torchrun); the layout is not part of a run's identity ---
    dp: int = 0  # data-parallel size (0 = the processes left: world size / (ep · pp))
    ep: int = 1  # expert-parallel size (routed experts split over ep ranks; each still brings its own data)
    pp: int = 1  # pipeline-parallel size
    zero: int = 3  # 3: params, grads, optimizer states sharded (FSDP2); 2: params kept after forward; 1: see there

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Each field's type and range (:data:`TRAIN_RULES`: NaN and ±inf refused, bools only for bool fields), then
        the combinations; every error names the field and what is allowed."""
        check_fields(self, TRAIN_RULES)
        if self.batch_size_start > self.batch_size:
            raise ValueError(f"batch_size_start ({self.batch_size_start}) must be <= batch_size ({self.batch_size})")
        if not self.warmup_frac <= self.lr_decay_start_frac <= self.lr_decay_end_frac <= self.lr_final_frac:
            raise ValueError(
                "the learning-rate phases must be ordered: warmup_frac <= lr_decay_start_frac <= "
                f"lr_decay_end_frac <= lr_final_frac, got {self.warmup_frac}, {self.lr_decay_start_frac}, "
                f"{self.lr_decay_end_frac}, {self.lr_final_frac}"
            )
        unknown = [k for k in self.kinds if k not in MATH_KINDS]
        if unknown:
            raise ValueError(f"math_kinds: unknown kind(s) {unknown}; the kinds are {', '.join(MATH_KINDS)}")
        if not isinstance(self.model, dict):
            raise ValueError(f"model must be a dict of ModelConfig overrides, got {type(self.model).__name__}")
        _check_keys(self.model, ModelConfig.field_names(), what="ModelConfig field")

    # ------------------------------------------------------------------ the model
    def model_config(self) -> ModelConfig:
        """The ModelConfig of this run: the preset, the balance variant's settings, then the ``model`` overrides.

        balance     aux_loss_alpha                seq_aux_loss_alpha               bias updated
        none        0                             0                                no
        aux_loss    model override, else 0.01     0                                no
        aux_free    0                             0                                yes (γ)
        aux_free_seq 0                            model override, else 1e-4        yes (γ)

        ``gate_bias`` stays on for every variant (the bias stays 0 when it is not updated), so group scoring — the sum
        of the top-2 scores — is the same in all four. An override that contradicts the variant is an error.
        """
        over = dict(self.model)
        aux = over.pop("aux_loss_alpha", None)
        seq = over.pop("seq_aux_loss_alpha", None)
        if self.balance == "aux_loss":
            if seq:
                raise ValueError(
                    "balance='aux_loss' uses only the expert-level loss; seq_aux_loss_alpha must be 0 "
                    "(use balance='aux_free_seq' for the sequence-wise loss)"
                )
            aux, seq = DEFAULT_AUX_LOSS_ALPHA if aux is None else aux, 0.0
            if aux <= 0:
                raise ValueError(f"balance='aux_loss' needs aux_loss_alpha > 0, got {aux}")
        elif self.balance == "aux_free_seq":
            if aux:
                raise ValueError("balance='aux_free_seq' has no expert-level loss; aux_loss_alpha must be 0")
            aux, seq = 0.0, DEFAULT_SEQ_AUX_LOSS_ALPHA if seq is None else seq
            if seq <= 0:
                raise ValueError(f"balance='aux_free_seq' needs seq_aux_loss_alpha > 0, got {seq}")
        else:
            if aux or seq:
                raise ValueError(
                    f"balance={self.balance!r} has no balance loss; aux_loss_alpha and "
                    "seq_aux_loss_alpha must be 0 (use balance='aux_loss' or 'aux_free_seq')"
                )
            aux, seq = 0.0, 0.0
        cfg = ModelConfig.preset(self.preset, aux_loss_alpha=aux, seq_aux_loss_alpha=seq, gate_bias=True)
        cfg = cfg.replace(**over) if over else cfg
        if self.bias_updated and not cfg.gate_bias:
            raise ValueError(f"balance={self.balance!r} updates the selection bias: gate_bias must be true")
        if cfg.n_moe_layers == 0 and cfg.n_mtp == 0 and self.balance != "none":
            raise ValueError(f"the model has no MoE layer; balance={self.balance!r} needs one (use balance='none')")
        if self.seq_len > cfg.max_seq_len:
            raise ValueError(f"seq_len ({self.seq_len}) must be <= the model's max_seq_len ({cfg.max_seq_len})")
        return cfg

    @property
    def kinds(self) -> tuple[str, ...]:
        """``math_kinds`` as a tuple (empty: every kind)."""
        return tuple(k.strip() for k in self.math_kinds.split(",") if k.strip())

    @property
    def bias_updated(self) -> bool:
        return self.balance in ("aux_free", "aux_free_seq")

    @property
    def effective_batch_size_start(self) -> int:
        return self.batch_size_start or max(1, self.batch_size // 5)

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        _check_keys(d, cls.field_names(), what="TrainConfig field")
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        _check_keys(changes, self.field_names(), what="TrainConfig field")
        return dataclasses.replace(self, **changes)

    def with_overrides(self, overrides: list[str]) -> TrainConfig:
        """Apply ``key=value`` strings: a TrainConfig field, else a ModelConfig field (into ``model``).

        An unknown key is an error listing close matches among both dataclasses' fields.
        """
        train_types = {f.name: f.type for f in fields(TrainConfig)}
        model_types = {f.name: f.type for f in fields(ModelConfig)}
        changes: dict[str, Any] = {}
        model = dict(self.model)
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"expected key=value, got {item!r}")
            key, value = (part.strip() for part in item.split("=", 1))
            try:
                if key in train_types and key != "model":
                    changes[key] = parse_value(value, train_types[key])
                elif key in model_types:
                    model[key] = parse_value(value, model_types[key])
                else:
                    allowed = [k for k in train_types if k != "model"]
                    allowed += [k for k in model_types if k not in train_types]
                    _check_keys({key: None}, allowed, what="--set key (TrainConfig or ModelConfig field)")
            except ValueError as err:
                if key in train_types or key in model_types:
                    raise ValueError(f"--set {key}: {err}") from None
                raise
        return dataclasses.replace(self, model=model, **changes)

    def identity(self) -> dict[str, Any]:
        """The fields that define what the run computes (``ENVIRONMENT_FIELDS`` left out, ``LATER_FIELDS`` at their
        defaults left out)."""
        defaults = {f.name: f.default for f in fields(self) if f.name in LATER_FIELDS}
        return {
            k: v
            for k, v in self.to_dict().items()
            if k not in ENVIRONMENT_FIELDS and not (k in defaults and v == defaults[k])
        }

    def hash(self) -> str:
        """A short stable hash of :meth:`identity` plus the resolved ModelConfig (keys the run cache)."""
        blob = json.dumps(
            {"train": self.identity(), "model": without_later_defaults(self.model_config().to_dict())},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``field: saved -> current`` for every field whose value differs (model overrides compared key by key)."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{d}" for d in config_differences(a, b)]
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs
