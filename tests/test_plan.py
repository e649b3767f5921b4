"""The planner (dsv3lab/plan.py): hand computations, the paper's layouts and cost, the CLI's JSON, layouts that do not
fit, and the planned memory of a training step against what dsv3lab really allocates (CPU allocation trace)."""

import importlib.util
import json
import sys
from pathlib import Path

import matplotlib
import pytest

from dsv3lab import cli
from dsv3lab.accounting import param_counts
from dsv3lab.config import ModelConfig
from dsv3lab.plan import (
    GB,
    ITEMS,
    PAPER_TRAINING,
    Layout,
    in_flight_stage_activations,
    paper_checks,
    plan,
    plan_inference,
    plan_table,
    rank_stages,
    stage_contents,
)

matplotlib.use("Agg")
ROOT = Path(__file__).parent.parent
V3 = ModelConfig.preset("671B")


@pytest.fixture(scope="module")
def paper():
    return paper_checks()


# ---------------------------------------------------------------------- hand computations
def test_middle_rank_of_the_paper_layout_by_hand():
    """Rank 5 of PP16 DualPipe holds stages 5 and 10, four MoE layers each; numbers from the 671B shapes by hand."""
    result = plan(V3, PAPER_TRAINING, gpu_mem=80 * GB)
    rank = result["ranks"][5]
    assert rank["stages"] == [5, 10]
    # one MoE layer without its routed experts: MLA 187,107,328 + two norms 2*7168 + router 256*7168 + shared
    # expert 3*7168*2048; routed experts on this GPU: 256/64 = 4 of 3*7168*2048 each
    dense = 187_107_328 + 2 * 7168 + 256 * 7168 + 3 * 7168 * 2048
    experts = 4 * 3 * 7168 * 2048
    assert dense == 232_996_864 and experts == 176_160_768
    layers = 8  # two stages of four layers: DualPipe's second copy
    assert rank["parameters"] == layers * (dense + experts) * 2  # BF16
    assert rank["gradients"] == layers * (dense + experts) * 4  # FP32
    # ZeRO-1: master weights (4 B) and two BF16 moments (4 B) sharded over the replicas: DP = 128 for dense
    # weights, DP / EP = 2 for the routed experts
    assert rank["optimizer_master_weights"] == pytest.approx(layers * (dense / 128 + experts / 2) * 4)
    assert rank["optimizer_moments"] == pytest.approx(layers * (dense / 128 + experts / 2) * 4)
    # activations of one MoE layer per token (paper recipe, bytes):
    mla = 2 * 7168 + 2 * 1536 + 2 * 576 + 4 * 128 + 128 * 128 * (1.5 + 4 / 128) + 2 * 7168  # x, c_Q, c_KV, lse, o, x
    moe = 4 * (256 + 3 * 8 + 1) + 2 * 2048 * (1 + 4 / 128)  # router; shared SwiGLU input in FP8
    moe += 8 * (7168 + 2 * 2048) * (1 + 4 / 128) + 8 * 5 * 4  # 8 pairs: FP8 input and SwiGLU input; gate, indices
    assert mla + moe == pytest.approx(156_932)
    stage = 4 * (mla + moe) * 4096  # one micro-batch of 4096 tokens through a stage
    acts = rank["activations"] + rank["fp8_activation_caches"]
    assert acts == pytest.approx(17 * stage)  # PP + 1 = 17 stage-activations in flight
    assert rank["loss_working_set"] == 0 and rank["embedding_and_head"] == 0


def test_schedules_follow_table_2():
    assert [in_flight_stage_activations(4, "1f1b", r) for r in range(4)] == [4, 3, 2, 1]
    assert in_flight_stage_activations(16, "dualpipe", 3) == 17
    assert in_flight_stage_activations(4, "dualpipev", 0) == 9  # 2·PP + 1 half-size stages
    assert rank_stages(4, "dualpipe") == [[0, 3], [1, 2], [2, 1], [3, 0]]
    assert rank_stages(2, "dualpipev") == [[0, 3], [1, 2]]
    one = plan(V3, Layout(**dict(PAPER_TRAINING.__dict__, schedule="1f1b")), gpu_mem=80 * GB)["ranks"][5]
    two = plan(V3, PAPER_TRAINING, gpu_mem=80 * GB)["ranks"][5]
    assert two["parameters"] == 2 * one["parameters"]  # DualPipe: 2x parameters (stages 5 and 10 hold 4 layers)


