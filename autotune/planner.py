"""`autotune plan`, the driver: profile + workload → graph → search → confirmation → plan file."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import shlex
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune import apply, catalog, devices, search
from autotune import plan as planmod
from autotune.errors import UserError
from autotune.graph import StrategyGraph
from autotune.limits import usable_cores
from autotune.plan import (
    Comparison,
    Figures,
    LaunchSpec,
    LossCheck,
    LossCurve,
    Plan,
    QualityGuard,
    StrategySpec,
    TrainSpec,
)
from autotune.runtime import trial as trialmod
from autotune.runtime.trial import TrialBudget, optimizer_steps, run_trial, steps_for_target
from autotune.schema import check_writable
from autotune.strategy import Facts, Prior, PriorFacts, SearchFacts
from autotune.workloads import Workload, load_workload

EXACT_LOSS_TOLERANCE = 0.02  # bf16 against fp32 over a short run: rounding, not learning
QUALITY_TOLERANCE = 0.01
"""The quality guard's default (--quality-tolerance): an approximate plan's loss may be this much
(relative) above the exact reference's on the same batches at equal steps; lower is always fine."""
GUARD_STEPS = 200
"""The quality guard's default length (--guard-steps): optimizer steps of an approximate plan
and of the study's best exact configuration, each, on the same real-text batches."""
GUARD_STEPS_RANGE = (10, 100_000)
"""--guard-steps' legal range: at least ten steps so the last 10% is a step."""
GUARD_WARMUP = 1
"""Untimed optimizer steps before a guard run's timed ones (the first micro-batch compiles)."""
GUARD_TAIL = 0.1
"""The guard compares the mean loss over this last fraction of the steps, and smooths the
curves over as many steps (time-to-loss)."""
GUARD_FRACTIONS = (0.25, 0.5, 0.75)
"""Where a guard run's curve summary gives its smoothed loss (LossCurve.at_fractions)."""


TRIAL_SECONDS = 5.0
"""Timed seconds a trial aims for (--trial-seconds, ``TrialBudget.target_s``): a median of
steps that are each under it, a few steps of a slow fp32 baseline."""


@dataclass(kw_only=True, slots=True)
class PlanSettings:
    workload: str
    """Preset, hf:<model_type> or package.module:factory."""
    workload_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The workload's settings (an hf: model's config); they go into every trial's plan."""
    trials: int | None = None
    """Run this many new launched trials (as Optuna's n_trials; pruned-before-launch ones do not count)."""
    time_budget: float | None = None
    """Stop starting trials after this many seconds."""
    storage: str | None = None
    """Optuna storage URL; None: sqlite file plans/studies.db."""
    study_name: str | None = None
    """None: named from the workload and the hardware fingerprint."""
    global_batch: int | None = None
    """Samples per optimizer step, kept fixed; None: the workload's recipe; 0: searched too."""
    sampler: str = "tpe"
    """tpe (multivariate, seeded), random or qmc."""
    seed: int = 0
    """Seeds the sampler (the data order and the initialisation come from train.seed)."""
    allow_approximate: bool = False
    """Also search strategies that change what is learned."""
    quality_tolerance: float = QUALITY_TOLERANCE
    """The quality guard: how much higher (relative) an approximate plan's loss may end than
    the exact reference's, on the same batches at equal steps."""
    guard_steps: int = GUARD_STEPS
    """The quality guard's optimizer steps, run for an approximate best trial and the study's
    best exact one each (within GUARD_STEPS_RANGE)."""
    out: Path | None = None
    """Plan file; None: plans/<study>.plan.json."""
    profile: Path | None = None
    """Hardware profile of this machine; None: detect quickly (no measurements)."""
    device: str = "auto"
    """auto, or a device's name (``autotune.devices``: cpu, cuda)."""
    cpu_procs: int | None = None
    """Search runs of up to this many CPU processes (gloo) too; implies device cpu."""
    budget: TrialBudget = dataclasses.field(default_factory=lambda: TrialBudget(target_s=TRIAL_SECONDS))
    """Steps, timed seconds and time limit of each trial."""
    confirm_factor: int = 1
    """Each confirmation run times this many times the trial's steps."""
    confirm_rounds: int = 3
    """Rounds of the interleaved confirmation (plan, baseline, plan, ...); at least 3."""
    command: str | None = None
    """The command line, recorded in the plan."""
    exclude: tuple[str, ...] = ()
    """Strategies the search leaves out (``--exclude``): never sampled, never in a prior, and a
    resumed study's trials that use one are not candidates."""
    warm_start: list[str] = dataclasses.field(default_factory=list)
    """Plan files or storage URLs (``URL#STUDY``; the best 3 completed trials) whose
    configurations, translated to this search and legal here, are the first trials after the
    baseline, before the expert priors (:func:`autotune.search.warm_starts`)."""
    started_at: float | None = None
    """When the command began, on time.monotonic(), what ``time_budget`` counts from; None: when
    :func:`make_plan` is called."""


