"""The confirmation: the chosen plan and the baseline run interleaved under the same load,
their medians compared against the noise, the plan's loss checked against the plain model's;
and the time it is predicted to take, reserved from the search."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autotune import plan as planmod
from autotune.limits import usable_cores
from autotune.plan import Comparison, Figures, LossCheck, Plan, StrategySpec
from autotune.planning.clock import (
    MIN_ROUNDS,
    Clock,
    Status,
    length_scale,
    limited,
    no_status,
    phases,
    rounds_of,
    run_seconds,
    trial_wall,
)
from autotune.planning.guard import guard_seconds, is_exact
from autotune.planning.settings import QUALITY_TOLERANCE, PlanSettings
from autotune.planning.summary import Summary, baseline_trial, compiles, configuration, plan_of
from autotune.runtime.trial import TrialBudget, optimizer_steps, run_trial

EXACT_LOSS_TOLERANCE = 0.02  # bf16 against fp32 over a short run: rounding, not learning


MIN_NOISE = 0.02
"""A speed-up is claimed only beyond the measured spread and never below this share: two runs
of one configuration, back to back on the 2-core CPU, differ by about that much."""


def confirmation_seconds(study: Any, settings: PlanSettings, *, plain_run: bool = False) -> float:
    """The time the confirmation of the study's best trial so far is predicted to take, from
    that trial's own phases and the baseline's: rounds x (the candidate's run, its compilation
    cached + the baseline's run, timed about as long as the candidate's). A best trial that is
    the baseline confirms against itself: one run a round. ``plain_run`` (random tokens:
    batches differ with the split) adds a plain run on the plan's batches, as long as the
    candidate's once per data-parallel process."""
    import optuna

    complete = [
        t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if trial_wall(t)
    ]
    if not complete:
        return 0.0
    best = max(complete, key=lambda t: t.value)
    base = baseline_trial(study)
    base = base if base is not None and base.state == optuna.trial.TrialState.COMPLETE and trial_wall(base) else None
    compiled = compiles(spec.name for spec in plan_of(best).strategies)
    plan_run = run_seconds(best, cached=compiled)
    if base is None or base.number == best.number:
        per_round = plan_run
    else:
        timed = phases(best)
        per_round = plan_run + run_seconds(
            base, timed_s=None if timed is None else min(timed[2], (phases(base) or timed)[2])
        )
    scale = length_scale(settings)
    processes = max(1, settings.cpu_procs or 1)
    return scale * (rounds_of(settings) * per_round + (processes * plan_run if plain_run else 0.0)) + guard_seconds(
        study, settings
    )


def same_run(a: Plan, b: Plan) -> bool:
    """Whether two plans train the same way (what a trial's plan holds)."""
    return configuration(a.to_dict()) == configuration(b.to_dict())


@dataclass(kw_only=True, slots=True)
class Confirmed:
    """What the confirmation measured."""

    measured: Figures
    """The plan: the median run, with every run's tokens/s and their spread."""
    baseline: Figures | None
    """The baseline, the same way."""
    comparison: Comparison | None
    """The ratio of the medians against the noise; None when either side failed."""
    loss_check: LossCheck | None
    """The plan's loss against a plain run on its batches."""


