"""Running the model on many processes (DeepSeek-V3 §3.2, §3.4): pipeline schedules and their simulator, the
pipeline and expert-parallel runtime on ``torch.distributed``, and EPLB.

Modules, one concept each:

* ``launch``   start real processes (``torch.multiprocessing`` + gloo on CPU, NCCL on GPUs) and collect results

Everything here runs on a CPU with gloo; the same code runs on NCCL GPUs under ``torchrun``. Notebooks: 08, 09, 11.
"""

from .launch import free_port, spawn

__all__ = ["free_port", "spawn"]
