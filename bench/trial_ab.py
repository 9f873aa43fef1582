"""Variants of one plan measured as real trials, interleaved, as ratios to the first variant.

Each round runs every variant once, in turn (A B C A B C ...), so a drift of the machine
lands on all of them alike; the figure of a variant is its median over the rounds.

    python3 bench/trial_ab.py PLAN --variant flash= --variant cudnn=attention.backend=cudnn \\
        --rounds 2 --out bench/results/attention_ab_h200.jsonl

A variant is NAME=[CHANGE[,...]], each CHANGE STRATEGY.KNOB=VALUE (VALUE read as JSON when
it parses, else a string; train.FIELD=VALUE for the train section) or -STRATEGY (without
it); no change is the plan itself; NAME=@OTHER.plan.json is another plan file as it stands.
The first variant is the reference.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from autotune import plan as planmod  # noqa: E402
from autotune.runtime.trial import TrialBudget, run_trial  # noqa: E402


def variant(base: dict, spec: str) -> tuple[str, dict]:
    name, _, changes = spec.partition("=")
    if changes.startswith("@"):  # NAME=@PLAN: another plan file as it stands
        return name, plain(json.loads(Path(changes[1:]).read_text()))
    data = copy.deepcopy(base)
    for change in filter(None, changes.split(",")):
        if change.startswith("-"):  # -STRATEGY: without it
            data["strategies"] = [s for s in data["strategies"] if s["name"] != change[1:]]
            continue
        key, _, raw = change.partition("=")
        strategy, _, knob = key.partition(".")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        specs = {s["name"]: s for s in data["strategies"]}
        if strategy == "train":
            data["train"][knob] = value
        elif strategy not in specs:
            data["strategies"].append({"name": strategy, "knobs": {knob: value} if knob else {}})
        else:
            specs[strategy]["knobs"][knob] = value
    return name, data


def plain(data: dict) -> dict:
    """A plan file without its measured figures: what a trial of it runs."""
    for key in ("measured", "baseline", "loss_check", "provenance", "hardware"):
        data.pop(key, None)
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plan", type=Path)
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=180)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import torch

    base = plain(json.loads(args.plan.read_text()))
    variants = [variant(base, v) for v in args.variant]
    budget = TrialBudget(warmup_steps=5, timed_steps=args.steps, timeout_s=args.timeout)
    runs: dict[str, list[float]] = {name: [] for name, _ in variants}
    losses: dict[str, list[float]] = {name: [] for name, _ in variants}
    for r in range(args.rounds):
        for name, data in variants:
            result = run_trial(planmod.from_dict(data), budget)
            f = result.figures
            print(
                f"round {r} {name:<16} {f.status:<8} {f.tokens_per_s or 0:>12,.0f} "
                f"tokens/s  {result.wall_s:5.1f} s  {result.error or ''}",
                flush=True,
            )
            if f.status == "ok":
                runs[name].append(f.tokens_per_s)
                losses[name].append(f.loss_end)
    reference = statistics.median(runs[variants[0][0]]) if runs[variants[0][0]] else None
    records = []
    for name, data in variants:
        median = statistics.median(runs[name]) if runs[name] else None
        ratio = median / reference if median and reference else None
        print(f"{name:<16} {median or 0:>12,.0f} tokens/s  x{ratio or 0:.3f}")
        spread = (max(runs[name]) - min(runs[name])) / 2 / median if median else None
        # Every variant trains on the same batches from the same seed: the last loss is at equal steps.
        records.append(
            {
                "variant": name,
                "workload": data["workload"],
                "tokens_per_s": median,
                "runs": runs[name],
                "spread": spread,
                "ratio": ratio,
                "loss_end": losses[name],
                "strategies": data["strategies"],
                "micro_batch": data["train"]["micro_batch_size"],
                "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                "torch": torch.__version__,
                "command": " ".join(sys.argv),
            }
        )
    if args.out:
        with args.out.open("a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
