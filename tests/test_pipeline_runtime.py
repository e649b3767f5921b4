"""Pipelined training on real processes (gloo, tiny preset) equals the single-process model on the same micro-batches:
losses, balance losses, every gradient, the selection biases after the bias update — for torch.distributed.pipelining
(1F1B, interleaved zero bubble, ZBV, DualPipeV) and dsv3lab's executor (DualPipe, ZB1P), with MTP D = 1 and the
selection bias on.

Tolerances. First step: |g - g_ref| <= 1e-5 · max|g_ref| per tensor (fp32; the pipelined sums run in another order),
losses to 1e-5, the biases after the first update exactly. Second step, after one AdamW step (whose division by
sqrt(v) turns rounding-level differences of near-zero gradients into parameter differences of up to ~lr): gradients
to 1e-3 · max|g_ref|, losses to 1e-4, biases to 2γ (a token whose top-k flips can turn one expert's -γ into +γ)."""

import numpy as np
import pytest
import torch

from dsv3lab.parallel import spawn
from dsv3lab.parallel.pipeline import (
    RUNTIMES,
    PipelineSpec,
    executed_vs_simulated,
    make_layout,
    pipeline_worker_many,
    reference_run,
)
from dsv3lab.parallel.schedules import make_schedule
from dsv3lab.parallel.stages import split_model, stage_layers

BASE = dict(preset="tiny", overrides=dict(n_layers=4, seq_aux_loss_alpha=0.01), n_micro=4, seq_len=12, steps=2)
NO_MTP = dict(BASE, overrides=dict(n_layers=4, n_mtp=0))  # no MTP (nothing travels beside h), no balance loss
# every schedule the engines run with 2 ranks, and both engines without MTP; dsv3lab's ZB1P and DualPipe without the
# F&B overlap are slow tests
SPECS = [PipelineSpec(schedule=name, return_grads=True, **BASE) for name in RUNTIMES if name != "zb1p"] + [
    PipelineSpec(schedule=name, return_grads=True, **NO_MTP) for name in ("1f1b", "dualpipe")
]
SLOW_SPECS = [
    PipelineSpec(schedule="zb1p", return_grads=True, **BASE),
    PipelineSpec(schedule="dualpipe", overlap=False, return_grads=True, **BASE),
]


@pytest.fixture(scope="module")
def runs():
    """Every 2-rank run in one pair of processes (start-up dominates), and the one reference they all share."""
    out = spawn(pipeline_worker_many, 2, SPECS, timeout=600)
    torch.set_num_threads(1)
    refs = {}
    for spec in SPECS:  # one reference per model configuration
        key = tuple(sorted(spec.overrides.items()))
        if key not in refs:
            refs[key] = reference_run(spec)
    runs = {i: [rank[i] for rank in out] for i in range(len(SPECS))}
    return runs, {i: refs[tuple(sorted(s.overrides.items()))] for i, s in enumerate(SPECS)}


def _aux_per_mb(records, step):
    aux = {}
    for r in records:
        st = r["steps"][step]
        for stage, values in st["aux"].items():
            mbs = st["aux_mbs"][stage] if st["aux_mbs"] else range(len(values))
            for mb, v in zip(mbs, values):
                aux[mb] = aux.get(mb, 0.0) + v
    return aux


