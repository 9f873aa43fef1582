"""`autotune plan`, the driver: profile + workload → graph → search → confirmation → plan file."""

from __future__ import annotations

import dataclasses
import datetime
import math
import shlex
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autotune import devices
from autotune import plan as planmod
from autotune.errors import UserError
from autotune.plan import Plan
from autotune.planning.clock import (
    Clock,
    Status,
    finish_margin,
    minimum_budget,
    no_status,
    rounds_of,
    trial_wall,
)
from autotune.planning.confirm import baseline_instead, confirm, confirmation_seconds
from autotune.planning.first_trials import ensure_first_trials, expert_priors, warm_starts
from autotune.planning.guard import guard_seconds, guarded_choice
from autotune.planning.objective import AUTOTUNE_TIME_FACTOR, MIN_TRIAL_S, PLANNER_ID, Objective, optimize
from autotune.planning.refine import measure_again, refine
from autotune.planning.settings import NoTrialSucceeded, PlanSettings, load_profile
from autotune.planning.space import SearchSpace, build_space, categorical_choices, searched_on
from autotune.planning.study import (
    open_study,
    stale,
    stale_runs,
    study_identity,
    study_name,
    trial_log_dir,
    wait_for_others,
)
from autotune.planning.summary import BASELINE, Summary, figures_of, plan_of, summarize
from autotune.runtime import trial as trialmod
from autotune.schema import check_writable
from autotune.workloads import load_workload


def make_plan(
    settings: PlanSettings,
    *,
    on_result: Callable | None = None,
    log: Callable[[str], None] = print,
    status: Status = no_status,
) -> tuple[Plan, Summary, SearchSpace]:
    """Search, confirm and write the plan; ``settings.time_budget`` bounds all of it (within
    :func:`~autotune.planning.clock.budget_margin`), the confirmation's time reserved from the
    trials' measured walls."""
    began = time.monotonic() if settings.started_at is None else settings.started_at
    clock = Clock(
        deadline=None
        if settings.time_budget is None
        else began + settings.time_budget - finish_margin(settings.time_budget)
    )
    # 1. Where it writes, checked before anything runs.
    storage = settings.storage or "sqlite:///plans/studies.db"
    if settings.out is not None:
        check_writable(settings.out, "--out")
    if storage.startswith("sqlite:///"):
        check_writable(Path(storage.removeprefix("sqlite:///")), "--storage")
    # 2. The workload, this machine's profile, the space legal here, and whether the budget holds a plan.
    workload = load_workload(settings.workload, settings.workload_overrides)
    profile = load_profile(settings)
    space, graph = build_space(settings, profile, workload)
    if settings.time_budget is not None:
        least = minimum_budget(space, settings)
        if settings.time_budget < least:
            raise UserError(
                f"--time-budget {settings.time_budget:g}: too small for {settings.workload} here; a baseline trial, "
                f"one candidate and {rounds_of(settings)} confirmation rounds need at least {math.ceil(least)} s"
            )
    # 3. The warm starts, read before the study is opened (a source that cannot be read writes
    # nothing; enqueued only into a new study, ensure_first_trials), and the corpus.
    warm = warm_starts(space, settings.warm_start, log)
    if not space.train.random_tokens:
        from autotune import data

        data.default_dataset(workload.vocab_size)  # build once here, not in every trial
    # 4. The study: named from the workload, the recipe and the machine; its first trials enqueued.
    recipe = None if settings.global_batch == workload.global_batch else settings.global_batch
    name = settings.study_name or study_name(
        settings.workload, profile.fingerprint, recipe, settings.workload_overrides
    )
    out = settings.out or Path("plans") / f"{name}.plan.json"
    check_writable(out, "plan file")
    if storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    identity = study_identity(settings.budget, space.global_batch)
    study = open_study(
        name, storage, settings.sampler, settings.seed, identity=identity, choices=categorical_choices(space)
    )
    ensure_first_trials(study, space, expert_priors(space), warm)
    # 5. Search, choose, guard, confirm, write: measuring on this machine's device throughout.
    with trialmod.measuring(space.launch.device):  # this machine's device, for the whole command
        return _search_and_confirm(settings, study, space, name, storage, out, profile, clock, on_result, status, log)