class NoTrialSucceeded(RuntimeError):
    """Every trial of the study failed or was pruned: there is nothing to confirm."""


def _profile(settings: PlanSettings) -> Any:
    from autotune import hardware

    if settings.profile is None:
        # The profile `autotune profile` saved, with its measured rates, if it is this machine's.
        saved = hardware.default_profile_path()
        if saved.is_file():
            try:
                profile = hardware.HardwareProfile.load(saved)
            except UserError:
                profile = None  # unreadable or from an older autotune: detect instead
            if profile is not None and profile.fingerprint == hardware.current_fingerprint():
                return profile
        return hardware.detect(quick=True)
    profile = hardware.HardwareProfile.load(settings.profile)
    if profile.fingerprint != hardware.current_fingerprint():
        raise UserError(
            f"profile {settings.profile} was made on another machine "
            f"(fingerprint {profile.fingerprint}); run `autotune profile` here"
        )
    return profile


def build_space(settings: PlanSettings, profile: Any, workload: Workload) -> tuple[search.SearchSpace, StrategyGraph]:
    asked = None if settings.device == devices.AUTO else devices.get(settings.device)
    if settings.cpu_procs is not None and (settings.cpu_procs < 1 or (asked is not None and asked.accelerator)):
        others = " or ".join(f"--device {d.name}" for d in devices.accelerators())
        raise UserError(
            f"--cpu-procs {settings.cpu_procs}: expected a positive number of CPU processes (and not {others})"
        )
    kind, found = devices.in_profile(profile)
    on_accelerator = kind.accelerator and settings.cpu_procs is None and asked in (None, kind)
    if asked is not None and asked.accelerator and not on_accelerator:
        raise UserError(f"--device {asked.name}: no {asked.words} GPU found on this machine")
    cores = usable_cores()
    if not on_accelerator and settings.cpu_procs is not None and settings.cpu_procs > cores:
        raise UserError(
            f"--cpu-procs {settings.cpu_procs}: this machine has {cores} usable cores; give at most {cores}"
        )
    most = found.count if on_accelerator else settings.cpu_procs or default_cpu_processes(cores)
    facts = Facts.of(profile if on_accelerator else _cpu_only(profile), workload, processes=most)
    graph = StrategyGraph(facts, allow_approximate=settings.allow_approximate)
    launch_device = kind.name if on_accelerator else devices.CPU
    facts_here = SearchFacts(
        cores=cores, seq_len=workload.seq_len, device=launch_device, vocab_size=workload.vocab_size
    )
    left_out = search_left_out(facts_here)
    for name in settings.exclude:
        if name not in catalog.catalog():
            raise UserError(f"--exclude {name}: unknown strategy; `autotune strategies` lists them")
        left_out[name] = "excluded (--exclude)"
    global_batch = workload.global_batch if settings.global_batch is None else (settings.global_batch or None)
    if global_batch is not None and global_batch < 1:
        raise UserError(f"--global-batch {global_batch}: expected a positive number of samples, or 0 to search it")
    # Under a fixed global batch the accumulation follows from the micro-batch: not a knob.
    derived = {planmod.ACCUMULATION} if global_batch is not None else set()
    strategies = [
        _narrowed(catalog.get(n), facts_here) for n in graph.usable() if n not in left_out and n not in derived
    ]
    device_memory = float(profile.gpus[0].memory_bytes) if on_accelerator else None
    rates: dict[str, float] = {}
    bandwidth = None
    if on_accelerator:
        rates = {dtype: rate for dtype in ("fp32", "tf32", "bf16") if (rate := _rate(profile, dtype)) is not None}
        measured = profile.measured
        bandwidth = measured.copy.median if measured is not None and measured.copy is not None else None
    largest = 256 if on_accelerator else 64
    train = TrainSpec(micro_batch_size=1, seed=0)
    launch = LaunchSpec(device=launch_device)
    space = search.SearchSpace(
        workload=workload,
        strategies=strategies,
        graph=graph,
        micro_batches=search.micro_batch_choices(largest, global_batch),
        baseline_micro_batch=1,
        train=train,
        launch=launch,
        device_memory=device_memory,
        matmul_flops=rates,
        memory_bandwidth=bandwidth,
        left_out=left_out,
        global_batch=global_batch,
    )
    usable = {s.name for s in strategies}
    for n in _process_counts(most)[1:]:
        found = search.layouts(n, usable, graph, workload)
        if found:
            space.processes += (n,)
            space.layouts[n] = found
    space.baseline_micro_batch = _baseline_micro_batch(space)
    return space, graph


