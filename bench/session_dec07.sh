#!/usr/bin/env bash
# The GPU session of 2026-12-07, meant to run in the background (its own process session), polled
# by short commands that copy RESULTS back:
#
#   setsid nohup bash bench/session_dec07.sh /root/s7 >/root/s7/session.log 2>&1 </dev/null &
#
# 1. Issue 29 (the house redesign keeps the step's speed): bench/single_device.py at the commit
#    before the redesign (563db92, in .dev-base/) and at this one (.dev-head/), interleaved
#    base, head, head, base on the same GPU, each a fresh process over the same variants. Both trees
#    are plain copies with strategies/ and kernels/ inside autotune/ (made by
#    `bench/session_dec07.sh --trees`), so that each imports only its own code.
# 2. Issue 28 (the planner's choice of loss where the vocabulary is large): `autotune plan
#    --workload gpt-vocab152k` with the same time budget twice, with every strategy and with
#    `--exclude triton_kernels`, each from a cold cache, then both plans as interleaved real trials
#    (bench/trial_ab.py). WORKLOAD picks another model (phase8-small: the plan with kernels must not
#    be slower than the one without).
# 3. (PARTS=floor) Issue 28's fused loss against compile and against the head's three cuBLAS
#    matmuls alone (bench/fused_loss.py's `matmuls`): how far above that floor each design runs.
#
# Wheels (optuna and its needs, torchao, liger-kernel, cut-cross-entropy) in /tmp/site on
# PYTHONPATH; the package installed with `python3 -m pip install --no-deps --no-build-isolation -e .`.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ ${1:-} == --trees ]]; then  # on the dev machine: the two source trees the A/B runs
    rm -rf .dev-base .dev-head
    for x in base:563db92 head:HEAD; do
        d=.dev-${x%%:*}; mkdir -p "$d"
        git archive "${x#*:}" autotune strategies kernels bench/single_device.py | tar -x -C "$d"
        mv "$d/strategies" "$d/autotune/strategies"; mv "$d/kernels" "$d/autotune/kernels"
    done
    exit 0
fi
R=${1:?results folder}
mkdir -p "$R"
export PYTHONUNBUFFERED=1 COLUMNS=200
# Mandatory on the shared GPU machine: never let NCCL or PyTorch use NVLink multicast.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
start=$(date +%s)
say() { echo "== $(date -u +%H:%M:%S) +$(( $(date +%s) - start )) s: $*"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import platform, torch, triton, optuna, transformers; print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__, "optuna", optuna.__version__, "transformers", transformers.__version__)'
git log -1 --format='commit %H' 2>/dev/null || true

# Issue 29: the variants every step of the trainer goes through (precision, attention, padding,
# optimizer, checkpointing, accumulation, the loader, compile, the combination).
ONLY='^bf16 \+ SDPA|vocab padding|AdamW foreach|every block|grad accum|pinned|^bf16 \+ compile$|combination, micro-batch 32'
# PARTS: which of the two to run (both by default).
[[ " ${PARTS:-single plans} " == *" single "* ]] && for tree in ${TREES:-base head head base}; do
    (cd ".dev-$tree" && timeout 400 python3 bench/single_device.py --only "$ONLY" --out "$R/single_$tree.jsonl" \
        > "$R/single_$tree.log" 2>&1)
    say "single_device $tree exit $?"
done

# Issue 28.
[[ " ${PARTS:-single plans} " == *" floor "* ]] && {
    timeout 500 python3 bench/fused_loss.py all --shapes "${SHAPES:-16384x1024x151936,16384x2048x128256,98304x512x50304}" \
        --impls matmuls,compile,autotune --iters 10 --out "$R/floor.jsonl" > "$R/floor.log" 2>&1
    say "fused_loss floor exit $?"
}
[[ " ${PARTS:-single plans} " == *" plans "* ]] || { touch "$R/DONE"; exit 0; }
python3 -m autotune profile --out "$R/profile.json" >/dev/null || say "autotune profile failed"
plan() {  # plan NAME ARGS...
    local name=$1; shift
    mkdir -p "$R/$name"
    AUTOTUNE_CACHE="$R/$name/cache" TORCHINDUCTOR_CACHE_DIR="$R/$name/cache/inductor" \
        timeout $(( ${BUDGET:-240} + 60 )) python3 -m autotune plan --workload "${WORKLOAD:-gpt-vocab152k}" --time-budget "${BUDGET:-240}" \
        --profile "$R/profile.json" --storage "sqlite:///$R/$name/studies.db" --out "$R/$name/plan.json" "$@" \
        > "$R/$name.log" 2>&1
    say "plan $name exit $?"
    tail -25 "$R/$name.log"
}
plan kernels
plan nokernels --exclude triton_kernels
if [[ -f $R/kernels/plan.json && -f $R/nokernels/plan.json ]]; then
    timeout 400 python3 bench/trial_ab.py "$R/kernels/plan.json" --variant "nokernels=@$R/nokernels/plan.json" --variant kernels= --rounds 2 --out "$R/ab.jsonl" \
        > "$R/ab.log" 2>&1
    say "trial_ab exit $?"
    tail -15 "$R/ab.log"
fi
touch "$R/DONE"
