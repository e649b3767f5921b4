"""ModelConfig: one dataclass for every DeepSeek-V3 size, from a unit-test toy to the full 671B model.

Field names follow the official inference code's ``ModelArgs`` (``dim``, ``n_routed_experts``, ``kv_lora_rank`` …) so
that a config read from ``inference/configs/config_671B.json`` drops in unchanged. The few behaviour switches the
official code hides in module globals or in a ``dim == 7168`` check are explicit fields here:

* ``attn_impl``   ``"naive"`` (per-head K/V, the training/prefill form) or ``"absorb"`` (latent cache, the decode form)
* ``moe_impl``    ``"loop"`` (readable per-expert loop) or ``"grouped"`` (one grouped GEMM over tokens sorted by expert)
* ``gate_bias``   the auxiliary-loss-free selection bias (V3) on or off (V2)
* ``n_mtp``       multi-token-prediction depth D (0 = no MTP modules)
* ``init_std``    the paper's 0.006
* ``fp8``         the FP8 training recipe (§3.3): the projections' GEMMs in FP8 with fine-grained scaling
  (``fp8_gemm``: ``auto``/``emulate``/``kernel``; ``fp8_scale_fmt``: ``fp32``/``ue8m0``)

Presets: ``ModelConfig.preset(name)`` for ``tiny`` (unit tests), ``toy`` (notebooks and ablations on a laptop CPU),
``small`` (~200M, a GPU or a patient CPU), and the exact official ``16B``, ``236B`` and ``671B``.

Paper: DeepSeek-V3 Technical Report §4.2 (hyper-parameters). Notebook: 00_tour.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

from .files import read_json

SCORE_FUNCS = ("softmax", "sigmoid")
ATTN_IMPLS = ("naive", "absorb")
MOE_IMPLS = ("loop", "grouped")
FP8_GEMMS = ("auto", "emulate", "kernel")
FP8_SCALE_FMTS = ("fp32", "ue8m0")
ROPE_TYPES = ("yarn", "linear")

# Fields added after runs were first saved: left out of a saved config's comparison (resume, stages, the run cache)
# when they hold this default, which reproduces the behaviour from before the field existed.
MODEL_LATER_FIELDS: dict[str, Any] = {"rope_type": "yarn"}


@dataclass(frozen=True)
class Rule:
    """What one config field may hold: its type, and for numbers a range (``lo``/``hi``, open or closed), or a tuple
    of ``choices``. ``bool`` fields take only ``True``/``False`` (never a string or 0/1); numeric fields never a bool,
    a string, NaN or ±inf; ``float`` fields take ints too (JSON writes ``40`` for ``40.0``)."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple | None = None

    def describe(self) -> str:
        if self.choices is not None:
            return f"one of {self.choices}"
        if self.kind is int and self.hi is None and self.lo in (0, 1) and not self.lo_open:
            return "a positive integer" if self.lo == 1 else "a non-negative integer"
        what = {int: "an integer", float: "a finite number", bool: "a bool (true/false)", str: "a string"}[self.kind]
        bounds = []
        if self.lo is not None:
            bounds.append(f"{'>' if self.lo_open else '>='} {self.lo:g}")
        if self.hi is not None:
            bounds.append(f"{'<' if self.hi_open else '<='} {self.hi:g}")
        return what + (" " + " and ".join(bounds) if bounds else "")

    def ok(self, value: Any) -> bool:
        if self.choices is not None:
            return isinstance(value, str) and value in self.choices
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind is str:
            return isinstance(value, str)
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
            return False
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))


def check_fields(obj: Any, rules: dict[str, Rule]) -> None:
    """Check every field of ``obj`` named in ``rules``; the first violation is a ``ValueError`` naming the field,
    the value and what is allowed."""
    for name, rule in rules.items():
        value = getattr(obj, name)
        if not rule.ok(value):
            raise ValueError(f"{name} must be {rule.describe()}, got {value!r}")


POS_INT, NONNEG_INT = Rule(int, lo=1), Rule(int, lo=0)
POS_FLOAT, NONNEG_FLOAT = Rule(float, lo=0, lo_open=True), Rule(float, lo=0)
BOOL = Rule(bool)


