"""Training: config, the paper's schedules, the trainer, checkpoints, metrics, and the run cache for experiments.

Usage::

    from dsv3lab.train import TrainConfig, train, load_run
    result = train(TrainConfig(preset="toy", steps=200, out="runs/toy"))
    result.metrics   # one row per optimizer step      result.val   # loss/accuracy per domain and evaluation

``train`` runs in one process, or — when the config's layout (``dp``, ``ep``) or the job (torchrun) has several
processes — on all of them (:mod:`dsv3lab.train.distributed`: FSDP2, expert parallelism, sharded checkpoints).
"""

from .checkpoint import latest_checkpoint, save_checkpoint
from .config import BALANCE_VARIANTS, TrainConfig
from .distributed import launch, train, train_distributed
from .metrics import RunMetrics, evaluate
from .schedules import batch_size_at, bias_speed_at, lr_at, mtp_lambda_at, schedule_table
from .stages import stage_config
from .trainer import RunResult, TrainingDiverged, load_run, make_data

__all__ = [
    "BALANCE_VARIANTS",
    "TrainConfig",
    "RunResult",
    "RunMetrics",
    "TrainingDiverged",
    "train",
    "train_distributed",
    "launch",
    "stage_config",
    "load_run",
    "make_data",
    "evaluate",
    "lr_at",
    "batch_size_at",
    "mtp_lambda_at",
    "bias_speed_at",
    "schedule_table",
    "save_checkpoint",
    "latest_checkpoint",
]
