#!/usr/bin/env bash
# INT8 training (torchao int8 mixed precision, module swap) on one H200 (issue 13): proof that
# it runs int8 matmuls (bench/int8_trace.py: aten::_int_mm calls and int8 kernels in a profiler
# trace), then interleaved A/B real trials against the same plan in bf16 (bench/trial_ab.py).
#   OUT=/tmp/out bash bench/int8_h200.sh          (repo root, GPU machine)
set -uo pipefail
OUT=${OUT:-bench/results/approx}
mkdir -p "$OUT"
R=bench/results/approx
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c 'import torch, torchao; print("torch", torch.__version__, "torchao", torchao.__version__)'
timeout 90 python3 bench/int8_trace.py $R/phase8-small.plan.json --out "$OUT/int8_trace_phase8-small_h200.json"
# phase8-small: int8 forward and backward, int8 forward only, vs bf16 (the plan: compile on).
timeout 270 python3 bench/trial_ab.py $R/phase8-small.plan.json --rounds 3 --steps 10 --timeout 120 \
  --variant bf16= \
  --variant int8=int8.backward=true \
  --variant int8_fwd=int8.backward=false \
  --out "$OUT/int8_phase8-small_h200.jsonl"
# gpt-1b (d 2048), 8 x 4 samples a step, where the matmuls are large enough to pay if any.
timeout 200 python3 bench/trial_ab.py $R/gpt-1b.plan.json --rounds 3 --steps 6 --timeout 120 \
  --variant bf16= \
  --variant int8=int8.backward=true \
  --out "$OUT/int8_gpt-1b_h200.jsonl"
