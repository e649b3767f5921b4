"""Expert parallelism: the MoE layer over a process group, with all-to-all dispatch and combine (DeepSeek-V3 §3.2.2,
§3.4).

Under expert parallelism (EP) each of the ``ep`` ranks of a process group owns ``n_routed_experts / ep`` routed
experts; the router (``Gate``) and the shared expert are replicated, and every rank brings its own tokens (data
parallel). One MoE layer then runs in five steps on every rank:

1. **route** its tokens exactly as the single-process :class:`dsv3lab.model.MoE` does (same ``Gate``);
2. **plan**: map each chosen expert to a physical slot (:class:`ExpertPlacement`) and each slot to the rank holding
   it; a token goes **once to each rank** that holds any of its experts, carrying its K gate weights and, for each
   of its K choices, the slot on that rank (or -1) — the layout of DeepEP's ``dispatch``;
3. **dispatch**: exchange the per-rank row counts first (``all_to_all_single`` on a [ep] tensor), then the rows
   (``all_to_all_single`` with uneven splits);
4. **compute** the received (row, expert) pairs with the local experts (:class:`dsv3lab.model.Experts`: the loop or
   the grouped GEMM, FP8 when the config asks), each output already multiplied by its gate weight and summed per row;
5. **combine**: send each row's sum back to its source rank (the reverse all-to-all) and add the rows of a token.

Dispatch and combine are the same exchange in opposite directions, so the backward of the dispatch is a combine and
the backward of the combine is a dispatch (:class:`Dispatch`, :class:`Combine`). Everything is exact: the output and
every gradient equal the single-process layer on the union of the ranks' tokens (up to fp32 summation order; the
tests use 2 and 4 real processes over gloo).

Weights are held by **global expert index**: :class:`ExpertPlacement` says which logical expert each local slot
holds; :meth:`ExpertParallelMoE.load_global_state_dict` takes a single-process MoE's state dict (experts stacked
[E, ...] — the layout of every dsv3lab checkpoint and of the official checkpoint once ``dsv3lab.infer`` has mapped
its names) and keeps this rank's rows, so one checkpoint loads into any EP size; :meth:`global_state_dict` gathers
it back. A placement may give an expert several slots (**redundant experts**, chosen by
:func:`dsv3lab.parallel.eplb.rebalance_experts`): each replica then takes an equal share of that expert's (token,
expert) pairs (round robin), which changes which GPU computes them and nothing else.

Bias update: each rank counts the experts its own tokens chose (``MoE.tokens_per_expert``);
:func:`dsv3lab.balance.update_selection_bias` all-reduces these counts over the group of ranks that hold the layer
(default: the whole world — right for EP and for DP × EP, where every rank has different tokens), so every rank
applies the bias update of single-process training on the whole batch.

Notebook: 09_expert_parallel. Runs with gloo on CPU; the same code runs with NCCL on GPUs.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..balance import bias_delta, update_selection_bias
from ..config import ModelConfig
from ..model import Experts, MoE, build_model
from .eplb import rebalance_experts
from .launch import spawn


# ---------------------------------------------------------------------- placement: which rank holds which experts
class ExpertPlacement:
    """Physical expert slots over ``n_ranks`` ranks: ``phy2log`` [P] gives the logical expert held by slot p, and
    rank r holds the slots [r·P/n_ranks, (r+1)·P/n_ranks). Without redundant experts P = E and slot e holds expert e
    (:meth:`contiguous`); a row of EPLB's ``phy2log`` is a placement with redundant experts."""

    def __init__(self, phy2log: torch.Tensor | list[int], n_ranks: int, n_experts: int | None = None):
        phy2log = torch.as_tensor(phy2log, dtype=torch.int64).flatten().cpu()
        n_experts = int(phy2log.max()) + 1 if n_experts is None else n_experts
        if n_ranks < 1 or phy2log.numel() % n_ranks:
            raise ValueError(f"n_ranks ({n_ranks}) must divide the {phy2log.numel()} physical slots evenly")
        if (phy2log < 0).any() or (phy2log >= n_experts).any():
            raise ValueError(f"phy2log must hold logical expert ids in [0, {n_experts})")
        self.phy2log = phy2log
        self.n_ranks = n_ranks
        self.n_experts = n_experts
        self.logcnt = torch.bincount(phy2log, minlength=n_experts)  # [E] replicas of each expert
        if (self.logcnt == 0).any():
            missing = (self.logcnt == 0).nonzero().flatten().tolist()
            raise ValueError(f"every logical expert needs a slot; experts {missing} have none")
        # log2phy [E, max replicas]: the slots of each expert in slot order, padded with -1
        self.log2phy = torch.full((n_experts, int(self.logcnt.max())), -1, dtype=torch.int64)
        order = torch.argsort(phy2log, stable=True)  # slots grouped by expert
        starts = torch.cumsum(self.logcnt, 0) - self.logcnt  # [E]
        rank_in_expert = torch.arange(phy2log.numel()) - starts[phy2log[order]]
        self.log2phy[phy2log[order], rank_in_expert] = order

    @classmethod
    def contiguous(cls, n_experts: int, n_ranks: int) -> ExpertPlacement:
        """No redundancy: expert e on rank e // (E / n_ranks) (the official code's EP layout)."""
        if n_ranks < 1 or n_experts % n_ranks:
            raise ValueError(f"n_routed_experts ({n_experts}) must be divisible by the EP size ({n_ranks})")
        return cls(torch.arange(n_experts), n_ranks, n_experts)

    @property
    def n_slots(self) -> int:
        return self.phy2log.numel()

    @property
    def slots_per_rank(self) -> int:
        return self.n_slots // self.n_ranks

    def expert_ids(self, rank: int) -> list[int]:
        """The logical expert held by each of ``rank``'s slots (its global indices)."""
        s = self.slots_per_rank
        return self.phy2log[rank * s : (rank + 1) * s].tolist()

    def assign(self, indices: torch.Tensor) -> torch.Tensor:
        """Physical slot of each (token, choice) pair: indices [T, K] logical experts -> slots [T, K]. An expert with
        c replicas sends its j-th pair (in token order) to replica j mod c: its tokens split evenly over them."""
        flat = indices.flatten()  # [T*K]
        log2phy, logcnt = self.log2phy.to(flat.device), self.logcnt.to(flat.device)
        if log2phy.shape[1] == 1:  # no redundant experts
            return log2phy[flat, 0].view_as(indices)
        order = torch.argsort(flat, stable=True)  # pairs grouped by expert, in token order
        counts = torch.bincount(flat, minlength=self.n_experts)
        starts = torch.cumsum(counts, 0) - counts  # [E]
        nth = torch.empty_like(flat)
        nth[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]  # j: the pair's rank
        return log2phy[flat, nth % logcnt[flat]].view_as(indices)


