#!/usr/bin/env bash
# One device session's H200 runs, in order, each into its own folder under RESULTS, so that
# whatever ends before the machine goes back is kept. Meant to run in the background (its own
# process session), polled by short commands that copy RESULTS back:
#
#   setsid nohup bash bench/session_h200.sh /root/h200 llama gpt1b long moe long-exact >/root/h200/session.log 2>&1 </dev/null &
#
# Jobs (repo root; wheels installed into /tmp/site, PYTHONPATH=/tmp/site, the package installed
# with `python3 -m pip install --no-deps --no-build-isolation -e .`):
#   llama       issue 12: the committed HF Llama plan against the hand-tuned loop, interleaved (bench/hf_llama_h200.sh)
#   gpt1b       issue 13: autotune plan --workload gpt-1b --allow-approximate, 15-minute budget
#   long        issue 13: autotune plan --workload phase8-long --allow-approximate
#   moe         issue 13: MoE against the dense plan under the guard's rules (bench/moe_guard.py)
#   long-exact  issue 13: phase8-long without --allow-approximate: an exact plan
#   gpt1b-exact issue 13: gpt-1b without --allow-approximate: an exact plan
#   warm        issue 14: bench/warm_start.py on gpt2-124m from the committed phase8-small study
# The plans' global batches are smaller than the recipes' so that a 200-step quality guard fits
# the budget (gpt-1b's recipe, 256 x 2048 tokens, takes about 6.5 s a step in bf16 on one H200).
set -uo pipefail
R=${1:?results folder}; shift
cd "$(dirname "$0")/.."
mkdir -p "$R"
export PYTHONUNBUFFERED=1 COLUMNS=200
# Mandatory on the shared GPU machine: never let NCCL or PyTorch use NVLink multicast.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export AUTOTUNE_CACHE="$R/cache"  # cold at the start: every study pays its compilations
start=$(date +%s)
say() { echo "== $(date -u +%H:%M:%S) +$(( $(date +%s) - start )) s: $*"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import platform, torch, triton, optuna, torchao, transformers; print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__, "optuna", optuna.__version__, "torchao", torchao.__version__, "transformers", transformers.__version__)'
git log -1 --format='commit %H' 2>/dev/null || true
# The package maps autotune.strategies and autotune.kernels onto strategies/ and kernels/, so it
# must be installed (`python3 -m pip install --no-deps --no-build-isolation -e .`), not only on
# the path: refuse at once rather than after the first job's wait.
python3 -c 'import autotune.strategies, autotune.kernels' || { say "autotune is not installed: pip install --no-deps --no-build-isolation -e ."; exit 2; }

profile() {
    [[ -f "$R/profile.json" ]] || python3 -m autotune profile --out "$R/profile.json" >/dev/null
}

plan() {  # plan FOLDER SECONDS ARGS...: autotune plan into FOLDER, killed after SECONDS
    local dir=$R/$1 limit=$2; shift 2
    mkdir -p "$dir"
    profile || { say "autotune profile failed"; return 1; }
    timeout "$limit" python3 -m autotune plan --profile "$R/profile.json" --storage "sqlite:///$dir/studies.db" "$@"
    local rc=$?
    python3 bench/budget_breakdown.py "$dir/studies.db"
    return $rc
}

job() {
    case $1 in
        llama) OUT=$R/llama PLAN=bench/results/hf-llama-125m-h200/llama.plan.json LIMIT=300 MICRO_BATCHES=32,64 AB_RESERVE=200 \
                   bash bench/hf_llama_h200.sh ;;
        gpt1b) plan gpt1b 960 --workload gpt-1b --allow-approximate --global-batch 8 --trials 3 --time-budget 900 \
                   --warmup-steps 2 --trial-steps 5 --trial-timeout 240 --out "$R/gpt1b/gpt-1b.plan.json" ;;
        long) plan long 660 --workload phase8-long --allow-approximate --global-batch 12 --trials 3 --time-budget 600 \
                  --warmup-steps 3 --trial-steps 6 --trial-timeout 180 --out "$R/long/phase8-long.plan.json" ;;
        moe) mkdir -p "$R/moe" && timeout 400 python3 bench/moe_guard.py bench/results/approx/phase8-small.plan.json \
                 --variant moe_e8_k2=moe.num_experts=8,moe.top_k=2,moe.capacity_factor=1.25,moe.every_n_layers=2 \
                 --steps 200 --variant-steps 300 --timeout 300 --out "$R/moe/moe_guard_phase8-small_h200.jsonl" ;;
        long-exact) plan long-exact 300 --workload phase8-long --global-batch 12 --trials 2 --time-budget 240 \
                        --warmup-steps 3 --trial-steps 6 --trial-timeout 180 --out "$R/long-exact/phase8-long.plan.json" ;;
        gpt1b-exact) plan gpt1b-exact 360 --workload gpt-1b --global-batch 8 --trials 2 --time-budget 300 \
                         --warmup-steps 2 --trial-steps 5 --trial-timeout 240 --out "$R/gpt1b-exact/gpt-1b.plan.json" ;;
        warm) mkdir -p "$R/warm" && timeout 660 python3 bench/warm_start.py --workload gpt2-124m --trials 4 \
                  --warm-start sqlite:///bench/results/plan-phase8-small/studies.db --out "$R/warm/h200.jsonl" ;;
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
