"""Proof that the int8 strategy really runs int8 matmuls (issue 13): a plan's model with int8
on, two optimizer steps under torch.profiler; counts the ``aten::_int_mm`` calls and the GPU
kernels whose names say int8, against the same plan without int8. Eager (compile taken out),
so the aten ops are visible; random tokens (no corpus needed).

    python3 bench/int8_trace.py PLAN --out FILE.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

import torch
from torch.profiler import ProfilerActivity, profile

from autotune import plan as planmod
from autotune.runtime.trainer import Trainer

INT8_KERNEL = re.compile(r"(int8|_s8|s8_|i8|imma|igemm|int_mm)", re.IGNORECASE)


def trace(plan: planmod.Plan, steps: int = 2) -> dict:
    trainer = Trainer(plan)
    try:
        trainer.train_step(0)  # warm-up: first-call allocations, cuBLAS handles
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            for s in range(1, 1 + steps):
                trainer.train_step(s)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        events = prof.key_averages()
        int_mm = sum(e.count for e in events if e.key == "aten::_int_mm")
        mm = sum(e.count for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"))
        kernels = sorted(
            {e.key for e in events if e.device_type == torch.autograd.DeviceType.CUDA and INT8_KERNEL.search(e.key)}
        )
        swapped = sorted({type(m).__name__ for m in trainer.ctx.model.modules() if "Int8" in type(m).__name__})
        return {
            "aten_int_mm_calls": int_mm,
            "aten_float_mm_calls": mm,
            "int8_kernels": kernels[:20],
            "int8_modules": swapped,
            "steps": steps,
        }
    finally:
        trainer.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("plan")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    base = planmod.load(args.plan)
    base = dataclasses.replace(
        base,
        strategies=[s for s in base.strategies if s.name not in ("compile", "int8", "fp8")],
        train=dataclasses.replace(base.train, random_tokens=True, eval_interval=0, checkpoint_interval=0),
    )
    with_int8 = dataclasses.replace(base, strategies=[*base.strategies, planmod.StrategySpec(name="int8", knobs={})])
    out = {
        "plan": args.plan,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }
    for name, p in (("bf16", base), ("int8", with_int8)):
        out[name] = trace(p)
        print(name, json.dumps(out[name]))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
