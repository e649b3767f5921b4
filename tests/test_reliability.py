"""Reliability (the house's safety rules, README "Safety"): nothing outside the target is written, read or deleted;
every bad value gets a clear refusal naming it; the CLI has one error boundary. Real files in temporary folders, a
real second process for the run lock."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3lab
from dsv3lab.cli import main
from dsv3lab.files import RunLock, atomic_folder, publish, recover
from dsv3lab.infer import CheckpointError, convert, from_pretrained, generate, save_pretrained
from dsv3lab.infer.checkpoint import INDEX_FILE
from dsv3lab.model.transformer import IGNORE_INDEX
from dsv3lab.train import TrainConfig, train
from dsv3lab.utils import env_flag
from helpers import SyntheticData, random_tokens

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def ckpt(tiny_model, tmp_path):
    """A tiny checkpoint in the official layout, split over several shards."""
    return save_pretrained(tiny_model, tmp_path / "ckpt", max_shard_size="150KB")


def _index(folder):
    return json.loads((folder / INDEX_FILE).read_text())


def _write_index(folder, index):
    (folder / INDEX_FILE).write_text(json.dumps(index))


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# ---------------------------------------------------------------------- §1 nothing outside the target
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_a_shard_name_that_leaves_the_folder_is_refused_by_every_reader(ckpt, tmp_path, kind, capsys):
    index = _index(ckpt)
    first = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "shared.safetensors"  # what an attacker's index points at
    (ckpt / first).rename(outside)
    name = {"dotdot": "../shared.safetensors", "absolute": str(outside), "symlink": first}[kind]
    if kind == "symlink":
        (ckpt / first).symlink_to(outside)
    index["weight_map"] = {k: (name if v == first else v) for k, v in index["weight_map"].items()}
    _write_index(ckpt, index)
    before = _files(tmp_path)
    with pytest.raises(CheckpointError, match="refused"):
        from_pretrained(ckpt)
    dst = tmp_path / "out" / "converted"
    with pytest.raises(CheckpointError, match="refused"):
        convert(ckpt, dst)
    assert main(["generate", "--checkpoint", str(ckpt), "--ids", "1,2"]) == 2
    assert "refused" in capsys.readouterr().err
    assert _files(tmp_path) == before  # nothing written beside DST (today's data loss: a file named ../shared...)


@pytest.mark.parametrize("case", ["unrelated", "contains_src", "contains_cwd", "plain_file"])
def test_convert_overwrite_deletes_only_a_checkpoint(ckpt, tmp_path, case, monkeypatch):
    dst = {"unrelated": tmp_path / "docs", "contains_src": tmp_path, "contains_cwd": tmp_path / "work"}.get(case)
    if case == "unrelated":
        dst.mkdir()
        (dst / "thesis.tex").write_text("years of work")
    elif case == "contains_cwd":
        (dst / "sub").mkdir(parents=True)
        (dst / "notes.txt").write_text("keep")
        monkeypatch.chdir(dst / "sub")
    elif case == "plain_file":
        dst = tmp_path / "a-file"
        dst.write_text("keep")
    before = _files(tmp_path) if dst.is_dir() else dst.read_text()
    with pytest.raises(FileExistsError, match="refusing to replace|not a folder"):
        convert(ckpt, dst, overwrite=True)
    assert (_files(tmp_path) if dst.is_dir() else dst.read_text()) == before


def test_convert_overwrite_replaces_a_checkpoint(ckpt, tiny_model, tmp_path):
    dst = save_pretrained(tiny_model, tmp_path / "old", fp8=True)
    convert(ckpt, dst, overwrite=True)  # a checkpoint is replaceable
    assert "quantization_config" not in json.loads((dst / "config.json").read_text())


def test_train_overwrite_shares_the_guard(tmp_path, monkeypatch):
    data = SyntheticData(vocab_size=512, seq_len=16)
    cfg = TrainConfig(preset="tiny", steps=1, batch_size=2, micro_batch_size=2, seq_len=16, eval_every=0,
                      progress=False, out=str(tmp_path / "run"))  # fmt: skip
    train(cfg, data)
    (tmp_path / "run" / "mine").mkdir()
    monkeypatch.chdir(tmp_path / "run" / "mine")  # the user works inside the run folder
    with pytest.raises(FileExistsError, match="current working directory"):
        train(cfg, data, overwrite=True)
    assert (tmp_path / "run" / "run.json").exists()


LOCKER = """import sys, time
from dsv3lab.files import RunLock
RunLock(sys.argv[1]).__enter__()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_the_same_folder_is_refused_until_the_first_exits(tmp_path, capsys):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, str(out)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["train", "--preset", "tiny", "--steps", "1", "--out", str(out), "--quiet"]
        assert main(args + ["--set", "batch_size=2", "--set", "seq_len=16"]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "one dsv3lab run at a time" in err
        assert not (out / "run.json").exists()  # the refused run wrote nothing
        holder.send_signal(signal.SIGKILL)  # a crash: the OS releases the lock; the stale lock file stays behind
        holder.wait(10)
        with RunLock(out):  # a dead holder's lock is not mistaken for a live one
            pass
    finally:
        holder.kill()


def test_convert_verifies_what_it_streams_as_the_loader_does(ckpt, tmp_path):
    files = sorted(set(_index(ckpt)["weight_map"].values()))
    # a tensor listed for a shard that does not hold it
    index = _index(ckpt)
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][name] = files[1]
    _write_index(ckpt, index)
    with pytest.raises(CheckpointError, match="is listed in the index for .* but is not in that file"):
        convert(ckpt, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    # a tensor of the wrong shape
    index["weight_map"][name] = files[0]
    _write_index(ckpt, index)
    shard = load_file(ckpt / files[0])
    shard[name] = torch.zeros(3, 3)
    save_file(shard, ckpt / files[0])
    with pytest.raises(CheckpointError, match=f"{name}: the checkpoint holds shape \\(3, 3\\)"):
        convert(ckpt, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_crash_between_the_two_renames_leaves_the_old_or_the_new_folder(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "v").write_text("old")
    # the fallback (no atomic exchange): crash after the old folder was moved aside
    monkeypatch.setattr("dsv3lab.files._exchange", lambda a, b: False)
    real_replace, calls = os.replace, []

    def crash_on_second(a, b):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("power cut")
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt), atomic_folder(target, overwrite=True) as tmp:
        (tmp / "v").write_text("new")
    monkeypatch.undo()
    assert not target.exists()  # between the renames
    assert recover(target) and (target / "v").read_text() == "old"  # put back on the next load
    # the atomic exchange: a crash right after it leaves the new folder in place and the old one as a temporary
    new = tmp_path / ".ckpt.tmp-123456789"
    new.mkdir()
    (new / "v").write_text("new")
    monkeypatch.setattr("shutil.rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        publish(new, target)
    monkeypatch.undo()
    assert (target / "v").read_text() == "new"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ckpt"]
    assert leftovers and all(n.startswith(".ckpt.") for n in leftovers)  # hidden: never taken for a checkpoint
    with atomic_folder(target, overwrite=True) as tmp:  # the next save removes a dead writer's leftovers
        (tmp / "v").write_text("newer")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


# ---------------------------------------------------------------------- §2 values, not only combinations
MODEL_BAD = [
    ("route_scale", float("nan")),
    ("rope_factor", float("nan")),
    ("rope_theta", float("inf")),
    ("norm_eps", 0.0),
    ("norm_eps", -1e-6),
    ("rope_theta", 0.0),
    ("rope_factor", 0.5),
    ("init_std", float("-inf")),
    ("mtp_lambda", float("nan")),
    ("gate_bias", "no"),
    ("fp8", 1),
    ("dim", "64"),
    ("dim", 64.0),
    ("n_layers", True),
    ("vocab_size", -5),
    ("attn_impl", "flash"),
]


@pytest.mark.parametrize("field,value", MODEL_BAD, ids=[f"{f}={v!r}" for f, v in MODEL_BAD])
def test_model_config_refuses_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        dsv3lab.ModelConfig.preset("tiny", **{field: value})


TRAIN_BAD = [
    ("lr", float("nan")),
    ("lr", 0.0),
    ("lr", float("inf")),
    ("grad_clip", -1.0),
    ("weight_decay", float("nan")),
    ("beta2", 1.0),
    ("steps", 2.5),
    ("steps", "10"),
    ("log_loads", "yes"),
    ("warmup_frac", 1.5),
    ("seed", -1),
]


@pytest.mark.parametrize("field,value", TRAIN_BAD, ids=[f"{f}={v!r}" for f, v in TRAIN_BAD])
def test_train_config_refuses_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        TrainConfig(**{field: value})


def test_set_strings_that_parse_to_nan_or_inf_are_refused():
    with pytest.raises(ValueError, match="route_scale must be a finite number"):
        dsv3lab.ModelConfig.preset("tiny").with_overrides(["route_scale=nan"])
    with pytest.raises(ValueError, match="lr must be a finite number"):
        TrainConfig().with_overrides(["lr=inf"])


def _edit_config(folder, change):
    cfg = json.loads((folder / "config.json").read_text())
    change(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda f: (f / "config.json").write_text("{not json"), "is not valid JSON"),
        (lambda f: (f / "config.json").write_text("[1, 2]"), "holds a JSON list"),
        (lambda f: _edit_config(f, lambda c: c.pop("hidden_size")), "no 'hidden_size'"),
        (lambda f: _edit_config(f, lambda c: c.update(hidden_size="64")), "hidden_size \\(dim must be"),
        (lambda f: _edit_config(f, lambda c: c.update(rms_norm_eps="tiny")), "rms_norm_eps must be a number"),
        (lambda f: _edit_config(f, lambda c: c["dsv3lab"].update(attn="naive")), "unknown key\\(s\\) \\['attn'\\]"),
    ],
    ids=["not-json", "not-object", "missing-key", "wrong-type", "wrong-type-float", "unknown-dsv3lab-key"],
)
def test_a_bad_config_json_is_one_error_naming_the_file_and_key(ckpt, edit, match):
    edit(ckpt)
    with pytest.raises(CheckpointError, match=match) as err:
        from_pretrained(ckpt)
    assert "config.json" in str(err.value)


