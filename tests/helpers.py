"""Small helpers shared by the tests (import as `from helpers import ...`)."""

import json

import pytest
import torch

NOTEBOOK_TIMES = pytest.StashKey[dict]()  # notebook -> seconds in fast mode, reported at the end of the session
FAST_LIMIT_S = 60  # DESIGN.md: <= 60 s per notebook with DSV3LAB_FAST=1 on a 2-core CPU


def checkpoint_tensors(folder):
    """Every tensor of an official-layout checkpoint folder, by name (read through its index)."""
    from safetensors import safe_open

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for name, file in index["weight_map"].items():
        with safe_open(folder / file, framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


def random_tokens(cfg, batch=2, seqlen=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seqlen), generator=g)


class SyntheticTokenizer:
    def __init__(self, vocab_size):
        self.vocab_size = vocab_size
        self.bos_id, self.eos_id, self.pad_id = 0, 1, 2


class SyntheticData:
    """The ``dsv3lab.data`` interface (batch / val / tokenizer) on three seeded Markov-chain "domains": each domain
    has its own sparse next-token table, so a model can learn it and experts can specialise."""

    domains = ("code", "prose", "math")

    def __init__(self, vocab_size=512, seq_len=32, seed=0, val_seqs=4, branching=4, active=64):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.tokenizer = SyntheticTokenizer(vocab_size)
        g = torch.Generator().manual_seed(seed)
        self.active = min(active, vocab_size - 3)  # the ids a domain uses: 3 .. 3 + active (learnable quickly)
        self.tables = [torch.randint(3, 3 + self.active, (vocab_size, branching), generator=g) for _ in self.domains]
        self.val = {
            d: self._rows(i, val_seqs, torch.Generator().manual_seed(10_000 + i)) for i, d in enumerate(self.domains)
        }

    def _rows(self, domain, n, g):
        table = self.tables[domain]
        rows = torch.empty(n, self.seq_len + 1, dtype=torch.long)
        rows[:, 0] = torch.randint(3, 3 + self.active, (n,), generator=g)
        for t in range(1, self.seq_len + 1):
            pick = torch.randint(0, table.shape[1], (n,), generator=g)
            rows[:, t] = table[rows[:, t - 1], pick]
        return rows

    def batch(self, step, batch_size):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 7919 + batch_size)
        domains = torch.randint(0, len(self.domains), (batch_size,), generator=g)
        rows = torch.cat([self._rows(int(d), 1, g) for d in domains])
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