def default_cpu_processes(cores: int) -> int:
    """CPU processes searched without --cpu-procs: several only where each keeps two cores
    (gloo's all-reduce and the loader need one beside the matmuls), at most 8."""
    return min(8, cores // 2) if cores >= 4 else 1


def _narrowed(strategy: Any, facts: SearchFacts) -> Any:
    """``strategy`` with the knobs it declares for a search on this machine and workload
    (``Strategy.search_knobs``: cpu_threads' range to these cores, sparse_attention's windows
    below this sequence; one that gives a reason instead is in :func:`search_left_out`)."""
    return (
        strategy if strategy.search_knobs is None else dataclasses.replace(strategy, knobs=strategy.search_knobs(facts))
    )


def _process_counts(most: int) -> list[int]:
    """1, the powers of two below ``most``, and ``most``."""
    counts = [1]
    while counts[-1] * 2 < most:
        counts.append(counts[-1] * 2)
    return counts + ([most] if most > 1 else [])


def searched_on(space: search.SearchSpace) -> str:
    """The kind of device a search's trials run on: its launch's, the CPU for "auto"."""
    return devices.CPU if space.launch.device == devices.AUTO else space.launch.device


def _cpu_only(profile: Any) -> Any:
    return dataclasses.replace(profile, gpus=[], links=[])


def _rate(profile: Any, dtype: str) -> float | None:
    try:
        return profile.peak_flops(dtype)[0]
    except UserError:
        return None


def _baseline_micro_batch(space: search.SearchSpace) -> int:
    """The largest of 16, 8, 4, 2, 1 that the plain run is predicted to fit (else the
    smallest micro-batch there is)."""
    for b in (16, 8, 4, 2, 1):
        if b not in space.micro_batches:
            continue
        estimate = search.predict(space, search.plan_for(space, b, []))
        if (
            estimate is None
            or space.device_memory is None
            or estimate.peak_memory_bytes < search.MEMORY_HEADROOM * space.device_memory
        ):
            return b
    return min(space.micro_batches)


def left_out_of(device: str) -> dict[str, str]:
    """Strategies a search on ``device`` leaves out (each declares its ``left_out``), with the reason."""
    return {name: why for name, s in catalog.catalog().items() if (why := s.left_out_on(device)) is not None}


def search_left_out(facts: SearchFacts) -> dict[str, str]:
    """What a search on this machine and workload leaves out, with the reason: what the
    strategies declare for its device (:func:`left_out_of`), and what would not pay here
    (``Strategy.search_knobs`` giving a reason: precision on a CPU without bf16 units, a
    vocabulary already padded). `autotune strategies` shows the same."""
    left_out = left_out_of(facts.device)
    for name, strategy in catalog.catalog().items():
        if (
            name not in left_out
            and strategy.search_knobs is not None
            and isinstance(reason := strategy.search_knobs(facts), str)
        ):
            left_out[name] = reason
    return left_out


def expert_priors(space: search.SearchSpace) -> list[dict[str, Any]]:
    """What a careful engineer tries first, enqueued as the trials after the baseline (an
    Optuna warm start; TPE then searches around whichever measures best).

    Each strategy declares how the prior turns it on (``Strategy.prior``; the reasons, measured,
    are with it). On a GPU the one trial of them all goes at micro-batch 48 (the hand-tuned
    phase8-small setting) and again at micro-batch 96 (CUDA graphs are left to the search: they
    cannot run with accumulation, see strategies/compile.py); on a CPU at the largest
    micro-batch, after a trial of its own for each that asks for one (bf16 autocast) at the
    baseline's micro-batch. Approximate strategies with a prior here (searched only with
    --allow-approximate) come together in one more trial: the first one of all the exact
    priors plus theirs, enqueued right after it, so that the study measures both on the same
    settings and the quality guard has its exact reference. A strategy whose prior races
    (``Prior.race``: triton_kernels' fused loss) gets a trial of the first prior plus itself,
    right after it: one implementation against the other on the same settings; so does each of
    the other settings a prior races against its own (``Prior.races``: attention's fa4)."""
    device = searched_on(space)
    distributing = apply.distributing()
    params: dict[str, Any] = {s.name: False for s in space.strategies if s.name not in distributing}
    own: list[dict[str, Any]] = []
    approximate: dict[str, Any] = {}
    races: list[dict[str, Any]] = []
    for strategy in space.strategies:
        if strategy.name in distributing:
            continue
        prior = _prior(space, strategy.name, device, 1)
        if prior is None:
            continue
        knobs = {strategy.name: True} | _with_defaults(strategy.name, _prefixed(strategy.name, prior))
        if not strategy.exact:
            approximate |= knobs
        elif prior.race:
            races.append(knobs)
        elif prior.own_trial:
            own.append(knobs)
        else:
            params |= knobs
        races.extend(
            {strategy.name: True} | _with_defaults(strategy.name, _prefixed(strategy.name, Prior(knobs=r)))
            for r in prior.races
        )
    if not devices.get(device).accelerator:
        priors = [params | {"micro_batch_size": max(space.micro_batches)}]
    else:
        # The larger micro-batch first: on one H200 micro-batch 96 beat 48 on phase8-small
        # (1,165,629 against 1,156,287 tokens/s, bench/results/plan-phase8-small) and on gpt2-124m
        # (539,382 against 531,441, bench/results/plan-gpt2-124m), and under a tight time budget the
        # first prior may be the only compiled trial.
        first = max([b for b in space.micro_batches if b <= 48] or space.micro_batches)
        priors = [params | {"micro_batch_size": first}]
        larger = [b for b in space.micro_batches if first < b <= 2 * first]
        if larger:
            priors.insert(0, params | {"micro_batch_size": max(larger)})
    for knobs in reversed(races):  # right after the trial they race against
        priors.insert(1, priors[0] | knobs)
    if approximate:  # right after the exact trial it is measured and guarded against
        priors.insert(1, _with_approximate(priors[0], approximate))
    for knobs in reversed(own):
        priors.insert(0, params | knobs | {"micro_batch_size": space.baseline_micro_batch})
    return _with_processes(space, priors)


def _with_approximate(exact: dict[str, Any], approximate: dict[str, Any]) -> dict[str, Any]:
    """The exact prior ``exact`` with the approximate strategies' priors on, and off what they
    exclude (sparse attention replaces the attention backend's kernel)."""
    turned_on = [k for k, v in approximate.items() if "." not in k and v is True]
    off = {c for name in turned_on for c in catalog.get(name).conflicts}
    off |= {s.name for s in catalog.catalog().values() if s.conflicts & set(turned_on)}
    kept = {k: v for k, v in exact.items() if k.split(".", 1)[0] not in off}
    return kept | {c: False for c in off if c in exact} | approximate


def _prior(space: search.SearchSpace, name: str, device: str, processes: int) -> Prior | None:
    """``name``'s declared prior here, over ``processes`` processes (None: the prior leaves it off)."""
    strategy = catalog.get(name)
    if strategy.prior is None:
        return None
    excluded = space.graph.excluded_choices(name) if name in space.graph.strategies else {}
    shape = space.workload.shape
    return strategy.prior(
        PriorFacts(
            device=device,
            cores=usable_cores(),
            processes=processes,
            excluded=excluded,
            d_model=None if shape is None else shape.d_model,
            seq_len=space.workload.seq_len,
        )
    )


def _prefixed(name: str, prior: Prior) -> dict[str, Any]:
    return {f"{name}.{k}": v for k, v in prior.knobs.items()}


def _with_processes(space: search.SearchSpace, priors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Priors of one process pinned to one process; where several are possible, the first
    prior again over all of them with the first data-parallel layout that declares a prior
    (DDP: the layout that pays first at these sizes), each strategy's prior set for that many."""
    if len(space.processes) == 1:
        return priors
    out = [p | {"processes": 1} for p in priors]
    most = max(space.processes)
    device = searched_on(space)
    layouts = space.layouts.get(most, [])
    dp = [n for n in apply.distributing() if n in layouts and catalog.get(n).mesh_dim == "dp"]
    layout = next(((n, p) for n in dp if (p := _prior(space, n, device, most)) is not None), None)
    if layout is not None:
        name, prior = layout
        first = priors[0]
        fits = [b for b in space.micro_batches if space.global_batch is None or space.global_batch % (b * most) == 0]
        if fits:
            mb = max([b for b in fits if b <= first["micro_batch_size"]] or [min(fits)])
            spread = first | {"processes": most, f"layout.{most}": name, "micro_batch_size": mb}
            spread |= _with_defaults(name, _prefixed(name, prior))
            for strategy in space.strategies:  # each set for that many processes (the cores shared out)
                again = _prior(space, strategy.name, device, most) if first.get(strategy.name) is True else None
                if again is not None:
                    spread |= _prefixed(strategy.name, again)
            out.insert(1, spread)
    return out


def _with_defaults(name: str, knobs: dict[str, Any]) -> dict[str, Any]:
    """Fill every knob of ``name`` (the enqueued trial must fix them all), given ones first."""
    strategy = catalog.get(name)
    default = strategy.dump(strategy.default())
    out = {f"{name}.{k.name}": default[k.name] for k in strategy.knobs}
    unknown = set(knobs) - set(out)
    if unknown:
        raise ValueError(f"{name} has no knob {sorted(unknown)[0]}")
    return out | knobs


def study_name(
    workload: str, fingerprint: str, global_batch: int | None = None, overrides: dict[str, Any] | None = None
) -> str:
    """``workload-fingerprint``; a global batch other than the recipe's (``global_batch``, 0
    for a searched one) is another recipe, so another study: ``workload-gbN-fingerprint``;
    the workload's settings (an hf: config) another model: ``workload-cHASH-fingerprint``."""
    recipe = "" if global_batch is None else f"-gb{global_batch or 'free'}"
    if overrides:
        recipe += "-c" + hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{workload}{recipe}-{fingerprint}")


MIN_ROUNDS = 3
"""Fewest rounds of the interleaved confirmation: a median and a spread need three samples."""
MIN_NOISE = 0.02
"""A speed-up is claimed only beyond the measured spread and never below this share: two runs
of one configuration, back to back on the 2-core CPU, differ by about that much."""
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


def _quiet(_: str | None) -> None:
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
    base = search.baseline_trial(study)
    base = base if base is not None and base.state == optuna.trial.TrialState.COMPLETE and trial_wall(base) else None
    compiled = any(spec.name == "compile" for spec in search.plan_of(best).strategies)
    plan_run = run_seconds(best, cached=compiled)
    if base is None or base.number == best.number:
        per_round = plan_run
    else:
        timed = phases(best)
        per_round = plan_run + run_seconds(
            base, timed_s=None if timed is None else min(timed[2], (phases(base) or timed)[2])
        )
    scale = _length_scale(settings)
    processes = max(1, settings.cpu_procs or 1)
    return scale * (_rounds(settings) * per_round + (processes * plan_run if plain_run else 0.0)) + guard_seconds(
        study, settings
    )


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
    if is_exact(search.plan_of(best)):
        return 0.0
    exact = [t for t in complete if is_exact(search.plan_of(t))]
    total = 0.0
    for t in [best, *([max(exact, key=lambda t: t.value)] if exact else [])]:
        f = search.figures_of(t)
        total += (trial_wall(t) or 0.0) + settings.guard_steps * ((f.step_time_s if f is not None else None) or 0.0)
    return total


def _rounds(settings: PlanSettings) -> int:
    return max(MIN_ROUNDS, settings.confirm_rounds)


def _length_scale(settings: PlanSettings) -> float:
    """How much longer a confirmation run is than a trial (start-up counted as steps: an
    overestimate, so the reserve errs on the safe side)."""
    b = settings.budget
    return (b.warmup_steps + settings.confirm_factor * b.timed_steps) / (b.warmup_steps + b.timed_steps)


def _finished(study: Any) -> int:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return len(study.get_trials(deepcopy=False, states=states))


def _launched(study: Any) -> int:
    """Finished trials that ran a child (not pruned before launch)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished() and t.user_attrs.get("launched"))


def run_search(study: Any, objective: search.Objective, settings: PlanSettings, clock: Clock) -> None:
    """The search, stopped in time for the confirmation: under a time budget, one trial at a
    time while the time left, less the confirmation's predicted time, still holds a typical
    trial (each trial's own limit is the time left, so none runs into the reserve)."""
    import optuna

    if clock.deadline is None:
        search.optimize(study, objective, trials=settings.trials, time_budget=None)
        return
    # --trials N is N new launched trials (search.optimize's count), also one at a time here.
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
        candidates = [t for t in complete if t.user_attrs.get("role") != search.BASELINE]
        typical = statistics.median(trial_wall(t) for t in complete) if candidates else 0.0
        left = clock.left() - confirmation_seconds(study, settings, plain_run=objective.space.train.random_tokens)
        if left < max(search.MIN_TRIAL_S, typical):
            return
        finished = _finished(study)
        search.optimize(study, objective, trials=1, time_budget=left)
        if _finished(study) == finished:
            return


def search_status(k: int, trials: int | None) -> str:
    """The status line of the search's k-th trial of this run: "of n" with ``--trials n`` (a
    trial measured again after the search is past n). The time budget is the status line's own."""
    return f"search: trial {k}" + (f" of {trials}" if trials is not None and k <= trials else "") + " running"


def same_run(a: Plan, b: Plan) -> bool:
    """Whether two plans train the same way (what a trial's plan holds)."""
    return search.configuration(a.to_dict()) == search.configuration(b.to_dict())


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
    status: Status = _quiet,
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
    rounds = _rounds(settings)
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
        plan_runs.append(run_trial(plan, _limited(budget, clock)).figures)
        if not same:
            assert baseline is not None
            status(f"confirmation round {k} of {rounds}: the baseline")
            base_budget = baseline_budget(budget, plan, baseline, plan_runs[-1], baseline_step_s)
            base_runs.append(run_trial(baseline, _limited(base_budget, clock)).figures)
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
        if spread <= BUSY_SPREAD or k >= _rounds(settings) + EXTRA_ROUNDS or clock.left() < time.monotonic() - began:
            break
        log(f"confirmation: a spread of ±{spread:.0%} (above ±{BUSY_SPREAD:.0%}): another round")
        rounds += 1
    load.append(_load())
    measured = median_figures(plan_runs)
    base = None if baseline is None else measured if same else median_figures(base_runs)
    reference = base if baseline is not None and not same and is_reference(plan, baseline) else None
    if reference is None:
        status("loss check: a plain run on the plan's batches")
    loss_check = _loss_check(plan, measured, _limited(budget, clock), settings.quality_tolerance, reference=reference)
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


def _limited(budget: TrialBudget, clock: Clock) -> TrialBudget:
    """A run's limit: the trial's, and no later than the budget's end plus its margin."""
    if clock.deadline is None:
        return budget
    return dataclasses.replace(
        budget, timeout_s=max(search.MIN_TRIAL_S, min(budget.timeout_s, clock.left() + search.MIN_TRIAL_S))
    )


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


def guarded_choice(
    study: Any,
    summary: search.Summary,
    settings: PlanSettings,
    name: str,
    *,
    clock: Clock | None = None,
    status: Status = _quiet,
    log: Callable[[str], None] = print,
) -> tuple[Any, QualityGuard | None]:
    """The trial to confirm, and its quality guard: ``summary.best`` when it is exact or passes
    the guard against the best exact trial; else that exact trial, the failure recorded in the
    study (``quality_guard_failed_<trial>``: the reason, the trial's figures, the guard) and the
    log, so that an approximate plan that learns worse never becomes the plan (nor is confirmed)."""
    chosen = summary.best
    if is_exact(search.plan_of(chosen)):
        return chosen, None
    exact = [t for t in summary.complete if is_exact(search.plan_of(t))]
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
        search.plan_of(chosen), search.plan_of(reference), reference.number, settings, clock=clock, status=status
    )
    if guard is not None and guard.passed:
        log(f"quality guard: trial {chosen.number} passed: {_guard_line(guard)}")
        return chosen, guard
    if guard is not None:
        why = f"{_guard_line(guard)}, beyond the tolerance {guard.tolerance:g}"
    figures = search.figures_of(chosen)
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
    status: Status = _quiet,
) -> tuple[QualityGuard | None, str | None]:
    """Run ``candidate`` (approximate) and ``exact`` for ``settings.guard_steps`` timed optimizer
    steps each after GUARD_WARMUP, on the same batches, and compare their curves
    (:func:`guard_of`). None and the reason when either run did not end ok."""
    clock = clock or Clock()
    runs = []
    for what, plan in (("the plan", candidate), (f"the exact trial {reference_trial}", exact)):
        status(f"quality guard: {what}, {settings.guard_steps} steps")
        result = run_trial(plan, _limited(guard_budget(settings, plan), clock))
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


def make_plan(
    settings: PlanSettings,
    *,
    on_result: Callable | None = None,
    log: Callable[[str], None] = print,
    status: Status = _quiet,
) -> tuple[Plan, search.Summary, search.SearchSpace]:
    """Search, confirm and write the plan; ``settings.time_budget`` bounds all of it (within
    :func:`budget_margin`), the confirmation's time reserved from the trials' measured walls."""
    began = time.monotonic() if settings.started_at is None else settings.started_at
    clock = Clock(
        deadline=None
        if settings.time_budget is None
        else began + settings.time_budget - finish_margin(settings.time_budget)
    )
    storage = settings.storage or "sqlite:///plans/studies.db"
    if settings.out is not None:
        check_writable(settings.out, "--out")
    if storage.startswith("sqlite:///"):
        check_writable(Path(storage.removeprefix("sqlite:///")), "--storage")
    workload = load_workload(settings.workload, settings.workload_overrides)
    profile = _profile(settings)
    space, graph = build_space(settings, profile, workload)
    if settings.time_budget is not None:
        least = minimum_budget(space, settings)
        if settings.time_budget < least:
            raise UserError(
                f"--time-budget {settings.time_budget:g}: too small for {settings.workload} here; a baseline trial, "
                f"one candidate and {_rounds(settings)} confirmation rounds need at least {math.ceil(least)} s"
            )
    # Read before the study is opened: a source that cannot be read writes nothing. Enqueued
    # only into a new study (ensure_first_trials).
    warm = search.warm_starts(space, settings.warm_start, log)
    if not space.train.random_tokens:
        from autotune import data

        data.default_dataset(workload.vocab_size)  # build once here, not in every trial
    recipe = None if settings.global_batch == workload.global_batch else settings.global_batch
    name = settings.study_name or study_name(
        settings.workload, profile.fingerprint, recipe, settings.workload_overrides
    )
    out = settings.out or Path("plans") / f"{name}.plan.json"
    check_writable(out, "plan file")
    if storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    identity = search.study_identity(settings.budget, space.global_batch)
    study = search.open_study(name, storage, settings.sampler, settings.seed, identity=identity)
    search.ensure_first_trials(study, space, expert_priors(space), warm)
    with trialmod.measuring(space.launch.device):  # this machine's device, for the whole command
        return _search_and_confirm(settings, study, space, name, storage, out, profile, clock, on_result, status, log)


def _fresh(
    study: Any,
    objective: search.Objective,
    since: datetime.datetime,
    clock: Clock,
    reserve: float,
    log: Callable[[str], None],
    excluded: tuple[str, ...] = (),
) -> search.Summary:
    """The study's summary over figures this run can compare: its own trials and those of
    planners beside it. A resumed study's best trial from an earlier run (another load) is
    measured again first when it would be chosen and the budget holds it; without any fresh
    trial, the earlier figures are all there is, and the log says so."""
    import optuna

    earlier = search.stale_runs(study, objective.run, since)

    def is_stale(t: Any) -> bool:
        return search.stale(t, earlier)

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
            if left is None or left >= max(search.MIN_TRIAL_S, trial_wall(top) or 0.0):
                log(f"trial {top.number} was measured by an earlier planner run (another load): measuring it again")
                search.measure_again(study, objective, top, left)
            elif not fresh:
                log(
                    "every completed trial was measured by an earlier planner run, "
                    "under another load; none could be measured again in the budget"
                )
                return search.summarize(study, exclude=outside)
    return search.summarize(study, exclude=lambda t: is_stale(t) or outside(t))


def _baseline_instead(
    plan: Plan, baseline: Plan, done: Confirmed, summary: search.Summary, chosen: Any
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


def _search_and_confirm(
    settings: PlanSettings,
    study: Any,
    space: search.SearchSpace,
    name: str,
    storage: str,
    out: Path,
    profile: Any,
    clock: Clock,
    on_result: Callable | None,
    status: Status,
    log: Callable[[str], None],
) -> tuple[Plan, search.Summary, search.SearchSpace]:
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
    objective = search.Objective(
        space=space,
        budget=settings.budget,
        on_result=ended,
        log_dir=search.trial_log_dir(storage, name),
        run=f"{search.PLANNER_ID}:{uuid.uuid4().hex[:8]}",
    )
    status(search_status(1, settings.trials))
    run_search(study, objective, settings, clock)
    # max-autotune on the best compiled configurations, only where its compile time fits
    # before the confirmation's reserve. On a GPU only: on a CPU inductor's max-autotune tunes
    # only its C++ GEMM templates, 4% over the default mode on the tiny GPT on 2 cores (26,429
    # against 25,398 tokens/s, within that search's ±7% noise) for two more compiled trials.
    plain_run = space.train.random_tokens
    reserve = confirmation_seconds(study, settings, plain_run=plain_run)
    if devices.get(searched_on(space)).accelerator:
        status("refinement: max-autotune")
        search.refine(study, objective, None if clock.deadline is None else clock.deadline - reserve)
        status(None)
    # Machines sharing the study: the trials still running elsewhere finish first, so that every
    # planner summarizes the same trials and writes the same plan.
    longest = settings.budget.timeout_s * search.AUTOTUNE_TIME_FACTOR  # the longest a trial may run
    left = longest if clock.deadline is None else min(longest, clock.left() - reserve)
    search.wait_for_others(study, left, log=log)
    summary = _fresh(study, objective, since, clock, reserve, log, settings.exclude)
    if summary.best is None:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.counts.items()))
        why = shlex.join(["autotune", "trials", "--study", name, "--storage", storage])  # the study this run used
        raise NoTrialSucceeded(f"no trial of study {name} succeeded ({counts}); `{why}` shows why")
    baseline_plan = search.plan_of(summary.baseline) if summary.baseline else None
    base_figures = search.figures_of(summary.baseline) if summary.baseline else None
    base_step = base_figures.step_time_s if base_figures is not None and base_figures.status == "ok" else None
    chosen, guard = guarded_choice(study, summary, settings, name, clock=clock, status=status, log=log)
    best = search.plan_of(chosen)
    # The guard has run: what is left of the reserve is the confirmation's.
    seconds = confirmation_seconds(study, settings, plain_run=plain_run) - guard_seconds(study, settings)
    left = "" if clock.deadline is None else f", {max(0.0, clock.left()):.0f} s of the budget left"
    log(
        f"confirming trial {chosen.number} against the baseline (trial "
        f"{summary.baseline.number if summary.baseline else '-'}): "
        f"{_rounds(settings)} interleaved rounds, predicted {seconds:.0f} s{left}"
    )
    done = confirm(
        best, baseline_plan, settings, clock=clock, status=status, log=log, seconds=seconds, baseline_step_s=base_step
    )
    instead = _baseline_instead(best, baseline_plan, done, summary, chosen) if baseline_plan is not None else None
    if instead is not None:
        best, done, chosen = instead
        guard = None
        log(done.comparison.verdict)
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


