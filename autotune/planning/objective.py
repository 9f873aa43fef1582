"""The objective: one trial, from its parameters to tokens/s, and the pruner.

Every trial is checked on the CPU first (the graph's legality, then the cost model's memory
prediction) and only then run for real, in its own process (``autotune.runtime.trial``). A running
trial slower than half the best is stopped (:class:`ThroughputPruner`).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from autotune import validate
from autotune.contract.strategy import Knob
from autotune.errors import UserError
from autotune.plan import Plan
from autotune.planning.space import MEMORY_HEADROOM, SearchSpace, predict, suggest_plan
from autotune.planning.summary import measured_before, memory_correction, shortest_like
from autotune.runtime import trial as trialmod
from autotune.runtime.trial import TrialBudget, TrialResult, run_trial

# No trial is pruned on its predicted step time: a wrong prune removes a configuration for
# good (the sampler rarely draws the same one again), while a slow trial costs its warm-up and
# 3 timed steps before the ThroughputPruner stops it on measured tokens/s. The step-time model
# is within 12% on the 45 trials measured on an H200 (the built-in GPT's and one Hugging Face
# Llama's: bench/costmodel_check.py); another family or GPU can be further off, and the best
# configuration is often within 25% of the runners-up.
MIN_TRIAL_S = 10.0
"""The shortest limit a trial is started with when the time budget is nearly spent."""
AUTOTUNE_TIME_FACTOR = 3.0
"""A trial with a refine-only choice (``Knob.refine_only``: compile modes that benchmark
kernels, max-autotune) gets this many times the trial's time limit: their first compilation
of a shape takes minutes, later ones hit the cache."""
RUN_ID = f"{socket.gethostname()}:{os.getpid()}:{time.time():.0f}"
"""The default planner run (:attr:`Objective.run`), recorded on each trial it measured."""
PLANNER_ID = f"{socket.gethostname()}:{os.getpid()}"
"""Who ran a trial (host:pid), recorded on it: the machines sharing a study tell their trials apart."""


def trial_budget(budget: TrialBudget, plan: Plan) -> TrialBudget:
    """The trial's budget, with a longer limit for a refine-only choice (compile modes that
    benchmark kernels)."""
    if any(_refine_only_values(name, cfg) for name, cfg in plan.strategy_configs().items()):
        return dataclasses.replace(budget, timeout_s=budget.timeout_s * AUTOTUNE_TIME_FACTOR)
    return budget


class TrialFailed(Exception):
    """A trial ran and failed (nan, timeout, crash): Optuna records it as FAIL."""


@dataclass(kw_only=True, slots=True)
class Objective:
    """Optuna objective: plan → checks → one isolated trial → tokens/s (maximised)."""

    space: SearchSpace
    budget: TrialBudget
    on_result: Callable[[optuna.Trial, Plan, TrialResult | None, str], None] | None = None
    """Called after each trial (for the live table)."""
    deadline: float | None = None
    """time.monotonic() at which the search's time budget ends: a trial gets at most the time
    left (and is recorded as a timeout if it needs more), so the budget bounds the search."""
    log_dir: Path | None = None
    """Each trial's stdout and stderr are kept in ``<log_dir>/<number>.log`` (user attr "log");
    None: not kept (see :func:`trial_log_dir`)."""
    run: str = RUN_ID
    """The planner run measuring, recorded on each trial as "run" (:func:`stale`)."""

    def __call__(self, trial: optuna.Trial) -> float:
        # A retried trial inherits the interrupted one's attributes: it is not launched yet.
        trial.set_user_attr("launched", False)
        try:
            plan = suggest_plan(trial, self.space)
            plan.strategy_configs()  # knobs that cannot go together (zero offload_params below stage 3)
        except UserError as e:  # the micro-batch does not split the global batch over dp, or such knobs
            trial.set_user_attr("status", "pruned")
            trial.set_user_attr("error", f"illegal: {e}")
            raise optuna.TrialPruned(f"illegal: {e}") from None
        trial.set_user_attr("plan", plan.to_dict())
        if (
            trial.user_attrs.get("role") is None
            and (twin := measured_before(trial.study, plan, trial.number)) is not None
        ):
            self._prune(trial, plan, f"the same configuration as trial {twin}, measured once")
        try:
            validate.plan(plan, machine=False, workload=self.space.workload, graph=self.space.graph)
        except UserError as e:
            self._prune(trial, plan, f"illegal: {e}")
        # Device memory only: on a CPU the measured peak is the whole process's resident set.
        estimate = predict(self.space, plan) if self.space.device_memory else None
        if estimate is not None:
            trial.set_user_attr("predicted_peak_memory_bytes", estimate.peak_memory_bytes)
            if estimate.step_time_s is not None:
                trial.set_user_attr("predicted_step_time_s", estimate.step_time_s)  # reported, never pruned on
            limit = self.space.device_memory
            if limit:
                self._prune_on_memory(trial, plan, estimate.peak_memory_bytes, limit)
        budget = trial_budget(self.budget, plan)
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if (shortest := shortest_like(trial.study, plan)) is not None and shortest[1] > left:
                self._prune(
                    trial,
                    plan,
                    f"cannot finish: trial {shortest[0]}, which compiles as it does, "
                    f"took {shortest[1]:.0f} s; {left:.0f} s left",
                )
            budget = dataclasses.replace(budget, timeout_s=max(MIN_TRIAL_S, min(budget.timeout_s, left)))
        log_path = None
        if self.log_dir is not None:
            log_path = Path(self.log_dir) / f"{trial.number}.log"
            trial.set_user_attr("log", str(log_path))
        trial.set_user_attr("launched", True)
        trial.set_user_attr("planner", PLANNER_ID)
        trial.set_user_attr("run", self.run)  # at launch: a running trial shows its run is alive
        reporter = _Reporter(trial)
        result = run_trial(plan, budget, log_path=log_path, on_progress=reporter)
        if result.figures.status == "pruned":
            result.error = reporter.reason or result.error
        f = result.figures
        trial.set_user_attr("status", f.status)
        trial.set_user_attr("figures", dataclasses.asdict(f))
        trial.set_user_attr("wall_s", result.wall_s)
        for phase in ("startup_s", "warmup_s", "timed_s"):  # the per-trial overhead, measured
            if getattr(result, phase) is not None:
                trial.set_user_attr(phase, getattr(result, phase))
        if result.error:
            trial.set_user_attr("error", result.error)
        if self.on_result:
            self.on_result(trial, plan, result, f.status)
        if f.status == "ok":
            return float(f.tokens_per_s)
        if f.status in ("oom", "unsupported", "pruned"):
            raise optuna.TrialPruned(f"{f.status}: {result.error}")
        raise TrialFailed(f"{f.status}: {result.error}")

    def _prune_on_memory(self, trial: optuna.Trial, plan: Plan, predicted: float, limit: float) -> None:
        """Prune a trial whose predicted peak, corrected by what this study measured
        (:func:`memory_correction`), is over MEMORY_HEADROOM of the device's memory; the
        reason says the correction and what it was learned from."""
        correction, seen = memory_correction(trial.study)
        trial.set_user_attr("memory_correction", correction)
        if predicted * correction <= MEMORY_HEADROOM * limit:
            return
        learned = (
            f"x {correction:.2f}, the least measured/predicted peak of {seen} trials"
            if seen
            else "no trial measured yet"
        )
        self._prune(
            trial,
            plan,
            f"predicted {predicted * correction / 2**30:.1f} GiB ({predicted / 2**30:.1f} GiB {learned}) "
            f"> {MEMORY_HEADROOM:.0%} of {limit / 2**30:.1f} GiB",
        )

    def _prune(self, trial: optuna.Trial, plan: Plan, reason: str) -> None:
        trial.set_user_attr("status", "pruned")
        trial.set_user_attr("error", reason)
        if self.on_result:
            self.on_result(trial, plan, None, "pruned")
        raise optuna.TrialPruned(reason)


class _Reporter:
    """The trial's ``on_progress``: reports each timed step's tokens/s to Optuna and asks the
    study's pruner whether to stop."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial, self.values, self.reason = trial, [], None

    def __call__(self, step: int, tokens_per_s: float) -> bool:
        self.values.append(tokens_per_s)
        self.trial.report(tokens_per_s, step)
        if not self.trial.should_prune():
            return False
        best = _best_value(self.trial.study)
        self.reason = (
            f"{statistics.median(self.values):,.0f} tokens/s over "
            f"{step} timed steps, below the best so far ({best:,.0f})"
        )
        return True


