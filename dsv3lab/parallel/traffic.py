"""Node-limited routing and the all-to-all traffic it causes (DeepSeek-V3 §3.2.2, §2.1.2).

DeepSeek-V3 trains with its 256 routed experts spread over 64 GPUs on 8 nodes (EP64: 32 experts per node, 4 on each
of its 8 GPUs). A token that picks experts on many nodes costs InfiniBand (IB, 50 GB/s per GPU)
traffic for each remote node, while NVLink inside a node is faster (160 GB/s). So routing is **node-limited**: the
experts form ``n_expert_groups`` = 8 groups, one group per node, and a token may pick its K_r = 8 experts only from
the M = ``n_limited_groups`` = 4 groups whose two best selection scores sum highest (``dsv3lab.model.Gate``). A
token then reaches at most M nodes.

The dispatch path of the paper: a token crosses IB **once per target node**, to the GPU with the same in-node index
as its own GPU, which forwards it over NVLink to the GPUs of that node that hold its experts (on its own node, the
source GPU sends over NVLink directly). Copies for two experts on one GPU are sent once. Combine runs the same
path backwards. Per token::

    IB copies      = number of target nodes other than the token's own node
    NVLink copies  = number of target GPUs other than the landing GPU of their node (the source GPU on its own node)
    bytes          = copies × bytes per copy: dispatch in FP8 (dim bytes + one fp32 scale per 128 channels),
                     combine in BF16 (2·dim bytes)

The paper's two numbers follow from the bandwidths: one IB copy takes as long as 160/50 = **3.2** NVLink copies, so
a node reached over IB can serve about 3.2 experts (on distinct GPUs) before its NVLink forwarding becomes the
bottleneck, and with M = 4 nodes a token could pick up to 4 × 3.2 = 12.8 ≈ **13** experts "at the same IB cost".
:func:`same_ib_cost` states that arithmetic; :func:`token_traffic` measures copies and bytes on real routing.

Notebook: 09_expert_parallel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from ..config import ModelConfig
from ..model import Gate, MoE

NVLINK_GBPS = 160.0  # H800 NVLink, GB/s per GPU (§3.2.2)
IB_GBPS = 50.0  # InfiniBand, GB/s per GPU (§3.2.2)


@dataclass(frozen=True)
class Topology:
    """``n_experts`` routed experts placed contiguously on ``n_nodes`` × ``gpus_per_node`` GPUs: expert e on GPU
    e // (n_experts / n_gpus), GPU g on node g // gpus_per_node. With ``n_nodes`` = ``n_expert_groups`` each node
    holds exactly one expert group, as in the paper."""

    n_experts: int
    n_nodes: int
    gpus_per_node: int
    nvlink_gbps: float = NVLINK_GBPS
    ib_gbps: float = IB_GBPS

    def __post_init__(self) -> None:
        for name in ("n_experts", "n_nodes", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_experts % self.n_gpus:
            raise ValueError(
                f"n_experts ({self.n_experts}) must split evenly over n_nodes × gpus_per_node = {self.n_gpus} GPUs"
            )
        if self.nvlink_gbps <= 0 or self.ib_gbps <= 0:
            raise ValueError("nvlink_gbps and ib_gbps must be > 0")

    @classmethod
    def for_config(cls, cfg: ModelConfig, gpus_per_node: int = 8, **kwargs) -> Topology:
        """One node per expert group (``n_nodes`` = ``cfg.n_expert_groups``), as DeepSeek-V3's training cluster."""
        return cls(cfg.n_routed_experts, cfg.n_expert_groups, gpus_per_node, **kwargs)

    @property
    def n_gpus(self) -> int:
        return self.n_nodes * self.gpus_per_node

    @property
    def experts_per_gpu(self) -> int:
        return self.n_experts // self.n_gpus

    def gpu_of(self, experts: torch.Tensor) -> torch.Tensor:
        return experts // self.experts_per_gpu

    def node_of(self, experts: torch.Tensor) -> torch.Tensor:
        return self.gpu_of(experts) // self.gpus_per_node


def dispatch_bytes(dim: int) -> int:
    """Bytes of one token copy in the dispatch: FP8 E4M3 activations plus one fp32 scale per 1×128 tile (§3.3.4)."""
    return dim + 4 * math.ceil(dim / 128)


def combine_bytes(dim: int) -> int:
    """Bytes of one token copy in the combine: BF16 (§3.3.4)."""
    return 2 * dim


def _hits(indices: torch.Tensor, topo: Topology) -> torch.Tensor:
    """indices [T, K] -> [T, n_nodes, gpus_per_node] bool: does the token have an expert on that GPU."""
    t = indices.shape[0]
    hit = torch.zeros(t, topo.n_gpus, dtype=torch.bool, device=indices.device)
    hit.scatter_(1, topo.gpu_of(indices), True)
    return hit.view(t, topo.n_nodes, topo.gpus_per_node)


def nodes_per_token(indices: torch.Tensor, topo: Topology) -> torch.Tensor:
    """Distinct nodes holding each token's experts: indices [T, K] -> [T]."""
    return _hits(indices, topo).any(-1).sum(-1)


def gpus_per_token(indices: torch.Tensor, topo: Topology) -> torch.Tensor:
    """Distinct GPUs holding each token's experts: indices [T, K] -> [T]."""
    return _hits(indices, topo).flatten(1).sum(-1)


