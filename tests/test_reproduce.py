"""`dsv3lab reproduce --fast` end to end: every registered experiment writes its files, section and summary."""

import json

import pytest

from dsv3lab import reproduce
from dsv3lab.cli import main


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    assert main(["reproduce", "--fast", "--out", str(out)]) == 0
    return out


def test_every_experiment_wrote_its_section(fast_run):
    report = (fast_run / "REPORT.md").read_text()
    for name in reproduce.load_registry():
        assert (fast_run / "sections" / f"{name}.md").exists(), name
    assert "## Tour" in report and "nothing here is typed in by hand" in report


def test_tour_outputs(fast_run):
    import pandas as pd

    table = pd.read_csv(fast_run / "presets.csv").set_index("preset")
    assert list(table.index) == ["tiny", "toy", "small", "16B", "236B", "671B"]
    assert table.loc["671B", "kv_latent_bytes_per_token"] == 70_272
    for col in ("total_params", "activated_params", "mtp_params", "kv_materialized_bytes_per_token",
                "flops_per_token"):  # fmt: skip
        assert col in table.columns
    assert (fast_run / "kv_cache.png").stat().st_size > 10_000
    summary = json.loads((fast_run / "summary.json").read_text())
    assert summary["tour"]["671B"]["kv_cache_bytes_per_token"]["latent"] == 70_272
    assert summary["_meta"]["fast"] is True


def test_only_refreshes_one_experiment_and_keeps_the_rest(fast_run):
    before = json.loads((fast_run / "summary.json").read_text())
    assert main(["reproduce", "--fast", "--only", "tour", "--out", str(fast_run)]) == 0
    after = json.loads((fast_run / "summary.json").read_text())
    assert set(before) == set(after)


def test_unknown_experiment_is_an_error(tmp_path, capsys):
    assert main(["reproduce", "--only", "nope", "--out", str(tmp_path)]) == 2
    assert "available: tour" in capsys.readouterr().err