class ThroughputPruner(optuna.pruners.BasePruner):
    """Prunes a running trial whose median tokens/s over at least ``min_steps`` timed steps
    is below ``fraction`` of the best completed trial. The baseline and the priors (trials
    with a "role") always run to the end: every plan needs its baseline, and priors are
    the study's reference points. The median, not the last step, so one slow step (a page
    fault, the first step after warm-up) does not prune."""

    def __init__(self, fraction: float = 0.5, min_steps: int = 3) -> None:
        self.fraction, self.min_steps = fraction, min_steps

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        values = trial.intermediate_values
        if trial.user_attrs.get("role") is not None or len(values) < self.min_steps:
            return False
        best = _best_value(study)
        return best is not None and statistics.median(values.values()) < self.fraction * best


def _best_value(study: optuna.Study) -> float | None:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return max((t.value for t in complete), default=None)


def check_legal(space: SearchSpace, plan: Plan) -> None:
    """The checks a trial passes before launch (:class:`Objective`): the graph, the settings,
    the processes (``autotune.validate.plan``) and, on a device with known memory, the predicted
    peak. UserError if not."""
    validate.plan(plan, machine=False, workload=space.workload, graph=space.graph)
    estimate = predict(space, plan) if space.device_memory else None
    if estimate is not None and estimate.peak_memory_bytes > MEMORY_HEADROOM * space.device_memory:
        raise UserError(
            f"predicted {estimate.peak_memory_bytes / 2**30:.1f} GiB "
            f"> {MEMORY_HEADROOM * space.device_memory / 2**30:.1f} GiB"
        )


