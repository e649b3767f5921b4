"""Running the model on many processes (DeepSeek-V3 §3.2, §3.4): pipeline schedules and their simulator, the
pipeline and expert-parallel runtime on ``torch.distributed``, and EPLB.

Modules, one concept each:

* ``launch``   start real processes (``torch.multiprocessing`` + gloo on CPU, NCCL on GPUs) and collect results
* ``expert``   expert parallelism: the MoE layer over a process group, all-to-all dispatch and combine (§3.2.2)
* ``traffic``  node-limited routing measured: nodes and GPUs per token, IB and NVLink bytes (§3.2.2)
* ``eplb``     the expert-parallel load balancer: redundant experts and their placement on GPUs (§3.4)

Everything here runs on a CPU with gloo; the same code runs on NCCL GPUs under ``torchrun``. Notebooks: 08, 09, 11.
"""

from .eplb import rebalance_experts
from .expert import ExpertParallelMoE, ExpertPlacement, shard_moe_layers, sync_gradients
from .launch import free_port, spawn
from .traffic import Topology, token_traffic

__all__ = [
    "free_port",
    "spawn",
    "ExpertParallelMoE",
    "ExpertPlacement",
    "shard_moe_layers",
    "sync_gradients",
    "Topology",
    "token_traffic",
    "rebalance_experts",
]
