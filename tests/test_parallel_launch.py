"""dsv3lab.parallel.spawn: real processes in one gloo group; results in rank order; a failing rank is reported."""

import pytest
import torch
import torch.distributed as dist

from dsv3lab.parallel import spawn
from dsv3lab.parallel.launch import RankFailed


def _sum_of_ranks(rank, world_size, scale):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return rank, world_size, t.item() * scale


def _fails_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("rank one says no")
    return rank


def test_spawn_runs_real_ranks_in_one_group():
    out = spawn(_sum_of_ranks, 2, 10.0)
    assert out == [(0, 2, 30.0), (1, 2, 30.0)]  # (1 + 2) * 10 on both ranks, in rank order


def test_a_failing_rank_raises_with_its_traceback():
    with pytest.raises(RankFailed, match="rank 1:(.|\n)*rank one says no"):
        spawn(_fails_on_rank_1, 2, timeout=60)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="world_size"):
        spawn(_sum_of_ranks, 0, 1.0)
    with pytest.raises(ValueError, match="backend"):
        spawn(_sum_of_ranks, 2, 1.0, backend="mpi")