# ---------------------------------------------------------------------- the dispatch plan (pure, no communication)
@dataclass
class DispatchPlan:
    """What one rank sends. Rows are (token, destination rank) pairs, grouped by destination rank, then by token.

    * ``token`` [N]: the source token of each row;
    * ``send_counts`` [n_ranks] (int64): rows for each destination rank;
    * ``local_slot`` [N, K]: for each of the token's K choices, the slot on the destination rank that computes it,
      or -1 when another rank does.
    """

    token: torch.Tensor
    send_counts: torch.Tensor
    local_slot: torch.Tensor


def plan_dispatch(slots: torch.Tensor, slots_per_rank: int, n_ranks: int) -> DispatchPlan:
    """slots [T, K] physical slots chosen by each token -> the rows this rank sends (each token once per rank)."""
    dest = slots // slots_per_rank  # [T, K] rank holding each choice
    to_rank = torch.zeros(slots.shape[0], n_ranks, dtype=torch.bool, device=slots.device)
    to_rank.scatter_(1, dest, True)  # [T, R]: does token t go to rank r
    rank, token = to_rank.T.nonzero(as_tuple=True)  # [N] each: by destination rank, then by token
    here = dest[token] == rank[:, None]  # [N, K]: choices computed by the row's destination
    local_slot = torch.where(here, slots[token] - rank[:, None] * slots_per_rank, -1)  # [N, K]
    return DispatchPlan(token, to_rank.sum(0), local_slot)


