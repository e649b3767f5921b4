import os

import pytest
import torch

import dsv3lab

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
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
