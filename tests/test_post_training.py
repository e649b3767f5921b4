"""Post-training (§5): rule-based rewards, SFT's prompt masking, GRPO's advantages, KL and loss against hand
computations, rollouts laid out as documented, and the run guarantees (stage, run folder, bit-identical resume)."""

import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from dsv3lab import ModelConfig, build_model
from dsv3lab.cli import main
from dsv3lab.data import default_tokenizer, math_problem
from dsv3lab.data.math_problems import KINDS, MathProblem
from dsv3lab.model.transformer import IGNORE_INDEX
from dsv3lab.train import TrainConfig, latest_checkpoint, stage_config, train
from dsv3lab.train.grpo import (
    group_advantages,
    grpo_loss,
    kl_estimate,
    math_accuracy,
    rollout,
    token_logprobs,
    train_grpo,
)
from dsv3lab.train.rewards import extract_answer, format_ok, math_reward, normalize
from dsv3lab.train.sft import SFTData, encode_example, sft_rows

pytestmark = pytest.mark.usefixtures("one_thread")

SQRT = MathProblem("sqrt", "What is the square root of 144?", "12 × 12 = 144, so the root is 12.", "12")


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


# ---------------------------------------------------------------------- rewards
def test_problem_prompt_and_completion_make_the_document_and_kinds_are_complete():
    seen = set()
    for i in range(3000):
        p = math_problem(7, i)
        assert p.prompt + p.completion == p.text and p.prompt.endswith("Solution:")
        seen.add(p.kind)
    assert seen == set(KINDS)


@pytest.mark.parametrize(
    "completion,finished,correct,formatted",
    [
        (" 12 × 12 = 144, so the root is 12.\nAnswer: 12\n", True, 1, 1),
        (" 12 × 12 = 144.\nAnswer:  12.\n", True, 1, 1),  # whitespace and a final period do not matter
        (" 12 × 12 = 144, so the root is 12.\nAnswer: 12\n", False, 1, 0),  # cut off by the length limit
        (" 11 × 11 = 121.\nAnswer: 11\n", True, 0, 1),  # well formed, wrong
        (" Answer: 12\nAnswer: 12\n", True, 1, 0),  # two answer lines
        (" 12.\nAnswer: 12\nand more\n", True, 1, 0),  # the answer line is not the last
        (" 12 × 12 = 144\n", True, 0, 0),  # no answer at all
        (" so\nAnswer: 012\n", True, 0, 1),  # strings are compared, not numbers
    ],
)
def test_rule_based_rewards(completion, finished, correct, formatted):
    r = math_reward(completion, SQRT, finished, reward_correct=1.0, reward_format=0.5)
    assert (r.correct, r.format, r.total) == (correct, formatted, correct + 0.5 * formatted)


def test_answer_extraction_and_normalization():
    assert extract_answer("x\nAnswer: x = 9, y = 9\n") == " x = 9, y = 9"
    assert extract_answer("no answer") is None
    assert normalize("  x = 9,\n  y = 9. ") == "x = 9, y = 9"
    assert math_reward(" ok\nAnswer: 12\n", SQRT, True, 2.0, 0.25).total == 2.25
    assert not format_ok("Answer: 12", True)  # no final newline


# ---------------------------------------------------------------------- SFT
def test_sft_rows_mask_the_prompt_and_the_padding_by_hand():
    examples = [([0, 11, 12, 13], [21, 22, 1]), ([0, 31], [41, 42, 43, 44, 1])]
    tokens, targets = sft_rows(examples, seq_len=8, pad_id=2)
    assert tokens.tolist() == [[0, 11, 12, 13, 21, 22, 2, 2], [0, 31, 41, 42, 43, 44, 2, 2]]
    ig = IGNORE_INDEX
    assert targets.tolist() == [[ig, ig, ig, 21, 22, 1, ig, ig], [ig, 41, 42, 43, 44, 1, ig, ig]]
    with pytest.raises(ValueError, match="holds at most 4"):
        sft_rows(examples, seq_len=3, pad_id=2)