def test_sizes_that_do_not_match_the_tensors_are_refused_before_allocating(ckpt, monkeypatch):
    _edit_config(ckpt, lambda c: c.update(vocab_size=10**9))

    def no_allocation(*args, **kwargs):
        raise AssertionError("the model was materialised before the mismatch was found")

    monkeypatch.setattr(dsv3lab.DeepSeekV3, "to_empty", no_allocation)
    with pytest.raises(CheckpointError, match=r"model.embed_tokens.weight: the checkpoint holds shape \(512, 64\)"):
        from_pretrained(ckpt)


@pytest.mark.parametrize("bad", ["nan", "inf", "int"])
def test_a_tensor_with_non_finite_values_or_an_integer_dtype_is_refused(ckpt, bad):
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    file = _index(ckpt)["weight_map"][name]
    shard = load_file(ckpt / file)
    t = shard[name]
    if bad == "int":
        shard[name] = t.to(torch.int32)
    else:
        t = t.clone()
        t[0, 0] = float(bad)
        shard[name] = t
    save_file(shard, ckpt / file)
    match = "not a floating-point tensor" if bad == "int" else "NaN or infinite"
    with pytest.raises(CheckpointError, match=f"{name}.*{match}|{match}"):
        from_pretrained(ckpt)


def test_degenerate_model_inputs(tiny_model):
    with pytest.raises(ValueError, match="at least one sequence of at least one token"):
        tiny_model(torch.zeros(0, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one sequence of at least one token"):
        tiny_model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="start_pos must be >= 0"):
        tiny_model(torch.zeros(1, 4, dtype=torch.long), start_pos=-1)
    tokens = random_tokens(tiny_model.cfg, batch=2, seqlen=8)
    _, losses = tiny_model(tokens, torch.full_like(tokens, IGNORE_INDEX))  # every target ignored: a defined 0
    assert losses["main"].item() == 0.0 and all(math.isfinite(v.item()) for v in losses.values())
    losses["total"].backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in tiny_model.parameters())


