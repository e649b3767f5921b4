"""The trainer: schedules, gradient accumulation, the once-per-step bias update, resume, NaN handling, evaluation,
the run folder and every bad input."""

import hashlib
import math

import pytest
import torch

from dsv3lab.cli import main
from dsv3lab.train import (
    TrainConfig,
    TrainingDiverged,
    batch_size_at,
    bias_speed_at,
    evaluate,
    latest_checkpoint,
    load_run,
    lr_at,
    mtp_lambda_at,
    schedule_table,
    train,
)
from helpers import SyntheticData

SEQ = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return SyntheticData(vocab_size=512, seq_len=SEQ, seed=0)


def tiny(**kw):
    base = dict(
        preset="tiny", seq_len=SEQ, steps=6, batch_size=4, micro_batch_size=4, eval_every=0, progress=False, lr=3e-3
    )
    base.update(kw)
    return TrainConfig(**base)


def interrupt_at_step(cfg, data, step):
    """Run ``cfg`` until ``on_step`` sees row ``step`` (before that step's checkpoint) and interrupt it there."""

    def stop(row, model):
        if row["step"] == step:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, data, on_step=stop)


# ---------------------------------------------------------------------- schedules
def test_schedule_shapes():
    cfg = TrainConfig(steps=1000, lr=1.0, batch_size=10, batch_size_start=2, batch_ramp_frac=0.1)
    t = schedule_table(cfg)
    lr = t.lr.to_numpy()
    warm = int(cfg.warmup_frac * 1000)
    assert lr[0] == pytest.approx(1 / warm) and all(lr[1:warm] > lr[: warm - 1]) and lr[warm - 1] == 1.0
    start, end = int(cfg.lr_decay_start_frac * 1000) + 1, int(cfg.lr_decay_end_frac * 1000)
    assert (lr[warm:start] == 1.0).all()  # constant
    assert all(lr[start + 1 : end] < lr[start : end - 1])  # cosine decay, strictly falling ...
    assert lr[end - 1] == pytest.approx(cfg.lr_min_ratio, rel=0.02)  # ... to 2.2e-5 / 2.2e-4
    final = int(math.ceil(cfg.lr_final_frac * 1000))
    assert (lr[end + 1 : final] == cfg.lr_min_ratio).all() and (lr[final:] == cfg.lr_final_ratio).all()
    bs = t.batch_size.to_numpy()
    assert bs[0] == 2 and bs[-1] == 10 and (bs[1:] >= bs[:-1]).all() and (bs[100:] == 10).all()
    assert t.tokens.iloc[-1] == bs.sum() * cfg.seq_len
    assert mtp_lambda_at(0, 1000, cfg) == 0.3 and mtp_lambda_at(999, 1000, cfg) == 0.1
    assert mtp_lambda_at(675, 1000, cfg) == 0.3 and mtp_lambda_at(677, 1000, cfg) == 0.1
    assert bias_speed_at(965, 1000, cfg) == cfg.bias_update_speed and bias_speed_at(967, 1000, cfg) == 0.0
    assert bias_speed_at(0, 1000, cfg.replace(balance="aux_loss")) == 0.0  # no update without the bias variants
    assert batch_size_at(0, 1000, TrainConfig(batch_size=15360)) == 3072  # the paper's 3072 -> 15360
    with pytest.raises(ValueError, match="step must be in"):
        lr_at(1000, 1000, cfg)


# ---------------------------------------------------------------------- training
def test_short_run_learns_and_logs_every_metric(data):
    result = train(tiny(steps=16, batch_size=4, eval_every=8), data)
    m = result.metrics
    assert len(m) == 16 and list(m.step) == list(range(16))
    assert m.loss_main.iloc[-5:].mean() < m.loss_main.iloc[:3].mean() - 0.2
    for col in (
        "lr",
        "batch_size",
        "tokens_seen",
        "loss_mtp_1",
        "loss_aux",
        "loss_total",
        "grad_norm",
        "tokens_per_s",
        "maxvio_batch",
        "maxvio_seq",
        "mtp_lambda",
        "gamma",
        "bias_abs_mean",
    ):
        assert col in m.columns and m[col].notna().all(), col
    assert m.tokens_seen.iloc[-1] == m.batch_size.sum() * SEQ
    assert set(result.val.step) == {8, 16} and set(result.val.domain) == set(data.val)
    assert result.loads["counts"].shape == (16, 2, 8)  # steps, MoE layers (main + MTP), experts
    # counts of a step = every (token, slot) of that step's batch, per layer
    per_layer = result.loads["counts"].sum(axis=2)
    assert (per_layer[:, 0] == m.batch_size.to_numpy() * SEQ * 2).all()
    assert (per_layer[:, 1] == m.batch_size.to_numpy() * (SEQ - 1) * 2).all()  # the MTP block sees T - 1 tokens
    v = result.val.set_index(["step", "domain"])
    assert v.loc[16].loss.mean() < v.loc[8].loss.mean()


