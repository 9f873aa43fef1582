"""The search: an Optuna study over the knobs of the strategies that are legal here.

The objective is define-by-run: a strategy's knobs exist only in trials where the strategy
is on. Every trial is checked on the CPU first (the graph's legality, then the cost model's
memory prediction) and only then run for real, in its own process (``autotune.trial``). The
study lives in Optuna storage (SQLite by default) with heartbeats, so a planner killed
mid-search resumes with the same command and the trial it was running is marked failed.
The first trial is always the plain baseline, so every plan carries a speed-up measured in
the same search.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import socket
import sqlite3
import statistics
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from autotune import costmodel
from autotune import plan as planmod
from autotune import trial as trialmod
from autotune.apply import check_processes, check_settings
from autotune.errors import UserError, first_line
from autotune.graph import StrategyGraph
from autotune.mesh import data_parallel, mesh_shape
from autotune.plan import Figures, LaunchSpec, Plan, StrategySpec, TrainSpec
from autotune.strategy import Knob, Strategy
from autotune.trial import TrialBudget, TrialResult, run_trial
from autotune.workloads import Workload

MICRO_BATCHES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MAX_ACCUM = 64  # more micro-batches a step than this only ever loses: each trial times 3+ steps
MEMORY_HEADROOM = 0.92  # prune a trial predicted to use more than this share of the device
MEMORY_CORRECTION = (0.67, 1.5)
"""Bounds of the study's learned correction of the predicted peak (:func:`memory_correction`):
one odd trial cannot turn pruning off, nor prune everything."""
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
BASELINE = "baseline"
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


@dataclass(kw_only=True, slots=True)
class SearchSpace:
    """What a trial may choose: strategies with their knobs, and the micro-batch size."""

    workload: Workload
    """The workload being planned."""
    strategies: list[Strategy]
    """Usable strategies (graph-filtered), in catalog order."""
    graph: StrategyGraph
    """Legality of combinations."""
    micro_batches: tuple[int, ...]
    """Micro-batch sizes to try."""
    baseline_micro_batch: int
    """Micro-batch of the plain baseline trial."""
    train: TrainSpec
    """Everything else about training, shared by all trials."""
    launch: LaunchSpec
    """Processes and device of every trial."""
    device_memory: float | None
    """Bytes of memory of one device; None: no memory pruning (CPU)."""
    matmul_flops: dict[str, float] = field(default_factory=dict)
    """Measured (else datasheet) matmul rate per dtype (fp32, tf32, bf16) for the cost
    model's step time; empty: no step-time prediction."""
    memory_bandwidth: float | None = None
    """Device memory bandwidth for the cost model."""
    left_out: dict[str, str] = field(default_factory=dict)
    """Usable strategies the planner does not search here, with the reason."""
    processes: tuple[int, ...] = (1,)
    """Process counts a trial may use (GPUs of this machine, or --cpu-procs); above one, the
    trial also picks a layout of the mesh (:func:`layouts`)."""
    layouts: dict[int, list[str]] = field(default_factory=dict)
    """Legal layouts per process count > 1, as :func:`layout_name` spells them."""
    global_batch: int | None = None
    """Samples per optimizer step, fixed: a trial chooses the micro-batch and its accumulation
    follows (the grad_accum strategy is then derived, not searched). None: both are searched."""


def _suggest_knob(trial: optuna.Trial, name: str, knob: Knob, excluded: dict[Any, str]) -> Any:
    key = f"{name}.{knob.name}"
    if knob.choices:
        return trial.suggest_categorical(key, [c for c in knob.choices if c not in excluded])
    if knob.integer:
        return trial.suggest_int(key, int(knob.low), int(knob.high), log=knob.log)
    return trial.suggest_float(key, float(knob.low), float(knob.high), log=knob.log)


