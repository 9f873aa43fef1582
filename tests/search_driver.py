"""A small planner over tests.faults, for tests that kill it: ``python -m tests.search_driver
DB TRIALS MICRO_BATCH...`` opens study "faults" in sqlite DB, enqueues the baseline and a trial
per MICRO_BATCH, and runs TRIALS new trials, keeping their logs beside the database."""

import sys

import optuna

from autotune.contract.strategy import Facts
from autotune.errors import UserError
from autotune.graph import StrategyGraph
from autotune.plan import LaunchSpec, TrainSpec
from autotune.planning.first_trials import ensure_first_trials
from autotune.planning.objective import Objective, optimize
from autotune.planning.space import SearchSpace
from autotune.planning.study import open_study, study_identity, trial_log_dir
from autotune.runtime.trial import TrialBudget
from autotune.workloads import load_workload

optuna.logging.set_verbosity(optuna.logging.WARNING)
BUDGET = TrialBudget(warmup_steps=1, timed_steps=3, timeout_s=60)


def fault_space(micro_batches: tuple[int, ...]) -> SearchSpace:
    workload = load_workload("tests.faults:build")
    return SearchSpace(
        workload=workload,
        strategies=[],
        graph=StrategyGraph(Facts.of(None, workload)),
        micro_batches=(2, *micro_batches),
        baseline_micro_batch=2,
        train=TrainSpec(micro_batch_size=1),
        launch=LaunchSpec(device="cpu"),
        device_memory=None,
    )


def main(db: str, trials: str, *micro_batches: str) -> int:
    url = f"sqlite:///{db}"
    space = fault_space(tuple(map(int, micro_batches)))
    try:
        # The tests kill and resume this planner; whether a slow step prunes a trial depends on the
        # machine's load (a retry pruned below the best of an idle moment failed a loaded CI run),
        # so no trial stops on its speed here. Twins and illegal trials are still pruned.
        study = open_study(
            "faults", url, "tpe", 0, identity=study_identity(BUDGET, None), pruner=optuna.pruners.NopPruner()
        )
        if not study.trials:
            ensure_first_trials(study, space, [])
            for mb in micro_batches:
                study.enqueue_trial({"micro_batch_size": int(mb)})
        objective = Objective(space=space, budget=BUDGET, log_dir=trial_log_dir(url, "faults"))
        optimize(study, objective, trials=int(trials), time_budget=None)
    except UserError as e:
        print(f"autotune: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
