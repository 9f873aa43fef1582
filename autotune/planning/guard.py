"""The quality guard: an approximate best trial against the study's best exact one, on the
same batches at equal steps; it becomes the plan only when it learns no worse beyond the
tolerance."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from typing import Any

from autotune import catalog
from autotune.plan import Figures, LossCurve, Plan, QualityGuard
from autotune.planning.clock import Clock, Status, limited, no_status, trial_wall
from autotune.planning.settings import NoTrialSucceeded, PlanSettings
from autotune.planning.summary import Summary, figures_of, plan_of
from autotune.runtime.trial import TrialBudget, run_trial

GUARD_WARMUP = 1
"""Untimed optimizer steps before a guard run's timed ones (the first micro-batch compiles)."""
GUARD_TAIL = 0.1
"""The guard compares the mean loss over this last fraction of the steps, and smooths the
curves over as many steps (time-to-loss)."""
GUARD_FRACTIONS = (0.25, 0.5, 0.75)
"""Where a guard run's curve summary gives its smoothed loss (LossCurve.at_fractions)."""


def guard_seconds(study: Any, settings: PlanSettings) -> float:
    """The quality guard's predicted time, only while the best trial is approximate: its run and
    the best exact trial's, each the trial's wall (start-up, warm-up) and ``guard_steps`` of
    its measured optimizer-step time."""
    import optuna

    complete = [
        t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if t.value is not None
    ]
    if not complete:
        return 0.0
    best = max(complete, key=lambda t: t.value)
    if is_exact(plan_of(best)):
        return 0.0
    exact = [t for t in complete if is_exact(plan_of(t))]
    total = 0.0
    for t in [best, *([max(exact, key=lambda t: t.value)] if exact else [])]:
        f = figures_of(t)
        total += (trial_wall(t) or 0.0) + settings.guard_steps * ((f.step_time_s if f is not None else None) or 0.0)
    return total


def guarded_choice(
    study: Any,
    summary: Summary,
    settings: PlanSettings,
    name: str,
    *,
    clock: Clock | None = None,
    status: Status = no_status,
    log: Callable[[str], None] = print,
) -> tuple[Any, QualityGuard | None]:
    """The trial to confirm, and its quality guard: ``summary.best`` when it is exact or passes
    the guard against the best exact trial; else that exact trial, the failure recorded in the
    study (``quality_guard_failed_<trial>``: the reason, the trial's figures, the guard) and the
    log, so that an approximate plan that learns worse never becomes the plan (nor is confirmed)."""
    chosen = summary.best
    if is_exact(plan_of(chosen)):
        return chosen, None
    exact = [t for t in summary.complete if is_exact(plan_of(t))]
    if not exact:
        raise NoTrialSucceeded(
            f"no exact trial of study {name} succeeded: "
            f"the quality guard has nothing to compare trial {chosen.number} with"
        )
    reference = max(exact, key=lambda t: t.value)
    log(
        f"quality guard: trial {chosen.number} against the best exact "
        f"trial {reference.number}, {settings.guard_steps} steps each"
    )
    guard, why = quality_guard(
        plan_of(chosen), plan_of(reference), reference.number, settings, clock=clock, status=status
    )
    if guard is not None and guard.passed:
        log(f"quality guard: trial {chosen.number} passed: {_guard_line(guard)}")
        return chosen, guard
    if guard is not None:
        why = f"{_guard_line(guard)}, beyond the tolerance {guard.tolerance:g}"
    figures = figures_of(chosen)
    study.set_user_attr(
        f"quality_guard_failed_{chosen.number}",
        {
            "why": why,
            "figures": None if figures is None else dataclasses.asdict(figures),
            "quality_guard": None if guard is None else dataclasses.asdict(guard),
        },
    )
    log(
        f"quality guard: trial {chosen.number} failed ({why}); "
        f"confirming the best exact trial {reference.number} instead"
    )
    return reference, None


