"""Inference of an official-layout checkpoint across processes (dsv3lab.infer.tensor_parallel): heads split by tensor
parallelism, routed experts by expert parallelism, each rank reading only its own slices.

* 2 and 4 real gloo processes (``dsv3lab.parallel.spawn``) load tiny checkpoints written by ``save_pretrained`` —
  FP32, BF16 in the rotate-half RoPE layout, FP8 (128×128 blocks, so every split falls inside a block and the scales
  are shared; dequantised) and FP8 kept in E4M3 (8×8 blocks) — and generate greedily: the tokens equal single-process
  generation (greedy batched, MTP speculative, and seeded sampling) and the logits agree to fp32 summation order (the
  all-reduces add partial sums in another order: ``rtol=1e-5, atol=1e-5``; measured ≤ 2.1e-6 on logits of max
  |3.1|).
* What each rank reads, counted through a wrapper around ``safe_open`` (loading a rank needs no process group, so
  this runs in the test process): only ``get_slice``, never ``get_tensor``; the bytes read equal the bytes of the
  rank's own weights; the ranks' slices tile every split tensor and their experts partition the experts.
* World sizes that do not divide heads/experts, and FP8 slices that cannot stay in FP8, are clear errors.
* ``torchrun --nproc-per-node 2 -m dsv3lab generate`` prints the single-process tokens.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import dsv3lab
from dsv3lab.infer import CheckpointError, from_pretrained, generate, save_pretrained
from dsv3lab.infer import tensor_parallel as tp
from dsv3lab.infer.blockfp8 import dequantize_blocks, quantize_blocks
from dsv3lab.infer.layout import layout
from dsv3lab.infer.tensor_parallel import ShardLoadStats, check_world, load_sharded, split_dim
from dsv3lab.parallel import spawn

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[5, 6, 7, 8, 9, 10], [3, 4, 11]]  # two lengths: prefill to the shorter, then one position per forward
NEW = 6
PROBE = [[5, 6, 7, 8, 9, 10, 12, 13]]  # one forward whose logits are compared
TOL = dict(rtol=1e-5, atol=1e-5)
SAMPLING = dict(temperature=0.9, top_p=0.9, seed=5)
# name -> (save_pretrained kwargs, load kwargs)
CASES = {
    "fp32": (dict(), dict()),
    "bf16_rotate_half": (dict(dtype=torch.bfloat16, rope_interleave=False), dict()),
    "fp8": (dict(fp8=True), dict()),
    "fp8_kept": (dict(fp8=True, block=(8, 8)), dict(keep_fp8=True)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    # weights of std 0.1 (not the paper's 0.006): every projection and expert then moves the logits (a 0.1 % change
    # of any one of them moves them by > 5e-4, far above the tolerance), so a wrong slice or a missing sum shows
    model = dsv3lab.build_model(dsv3lab.ModelConfig.preset("tiny", init_std=0.1), seed=0)
    with torch.no_grad():  # a non-zero selection bias, so that routing depends on it
        for moe in model.moe_layers():
            moe.gate.bias.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    root = tmp_path_factory.mktemp("tp")
    return {name: save_pretrained(model, root / name, **save) for name, (save, _) in CASES.items()}


def _run(model):
    ids = generate(model, PROMPTS, max_new_tokens=NEW).ids
    with torch.no_grad():
        logits = model(torch.tensor(PROBE))[0]
    return ids, logits


def _rank(rank, world, paths):
    out = {}
    for name, path in paths.items():
        model = load_sharded(path, dtype=torch.float32, **CASES[name][1])
        ids, logits = _run(model)
        out[name] = (ids, logits.numpy(), model.layers[0].attn.cfg.n_heads)
    out["mtp"] = generate(model, PROMPTS[0], max_new_tokens=NEW, speculative="mtp").ids  # MTP blocks are split too
    out["sampled"] = generate(model, PROMPTS, max_new_tokens=NEW, **SAMPLING).ids  # same seed, same draws everywhere
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_generation_across_processes_equals_one_process(checkpoints, world):
    paths = {name: str(p) for name, p in checkpoints.items()}
    results = spawn(_rank, world, paths)
    for name, path in paths.items():
        ref_ids, ref_logits = _run(from_pretrained(path, dtype=torch.float32, **CASES[name][1]))
        assert len(ref_ids[0]) == NEW
        for rank, res in enumerate(results):
            ids, logits, heads = res[name]
            assert ids == ref_ids, (name, rank)
            torch.testing.assert_close(torch.from_numpy(logits), ref_logits, **TOL)
            assert heads == 4 // world  # the rank attends with its own heads only
    last = from_pretrained(path, dtype=torch.float32, **CASES[name][1])
    assert all(res["mtp"] == generate(last, PROMPTS[0], max_new_tokens=NEW, speculative="mtp").ids for res in results)
    assert all(res["sampled"] == generate(last, PROMPTS, max_new_tokens=NEW, **SAMPLING).ids for res in results)


# ---------------------------------------------------------------------- what each rank reads
class _CountingFile:
    """``safe_open`` whose reads are counted: elements returned by ``get_slice(name)[...]`` and any ``get_tensor``."""

    def __init__(self, log, *args, **kwargs):
        self.f, self.log = safe_open(*args, **kwargs), log

    def __enter__(self):
        self.f.__enter__()
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_tensor(self, name):
        self.log["get_tensor"].append(name)
        return self.f.get_tensor(name)

    def get_slice(self, name):
        sl, log = self.f.get_slice(name), self.log

        class Counted:
            def __getitem__(self, idx):
                t = sl[idx]
                log["bytes"] += t.numel() * t.element_size()
                log["shape"][name] = tuple(t.shape)
                return t

            def __getattr__(self, attr):
                return getattr(sl, attr)

        return Counted()


def _load_counted(monkeypatch, path, rank, world, **kwargs):
    log = {"bytes": 0, "get_tensor": [], "shape": {}}
    with monkeypatch.context() as m:
        m.setattr(tp, "safe_open", lambda *a, **k: _CountingFile(log, *a, **k))
        stats = ShardLoadStats()
        model = load_sharded(path, rank, world, dtype=torch.float32, stats=stats, **kwargs)
    return model, log, stats


@pytest.mark.parametrize("name", ["fp32", "fp8_kept", "fp8"])
@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_reads_only_its_own_slices(checkpoints, monkeypatch, name, world):
    path = checkpoints[name]
    full = from_pretrained(path, dtype=torch.float32, **CASES[name][1])
    full_bytes = sum(t.numel() * t.element_size() for t in full.state_dict().values())
    cfg = full.cfg
    expected = layout(cfg)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in dsv3lab.DeepSeekV3(cfg).state_dict().items()}  # the whole tensors
    split = [n for n, s in expected.items() if split_dim(s.name) is not None]
    cover = {n: [] for n in split}
    experts = []
    for rank in range(world):
        model, log, stats = _load_counted(monkeypatch, path, rank, world, **CASES[name][1])
        assert log["get_tensor"] == []  # no whole tensor through this loader (the MTP copies are compared elsewhere)
        own = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        if name != "fp8":  # file bytes = model bytes (fp32 → fp32; E4M3 and fp32 scales kept as they are)
            assert log["bytes"] == stats.bytes_read == own < full_bytes
        else:  # E4M3 read, fp32 held: a quarter of the split weights' bytes
            assert log["bytes"] == stats.bytes_read < own < full_bytes
        for n in split:
            dim, start, stop = stats.slices[n]
            assert log["shape"][n][dim] == stop - start == shapes[expected[n].name][dim] // world
            cover[n].append((start, stop))
        experts.append(sorted(stats.experts))
        assert model.layers[0].attn.wkv_b.weight.shape[0] == full.layers[0].attn.wkv_b.weight.shape[0] // world
        assert model.layers[1].ffn.experts.n_experts == cfg.n_routed_experts // world
    for n, ranges in cover.items():  # the ranks' slices tile the tensor, in rank order
        size = shapes[expected[n].name][split_dim(expected[n].name)]
        assert ranges == [(r * size // world, (r + 1) * size // world) for r in range(world)], n
    assert sum(experts, []) == list(range(cfg.n_routed_experts))
    assert all(len(e) == cfg.n_routed_experts // world for e in experts)


def test_one_rank_needs_no_process_group_and_equals_from_pretrained(checkpoints):
    one = load_sharded(checkpoints["fp8_kept"], 0, 1, dtype=torch.float32, keep_fp8=True)
    ref = from_pretrained(checkpoints["fp8_kept"], dtype=torch.float32, keep_fp8=True)
    ids, logits = _run(one)
    ref_ids, ref_logits = _run(ref)
    assert ids == ref_ids
    torch.testing.assert_close(logits, ref_logits, **TOL)


@pytest.mark.parametrize("dim, start, stop", [(0, 0, 50), (0, 37, 90), (1, 20, 70), (1, 64, 100), (None, 0, 0)])
def test_a_dequantised_slice_is_the_slice_of_the_dequantised_weight(dim, start, stop):
    w = torch.randn(90, 100) * torch.logspace(-3, 1, 100)  # columns of very different ranges: the scales matter
    block = (16, 32)
    q, scale = quantize_blocks(w, block)
    whole = dequantize_blocks(q, scale, block, dtype=torch.float32)
    s0, s1 = tp._scale_range(dim, start, stop, block)
    if dim is None:
        part, want = tp._dequantize_slice(q, scale, block, None, 0), whole
    elif dim == 0:
        part, want = tp._dequantize_slice(q[start:stop], scale[s0:s1], block, 0, start), whole[start:stop]
    else:
        part, want = tp._dequantize_slice(q[:, start:stop], scale[:, s0:s1], block, 1, start), whole[:, start:stop]
    assert torch.equal(part, want)


# ---------------------------------------------------------------------- bad input
def test_world_sizes_that_do_not_divide_are_errors(checkpoints, tiny_cfg):
    with pytest.raises(ValueError, match=r"n_heads=4.*not divisible by 3.*allowed world sizes: 1, 2, 4"):
        load_sharded(checkpoints["fp32"], 0, 3)
    with pytest.raises(ValueError, match=r"n_routed_experts=6 not divisible by 4.*allowed world sizes: 1, 2"):
        check_world(tiny_cfg.replace(n_routed_experts=6, n_expert_groups=3, n_limited_groups=2), 4)
    with pytest.raises(ValueError, match="rank must be in"):
        load_sharded(checkpoints["fp32"], 2, 2)
    with pytest.raises(ValueError, match="initialised torch.distributed process group"):
        load_sharded(checkpoints["fp32"])  # no rank, no process group


def test_fp8_slices_off_the_scale_blocks_cannot_stay_fp8(checkpoints):
    # 128×128 blocks: a rank's 48 of wq_b's 96 rows share their block with the other rank's
    with pytest.raises(CheckpointError, match=r"do not start and end on the \(128, 128\) scale blocks.*keep_fp8=False"):
        load_sharded(checkpoints["fp8"], 1, 2, keep_fp8=True)


def test_torchrun_generate_prints_the_single_process_tokens(checkpoints):
    path = checkpoints["fp8"]
    ref = generate(from_pretrained(path, dtype=torch.float32), PROMPTS[0], max_new_tokens=NEW).ids[0]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dsv3lab"]
    cmd += ["generate", "--checkpoint", str(path), "--ids", ",".join(map(str, PROMPTS[0])), "--dtype", "float32"]
    cmd += ["--max-new-tokens", str(NEW), "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["ids"] == ref  # rank 0 alone prints: the output is one JSON object


def test_671b_fp8_on_8_ranks_fits_141_gb_and_bf16_does_not():
    cfg = dsv3lab.ModelConfig.preset("671B", n_mtp=1)
    world, gpu = 8, 141e9  # 8 × H200
    fp8 = tp.rank_weight_bytes(cfg, world, keep_fp8=True)
    bf16 = tp.rank_weight_bytes(cfg, world)
    # by hand, from the whole model on meta: split tensors and routed experts / 8, everything else replicated
    with torch.device("meta"):
        whole = dsv3lab.DeepSeekV3(cfg).to(torch.bfloat16)
    split = replicated = 0
    for name, t in whole.state_dict().items():
        n = t.numel() * t.element_size()
        *e, r, c = t.shape if t.dim() >= 2 else (1, 1)
        fp8_n = t.numel() + 4 * math.prod(e) * -(-r // 128) * -(-c // 128)  # E4M3 + an fp32 scale per 128×128 block
        is_proj = split_dim(name) is not None or ".experts.w" in name
        kept = fp8_n if (is_proj or name.endswith(("wq_a.weight", "wkv_a.weight"))) else n
        if is_proj:
            split += kept
        else:
            replicated += kept
    assert fp8 == split // world + replicated
    print(f"671B weights per rank over 8 ranks: {fp8 / 1e9:.1f} GB kept in FP8, {bf16 / 1e9:.1f} GB in BF16")
    assert fp8 < 0.7 * gpu < gpu < bf16  # FP8 leaves > 40 GB per H200 for the cache and activations; BF16 does not fit