@dataclass
class ModelConfig:
    """All architecture hyper-parameters of a DeepSeek-V3-style model.

    Defaults equal the official ``ModelArgs`` defaults (a DeepSeek-V2-Lite-sized model); use :meth:`preset`.
    """

    # --- sizes ---
    vocab_size: int = 102400
    dim: int = 2048  # d, the hidden size
    inter_dim: int = 10944  # width of the dense SwiGLU MLP (first n_dense_layers layers)
    moe_inter_dim: int = 1408  # width of one expert
    n_layers: int = 27
    n_dense_layers: int = 1  # the first layers use a dense MLP instead of MoE
    n_heads: int = 16  # n_h
    # --- MoE (§2.1.2) ---
    n_routed_experts: int = 64  # N_r
    n_shared_experts: int = 2  # N_s
    n_activated_experts: int = 6  # K_r
    n_expert_groups: int = 1  # groups for group-limited (node-limited) routing
    n_limited_groups: int = 1  # M: groups a token may route to
    score_func: str = "softmax"  # "sigmoid" (V3) or "softmax" (V2)
    route_scale: float = 1.0  # scaling of the routed output
    # --- MLA (§2.1.1) ---
    q_lora_rank: int = 0  # d_c'; 0 = plain query projection wq
    kv_lora_rank: int = 512  # d_c
    qk_nope_head_dim: int = 128  # d_h
    qk_rope_head_dim: int = 64  # d_h^R
    v_head_dim: int = 128
    # --- RoPE / YaRN (§4.3) ---
    max_seq_len: int = 16384
    original_seq_len: int = 4096  # YaRN is applied when max_seq_len > original_seq_len
    rope_theta: float = 10000.0
    rope_factor: float = 40.0  # s
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0  # softmax-scale correction: scale *= (0.1 * mscale * ln s + 1)^2
    rope_type: str = "yarn"  # how a longer context is reached: "yarn" (§4.3) or "linear" (position interpolation)
    norm_eps: float = 1e-6
    max_batch_size: int = 8  # default cache batch size for generation
    # --- dsv3lab switches (no switch lives anywhere else) ---
    n_mtp: int = 0  # D: multi-token-prediction depth (§2.2)
    mtp_lambda: float = 0.3  # λ: weight of the MTP loss, total = main + λ/D Σ_k L_k
    gate_bias: bool = False  # aux-loss-free selection bias (a buffer, never a Parameter)
    aux_loss_alpha: float = 0.0  # conventional expert-level (batch-wise) balance loss weight
    seq_aux_loss_alpha: float = 0.0  # complementary sequence-wise balance loss weight (paper α = 1e-4)
    attn_impl: str = "naive"
    moe_impl: str = "loop"
    init_std: float = 0.006
    # FP8 training (§3.3): projections (MLA, dense MLP, shared and routed experts, MTP eh_proj) run their Fprop,
    # Dgrad and Wgrad GEMMs in FP8 E4M3 with 1×128 / 128×128 scaling; embedding, head, router, norms, attention
    # core stay in high precision. State-dict names are unchanged.
    fp8: bool = False
    fp8_gemm: str = "auto"  # "emulate" (quantize → dequantize → FP32 GEMM), "kernel" (Triton), "auto"
    fp8_scale_fmt: str = "fp32"  # "fp32" scales or "ue8m0" (powers of two)
    bos_token_id: int = 0
    eos_token_id: int = 1
    # free-form notes carried with the config (e.g. which preset it came from); not used by the model
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head: non-positional part plus the decoupled RoPE part (128 + 64 = 192 for V3)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_expert_groups

    @property
    def rope_scaled(self) -> bool:
        """The RoPE frequencies are rescaled when the model is meant for longer contexts than it was pre-trained on
        (the official rule): ``max_seq_len > original_seq_len`` and ``rope_factor > 1``; ``rope_type`` says how."""
        return self.max_seq_len > self.original_seq_len and self.rope_factor > 1.0

    @property
    def yarn_enabled(self) -> bool:
        """YaRN is on: the frequencies are rescaled (:attr:`rope_scaled`) the YaRN way (``rope_type="yarn"``)."""
        return self.rope_scaled and self.rope_type == "yarn"

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_h + d_h^R), times the YaRN mscale² when YaRN is on (0.135234 for V3); position interpolation
        (``rope_type="linear"``) leaves the scale alone."""
        scale = self.qk_head_dim**-0.5
        if self.yarn_enabled:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale = scale * m * m
        return scale

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and what is allowed: first each field's type and range
        (:data:`MODEL_RULES`: NaN and ±inf refused everywhere, bools only for bool fields), then the combinations."""
        check_fields(self, MODEL_RULES)
        if self.n_dense_layers > self.n_layers:
            raise ValueError(
                f"n_dense_layers ({self.n_dense_layers}) must be <= n_layers ({self.n_layers}): "
                "the first n_dense_layers layers use a dense MLP"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.n_moe_layers > 0 or self.n_mtp > 0:
            if self.n_routed_experts < 1:
                raise ValueError(
                    "n_routed_experts must be >= 1 when the model has MoE layers (n_dense_layers < "
                    f"n_layers or n_mtp > 0), got {self.n_routed_experts}"
                )
            if not 1 <= self.n_activated_experts <= self.n_routed_experts:
                raise ValueError(
                    f"n_activated_experts must be in [1, n_routed_experts={self.n_routed_experts}], "
                    f"got {self.n_activated_experts}"
                )
            if self.n_routed_experts % self.n_expert_groups:
                raise ValueError(
                    f"n_routed_experts ({self.n_routed_experts}) must be divisible into n_expert_groups "
                    f"({self.n_expert_groups}) equal groups"
                )
            if self.n_limited_groups > self.n_expert_groups:
                raise ValueError(
                    f"n_limited_groups ({self.n_limited_groups}) must be <= n_expert_groups ({self.n_expert_groups})"
                )
            kept = self.n_limited_groups * self.experts_per_group
            if kept < self.n_activated_experts:
                raise ValueError(
                    f"the kept groups hold n_limited_groups * experts_per_group = {kept} experts, fewer "
                    f"than n_activated_experts ({self.n_activated_experts}); raise n_limited_groups"
                )
            if self.n_expert_groups > 1 and self.gate_bias and self.experts_per_group < 2:
                raise ValueError(
                    "group scores are the sum of the top-2 scores of a group: each of the "
                    f"n_expert_groups ({self.n_expert_groups}) groups needs >= 2 experts"
                )
        if self.beta_fast <= self.beta_slow:
            raise ValueError(f"beta_fast ({self.beta_fast}) must be > beta_slow ({self.beta_slow})")
        for name in ("bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name} must be in [0, vocab_size={self.vocab_size}), got {getattr(self, name)}")

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a dict of dsv3lab/official field names; an unknown key is an error listing close matches."""
        _check_keys(d, cls.field_names(), what="ModelConfig field")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated; unknown keys are errors)."""
        _check_keys(changes, self.field_names(), what="ModelConfig field")
        return dataclasses.replace(self, **changes)

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> ModelConfig:
        """Apply ``key=value`` strings (as from ``--set``) or a dict, parsing values by the field's type."""
        if isinstance(overrides, dict):
            return self.replace(**overrides)
        changes = {}
        types = {f.name: f.type for f in fields(self)}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"expected key=value, got {item!r}")
            key, value = item.split("=", 1)
            key = key.strip()
            _check_keys({key: None}, self.field_names(), what="ModelConfig field")
            changes[key] = parse_value(value, types[key])
        return self.replace(**changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """One of :data:`PRESETS` (``tiny``, ``toy``, ``small``, ``16B``, ``236B``, ``671B``), optionally changed."""
        if name not in PRESETS:
            close = difflib.get_close_matches(name, list(PRESETS), n=3, cutoff=0.3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"unknown preset {name!r}{hint}; the presets are: {', '.join(PRESETS)}")
        d = dict(PRESETS[name])
        _check_keys(overrides, cls.field_names(), what="ModelConfig field")
        d.update(overrides)
        d.setdefault("name", name)
        return cls(**d)

    # ------------------------------------------------------------------ the official inference code's config
    @classmethod
    def from_official(cls, path_or_dict: str | os.PathLike | dict[str, Any], **overrides: Any) -> ModelConfig:
        """Read an official ``inference/configs/config_*.json`` (ModelArgs names; ``dtype`` is ignored)."""
        d = load_json(path_or_dict)
        d = {k: v for k, v in d.items() if k not in ("dtype", "scale_fmt")}
        d.update(overrides)
        return cls.from_dict(d)

    def summary(self) -> str:
        """A one-line description for tables and logs."""
        return (
            f"{self.name}: d={self.dim} L={self.n_layers} ({self.n_dense_layers} dense) heads={self.n_heads} "
            f"experts={self.n_shared_experts}+{self.n_routed_experts} top-{self.n_activated_experts} "
            f"groups={self.n_limited_groups}/{self.n_expert_groups} {self.score_func} MTP D={self.n_mtp}"
        )


MODEL_RULES: dict[str, Rule] = {
    **dict.fromkeys(
        ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads", "kv_lora_rank"), POS_INT
    ),
    **dict.fromkeys(("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_seq_len", "original_seq_len"), POS_INT),
    **dict.fromkeys(("n_expert_groups", "n_limited_groups", "max_batch_size", "beta_fast"), POS_INT),
    **dict.fromkeys(("n_dense_layers", "n_routed_experts", "n_shared_experts", "n_activated_experts"), NONNEG_INT),
    **dict.fromkeys(("q_lora_rank", "n_mtp", "beta_slow", "bos_token_id", "eos_token_id"), NONNEG_INT),
    **dict.fromkeys(("route_scale", "rope_theta", "norm_eps", "init_std"), POS_FLOAT),
    **dict.fromkeys(("mscale", "mtp_lambda", "aux_loss_alpha", "seq_aux_loss_alpha"), NONNEG_FLOAT),
    "rope_factor": Rule(float, lo=1),
    "rope_type": Rule(str, choices=ROPE_TYPES),
    "score_func": Rule(str, choices=SCORE_FUNCS),
    "attn_impl": Rule(str, choices=ATTN_IMPLS),
    "moe_impl": Rule(str, choices=MOE_IMPLS),
    "fp8_gemm": Rule(str, choices=FP8_GEMMS),
    "fp8_scale_fmt": Rule(str, choices=FP8_SCALE_FMTS),
    "gate_bias": BOOL,
    "fp8": BOOL,
    "name": Rule(str),
}


# ---------------------------------------------------------------------- helpers
def without_later_defaults(d: dict[str, Any]) -> dict[str, Any]:
    """A saved ``ModelConfig.to_dict()`` without the :data:`MODEL_LATER_FIELDS` that hold their default: what two
    configs are compared on, so that a field added later does not make older runs look different."""
    return {k: v for k, v in d.items() if not (k in MODEL_LATER_FIELDS and v == MODEL_LATER_FIELDS[k])}


def _check_keys(d: dict[str, Any], allowed: list[str], what: str) -> None:
    unknown = [k for k in d if k not in allowed]
    if unknown:
        parts = []
        for k in unknown:
            close = difflib.get_close_matches(k, allowed, n=3, cutoff=0.5)
            parts.append(f"{k!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ValueError(
            f"unknown {what}{'s' if len(unknown) > 1 else ''}: {'; '.join(parts)}. Allowed: {', '.join(allowed)}"
        )


def parse_value(text: str, typ: Any) -> Any:
    """Parse a ``--set`` value by the dataclass field's type annotation (a string under postponed annotations)."""
    typ = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    text = text.strip()
    if typ == "bool":
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {text!r}")
    if typ == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if typ == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    return text


def load_json(path_or_dict: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict)
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    return read_json(path, "a config.json object")


# ---------------------------------------------------------------------- presets
# One column per preset, one row per field; "·" keeps ModelConfig's default (the official ModelArgs default).
#   tiny   < 1M parameters: every unit test builds it in milliseconds; YaRN on so that tests cover it
#   toy    notebooks and ablations: trains on a 2-core CPU in minutes; 16 routed experts in 4 groups, 1 shared, MTP
#   small  ~200M total / ~60M activated: a GPU (or a patient CPU)
#   16B    official inference/configs/config_16B.json (DeepSeek-V2-Lite)
#   236B   official config_236B.json (DeepSeek-V2)
#   671B   official config_671B.json (DeepSeek-V3) + the MTP module (D = 1) of the released weights
PRESET_TABLE = """
field                 tiny     toy      small    16B      236B     671B
vocab_size            512      8192     32768    102400   102400   129280
dim                   64       128      512      2048     5120     7168
inter_dim             128      384      1536     10944    12288    18432
moe_inter_dim         32       64       256      1408     1536     2048
n_layers              2        4        12       27       60       61
n_dense_layers        1        1        1        1        1        3
n_heads               4        4        8        16       128      128
n_routed_experts      8        16       32       64       160      256
n_shared_experts      1        1        1        2        2        1
n_activated_experts   2        4        4        6        6        8
n_expert_groups       4        4        4        ·        8        8
n_limited_groups      2        2        2        ·        3        4
route_scale           2.5      2.5      2.5      1.0      16.0     2.5
q_lora_rank           32       64       256      0        1536     1536
kv_lora_rank          32       64       128      512      512      512
qk_nope_head_dim      16       32       64       128      128      128
qk_rope_head_dim      8        16       32       64       64       64
v_head_dim            16       32       64       128      128      128
max_seq_len           256      4096     4096     ·        ·        ·
original_seq_len      64       4096     4096     ·        ·        ·
rope_factor           4.0      1.0      1.0      ·        ·        ·
mscale                ·        ·        ·        0.707    ·        ·
max_batch_size        4        8        ·        ·        ·        ·
score_func            sigmoid  sigmoid  sigmoid  ·        ·        sigmoid
gate_bias             true     true     true     ·        ·        true
n_mtp                 1        1        1        ·        ·        1
"""


def parse_preset_table(text: str) -> dict[str, dict[str, Any]]:
    """The presets of a table like :data:`PRESET_TABLE`, each value parsed by its ModelConfig field's type."""
    rows = [line.split() for line in text.strip().splitlines()]
    names = rows[0][1:]
    types = {f.name: f.type for f in fields(ModelConfig)}
    out: dict[str, dict[str, Any]] = {name: {} for name in names}
    for field_name, *values in rows[1:]:
        if field_name not in types or len(values) != len(names):
            raise ValueError(f"preset table row {field_name!r}: an unknown field or {len(values)} values for {names}")
        for name, value in zip(names, values):
            if value != "·":
                out[name][field_name] = parse_value(value, types[field_name])
    return out


PRESETS: dict[str, dict[str, Any]] = parse_preset_table(PRESET_TABLE)