# ---------------------------------------------------------------------- the exchange and its two directions
def all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group=None) -> torch.Tensor:
    """Rows x [sum(send_counts), ...] (grouped by destination rank) -> the rows received [sum(recv_counts), ...]."""
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(
        out, x.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts, group=group
    )
    return out


def exchange_counts(send_counts: torch.Tensor, group=None) -> torch.Tensor:
    """Counts first: rank r learns how many rows every rank will send it. send_counts [R] int64 -> recv_counts [R]."""
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv


class Dispatch(torch.autograd.Function):
    """Send rows to the ranks that hold their experts. Backward: the gradients of the received rows go back to the
    rows' owners — the exchange of a :class:`Combine`."""

    @staticmethod
    def forward(ctx, rows, send_counts, recv_counts, group):
        ctx.counts, ctx.group = (send_counts, recv_counts), group
        return all_to_all(rows, send_counts, recv_counts, group)

    @staticmethod
    def backward(ctx, grad):
        send_counts, recv_counts = ctx.counts
        return all_to_all(grad, recv_counts, send_counts, ctx.group), None, None, None


class Combine(torch.autograd.Function):
    """Return the expert outputs of the received rows to their source ranks (the reverse exchange). Backward: the
    gradients of the returned rows travel to the expert ranks again — the exchange of a :class:`Dispatch`.

    ``received`` (the rows this rank got from its dispatch) carries no data here: it keeps every rank's combine in the
    autograd graph even when this rank computed nothing (no tokens arrived), because the backward all-to-all is a
    collective that every rank must join.
    """

    @staticmethod
    def forward(ctx, out_rows, received, send_counts, recv_counts, group):
        ctx.counts, ctx.group = (send_counts, recv_counts), group
        ctx.received = (received.shape, received.dtype, received.device)
        return all_to_all(out_rows, recv_counts, send_counts, group)

    @staticmethod
    def backward(ctx, grad):
        send_counts, recv_counts = ctx.counts
        shape, dtype, device = ctx.received
        grad_rows = all_to_all(grad, send_counts, recv_counts, ctx.group)
        return grad_rows, torch.zeros(shape, dtype=dtype, device=device), None, None, None


# ---------------------------------------------------------------------- the expert bank of one rank
def _bank_config(cfg: ModelConfig, n_slots: int) -> ModelConfig:
    """The config of a rank's local expert bank: ``n_slots`` experts, each (row, choice) pair routed to one of them
    (only the fields ``Experts`` reads — sizes, implementation, FP8 — matter)."""
    return cfg.replace(n_routed_experts=n_slots, n_activated_experts=1, n_expert_groups=1, n_limited_groups=1)


