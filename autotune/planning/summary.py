"""What a study's trials say: their plans and figures, the baseline, a configuration measured
before, the cost model's errors, and the summary the report and the plan are made from."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import optuna

from autotune import plan as planmod
from autotune.plan import Figures, Plan

MEMORY_CORRECTION = (0.67, 1.5)
"""Bounds of the study's learned correction of the predicted peak (:func:`memory_correction`):
one odd trial cannot turn pruning off, nor prune everything."""
BASELINE = "baseline"


def baseline_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The completed baseline trial, else the last one (an interrupted baseline is retried
    as a new trial with the same role)."""
    found = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("role") == BASELINE]
    complete = [t for t in found if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        return complete[0]
    return found[-1] if found else None


INTERRUPTED = "its planner was killed while it ran"
"""The error shown for an :func:`interrupted` trial."""


def interrupted(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial whose planner died while it ran (failed by heartbeat, before any status)."""
    return trial.state == optuna.trial.TrialState.FAIL and "status" not in trial.user_attrs


def figures_of(trial: optuna.trial.FrozenTrial) -> Figures | None:
    data = trial.user_attrs.get("figures")
    return Figures(**data) if data else None


def plan_of(trial: optuna.trial.FrozenTrial) -> Plan:
    return planmod.from_dict(trial.user_attrs["plan"])


def configuration(plan: dict[str, Any]) -> str:
    """What a trial measures of ``plan`` (a plan's dict): its model, its strategies with their
    settings, its training settings and its processes; not where or when it was made."""
    return json.dumps({k: plan.get(k) for k in ("workload", "strategies", "train", "launch")}, sort_keys=True)


def compiles(names: Iterable[str]) -> bool:
    """Whether a trial of the strategies ``names`` compiles (any of them declares
    ``Strategy.compiles``); a name the catalog no longer knows (a study's older trial) does not."""
    from autotune.catalog import catalog

    strategies = catalog()
    return any(strategies[name].compiles for name in names if name in strategies)


def shortest_like(study: optuna.Study, plan: Plan) -> tuple[int, float] | None:
    """The study's completed trial that compiles as ``plan`` does (or, like it, does not) with
    the shortest wall time, as (number, seconds); None before one has completed. Compilation
    decides a trial's time (a Mistral-style model on one H100: 66 s compiled, 21-23 s not; a
    compiled trial launched with 47 s left timed out, bench/results/issue26-h100-420s), and the
    shortest is what a trial of ``plan`` needs at the least: a shape compiled before comes from
    the cache."""
    compiled = compiles(s.name for s in plan.strategies)
    like = [
        (t.number, float(t.user_attrs["wall_s"]))
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.user_attrs.get("wall_s")
        and "plan" in t.user_attrs
        and compiles(s["name"] for s in t.user_attrs["plan"].get("strategies", ())) == compiled
    ]
    return min(like, key=lambda x: x[1]) if like else None


def measured_before(study: optuna.Study, plan: Plan, number: int) -> int | None:
    """The first trial before ``number`` launched with ``plan``'s configuration (finished or
    still running), if any. The sampler may propose a point twice, or two points that make the
    same plan (knobs of a strategy it turned off, say): running it again would spend a trial's
    time on figures the study has."""
    wanted = configuration(plan.to_dict())
    for t in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
    ):
        if (
            t.number < number
            and t.user_attrs.get("launched")
            and configuration(t.user_attrs.get("plan") or {}) == wanted
        ):
            return t.number
    return None


def cost_model_errors(
    study: optuna.Study, predicted_key: str = "predicted_peak_memory_bytes", measured_key: str = "peak_memory_bytes"
) -> list[float]:
    """Relative error (predicted / measured - 1) of a cost-model prediction, over the trials
    that ran: peak memory by default, step time with the ``*step_time_s`` keys. A trial the
    ThroughputPruner stopped counts where it measured the figure."""
    errors = []
    for t in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ):
        predicted = t.user_attrs.get(predicted_key)
        measured = (t.user_attrs.get("figures") or {}).get(measured_key)
        if predicted and measured:
            errors.append(predicted / measured - 1.0)
    return errors


def memory_correction(study: optuna.Study) -> tuple[float, int]:
    """(factor, trials it was learned from): what the pruning multiplies a predicted peak by.
    The smallest measured / predicted peak over the study's trials that ran (1 before any),
    within MEMORY_CORRECTION: a model that underestimated every trial by 15% has its
    predictions raised by 15%; one that overestimated any trial gets that much more room. The
    smallest, not the median: a prune must never remove a configuration that fits (the best
    is often the largest micro-batch that does), while a launch that runs out of memory costs
    one failed step."""
    ratios = [1.0 / (1.0 + e) for e in cost_model_errors(study)]
    if not ratios:
        return 1.0, 0
    low, high = MEMORY_CORRECTION
    return min(max(min(ratios), low), high), len(ratios)


@dataclass(kw_only=True, slots=True)
class Summary:
    """What the study found, for the report and the plan."""

    best: optuna.trial.FrozenTrial | None
    baseline: optuna.trial.FrozenTrial | None
    complete: list[optuna.trial.FrozenTrial] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    memory_errors: list[float] = field(default_factory=list)
    """Predicted / measured peak memory - 1, per trial that ran."""
    time_errors: list[float] = field(default_factory=list)
    """Predicted / measured step time - 1, per trial that ran."""

    def speedup(self) -> float | None:
        if not (self.best and self.baseline and self.baseline.value):
            return None
        return self.best.value / self.baseline.value


def summarize(study: optuna.Study, *, exclude: Callable[[optuna.trial.FrozenTrial], bool] | None = None) -> Summary:
    """The study's counts, its best completed trial and its baseline; ``exclude``: completed
    trials whose figures are not compared (measured by an earlier planner run, :func:`stale`)."""
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        status = "interrupted" if interrupted(t) else t.user_attrs.get("status", t.state.name.lower())
        counts[status] = counts.get(status, 0) + 1
    best = None
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    complete = [t for t in complete if exclude is None or not exclude(t)]
    if complete:
        best = max(complete, key=lambda t: t.value)
    return Summary(
        best=best,
        baseline=baseline_trial(study),
        complete=complete,
        counts=counts,
        memory_errors=cost_model_errors(study),
        time_errors=cost_model_errors(study, "predicted_step_time_s", "step_time_s"),
    )
