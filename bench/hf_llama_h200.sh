#!/usr/bin/env bash
# autotune's plan for a Llama-style HF model against a hand-tuned loop, on one H200 (issue 12).
#
#   OUT=/some/folder [BUDGET=240] bash bench/hf_llama_h200.sh          (repo root)
#   OUT=/tmp/x DEVICE=cpu bash bench/hf_llama_h200.sh --tiny           (CPU check: tiny config, BUDGET 40)
#   OUT=/some/folder PLAN=bench/results/hf-llama-125m-h200/llama.plan.json bash bench/hf_llama_h200.sh
#                                                                       (steps 2-3 only, for that plan)
#
# The model is bench/configs/llama-125m.json: hidden 768, 12 layers, 12 heads sharing 4 kv
# heads (GQA), SwiGLU 2048, RoPE, vocab 32000 (untied head), seq 1024: 124,668,672 parameters
# (75,516,672 without the embedding and the head: 12 x 6,292,992 + the final norm's 768).
#
# 1. `autotune plan` (time budget $BUDGET, cold compile cache, a measured profile) -> llama.plan.json
# 2. bench/hand_loop.py at micro-batches 8, 16, 32, 64 of the plan's global batch ($GLOBAL_BATCH,
#    fixed for both) -> hand_sweep.jsonl
# 3. the plan (python3 -m autotune.runtime.measure, fresh process) and the best hand loop (fresh process),
#    interleaved A B A B, 3 rounds, both --warmup $WARMUP --steps $STEPS -> ab.jsonl; the ratio of
#    medians plan / hand and the spreads -> summary.jsonl
# Everything under $OUT, the console in $OUT/bench.log. Every command runs under what is left of
# $LIMIT (540 s) so the whole script ends in time for the device's 600 s per command.
set -uo pipefail
: "${OUT:?set OUT to the folder for the results}"
cd "$(dirname "$0")/.."
config=bench/configs/llama-125m.json budget=${BUDGET:-240} micro_batches=${MICRO_BATCHES:-8,16,32,64}
if [[ "${1:-}" == "--tiny" ]]; then
    config=bench/configs/llama-tiny.json budget=${BUDGET:-40} micro_batches=${MICRO_BATCHES:-4,8}
fi
device=${DEVICE:-cuda} global_batch=${GLOBAL_BATCH:-64} warmup=${WARMUP:-5} steps=${STEPS:-20} limit=${LIMIT:-540}
ab_reserve=${AB_RESERVE:-180}  # step 3: 6 fresh processes of about 30 s each on the H200 (compile cache warm)
[[ "${1:-}" == "--tiny" ]] && global_batch=${GLOBAL_BATCH:-8}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 COLUMNS=200
# Mandatory on the shared GPU machine: never let NCCL or PyTorch use NVLink multicast.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
rm -rf "$OUT/cache"
export AUTOTUNE_CACHE="$OUT/cache"  # cold: the study pays every compilation and builds the corpus
export TORCHINDUCTOR_CACHE_DIR="$OUT/cache/inductor"  # the trials' cache (autotune.runtime.trial.compile_cache_env), shared by the hand loop
exec > >(tee "$OUT/bench.log") 2>&1
start=$(date +%s)
left() { echo $(( limit - ($(date +%s) - start) )); }
say() { echo "== $* ($(( $(date +%s) - start )) s)"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python3 -c 'import platform, torch, transformers, optuna; print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__, "optuna", optuna.__version__)'
echo "config $config, time budget $budget s, global batch $global_batch, micro-batches $micro_batches, device $device, limit $limit s"

# 1. The plan (PLAN=FILE: a plan an earlier `autotune plan` wrote, measured again here instead).
if [[ -n "${PLAN:-}" ]]; then
    cp "$PLAN" "$OUT/llama.plan.json" || exit 1
    say "the plan: $PLAN (made by an earlier autotune plan; measured below in this run)"
else
    if [[ "$device" == cpu ]]; then quick=--quick; else quick=; fi  # a CPU plan needs no measured rates
    timeout "$(left)" python3 -m autotune profile $quick --out "$OUT/profile.json" >/dev/null || { say "autotune profile failed"; exit 1; }
    say "profile"
    timeout "$(left)" python3 -m autotune plan --workload hf:llama --workload-config "$config" --time-budget "$budget" \
        --global-batch "$global_batch" --device "$device" --trial-timeout 90 --warmup-steps "$warmup" --trial-steps "$steps" \
        --profile "$OUT/profile.json" --storage "sqlite:///$OUT/studies.db" --out "$OUT/llama.plan.json"
    rc=$?
    say "autotune plan: exit $rc (time budget $budget s)"
    [[ $rc == 0 ]] || exit "$rc"
fi
python3 -m autotune show "$OUT/llama.plan.json" | head -30

# 2. The hand loop's micro-batch sweep, at the plan's global batch.
# Largest micro-batch first; no further size starts once only $AB_RESERVE s are left for step 3.
timeout "$(left)" python3 bench/hand_loop.py run "$OUT/llama.plan.json" --micro-batches "$micro_batches" \
    --warmup "$warmup" --steps "$steps" --device "$device" --out "$OUT/hand_sweep.jsonl" --until $(( start + limit - ab_reserve ))
say "hand loop sweep: exit $?"
best=$(python3 bench/hand_loop.py best "$OUT/hand_sweep.jsonl") || exit 1
say "best hand micro-batch $best"

# 3. A B A B: the plan through autotune.runtime.measure, the hand loop at its best micro-batch, each a fresh process.
for round in 1 2 3; do
    (( $(left) > 5 )) || { say "out of time before round $round"; break; }
    timeout "$(left)" python3 -m autotune.runtime.measure "$OUT/llama.plan.json" "$OUT/plan_trial_$round.json" --warmup "$warmup" --steps "$steps"
    python3 - "$OUT/plan_trial_$round.json" "$round" >>"$OUT/ab.jsonl" <<'EOF'
import json, sys
path, rnd = sys.argv[1], int(sys.argv[2])
try:
    result = json.load(open(path))
except (OSError, ValueError) as e:
    result = {"figures": {"status": "crash"}, "error": f"no result: {e}"}
f = result["figures"]
print(json.dumps({"loop": "plan", "round": rnd, "status": f["status"], "tokens_per_s": f.get("tokens_per_s"), "step_time_s": f.get("step_time_s"),
                  "loss_end": f.get("loss_end"), "peak_memory_bytes": f.get("peak_memory_bytes"), "error": result.get("error")}))
EOF
    say "round $round plan: $(tail -1 "$OUT/ab.jsonl")"
    (( $(left) > 5 )) || { say "out of time in round $round"; break; }
    timeout "$(left)" python3 bench/hand_loop.py run "$OUT/llama.plan.json" --micro-batches "$best" --warmup "$warmup" --steps "$steps" \
        --device "$device" --label "round $round" --out "$OUT/ab.jsonl" >/dev/null
    rc=$?
    # A hand run killed by the time limit appends nothing: say so, not the plan's line again.
    if tail -1 "$OUT/ab.jsonl" | grep -q '"loop": "plan"'; then say "round $round hand: no result (exit $rc)"; break; fi
    say "round $round hand: $(tail -1 "$OUT/ab.jsonl" | cut -c1-200)"
done
python3 bench/hand_loop.py compare "$OUT/ab.jsonl" --out "$OUT/summary.jsonl"
rc=$?
rm -rf "$OUT/cache"
say "done: exit $rc"
exit $rc