def _group_info(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "expert parallelism needs an initialised torch.distributed process group "
            "(torchrun, or dsv3lab.parallel.spawn)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


class EPExperts(Experts):
    """A drop-in for :class:`dsv3lab.model.Experts` under EP: called with the *global* routing (x [T, dim], gate
    weights [T, K], logical expert indices [T, K]) like the single-process bank, it dispatches the tokens, runs this
    rank's slots (``w1``/``w2``/``w3`` [slots_per_rank, ...], the logical experts ``expert_ids``) and combines.

    After each forward: ``last_send_counts`` / ``last_recv_counts`` (rows to / from each rank) and ``last_slot_load``
    [slots_per_rank] ((token, expert) pairs computed by each local slot; their sum is this GPU's load).
    """

    def __init__(self, cfg: ModelConfig, group=None, placement: ExpertPlacement | None = None):
        rank, ep = _group_info(group)
        placement = placement or ExpertPlacement.contiguous(cfg.n_routed_experts, ep)
        if placement.n_ranks != ep or placement.n_experts != cfg.n_routed_experts:
            raise ValueError(
                f"placement is for {placement.n_ranks} ranks and {placement.n_experts} experts; the group has {ep} "
                f"ranks and the config {cfg.n_routed_experts} routed experts"
            )
        super().__init__(_bank_config(cfg, placement.slots_per_rank))
        self.group, self.rank, self.ep = group, rank, ep
        self.placement = placement
        self.n_logical = cfg.n_routed_experts
        self.expert_ids = placement.expert_ids(rank)  # global index of each local slot
        self.last_send_counts: list[int] = []
        self.last_recv_counts: list[int] = []
        self.last_slot_load: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"rank {self.rank}/{self.ep}, slots {self.n_experts} -> experts {self.expert_ids}"

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        # x: [T, dim]; weights, indices: [T, K] (logical experts) -> [T, dim]
        dim, k = x.shape[1], indices.shape[1]
        # 1. plan: slots, destination ranks, one row per (token, rank)
        slots = self.placement.assign(indices)  # [T, K]
        plan = plan_dispatch(slots, self.placement.slots_per_rank, self.ep)
        # 2. counts first, then the rows: token and its K gate weights in one exchange, the slots in another
        recv_counts = exchange_counts(plan.send_counts, self.group)  # [R]
        send, recv = plan.send_counts.tolist(), recv_counts.tolist()
        rows = torch.cat([x, weights.to(x.dtype)], dim=-1)[plan.token]  # [N_send, dim + K]
        received = Dispatch.apply(rows, send, recv, self.group)  # [N_recv, dim + K]
        recv_slot = all_to_all(plan.local_slot, send, recv, self.group)  # [N_recv, K], -1 = not here
        recv_x, recv_w = received.split([dim, k], dim=-1)  # [N_recv, dim], [N_recv, K]
        # 3. the local experts on the (row, choice) pairs that this rank computes
        row, choice = (recv_slot >= 0).nonzero(as_tuple=True)  # [P] each
        pair_slot = recv_slot[row, choice]  # [P]
        out = super().forward(recv_x[row], recv_w[row, choice, None], pair_slot[:, None])  # [P, dim], weighted
        y_recv = recv_x.new_zeros(recv_x.shape).index_add(0, row, out)  # [N_recv, dim]: Σ over this rank's experts
        # 4. combine: the sums go back to their tokens' ranks and add up
        back = Combine.apply(y_recv, received, send, recv, self.group)  # [N_send, dim]
        self.last_send_counts, self.last_recv_counts = send, recv
        self.last_slot_load = torch.bincount(pair_slot, minlength=self.n_experts).cpu()
        return x.new_zeros(x.shape).index_add(0, plan.token, back)


# ---------------------------------------------------------------------- the layer
class ExpertParallelMoE(MoE):
    """:class:`dsv3lab.model.MoE` with its routed experts spread over a process group (``group``, default: the
    world). Same gate, shared experts, counters and balance losses (inherited); ``experts`` is an :class:`EPExperts`
    holding only this rank's slots of ``placement`` (default: n_routed_experts / ep contiguous experts per rank).

    Like every dsv3lab module, construction allocates shapes only: call ``init_weights`` or
    :meth:`load_global_state_dict` (or build the whole model with :func:`shard_moe_layers`).
    """

    def __init__(self, cfg: ModelConfig, group=None, placement: ExpertPlacement | None = None):
        device = torch.get_default_device()
        with torch.device("meta"):  # the single-process parts, shapes only: its global expert bank is never allocated
            super().__init__(cfg)
        self.experts = EPExperts(cfg, group, placement)  # ... and is replaced by this rank's slots
        self.to_empty(device=device)
        self.tokens_per_expert.zero_()

    @property
    def expert_ids(self) -> list[int]:
        return self.experts.expert_ids

    def load_global_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load a single-process MoE's state dict: experts stacked [n_routed_experts, ...] by global index; this rank
        keeps the rows of the experts its slots hold (a replicated expert's rows are copied to each replica)."""
        ids = torch.tensor(self.experts.expert_ids)
        local = {}
        for name, value in state.items():
            if name.startswith("experts."):
                if value.shape[0] != self.experts.n_logical:
                    raise ValueError(
                        f"{name}: expected the global expert stack [{self.experts.n_logical}, ...], "
                        f"got shape {tuple(value.shape)}"
                    )
                value = value[ids.to(value.device)]
            local[name] = value
        self.load_state_dict(local, strict=strict)
        self.tokens_per_expert.zero_()

    @torch.no_grad()
    def global_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-process MoE's state dict (experts stacked by global index), gathered from every rank (a
        collective: every rank of the group must call it)."""
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        first_slot = self.experts.placement.log2phy[:, 0]  # [E] a slot holding each logical expert
        for name in ("w1", "w2", "w3"):
            w = self.experts.weight_of(name).detach().contiguous()  # [slots_per_rank, ...]
            parts = [torch.empty_like(w) for _ in range(self.experts.ep)]
            dist.all_gather(parts, w, group=self.experts.group)
            state[f"experts.{name}"] = torch.cat(parts)[first_slot.to(w.device)]  # [E, ...]
        return state


def shard_moe_layers(model: nn.Module, group=None, placements: list[ExpertPlacement | None] | None = None) -> nn.Module:
    """Replace every :class:`MoE` of ``model`` (main layers then MTP blocks, the order of ``model.moe_layers()``) by
    an :class:`ExpertParallelMoE` over ``group`` holding the same weights; ``placements`` optionally gives each layer
    its placement (e.g. rows of EPLB's ``phy2log``). Every rank must hold the same full model before (e.g. built with
    the same seed, or loaded from one checkpoint). Returns ``model``, changed in place."""
    moes = [m for m in model.modules() if type(m) is MoE]
    if placements is not None and len(placements) != len(moes):
        raise ValueError(f"placements has {len(placements)} entries for {len(moes)} MoE layers")
    replace = {id(m): i for i, m in enumerate(moes)}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) not in replace:
                continue
            placement = placements[replace[id(child)]] if placements is not None else None
            p = next(child.parameters())
            with torch.device(p.device):
                ep_moe = ExpertParallelMoE(child.cfg, group, placement)
            ep_moe.load_global_state_dict(child.state_dict())
            ep_moe.to(p.dtype)
            ep_moe.train(child.training)
            setattr(parent, name, ep_moe)
    return model


def expert_parameters(module: nn.Module) -> set[int]:
    """ids of the parameters that live in :class:`EPExperts` banks (sharded by EP, not replicated)."""
    return {id(p) for m in module.modules() if isinstance(m, EPExperts) for p in m.parameters()}


@torch.no_grad()
def sync_gradients(module: nn.Module, dense_group=None, expert_group=None, average: bool = False) -> None:
    """Data-parallel gradient reduction under EP: every replicated parameter (attention, router, shared expert …)
    is all-reduced over ``dense_group`` (default: the world); the parameters of the expert banks over
    ``expert_group``, the ranks holding the same slots (the data-parallel replicas of this EP rank; None = there are
    none, the bank already has the gradient of every token routed to it). ``average`` divides by the size of the
    dense group (for losses averaged per rank). Redundant replicas of one expert are not summed here (they serve
    inference)."""
    experts = expert_parameters(module)
    world = dist.get_world_size(dense_group)
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # a rank that used no token of this parameter still joins the reduction
        if id(p) in experts:
            if expert_group is not None:
                dist.all_reduce(p.grad, group=expert_group)
        else:
            dist.all_reduce(p.grad, group=dense_group)
        if average:
            p.grad /= world


# ---------------------------------------------------------------------- the end-to-end check behind `dsv3lab ep`
def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max()) if a.numel() else 0.0


def ep_check(
    preset: str = "tiny",
    batch: int = 2,
    seq_len: int = 16,
    seed: int = 0,
    replicas: int = 0,
    gamma: float = 1e-3,
    group=None,
    **overrides,
) -> dict:
    """Run on every rank of an initialised group: the model of ``preset`` trained one step with its MoE layers
    sharded over the group, against the same model in one process on the union of the ranks' batches.

    Returns (on every rank) the largest differences — logits, loss, every gradient (averaged over ranks as data
    parallelism does), the selection bias after the aux-loss-free update — and this rank's rows sent/received and
    (token, expert) pairs per layer. With ``replicas`` > n_routed_experts, the experts are also re-placed by EPLB
    from the step's loads (that many slots per layer) and the same tokens run again in eval mode: logits against no
    replication, and the per-GPU loads before and after.
    """
    rank, world = _group_info(group)
    cfg = ModelConfig.preset(preset, **overrides)
    if replicas and (replicas < cfg.n_routed_experts or replicas % world):
        raise ValueError(f"replicas must be >= n_routed_experts and a multiple of the {world} ranks, got {replicas}")
    # NCCL needs the tensors on this rank's GPU; gloo runs on the CPU
    dev = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    )
    ref = build_model(cfg, device=dev, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a non-zero selection bias, so that it matters
        for moe in ref.moe_layers():
            if moe.gate.bias is not None:
                moe.gate.bias.copy_(torch.randn(moe.gate.bias.shape, generator=g) * 0.05)
    model = shard_moe_layers(copy.deepcopy(ref), group)
    tokens = torch.randint(0, cfg.vocab_size, (world * batch, seq_len + 1), generator=g).to(dev)
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    mine = slice(rank * batch, (rank + 1) * batch)

    ref.train()
    model.train()
    logits_ref, losses_ref = ref(inp, tgt)
    losses_ref["total"].backward()
    logits, losses = model(inp[mine], tgt[mine])
    losses["total"].backward()
    sync_gradients(model, group, average=True)
    loss = losses["total"].detach().clone()
    dist.all_reduce(loss, group=group)

    ref_params = dict(ref.named_parameters())
    grad_diff = 0.0
    for name, p in model.named_parameters():
        ref_grad = ref_params[name].grad
        ref_grad = torch.zeros_like(ref_params[name]) if ref_grad is None else ref_grad
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(owner, EPExperts):
            ref_grad = ref_grad[torch.tensor(owner.expert_ids)]
        grad_diff = max(grad_diff, _max_diff(p.grad, ref_grad))

    ref_counts = torch.stack([m.tokens_per_expert.clone() for m in ref.moe_layers()])  # [L, E] single process
    bias_before = [m.gate.bias.clone() for m in ref.moe_layers()]
    counts = update_selection_bias(model.moe_layers(), gamma, group=group)  # all-reduced over the group
    bias_diff = max(
        _max_diff(m.gate.bias, b + bias_delta(c, gamma)) for m, b, c in zip(model.moe_layers(), bias_before, ref_counts)
    )
    layers = model.moe_layers()
    result = {
        "rank": rank,
        "world": world,
        "preset": preset,
        "tokens": inp[mine].numel(),
        "max_abs_diff": {
            "logits": _max_diff(logits, logits_ref[mine]),
            "loss": _max_diff(loss / world, losses_ref["total"]),
            "grad": grad_diff,
            "bias": bias_diff,
            "counts": _max_diff(counts, ref_counts.cpu()),
        },
        "rows_sent": [m.experts.last_send_counts for m in layers],
        "rows_received": [m.experts.last_recv_counts for m in layers],
        "pairs": [int(m.experts.last_slot_load.sum()) for m in layers],
        "expert_ids": [m.expert_ids for m in layers],
    }
    if replicas:
        phy2log, _, _ = rebalance_experts(counts.float(), replicas, cfg.n_expert_groups, 1, world)
        placements = [ExpertPlacement(row, world, cfg.n_routed_experts) for row in phy2log]
        plain = shard_moe_layers(copy.deepcopy(ref), group).eval()  # the weights before the step, no replicas
        replicated = shard_moe_layers(copy.deepcopy(ref), group, placements).eval()
        with torch.no_grad():
            base = plain(inp[mine])[0]
            out = replicated(inp[mine])[0]
        result["max_abs_diff"]["logits_replicated"] = _max_diff(out, base)
        result["pairs_before"] = [int(m.experts.last_slot_load.sum()) for m in plain.moe_layers(include_mtp=False)]
        result["pairs_after"] = [int(m.experts.last_slot_load.sum()) for m in replicated.moe_layers(include_mtp=False)]
        result["expert_ids_replicated"] = [m.expert_ids for m in replicated.moe_layers(include_mtp=False)]
    return result


def _ep_rank(rank: int, world: int, kwargs: dict) -> dict:
    return ep_check(**kwargs)


def run_ep_check(nproc: int = 2, threads: int = 1, **kwargs) -> list[dict] | None:
    """:func:`ep_check` on every rank, returning all ranks' results in rank order. Under ``torchrun`` (``RANK`` and
    ``WORLD_SIZE`` set) it joins the launched group (NCCL when CUDA is there, else gloo) and gathers the results on
    rank 0 (the other ranks return None); otherwise it starts ``nproc`` processes with
    :func:`dsv3lab.parallel.spawn`."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        torch.set_num_threads(threads)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        try:
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            result = ep_check(**kwargs)
            results: list = [None] * dist.get_world_size()
            dist.all_gather_object(results, result)
            rank = dist.get_rank()
        finally:
            dist.destroy_process_group()
        return results if rank == 0 else None
    backend = "nccl" if torch.cuda.device_count() >= nproc else "gloo"  # one GPU per rank, or CPU processes
    return spawn(_ep_rank, nproc, kwargs, backend=backend, threads=threads)