def suggest_plan(trial: optuna.Trial, space: SearchSpace) -> Plan:
    """Build a trial's plan from its parameters (the same code replays a FixedTrial).

    Define-by-run: the process count first (when several are possible), then, for several
    processes, one of the legal layouts of the mesh for that count, whose strategies' knobs
    follow (their degrees are the layout's); then each single-device strategy on or off, and
    the knobs of those on."""
    micro_batch = trial.suggest_categorical("micro_batch_size", list(space.micro_batches))
    processes = (
        trial.suggest_categorical("processes", list(space.processes))
        if len(space.processes) > 1
        else space.processes[0]
    )
    strategies = []
    parallel: dict[str, int] = {}
    if processes > 1:
        parallel = parse_layout(trial.suggest_categorical(f"layout.{processes}", space.layouts[processes]))
    for strategy in space.strategies:
        if strategy.mesh_dim is not None:
            if strategy.name not in parallel:
                continue
        elif not trial.suggest_categorical(f"{strategy.name}", [True, False]):
            continue
        excluded = space.graph.excluded_choices(strategy.name)
        for knob in strategy.knobs:
            if knob.refine_only:
                excluded[knob.name] = {
                    **excluded.get(knob.name, {}),
                    **dict.fromkeys(knob.refine_only, "refinement only"),
                }
        knobs = {}
        for knob in strategy.knobs:
            if strategy.name in parallel and knob.name == strategy.degree_knobs[0]:
                knobs[knob.name] = parallel[strategy.name]
            else:
                knobs[knob.name] = _suggest_knob(trial, strategy.name, knob, excluded.get(knob.name, {}))
        strategies.append(StrategySpec(name=strategy.name, knobs=knobs))
    return plan_for(space, micro_batch, strategies, processes)


def layout_name(parallel: dict[str, int]) -> str:
    """A layout as a categorical value: "ddp", "tensor_parallel:2", "fsdp2+tensor_parallel:2"."""
    return "+".join(name if degree == 0 else f"{name}:{degree}" for name, degree in parallel.items())


def parse_layout(name: str) -> dict[str, int]:
    """The strategies of a layout name, each with its degree (0: a data-parallel wrapper)."""
    out = {}
    for part in name.split("+"):
        strategy, _, degree = part.partition(":")
        out[strategy] = int(degree or 0)
    return out


def layouts(processes: int, usable: set[str], graph: StrategyGraph, workload: Workload) -> list[str]:
    """Every legal way to lay ``processes`` out as dp x tp x pp with the usable strategies:
    tp and pp degrees that divide it (of the strategies declaring those mesh dims), and, where
    data-parallel groups remain, one of the data-parallel wrappers. Checked by the graph
    (conflicts) and ``mesh_shape`` (the rules of the mesh and of the model's shape), so every
    layout a trial picks can run."""
    strategies = graph.strategies
    degrees = [d for d in (2, 4, 8) if processes % d == 0]

    def splits(dim: str) -> list[tuple[str, int]]:
        """(strategy, degree) options of a tp or pp dim, ("", 1) for none."""
        names = sorted(n for n in usable if n in strategies and strategies[n].mesh_dim == dim)
        return [("", 1)] + [(name, d) for d in degrees for name in names]

    out = []
    for tp_name, tp in splits("tp"):
        for pp_name, pp in splits("pp"):
            if processes % (tp * pp):
                continue
            model = {name: d for name, d in ((tp_name, tp), (pp_name, pp)) if name}
            wrappers = [w for w in data_parallel(strategies) if w in usable] if processes > tp * pp else [None]
            for wrapper in wrappers:
                parallel = ({wrapper: 0} if wrapper else {}) | model
                # Each sets its degree knobs to the degree (a pipeline then has as many pieces
                # of a micro-batch as stages, the fewest that fill it; the trial picks them).
                chosen = {
                    name: dict.fromkeys(strategies[name].degree_knobs, d) if d else {} for name, d in parallel.items()
                }
                try:
                    graph.check(list(parallel))
                    mesh_shape(processes, chosen, workload=workload, strategies=strategies)
                except UserError:
                    continue
                out.append(layout_name(parallel))
    return out