def confirm(
    plan: Plan,
    baseline: Plan | None,
    settings: PlanSettings,
    *,
    clock: Clock | None = None,
    status: Status = no_status,
    log: Callable[[str], None] = print,
    seconds: float | None = None,
    baseline_step_s: float | None = None,
) -> Confirmed:
    """Run the plan and the baseline interleaved (plan, baseline, plan, baseline, ...), so that
    both see the same load, at least MIN_ROUNDS rounds. ``seconds``: the predicted time at
    full length; when the clock has less left, each run times fewer steps (never fewer
    rounds).

    The baseline times about as long as the plan does (:func:`baseline_budget`; its step time
    from ``baseline_step_s``, the search's figure, then from its own rounds), not as many
    steps: a baseline ten times slower would otherwise take most of the budget to say what
    one of its steps says. The baseline is the plain model on the plan's batches (the loader
    does not depend on how the global batch is split), so its rounds are the loss reference
    too; only where they cannot be (random tokens) does a plain run follow."""
    clock = clock or Clock()
    rounds = rounds_of(settings)
    same = baseline is None or same_run(plan, baseline)
    target = settings.budget.target_s
    budget = dataclasses.replace(
        settings.budget,
        timed_steps=settings.budget.timed_steps * settings.confirm_factor,
        timeout_s=settings.budget.timeout_s * settings.confirm_factor,
        target_s=None if target is None else target * settings.confirm_factor,
    )
    left = clock.left()
    if seconds and left < seconds:
        share = max(left, 0.0) / seconds
        budget = dataclasses.replace(
            budget,
            timed_steps=max(1, int(budget.timed_steps * share)),
            target_s=None if budget.target_s is None else budget.target_s * share,
        )
    load = [_load()]
    plan_runs: list[Figures] = []
    base_runs: list[Figures] = []
    k = 0
    while True:
        k += 1
        began = time.monotonic()
        status(f"confirmation round {k} of {rounds}: the plan")
        plan_runs.append(run_trial(plan, limited(budget, clock)).figures)
        if not same:
            assert baseline is not None
            status(f"confirmation round {k} of {rounds}: the baseline")
            base_budget = baseline_budget(budget, plan, baseline, plan_runs[-1], baseline_step_s)
            base_runs.append(run_trial(baseline, limited(base_budget, clock)).figures)
            if base_runs[-1].status == "ok":
                baseline_step_s = base_runs[-1].step_time_s
        log(
            f"confirmation round {k} of {rounds}: plan {_tps(plan_runs[-1])}"
            + ("" if same else f", baseline {_tps(base_runs[-1])}")
        )
        if k < rounds:
            continue
        # A spread beyond BUSY_SPREAD is a machine busy with something else: measure again
        # (up to EXTRA_ROUNDS more rounds, while the budget holds one), then say so.
        spread = _worst_spread(plan_runs, base_runs)
        if spread <= BUSY_SPREAD or k >= rounds_of(settings) + EXTRA_ROUNDS or clock.left() < time.monotonic() - began:
            break
        log(f"confirmation: a spread of ±{spread:.0%} (above ±{BUSY_SPREAD:.0%}): another round")
        rounds += 1
    load.append(_load())
    measured = median_figures(plan_runs)
    base = None if baseline is None else measured if same else median_figures(base_runs)
    reference = base if baseline is not None and not same and is_reference(plan, baseline) else None
    if reference is None:
        status("loss check: a plain run on the plan's batches")
    loss_check = _loss_check(plan, measured, limited(budget, clock), settings.quality_tolerance, reference=reference)
    status(None)
    comparison = compare(measured, base, rounds, same, busy=_worst_spread(plan_runs, base_runs) > BUSY_SPREAD)
    if comparison is not None:
        comparison = dataclasses.replace(
            comparison, load=[round(x, 2) for x in load if x is not None] or None, cores=usable_cores()
        )
    return Confirmed(measured=measured, baseline=base, comparison=comparison, loss_check=loss_check)


BUSY_SPREAD = 0.25
"""A confirmation whose plan or baseline runs spread wider than this (half-range over the
median) measured the machine's other work, not the plan: it runs extra rounds, then says the
machine was too busy. Two runs of one configuration on an idle 2-core CPU spread up to about
±12%; on a busy one we saw ±607%."""
EXTRA_ROUNDS = 2
"""Rounds a too-wide confirmation runs beyond its own, time allowing."""


def _worst_spread(*runs: list[Figures]) -> float:
    """The larger spread (:func:`median_figures`) of the lists' ok runs (0 when under two)."""
    return max([median_figures(group).spread or 0.0 for group in runs if group] or [0.0])


