"""Planning: the search for the fastest way to train a workload here, an Optuna study over
the knobs of the strategies that are legal here, its best trial confirmed and written as a plan.

- :mod:`~autotune.planning.settings`: what ``autotune plan`` is asked (PlanSettings), the
  profile it plans for.
- :mod:`~autotune.planning.space`: what a trial may choose, and the plan its parameters make;
  the space built for this machine and workload (:func:`~autotune.planning.space.build_space`).
- :mod:`~autotune.planning.objective`: one trial, checked on the CPU then run in its own
  process; the pruner; running the study.
- :mod:`~autotune.planning.study`: storage with heartbeats, the study's name and identity, the
  planner runs that measured it, the lock planners sharing it take.
- :mod:`~autotune.planning.summary`: what a study's trials say, and its summary.
- :mod:`~autotune.planning.first_trials`: the baseline, the warm starts and the expert priors.
- :mod:`~autotune.planning.refine`: the best configurations with the refine-only choices.
- :mod:`~autotune.planning.clock`: the time budget, its margins, the least budget a plan
  needs, a run's time predicted from its trial.
- :mod:`~autotune.planning.guard`: the quality guard of an approximate best trial.
- :mod:`~autotune.planning.confirm`: the interleaved confirmation against the baseline.
- :mod:`~autotune.planning.driver`: ``autotune plan``'s walk, :func:`~autotune.planning.driver.make_plan`.
- :mod:`~autotune.planning.adapt`: a plan from another machine validated or re-planned here
  (``autotune run --adapt``).
"""
