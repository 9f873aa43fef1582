#!/usr/bin/env bash
# Issue 28, item 4: attention backend fa4 (FlashAttention-4) against cuDNN's SDPA on one GPU.
# First bench/fa4_check.py (errors against an fp32 reference, eager and compiled), then the planner's
# best plan at phase8-small (micro-batch 96 x 2) and phase8-long (12 x 2) as real trials through
# bench/trial_ab.py, the variants interleaved, 3 rounds: the same settings with backend cudnn and fa4
# (flash SDPA measured 0.95x cuDNN's at phase8-small on an H200: results/ab/attention_ab_h200.jsonl).
#
#   R=bench/results/fa4-h100 bash bench/fa4_gpu.sh
#
# Needs the package (pip install --no-deps -e .) and flash-attn-4 with its CuTe DSL (extra fa4).
set -uo pipefail
R=${R:?results folder}
ROUNDS=${ROUNDS:-3}
cd "$(dirname "$0")/.."
mkdir -p "$R"
export PYTHONUNBUFFERED=1
start=$(date +%s)
say() { echo "== $(date -u +%H:%M:%S) +$(( $(date +%s) - start )) s: $*"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import platform, torch, triton; print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)'
python3 -c 'from importlib.metadata import version as v; print(*(f"{p} {v(p)}" for p in ("flash-attn-4", "nvidia-cutlass-dsl-libs-base", "nvidia-cutlass-dsl-libs-cu13", "quack-kernels", "apache-tvm-ffi")))' || true
python3 bench/fa4_check.py --out "$R/check.jsonl" || { say "check failed"; exit 1; }
say "check"
python3 bench/trial_ab.py bench/results/ab/phase8-small-mb96.plan.json --rounds "$ROUNDS" --steps 10 --timeout 240 \
  --variant cudnn=attention.backend=cudnn --variant fa4=attention.backend=fa4 \
  --out "$R/phase8-small.jsonl"
say "phase8-small"
python3 bench/trial_ab.py bench/results/approx/phase8-long.plan.json --rounds "$ROUNDS" --steps 8 --timeout 240 \
  --variant cudnn=attention.backend=cudnn --variant fa4=attention.backend=fa4 \
  --out "$R/phase8-long.jsonl"
say "phase8-long"