def test_gradient_accumulation_matches_one_big_batch(data):
    one = train(tiny(steps=2, micro_batch_size=4, balance="none"), data)
    acc = train(tiny(steps=2, micro_batch_size=1, balance="none"), data)
    assert one.metrics.loss_total.tolist() == pytest.approx(acc.metrics.loss_total.tolist(), rel=1e-5)
    for (name, p), q in zip(one.model.named_parameters(), acc.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_bias_is_updated_once_per_optimizer_step(data):
    gamma = 1e-3
    result = train(tiny(steps=1, batch_size=4, batch_size_start=4, micro_batch_size=1, bias_update_speed=gamma), data)
    bias = result.loads["bias"][0]  # after the step's update, from zero
    steps = torch.tensor(bias).abs().unique().tolist()
    assert max(steps) == pytest.approx(gamma)  # 4 micro-batches, one update of ±γ (not 4γ)
    assert all(v == 0 or v == pytest.approx(gamma) for v in steps)


def test_maxvio_aux_free_below_none(data):
    kw = dict(steps=60, batch_size=16, batch_size_start=16, micro_batch_size=16, lr=3e-3, model={"n_mtp": 0})
    none = train(tiny(balance="none", **kw), data)
    free = train(tiny(balance="aux_free", bias_update_speed=1e-2, **kw), data)
    v_none, v_free = none.metrics.maxvio_batch.iloc[-20:].mean(), free.metrics.maxvio_batch.iloc[-20:].mean()
    assert v_free < 0.8 * v_none, (v_free, v_none)
    assert (none.loads["bias"] == 0).all() and (free.loads["bias"] != 0).any()


def test_aux_loss_variant_adds_the_loss(data):
    r = train(tiny(steps=2, balance="aux_loss"), data)
    assert r.model_cfg.aux_loss_alpha == 0.01 and (r.metrics.loss_aux > 0).all()
    r = train(tiny(steps=1, balance="aux_free_seq"), data)
    assert r.model_cfg.seq_aux_loss_alpha == 1e-4 and r.model_cfg.aux_loss_alpha == 0
    assert (r.metrics.loss_aux > 0).all()


def test_bf16_autocast_runs(data):
    r = train(tiny(steps=2, dtype="bf16"), data)
    assert r.metrics.loss_total.map(math.isfinite).all()
    assert r.model.embed.weight.dtype == torch.float32  # master weights stay fp32


def test_per_domain_evaluation_matches_the_model_losses(data):
    model = train(tiny(steps=2), data).model
    rows, loads = evaluate(model, data.val, batch_size=64)
    assert [r["domain"] for r in rows] == list(data.val)
    for row in rows:
        val = data.val[row["domain"]]
        tokens, targets = val[:, :-1], val[:, 1:]
        with torch.no_grad():
            logits, losses = model(tokens, targets)
        assert row["loss"] == pytest.approx(losses["main"].item(), rel=1e-5)
        assert row["mtp_1_loss"] == pytest.approx(losses["mtp_1"].item(), rel=1e-5)
        assert row["acc"] == pytest.approx((logits.argmax(-1) == targets).float().mean().item())
    by_domain = {}
    for r in loads:
        by_domain.setdefault((r["domain"], r["layer"]), []).append(r["relative_load"])
    for rel in by_domain.values():
        assert sum(rel) / len(rel) == pytest.approx(1.0)  # relative loads average to 1 per layer


# ---------------------------------------------------------------------- checkpoints and the run folder
def test_resume_continues_the_identical_trajectory(tmp_path, data):
    kw = dict(steps=6, batch_size=4, micro_batch_size=2, eval_every=3)
    full = train(tiny(out=str(tmp_path / "full"), **kw), data)

    part = tiny(out=str(tmp_path / "part"), checkpoint_every=2, **kw)
    interrupt_at_step(part, data, 3)
    assert latest_checkpoint(tmp_path / "part").name == "ckpt-0000002"  # on_step runs before the step-4 checkpoint
    resumed = train(part, data, resume=True)
    drop = ["tokens_per_s", "time_s"]
    assert full.metrics.drop(columns=drop).equals(resumed.metrics.drop(columns=drop))  # bitwise
    assert full.val.equals(resumed.val)
    for p, q in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(p, q)
    loaded = load_run(tmp_path / "part")
    for p, q in zip(full.model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(p, q)
    assert loaded.metrics.drop(columns=drop).equals(
        full.metrics.drop(columns=drop).astype(loaded.metrics.dtypes.drop(drop).to_dict())
    )


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data):
    out = tmp_path / "run"

    def poison(row, model):
        if row["step"] == 2:  # after 3 steps; the next forward is non-finite
            with torch.no_grad():
                model.head.weight.fill_(float("nan"))

    cfg = tiny(out=str(out), steps=8, checkpoint_every=2)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss .* at step 3.*ckpt-0000002 \(intact\)"):
        train(cfg, data, on_step=poison)
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "ckpt-0000002"
    digest = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    loaded = load_run(out)
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())
    assert len(loaded.metrics) == 2
    assert hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest() == digest
    # resuming the stopped run continues from the good checkpoint
    resumed = train(cfg, data, resume=True)
    assert len(resumed.metrics) == 8 and resumed.metrics.loss_total.map(math.isfinite).all()