def _search_and_confirm(
    settings: PlanSettings,
    study: Any,
    space: SearchSpace,
    name: str,
    storage: str,
    out: Path,
    profile: Any,
    clock: Clock,
    on_result: Callable | None,
    status: Status,
    log: Callable[[str], None],
) -> tuple[Plan, Summary, SearchSpace]:
    since = datetime.datetime.now()  # Optuna's clock: trials completed before it are an earlier run's
    launched = 0  # trials this run has started a child for: the next one is launched + 1

    def ended(trial: Any, plan: Plan, result: Any, state: str) -> None:
        nonlocal launched
        if on_result is not None:
            on_result(trial, plan, result, state)
        launched += result is not None  # None: pruned before launch
        status(search_status(launched + 1, settings.trials))

    if settings.allow_approximate and space.train.random_tokens:
        raise UserError(
            "--allow-approximate: the quality guard compares losses on real text, "
            "and random tokens teach nothing to compare"
        )
    objective = Objective(
        space=space,
        budget=settings.budget,
        on_result=ended,
        log_dir=trial_log_dir(storage, name),
        run=f"{PLANNER_ID}:{uuid.uuid4().hex[:8]}",
    )
    # 1. The search, stopped in time for the confirmation's reserve.
    status(search_status(1, settings.trials))
    run_search(study, objective, settings, clock)
    # 2. max-autotune on the best compiled configurations, only where its compile time fits
    # before the confirmation's reserve. On a GPU only: on a CPU inductor's max-autotune tunes
    # only its C++ GEMM templates, 4% over the default mode on the tiny GPT on 2 cores (26,429
    # against 25,398 tokens/s, within that search's ±7% noise) for two more compiled trials.
    plain_run = space.train.random_tokens
    reserve = confirmation_seconds(study, settings, plain_run=plain_run)
    if devices.get(searched_on(space)).accelerator:
        status("refinement: max-autotune")
        refine(study, objective, None if clock.deadline is None else clock.deadline - reserve)
        status(None)
    # 3. Machines sharing the study: the trials still running elsewhere finish first, so that every
    # planner summarizes the same trials and writes the same plan.
    longest = settings.budget.timeout_s * AUTOTUNE_TIME_FACTOR  # the longest a trial may run
    left = longest if clock.deadline is None else min(longest, clock.left() - reserve)
    wait_for_others(study, left, log=log)
    # 4. The summary over figures this run can compare.
    summary = _fresh(study, objective, since, clock, reserve, log, settings.exclude)
    if summary.best is None:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.counts.items()))
        why = shlex.join(["autotune", "trials", "--study", name, "--storage", storage])  # the study this run used
        raise NoTrialSucceeded(f"no trial of study {name} succeeded ({counts}); `{why}` shows why")
    baseline_plan = plan_of(summary.baseline) if summary.baseline else None
    base_figures = figures_of(summary.baseline) if summary.baseline else None
    base_step = base_figures.step_time_s if base_figures is not None and base_figures.status == "ok" else None
    # 5. The candidate: the best trial, or the best exact one where an approximate best fails the guard.
    chosen, guard = guarded_choice(study, summary, settings, name, clock=clock, status=status, log=log)
    best = plan_of(chosen)
    # 6. The confirmation against the baseline, with what is left of the reserve once the guard has run;
    # a candidate confirmed slower than the baseline gives way to it.
    seconds = confirmation_seconds(study, settings, plain_run=plain_run) - guard_seconds(study, settings)
    left = "" if clock.deadline is None else f", {max(0.0, clock.left()):.0f} s of the budget left"
    log(
        f"confirming trial {chosen.number} against the baseline (trial "
        f"{summary.baseline.number if summary.baseline else '-'}): "
        f"{rounds_of(settings)} interleaved rounds, predicted {seconds:.0f} s{left}"
    )
    done = confirm(
        best, baseline_plan, settings, clock=clock, status=status, log=log, seconds=seconds, baseline_step_s=base_step
    )
    instead = baseline_instead(best, baseline_plan, done, summary, chosen) if baseline_plan is not None else None
    if instead is not None:
        best, done, chosen = instead
        guard = None
        log(done.comparison.verdict)
    # 7. The plan written with what the confirmation measured, and where it was measured.
    from autotune.data import plan_data_identity

    plan = dataclasses.replace(
        best,
        hardware=planmod.HardwareSpec(fingerprint=profile.fingerprint, summary=profile.summary()),
        data_identity=plan_data_identity(best),  # what the figures were measured on
        measured=done.measured,
        baseline=done.baseline,
        loss_check=done.loss_check,
        comparison=done.comparison,
        quality_guard=guard,
        provenance=planmod.Provenance(
            torch_version=_torch_version(),
            study=name,
            trial=chosen.number,
            created_at=planmod.utc_now(),
            command=settings.command,
        ),
    )
    plan.save(out)
    return plan, summary, space


