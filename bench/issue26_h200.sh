#!/usr/bin/env bash
# Issue 26's H200 runs: `autotune plan --time-budget 420` from a cold start on three Hugging Face
# models autotune was never tuned on, each given as a config.json as published, then the
# hand-written loop (bench/hand_loop.py) on the plan's model and global batch in the same
# session; the cost model's errors and the budget's breakdown from each study. Meant to run in
# the background (its own process session), polled by short commands that copy RESULTS back:
#
#   setsid nohup bash bench/issue26_h200.sh /root/i26 qwen3 llama32 mistral >/root/i26/session.log 2>&1 </dev/null &
#
# Jobs (repo root; wheels in /tmp/site on PYTHONPATH, the package installed with
# `python3 -m pip install --no-deps --no-build-isolation -e .`):
#   qwen3    bench/configs/qwen3-0.33b.json  (Qwen3-0.6B's config.json, 12 layers), seq 1024, global batch 64
#   llama32  bench/configs/llama-3.2-1b.json (Llama-3.2-1B's config.json as published), seq 1024, global batch 64
#   mistral  bench/configs/mistral-gqa.json  (Mistral-7B-v0.1's fields, scaled down; GQA 16/4), seq 2048, global batch 32
#   gpt1b    autotune plan --workload gpt-1b --global-batch 8 --time-budget 300 (must write a bf16 plan, not the baseline)
set -uo pipefail
R=${1:?results folder}; shift
cd "$(dirname "$0")/.."
mkdir -p "$R"
export PYTHONUNBUFFERED=1 COLUMNS=200
# Mandatory on the shared GPU machine: never let NCCL or PyTorch use NVLink multicast.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
start=$(date +%s)
say() { echo "== $(date -u +%H:%M:%S) +$(( $(date +%s) - start )) s: $*"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import platform, torch, triton, optuna, transformers; print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__, "optuna", optuna.__version__, "transformers", transformers.__version__)'
git log -1 --format='commit %H' 2>/dev/null || true
python3 -c 'import autotune.strategies, autotune.kernels' || { say "autotune is not installed: pip install --no-deps --no-build-isolation -e ."; exit 2; }
# QUICK=1: detect only (no measured rates: the cost model's step time then uses the datasheet's).
python3 -m autotune profile ${QUICK:+--quick} --out "$R/profile.json" >/dev/null || { say "autotune profile failed"; exit 1; }
say "profile"

model() {  # model NAME CONFIG SEQ GLOBAL_BATCH: plan, hand loop, cost model, breakdown
    local dir=$R/$1 config=$2 seq=$3 gb=$4
    mkdir -p "$dir"
    export AUTOTUNE_CACHE="$dir/cache"  # cold: the study pays every compilation
    export TORCHINDUCTOR_CACHE_DIR="$dir/cache/inductor"
    local t0=$(date +%s)
    timeout $(( ${BUDGET:-420} + 60 )) python3 -m autotune plan --workload hf --workload-config "$config" --seq-len "$seq" --global-batch "$gb" \
        --time-budget "${BUDGET:-420}" --profile "$R/profile.json" --storage "sqlite:///$dir/studies.db" --out "$dir/plan.json"
    say "$1: autotune plan exit $? in $(( $(date +%s) - t0 )) s"
    python3 bench/budget_breakdown.py "$dir/studies.db" || true
    python3 bench/costmodel_check.py check "$dir/studies.db" --profile "$R/profile.json" > "$dir/costmodel.txt" 2>&1; cat "$dir/costmodel.txt"
    [[ -f "$dir/plan.json" ]] || return 1
    # The hand loop at the plan's global batch: two micro-batches (the larger first), none started after 150 s.
    timeout 260 python3 bench/hand_loop.py run "$dir/plan.json" --micro-batches ${HAND_MICRO_BATCHES:-16,32} --until $(( $(date +%s) + 150 )) \
        --out "$dir/hand.jsonl"
    say "$1: hand loop exit $?"
    python3 bench/hand_loop.py best "$dir/hand.jsonl" || true
    python3 - "$dir" <<'EOF'
import json, sys
d = sys.argv[1]
plan = json.load(open(f"{d}/plan.json"))
hand = [json.loads(l) for l in open(f"{d}/hand.jsonl")]
ok = [h for h in hand if h.get("status") == "ok"]
best = max(ok, key=lambda h: h["tokens_per_s"]) if ok else None
m = plan["measured"]
line = {"plan_tokens_per_s": m["tokens_per_s"], "plan_spread": m.get("spread"), "plan_strategies": [s["name"] for s in plan["strategies"]],
        "micro_batch": plan["train"]["micro_batch_size"], "hand_best": best and best["tokens_per_s"], "hand_micro_batch": best and best["micro_batch"],
        "ratio": best and m["tokens_per_s"] / best["tokens_per_s"], "verdict": (plan.get("comparison") or {}).get("verdict")}
print(json.dumps(line))
json.dump(line, open(f"{d}/summary.json", "w"))
EOF
}

job() {
    case $1 in
        qwen3) model qwen3 bench/configs/qwen3-0.33b.json 1024 64 ;;
        llama32) model llama32 bench/configs/llama-3.2-1b.json 1024 64 ;;
        mistral) model mistral bench/configs/mistral-gqa.json 2048 32 ;;
        gpt1b) mkdir -p "$R/gpt1b"; AUTOTUNE_CACHE="$R/gpt1b/cache" timeout 360 python3 -m autotune plan --workload gpt-1b --global-batch 8 --time-budget 300 \
                   --profile "$R/profile.json" --storage "sqlite:///$R/gpt1b/studies.db" --out "$R/gpt1b/plan.json" ;;
        *) say "unknown job $1"; return 2 ;;
    esac
}

for name in "$@"; do
    say "$name: start"
    job "$name" > >(tee "$R/$name.log") 2>&1
    say "$name: exit $?"
done
say "all done"
touch "$R/DONE"