def test_stages_hold_every_layer_once_embedding_first_head_last():
    for n in (1, 2, 16, 61):
        stages = stage_contents(V3, n)
        assert sorted(i for s in stages for i in s["layers"]) == list(range(61))
        assert stages[0]["embed"] and stages[-1]["head"] and stages[-1]["mtp"] == 1
        assert max(len(s["layers"]) for s in stages) - min(len(s["layers"]) for s in stages) <= 1
    with pytest.raises(ValueError, match="at most one stage per layer"):
        stage_contents(ModelConfig.preset("toy"), 8)


# ---------------------------------------------------------------------- the paper
def test_the_paper_training_layout_fits_an_80gb_h800(paper):
    result = plan(V3, PAPER_TRAINING, gpu_mem=80 * GB)  # --gpu-mem 80GB: 80e9 bytes, below the board's 80 GiB
    assert result["fits"] and result["per_gpu_bytes"]["total"] <= 80 * GB
    assert paper["training"]["fits"]
    memo = result["memo"]
    assert memo["recomputation_saves_bytes"] > 0 and memo["fp8_caching_saves_bytes"] > 0
    assert memo["dualpipe_second_copy_bytes"] > 0
    # without recomputation the same layout would not fit: the recipe matters
    assert result["per_gpu_bytes"]["total"] + memo["recomputation_saves_bytes"] > 80 * GB


def test_paper_cost_is_consistent_with_the_flops_at_one_mfu(paper):
    """C14: 180K H800 GPU-hours per 10^12 tokens imply an MFU; at that MFU the Table 1 budget is reproduced."""
    assert 0.3 < paper["implied_mfu_bf16"] < 0.5  # a plausible MFU of the BF16 peak (it is 2x the FP8 one)
    assert paper["implied_mfu_fp8"] == pytest.approx(paper["implied_mfu_bf16"] / 2)
    assert paper["pre_training_gpu_hours"] == pytest.approx(2664e3, rel=1e-9)  # 14.8 x 180K
    total = paper["total_gpu_hours_at_that_mfu"]
    assert total == pytest.approx(2788e3, rel=0.03)  # context extension at the same MFU is the only free part
    assert paper["days_per_trillion_on_2048"] == pytest.approx(3.7, abs=0.05)
    assert paper["cost_usd_at_2_per_hour"] == 5.576e6
    # the default plan reports the MFU it assumed and reproduces 180K GPU-hours per 10^12 tokens with it
    result = plan(V3, PAPER_TRAINING)
    assert result["mfu"] == pytest.approx(paper["implied_mfu_bf16"])
    assert result["gpu_hours_per_trillion_tokens"] == pytest.approx(180e3)


def test_paper_inference_layouts_fit(paper):
    prefill, decode = paper["prefill"], paper["decode"]
    assert prefill["fits"] and decode["fits"]
    assert prefill["layout"]["experts_per_gpu"] == 9  # 8 routed + 1 redundant (EP32, 32 redundant experts)
    assert decode["layout"]["experts_per_gpu"] == 1  # EP320: one expert per GPU
    # prefill: 58 MoE layers x 9 experts x 44,040,192 weights in FP8 (+ a scale per 128x128 block)
    assert prefill["per_gpu_bytes"]["routed_experts"] == pytest.approx(58 * 9 * 44_040_192 * (1 + 4 / 128**2))
    # the 671B FP8 checkpoint on 8 x 141 GB GPUs (tensor-parallel attention, experts split 8 ways) fits; on 8 x 80 GB
    # it does not
    assert plan_inference(V3, gpus=8, gpu_mem=141 * GB, tp=8, ep=8)["fits"]
    assert not plan_inference(V3, gpus=8, gpu_mem=80 * GB, tp=8, ep=8)["fits"]


# ---------------------------------------------------------------------- what does not fit, and why
def test_layouts_that_do_not_fit_are_explained():
    few = plan(V3, Layout(gpus=8, pp=1, ep=8, zero=1), gpu_mem=80 * GB)
    assert not few["fits"]
    assert any("weights, gradients and optimizer states alone exceed" in line for line in few["explanation"])
    lite = ModelConfig.preset("16B")  # full fine-tuning of DeepSeek-V2-Lite on one 80 GB GPU: a reported OOM
    one = plan(lite, Layout(gpus=1, pp=1, ep=1, zero=0, schedule="1f1b"), gpu_mem=80 * GB, rec="bf16")
    assert not one["fits"]
    counts = param_counts(lite)  # every weight but the embedding, head and final norm, in FP32
    layers = counts["total_params"] - counts["embedding"] - counts["head"] - lite.dim
    assert one["per_gpu_bytes"]["parameters"] == 4 * layers
    long = plan(V3, Layout(**dict(PAPER_TRAINING.__dict__, micro_batch=4)), gpu_mem=80 * GB)
    assert not long["fits"]
    assert any("in-flight micro-batches" in line for line in long["explanation"])