def _load() -> float | None:
    """The 1-minute load average, where the OS keeps one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def baseline_budget(
    budget: TrialBudget, plan: Plan, baseline: Plan, plan_run: Figures, baseline_step_s: float | None
) -> TrialBudget:
    """The baseline's run in a confirmation round: the plan's warm-up, then as many timed
    optimizer steps as take about the plan's timed time (at least one, at most the plan's
    count). Without a step time of the baseline yet, the plan's count."""
    plan_timed = optimizer_steps(budget, plan.grad_accum())[1]
    steps = plan_timed
    if plan_run.status == "ok" and plan_run.step_time_s and baseline_step_s:
        steps = min(plan_timed, max(1, math.ceil(plan_timed * plan_run.step_time_s / baseline_step_s)))
    accum = baseline.grad_accum()
    warmup = optimizer_steps(budget, plan.grad_accum())[0]
    return dataclasses.replace(budget, warmup_steps=warmup * accum, timed_steps=steps * accum)


def is_reference(plan: Plan, baseline: Plan) -> bool:
    """Whether ``baseline`` trains the plain model on ``plan``'s very batches: one process with
    no strategy but accumulation, the same workload, train settings (but the micro-batch) and
    global batch, on real text (random tokens are drawn per micro-batch)."""
    return (
        not plan.train.random_tokens
        and baseline.launch.nproc_per_node * baseline.launch.nnodes == 1
        and all(s.name == planmod.ACCUMULATION for s in baseline.strategies)
        and baseline.workload == plan.workload
        and dataclasses.replace(baseline.train, micro_batch_size=plan.train.micro_batch_size) == plan.train
        and baseline.global_batch() == plan.global_batch()
    )


def _tps(f: Figures) -> str:
    return f"{f.tokens_per_s:,.0f} tokens/s" if f.status == "ok" and f.tokens_per_s else f.status


