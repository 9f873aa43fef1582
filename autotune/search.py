"""The names of the former ``autotune.search`` that ``autotune/planner.py`` reaches as
``search.<name>``; the search itself lives in :mod:`autotune.planning` (space, objective,
study, summary, first_trials, refine). This module goes when planner.py moves into
``autotune/planning/`` (issue 29); nothing else imports it."""

from autotune.planning.first_trials import ensure_first_trials, warm_starts
from autotune.planning.objective import (
    AUTOTUNE_TIME_FACTOR,
    MEMORY_HEADROOM,
    MIN_TRIAL_S,
    PLANNER_ID,
    Objective,
    optimize,
)
from autotune.planning.refine import measure_again, refine
from autotune.planning.space import SearchSpace, layouts, micro_batch_choices, plan_for, predict
from autotune.planning.study import open_study, stale, stale_runs, study_identity, trial_log_dir, wait_for_others
from autotune.planning.summary import BASELINE, Summary, baseline_trial, configuration, figures_of, plan_of, summarize

__all__ = [
    "AUTOTUNE_TIME_FACTOR",
    "BASELINE",
    "MEMORY_HEADROOM",
    "MIN_TRIAL_S",
    "PLANNER_ID",
    "Objective",
    "SearchSpace",
    "Summary",
    "baseline_trial",
    "configuration",
    "ensure_first_trials",
    "figures_of",
    "layouts",
    "measure_again",
    "micro_batch_choices",
    "open_study",
    "optimize",
    "plan_for",
    "plan_of",
    "predict",
    "refine",
    "stale",
    "stale_runs",
    "study_identity",
    "summarize",
    "trial_log_dir",
    "wait_for_others",
    "warm_starts",
]
