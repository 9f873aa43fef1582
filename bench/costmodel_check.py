"""The cost model's peak-memory prediction against the peaks measured in a study, per trial.

    python3 bench/costmodel_check.py bench/results/plan-phase8-small/studies.db

Prints, for every completed trial, the prediction stored when it ran and the current cost
model's prediction for the same plan, each as predicted / measured - 1, and the distribution.
"""

from __future__ import annotations

import sys
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from autotune import costmodel  # noqa: E402
from autotune import plan as planmod  # noqa: E402
from autotune.cli.plan_view import error_distribution  # noqa: E402
from autotune.workloads import load_workload  # noqa: E402


def main(db: str) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{db}")
    stored, current = [], []
    print(f"{'trial':>5} {'measured GiB':>12} {'as run':>8} {'now':>8}  batch")
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        plan = planmod.from_dict(t.user_attrs["plan"])
        workload = load_workload(plan.workload.name, plan.workload.overrides)
        measured = t.user_attrs["figures"]["peak_memory_bytes"]
        now = costmodel.estimate(workload, plan.train.micro_batch_size, plan.strategy_configs()).peak_memory_bytes / measured - 1
        then = t.user_attrs["predicted_peak_memory_bytes"] / measured - 1
        stored.append(then)
        current.append(now)
        print(f"{t.number:>5} {measured / 2**30:>12.2f} {then:>+8.1%} {now:>+8.1%}  {plan.train.micro_batch_size}x{plan.grad_accum()}")
    print(f"as run: {error_distribution(stored)}")
    print(f"now:    {error_distribution(current)}")


if __name__ == "__main__":
    main(sys.argv[1])