def plan_for(space: SearchSpace, micro_batch: int, strategies: list[StrategySpec], processes: int = 1) -> Plan:
    """The plan of one trial: the space's shared settings with this micro-batch, these
    strategies and processes; under a fixed global batch, with the accumulation that
    completes it over the data-parallel processes."""
    launch = dataclasses.replace(space.launch, nproc_per_node=processes)
    if space.global_batch is not None:
        dp, _, _ = mesh_shape(processes, {s.name: s.knobs for s in strategies})
        accum = accumulation(space.global_batch, micro_batch, dp)
        strategies = [s for s in strategies if s.name != planmod.ACCUMULATION]
        if accum > 1:
            strategies.append(StrategySpec(name=planmod.ACCUMULATION, knobs={"steps": accum}))
    return Plan(
        schema_version=planmod.SCHEMA_VERSION,
        workload=planmod.WorkloadSpec(name=space.workload.name, overrides=dict(space.workload.overrides)),
        train=dataclasses.replace(space.train, micro_batch_size=micro_batch),
        strategies=strategies,
        launch=launch,
    )


def baseline_params(space: SearchSpace) -> dict[str, Any]:
    """The plain run: one process, no strategy on, the default micro-batch."""
    params = {"micro_batch_size": space.baseline_micro_batch} | {
        s.name: False for s in space.strategies if s.mesh_dim is None
    }
    return params | ({"processes": 1} if len(space.processes) > 1 else {})


def predict(space: SearchSpace, plan: Plan) -> costmodel.Estimate | None:
    """The cost model's estimate of ``plan``; None for a workload whose shape is not known."""
    if space.workload.shape is None:
        return None
    return costmodel.estimate(
        space.workload,
        plan.train.micro_batch_size,
        plan.strategy_configs(),
        matmul_flops=space.matmul_flops,
        memory_bandwidth=space.memory_bandwidth,
        processes=plan.launch.nproc_per_node * plan.launch.nnodes,
    )


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
        names = [s.name for s in plan.strategies]
        try:
            self.space.graph.check(names)
            check_settings(plan.strategy_configs(), workload=self.space.workload)
            check_processes(
                plan.launch.nproc_per_node * plan.launch.nnodes,
                plan.strategy_configs(),
                workload=self.space.workload,
                micro_batch_size=plan.train.micro_batch_size,
            )
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


def tokens_per_step(space: SearchSpace, plan: Plan) -> int:
    return plan.global_batch() * space.workload.seq_len


def _best_value(study: optuna.Study) -> float | None:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return max((t.value for t in complete), default=None)


HEARTBEAT_S = 2
GRACE_S = 8
"""A trial whose heartbeat is this old belongs to a dead planner: the next trial started on
the study (by any planner) marks it failed."""


MAX_RETRY = 2
"""An interrupted trial is run again this many times at most (a trial that itself brings
its planner down must not be retried forever)."""
CONNECT_TIMEOUT_S = 10
"""Seconds a database server may take to answer a connection."""
SCHEMA_RACE_RETRIES = 3
"""Tries again when another machine was creating Optuna's tables in the same new database."""


def make_storage(url: str, *, existing: bool = False) -> optuna.storages.BaseStorage:
    """The study's database, with heartbeats: a trial whose planner died (heartbeat older
    than GRACE_S) is marked FAIL by the next planner on the study, and run again with the
    same parameters (RetryHeartbeatStaleTrialCallback). A URL that cannot be used is one line.
    ``existing``: studies are read from it, not made (compare, --warm-start, trials), so a
    SQLite file must be there already."""
    _check_sqlite(url, existing)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
    engine_kwargs: dict[str, Any] = {}
    if url.startswith(("postgresql", "mysql")):  # a server that does not answer: fail in seconds
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    for attempt in range(SCHEMA_RACE_RETRIES + 1):
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
            )
        except Exception as e:  # SQLAlchemy's URL, dialect, driver and connection errors
            # Machines that open a new database together race to create Optuna's tables: the
            # loser's CREATE fails on what the winner made; a moment later the tables are there.
            if attempt < SCHEMA_RACE_RETRIES and any(m in str(e) for m in ("duplicate key", "already exists")):
                time.sleep(0.5 * (attempt + 1))
                continue
            raise UserError(f"storage URL {url}: cannot connect: {first_line(e)}") from None
    raise AssertionError("unreachable")