def test_run_folder_guards(tmp_path, data):
    out = tmp_path / "run"
    train(tiny(out=str(out), steps=2), data)
    with pytest.raises(FileExistsError, match="pass --resume to continue it or --overwrite"):
        train(tiny(out=str(out), steps=2), data)
    with pytest.raises(FileExistsError, match=r"a different run \(train.lr: 0.003 -> 0.001"):
        train(tiny(out=str(out), steps=2, lr=1e-3), data)
    with pytest.raises(ValueError, match=r"mismatched fields .*train.steps: 2 -> 3.*model.n_mtp: 1 -> 0"):
        train(tiny(out=str(out), steps=3, model={"n_mtp": 0}), data, resume=True)
    done = train(tiny(out=str(out), steps=2), data, resume=True)  # a finished run resumes to itself
    assert len(done.metrics) == 2
    r = train(tiny(out=str(out), steps=3, lr=1e-3), data, overwrite=True)
    assert len(r.metrics) == 3 and load_run(out).train_cfg.lr == 1e-3
    other = tmp_path / "notarun"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no dsv3lab run"):
        train(tiny(out=str(other), steps=1), data, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep me"


def test_checkpoint_from_another_config_is_refused(tmp_path, data):
    import json

    out = tmp_path / "run"
    train(tiny(out=str(out), steps=1), data)
    state = json.loads((latest_checkpoint(out) / "state.json").read_text())
    state["model_config"]["dim"] = 128
    state["train_config"]["seq_len"] = 64
    (latest_checkpoint(out) / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"another configuration.*train.seq_len: 64 -> 16.*model.dim: 128 -> 64"):
        load_run(out)
    with pytest.raises(FileNotFoundError, match="holds no dsv3lab run"):
        load_run(tmp_path)


# ---------------------------------------------------------------------- configuration and the command line
def test_config_errors():
    with pytest.raises(ValueError, match="balance must be one of"):
        TrainConfig(balance="aux")
    with pytest.raises(ValueError, match="balance='none' has no balance loss"):
        TrainConfig(balance="none", model={"aux_loss_alpha": 0.01}).model_config()
    with pytest.raises(ValueError, match="gate_bias must be true"):
        TrainConfig(balance="aux_free", model={"gate_bias": False}).model_config()
    with pytest.raises(ValueError, match="unknown ModelConfig field: 'n_expert'"):
        TrainConfig(model={"n_expert": 3})
    with pytest.raises(ValueError, match="seq_len .* max_seq_len"):
        TrainConfig(preset="tiny", seq_len=1024).model_config()
    with pytest.raises(ValueError, match="ordered"):
        TrainConfig(warmup_frac=0.9)
    cfg = TrainConfig().with_overrides(["steps=7", "n_mtp=0", "balance=aux_loss", "aux_loss_alpha=0.02"])
    assert cfg.steps == 7 and cfg.model == {"n_mtp": 0, "aux_loss_alpha": 0.02}
    assert cfg.model_config().aux_loss_alpha == 0.02 and cfg.model_config().n_mtp == 0
    with pytest.raises(ValueError, match=r"--set steps: expected an integer"):
        TrainConfig().with_overrides(["steps=many"])
    assert TrainConfig(out="a", progress=False).hash() == TrainConfig(out="b").hash() != TrainConfig(lr=1).hash()


def test_cli_bad_inputs(tmp_path, capsys):
    assert main(["train", "--steps", "1", "--set", "n_expert=4", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown --set key" in err and "n_routed_experts" in err
    assert main(["train", "--steps", "1", "--set", "bias_update_sped=1", "--out", str(tmp_path / "r")]) == 2
    assert "did you mean bias_update_speed" in capsys.readouterr().err
    assert main(["train", "--steps", "1", "--resume", "--overwrite", "--out", str(tmp_path / "r")]) == 2
    assert "choose one" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_mtp_acceptance_matches_a_brute_force_computation(data):
    from dsv3lab import ModelConfig, build_model
    from dsv3lab.train.metrics import mtp_acceptance

    model = build_model(ModelConfig.preset("tiny"), seed=0).eval()
    with torch.no_grad():  # larger random weights: varied greedy choices, so that agreement is not trivial
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    rows = data.val["code"][:2, :9]  # T = 8 tokens per row
    got = mtp_acceptance(model, rows, batch_size=2)
    hits = n = 0
    with torch.no_grad():
        for row in rows:
            t = row[:-1]
            for i in range(len(t) - 1):
                prefix = t[: i + 1][None]
                h = model.hidden(prefix)
                a = model.logits(h)[0, -1].argmax()
                b = model.logits(model.hidden(torch.cat([prefix, a.view(1, 1)], 1)))[0, -1].argmax()
                nxt = torch.cat([t[1 : i + 1], a.view(1)])[None]  # true tokens t_{j+1} for j < i, then a
                d = model.mtp_logits(1, model.mtp_hidden(1, h, nxt))[0, -1].argmax()
                hits += int(d == b)
                n += 1
    assert got["positions"] == n == 14
    assert got["acceptance"] == pytest.approx(hits / n)


def test_bad_corpus_folders(tmp_path, capsys):
    from dsv3lab.train import make_data

    cfg = TrainConfig(preset="tiny", model={"vocab_size": 8192}, seq_len=SEQ)
    with pytest.raises((FileNotFoundError, ValueError), match="missing"):
        make_data(cfg.replace(corpus=str(tmp_path / "missing")), cfg.model_config())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError):
        make_data(cfg.replace(corpus=str(empty)), cfg.model_config())
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "blob.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError):
        make_data(cfg.replace(corpus=str(binary)), cfg.model_config())
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--steps",
                "1",
                "--set",
                f"corpus={tmp_path / 'missing'}",
                "--set",
                "vocab_size=8192",
                "--set",
                f"seq_len={SEQ}",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 2
    )
    assert "missing" in capsys.readouterr().err


def test_data_that_does_not_fit_the_run_is_refused(data):
    with pytest.raises(ValueError, match="seq_len=32"):
        train(tiny(seq_len=32), data)
    with pytest.raises(ValueError, match="vocab_size"):
        train(tiny(model={"vocab_size": 256}), data)


def test_run_cache_trains_once(tmp_path, data):
    from dsv3lab.train.experiments import RunCache

    class SyntheticCache(RunCache):
        def data(self, cfg):
            return data

    cache = SyntheticCache(tmp_path, log=lambda msg: None)
    first = cache.run(tiny(steps=2))
    latest = next(tmp_path.iterdir()) / "latest"
    stamp = latest.stat().st_mtime_ns
    again = cache.run(tiny(steps=2, progress=True))  # environment fields do not change the key
    assert latest.stat().st_mtime_ns == stamp and len(list(tmp_path.iterdir())) == 1
    assert first.metrics.loss_total.tolist() == again.metrics.loss_total.tolist()
    cache.run(tiny(steps=2, lr=1e-3))
    assert len(list(tmp_path.iterdir())) == 2


def test_bf16_adam_moments_train_resume_identically_and_keep_their_dtype(tmp_path, data):
    kw = dict(steps=6, batch_size=4, micro_batch_size=2, eval_every=0, adam_moments="bf16")
    full = train(tiny(out=str(tmp_path / "full"), **kw), data)
    fp32 = train(tiny(**{**kw, "adam_moments": "fp32"}), data)
    # BF16 moments round the stored m and v only: the run stays close to the FP32 one but is not identical to it
    assert not full.metrics.loss_main.equals(fp32.metrics.loss_main)
    torch.testing.assert_close(
        torch.tensor(full.metrics.loss_main.values), torch.tensor(fp32.metrics.loss_main.values), rtol=2e-2, atol=0
    )

    part = tiny(out=str(tmp_path / "part"), checkpoint_every=2, **kw)
    interrupt_at_step(part, data, 3)
    resumed = train(part, data, resume=True)
    drop = ["tokens_per_s", "time_s"]
    assert full.metrics.drop(columns=drop).equals(resumed.metrics.drop(columns=drop))  # bitwise
    from safetensors.torch import load_file

    opt = load_file(str(latest_checkpoint(tmp_path / "part") / "optimizer.safetensors"))
    dtypes = {v.dtype for k, v in opt.items() if k.endswith(".exp_avg") or k.endswith(".exp_avg_sq")}
    assert dtypes == {torch.bfloat16}


def test_options_added_later_do_not_change_the_identity_at_their_defaults():
    base = TrainConfig(preset="tiny")
    assert "adam_moments" not in base.identity()
    bf16 = TrainConfig(preset="tiny", adam_moments="bf16")
    assert bf16.identity()["adam_moments"] == "bf16" and bf16.hash() != base.hash()
    with pytest.raises(ValueError, match=r"adam_moments must be one of \('fp32', 'bf16'\)"):
        TrainConfig(adam_moments="fp16")
