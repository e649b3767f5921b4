"""Every fast path of training is a switch proven equal to the readable eager reference (issue 14):

* ``linear_cross_entropy`` (fused, chunked head + cross-entropy) against ``head`` → ``F.cross_entropy``;
* the model's ``fused_loss=True`` forward against the reference forward (losses, gradients, argmax), with MTP;
* the grouped experts against the loop under bf16 autocast (both run their GEMMs in bf16);
* the trainer's fast settings against ``fused_loss=False, compile=False``.
"""

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F

import dsv3lab
from dsv3lab.model.loss import IGNORE_INDEX, cross_entropy, linear_cross_entropy


def _autocast(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_linear_cross_entropy_equals_head_then_cross_entropy(autocast, chunk):
    g = torch.Generator().manual_seed(0)
    n, d, v = 37, 16, 50
    x = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = IGNORE_INDEX
    with _autocast(autocast):
        ref = cross_entropy(F.linear(x, w).float()[None], t[None])
        ref_argmax = F.linear(x, w).float().argmax(-1)
    gx_ref, gw_ref = torch.autograd.grad(ref * 0.7, [x, w])  # a non-unit incoming gradient, as the trainer's share
    with _autocast(autocast):
        loss, argmax = linear_cross_entropy(x, w, t, chunk=chunk)
    gx, gw = torch.autograd.grad(loss * 0.7, [x, w])
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)
    torch.testing.assert_close(gw, gw_ref, **tol)
    assert gw.dtype == w.dtype and gx.dtype == x.dtype
    assert torch.equal(argmax, ref_argmax)


