"""Training in stages (dsv3lab.train.stages): a new run from a parent's checkpoint with new RoPE/context settings,
its record of the parent, its refusals, and that a stage resumes bit for bit like any run."""

import json

import pytest
import torch

from dsv3lab import ModelConfig, build_model
from dsv3lab.cli import main
from dsv3lab.model.transformer import load_state_dict_strict
from dsv3lab.train import TrainConfig, latest_checkpoint, load_run, train
from dsv3lab.train.checkpoint import read_checkpoint
from dsv3lab.train.stages import STAGE_CHANGEABLE, stage_config, weights_digest
from helpers import SyntheticData

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT, LONG = 16, 32
EXTEND = ["seq_len=32", "max_seq_len=64", "rope_factor=4"]  # original_seq_len stays 16: YaRN with s = 4


@pytest.fixture(scope="module")
def short_data():
    return SyntheticData(vocab_size=512, seq_len=SHORT, seed=0)


@pytest.fixture(scope="module")
def long_data():
    return SyntheticData(vocab_size=512, seq_len=LONG, seed=1)


@pytest.fixture(scope="module")
def parent(tmp_path_factory, short_data):
    """A short-context run: max_seq_len = original_seq_len = 16 (plain RoPE)."""
    out = tmp_path_factory.mktemp("stages") / "short"
    model = {"max_seq_len": SHORT, "original_seq_len": SHORT}
    cfg = TrainConfig(
        preset="tiny", model=model, seq_len=SHORT, steps=4, batch_size=4, eval_every=0, progress=False, out=str(out)
    )
    train(cfg, short_data)
    return out


def test_a_stage_starts_from_the_parent_weights_and_records_it(parent, long_data, tmp_path):
    cfg = stage_config(parent, EXTEND, steps=3, out=str(tmp_path / "yarn"))
    assert cfg.init_from == str(parent) and cfg.seq_len == LONG and cfg.steps == 3
    model_cfg = cfg.model_config()
    assert model_cfg.yarn_enabled and (model_cfg.original_seq_len, model_cfg.max_seq_len) == (SHORT, 64)
    stage = train(cfg, long_data)

    # the first step's loss is the parent's weights under the stage's RoPE, on the stage's first batch
    ckpt = latest_checkpoint(parent)
    by_hand = build_model(model_cfg)
    load_state_dict_strict(by_hand, read_checkpoint(ckpt)[0])
    tokens, targets = long_data.batch(0, cfg.effective_batch_size_start)
    with torch.no_grad():
        _, losses = by_hand.train()(tokens, targets)
    assert stage.metrics.loss_main.iloc[0] == pytest.approx(float(losses["main"]), abs=1e-5)
    fresh = train(cfg.replace(init_from="", out=""), long_data)  # a fresh init starts elsewhere
    assert abs(fresh.metrics.loss_main.iloc[0] - stage.metrics.loss_main.iloc[0]) > 0.1

    run = json.loads((tmp_path / "yarn" / "run.json").read_text())
    assert run["parent"]["checkpoint"] == str(ckpt.resolve()) and run["parent"]["step"] == 4
    assert run["parent"]["model_digest"] == weights_digest(ckpt)
    assert run["train_config"]["init_from"] == str(parent)
    assert load_run(tmp_path / "yarn").model_cfg.rope_factor == 4


def test_a_stage_resumes_bit_identically(parent, long_data, tmp_path):
    full = train(stage_config(parent, EXTEND, steps=5, out=str(tmp_path / "full")), long_data)
    part = stage_config(parent, EXTEND, steps=5, out=str(tmp_path / "part"), checkpoint_every=2)

    def stop(row, model):
        if row["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(part, long_data, on_step=stop)
    resumed = train(part, long_data, resume=True)
    drop = ["tokens_per_s", "time_s"]
    assert full.metrics.drop(columns=drop).equals(resumed.metrics.drop(columns=drop))
    for p, q in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(p, q)


def test_plain_resume_refuses_new_settings_and_points_to_a_stage(parent, short_data):
    cfg = TrainConfig.from_dict(json.loads((parent / "run.json").read_text())["train_config"])
    cfg = cfg.replace(out=str(parent), progress=False).with_overrides(["max_seq_len=64", "rope_factor=4"])
    with pytest.raises(ValueError, match=r"model.max_seq_len: 16 -> 64.*start a new stage: --from"):
        train(cfg, short_data, resume=True)


@pytest.mark.parametrize(
    "override,match",
    [
        ("dim=32", r"dim: 64 -> 32"),
        ("n_mtp=0", r"n_mtp: 1 -> 0"),
        ("n_activated_experts=3", r"n_activated_experts: 2 -> 3"),
        ("score_func=softmax", r"score_func: 'sigmoid' -> 'softmax'"),
    ],
)
def test_a_stage_refuses_changes_that_cannot_continue_the_weights(parent, long_data, tmp_path, override, match):
    cfg = stage_config(parent, [*EXTEND, override], steps=1, out=str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=rf"cannot start a stage from .*{match}"):
        train(cfg, long_data)
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_every_changeable_field_is_a_model_field():
    assert set(STAGE_CHANGEABLE) <= set(ModelConfig.field_names())
    assert not {"dim", "n_layers", "vocab_size", "n_routed_experts", "n_mtp", "gate_bias"} & set(STAGE_CHANGEABLE)


def test_a_resumed_stage_refuses_a_parent_that_changed(short_data, long_data, tmp_path):
    model = {"max_seq_len": SHORT, "original_seq_len": SHORT}
    base = TrainConfig(preset="tiny", model=model, seq_len=SHORT, steps=2, batch_size=4, eval_every=0, progress=False)
    train(base.replace(out=str(tmp_path / "p")), short_data)
    cfg = stage_config(tmp_path / "p", EXTEND, steps=4, out=str(tmp_path / "s"), checkpoint_every=10)

    def stop(row, model):
        raise KeyboardInterrupt  # after the first step, before any checkpoint of the stage

    with pytest.raises(KeyboardInterrupt):
        train(cfg, long_data, on_step=stop)
    train(base.replace(out=str(tmp_path / "p"), steps=3), short_data, overwrite=True)  # the parent moves on
    with pytest.raises(ValueError, match="parent's weights changed since the stage started"):
        train(cfg, long_data, resume=True)


def test_cli_from(parent, tmp_path, capsys):
    assert main(["train", "--from", str(parent), "--preset", "tiny", "--out", str(tmp_path / "x")]) == 2
    assert "drop --preset" in capsys.readouterr().err
    assert main(["train", "--from", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "neither a checkpoint folder" in capsys.readouterr().err
    assert main(["train", "--from", str(parent), "--set", "dim=32", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "dim: 64 -> 32" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