def test_the_sft_loss_counts_only_the_response(tok):
    data = SFTData(tok, seq_len=64, seed=0, kinds=("sqrt", "power"), n_eval=4)
    assert {p.kind for p in data.train_problems} == {"sqrt", "power"}
    assert torch.equal(data.batch(3, 4)[0], data.batch(3, 4)[0])  # a pure function of the step
    tokens, targets = data.tokens[:4], data.targets[:4]  # the rows of the first four training problems
    model = build_model(ModelConfig.preset("tiny", vocab_size=8192, n_mtp=0), seed=0)
    with torch.no_grad():
        logits, losses = model(tokens, targets)
    by_hand, n = 0.0, 0
    for b, problem in enumerate(data.train_problems[:4]):
        prompt, response = encode_example(tok, problem)
        seq = prompt + response
        assert tokens[b, : len(seq) - 1].tolist() == seq[:-1] and tokens[b, len(seq) - 1 :].eq(tok.pad_id).all()
        for pos in range(len(prompt) - 1, len(seq) - 1):  # the positions that predict a response token
            by_hand += F.cross_entropy(logits[b, pos], torch.tensor(seq[pos + 1]))
            n += 1
    assert n == int((targets != IGNORE_INDEX).sum())
    torch.testing.assert_close(losses["main"], by_hand / n, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- GRPO formulas
def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.5, 0.5, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 1.5, 0.5, 1.5]])
    got = group_advantages(rewards)
    for g, row in enumerate(rewards.tolist()):
        mean, std = statistics.mean(row), statistics.stdev(row)  # sample standard deviation
        expected = [0.0] * len(row) if std == 0 else [(r - mean) / std for r in row]
        torch.testing.assert_close(got[g], torch.tensor(expected))
    assert torch.equal(got[1], torch.zeros(4))  # no signal in a group that scored alike


def test_kl_estimate_is_unbiased_and_positive():
    """E_{o ~ π_θ}[π_ref/π_θ - log(π_ref/π_θ) - 1] = KL(π_θ || π_ref), exactly, over a small vocabulary."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    k3 = kl_estimate(p.log(), q.log())
    assert (k3 >= 0).all()
    torch.testing.assert_close((p * k3).sum(), (p * (p / q).log()).sum())
    assert kl_estimate(p.log(), p.log()).abs().max() == 0


def test_grpo_loss_by_hand_with_clipping():
    g = torch.Generator().manual_seed(0)
    n, t, eps, beta = 4, 5, 0.2, 0.04
    logp = -torch.rand(n, t, generator=g) * 3
    old = logp + torch.randn(n, t, generator=g) * 0.4  # ratios well outside [0.8, 1.2] in places
    ref = logp + torch.randn(n, t, generator=g) * 0.3
    adv = torch.tensor([1.2, -0.7, 0.0, -1.5])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    loss, stats = grpo_loss(logp, old, ref, adv, mask, eps, beta)
    total, n_clipped = 0.0, 0.0
    for i in range(n):
        tokens = [j for j in range(t) if mask[i, j]]
        acc = 0.0
        for j in tokens:
            rho = math.exp(logp[i, j] - old[i, j])
            clipped = min(max(rho, 1 - eps), 1 + eps)
            d = math.exp(ref[i, j] - logp[i, j]) - (ref[i, j] - logp[i, j]) - 1  # Eq. (27)
            acc += min(rho * adv[i], clipped * adv[i]) - beta * d  # Eq. (26)
            n_clipped += (rho != clipped) / len(tokens)
        total += acc / len(tokens)
    torch.testing.assert_close(loss, -torch.as_tensor(total).float(), rtol=1e-5, atol=1e-6)
    assert 0 < float(stats["clipped"]) == pytest.approx(n_clipped, rel=1e-5)
    # the gradient flows through the unclipped side only where min() picks it
    logp.requires_grad_(True)
    grpo_loss(logp, old, ref, adv, mask, eps, 0.0)[0].backward()
    assert logp.grad[~mask].abs().max() == 0 and logp.grad[2, 0] == 0  # no advantage, no KL: no gradient


def test_token_logprobs_by_hand():
    model = build_model(ModelConfig.preset("tiny"), seed=0)
    tokens = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    targets = tokens.roll(-1, 1)
    targets[:, :3] = IGNORE_INDEX
    with torch.no_grad():
        got = token_logprobs(model, tokens, targets)
    with torch.no_grad():
        logits, _ = model(tokens)
    for b in range(2):
        for t in range(9):
            want = 0.0 if t < 3 else float(torch.log_softmax(logits[b, t], -1)[targets[b, t]])
            assert float(got[b, t]) == pytest.approx(want, abs=1e-5)


def test_a_rollout_holds_the_completions_as_targets(tok):
    model = build_model(ModelConfig.preset("tiny", vocab_size=8192, n_mtp=0), seed=0)
    problems = [math_problem(1, i) for i in range(2)]
    ro = rollout(model, tok, problems, group_size=3, max_new_tokens=6, temperature=1.0, seed=0)
    assert ro.tokens.shape[0] == 6 and ro.rewards.shape == (2, 3)
    for i in range(6):
        prompt = encode_example(tok, problems[i // 3])[0]
        assert ro.tokens[i, : len(prompt)].tolist() == prompt
        ids = ro.targets[i][ro.targets[i] != IGNORE_INDEX].tolist()
        assert (
            ro.targets[i, len(prompt) - 1] != IGNORE_INDEX and (ro.targets[i, : len(prompt) - 1] == IGNORE_INDEX).all()
        )
        if ro.finished[i]:
            assert ids[-1] == tok.eos_id and tok.decode(ids[:-1]) == ro.completions[i]
        else:
            assert len(ids) == 6 and tok.decode(ids) == ro.completions[i]
        r = math_reward(ro.completions[i], problems[i // 3], ro.finished[i])
        assert (ro.correct.flatten()[i], ro.format.flatten()[i], ro.rewards.flatten()[i]) == (
            r.correct,
            r.format,
            r.total,
        )
    again = rollout(model, tok, problems, group_size=3, max_new_tokens=6, temperature=1.0, seed=0)
    assert torch.equal(again.tokens, ro.tokens)  # seeded


# ---------------------------------------------------------------------- the runs
@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny SFT run from scratch (vocabulary 8192: the committed tokenizer)."""
    out = tmp_path_factory.mktemp("post") / "sft"
    cfg = TrainConfig(
        preset="tiny",
        model={"vocab_size": 8192, "n_mtp": 0},
        stage="sft",
        math_kinds="sqrt",
        seq_len=48,
        steps=3,
        batch_size=4,
        eval_every=0,
        eval_problems=4,
        progress=False,
        out=str(out),
    )
    result = train(cfg)
    return out, result


