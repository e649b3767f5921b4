import json
import subprocess
import sys

import pytest

from dsv3lab.cli import main


def test_info_671b_json(capsys):
    assert main(["info", "671B", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["total_params"] == pytest.approx(671.0e9, rel=0.005)
    assert stats["activated_params"] == pytest.approx(37.5e9, rel=0.01)
    assert stats["mtp_params"] == pytest.approx(11.6e9, rel=0.01)
    assert stats["kv_cache_bytes_per_token"] == {"latent": 70_272, "materialized": 4_997_120}
    assert stats["flops_per_token"] > 6 * 36e9


def test_info_text_and_errors(capsys):
    assert main(["info", "toy"]) == 0
    out = capsys.readouterr().out
    assert "total_params" in out and "kv_cache_bytes_per_token" in out
    assert main(["info", "67B"]) == 2
    assert "the presets are: tiny, toy, small, 16B, 236B, 671B" in capsys.readouterr().err
    assert main(["info", "tiny", "--set", "n_expert=4"]) == 2
    assert "did you mean" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "dsv3lab.cli", "info", "tiny"], capture_output=True, text=True)
    assert out.returncode == 0 and "tiny" in out.stdout
