"""Cross-check `autotune profile` against plain loops timed in the same run (issue 3).

python3 -m autotune profile --out $OUT/h200.json && python3 bench/profile_check.py $OUT/h200.json
"""

from __future__ import annotations

import json
import sys
import time

import torch


def plain_matmul_tflops(n: int = 8192, reps: int = 50) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def plain_copy_tbps(nbytes: int = 4 << 30, reps: int = 20) -> float:
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * nbytes * reps / (time.perf_counter() - start) / 1e12


def main() -> None:
    profile = json.load(open(sys.argv[1]))
    measured = profile["measured"]
    rows = {
        "bf16 matmul TFLOP/s": (measured["matmul"]["bf16"]["median"] / 1e12, plain_matmul_tflops()),
        "copy TB/s (read+write)": (measured["copy"]["median"] / 1e12, plain_copy_tbps()),
    }
    print(f"{'figure':28s} {'profile':>10s} {'plain loop':>10s} {'ratio':>6s}")
    for name, (prof, plain) in rows.items():
        print(f"{name:28s} {prof:10.1f} {plain:10.1f} {prof / plain:6.3f}")
    print(
        json.dumps(
            {
                "gpu": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "check": {k: {"profile": p, "plain": q, "ratio": p / q} for k, (p, q) in rows.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
