"""Small helpers shared by the tests (import as `from helpers import ...`)."""

import torch


def random_tokens(cfg, batch=2, seqlen=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seqlen), generator=g)