def _check_sqlite(url: str, existing: bool) -> None:
    """Refuse a SQLite file that is there but is not an Optuna storage (``existing``: or is
    not there, or is empty): opening it as one writes Optuna's tables into it. It is read
    read-only, so its bytes and times stay as they are."""
    if not url.startswith("sqlite:///"):
        return
    path = Path(url.removeprefix("sqlite:///"))
    if not path.is_file():
        if existing:
            raise UserError(f"storage URL {url}: no such database file {path}")
        return
    if path.stat().st_size == 0:  # a new database, until Optuna makes its tables
        if existing:
            raise UserError(f"storage URL {url}: {path} is empty: it holds no study")
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as e:
        raise UserError(f"storage URL {url}: {path} is not a SQLite database ({first_line(e)})") from None
    if not {"studies", "version_info"} <= tables:
        raise UserError(
            f"storage URL {url}: {path} is a SQLite database but not an Optuna storage "
            "(no studies table); left as it is"
        )


def trial_log_dir(storage_url: str, study_name: str) -> Path:
    """Where a study's trial logs are kept: ``trials/<study>`` beside a SQLite database,
    else under the cache (``$AUTOTUNE_CACHE`` or ~/.cache/autotune)."""
    safe = study_name.replace("/", "_").replace(":", "_")
    prefix = "sqlite:///"
    if storage_url.startswith(prefix) and storage_url[len(prefix) :] not in ("", ":memory:"):
        return Path(storage_url[len(prefix) :]).expanduser().parent / "trials" / safe
    return trialmod.cache_root() / "trials" / safe


SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed: optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed, n_startup_trials=4),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "qmc": lambda seed: optuna.samplers.QMCSampler(seed=seed),
}