GEN_BAD = [
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(temperature=0.8, top_p=0.0), "top_p must be in \\(0, 1\\]"),
    (dict(temperature=0.8, top_p=1.5), "top_p must be in \\(0, 1\\]"),
    (dict(temperature=0.8, top_k=0), "top_k must be an integer >= 1"),
    (dict(temperature=0.8, top_k=-3), "top_k must be an integer >= 1"),
    (dict(top_k=5), "they need temperature > 0"),
    (dict(seed=3), "no effect with temperature 0"),
    (dict(depth=1), "needs speculative='mtp'"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
]


@pytest.mark.parametrize("kwargs,match", GEN_BAD, ids=[str(k) for k, _ in GEN_BAD])
def test_generation_arguments_are_checked(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_model, [3, 4, 5], **{"max_new_tokens": 4, **kwargs})


def _cli_ckpt(tmp_path, n_mtp=1):
    model = dsv3lab.build_model(dsv3lab.ModelConfig.preset("tiny", n_mtp=n_mtp), seed=0)
    return save_pretrained(model, tmp_path / f"cli-{n_mtp}")


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--prompt", "hi"], "either --prompt TEXT or --ids"),
        (["--device", "cuda:7"], "cuda:7"),
        (["--device", "gpu0"], "not a device name|not supported"),
        (["--no-bos"], "--no-bos only applies"),
        (["--top-p", "0.9"], "need temperature > 0"),
        (["--temperature", "nan"], "temperature must be a finite number"),
        (["--quantize-activations"], "add --keep-fp8"),
    ],
)
def test_generate_cli_refuses_bad_or_ineffective_arguments(tmp_path, capsys, extra, match):
    ckpt = _cli_ckpt(tmp_path)
    assert main(["generate", "--checkpoint", str(ckpt), "--ids", "1,2,3", "--max-new-tokens", "2", *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(match, err), err


def test_speculative_on_a_checkpoint_without_mtp_says_so(tmp_path, capsys):
    ckpt = _cli_ckpt(tmp_path, n_mtp=0)
    assert main(["generate", "--checkpoint", str(ckpt), "--ids", "1,2", "--speculative", "mtp"]) == 2
    assert "this checkpoint has no MTP module" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--budget", "0"], ["--budget=-5GB"], ["--budget", "infGB"], ["--batch", "0"],
                                   ["--bytes-per-value", "0"]])  # fmt: skip
