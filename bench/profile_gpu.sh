#!/usr/bin/env bash
# `autotune profile` on a GPU machine, checked against a plain torch loop in the same run.
#
#   OUT=/some/folder bash bench/profile_gpu.sh        (from the repo root; any number of GPUs)
#
# Writes under $OUT (N = the number of GPUs):
#   profile-Ngpu.json        the full profile       profile-quick-Ngpu.json   the --quick profile
#   crosscheck-Ngpu.json     plain-loop figures     profile_gpu-Ngpu.log      everything printed
#   topo-Ngpu.txt            nvidia-smi and nvidia-smi topo -m, for comparing the detected links
# The cross-check times torch.matmul and Tensor.copy_ with the host clock after a synchronize
# (the profile uses CUDA events) and says whether each profile figure is within 10% of it.
set -uo pipefail
: "${OUT:?set OUT to the folder for the results}"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Mandatory on the shared GPU machine: never let NCCL or PyTorch use NVLink multicast.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

n=$(python3 -c 'import torch; print(torch.cuda.device_count())') || exit 1
tag="${n}gpu"
exec > >(tee "$OUT/profile_gpu-$tag.log") 2>&1
{ nvidia-smi; nvidia-smi topo -m; } >"$OUT/topo-$tag.txt" 2>&1
echo "== $n GPU(s); python3 $(python3 -c 'import platform; print(platform.python_version())')"

timed() {  # timed LABEL COMMAND...: run it, print its wall time and exit status
    local label=$1 start end rc
    shift
    start=$(date +%s%N)
    "$@"
    rc=$?
    end=$(date +%s%N)
    printf '== %s: %d ms, exit %d\n' "$label" $(((end - start) / 1000000)) "$rc"
    return $rc
}

timed "autotune profile --quick" python3 -m autotune profile --quick --out "$OUT/profile-quick-$tag.json"
timed "autotune profile" python3 -m autotune profile --out "$OUT/profile-$tag.json"

echo "== cross-check: plain torch loop against the profile"
python3 - "$OUT/profile-$tag.json" "$OUT/crosscheck-$tag.json" <<'EOF'
import json, sys, time

import torch

profile = json.load(open(sys.argv[1]))
m = profile["measured"]
if not m:
    sys.exit("the profile has no measurements: " + "; ".join(profile["notes"]))
n, copy_bytes = m["matmul_n"], m["copy_bytes"]


def plain_rate(fn, work, iters, repeats=5):
    """Median of `repeats` host-timed runs of `iters` calls, after 0.5 s of warm-up."""
    fn()
    torch.cuda.synchronize()
    end = time.perf_counter() + 0.5
    while time.perf_counter() < end:
        fn()
        torch.cuda.synchronize()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        rates.append(work * iters / (time.perf_counter() - start))
    return sorted(rates)[repeats // 2]


def matmul(dtype, tf32, iters):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    return plain_rate(lambda: torch.matmul(a, b), 2 * n**3, iters)


src = torch.randn(copy_bytes // 4, device="cuda")
dst = torch.empty_like(src)
plain = {
    "matmul fp32": matmul(torch.float32, False, 5),
    "matmul tf32": matmul(torch.float32, True, 20),
    "matmul bf16": matmul(torch.bfloat16, False, 50),
    "copy": plain_rate(lambda: dst.copy_(src), 2 * copy_bytes, 50),
}
ours = {f"matmul {d}": s["median"] for d, s in m["matmul"].items()}
if m["copy"]:
    ours["copy"] = m["copy"]["median"]

rows, ok = [], True
print(f"{'figure':<14}{'profile':>16}{'plain loop':>16}{'ratio':>8}  within 10%")
for name, value in plain.items():
    unit, scale = ("TFLOP/s", 1e12) if name.startswith("matmul") else ("GB/s", 1e9)
    mine = ours.get(name)
    ratio = mine / value if mine else float("nan")
    good = mine is not None and abs(ratio - 1) <= 0.10
    ok &= good
    rows.append({"figure": name, "profile": mine, "plain": value, "ratio": ratio, "within_10pct": good})
    shown = f"{mine / scale:.1f} {unit}" if mine else "not measured"
    print(f"{name:<14}{shown:>16}{value / scale:>9.1f} {unit:<7}{ratio:>7.3f}  {'yes' if good else 'NO'}")
for name in sorted(set(ours) - set(plain)):
    print(f"{name:<14}{ours[name] / 1e12:>10.1f} TFLOP/s  (no plain counterpart)")
for p in m["allreduce"]:
    print(f"all-reduce {p['size_bytes'] >> 20:>5} MiB busbw {p['busbw']['median'] / 1e9:8.1f} GB/s")
print(f"profile measured in {m['seconds']:.1f} s; fingerprint {profile['fingerprint']}")
print("notes:", *profile["notes"], sep="\n  ")
json.dump({"gpus": torch.cuda.device_count(), "name": torch.cuda.get_device_name(0), "rows": rows}, open(sys.argv[2], "w"), indent=2)
print("== cross-check:", "all within 10%" if ok else "MISMATCH")
EOF

echo "== tests/test_hardware.py (GPU tests included)"
python3 -m pytest -q -p no:cacheprovider tests/test_hardware.py
