"""The pipeline simulator: a timeline by hand, Table 2 reproduced exactly (fractions, random costs), the claims of
§3.2.1 (DualPipe's bubble and memory do not grow with micro-batches; +1/PP activations), and the CLI."""

import json
import random
from fractions import Fraction

import pytest

from dsv3lab.cli import main
from dsv3lab.parallel.schedules import SCHEDULES, make_schedule, one_f_one_b
from dsv3lab.parallel.simulator import Costs, pipeline_report, simulate, table2, table2_assumptions


def test_1f1b_timeline_by_hand():
    # PP = 2, 2 micro-batches, F = 1, B = 2. Rank 1: F0 [1,2] BW0 [2,4] F1 [4,5] BW1 [5,7]; rank 0: F0 [0,1]
    # F1 [1,2], BW0 waits for rank 1's BW0 -> [4,6], BW1 waits for rank 1's BW1 -> [7,9]. Bubble 9 - 6 = 3.
    t = simulate(one_f_one_b(2, 2), Costs(f=1, b=2, w=1))
    spans = {(r, str(a)): (s, e) for r, a, s, e in t.events}
    assert spans == {
        (0, "0F0"): (0, 1),
        (0, "0F1"): (1, 2),
        (0, "0BW0"): (4, 6),
        (0, "0BW1"): (7, 9),
        (1, "1F0"): (1, 2),
        (1, "1BW0"): (2, 4),
        (1, "1F1"): (4, 5),
        (1, "1BW1"): (5, 7),
    }
    assert t.makespan == 9 and t.busy == [6, 6] and t.bubble == [3, 3] == [(2 - 1) * (1 + 2)] * 2
    assert t.activation_peak == [2, 1] and t.param_copies == [1, 1]


def test_point_to_point_latency_by_hand():
    # one micro-batch over two ranks crosses the boundary twice: F0 [0,1], F0 [1+p, 2+p], BW [2+p, 4+p], BW [4+2p, 6+2p]
    p = Fraction(1, 4)
    assert simulate(one_f_one_b(2, 1), Costs(f=1, b=2, w=1, p2p=p)).makespan == 6 + 2 * p


def _table2_costs(rng):
    """Random chunk costs meeting the exact-reproduction conditions (simulator.table2_assumptions): F = B - W,
    W <= F, B <= F&B <= F + B; as fractions so that equality is exact."""
    f = Fraction(rng.randint(2, 40), 8)
    w = Fraction(rng.randint(0, 8), 8) * f
    b = f + w
    fb = rng.choice([None, b + Fraction(rng.randint(0, 8), 8) * f])
    return Costs(f=f, b=b, w=w, fb=fb)


@pytest.mark.parametrize("name", SCHEDULES)
def test_table2_reproduced_exactly(name):
    rng = random.Random(hash(name) % 1000)
    for pp in (4, 6, 8, 16):
        for n_micro in (2 * pp, 2 * pp + 2, 3 * pp + (3 * pp) % 2):
            costs = _table2_costs(rng)
            assert table2_assumptions(name, costs) == []
            t = simulate(make_schedule(name, pp, n_micro), costs)
            row = table2(name, pp, costs)
            assert max(t.bubble) == row["bubble"], (pp, n_micro, costs)
            assert max(t.activation_peak) == row["activation"]
            assert max(t.param_copies) == min(t.param_copies) == row["param_copies"]
            assert t.schedule.n_ranks == row["devices"]
            assert all(b >= 0 for b in t.bubble)


def test_table2_exact_with_the_all_to_all_in_the_chunk_times():
    costs = Costs(f=Fraction(3, 2), b=Fraction(5, 2), w=1, a2a=Fraction(1, 2))  # F = 2, B = 3, W = 1: F = B - W
    for name in SCHEDULES:
        assert table2_assumptions(name, costs) == []
        assert max(simulate(make_schedule(name, 8, 20), costs).bubble) == table2(name, 8, costs)["bubble"]


def test_outside_its_assumptions_the_formula_is_not_the_simulated_bubble():
    cases = [
        ("zb1p", Costs(f=1, b=3, w=2)),  # W > F: the postponed W's no longer fit the holes
        ("dualpipe", Costs(f=Fraction(3, 2), b=2, w=1)),  # F != B - W
        ("dualpipev", Costs(f=1, b=3, w=2)),  # W > F
    ]
    for name, costs in cases:
        assert table2_assumptions(name, costs) != []
        assert max(simulate(make_schedule(name, 8, 24), costs).bubble) != table2(name, 8, costs)["bubble"]
    assert table2_assumptions("1f1b", Costs(f=1, b=3, w=2)) == []  # 1F1B's row holds for any F, B
    assert table2_assumptions("1f1b", Costs(p2p=1)) == ["free point-to-point transfers (p2p = 0)"]


def test_dualpipe_bubble_and_memory_do_not_grow_with_micro_batches():
    costs = Costs(f=1, b=2, w=1, fb=Fraction(5, 2))
    for name in ("dualpipe", "dualpipev"):
        runs = [simulate(make_schedule(name, 8, m), costs) for m in (16, 20, 32, 64)]
        assert len({max(t.bubble) for t in runs}) == 1
        assert {max(t.activation_peak) for t in runs} == {9}
        # the idle fraction falls as micro-batches are added
        fractions = [max(t.bubble) / t.makespan for t in runs]
        assert fractions == sorted(fractions, reverse=True)


