#!/usr/bin/env bash
# The Triton matmuls of the fused loss (kernels/head_matmuls.py) on one GPU: first correct, then
# fast. Made in the session of 2026-12-07 (second), whose device machines never started; run it
# in the next one, in the background, polled by short commands that copy RESULTS back:
#
#   setsid nohup bash bench/fused_loss_triton.sh /root/ft >/root/ft/session.log 2>&1 </dev/null &
#
# 1. tests/test_kernels.py on the GPU (no interpreter): every kernel against its reference,
#    forward and gradients, the Triton matmuls included (about a minute).
# 2. bench/fused_loss.py at issue 28's three shapes: compile, ours with cuBLAS (autotune), ours
#    with the Triton matmuls (autotune-triton) and the race of the two (autotune-auto), each in
#    a process of its own (about 4 minutes).
# 3. bench/fused_gemm_probe.py: where the time goes, matmul by matmul (about 3 minutes).
#
# If autotune-triton is >= 1.10x compile at 151,936 and 128,256: make matmuls="auto" the
# strategy's default (kernels/fused_linear_cross_entropy.py, linear_cross_entropy), then plan
# gpt-vocab152k with and without kernels (bench/session_dec07.sh PARTS=plans).
set -uo pipefail
cd "$(dirname "$0")/.."
R=${1:?results folder}
mkdir -p "$R"
export PYTHONUNBUFFERED=1 COLUMNS=200
start=$(date +%s)
say() { echo "== $(date -u +%H:%M:%S) +$(( $(date +%s) - start )) s: $*"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import platform, torch, triton; print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)'
git log -1 --format='commit %H' 2>/dev/null || true

say "kernel tests on the GPU"
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py >"$R/test_kernels.log" 2>&1
echo "rc $?" >>"$R/test_kernels.log"
say "fused_loss"
python3 bench/fused_loss.py all --impls compile,autotune,autotune-triton,autotune-auto --out "$R/fused_loss.jsonl"
say "chunk sweep (memory: the issue's 30% of compile's)"
python3 bench/fused_loss.py all --shapes 16384x1024x151936,16384x2048x128256 --impls autotune@4096x8x256,autotune@4096x8x512,autotune-triton@4096x8x256,autotune-triton@4096x8x512 --out "$R/fused_loss_chunks.jsonl"
say "fused_gemm_probe"
python3 bench/fused_gemm_probe.py --out "$R/fused_gemm_probe.jsonl"
say done
touch "$R/DONE"
