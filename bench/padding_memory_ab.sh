#!/usr/bin/env bash
# Peak memory of eager vocabulary padding before and after the fix to GPT.forward that frees the
# final norm's output before the loss (the house A/B found 64 MiB more than before the redesign).
# On the GPU machine, from the repository root, with .dev-head/ (`bench/session_dec07.sh --trees`,
# made before the fix was committed) carried: "old" is that tree as it is, "new" the same tree with
# this checkout's autotune/workloads/gpt.py. Peak memory is deterministic: one run each.
#   bash bench/padding_memory_ab.sh      # writes $OUT/padmem_old.jsonl and $OUT/padmem_new.jsonl
set -u
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
for t in old new; do
  d=/tmp/tree-$t; [ -d $d ] || { mkdir -p $d; cp -r .dev-head/autotune $d/; cp -r .dev-head/bench $d/; }
  if [ $t = new ]; then cp autotune/workloads/gpt.py $d/autotune/workloads/gpt.py; fi
  (cd $d && timeout 100 python3 bench/single_device.py --only 'vocab padding|^bf16 \+ SDPA' --out $OUT/padmem_$t.jsonl 2>&1 | grep -E "padding|SDPA \(base" | tail -2)
done
