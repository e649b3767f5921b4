"""The inference commands: memory (against allocated caches), convert, generate (text streaming, --json, MTP)."""

import json

import pytest
import torch

import dsv3lab
from dsv3lab.cli import main
from dsv3lab.infer import save_pretrained
from dsv3lab.infer.generation import greedy_reference


def test_memory_671b_numbers(capsys):
    assert main(["memory", "671B", "--budget", "80GB", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["latent_bytes_per_token"] == 70_272 and row["materialized_bytes_per_token"] == 4_997_120
    assert row["ratio"] == pytest.approx(71.1, abs=0.05)
    assert row["max_context_latent"] == 80_000_000_000 // 70_272
    assert main(["memory", "--budget", "1GiB"]) == 0  # a table of every preset
    out = capsys.readouterr().out
    assert all(name in out for name in dsv3lab.PRESETS) and "1,073,741,824" in out


@pytest.mark.parametrize("preset", ["tiny", "toy"])
@pytest.mark.parametrize("layout,key", [("latent", "latent"), ("per_head", "materialized")])
def test_memory_matches_the_bytes_new_cache_allocates(capsys, preset, layout, key):
    """The longest context the command reports fits the budget with the real cache tensors; one more token does not.
    Caches of a meta-device model have real shapes and dtypes, so their bytes are exact without allocating."""
    cfg = dsv3lab.ModelConfig.preset(preset)
    with torch.device("meta"):
        model = dsv3lab.DeepSeekV3(cfg)
    per_token = model.new_cache(1, 1, dtype=torch.bfloat16, layout=layout, mtp=False).nbytes
    budget, batch = per_token * 3 * 100 + 7, 3  # room for 100 tokens of 3 sequences, plus a little
    assert main(["memory", preset, "--budget", str(budget), "--batch", str(batch), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    ctx = row[f"max_context_{key}"]
    assert row[f"{key}_bytes_per_token"] == per_token and ctx == 100
    assert model.new_cache(batch, ctx, dtype=torch.bfloat16, layout=layout).nbytes <= budget
    assert model.new_cache(batch, ctx + 1, dtype=torch.bfloat16, layout=layout).nbytes > budget


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model with dsv3lab's committed tokenizer, saved in the official layout."""
    from dsv3lab.data import default_tokenizer

    tok = default_tokenizer()
    model = dsv3lab.build_model(dsv3lab.ModelConfig.preset("tiny", vocab_size=tok.vocab_size), seed=0).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_pretrained(model, path, tokenizer=tok)
    return path, model, tok


def test_generate_streams_text_and_matches_greedy(checkpoint, capsys):
    path, model, tok = checkpoint
    assert main(["generate", "--checkpoint", str(path), "--prompt", "the quick", "--max-new-tokens", "6"]) == 0
    streamed = capsys.readouterr().out
    assert (
        main(["generate", "--checkpoint", str(path), "--prompt", "the quick", "--max-new-tokens", "6", "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    prompt = [model.cfg.bos_token_id] + tok.encode("the quick")  # text prompts start with bos, like documents
    expected = greedy_reference(model, prompt, 6)
    assert expected != greedy_reference(model, prompt[1:], 6)
    eos = model.cfg.eos_token_id
    expected = expected[: expected.index(eos)] if eos in expected else expected
    assert result["ids"] == expected and result["text"] == tok.decode(expected)
    assert streamed == result["text"] + "\n"
    assert result["tokens_per_forward"] == 1.0 and result["acceptance_rate"] is None


def test_generate_speculative_json(checkpoint, capsys):
    path, model, _ = checkpoint
    args = ["generate", "--checkpoint", str(path), "--ids", "5,9,11,2", "--max-new-tokens", "8", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--speculative", "mtp"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["ids"] == plain["ids"]
    assert {"acceptance_rate", "tokens_per_forward", "main_forwards"} <= set(spec)
    assert 0 <= spec["acceptance_rate"] <= 1 and spec["tokens_per_forward"] >= 1
    sampled = args + ["--speculative", "mtp", "--temperature", "0.8", "--top-k", "50", "--seed", "1"]
    assert main(sampled) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(sampled) == 0 and json.loads(capsys.readouterr().out)["ids"] == first["ids"]  # seeded
    assert len(first["ids"]) <= 8 and 0 <= first["acceptance_rate"] <= 1


def test_convert_and_errors(checkpoint, tmp_path, capsys):
    path, model, _ = checkpoint
    assert main(["convert", str(path), str(tmp_path / "fp8"), "--fp8"]) == 0
    assert (tmp_path / "fp8" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    assert main(["convert", str(path), str(tmp_path / "fp8")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert main(["generate", "--checkpoint", str(path)]) == 2
    assert "give --prompt" in capsys.readouterr().err