def test_sft_is_the_trainer_with_masked_data(sft_run):
    out, result = sft_run
    assert (out / "tokenizer" / "tokenizer.json").exists() and latest_checkpoint(out) is not None
    assert result.final_val().loc["math", "tokens"] > 0  # evaluated on the masked held-out responses
    assert json.loads((out / "run.json").read_text())["train_config"]["stage"] == "sft"


def grpo_cfg(sft_dir, out, **kw):
    changes = dict(steps=3, batch_size=2, batch_size_start=0, group_size=4, micro_batch_size=4, eval_every=0, lr=1e-3)
    changes.update(kw)
    return stage_config(
        sft_dir,
        ["stage=grpo", "max_new_tokens=6", "balance=none", "eval_problems=2"],
        progress=False,
        out=str(out),
        **changes,
    )


def test_grpo_run_resumes_bit_identically(sft_run, tmp_path):
    sft_dir, _ = sft_run
    full = train_grpo(grpo_cfg(sft_dir, tmp_path / "full"))
    assert full.metrics.kl.iloc[0] == 0 and full.metrics.ratio.iloc[0] == 1  # π_θ = π_ref = π_old at step 0
    assert (tmp_path / "full" / "reference" / "model.safetensors").exists()
    part = grpo_cfg(sft_dir, tmp_path / "part", checkpoint_every=1)

    def stop(row, model):
        if row["step"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_grpo(part, on_step=stop)
    resumed = train_grpo(part, resume=True)
    drop = ["time_s", "rollout_s"]
    assert full.metrics.drop(columns=drop).equals(resumed.metrics.drop(columns=drop))
    for p, q in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(p, q)
    assert list(full.val.step) == [3] and full.val.n.iloc[0] == 2


def test_grpo_iterations_take_several_optimizer_steps_and_clip(sft_run, tmp_path):
    sft_dir, _ = sft_run
    r = train_grpo(grpo_cfg(sft_dir, tmp_path / "mu2", steps=2, grpo_iterations=2, lr=5e-3))
    assert r.metrics.ratio.iloc[-1] != 1.0  # the second update sees π_θ ≠ π_old
    from safetensors.torch import load_file

    opt = load_file(str(latest_checkpoint(tmp_path / "mu2") / "optimizer.safetensors"))
    assert {float(v) for k, v in opt.items() if k.endswith(".step")} == {4.0}  # 2 GRPO steps x μ = 2


def test_grpo_refuses_other_stages_and_train_refuses_grpo(sft_run):
    sft_dir, _ = sft_run
    with pytest.raises(ValueError, match="train_grpo runs stage='grpo'"):
        train_grpo(stage_config(sft_dir, [], out=""))
    with pytest.raises(ValueError, match="dsv3lab.train.grpo.train_grpo"):
        train(stage_config(sft_dir, ["stage=grpo"], out=""))
    with pytest.raises(ValueError, match="math_kinds: unknown kind"):
        TrainConfig(math_kinds="sqrt,calculus")


def test_cli_grpo_stage(sft_run, tmp_path, capsys):
    sft_dir, _ = sft_run
    args = ["train", "--from", str(sft_dir), "--stage", "grpo", "--steps", "1", "--out", str(tmp_path / "g"), "--quiet"]
    for kv in ("batch_size=2", "batch_size_start=0", "group_size=2", "max_new_tokens=4", "eval_problems=2"):
        args += ["--set", kv]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "reward" in out and "held-out problems (greedy): accuracy" in out
    assert json.loads((tmp_path / "g" / "run.json").read_text())["parent"]["step"] == 3


def test_math_accuracy_scores_every_problem(sft_run, tok):
    _, result = sft_run
    problems = [math_problem(3, i) for i in range(3)]
    acc = math_accuracy(result.model, tok, problems, max_new_tokens=4)
    assert list(acc.columns) == ["kind", "question", "answer", "completion", "correct", "format"] and len(acc) == 3