def test_linear_cross_entropy_with_every_target_ignored_is_zero_with_zero_gradient():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    loss, _ = linear_cross_entropy(x, w, torch.full((4,), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0 and not x.grad.any() and not w.grad.any()
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(x, w, torch.zeros(4, dtype=torch.long), chunk=0)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_loss_forward_equals_the_reference(tiny_cfg, autocast):
    cfg = tiny_cfg.replace(n_mtp=1)
    model = dsv3lab.build_model(cfg, seed=0).train()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
    targets = tokens.roll(-1, 1)
    targets[:, -1] = IGNORE_INDEX
    runs = {}
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        with _autocast(autocast):
            logits, losses = model(tokens, targets, fused_loss=fused)
        losses["total"].backward()
        pred = model.last_predictions if fused else logits.argmax(-1)
        runs[fused] = ({k: v.detach() for k, v in losses.items()}, _grads(model), pred, logits)
    (ref_l, ref_g, ref_p, ref_logits), (l, gr, p, logits) = runs[False], runs[True]
    assert logits is None and ref_logits is not None and set(l) == set(ref_l) >= {"main", "mtp_1", "total"}
    tol = dict(rtol=1e-2, atol=1e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    for k in ref_l:
        torch.testing.assert_close(l[k], ref_l[k], **tol)
    assert set(gr) == set(ref_g)
    for k in ref_g:
        torch.testing.assert_close(gr[k], ref_g[k], **tol, msg=k)
    assert torch.equal(p, ref_p)


def test_grouped_experts_equal_the_loop_under_bf16_autocast(tiny_cfg):
    """grouped_mm is not on autocast's list: the grouped path casts to bf16 itself, as F.linear is cast in the loop."""
    loop = dsv3lab.build_model(tiny_cfg.replace(moe_impl="loop"), seed=0).train()
    grouped = dsv3lab.build_model(tiny_cfg.replace(moe_impl="grouped"), seed=0).train()
    tokens = torch.randint(0, tiny_cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    out = {}
    for name, m in (("loop", loop), ("grouped", grouped)):
        with _autocast(True):
            logits, losses = m(tokens, tokens)
        losses["total"].backward()
        out[name] = (logits, _grads(m))
    # bf16 GEMMs on both sides: they agree to bf16 rounding (an fp32 grouped GEMM would differ by ~1e-2 relative)
    torch.testing.assert_close(out["grouped"][0], out["loop"][0], rtol=1e-3, atol=1e-4)
    for k, v in out["loop"][1].items():
        torch.testing.assert_close(out["grouped"][1][k], v, rtol=2e-2, atol=1e-4, msg=k)


# ---------------------------------------------------------------------- the trainer's default path
def _tiny_run(**kw):
    from dsv3lab.train import TrainConfig

    base = dict(preset="tiny", seq_len=16, steps=4, batch_size=4, micro_batch_size=2, eval_every=0, progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_trainer_default_path_equals_the_eager_reference(one_thread, dtype):
    """The trainer's defaults (the fast paths) against fused_loss=False, compile=False: the same losses, accuracy,
    gradient norms and weights after a few optimizer steps (bias updates included). In bf16 one step: after that, a
    rounding difference that flips one top-k routing choice makes two bf16 trajectories drift apart by more than
    rounding (as two bf16 runs of the reference on different thread counts would)."""
    from dsv3lab.train import TrainConfig, train
    from helpers import SyntheticData

    data = SyntheticData(vocab_size=512, seq_len=16, seed=0)
    default = TrainConfig()
    steps = 4 if dtype == "fp32" else 1
    fast = train(_tiny_run(dtype=dtype, steps=steps), data)
    ref = train(_tiny_run(dtype=dtype, steps=steps, fused_loss=False, compile=False), data)
    assert (fast.train_cfg.fused_loss, fast.train_cfg.compile) == (default.fused_loss, default.compile)
    rel = 1e-2 if dtype == "bf16" else 1e-5
    lr = fast.train_cfg.lr
    for col in ("loss_main", "loss_mtp_1", "loss_total", "grad_norm"):
        assert fast.metrics[col].tolist() == pytest.approx(ref.metrics[col].tolist(), rel=rel), col
    assert fast.metrics.acc_main.tolist() == pytest.approx(ref.metrics.acc_main.tolist(), abs=0.02)
    pairs = list(zip(fast.model.named_parameters(), ref.model.parameters()))
    if dtype == "fp32":
        for (name, p), q in pairs:
            torch.testing.assert_close(p, q, rtol=0, atol=1e-2 * lr, msg=name)  # AdamW moves each weight by <= ~lr
    else:  # AdamW's first step is ±lr by the gradient's sign: bf16 rounding flips the sign of a few tiny gradients
        moved = torch.cat([((p - q).abs() > 0.1 * lr).flatten() for (_, p), q in pairs])
        assert moved.float().mean() < 0.01, moved.float().mean()  # 0.2% measured
    assert fast.train_cfg.hash() == ref.train_cfg.hash()  # speed switches are not part of a run's identity


def test_compile_failure_falls_back_to_eager_with_a_warning(tiny_cfg, tmp_path, monkeypatch):
    """A backend that raises stands in for any compiler failure: the wrapper warns and runs the model eager."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from dsv3lab.train.compile import COMPILE_CACHE_DIR, CompiledModel, configure_compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing inductor leaves behind
    assert configure_compile_cache() == COMPILE_CACHE_DIR  # data/cache/inductor by default
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "other"))
    assert configure_compile_cache() == tmp_path / "other"  # a folder the user chose is respected

    def broken_backend(gm, example_inputs):
        raise RuntimeError("the compiler is broken")

    torch._dynamo.reset()
    model = dsv3lab.build_model(tiny_cfg, seed=0)
    tokens = torch.randint(0, tiny_cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    wrapped = CompiledModel(model, backend=broken_backend)
    with pytest.warns(RuntimeWarning, match="torch.compile failed, training continues eager"):
        logits, losses = wrapped(tokens, tokens)
    assert not wrapped.is_compiled and "the compiler is broken" in wrapped.fallback_reason
    ref_logits, ref_losses = model(tokens, tokens)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(losses["total"], ref_losses["total"])
    wrapped(tokens, tokens)  # later calls stay eager, without compiling again
    # a genuine error of the model is not swallowed: eager raises it again
    with pytest.raises(ValueError, match="outside the vocabulary"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the broken backend may be reached (and warn) first
        CompiledModel(model, backend=broken_backend)(tokens + tiny_cfg.vocab_size)


def test_compiled_forward_traces_without_graph_breaks_and_equals_eager(tiny_cfg):
    """Dynamo traces the grouped model's bf16-autocast training forward with the fused loss as one graph (backend
    ``eager``: tracing only, no code generation, so the test is quick). In fp32 it cannot: the CPU grouped GEMM's
    meta function accepts only bf16 (torch 2.13), so an fp32 compile falls back to eager (test above)."""
    from dsv3lab.train.compile import CompiledModel

    torch._dynamo.reset()
    model = dsv3lab.build_model(tiny_cfg.replace(moe_impl="grouped"), seed=0).train()
    tokens = torch.randint(0, tiny_cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with _autocast(True):
        explain = torch._dynamo.explain(model)(tokens, tokens, check=False, fused_loss=True)
        assert explain.graph_break_count == 0, explain.break_reasons
        wrapped = CompiledModel(model, backend="eager")
        _, losses = wrapped(tokens, tokens, check=False, fused_loss=True)
        _, ref = model(tokens, tokens, check=False, fused_loss=True)
    assert wrapped.is_compiled
    torch.testing.assert_close(losses["total"], ref["total"])


def test_trainer_compile_switch_runs_the_compiled_forward_and_equals_eager(one_thread, monkeypatch):
    """compile=True goes through dsv3lab.train.compile (here with Dynamo's ``eager`` backend: tracing without code
    generation, seconds instead of minutes) and trains to the same numbers as compile=False."""
    from dsv3lab.train import compile as compile_module
    from dsv3lab.train import train, trainer
    from helpers import SyntheticData

    made = []

    def eager_backend_compile(model, **kw):
        made.append(compile_module.CompiledModel(model, backend="eager", **kw))
        return made[-1]

    monkeypatch.setattr(trainer, "compile_model", eager_backend_compile)
    torch._dynamo.reset()
    data = SyntheticData(vocab_size=512, seq_len=16, seed=0)
    kw = dict(steps=3, batch_size=4, batch_size_start=4)  # a λ switch inside the run: λ is a tensor, not a constant
    compiled = train(_tiny_run(compile=True, mtp_lambda_switch_frac=0.5, **kw), data)
    eager = train(_tiny_run(compile=False, mtp_lambda_switch_frac=0.5, **kw), data)
    assert len(made) == 1 and made[0].is_compiled and made[0]._calls == 3 * 2  # 3 steps x 2 micro-batches
    for col in ("loss_main", "loss_total", "grad_norm"):
        assert compiled.metrics[col].tolist() == pytest.approx(eager.metrics[col].tolist(), rel=1e-5), col
