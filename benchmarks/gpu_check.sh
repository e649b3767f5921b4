#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (CI has none): the Triton FP8 kernels and the FP8 paths against their
# torch references on the GPU, the FP8 GEMM benchmark, and a bf16 training step of dsv3lab vs transformers on CUDA.
#
#   bash benchmarks/gpu_check.sh                 # writes gpu_out/ (or $OUT/ when set)
#
# Runs with the machine's own python3 (PyTorch with CUDA, Triton; dsv3lab is imported from this checkout through
# PYTHONPATH, nothing is installed). Each step has its own time limit and the script goes on after a failure, so one
# run gives every number it can; the summary at the end lists each step's exit status. About 5 minutes on an H200.
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

step machine 30 bash -c "nvidia-smi; $py -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'"
step pytest_gpu 300 "$py" -m pytest -q -p no:cacheprovider tests/test_fp8_kernels.py tests/test_fp8_linear.py tests/test_moe.py tests/test_infer_fp8weights.py
step fp8_gemm 240 "$py" benchmarks/fp8_gemm.py --reps 30  # JSON in fp8_gemm.out
step train_step_cuda 180 "$py" benchmarks/train_step.py --device cuda --dtype bfloat16 --preset toy --batch 16 --repeats 10  # JSON

echo "== summary"
printf '%s\n' "${status[@]}" | tee "$out/summary.txt"