def token_traffic(
    indices: torch.Tensor, topo: Topology, dim: int, source_gpu: torch.Tensor | None = None
) -> pd.DataFrame:
    """Per token: nodes and GPUs reached, IB and NVLink copies, and the bytes of the dispatch (FP8) and the combine
    (BF16) on each fabric, for the paper's path (IB once per remote node to the same in-node GPU, then NVLink).

    indices [T, K] routed experts; ``source_gpu`` [T] the GPU each token starts on (default: token t on GPU
    t mod n_gpus, i.e. tokens spread evenly over the data-parallel ranks).
    """
    t = indices.shape[0]
    if source_gpu is None:
        source_gpu = torch.arange(t, device=indices.device) % topo.n_gpus
    hit = _hits(indices, topo)  # [T, N, G]
    src_node, src_local = source_gpu // topo.gpus_per_node, source_gpu % topo.gpus_per_node
    node_hit = hit.any(-1)  # [T, N]
    remote = node_hit.clone()
    remote[torch.arange(t), src_node] = False  # the own node needs no IB
    landing = torch.zeros_like(hit)
    landing[torch.arange(t), :, src_local] = True  # on every node the GPU with the source's in-node index
    ib = remote.sum(-1)  # [T]
    nvlink = (hit & ~landing).flatten(1).sum(-1)  # [T]
    d, c = dispatch_bytes(dim), combine_bytes(dim)
    return pd.DataFrame(
        {
            "nodes": node_hit.sum(-1).cpu().numpy(),
            "gpus": hit.flatten(1).sum(-1).cpu().numpy(),
            "ib_copies": ib.cpu().numpy(),
            "nvlink_copies": nvlink.cpu().numpy(),
            "dispatch_ib_bytes": (ib * d).cpu().numpy(),
            "dispatch_nvlink_bytes": (nvlink * d).cpu().numpy(),
            "combine_ib_bytes": (ib * c).cpu().numpy(),
            "combine_nvlink_bytes": (nvlink * c).cpu().numpy(),
        }
    )


def traffic_summary(traffic: pd.DataFrame, topo: Topology, k: int) -> dict[str, float]:
    """Means over tokens of :func:`token_traffic`, the experts per reached node, and the dispatch time per token on
    each fabric (µs, at the topology's bandwidths): IB and NVLink run concurrently, so NVLink is hidden while
    ``t_nvlink_us <= t_ib_us``."""
    mean = traffic.mean()
    out = {name: float(mean[name]) for name in traffic.columns}
    out["experts_per_node"] = k / out["nodes"]
    out["t_ib_us"] = out["dispatch_ib_bytes"] / (topo.ib_gbps * 1e3)  # bytes / (GB/s) = ns; / 1e3 -> µs
    out["t_nvlink_us"] = out["dispatch_nvlink_bytes"] / (topo.nvlink_gbps * 1e3)
    return out


def same_ib_cost(topo: Topology, max_nodes: int) -> dict[str, float]:
    """The paper's arithmetic: NVLink copies that fit in the time of one IB copy (= experts per node "without
    additional NVLink overhead", 3.2 for 160 vs 50 GB/s) and the experts a token could pick over ``max_nodes``
    nodes at the same IB cost (12.8 for M = 4: "up to 13")."""
    per_node = topo.nvlink_gbps / topo.ib_gbps
    return {"experts_per_node": per_node, "max_experts": per_node * max_nodes}


# ---------------------------------------------------------------------- routing to measure
def limited_gate(gate: Gate, cfg: ModelConfig, n_limited_groups: int, n_activated_experts: int | None = None) -> Gate:
    """A copy of ``gate`` (same centroids and selection bias) that keeps ``n_limited_groups`` groups per token (=
    ``n_expert_groups`` for routing without the node limit) and picks ``n_activated_experts`` experts."""
    changes = {"n_limited_groups": n_limited_groups}
    if n_activated_experts is not None:
        changes["n_activated_experts"] = n_activated_experts
    other = Gate(cfg.replace(**changes)).to(gate.weight.device)
    other.load_state_dict(gate.state_dict())
    return other


@torch.no_grad()
def synthetic_routing(
    cfg: ModelConfig,
    n_tokens: int,
    n_limited_groups: int | None = None,
    n_activated_experts: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Routing decisions of a freshly initialised router of ``cfg`` (centroids N(0, init_std), zero bias) on
    N(0, 1) inputs: indices [n_tokens, K]. Synthetic scores at the real shapes (e.g. 256 experts, dim 7168)."""
    g = torch.Generator().manual_seed(seed)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) * cfg.init_std)
        if gate.bias is not None:
            gate.bias.zero_()
    m = cfg.n_limited_groups if n_limited_groups is None else n_limited_groups
    gate = limited_gate(gate, cfg, m, n_activated_experts)
    x = torch.randn(n_tokens, cfg.dim, generator=g)
    return gate(x)[1]


@torch.no_grad()
def router_inputs(model: nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The input [T, dim] of every routed MoE layer of ``model`` (main layers, in order) on ``tokens`` [b, s]."""
    moes = [m for m in model.moe_layers(include_mtp=False) if isinstance(m, MoE)]
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].flatten(0, -2))) for m in moes]
    try:
        model.eval()
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return seen[: len(moes)]


@torch.no_grad()
def model_routing(model: nn.Module, tokens: torch.Tensor, n_limited_groups: int | None = None) -> list[torch.Tensor]:
    """Each routed MoE layer's expert choices [T, K] on ``tokens``, with the model's own routing
    (``n_limited_groups`` None) or with its router keeping ``n_limited_groups`` groups (e.g. all: no node limit)."""
    moes = model.moe_layers(include_mtp=False)
    out = []
    for moe, x in zip(moes, router_inputs(model, tokens)):
        gate = moe.gate if n_limited_groups is None else limited_gate(moe.gate, moe.cfg, n_limited_groups)
        out.append(gate(x)[1])
    return out
