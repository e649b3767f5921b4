"""Pipeline schedules as data: generators valid, the checker rejects broken schedules, orders equal torch's."""

import dataclasses
from unittest import mock

import pytest
from torch.distributed.pipelining import (
    PipelineStage,
    ScheduleDualPipeV,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

from dsv3lab.parallel.schedules import (
    SCHEDULES,
    ScheduleError,
    check_schedule,
    dualpipe,
    dualpipev,
    execution_order,
    from_torch_actions,
    make_schedule,
    one_f_one_b,
    with_comms,
    zb1p,
)

SIZES = [(2, 4), (4, 8), (4, 10), (6, 12), (8, 20)]


def torch_order(schedule_cls, pp, n_micro, local_stages):
    """torch's per-rank action lists for a schedule class: the class is built on stand-in stage objects (no process
    group is needed to compute the order), as torch's own schedule visualiser does."""
    stage = mock.create_autospec(PipelineStage, instance=True)
    stage.group_rank, stage.group_size, stage.submod, stage.num_stages = 0, pp, None, pp * local_stages
    return schedule_cls([stage] * local_stages, n_micro).pipeline_order


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("pp,n_micro", SIZES)
def test_generated_schedules_are_valid_with_and_without_transfers(name, pp, n_micro):
    s = check_schedule(make_schedule(name, pp, n_micro))
    check_schedule(with_comms(s))
    assert s.n_micro == n_micro and s.pp == pp
    assert s.n_ranks == (pp // 2 if name == "dualpipev" else pp)
    assert len(execution_order(s)) == sum(len(s.compute_actions(r)) for r in range(s.n_ranks))


def test_1f1b_equals_torch_schedule_1f1b_up_to_torchs_last_rank_numbering():
    from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops  # private: an oracle in tests only

    for pp, n_micro in SIZES:
        ours = one_f_one_b(pp, n_micro)
        theirs = from_torch_actions(get_schedule_ops("1F1B", pp, n_micro))
        assert ours.table()[:-1] == theirs.table()[:-1]
        # torch's reported table numbers the last rank's forwards from 1 (F1 … FM, no F0): our checker rejects it;
        # renumbered, it is ours. (torch's 1F1B executor does not run from this table.)
        with pytest.raises(ScheduleError, match="before its forward"):
            check_schedule(theirs)
        last = [dataclasses.replace(a, mb=a.mb - 1) if a.kind == "F" else a for a in theirs.actions[-1]]
        assert last == ours.actions[-1]


@pytest.mark.parametrize("pp,n_micro", [(2, 4), (4, 8), (4, 12), (3, 6)])
def test_zb1p_equals_torch_interleaved_zero_bubble_at_one_stage_per_rank(pp, n_micro):
    theirs = from_torch_actions(torch_order(ScheduleInterleavedZeroBubble, pp, n_micro, 1))
    assert zb1p(pp, n_micro).table() == theirs.table()


@pytest.mark.parametrize("ranks,n_micro", [(2, 4), (2, 7), (3, 6), (4, 8), (4, 13)])
def test_dualpipev_equals_torch_schedule_dualpipev(ranks, n_micro):
    theirs = from_torch_actions(torch_order(ScheduleDualPipeV, ranks, n_micro, 2))
    ours = dualpipev(2 * ranks, n_micro)
    assert ours.table() == theirs.table()
    assert ours.stage_rank == theirs.stage_rank  # the V: rank r holds stages r and 2N-1-r


@pytest.mark.parametrize("cls,local", [(ScheduleZBVZeroBubble, 2), (ScheduleInterleavedZeroBubble, 2)])
def test_torchs_multi_stage_zero_bubble_tables_pass_the_checker(cls, local):
    s = check_schedule(from_torch_actions(torch_order(cls, 4, 8, local)))
    assert {a.kind for r in range(4) for a in s.actions[r]} == {"F", "B", "W"}


def test_dualpipe_rank_tables_follow_deepseeks_eight_phases_by_hand():
    # PP = 4, 8 micro-batches (4 per direction). Rank 0 (h = 0), from the phase table of deepseek-ai/DualPipe:
    # 1: 2(PP/2-h-1) = 2 F0; 2: h+1 = 1 F0F1; 3: 1 B1W1F1; 4: M/2-PP+h+1 = 1 F0B1 F1B0 (overlapped);
    # 5: 1 B1 F1B0; 6: 1 B1B0 (the B0 with its W postponed); 7: 1 W B0; 8: 1 W.
    # Direction 0 is virtual stages 0..3 (micro-batches 0..3), direction 1 is 4..7 (micro-batches 4..7), rank 0
    # holds virtual stage 0 and virtual stage 7 (model stage 3 of direction 1).
    rank0 = "0F0 0F1 0F2 7F4 7B4 7W4 7F5 (0F3;7BW5) (7F6;0BW0) 7BW6 (7F7;0BW1) 7BW7 0B2 0W2 0B3 0W3".split()
    # Rank 1 (h = 1, a middle rank): phase 4 starts with a plain F0 then B1, not overlapped.
    rank1 = "1F0 6F4 1F1 6F5 1F2 6BW4 (6F6;1BW0) (1F3;6BW5) (6F7;1BW1) 6BW6 1BW2 6B7 1B3 6W7 1W3".split()
    t = dualpipe(4, 8).table()
    assert t[0] == rank0 and t[1] == rank1


def test_dualpipe_is_mirror_symmetric():
    pp, m = 8, 20
    s = dualpipe(pp, m)
    half = m // 2

    def mirror(v):  # direction 0 stage v <-> direction 1 stage with the same model stage, and back
        return v + pp if v < pp else v - pp

    for r in range(pp):
        mirrored = [
            str(dataclasses.replace(a, stage=mirror(a.stage), mb=(a.mb + half) % m))
            if a.pair is None
            else "("
            + ";".join(str(dataclasses.replace(p, stage=mirror(p.stage), mb=(p.mb + half) % m)) for p in a.pair)
            + ")"
            for a in s.actions[pp - 1 - r]
        ]
        assert mirrored == s.table()[r]
    assert [len(s.stages_of(r)) for r in range(pp)] == [2] * pp  # two copies of the parameters per rank


def _corrupt(s, rank, new_list):
    actions = [list(a) for a in s.actions]
    actions[rank] = new_list
    return dataclasses.replace(s, actions=actions)


def test_checker_rejects_corrupted_schedules():
    s = check_schedule(one_f_one_b(2, 2))  # rank 0: F0 F1 BW0 BW1 ... rank 1: F0 BW0 F1 BW1
    r1 = s.actions[1]
    with pytest.raises(ScheduleError, match="before its forward"):
        check_schedule(_corrupt(s, 1, [r1[1], r1[0], r1[2], r1[3]]))  # a backward before its forward
    with pytest.raises(ScheduleError, match="appears 0 times"):
        check_schedule(_corrupt(s, 1, r1[:2]))  # a micro-batch dropped
    with pytest.raises(ScheduleError, match="has 0 full backward"):
        check_schedule(_corrupt(s, 1, r1[:3]))  # a backward dropped
    with pytest.raises(ScheduleError, match="appears 2 times"):
        check_schedule(_corrupt(s, 1, r1 + [r1[0]]))  # processed twice
    with pytest.raises(ScheduleError, match="lives on rank 1"):
        check_schedule(_corrupt(s, 0, s.actions[0] + [r1[0]]))  # on the wrong rank
    r0 = s.actions[0]
    crossed = _corrupt(_corrupt(s, 0, [r0[0], r0[2], r0[1], r0[3]]), 1, [r1[2], r1[3], r1[0], r1[1]])
    with pytest.raises(ScheduleError, match="deadlock"):  # rank 0 waits for 1BW0 before 0F1, rank 1 for 0F1 first
        check_schedule(crossed)
    z = zb1p(2, 2)
    zr = z.actions[0]
    assert z.table()[0] == ["0F0", "0F1", "0B0", "0W0", "0B1", "0W1"]
    with pytest.raises(ScheduleError, match="before its input gradient"):
        check_schedule(_corrupt(z, 0, [zr[0], zr[1], zr[3], zr[2], zr[4], zr[5]]))
    with pytest.raises(ScheduleError, match="one BW, or one B and one W"):
        check_schedule(_corrupt(z, 0, [a for a in zr if a.kind != "W"]))
    with pytest.raises(ScheduleError, match="micro-batch 7 not in"):
        check_schedule(_corrupt(z, 0, [dataclasses.replace(zr[0], mb=7)] + zr[1:]))


def test_checker_rejects_broken_transfers():
    s = with_comms(one_f_one_b(2, 2))
    r1 = s.actions[1]
    no_recv = [a for a in r1 if not (a.kind == "RECV_F" and a.mb == 1)]
    with pytest.raises(ScheduleError, match="before receiving its input"):
        check_schedule(_corrupt(s, 1, no_recv))
    r0 = s.actions[0]
    i = next(i for i, a in enumerate(r0) if a.kind == "SEND_F")
    early = [r0[i]] + r0[:i] + r0[i + 1 :]
    with pytest.raises(ScheduleError, match="before computing it"):
        check_schedule(_corrupt(s, 0, early))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: make_schedule("gpipe", 4, 8), "schedule must be one of"),
        (lambda: dualpipe(3, 12), "pp .ranks. must be even"),
        (lambda: dualpipe(4, 6), "n_micro must be even and >= 2 . pp"),
        (lambda: dualpipe(4, 9), "n_micro must be even"),
        (lambda: dualpipev(4, 3), "n_micro must be >= pp"),
        (lambda: one_f_one_b(0, 4), "pp .pipeline stages. must be an integer >= 1"),
        (lambda: zb1p(4, 0), "n_micro .micro-batches. must be an integer >= 1"),
    ],
)
def test_bad_sizes_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()