def format_ep_check(results: list[dict]) -> str:
    """The per-rank table and verdict printed by ``dsv3lab ep``."""
    first = results[0]
    lines = [
        f"expert parallelism: {first['preset']} preset on {first['world']} ranks, one training step against one "
        "process on the union of the batches",
        f"{'rank':>4} {'tokens':>6} {'experts (layer 0)':>18} {'rows sent (layer 0)':>22} {'rows received':>16} "
        f"{'pairs/layer':>14}" + (f" {'pairs before → after EPLB':>26}" if "pairs_after" in first else ""),
    ]
    for r in results:
        line = (
            f"{r['rank']:>4} {r['tokens']:>6} {str(r['expert_ids'][0]):>18} {str(r['rows_sent'][0]):>22} "
            f"{str(r['rows_received'][0]):>16} {str(r['pairs']):>14}"
        )
        if "pairs_after" in r:
            line += f" {str(r['pairs_before']) + ' → ' + str(r['pairs_after']):>26}"
        lines.append(line)
    worst = {k: max(r["max_abs_diff"][k] for r in results) for k in first["max_abs_diff"]}
    lines.append("max |difference| vs one process: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    if "pairs_after" in first:
        before = [r["pairs_before"][0] for r in results]
        after = [r["pairs_after"][0] for r in results]
        lines.append(
            f"layer 0 load per GPU (token-expert pairs): max/mean {max(before) / (sum(before) / len(before)):.3f} "
            f"without replicas → {max(after) / (sum(after) / len(after)):.3f} with EPLB's "
            f"{len(first['expert_ids_replicated'][0]) * first['world']} slots"
        )
    return "\n".join(lines)
