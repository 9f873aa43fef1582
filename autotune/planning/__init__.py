"""Planning: the search for the fastest way to train a workload here, an Optuna study over
the knobs of the strategies that are legal here.

- :mod:`~autotune.planning.space`: what a trial may choose, and the plan its parameters make.
- :mod:`~autotune.planning.objective`: one trial, checked on the CPU then run in its own
  process; the pruner; running the study.
- :mod:`~autotune.planning.study`: storage with heartbeats, the study's identity, the planner
  runs that measured it, the lock planners sharing it take.
- :mod:`~autotune.planning.summary`: what a study's trials say, and its summary.
- :mod:`~autotune.planning.first_trials`: the baseline, the warm starts and the priors.
- :mod:`~autotune.planning.refine`: the best configurations with the refine-only choices.

The driver (``autotune plan``) is :mod:`autotune.planner`.
"""
