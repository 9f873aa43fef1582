#!/usr/bin/env bash
# A study on one H200 (issues 5 and 11): a measured profile, then `autotune plan` with a time
# budget, from a fresh machine (no compile cache).
#
#   OUT=/some/folder [WORKLOAD=phase8-small] bash bench/plan_h200.sh [TIME_BUDGET_S]   (repo root; default 400 s)
#
# Writes under $OUT: profile.json, plan.log (the live table and the summary, with the wall
# time of the whole command and where the budget went), studies.db (the Optuna study),
# $WORKLOAD.plan.json.
set -uo pipefail
: "${OUT:?set OUT to the folder for the results}"
budget=${1:-400}
workload=${WORKLOAD:-phase8-small}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 COLUMNS=200
# Mandatory on the shared GPU machine: never let NCCL or PyTorch use NVLink multicast.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export AUTOTUNE_CACHE="$OUT/cache"  # a cold compile cache: the study pays every compilation
exec > >(tee "$OUT/plan.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import platform, torch, triton, optuna; print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__, "optuna", optuna.__version__)'
python3 -m autotune profile >/dev/null && cp ~/.cache/autotune/hardware.json "$OUT/profile.json" || exit 1
start=$(date +%s)
python3 -m autotune plan --workload "$workload" --time-budget "$budget" --trial-timeout 90 \
    --profile "$OUT/profile.json" --storage "sqlite:///$OUT/studies.db" --out "$OUT/$workload.plan.json"
rc=$?
echo "== autotune plan: exit $rc, wall $(( $(date +%s) - start )) s (time budget $budget s)"
python3 bench/budget_breakdown.py "$OUT/studies.db"
rm -rf "$OUT/cache"
exit $rc
