"""The command's time budget: the :class:`Clock`, the margins kept back, the least budget a
plan needs, and a run's time predicted from its trial's measured phases."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autotune import devices
from autotune.planning.objective import MIN_TRIAL_S
from autotune.planning.settings import PlanSettings
from autotune.planning.space import SearchSpace, plan_for, predict, searched_on
from autotune.runtime.trial import TrialBudget, optimizer_steps, steps_for_target

MIN_ROUNDS = 3
"""Fewest rounds of the interleaved confirmation: a median and a spread need three samples."""
BUDGET_MARGIN_S = 15.0
"""``--time-budget`` bounds the whole command within max(this, 10% of the budget): the
confirmation's time is reserved from measured trial walls, which vary from run to run."""


def budget_margin(time_budget: float) -> float:
    return max(BUDGET_MARGIN_S, 0.1 * time_budget)


def finish_margin(time_budget: float) -> float:
    """Seconds of ``--time-budget`` kept back from the search and the confirmation: what
    follows them (the plan and its summary written, the interpreter's exit), and the error of
    the confirmation's predicted time (measured within 10 s on one H200)."""
    return min(0.05 * time_budget, 15.0)


@dataclass(kw_only=True, slots=True)
class Clock:
    """The command's time budget as a deadline on time.monotonic(); None: no budget."""

    deadline: float | None = None
    """When the budget ends."""

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()


Status = Callable[[str | None], None]
"""Says what runs now (a live status line), None when nothing does."""


def no_status(_: str | None) -> None:
    pass


def trial_wall(trial: Any) -> float | None:
    """Wall seconds of a trial that ran (None: pruned before launch, or still running)."""
    if "figures" not in trial.user_attrs or trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


CACHED_WARMUP = 0.5
"""A confirmation run's warm-up against its trial's: the trial compiled its shapes into the
persistent inductor cache, so the runs after it trace and load instead of compiling. A
guess until the first round has run; :func:`confirm` then predicts from what it measured."""


def phases(trial: Any) -> tuple[float, float, float] | None:
    """(start-up, warm-up, timed) seconds of a trial that ran, as its child measured them;
    None for a trial measured before autotune recorded them (its wall stands for all)."""
    a = trial.user_attrs
    if not all(isinstance(a.get(k), (int, float)) for k in ("startup_s", "warmup_s", "timed_s")):
        return None
    return float(a["startup_s"]), float(a["warmup_s"]), float(a["timed_s"])


def run_seconds(trial: Any, *, cached: bool = False, timed_s: float | None = None) -> float:
    """A run of ``trial``'s configuration, predicted from its own trial: its start-up, its
    warm-up (``cached``: its compilation in the cache, :data:`CACHED_WARMUP`) and ``timed_s``
    seconds of timed steps (default its own); the trial's wall where it recorded no phases."""
    measured = phases(trial)
    wall = trial_wall(trial) or 0.0
    if measured is None:
        return wall
    startup, warmup, timed = measured
    # What the wall holds beyond the child's phases: the parent's spawn and the child's exit.
    rest = max(0.0, wall - startup - warmup - timed)
    return rest + startup + (CACHED_WARMUP if cached else 1.0) * warmup + (timed if timed_s is None else timed_s)


def rounds_of(settings: PlanSettings) -> int:
    return max(MIN_ROUNDS, settings.confirm_rounds)


def length_scale(settings: PlanSettings) -> float:
    """How much longer a confirmation run is than a trial (start-up counted as steps: an
    overestimate, so the reserve errs on the safe side)."""
    b = settings.budget
    return (b.warmup_steps + settings.confirm_factor * b.timed_steps) / (b.warmup_steps + b.timed_steps)


def limited(budget: TrialBudget, clock: Clock) -> TrialBudget:
    """A run's limit: the trial's, and no later than the budget's end plus its margin."""
    if clock.deadline is None:
        return budget
    return dataclasses.replace(budget, timeout_s=max(MIN_TRIAL_S, min(budget.timeout_s, clock.left() + MIN_TRIAL_S)))


def minimum_budget(space: SearchSpace, settings: PlanSettings) -> float:
    """The least ``--time-budget`` that holds the baseline trial, one candidate (the expert
    prior) and the confirmation of that candidate against the baseline, MIN_ROUNDS rounds of
    each: a lower bound, from the device's startup floor a run, its compile floor for the
    candidate and the cost model's step time of the baseline where it has one (on a GPU with a
    measured or datasheet rate), each run timing at least one optimizer step. With ``--trials
    1`` only the baseline and its own rounds."""
    device = searched_on(space)
    baseline = plan_for(space, space.baseline_micro_batch, [])
    estimate = predict(space, baseline)
    step = estimate.step_time_s if estimate is not None and estimate.step_time_s else 0.0
    warmup, timed = optimizer_steps(settings.budget, baseline.grad_accum())
    if settings.budget.target_s is not None and step:
        timed = steps_for_target(settings.budget.target_s, step, timed)
    kind = devices.get(device)
    base_run = kind.startup_floor_s + (warmup + timed) * step
    rounds = rounds_of(settings)
    if settings.trials == 1:
        need = base_run * (1 + rounds)
    else:
        # Faster than the baseline: at most its one step, after its compilation (cached in the
        # confirmation's runs).
        candidate = kind.startup_floor_s + kind.compile_floor_s + step
        again = kind.startup_floor_s + CACHED_WARMUP * kind.compile_floor_s + step
        need = base_run + candidate + rounds * (again + base_run)
    return need + finish_margin(need)
