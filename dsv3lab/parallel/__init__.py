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

``pipeline`` and ``executor`` load ``torch.distributed.pipelining`` (seconds of imports): import them explicitly,
``from dsv3lab.parallel.pipeline import PipelineSpec, run_pipeline``.

Everything here runs on a CPU with gloo; the same code runs on NCCL GPUs under ``torchrun``. Notebooks: 08, 09, 11.
"""

from .launch import free_port, spawn
from .overlap import overlapped_forward_backward
from .schedules import Action, Schedule, ScheduleError, check_schedule, make_schedule, with_comms
from .simulator import Costs, Timeline, simulate, table2
from .stages import StageModule, split_model

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