PRELAUNCH_PRUNES = 4
"""Trials pruned before launch (illegal, too large, predicted slow) cost milliseconds and do
not count towards ``trials``; a search stops after this many of them per trial asked for
(plus this many), so a space where nearly everything is pruned cannot loop forever."""


class _CountTrials:
    """Stops the study after ``trials`` new launched trials (ok, failed or pruned while
    running) finished in this process, or too many pruned before launch. Trials of a dead
    planner, failed by heartbeat and retried, finish elsewhere and are not counted."""

    def __init__(self, trials: int) -> None:
        self.trials, self.launched, self.prelaunch = trials, 0, 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.user_attrs.get("launched"):
            self.launched += 1
        else:
            self.prelaunch += 1
        if self.launched >= self.trials or self.prelaunch >= PRELAUNCH_PRUNES * (self.trials + 1):
            study.stop()


def optimize(study: optuna.Study, objective: Objective, *, trials: int | None, time_budget: float | None) -> None:
    """Run ``trials`` new trials (as Optuna's n_trials, but counting only launched ones) or
    until ``time_budget`` seconds pass, holding the device lock throughout (another planner
    measuring on this device is a one-line UserError before any trial starts)."""
    callbacks = [_CountTrials(trials)] if trials is not None else []
    if trials is not None and trials < 1:
        return
    if time_budget is not None:
        objective = dataclasses.replace(objective, deadline=time.monotonic() + time_budget)
    with trialmod.measuring(objective.space.launch.device):
        study.optimize(
            objective,
            timeout=time_budget,
            callbacks=callbacks,
            catch=(TrialFailed,),
            gc_after_trial=False,
        )


def _refine_only_values(name: str, cfg: Any) -> list[tuple[Knob, Any]]:
    """(knob, value) of strategy ``name``'s refine-only knobs whose value in ``cfg`` is refine-only."""
    from autotune import catalog

    return [
        (k, getattr(cfg, k.name))
        for k in catalog.get(name).knobs
        if k.refine_only and getattr(cfg, k.name) in k.refine_only
    ]