def minimum_budget(space: search.SearchSpace, settings: PlanSettings) -> float:
    """The least ``--time-budget`` that holds the baseline trial, one candidate (the expert
    prior) and the confirmation of that candidate against the baseline, MIN_ROUNDS rounds of
    each: a lower bound, from the device's startup floor a run, its compile floor for the
    candidate and the cost model's step time of the baseline where it has one (on a GPU with a
    measured or datasheet rate), each run timing at least one optimizer step. With ``--trials
    1`` only the baseline and its own rounds."""
    device = searched_on(space)
    baseline = search.plan_for(space, space.baseline_micro_batch, [])
    estimate = search.predict(space, baseline)
    step = estimate.step_time_s if estimate is not None and estimate.step_time_s else 0.0
    warmup, timed = optimizer_steps(settings.budget, baseline.grad_accum())
    if settings.budget.target_s is not None and step:
        timed = steps_for_target(settings.budget.target_s, step, timed)
    kind = devices.get(device)
    base_run = kind.startup_floor_s + (warmup + timed) * step
    rounds = _rounds(settings)
    if settings.trials == 1:
        need = base_run * (1 + rounds)
    else:
        # Faster than the baseline: at most its one step, after its compilation (cached in the
        # confirmation's runs).
        candidate = kind.startup_floor_s + kind.compile_floor_s + step
        again = kind.startup_floor_s + CACHED_WARMUP * kind.compile_floor_s + step
        need = base_run + candidate + rounds * (again + base_run)
    return need + finish_margin(need)


def is_exact(plan: Plan) -> bool:
    """Every strategy of ``plan`` learns what the plain model learns (none is approximate)."""
    return all(catalog.get(s.name).exact for s in plan.strategies)


def _torch_version() -> str:
    import torch

    return torch.__version__