def _check_against_reference(records, ref, spec):
    for step in range(spec.steps):
        ref_losses = ref["steps"][step]["losses"]
        seen = []
        for r in records:  # main and MTP losses where they were computed
            st = r["steps"][step]
            for mb, terms in zip(st["loss_mbs"], st["losses"]):
                seen.append(mb)
                for k, v in terms.items():
                    assert v == pytest.approx(ref_losses[mb][k], abs=1e-5 if step == 0 else 1e-4), (step, mb, k)
        assert sorted(seen) == list(range(spec.n_micro))  # every micro-batch's loss, once
        first = step == 0
        aux = _aux_per_mb(records, step)  # balance losses summed over the stages that computed them
        assert sorted(aux) == list(range(spec.n_micro))
        for mb, v in aux.items():
            assert v == pytest.approx(ref_losses[mb]["aux"], rel=1e-5 if first else 1e-3, abs=1e-12)
            assert (v > 0) == (spec.model_config().seq_aux_loss_alpha > 0)
        covered = set()
        for r in records:
            for name, g in r["steps"][step]["grads"].items():
                g_ref = ref["steps"][step]["grads"][name]
                err = (torch.from_numpy(g) - g_ref).abs().max().item()
                tol = 1e-5 if first else 1e-3
                assert err <= tol * g_ref.abs().max().item() + 1e-12, (spec.schedule, step, name, err)
                covered.add(name)
        assert covered == set(ref["steps"][step]["grads"])  # every parameter lives on some rank
        ref_bias = ref["steps"][step]["bias"]
        for r in records:
            for name, b in r["steps"][step]["bias"].items():
                diff = np.abs(b - ref_bias[name].numpy()).max()
                assert diff == 0 if first else diff <= 2 * spec.gamma * 1.0001, (step, name, diff)
        assert set().union(*(r["steps"][step]["bias"] for r in records)) == set(ref_bias)


@pytest.mark.parametrize(
    "i", range(len(SPECS)), ids=[s.schedule + ("" if s.overrides.get("n_mtp", 1) else "-no-mtp") for s in SPECS]
)
def test_pipelined_step_equals_single_process(runs, i):
    records, refs = runs
    _check_against_reference(records[i], refs[i], SPECS[i])


def test_dualpipe_mirror_ranks_hold_both_copies_with_summed_gradients(runs):
    records, _ = runs
    i = next(i for i, s in enumerate(SPECS) if s.schedule == "dualpipe")
    r0, r1 = records[i]
    assert sorted(r0["stages"]) == sorted(r1["stages"]) == [0, 1]  # PP = 2: each rank holds both stages
    for name, g in r0["steps"][0]["grads"].items():
        assert np.array_equal(g, r1["steps"][0]["grads"][name])  # the two copies agree after the sum


def test_executed_order_is_the_schedule(runs):
    """What each rank ran, in order, is the schedule's list: torch's 1F1B and DualPipeV (whose overlapped pairs
    torch runs as F then B) and dsv3lab's DualPipe (one event per F&B pair)."""
    records, _ = runs
    for i, spec in enumerate(SPECS):
        if spec.schedule not in ("1f1b", "dualpipev", "dualpipe"):
            continue
        layout = make_layout(spec.schedule, 2)
        expected = make_schedule(spec.schedule, layout.n_stages, spec.n_micro)
        for r, rec in enumerate(records[i]):
            ran = [a for a, _, _ in sorted(rec["steps"][1]["events"], key=lambda e: e[1])]
            want = list(expected.compute_actions(r))
            if spec.schedule == "dualpipev":
                want = [p for a in want for p in a.parts()]
            assert [str(a) for a in ran] == [str(a) for a in want], (spec.schedule, r)


def test_executed_vs_simulated_rows(runs):
    records, _ = runs
    i = next(i for i, s in enumerate(SPECS) if s.schedule == "dualpipev")
    rows = executed_vs_simulated(records[i], SPECS[i])
    assert {r["source"] for r in rows} == {"measured", "simulated"} and {r["rank"] for r in rows} == {0, 1}
    for r in rows:
        assert r["busy_s"] > 0 and r["idle_s"] >= -1e-9 and r["makespan_s"] >= r["busy_s"]
    measured = [r for r in rows if r["source"] == "measured"]
    simulated = [r for r in rows if r["source"] == "simulated"]
    for m, s in zip(measured, simulated):  # the simulator gets the measured chunk times: the same busy time
        assert s["busy_s"] == pytest.approx(m["busy_s"], rel=1e-9)


