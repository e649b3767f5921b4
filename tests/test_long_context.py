"""The toy needle in a haystack (data.needle), the retrieval mixture and the long-context measurements
(train.long_context): rows laid out as documented, losses per position and retrieval hits against a second
computation."""

import pytest
import torch
import torch.nn.functional as F

from dsv3lab import ModelConfig, build_model
from dsv3lab.data import default_tokenizer
from dsv3lab.data.needle import NEEDLE, NEEDLE_END, QUERY, NeedleFormat, needle_rows
from dsv3lab.model.transformer import IGNORE_INDEX
from dsv3lab.train import evaluate
from dsv3lab.train.long_context import NeedleMixture, loss_per_position, needle_grid, needle_hits
from helpers import SyntheticData

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


@pytest.fixture(scope="module")
def fmt(tok):
    return NeedleFormat.for_tokenizer(tok, key_digits=2, alphabet="QXZ")


def test_a_row_is_filler_needle_filler_query_answer(tok, fmt):
    filler = torch.arange(1000, 1100)
    key = torch.tensor([2, 0])  # "Z", "Q"
    row, answer = fmt.row(filler, 80, 0.5, key)
    n_fill = 80 - fmt.overhead
    at = round(0.5 * n_fill)
    z, q = tok.encode("Z")[0], tok.encode("Q")[0]
    expected = (
        filler[:at].tolist()
        + tok.encode(NEEDLE)
        + [z, q]
        + tok.encode(NEEDLE_END)
        + filler[at:n_fill].tolist()
        + tok.encode(QUERY)
        + [z, q]
    )
    assert row.tolist() == expected and answer == 78 and row[answer:].tolist() == [z, q]
    assert tok.decode(row[at : at + len(tok.encode(NEEDLE)) + 2].tolist()) == NEEDLE + "ZQ"
    first, _ = fmt.row(filler, 80, 0.0, key)
    last, _ = fmt.row(filler, 80, 1.0, key)
    assert first[: len(fmt.needle)].tolist() == fmt.needle  # depth 0: the needle opens the row
    assert last[n_fill : n_fill + len(fmt.needle)].tolist() == fmt.needle  # depth 1: after all the filler
    with pytest.raises(ValueError, match="shorter than the needle"):
        fmt.row(filler, 10, 0.5, key)
    with pytest.raises(ValueError, match="depth must be in"):
        fmt.row(filler, 80, 1.5, key)
    with pytest.raises(ValueError, match="each must be one token"):
        NeedleFormat.for_tokenizer(tok, alphabet="Q\U0001f600")  # an emoji is several byte-level tokens
    with pytest.raises(ValueError, match="alphabet must hold"):
        NeedleFormat.for_tokenizer(tok, alphabet="QQ")


def test_needle_rows_are_seeded(fmt):
    filler = torch.randint(10, 500, (6, 100), generator=torch.Generator().manual_seed(0))
    rows, start = needle_rows(fmt, filler, 60, 0.25, seed=3)
    again, _ = needle_rows(fmt, filler, 60, 0.25, seed=3)
    other, _ = needle_rows(fmt, filler, 60, 0.25, seed=4)
    assert rows.shape == (6, 60) and (start == 58).all() and torch.equal(rows, again) and not torch.equal(rows, other)


def test_the_mixture_alternates_text_and_answer_only_retrieval(tok):
    base = SyntheticData(vocab_size=8192, seq_len=64, seed=0)
    f = NeedleFormat.for_tokenizer(tok, key_digits=1, alphabet="QXZ")
    mix = NeedleMixture(base, f, retrieval_every=2, seed=1)
    x0, y0 = mix.batch(0, 4)
    b0 = base.batch(0, 4)
    assert torch.equal(x0, b0[0]) and torch.equal(y0, b0[1])  # step 0: plain text
    x1, y1 = mix.batch(1, 4)
    assert torch.equal(x1, mix.batch(1, 4)[0])  # a pure function of the step
    assert ((y1 != IGNORE_INDEX).sum(1) == 1).all()  # only the answer counts ...
    keys = [tok.decode([t]) for t in y1[:, -1].tolist()]
    assert set(keys) <= {"Q", "X", "Z"}
    for row, k in zip(x1, y1[:, -1]):  # ... and the key sits in the needle inside the row
        text = tok.decode(row.tolist())
        assert NEEDLE + tok.decode([int(k)]) + NEEDLE_END in text and text.endswith(QUERY)
    with pytest.raises(ValueError, match="retrieval_every"):
        NeedleMixture(base, f, retrieval_every=0)


def test_loss_per_position_by_hand_and_against_evaluate():
    model = build_model(ModelConfig.preset("tiny"), seed=0)
    rows = torch.randint(0, 512, (5, 33), generator=torch.Generator().manual_seed(0))
    lpp = loss_per_position(model, rows, batch_size=2)
    with torch.no_grad():
        model.eval()
        by_hand = torch.stack([F.cross_entropy(model(r[None, :-1])[0][0], r[1:], reduction="none") for r in rows]).mean(
            0
        )
    torch.testing.assert_close(lpp, by_hand.double(), rtol=1e-5, atol=1e-5)
    val_rows, _ = evaluate(model, {"x": rows}, batch_size=5)
    assert val_rows[0]["loss"] == pytest.approx(float(lpp.mean()), rel=1e-5)
    model.train()
    loss_per_position(model, rows)
    assert model.training
    with pytest.raises(ValueError, match="max_seq_len=256"):
        loss_per_position(model, torch.zeros(1, 300, dtype=torch.long))


def test_needle_hits_against_a_loop_and_a_row_the_model_gets_right():
    model = build_model(ModelConfig.preset("tiny"), seed=0).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger weights: varied greedy choices
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, 512, (6, 20), generator=g)
    start = torch.tensor([17, 18, 19, 17, 18, 19])
    # make rows 0-2 right: their answers become the model's own greedy, teacher-forced tokens
    with torch.no_grad():
        for i in range(3):
            for pos in range(int(start[i]), 20):
                rows[i, pos] = model(rows[i : i + 1, :pos])[0][0, -1].argmax()
    hits = needle_hits(model, rows, start, batch_size=4)
    with torch.no_grad():
        preds = model(rows[:, :-1])[0].argmax(-1)  # [n, L-1]
    loop = torch.tensor([all(preds[i, p - 1] == rows[i, p] for p in range(int(start[i]), 20)) for i in range(6)])
    assert torch.equal(hits, loop) and hits[:3].all() and not hits[3:].all()


def test_needle_grid_has_every_cell(tok):
    f = NeedleFormat.for_tokenizer(tok, key_digits=1, alphabet="QXZ")
    model = build_model(ModelConfig.preset("tiny", vocab_size=8192), seed=0)
    filler = torch.randint(10, 8000, (3, 120), generator=torch.Generator().manual_seed(0))
    grid = needle_grid(model, f, filler, [40, 64], [0.0, 0.5, 1.0])
    assert list(grid.columns) == ["length", "depth", "accuracy", "n"] and len(grid) == 6 and (grid.n == 3).all()
    assert grid.accuracy.between(0, 1).all()