def test_memory_refuses_non_positive_budgets(capsys, extra):
    assert main(["memory", "tiny", *extra]) == 2
    err = capsys.readouterr().err
    assert "must be > 0" in err or "cannot read the size" in err


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("ON", True), ("0", False), ("no", False),
                                            ("off", False), ("", False), ("False", False)])  # fmt: skip
def test_environment_switches_are_parsed_strictly(monkeypatch, value, expected):
    monkeypatch.setenv("DSV3LAB_FAST", value)
    assert env_flag("DSV3LAB_FAST") is expected


@pytest.mark.parametrize("value", ["2", "yes please", "fast", "1.0"])
def test_an_unrecognised_switch_value_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("DSV3LAB_FAST", value)
    with pytest.raises(ValueError, match="DSV3LAB_FAST"):
        dsv3lab.utils.fast_mode()


# ---------------------------------------------------------------------- §3 one error boundary for the CLI
def test_a_corrupt_shard_is_one_line_and_exit_2(ckpt, capsys):
    file = sorted(set(_index(ckpt)["weight_map"].values()))[0]
    (ckpt / file).write_bytes((ckpt / file).read_bytes()[:100])  # truncated
    assert main(["generate", "--checkpoint", str(ckpt), "--ids", "1,2"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and file in err and "Traceback" not in err
    assert main(["--debug", "generate", "--checkpoint", str(ckpt), "--ids", "1,2"]) == 2
    assert "Traceback" in capsys.readouterr().err  # --debug shows where it came from


def test_a_corrupt_tokenizer_json_is_one_line(ckpt, capsys):
    (ckpt / "tokenizer.json").write_text("{broken")
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "hello"]) == 2
    assert "not a readable tokenizer.json" in capsys.readouterr().err


def test_a_failed_operation_exits_1(ckpt, tmp_path, capsys, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "dst"))

    monkeypatch.setattr("dsv3lab.infer.conversion.save_file", disk_full)
    assert main(["convert", str(ckpt), str(tmp_path / "dst")]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "nothing was published" in err
    assert not (tmp_path / "dst").exists() and not list(tmp_path.glob(".dst*"))  # no half-written folder


def test_an_interrupted_train_exits_130_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("dsv3lab.cli.train", interrupt)
    assert main(["train", "--preset", "tiny", "--steps", "2", "--out", str(out), "--quiet"]) == 130
    assert "no checkpoint had been written" in capsys.readouterr().err


def test_a_corrupt_data_cache_is_rebuilt_with_a_warning(tmp_path):
    from dsv3lab.data import DataConfig, make_datasets

    cfg = DataConfig.small(seq_len=64)
    first = make_datasets(cfg, cache_dir=tmp_path)
    cache = Path(first.stats["cache_file"])
    cache.write_bytes(cache.read_bytes()[:64])
    with pytest.warns(UserWarning, match="unreadable.*rebuilding"):
        again = make_datasets(cfg, cache_dir=tmp_path)
    assert not again.stats["from_cache"] and torch.equal(again.train, first.train)


def test_a_corpus_file_that_is_not_utf8_is_named_not_dropped_silently(tmp_path):
    from dsv3lab.data.corpus import folder_corpus

    (tmp_path / "good.txt").write_text("plain text\n" * 50)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 20)
    with pytest.warns(UserWarning, match="skipped 1 file.*latin1.txt"):
        docs = folder_corpus(tmp_path)
    assert {d.source.split("#")[0].split(":")[-1] for d in docs} == {"good.txt"}


def test_a_lock_is_released_on_any_exit_within_a_process(tmp_path):
    with pytest.raises(RuntimeError), RunLock(tmp_path / "r"):
        raise RuntimeError("boom")
    with RunLock(tmp_path / "r"):  # free again
        time.sleep(0)
