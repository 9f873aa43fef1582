"""Executor overhead on one GPU: a hand-written bf16 + compile loop against `autotune run`.

Same model class, same micro-batch, same process for the hand loop; `autotune run` is started
as a child the way a user runs it (random tokens, then the real-text loader). Writes one JSON
row per measurement and prints a table with the ratio to the hand loop.

    python3 bench/executor_overhead.py --workload phase8-small --micro-batch 32 --out bench/results/x.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autotune.workloads import load_workload  # noqa: E402


def hand_loop(workload: str, micro_batch: int, steps: int, warmup: int) -> dict:
    """What a careful engineer writes by hand: bf16 autocast, compile, fused AdamW, no syncs."""
    wl = load_workload(workload)
    torch.manual_seed(0)
    model = wl.build_model().cuda()
    torch.backends.cuda.matmul.allow_tf32 = True
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    fwd = torch.compile(model)
    data = torch.randint(0, wl.vocab_size, (8, micro_batch, wl.seq_len + 1), device="cuda")

    def step(i: int) -> None:
        batch = data[i % 8]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for i in range(steps):
            step(i)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    tokens = steps * micro_batch * wl.seq_len
    return {
        "tokens_per_s": tokens / statistics.median(times),
        "repeats_s": times,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(),
    }


def autotune_run(workload: str, micro_batch: int, steps: int, random_tokens: bool, tmp: Path, data: str | None) -> dict:
    plan = {
        "schema_version": 1,
        "workload": {"name": workload},
        "strategies": [
            {"name": "precision", "knobs": {"dtype": "bf16", "tf32": True}},
            {"name": "compile", "knobs": {"mode": "default"}},
        ],
        "launch": {"device": "cuda"},
        "train": {
            "micro_batch_size": micro_batch,
            "steps": steps,
            "random_tokens": random_tokens,
            "eval_interval": 0,
            "checkpoint_interval": 0,
            "log_interval": 25,
        },
    }
    path = tmp / f"plan-{'random' if random_tokens else 'text'}.json"
    path.write_text(json.dumps(plan))
    cmd = [sys.executable, "-m", "autotune", "run", str(path), "--json", "--out", str(tmp / path.stem)]
    if data:
        cmd += ["--data", data]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    out = json.loads(proc.stdout)
    out["wall_s"] = time.perf_counter() - start
    out["command"] = " ".join(cmd[1:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="phase8-small")
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--data", default=None, help="data dir for the real-text run (default corpus if omitted)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    env = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "workload": args.workload,
        "micro_batch": args.micro_batch,
    }
    rows = []
    hand = hand_loop(args.workload, args.micro_batch, steps=50, warmup=20)
    rows.append({"variant": "hand-written loop (random tokens)", **hand})
    with tempfile.TemporaryDirectory() as tmp:
        for random_tokens in (True, False):
            r = autotune_run(args.workload, args.micro_batch, args.steps, random_tokens, Path(tmp), args.data)
            rows.append({"variant": f"autotune run ({'random tokens' if random_tokens else 'real-text loader'})", **r})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for row in rows:
            row.update(env, ratio_to_hand=row["tokens_per_s"] / hand["tokens_per_s"])
            f.write(json.dumps(row) + "\n")
    print(f"{'variant':45s} {'tokens/s':>12s} {'ratio':>6s} {'peak GiB':>9s}")
    for row in rows:
        print(
            f"{row['variant']:45s} {row['tokens_per_s']:12,.0f} "
            f"{row['ratio_to_hand']:6.3f} {row['peak_memory_bytes'] / 2**30:9.2f}"
        )
    print(json.dumps(env))


if __name__ == "__main__":
    main()
