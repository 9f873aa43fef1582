"""An approximate variant of a plan against the plan itself, as the quality guard judges it:
both trained for the same optimizer steps on the same real-text batches (same seed, same
global batch, so equal steps are equal tokens), each a fresh trial process; then tokens/s, the
loss at equal tokens and the time-to-loss (wall time to bring the smoothed loss down to the
exact run's final one), by ``autotune.planning.guard.guard_of``, the planner's own comparison.

    python3 bench/moe_guard.py bench/results/approx/phase8-small.plan.json \\
        --variant moe_e8_k2=moe.num_experts=8,moe.top_k=2,moe.capacity_factor=1.25,moe.every_n_layers=2 \\
        --steps 300 --out bench/results/approx/moe_guard_phase8-small_h200.jsonl

A variant is spelled as in bench/trial_ab.py. One JSON line per run (exact, then the variant),
then the guard's line. With ``--variant-steps`` the variant trains longer: the guard still
compares equal steps, and the record adds its time to the exact run's loss within all its steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from trial_ab import variant  # noqa: E402

from autotune import plan as planmod  # noqa: E402
from autotune.planning.guard import GUARD_TAIL, GUARD_WARMUP, guard_of, loss_curve  # noqa: E402
from autotune.planning.settings import GUARD_STEPS, QUALITY_TOLERANCE  # noqa: E402
from autotune.runtime.trial import TrialBudget, run_trial  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plan", type=Path)
    ap.add_argument("--variant", required=True, help="NAME=CHANGE[,CHANGE...] (bench/trial_ab.py)")
    ap.add_argument("--steps", type=int, default=GUARD_STEPS, help="timed optimizer steps of each run")
    ap.add_argument(
        "--variant-steps", type=int, help="the variant's timed steps, if more (its time-to-loss past equal steps)"
    )
    ap.add_argument("--tolerance", type=float, default=QUALITY_TOLERANCE)
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import torch

    base = json.loads(args.plan.read_text())
    for key in ("measured", "baseline", "loss_check", "provenance", "hardware", "quality_guard"):
        base.pop(key, None)
    name, changed = variant(base, args.variant)
    runs = {}
    with args.out.open("w") as out:
        for label, data in (("exact", base), (name, changed)):
            plan = planmod.from_dict(data)
            accum, steps = (
                plan.grad_accum(),
                args.steps if label == "exact" else max(args.steps, args.variant_steps or 0),
            )
            budget = TrialBudget(warmup_steps=GUARD_WARMUP * accum, timed_steps=steps * accum, timeout_s=args.timeout)
            result = run_trial(plan, budget)
            f = result.figures
            print(
                f"{label:<12} {f.status:<8} {f.tokens_per_s or 0:>12,.0f} tokens/s  "
                f"loss {f.loss_end}  {result.wall_s:.0f} s  {result.error or ''}",
                flush=True,
            )
            out.write(
                json.dumps(
                    {
                        "run": label,
                        "status": f.status,
                        "tokens_per_s": f.tokens_per_s,
                        "step_time_s": f.step_time_s,
                        "peak_memory_bytes": f.peak_memory_bytes,
                        "mfu": f.mfu,
                        "wall_s": result.wall_s,
                        "error": result.error,
                        "strategies": data["strategies"],
                        "losses": f.losses,
                    }
                )
                + "\n"
            )
            if f.status != "ok":
                return 1
            runs[label] = f
        guard = guard_of(runs[name], runs["exact"], 0, args.tolerance)  # over the steps both trained
        longer = len(runs[name].losses or [])
        window = max(1, round(GUARD_TAIL * guard.steps))
        reached = loss_curve(runs[name], longer, window, guard.target_loss).time_to_loss_s
        record = {
            "guard": dataclasses.asdict(guard),
            "variant_steps": longer,
            "variant_time_to_loss_s": reached,
            "variant": name,
            "plan": str(args.plan),
            "steps": args.steps,
            "tokens_per_s_ratio": runs[name].tokens_per_s / runs["exact"].tokens_per_s,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
        out.write(json.dumps(record) + "\n")
    g = guard
    print(
        f"{name}: {record['tokens_per_s_ratio']:.3f}x tokens/s; loss over the last 10% of {g.steps} steps "
        f"{g.candidate.tail_mean:.4f} against the exact {g.exact.tail_mean:.4f} (passed: {g.passed}); "
        f"time to the exact run's final loss {g.candidate.time_to_loss_s} s against {g.exact.time_to_loss_s} s, "
        f"ratio {g.time_to_loss_ratio}; within its {longer} steps: {reached} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
