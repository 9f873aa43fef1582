"""Refinement: the best configurations again with the choices the main search never samples
(compile modes that benchmark kernels), where the time left allows; and measuring a
configuration again under this run's load."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import optuna

from autotune.plan import Plan
from autotune.planning.objective import MIN_TRIAL_S, Objective, trial_budget
from autotune.planning.summary import plan_of
from autotune.runtime import trial as trialmod
from autotune.runtime.trial import run_trial

REFINE = "refine"
# Choices never sampled by the main search are each knob's ``refine_only`` (the compile
# modes that benchmark kernels: a trial's compile takes minutes; on one H200, both such
# trials of a 300 s search crashed or timed out), so :func:`refine` tries them on the best
# configurations only, when the time left allows.
REFINE_COMPILE_FACTOR = 4.0
"""A max-autotune trial is predicted to take this many times the wall time of the same
configuration's trial in default mode (its first compile benchmarks every kernel)."""
REFINE_BEST = 2
"""Refine at most this many of the best compiled configurations."""


def _refinements(plan: Plan) -> list[tuple[str, str, Any]]:
    """(strategy, knob, value) for each refine-only choice the refinement can set in ``plan``:
    the strategy is on and the knob holds a choice the main search samples."""
    from autotune import catalog

    out = []
    for name, cfg in plan.strategy_configs().items():
        for knob in catalog.get(name).knobs:
            if knob.refine_only and getattr(cfg, knob.name) not in knob.refine_only:
                out += [(name, knob.name, value) for value in knob.refine_only]
    return out


def refine_candidates(study: optuna.Study, best: int = REFINE_BEST) -> list[optuna.trial.FrozenTrial]:
    """The best ``best`` completed trials with a setting the refinement can change (compile in
    a mode that the main search samples)."""
    complete = sorted(
        study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: -t.value
    )
    out = []
    for t in complete:
        if t.user_attrs.get("role") == REFINE or "plan" not in t.user_attrs:
            continue
        if _refinements(plan_of(t)):
            out.append(t)
        if len(out) == best:
            break
    return out


def predicted_refine_s(trial: optuna.trial.FrozenTrial, factor: float = REFINE_COMPILE_FACTOR) -> float | None:
    """Predicted wall time of ``trial``'s configuration in a max-autotune mode: its own
    measured wall time (start-up and compile included) times ``factor``; None: not recorded."""
    wall = trial.user_attrs.get("wall_s")
    return float(wall) * factor if wall else None


def should_refine(predicted_s: float | None, time_left_s: float | None) -> bool:
    """Launch a refinement only when its predicted time fits in what is left (no deadline:
    always; no prediction: never, a guess could spend the whole budget)."""
    if predicted_s is None:
        return False
    return time_left_s is None or time_left_s > predicted_s


def refine(study: optuna.Study, objective: Objective, deadline: float | None = None) -> list[optuna.trial.FrozenTrial]:
    """Re-run the best configurations with each refine-only choice (``Knob.refine_only``: the
    max-autotune compile modes), each only when its predicted compile time fits before
    ``deadline`` (time.monotonic()). Each run is recorded as a trial with role "refine", the
    parameters of the trial it refines (the sampler sees the same point again), the choice as
    "refine_mode" and its own plan, so :func:`summarize` picks it if it is faster. Nothing on
    a CPU (the planner refines GPU searches only)."""
    added = []
    done = {
        (t.user_attrs.get("refines"), t.user_attrs.get("refine_mode"))
        for t in study.get_trials(deepcopy=False)
        if t.user_attrs.get("role") == REFINE
    }
    with trialmod.measuring(objective.space.launch.device):
        for source in refine_candidates(study):
            for name, knob, value in _refinements(plan_of(source)):
                if (source.number, value) in done:
                    continue
                left = None if deadline is None else deadline - time.monotonic()
                if not should_refine(predicted_refine_s(source), left):
                    continue
                added.append(_run_refinement(study, objective, source, (name, knob, value), left))
    return added


REMEASURE = "remeasure"


def measure_again(
    study: optuna.Study, objective: Objective, source: optuna.trial.FrozenTrial, left: float | None
) -> optuna.trial.FrozenTrial:
    """Run ``source``'s plan again as a new trial of this run (role "remeasure"), so that its
    figures are measured under the same load as the others this run compares."""
    return _run_refinement(study, objective, source, None, left)


def _run_refinement(
    study: optuna.Study,
    objective: Objective,
    source: optuna.trial.FrozenTrial,
    choice: tuple[str, str, Any] | None,
    left: float | None,
) -> optuna.trial.FrozenTrial:
    """``source``'s plan with ``choice`` (strategy, knob, value) set, run as a new trial; None:
    unchanged (:func:`measure_again`)."""
    plan = plan_of(source)
    if choice is not None:
        name, knob, mode = choice
        plan = dataclasses.replace(
            plan,
            strategies=[
                dataclasses.replace(s, knobs={**s.knobs, knob: mode}) if s.name == name else s for s in plan.strategies
            ],
        )
    budget = trial_budget(objective.budget, plan)
    if left is not None:
        budget = dataclasses.replace(budget, timeout_s=max(MIN_TRIAL_S, min(budget.timeout_s, left)))
    number = len(study.trials)
    role = REFINE if choice is not None else REMEASURE
    log_path = Path(objective.log_dir) / f"{role}-{number}.log" if objective.log_dir is not None else None
    result = run_trial(plan, budget, log_path=log_path)
    f = result.figures
    how = {"refines": source.number, "refine_mode": choice[2]} if choice is not None else {"remeasures": source.number}
    attrs = {
        "role": role,
        **how,
        "plan": plan.to_dict(),
        "status": f.status,
        "figures": dataclasses.asdict(f),
        "wall_s": result.wall_s,
        "launched": True,
        "run": objective.run,
    }
    attrs |= {p: getattr(result, p) for p in ("startup_s", "warmup_s", "timed_s") if getattr(result, p) is not None}
    attrs |= {"log": str(log_path)} if log_path else {}
    attrs |= {"error": result.error} if result.error else {}
    ok = f.status == "ok"
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL,
            value=float(f.tokens_per_s) if ok else None,
            params=source.params,
            distributions=source.distributions,
            user_attrs=attrs,
        )
    )
    frozen = study.trials[-1]
    if objective.on_result:
        objective.on_result(frozen, plan, result, f.status)
    return frozen
