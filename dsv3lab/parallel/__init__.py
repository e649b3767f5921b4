"""Running the model on many processes (DeepSeek-V3 §3.2, §3.4): pipeline schedules and their simulator, the
pipeline and expert-parallel runtime on ``torch.distributed``, and EPLB.

Modules, one concept each:

* ``launch``   start real processes (``torch.multiprocessing`` + gloo on CPU, NCCL on GPUs) and collect results
* ``schedules`` pipeline schedules as data (1F1B, ZB1P, DualPipe, DualPipeV) and their validity checker
* ``simulator`` the timeline of a schedule under chunk costs: bubble, makespan, memory; Table 2 reproduced
* ``stages``    the model cut into pipeline stages (MTP embedding carried along, balance losses in the gradient)
* ``pipeline``  training on the stages with ``torch.distributed.pipelining`` (or ``executor``), launch, measurement
* ``executor``  dsv3lab's pipeline engine for any schedule of ``schedules`` (DualPipe: two directions, two copies)
* ``overlap``   a DeepSeek-V3 block's forward overlapped with another micro-batch's backward (Fig. 4)
* ``expert``    expert parallelism: the MoE layer over a process group, all-to-all dispatch and combine (§3.2.2)
* ``traffic``   node-limited routing measured: nodes and GPUs per token, IB and NVLink bytes (§3.2.2)
* ``eplb``      the expert-parallel load balancer: redundant experts and their placement on GPUs (§3.4)

``pipeline`` and ``executor`` load ``torch.distributed.pipelining`` (seconds of imports): import them explicitly,
``from dsv3lab.parallel.pipeline import PipelineSpec, run_pipeline``.

Everything here runs on a CPU with gloo; the same code runs on NCCL GPUs under ``torchrun``. Notebooks: 08, 09, 11.
"""

from .eplb import rebalance_experts
from .expert import ExpertParallelMoE, ExpertPlacement, shard_moe_layers, sync_gradients
from .launch import free_port, spawn
from .overlap import overlapped_forward_backward
from .schedules import Action, Schedule, ScheduleError, check_schedule, make_schedule, with_comms
from .simulator import Costs, Timeline, simulate, table2
from .stages import StageModule, split_model
from .traffic import Topology, token_traffic

__all__ = ["free_port", "spawn"]
__all__ += ["Action", "Schedule", "ScheduleError", "check_schedule", "make_schedule", "with_comms"]
__all__ += ["Costs", "Timeline", "simulate", "table2"]
__all__ += [
    "overlapped_forward_backward",
    "PipelineSpec",
    "pipeline_worker",
    "run_pipeline",
    "StageModule",
    "split_model",
]
__all__ += ["ExpertParallelMoE", "ExpertPlacement", "shard_moe_layers", "sync_gradients"]
__all__ += ["Topology", "token_traffic", "rebalance_experts"]
