"""Pipeline pictures draw what they are given; the explorer widget redraws; measured timelines round-trip."""

import matplotlib

matplotlib.use("Agg")

import json
from fractions import Fraction

import pytest
from matplotlib.patches import Rectangle

from dsv3lab.parallel.pipeline import PipelineSpec, records_from_json, records_to_json
from dsv3lab.parallel.schedules import Action, dualpipe, one_f_one_b
from dsv3lab.parallel.simulator import Costs, costs_from_timeline, measured_timeline, simulate, sweep_micro_batches
from dsv3lab.viz.pipeline import COLOURS, plot_bubble_vs_micro, plot_busy_idle, plot_gantt


def _boxes(fig):
    return [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]


def test_gantt_one_box_per_chunk_and_a_border_per_overlapped_pair():
    t = simulate(dualpipe(4, 8), Costs(fb=Fraction(5, 2)))
    boxes = _boxes(plot_gantt(t))
    pairs = sum(a.kind == "FB" for _, a, _, _ in t.events)
    parts = sum(len(a.parts()) for _, a, _, _ in t.events)
    assert pairs > 0
    assert len(boxes) == parts + pairs  # two halves per pair plus its border
    assert sum(not b.get_fill() for b in boxes) == pairs
    # the boxes span exactly the simulated intervals, ranks top to bottom
    filled = [b for b in boxes if b.get_fill()]
    assert max(b.get_x() + b.get_width() for b in filled) == pytest.approx(float(t.makespan))
    fig = plot_gantt(simulate(one_f_one_b(2, 2), Costs(f=1, b=2)))
    spans = sorted((b.get_y(), b.get_x(), b.get_width()) for b in _boxes(fig))
    assert spans[0] == (-0.4, 0, 1) and spans[-1] == (0.6, 5, 2)  # rank 0's F0, rank 1's last backward


def test_gantt_reverse_direction_is_lighter():
    t = simulate(dualpipe(4, 8))
    colours = {tuple(round(c, 3) for c in b.get_facecolor()[:3]) for b in _boxes(plot_gantt(t)) if b.get_fill()}
    light_f = tuple(round(int(COLOURS["F"][1][i : i + 2], 16) / 255, 3) for i in (1, 3, 5))
    dark_f = tuple(round(int(COLOURS["F"][0][i : i + 2], 16) / 255, 3) for i in (1, 3, 5))
    assert light_f in colours and dark_f in colours


def test_bubble_vs_micro_one_line_per_schedule():
    rows = sweep_micro_batches(["1f1b", "dualpipe"], 4, [4, 8, 12], Costs())
    assert {(r["schedule"], r["n_micro"]) for r in rows} == {("1f1b", m) for m in (4, 8, 12)} | {
        ("dualpipe", 8),  # DualPipe needs an even count >= 2·PP
        ("dualpipe", 12),
    }
    ax = plot_bubble_vs_micro(rows).axes[0]
    assert [line.get_label() for line in ax.lines] == ["1f1b", "dualpipe"]
    assert list(ax.lines[0].get_ydata()) == [9, 9, 9]  # (PP-1)(F+B), whatever the micro-batches


def test_busy_idle_bars_stack_busy_and_idle():
    rows = [
        {"schedule": "1f1b", "rank": r, "source": s, "busy_s": 1.0 + r, "idle_s": 0.5 if s == "measured" else 0.25}
        for r in (0, 1)
        for s in ("measured", "simulated")
    ]
    ax = plot_busy_idle(rows).axes[0]
    tops = sorted(round(p.get_y() + p.get_height(), 6) for p in ax.patches)
    assert tops == sorted([1.0, 1.0, 2.0, 2.0, 1.5, 1.25, 2.5, 2.25])


def test_pipeline_widget_redraws_and_reports_bad_sizes():
    pytest.importorskip("ipywidgets")
    from dsv3lab.viz.widgets import pipeline_explorer

    box = pipeline_explorer("1f1b", pp=4, n_micro=8)
    name, pp, micro = box.children[0].children
    summary = box.children[3]
    assert "bubble 9 per device" in summary.value and "(PP-1)(F+B) = 9" in summary.value
    name.value = "zb1p"
    assert "(PP-1)(F+B-2W) = 3" in summary.value
    name.value = "dualpipe"
    micro.value = 6  # DualPipe needs >= 2·PP micro-batches
    assert "n_micro must be even and >= 2 * pp" in summary.value


def test_measured_timeline_recovers_the_costs_it_was_measured_under():
    """Events of a simulated run read back as a 'measured' timeline give back the chunk costs per stage, and
    simulating with them gives back the makespan."""
    costs = Costs(f=[1, 2], b=[3, 4], w=[1, 1])
    t = simulate(one_f_one_b(2, 6), costs)
    events = [[(a, s, e) for r, a, s, e in t.events if r == rank] for rank in range(2)]
    m = measured_timeline(one_f_one_b(2, 6), events)
    assert m.makespan == t.makespan and m.busy == t.busy and m.activation_peak == t.activation_peak
    c = costs_from_timeline(m)
    assert c.f == [1, 2] and c.b == [3, 4]
    assert simulate(m.schedule, c).makespan == t.makespan


def test_records_json_round_trip():
    pair = Action("FB", pair=(Action("F", 0, 3), Action("BW", 7, 5)))
    assert Action.from_json(pair.to_json()) == pair
    assert Action.from_json(Action("SEND_F", 1, 2, peer=0).to_json()) == Action("SEND_F", 1, 2, peer=0)
    spec = PipelineSpec(schedule="dualpipe", n_micro=4)
    records = [
        {
            "rank": 0,
            "pp_rank": 0,
            "stages": [0, 1],
            "p2p_seconds": 0.001,
            "steps": [{"losses": [{"main": 1.0}], "loss_mbs": [2], "seconds": 0.5, "events": [(pair, 0.0, 0.25)]}],
        }
    ]
    data = records_to_json(spec, records, comparison=[{"rank": 0}])
    spec2, back = records_from_json(json.loads(json.dumps(data)))
    assert (
        spec2 == spec and back[0]["steps"][0]["events"] == [(pair, 0.0, 0.25)] and data["comparison"] == [{"rank": 0}]
    )
    assert back[0]["p2p_seconds"] == 0.001