@pytest.mark.parametrize("pp", [4, 8, 16])
def test_dualpipe_holds_one_more_activation_that_is_one_pp_th_of_1f1bs_peak(pp):
    base = max(simulate(one_f_one_b(pp, 3 * pp)).activation_peak)
    dual = max(simulate(make_schedule("dualpipe", pp, 3 * pp)).activation_peak)
    assert base == pp and dual - base == 1 and Fraction(dual - base, base) == Fraction(1, pp)


def test_overlap_hides_the_all_to_all_only_in_overlapped_pairs():
    on, off = Costs(a2a=1, overlap=True), Costs(a2a=1, overlap=False)
    assert (
        simulate(make_schedule("dualpipe", 8, 20), on).makespan
        < simulate(make_schedule("dualpipe", 8, 20), off).makespan
    )
    assert simulate(one_f_one_b(8, 20), on).makespan == simulate(one_f_one_b(8, 20), off).makespan


def test_per_stage_costs_and_bad_costs():
    t = simulate(one_f_one_b(2, 1), Costs(f=[1, 3], b=[2, 4], w=[1, 1]))
    assert t.makespan == 1 + 3 + 4 + 2
    with pytest.raises(ValueError, match="cost w .* must not exceed the full backward"):
        Costs(f=1, b=1, w=2)
    with pytest.raises(ValueError, match="cost f must be >= 0"):
        Costs(f=-1)
    with pytest.raises(ValueError, match="cost b has 1 per-stage values"):
        simulate(one_f_one_b(2, 1), Costs(f=1, b=[2], w=[1]))


def test_cli_pipeline_json_has_exactly_the_documented_keys(capsys):
    assert (
        main(["pipeline", "dualpipe", "--pp", "8", "--micro", "20", "--f", "1", "--b", "2", "--w", "1", "--json"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"bubble", "makespan", "activation_peak", "param_copies", "devices", "per_rank"}
    assert out["bubble"] == pytest.approx(table2("dualpipe", 8, Costs(1, 2, 1))["bubble"]) == 6
    assert out["activation_peak"] == 9 and out["param_copies"] == 2 and out["devices"] == 8
    assert len(out["per_rank"]) == 8
    assert main(["pipeline", "dualpipev", "--pp", "8", "--micro", "20", "--fb", "2.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["devices"] == 4


def test_cli_pipeline_text_and_errors(capsys):
    assert main(["pipeline", "zb1p", "--pp", "4", "--micro", "8"]) == 0
    text = capsys.readouterr().out
    assert "Table 2" in text and "(PP-1)(F+B-2W)" in text
    assert main(["pipeline", "dualpipe", "--pp", "4", "--micro", "5"]) == 2
    assert "n_micro must be even" in capsys.readouterr().err
    assert main(["pipeline", "1f1b", "--pp", "4", "--micro", "8", "--w", "5"]) == 2
    assert "must not exceed" in capsys.readouterr().err


def test_pipeline_report_matches_table2_at_the_defaults():
    r = pipeline_report("1f1b", 4, 8)
    assert r["bubble"] == r["table2"]["bubble"] == 9 and r["chunk_times"] == {"F": 1, "B": 2, "W": 1, "F&B": 3}


def test_cli_pipeline_execute_refuses_what_it_cannot_do(capsys):
    assert main(["pipeline", "zbv", "--pp", "4", "--micro", "8"]) == 2
    assert "zbv runs with --execute only" in capsys.readouterr().err
    assert main(["pipeline", "dualpipev", "--pp", "4", "--micro", "8", "--execute", "--json"]) == 2
    assert "with --execute write the measured run with --out" in capsys.readouterr().err
    assert main(["pipeline", "dualpipev", "--pp", "3", "--micro", "8", "--execute"]) == 2
    assert "pp must be a multiple of 2" in capsys.readouterr().err
    # refused before any process starts
    assert main(["pipeline", "dualpipe", "--pp", "2", "--micro", "3", "--execute"]) == 2
    assert "n_micro must be even" in capsys.readouterr().err
    assert main(["pipeline", "dualpipev", "--pp", "4", "--micro", "3", "--execute", "--set", "n_layers=4"]) == 2
    assert "n_micro must be >= the 4 stages" in capsys.readouterr().err
    assert main(["pipeline", "1f1b", "--pp", "4", "--micro", "4", "--execute"]) == 2  # tiny has 2 layers
    assert "n_stages must be in 1..n_layers=2" in capsys.readouterr().err
    assert main(["pipeline", "1f1b", "--pp", "2", "--micro", "4", "--execute", "--seq-len", "0"]) == 2
    assert "seq_len must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_pipeline_execute_spawns_and_writes_the_run(tmp_path, capsys):
    out = tmp_path / "run.json"
    argv = ["pipeline", "dualpipe", "--pp", "2", "--micro", "4", "--execute", "--steps", "2", "--seq-len", "8"]
    assert main(argv + ["--set", "n_layers=2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "executed dualpipe: PP = 2 stages on 2 processes (dsv3lab's executor, gloo)" in text
    assert "step 1: main loss" in text and "simulated" in text
    data = json.loads(out.read_text())
    assert data["spec"]["schedule"] == "dualpipe" and len(data["records"]) == 2
    assert {e[0]["kind"] for r in data["records"] for e in r["steps"][1]["events"]} >= {"F", "FB", "B", "W", "BW"}