def quality_guard(
    candidate: Plan,
    exact: Plan,
    reference_trial: int,
    settings: PlanSettings,
    *,
    clock: Clock | None = None,
    status: Status = no_status,
) -> tuple[QualityGuard | None, str | None]:
    """Run ``candidate`` (approximate) and ``exact`` for ``settings.guard_steps`` timed optimizer
    steps each after GUARD_WARMUP, on the same batches, and compare their curves
    (:func:`guard_of`). None and the reason when either run did not end ok."""
    clock = clock or Clock()
    runs = []
    for what, plan in (("the plan", candidate), (f"the exact trial {reference_trial}", exact)):
        status(f"quality guard: {what}, {settings.guard_steps} steps")
        result = run_trial(plan, limited(guard_budget(settings, plan), clock))
        if result.figures.status != "ok":
            status(None)
            return None, f"the guard's run of {what} ended {result.figures.status}" + (
                f": {result.error}" if result.error else ""
            )
        runs.append(result.figures)
    status(None)
    return guard_of(runs[0], runs[1], reference_trial, settings.quality_tolerance), None


def guard_budget(settings: PlanSettings, plan: Plan) -> TrialBudget:
    """A guard run: GUARD_WARMUP then ``guard_steps`` optimizer steps (budgets count micro-batches),
    its time limit the trial's, scaled by how many more micro-batches it trains."""
    accum, b = plan.grad_accum(), settings.budget
    micro = (GUARD_WARMUP + settings.guard_steps) * accum
    return TrialBudget(
        warmup_steps=GUARD_WARMUP * accum,
        timed_steps=settings.guard_steps * accum,
        timeout_s=b.timeout_s * max(1.0, micro / (b.warmup_steps + b.timed_steps)),
    )


def guard_of(candidate: Figures, exact: Figures, reference_trial: int, tolerance: float) -> QualityGuard:
    """The two guard runs compared over the steps both trained: the means of their last
    GUARD_TAIL of losses, and the time each took to bring its smoothed loss (trailing mean over
    as many steps) down to the exact run's final one."""
    ours, theirs = candidate.losses or [candidate.loss_end], exact.losses or [exact.loss_end]
    steps = min(len(ours), len(theirs))
    window = max(1, round(GUARD_TAIL * steps))
    target = statistics.fmean(theirs[steps - window : steps])
    a, b = loss_curve(candidate, steps, window, target), loss_curve(exact, steps, window, target)
    return QualityGuard(
        reference_trial=reference_trial,
        steps=steps,
        candidate=a,
        exact=b,
        target_loss=target,
        tolerance=tolerance,
        passed=a.tail_mean / b.tail_mean - 1.0 <= tolerance,
        time_to_loss_ratio=b.time_to_loss_s / a.time_to_loss_s
        if a.time_to_loss_s and b.time_to_loss_s is not None
        else None,
    )


def loss_curve(run: Figures, steps: int, window: int, target: float) -> LossCurve:
    """``run``'s first ``steps`` losses summarised; time-to-loss counts its timed steps only
    (its ``step_times``, the last of its losses)."""
    losses = (run.losses or [run.loss_end])[:steps]
    times = run.step_times or []
    warmup = len(run.losses or [run.loss_end]) - len(times)
    smoothed = [statistics.fmean(losses[max(0, i + 1 - window) : i + 1]) for i in range(steps)]
    elapsed, reached = 0.0, None
    for i in range(warmup, steps):
        elapsed += times[i - warmup]
        if smoothed[i] <= target:
            reached = elapsed
            break
    return LossCurve(
        start=losses[0],
        end=losses[-1],
        tail_mean=smoothed[-1],
        at_fractions=[smoothed[min(steps - 1, int(f * steps))] for f in GUARD_FRACTIONS],
        wall_s=sum(times[: max(0, steps - warmup)]),
        time_to_loss_s=reached,
    )


def _guard_line(g: QualityGuard) -> str:
    ratio = (
        f"{g.time_to_loss_ratio:.2f}x the exact run's speed to its loss"
        if g.time_to_loss_ratio
        else "never reached the exact run's loss"
    )
    return (
        f"loss {g.candidate.tail_mean:.4f} against the exact "
        f"{g.exact.tail_mean:.4f} over the last 10% of {g.steps} steps, {ratio}"
    )


def is_exact(plan: Plan) -> bool:
    """Every strategy of ``plan`` learns what the plain model learns (none is approximate)."""
    return all(catalog.get(s.name).exact for s in plan.strategies)
