#!/usr/bin/env bash
# Approximate strategies against the best exact configuration, same run, interleaved real
# trials (bench/trial_ab.py), on one GPU. Each variant trains on the same batches from the same
# seed, so loss_end is at equal steps. Usage (repo root, GPU machine):
#   OUT=/tmp/out bash bench/approx_h200.sh
set -euo pipefail
OUT=${OUT:-bench/results/approx}
mkdir -p "$OUT"
R=bench/results/approx
# sparse attention where it pays: seq 8192, window 1024 + 64 global tokens vs dense flash SDPA.
python3 bench/trial_ab.py $R/phase8-long.plan.json --rounds 3 --steps 8 --timeout 240 \
  --variant dense= \
  --variant sparse_w1024_g64=-attention,sparse_attention.window=1024,sparse_attention.global_tokens=64 \
  --out "$OUT/sparse_phase8-long_h200.jsonl"
# MoE at phase8-small: 8 experts top-2 in every 2nd block, capacity 1.25, vs the dense MLP.
python3 bench/trial_ab.py $R/phase8-small.plan.json --rounds 3 --steps 10 --timeout 240 \
  --variant dense= \
  --variant moe_e8_k2=moe.num_experts=8,moe.top_k=2,moe.capacity_factor=1.25,moe.every_n_layers=2 \
  --out "$OUT/moe_phase8-small_h200.jsonl"
# FP8 (torchao float8, tensorwise scales) in the blocks' linears at gpt-1b (d 2048), vs bf16; a
# throughput A/B at 8 x 4 samples a step (the recipe's 256 would take minutes a round).
python3 bench/trial_ab.py $R/gpt-1b.plan.json --rounds 3 --steps 8 --timeout 300 \
  --variant bf16= \
  --variant fp8_tensorwise=fp8.recipe=tensorwise \
  --out "$OUT/fp8_gpt-1b_h200.jsonl"