def open_study(
    name: str,
    storage: str,
    sampler: str,
    seed: int,
    *,
    identity: dict[str, str] | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """Create or load the study. ``identity`` (:func:`study_identity`) is what its figures are
    measured under: recorded by the first planner, and a later one under other settings is
    refused, since its figures would not compare with the study's."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")
    study = optuna.create_study(
        study_name=name,
        storage=make_storage(storage),
        sampler=SAMPLERS[sampler](seed),
        pruner=pruner if pruner is not None else ThroughputPruner(),
        direction="maximize",
        load_if_exists=True,
    )
    if identity is not None:
        check_identity(study, identity)
    return study


def study_identity(budget: TrialBudget, global_batch: int | None) -> dict[str, str]:
    """What a study's figures depend on besides the plan: the trial budget, the versions and
    the global batch."""
    import torch

    import autotune

    return {
        "warmup_steps": str(budget.warmup_steps),
        "timed_steps": str(budget.timed_steps),
        "torch": torch.__version__,
        "autotune": autotune.__version__,
        "global_batch": "searched" if global_batch is None else str(global_batch),
    }


def check_identity(study: optuna.Study, identity: dict[str, str]) -> None:
    """Record ``identity`` on a study that has none; refuse one that differs, naming each
    difference."""
    recorded = study.user_attrs.get("identity")
    if recorded is None:
        study.set_user_attr("identity", dict(identity))
        return
    differ = [
        f"{k} {recorded.get(k, 'unset')} (now {identity.get(k, 'unset')})"
        for k in sorted(set(recorded) | set(identity))
        if recorded.get(k) != identity.get(k)
    ]
    if differ:
        raise UserError(
            f"study {study.study_name} was measured under {', '.join(differ)}: "
            "use another --study, or the same settings"
        )


def ensure_first_trials(
    study: optuna.Study, space: SearchSpace, priors: list[dict[str, Any]], warm: list[WarmStart] | None = None
) -> None:
    """Enqueue the baseline (always trial 0), the warm starts (:func:`warm_starts`: measured
    elsewhere, so before the guesses) and the expert priors into a new study, once, none twice:
    planners that start together on one shared study (machines on a PostgreSQL or MySQL
    server, or processes on one SQLite file) take a lock in the database first, so only one
    enqueues."""
    with _study_lock(study):
        if study.get_trials(deepcopy=False):
            return
        first = baseline_params(space)
        study.enqueue_trial(first, user_attrs={"role": BASELINE})
        done = [first]
        for w in warm or []:
            if w.params not in done:
                study.enqueue_trial(w.params, user_attrs={"role": WARM_START, "source": w.source})
                done.append(w.params)
        for params in priors:
            if params not in done:
                study.enqueue_trial(params, user_attrs={"role": "prior"})
                done.append(params)


WARM_START_BEST = 3
"""A storage source warm-starts with the configurations of its best this many completed trials."""
WARM_START = "warm_start"


@dataclass(frozen=True, kw_only=True, slots=True)
class WarmStart:
    """One configuration of another search, translated into this space's params."""

    source: str
    """Where it comes from: a plan file, or ``URL#STUDY trial N``."""
    params: dict[str, Any]
    """The trial's params here (as :func:`baseline_params` spells them)."""


def warm_start_params(
    space: SearchSpace, sources: list[str], log: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """The legal configurations of ``sources`` (plan files, or storage URLs ``URL#STUDY``; a URL
    holding one study needs no name) as params of this space, in order, without repeats."""
    return [w.params for w in warm_starts(space, sources, log)]


def warm_starts(space: SearchSpace, sources: list[str], log: Callable[[str], None] | None = None) -> list[WarmStart]:
    """:func:`warm_start_params` with each one's source. A configuration that cannot run here
    (a layout this machine cannot hold, a check before launch fails) is dropped, with a line to
    ``log``; a source that cannot be read is a UserError."""
    say = log or (lambda line: None)
    out: list[WarmStart] = []
    for source in sources:
        for where, plan in _source_plans(source):
            try:
                params = plan_params(space, plan, log=lambda line, w=where: say(f"warm start {w}: {line}"))
            except UserError as e:
                say(f"warm start {where}: dropped, {e}")
                continue
            if params == baseline_params(space) or any(params == w.params for w in out):
                continue
            out.append(WarmStart(source=where, params=params))
    return out


def _source_plans(source: str) -> list[tuple[str, Plan]]:
    """The plans of one warm-start source: a plan file's, or a study's best completed trials'."""
    if "://" not in source:
        if not Path(source).is_file():
            raise UserError(f"--warm-start {source}: no such plan file (or give a storage URL, URL#STUDY)")
        return [(source, planmod.load(source))]
    url, _, name = source.partition("#")
    storage = make_storage(url, existing=True)
    names = [s.study_name for s in storage.get_all_studies()]
    if not name:
        if len(names) != 1:
            raise UserError(
                f"--warm-start {url}: holds {len(names)} studies "
                f"({', '.join(names) or 'none'}); name one as {url}#STUDY"
            )
        name = names[0]
    if name not in names:
        raise UserError(f"--warm-start {source}: no study {name} (there: {', '.join(names) or 'none'})")
    study = optuna.load_study(study_name=name, storage=storage)
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if "plan" in t.user_attrs
    ]
    best = sorted(complete, key=lambda t: -t.value)[:WARM_START_BEST]
    if not best:
        raise UserError(f"--warm-start {source}: study {name} has no completed trial")
    out = []
    for t in best:
        try:
            out.append((f"{url}#{name} trial {t.number}", plan_of(t)))
        except UserError as e:  # a plan of another autotune version's schema
            raise UserError(f"--warm-start {source}: trial {t.number}: {e}") from None
    return out


def plan_params(space: SearchSpace, plan: Plan, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``plan``'s configuration as this space's params (the reverse of :func:`suggest_plan`):
    strategies the space does not search dropped, the nearest micro-batch of the space, the
    most processes here up to the plan's, each knob's value where legal here (else its default,
    or the nearest end of its range). Raises UserError where the result cannot run here: the
    plan's layout does not fit, or a check applied before launch fails."""
    say = log or (lambda line: None)
    by_name = {s.name: s for s in space.strategies}
    given = {s.name: s.knobs for s in plan.strategies}
    dropped = sorted(
        n for n in given if n not in by_name and not (n == planmod.ACCUMULATION and space.global_batch is not None)
    )
    if dropped:
        say(f"{', '.join(dropped)} not searched here, left off")
    source_mb = plan.train.micro_batch_size
    micro_batch = min(space.micro_batches, key=lambda b: (abs(b - source_mb), b))
    if micro_batch != source_mb:
        say(f"micro-batch {source_mb} is not one of this search's, {micro_batch} instead")
    params: dict[str, Any] = {"micro_batch_size": micro_batch}
    wanted = plan.launch.nproc_per_node * plan.launch.nnodes
    processes = max([p for p in space.processes if p <= wanted] or [min(space.processes)])
    if processes != wanted:
        say(f"{wanted} processes, {processes} here")
    if len(space.processes) > 1:
        params["processes"] = processes
    parallel: dict[str, int] = {}
    mesh = [s for s in space.strategies if s.mesh_dim is not None and s.name in given]
    if processes == 1 and mesh:
        say(f"{', '.join(s.name for s in mesh)} left off (one process)")
    if processes > 1:
        ordered = (
            [s for s in mesh if s.mesh_dim == "dp"]
            + [s for s in mesh if s.mesh_dim == "tp"]
            + [s for s in mesh if s.mesh_dim == "pp"]
        )
        parallel = {s.name: int(given[s.name].get(s.degree_knobs[0], 0)) if s.mesh_dim != "dp" else 0 for s in ordered}
        layout = layout_name(parallel)
        if layout not in space.layouts.get(processes, []):
            raise UserError(f"layout {layout or 'none'} over {processes} processes is not one this machine can run")
        params[f"layout.{processes}"] = layout
    for strategy in space.strategies:
        if strategy.mesh_dim is not None:
            if strategy.name not in parallel:
                continue
        else:
            params[strategy.name] = strategy.name in given
            if strategy.name not in given:
                continue
        values = strategy.dump(strategy.default()) | dict(given[strategy.name])
        excluded = space.graph.excluded_choices(strategy.name)
        for knob in strategy.knobs:
            if strategy.name in parallel and knob.name == strategy.degree_knobs[0]:
                continue
            value = _legal_value(
                knob,
                values[knob.name],
                strategy.dump(strategy.default())[knob.name],
                set(excluded.get(knob.name, {})) | set(knob.refine_only),
            )
            if value != values[knob.name]:
                say(f"{strategy.name}.{knob.name} {values[knob.name]!r} is not legal here, {value!r} instead")
            params[f"{strategy.name}.{knob.name}"] = value
    check_legal(space, suggest_plan(optuna.trial.FixedTrial(params), space))
    return params


def _legal_value(knob: Knob, value: Any, default: Any, excluded: set[Any]) -> Any:
    """``value`` where ``knob`` may take it here; else the default, or the first legal choice,
    or the nearest end of the range."""
    if knob.choices:
        legal = [c for c in knob.choices if c not in excluded]
        if value in legal:
            return value
        return default if default in legal else legal[0]
    low, high = knob.low, knob.high
    clamped = min(max(value, low), high)
    return int(clamped) if knob.integer else float(clamped)


def check_legal(space: SearchSpace, plan: Plan) -> None:
    """The checks a trial passes before launch (:class:`Objective`): the graph, the settings,
    the processes and, on a device with known memory, the predicted peak. UserError if not."""
    plan.strategy_configs()
    space.graph.check([s.name for s in plan.strategies])
    check_settings(plan.strategy_configs(), workload=space.workload)
    check_processes(
        plan.launch.nproc_per_node * plan.launch.nnodes,
        plan.strategy_configs(),
        workload=space.workload,
        micro_batch_size=plan.train.micro_batch_size,
    )
    estimate = predict(space, plan) if space.device_memory else None
    if estimate is not None and estimate.peak_memory_bytes > MEMORY_HEADROOM * space.device_memory:
        raise UserError(
            f"predicted {estimate.peak_memory_bytes / 2**30:.1f} GiB "
            f"> {MEMORY_HEADROOM * space.device_memory / 2**30:.1f} GiB"
        )


PLANNER_ID = f"{socket.gethostname()}:{os.getpid()}"
"""Who ran a trial (host:pid), recorded on it: the machines sharing a study tell their trials apart."""


def stale_runs(study: optuna.Study, run: str, since: datetime.datetime) -> set[str]:
    """The planner runs other than ``run`` that ended before ``run`` began at ``since`` (a
    killed planner's, resumed now): none of their trials is running or started since. Their
    figures saw another load, so they are not compared with this run's unless measured again.
    Planners running beside this one on a shared study start trials after ``since``: not stale."""
    runs, alive = set(), {run}
    for t in study.get_trials(deepcopy=False):
        r = t.user_attrs.get("run")
        if r is None:
            continue
        runs.add(r)
        if t.state == optuna.trial.TrialState.RUNNING or (t.datetime_start is not None and t.datetime_start >= since):
            alive.add(r)
    return runs - alive


def stale(trial: optuna.trial.FrozenTrial, earlier: set[str]) -> bool:
    """Whether completed ``trial`` was measured by one of the ``earlier`` runs
    (:func:`stale_runs`), or by an autotune that recorded no run (before runs were)."""
    r = trial.user_attrs.get("run")
    return r is None or r in earlier


@contextlib.contextmanager
def _study_lock(study: optuna.Study) -> Iterator[None]:
    """A lock held in the study's database server for the block, on its own connection (the
    storage's other connections go on): PostgreSQL's advisory lock, MySQL's GET_LOCK. Nothing
    on SQLite, whose planners share one machine and so its device lock (trial.measuring), or
    in memory."""
    storage = getattr(study._storage, "_backend", study._storage)  # optuna's cache wraps the RDB storage
    engine = getattr(storage, "engine", None)
    if engine is None or engine.dialect.name not in ("postgresql", "mysql"):
        yield
        return
    import sqlalchemy

    key = zlib.crc32(f"autotune:{study.study_name}".encode())
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
        else:
            conn.execute(sqlalchemy.text("SELECT GET_LOCK(:k, 60)"), {"k": f"autotune-{key}"})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": f"autotune-{key}"})


def wait_for_others(
    study: optuna.Study, limit_s: float, *, poll_s: float = 2.0, log: Callable[[str], None] | None = None
) -> None:
    """Wait, at most ``limit_s``, for the trials other planners on this study still run, so
    that every planner of a shared search summarizes the same trials (and writes the same
    plan). A trial whose planner died is failed by its stale heartbeat on the way."""
    deadline = time.monotonic() + max(0.0, limit_s)
    said = False
    while True:
        optuna.storages.fail_stale_trials(study)
        running = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
        if not running or time.monotonic() >= deadline:
            return
        if log is not None and not said:
            log(f"waiting for {len(running)} trial(s) other planners on study {study.study_name} are running")
            said = True
        time.sleep(poll_s)


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


def shortest_like(study: optuna.Study, plan: Plan) -> tuple[int, float] | None:
    """The study's completed trial that compiles as ``plan`` does (or, like it, does not) with
    the shortest wall time, as (number, seconds); None before one has completed. Compilation
    decides a trial's time (a Mistral-style model on one H100: 66 s compiled, 21-23 s not; a
    compiled trial launched with 47 s left timed out, bench/results/issue26-h100-420s), and the
    shortest is what a trial of ``plan`` needs at the least: a shape compiled before comes from
    the cache."""
    compiles = any(s.name == "compile" for s in plan.strategies)
    like = [
        (t.number, float(t.user_attrs["wall_s"]))
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.user_attrs.get("wall_s")
        and "plan" in t.user_attrs
        and any(s["name"] == "compile" for s in t.user_attrs["plan"].get("strategies", ())) == compiles
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


def accumulation(global_batch: int, micro_batch: int, processes: int) -> int:
    """Micro-batches per optimizer step that make ``global_batch`` from ``micro_batch`` on
    each of ``processes`` data-parallel processes."""
    per_step = micro_batch * processes
    if global_batch % per_step:
        raise UserError(
            f"global batch {global_batch} is not a multiple of micro-batch {micro_batch} x {processes} processes"
        )
    return global_batch // per_step


def micro_batch_choices(largest: int, global_batch: int | None = None) -> tuple[int, ...]:
    """Micro-batches up to ``largest``; under a fixed global batch, those that divide it
    with at most MAX_ACCUM micro-batches a step (in one process: a trial over several
    processes whose micro-batch does not split it is pruned before launch)."""
    choices = tuple(b for b in MICRO_BATCHES if b <= largest)
    if global_batch is None:
        return choices
    fits = tuple(b for b in choices if global_batch % b == 0 and global_batch // b <= MAX_ACCUM)
    if not fits:
        raise UserError(
            f"global batch {global_batch}: no micro-batch of {', '.join(map(str, choices))} "
            f"divides it with at most {MAX_ACCUM} micro-batches a step"
        )
    return fits


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
