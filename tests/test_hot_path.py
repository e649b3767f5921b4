"""Checks stay out of the hot path (issue: reliability §4): a decode step and a training step read nothing back from
the device. On a CPU a device synchronisation cannot be observed directly, so a TorchDispatchMode counts the ops that
would force one on a GPU: ``_local_scalar_dense`` (every ``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``) and ops
whose output shape depends on the data (``nonzero`` — also behind boolean indexing and ``torch.where(cond)`` —,
``masked_select``, ``unique``, ``bincount``, ``repeat_interleave`` without an output size)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dsv3lab
from dsv3lab.infer.sampling import sample
from helpers import random_tokens

SYNC_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "_unique2",
    "unique_dim",
    "bincount",
    "repeat_interleave",
}


class HostSyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNC_OPS:
            self.calls.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _model(**changes):
    cfg = dsv3lab.ModelConfig.preset("tiny", moe_impl="grouped", **changes)
    return dsv3lab.build_model(cfg, seed=0)


def test_a_decode_step_makes_no_host_synchronisation():
    model = _model().eval()
    tokens = random_tokens(model.cfg, batch=2, seqlen=12)
    cache = model.new_cache(2, 16, layout="latent")
    with torch.no_grad():
        model.check_tokens(tokens)  # once, where the prompt enters
        model.hidden(tokens[:, :8], 0, cache, check=False)
        with HostSyncCounter() as rec:
            for pos in range(8, 12):  # four decode steps: forward one token, logits, choose the next
                h = model.hidden(tokens[:, pos : pos + 1], pos, cache, check=False)
                sample(model.logits(h[:, -1]), temperature=0.0)
                sample(model.logits(h[:, -1]), temperature=0.8, top_k=20, top_p=0.9)
    assert rec.calls == []


def test_a_training_step_makes_no_host_synchronisation():
    model = _model(seq_aux_loss_alpha=1e-4)
    model.train()
    tokens = random_tokens(model.cfg, batch=2, seqlen=16)
    targets = tokens.roll(-1, 1)
    model.check_tokens(tokens, 0, targets)  # once, on the host, where the batch enters
    with HostSyncCounter() as rec:
        _, losses = model(tokens, targets, check=False)
        losses["total"].backward()
    assert rec.calls == []


def test_the_counter_sees_the_syncs_it_is_meant_to_catch():
    """The checks can fail: the value checks of a checked forward and the readable per-expert loop do read back."""
    model = _model()
    tokens = random_tokens(model.cfg, batch=2, seqlen=16)
    with HostSyncCounter() as rec, torch.no_grad():
        model(tokens, tokens.roll(-1, 1))  # check=True: token and target ranges read on the host
    assert rec.calls.count("_local_scalar_dense") >= 4
    loop = dsv3lab.build_model(dsv3lab.ModelConfig.preset("tiny", moe_impl="loop"), seed=0)
    with HostSyncCounter() as rec, torch.no_grad():
        loop(tokens, check=False)
    assert "nonzero" in rec.calls  # the loop finds each expert's tokens with torch.where
