"""Installable where the GPUs are: the package accepts a range of torch versions whose lower bound is set by the
engine features it uses, `make setup` keeps the exact CPU pin, and `pip install -e .` keeps an installed torch."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).parent.parent


def torch_requirement() -> Requirement:
    text = (ROOT / "pyproject.toml").read_text()
    (line,) = re.findall(r'^\s*"(torch[^"]*)",', text, flags=re.M)
    return Requirement(line)


def test_torch_is_a_range_from_2_10():
    spec = torch_requirement().specifier
    assert "2.10.0" in spec and "2.13.0" in spec and "2.15.0" in spec  # a range, not a pin
    assert "2.9.1" not in spec  # before F.grouped_mm became public
    assert Version(torch.__version__.split("+")[0]) in spec  # the installed torch is a supported one


def test_the_features_behind_the_lower_bound_exist():
    """2.10: torch.nn.functional.grouped_mm; 2.9: ScheduleDualPipeV; 2.6: FSDP2 in torch.distributed.fsdp; 2.2: DCP."""
    import torch.distributed.checkpoint as dcp
    import torch.nn.functional as F
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    from torch.distributed.pipelining import ScheduleDualPipeV, ScheduleZBVZeroBubble  # noqa: F401

    assert callable(F.grouped_mm) and callable(dcp.save) and callable(dcp.load)


def test_make_setup_pins_the_cpu_wheel_before_the_package():
    make = (ROOT / "Makefile").read_text()
    pin, package = make.index('pip install "torch==2.13.0"'), make.index('pip install -e ".[dev,hf,kernels]"')
    assert pin < package and Version("2.13.0") in torch_requirement().specifier


def _setuptools_version() -> Version:
    if importlib.util.find_spec("setuptools") is None:
        return Version("0")
    import setuptools

    return Version(setuptools.__version__)


@pytest.mark.skipif(
    _setuptools_version() < Version("68"), reason="--no-build-isolation builds with the environment's setuptools>=68"
)
def test_pip_install_keeps_the_installed_torch(tmp_path):
    """The README's cluster install, dry run and offline: pip would install dsv3lab and nothing else (torch stays)."""
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation"]
    cmd += ["--report", str(report), "-e", str(ROOT)]  # dependencies resolved against what is installed
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    names = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert names == ["dsv3lab"]