def test_stage_split_and_layouts(tiny_cfg):
    import dsv3lab

    assert stage_layers(5, 2) == [range(0, 3), range(3, 5)]
    with pytest.raises(ValueError, match="n_stages must be in 1..n_layers=2"):
        stage_layers(2, 3)
    model = dsv3lab.build_model(tiny_cfg.replace(n_layers=4), seed=0)
    stages = split_model(model, 4)
    held = [id(p) for s in stages for p in s.parameters()]
    assert sorted(held) == sorted(id(p) for p in model.parameters())  # each parameter in exactly one stage
    assert make_layout("dualpipe", 4).stages == [[0, 3], [1, 2], [2, 1], [3, 0]]
    assert make_layout("dualpipev", 2).stages == [[0, 3], [1, 2]]
    assert make_layout("interleaved_zb", 2).stages == [[0, 2], [1, 3]]
    assert make_layout("1f1b", 4, dp=2).replicas(1) == [1, 3]
    assert make_layout("dualpipe", 4).replicas(1) == [1, 2]
    with pytest.raises(ValueError, match="schedule must be one of"):
        make_layout("gpipe", 2)
    with pytest.raises(ValueError, match="even number of pipeline ranks"):
        make_layout("dualpipe", 3)


def test_stages_compose_to_the_model(tiny_cfg):
    """The stages, run one after the other, give the model's logits (the split loses nothing)."""
    import dsv3lab

    cfg = tiny_cfg.replace(n_layers=4)
    model = dsv3lab.build_model(cfg, seed=0).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    x = (tokens,)
    for s in split_model(model, 3):
        x = s(*x)
        x = x if isinstance(x, tuple) else (x,)
    logits, _ = model(tokens)
    torch.testing.assert_close(x[0], logits)
    h = model.hidden(tokens)
    mtp = model.mtp_logits(1, model.mtp_hidden(1, h[:, :-1], tokens[:, 1:]))
    torch.testing.assert_close(x[1], mtp)


@pytest.mark.slow
def test_zb1p_and_dualpipe_without_overlap_on_dsv3labs_executor():
    out = spawn(pipeline_worker_many, 2, SLOW_SPECS, timeout=600)
    ref = reference_run(SLOW_SPECS[0])
    for i, spec in enumerate(SLOW_SPECS):
        _check_against_reference([rank[i] for rank in out], ref, spec)


@pytest.mark.slow
def test_four_processes_dualpipe_and_data_parallel_1f1b():
    """torch.distributed with 4 ranks: DualPipe over 4 pipeline ranks, and 1F1B over 2 pipeline ranks x 2
    data-parallel replicas (gradients averaged and selection-bias counts summed over the replicas)."""
    specs = [
        PipelineSpec(schedule="dualpipe", return_grads=True, **{**BASE, "n_micro": 8}),
        PipelineSpec(schedule="1f1b", dp=2, return_grads=True, **BASE),
        PipelineSpec(
            schedule="dualpipev",
            return_grads=True,
            **{**BASE, "overrides": dict(BASE["overrides"], n_layers=8), "n_micro": 8},
        ),
    ]
    out = spawn(pipeline_worker_many, 4, specs, timeout=900)
    for i, spec in enumerate(specs):
        records = [rank[i] for rank in out]
        if spec.dp > 1:
            records = [r for r in records if r["rank"] < make_layout(spec.schedule, 4, spec.dp).pp]
            ref = reference_run(spec)
            for r in records:  # replica 0's losses cover its micro-batches only: compare gradients and biases
                for name, g in r["steps"][0]["grads"].items():
                    g_ref = ref["steps"][0]["grads"][name]
                    assert (torch.from_numpy(g) - g_ref).abs().max() <= 1e-5 * g_ref.abs().max() + 1e-12
                for name, b in r["steps"][0]["bias"].items():  # counts summed over both replicas
                    assert np.array_equal(b, ref["steps"][0]["bias"][name].numpy()), name
        else:
            _check_against_reference(records, reference_run(spec), spec)
