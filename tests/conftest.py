import os

import pytest
import torch

import dsv3lab
from dsv3lab.utils import torch_threads

# Tests never need more than the 2 cores CI has; keep torch from oversubscribing when run in parallel.
torch.set_num_threads(int(os.environ.get("DSV3LAB_TEST_THREADS", "2")))


@pytest.fixture
def tiny_cfg() -> dsv3lab.ModelConfig:
    return dsv3lab.ModelConfig.preset("tiny")


@pytest.fixture
def tiny_model(tiny_cfg) -> dsv3lab.DeepSeekV3:
    model = dsv3lab.build_model(tiny_cfg, seed=0)
    with torch.no_grad():  # a non-zero selection bias so that it matters in every test
        for moe in model.moe_layers():
            moe.gate.bias.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return model


@pytest.fixture
def one_thread():
    """Tiny models' matrices are small: one torch thread is as fast as two, and far faster on a busy CPU."""
    with torch_threads(1):
        yield


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: without it they are deselected (not skipped) and the summary says so."""
    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
        config._dsv3lab_gpu_deselected = len(gpu)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = getattr(config, "_dsv3lab_gpu_deselected", 0)
    if n:
        terminalreporter.write_line(
            f"{n} GPU tests deselected: no CUDA device (bash benchmarks/gpu_check.sh runs them)"
        )