def median_figures(runs: list[Figures]) -> Figures:
    """The run of median tokens/s (the lower of the two middle ones for an even count, so its
    other figures belong to it), with every ok run's tokens/s and their relative half-range.
    With no ok run: the first failure."""
    ok = sorted((f for f in runs if f.status == "ok" and f.tokens_per_s), key=lambda f: f.tokens_per_s)
    if not ok:
        return runs[0]
    median = ok[(len(ok) - 1) // 2]
    samples = [f.tokens_per_s for f in runs if f.status == "ok" and f.tokens_per_s]
    spread = (max(samples) - min(samples)) / 2 / median.tokens_per_s
    return dataclasses.replace(median, samples=samples, spread=spread)


def compare(
    measured: Figures, baseline: Figures | None, rounds: int, same: bool, *, busy: bool = False
) -> Comparison | None:
    """The speed-up as the ratio of medians, and whether it stands out of the noise (the two
    spreads added, at least MIN_NOISE). The plan that is the baseline itself never beats it,
    nor does any plan measured on a machine too ``busy`` to measure."""
    if baseline is None or measured.status != "ok" or baseline.status != "ok" or not baseline.tokens_per_s:
        return None
    speedup = measured.tokens_per_s / baseline.tokens_per_s
    noise = max(MIN_NOISE, (measured.spread or 0.0) + (baseline.spread or 0.0))
    beats = not same and not busy and speedup - 1.0 > noise
    medians = (
        f"plan {measured.tokens_per_s:,.0f}, baseline {baseline.tokens_per_s:,.0f} tokens/s, "
        f"medians of {rounds} interleaved rounds"
    )
    if busy:
        verdict = (
            f"the machine was too busy to measure: the runs spread ±{noise:.0%} (above ±{BUSY_SPREAD:.0%} a side), "
            f"so no speed-up is claimed: {medians}"
        )
        return Comparison(
            rounds=rounds, speedup=speedup, noise=noise, beats_baseline=False, verdict=verdict, too_busy=True
        )
    if beats:
        verdict = f"{speedup:.2f}x the baseline (±{noise:.1%}): {medians}"
    else:
        verdict = f"no configuration beat the baseline beyond noise (±{noise:.1%})" + (
            ": the best trial is the baseline itself" if same else f": {medians}"
        )
    return Comparison(rounds=rounds, speedup=speedup, noise=noise, beats_baseline=beats, verdict=verdict)


def _loss_check(
    plan: Plan,
    measured: Figures,
    budget: TrialBudget,
    quality_tolerance: float = QUALITY_TOLERANCE,
    *,
    reference: Figures | None = None,
) -> LossCheck | None:
    """The plan's loss against the plain model's on the same batches, at the last step both
    trained. ``reference``: the plain run's figures when they are at hand (the baseline's
    rounds); else one is run (on the plan's micro-batches, accumulating what its data-parallel
    processes train on)."""
    if measured.status != "ok":
        return None
    if plan.launch.nproc_per_node * plan.launch.nnodes == 1 and all(
        s.name == planmod.ACCUMULATION for s in plan.strategies
    ):
        # The plain run on the plan's batches is the plan itself: nothing to run again.
        return _compared(measured, measured, EXACT_LOSS_TOLERANCE, exact=True)
    if reference is None:
        dp = plan.global_batch() // (plan.train.micro_batch_size * plan.grad_accum())
        accum = plan.grad_accum() * dp
        plain = dataclasses.replace(
            plan,
            strategies=[StrategySpec(name=planmod.ACCUMULATION, knobs={"steps": accum})] if accum > 1 else [],
            launch=dataclasses.replace(plan.launch, nproc_per_node=1, nnodes=1),
        )
        # Budgets count each process's micro-batches: the reference runs dp times as many, so
        # that both take the same optimizer steps.
        reference = run_trial(
            plain,
            dataclasses.replace(budget, warmup_steps=budget.warmup_steps * dp, timed_steps=budget.timed_steps * dp),
        ).figures
    if reference.status != "ok":
        return None
    if is_exact(plan):
        # An exact plan matches the plain run both ways, up to rounding.
        return _compared(measured, reference, EXACT_LOSS_TOLERANCE, exact=True)
    # The quality guard: an approximate plan may learn better, never worse beyond the tolerance.
    return _compared(measured, reference, quality_tolerance, exact=False)


def _compared(run: Figures, reference: Figures, tolerance: float, *, exact: bool) -> LossCheck:
    """``run`` against ``reference`` at the last step both recorded (their last losses when
    either has no per-step list)."""
    ours, theirs = run.losses or [run.loss_end], reference.losses or [reference.loss_end]
    steps = min(len(ours), len(theirs))
    loss_end, reference_end = ours[steps - 1], theirs[steps - 1]
    diff = loss_end / reference_end - 1.0
    return LossCheck(
        steps=steps,
        loss_start=run.loss_start,
        loss_end=loss_end,
        reference_loss_start=reference.loss_start,
        reference_loss_end=reference_end,
        tolerance=tolerance,
        passed=(abs(diff) if exact else diff) <= tolerance,
    )


def baseline_instead(
    plan: Plan, baseline: Plan, done: Confirmed, summary: Summary, chosen: Any
) -> tuple[Plan, Confirmed, Any] | None:
    """The baseline as the plan when the confirmation measured the chosen trial slower than the
    baseline beyond the noise (or failed it while the baseline ran): a plan is never slower than
    what it beat. None when the chosen trial held."""
    base = done.baseline
    if base is None or base.status != "ok" or same_run(plan, baseline) or summary.baseline is None:
        return None
    m = done.measured
    if m.status == "ok" and done.comparison is not None and done.comparison.speedup >= 1.0 - done.comparison.noise:
        return None  # not slower beyond the noise: planners sharing a study must not flip on it
    how = (
        f"{done.comparison.speedup:.2f}x the baseline ({m.tokens_per_s:,.0f} against {base.tokens_per_s:,.0f} tokens/s)"
        if m.status == "ok" and done.comparison is not None
        else f"ended {m.status}"
    )
    verdict = f"trial {chosen.number} measured {how} in the confirmation: the baseline is the plan"
    c = done.comparison
    comparison = Comparison(
        rounds=c.rounds if c else MIN_ROUNDS,
        speedup=1.0,
        noise=c.noise if c else MIN_NOISE,
        beats_baseline=False,
        verdict=verdict,
        load=c.load if c else None,
        cores=c.cores if c else None,
        too_busy=c.too_busy if c else False,
    )
    check = _compared(base, base, EXACT_LOSS_TOLERANCE, exact=True)
    return baseline, Confirmed(measured=base, baseline=base, comparison=comparison, loss_check=check), summary.baseline
