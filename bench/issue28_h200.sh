#!/usr/bin/env bash
# Issue 28's GPU session: the fused losses against compile at the issue's shapes (bench/fused_loss.py,
# a process per shape and implementation), our kernel's launch sweep at the large vocabularies, then
# the kernels' and the triton_kernels strategy's tests on CUDA. Meant to run in the background:
#
#   setsid nohup bash bench/issue28_h200.sh /root/k28 >/root/k28/session.log 2>&1 </dev/null &
#
# Wheels (optuna and its needs, torchao, liger-kernel, cut-cross-entropy) in /tmp/site on
# PYTHONPATH; the package installed with `python3 -m pip install --no-deps --no-build-isolation -e .`.
set -uo pipefail
R=${1:?results folder}
cd "$(dirname "$0")/.."
mkdir -p "$R"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
start=$(date +%s)
say() { echo "== $(date -u +%H:%M:%S) +$(( $(date +%s) - start )) s: $*"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import platform, torch, triton, liger_kernel, cut_cross_entropy, transformers; print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
pip show liger-kernel cut-cross-entropy 2>/dev/null | grep -E "^(Name|Version)"
git log -1 --format='commit %H' 2>/dev/null || true
python3 bench/fused_loss.py all --out "$R/fused_loss.jsonl"
say "fused losses"
python3 bench/fused_loss.py all --out "$R/sweep.jsonl" --shapes 16384x1024x151936,16384x2048x128256 \
    --impls autotune@8192x16x1024,autotune@2048x4x1024,autotune@4096x8x2048,autotune@4096x16x512
say "sweep"
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py "tests/test_strategies.py::TestTritonKernels" > "$R/tests.log" 2>&1
say "tests exit $?"
tail -5 "$R/tests.log"
touch "$R/DONE"
