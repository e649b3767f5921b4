#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (CI has none): dsv3lab installed into the machine's own CUDA PyTorch
# (which must stay as it is), the Triton FP8 kernels and the FP8 paths against their torch references on the GPU,
# the FP8 GEMM benchmark, a bf16 training step of dsv3lab vs transformers, the planner's memory against
# torch.cuda.max_memory_allocated, the `small` preset trained for a few hundred steps in BF16 and with FP8 (tokens/s,
# MFU, peak memory vs the planner), and generation from the checkpoint of that run.
#
#   bash benchmarks/gpu_check.sh                 # writes gpu_out/ (or $OUT/ when set)
#
# Runs with the machine's own python3 (PyTorch >= 2.10 with CUDA, Triton). The `install` step does what the README's
# "On a GPU cluster" section says: `pip install --no-build-isolation -e .` into that environment, then checks that
# torch was kept (same version before and after); every later step also finds dsv3lab through PYTHONPATH, so they
# run even where the install could not (no network for a missing dependency). Each step has its own time limit and
# the script goes on after a failure, so one run gives every number it can; the summary at the end lists each step's
# exit status. About 10 minutes on an H200.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=()

step() {  # step NAME SECONDS COMMAND...: time limit; stdout to $out/NAME.out, stderr to $out/NAME.err; exit status
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  timeout "$limit" "$@" >"$out/$name.out" 2>"$out/$name.err"
  local rc=$?
  tail -n 4 "$out/$name.out" "$out/$name.err"
  status+=("$name: exit $rc")
}

torch_version() { "$py" -c 'import torch; print(torch.__version__)' 2>/dev/null; }

step machine 30 bash -c "nvidia-smi; $py -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'"
torch_before=$(torch_version)
step install 300 "$py" -m pip install --no-build-isolation -e .
torch_after=$(torch_version)
step torch_kept 5 test "$torch_before" = "$torch_after"  # exit 0: the install left the CUDA torch alone
echo "torch before install: $torch_before, after: $torch_after" | tee -a "$out/torch_kept.out"
step pytest_gpu 300 "$py" -m pytest -q -p no:cacheprovider tests/test_fp8_kernels.py tests/test_fp8_linear.py tests/test_moe.py tests/test_infer_fp8weights.py
step fp8_gemm 240 "$py" benchmarks/fp8_gemm.py --reps 30  # JSON in fp8_gemm.out
step train_step_cuda 180 "$py" benchmarks/train_step.py --device cuda --dtype bfloat16 --preset toy --batch 16 --repeats 10  # JSON
# the planner against torch.cuda.max_memory_allocated, one step (JSON: measured and planned, item by item)
step plan_memory_bf16 120 "$py" benchmarks/plan_memory.py --device cuda --preset small --batch 8 --seq-len 512 --dtype bf16
step plan_memory_fp8 120 "$py" benchmarks/plan_memory.py --device cuda --preset small --batch 8 --seq-len 512 --fp8 --adam-moments bf16
# a few hundred steps of the small preset: tokens/s, MFU against the GPU's peak, peak memory against the planner
step train_small_bf16 600 "$py" benchmarks/gpu_train.py --preset small --steps 300 --batch 16 --seq-len 512 --out "$out/run-small-bf16"
step train_small_fp8 600 "$py" benchmarks/gpu_train.py --preset small --steps 300 --batch 16 --seq-len 512 --fp8 --out "$out/run-small-fp8"
# serve the BF16 run: official layout, then cached generation and MTP speculative decoding on the GPU
step convert_small 120 "$py" -m dsv3lab convert "$out/run-small-bf16" "$out/ckpt-small" --overwrite
step generate_small 120 "$py" -m dsv3lab generate --checkpoint "$out/ckpt-small" --prompt "def fib(n):" --max-new-tokens 64 --device cuda --json
step generate_small_mtp 120 "$py" -m dsv3lab generate --checkpoint "$out/ckpt-small" --prompt "def fib(n):" --max-new-tokens 64 --device cuda --speculative mtp --json

echo "== summary"
printf '%s\n' "${status[@]}" | tee "$out/summary.txt"