def run_search(study: Any, objective: Objective, settings: PlanSettings, clock: Clock) -> None:
    """The search, stopped in time for the confirmation: under a time budget, one trial at a
    time while the time left, less the confirmation's predicted time, still holds a typical
    trial (each trial's own limit is the time left, so none runs into the reserve)."""
    import optuna

    if clock.deadline is None:
        optimize(study, objective, trials=settings.trials, time_budget=None)
        return
    # --trials N is N new launched trials (optimize's count), also one at a time here.
    started = _launched(study)
    while True:
        done = _launched(study) - started
        if settings.trials is not None and done >= settings.trials:
            return
        # A trial needs about what the ones that ran to the end took (pruned ones stop early).
        # Until a configuration other than the baseline has run, the next one (the expert
        # prior) is always started when it has MIN_TRIAL_S: a slow baseline says nothing of
        # how long a compiled bf16 trial takes, and without one the plan is the baseline.
        complete = [
            t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE and trial_wall(t)
        ]
        candidates = [t for t in complete if t.user_attrs.get("role") != BASELINE]
        typical = statistics.median(trial_wall(t) for t in complete) if candidates else 0.0
        left = clock.left() - confirmation_seconds(study, settings, plain_run=objective.space.train.random_tokens)
        if left < max(MIN_TRIAL_S, typical):
            return
        finished = _finished(study)
        optimize(study, objective, trials=1, time_budget=left)
        if _finished(study) == finished:
            return


def _fresh(
    study: Any,
    objective: Objective,
    since: datetime.datetime,
    clock: Clock,
    reserve: float,
    log: Callable[[str], None],
    excluded: tuple[str, ...] = (),
) -> Summary:
    """The study's summary over figures this run can compare: its own trials and those of
    planners beside it. A resumed study's best trial from an earlier run (another load) is
    measured again first when it would be chosen and the budget holds it; without any fresh
    trial, the earlier figures are all there is, and the log says so."""
    import optuna

    earlier = stale_runs(study, objective.run, since)

    def is_stale(t: Any) -> bool:
        return stale(t, earlier)

    def outside(t: Any) -> bool:  # a trial of a strategy this search excludes: no candidate
        return any(s["name"] in excluded for s in (t.user_attrs.get("plan") or {}).get("strategies", ()))

    complete = [
        t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if not outside(t)
    ]
    old = [t for t in complete if is_stale(t)]
    if old:
        fresh = [t for t in complete if not is_stale(t)]
        top = max(old, key=lambda t: t.value)
        if not fresh or top.value > max(t.value for t in fresh):
            left = None if clock.deadline is None else clock.left() - reserve
            if left is None or left >= max(MIN_TRIAL_S, trial_wall(top) or 0.0):
                log(f"trial {top.number} was measured by an earlier planner run (another load): measuring it again")
                measure_again(study, objective, top, left)
            elif not fresh:
                log(
                    "every completed trial was measured by an earlier planner run, "
                    "under another load; none could be measured again in the budget"
                )
                return summarize(study, exclude=outside)
    return summarize(study, exclude=lambda t: is_stale(t) or outside(t))


def _finished(study: Any) -> int:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return len(study.get_trials(deepcopy=False, states=states))


def _launched(study: Any) -> int:
    """Finished trials that ran a child (not pruned before launch)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.user_attrs.get("launched"))


def search_status(k: int, trials: int | None) -> str:
    """The status line of the search's k-th trial of this run: "of n" with ``--trials n`` (a
    trial measured again after the search is past n). The time budget is the status line's own."""
    return f"search: trial {k}" + (f" of {trials}" if trials is not None and k <= trials else "") + " running"


def _torch_version() -> str:
    import torch

    return torch.__version__