@pytest.mark.parametrize(
    "args, field",
    [
        (["--gpus", "100"], "gpus"),  # not a multiple of pp = 16
        (["--ep", "48"], "ep"),  # does not divide dp = 128
        (["--zero", "4"], "zero"),
        (["--schedule", "gpipe"], "schedule"),
        (["--recipe", "fp16"], "recipe"),
        (["--seq", "200000"], "seq"),
    ],
)
def test_bad_layouts_are_clear_errors(args, field, capsys):
    assert cli.main(["plan", "671B", *args]) == 2
    assert field in capsys.readouterr().err


def test_cli_json_keys(capsys):
    assert cli.main(["plan", "671B", "--gpus", "2048", "--gpu-mem", "80GB", "--pp", "16", "--ep", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["fits"], bool) and out["fits"]
    assert set(out["per_gpu_bytes"]) == {*ITEMS, "total"}
    assert out["per_gpu_bytes"]["total"] == pytest.approx(
        sum(v for k, v in out["per_gpu_bytes"].items() if k != "total")
    )
    for key in ("step_s", "mfu", "gpu_hours_per_trillion_tokens"):
        assert out[key] > 0
    assert cli.main(["plan", "671B", "--paper"]) == 0
    text = capsys.readouterr().out
    assert "fits" in text and "MFU" in text and "prefill" in text and "decode" in text
    assert cli.main(["plan", "671B", "--infer", "--gpus", "8", "--gpu", "H200", "--tp", "8", "--ep", "8"]) == 0
    assert "fits" in capsys.readouterr().out


# ---------------------------------------------------------------------- planned vs measured (CPU trace)
def _plan_memory():
    spec = importlib.util.spec_from_file_location("plan_memory", ROOT / "benchmarks" / "plan_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["plan_memory"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv, tol",
    [
        (["--preset", "toy", "--batch", "2", "--seq-len", "256"], 0.03),
        (
            ["--preset", "toy", "--batch", "4", "--seq-len", "128", "--moe-impl", "grouped", "--adam-moments", "bf16"],
            0.03,
        ),
        (["--preset", "toy", "--batch", "2", "--seq-len", "128", "--dtype", "bf16"], 0.06),
        (["--preset", "toy", "--batch", "2", "--seq-len", "128", "--fp8", "--adam-moments", "bf16"], 0.06),
    ],
)
def test_planned_memory_matches_the_cpu_allocation_trace(argv, tol, one_thread):
    pm = _plan_memory()
    report = pm.run(pm.build_parser().parse_args([*argv, "--device", "cpu"]))
    # weights, gradients and AdamW states are exact counts
    assert report["static_ratio_measured_over_planned"] == pytest.approx(1.0, abs=1e-3)
    # the peak of a forward + backward pass above them: activations, the loss working set, weight copies
    assert report["step_ratio_measured_over_planned"] == pytest.approx(1.0, abs=tol), report


# ---------------------------------------------------------------------- plots and widget
def test_memory_bars_and_widget():
    from dsv3lab.viz import plot_plan_memory
    from dsv3lab.viz.widgets import plan_explorer

    plans = {"paper": plan(V3, PAPER_TRAINING), "8 GPUs": plan(V3, Layout(gpus=8, pp=1, ep=8))}
    table = plan_table(plans)
    assert list(table["fits"]) == [True, False]
    fig = plot_plan_memory(table)
    stacked = [p for p in fig.axes[0].patches]
    heights = sum(p.get_height() for p in stacked if abs(p.get_x() + p.get_width() / 2) < 0.01)
    assert heights == pytest.approx(table["total_gb"][0], rel=1e-6)  # the bars add up to the total
    widget = plan_explorer()
    summary = widget.children[2]
    assert summary.value.startswith("<code>fits")
    widget.children[0].children[1].value = 1  # PP 16 -> 1 on 2048 GPUs: does not fit
    assert "does not fit" in summary.value
