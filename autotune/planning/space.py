"""The search space: what a trial may choose, and the plan a trial's parameters make.

Define-by-run: a strategy's knobs exist only in trials where the strategy is on
(:func:`suggest_plan`, which a ``FixedTrial`` replays). The first trial is always the plain
baseline (:func:`baseline_params`), so every plan carries a speed-up measured in the same search.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import optuna

from autotune import catalog, costmodel, devices
from autotune import plan as planmod
from autotune.contract.mesh import data_parallel, mesh_shape
from autotune.contract.strategy import Facts, Knob, SearchFacts, Strategy
from autotune.errors import UserError
from autotune.graph import StrategyGraph
from autotune.limits import usable_cores
from autotune.plan import LaunchSpec, Plan, StrategySpec, TrainSpec
from autotune.planning.settings import PlanSettings
from autotune.workloads import Workload

MICRO_BATCHES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MEMORY_HEADROOM = 0.92  # prune a trial predicted to use more than this share of the device
MAX_ACCUM = 64  # more micro-batches a step than this only ever loses: each trial times 3+ steps


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


def _suggest_knob(trial: optuna.Trial, name: str, knob: Knob, choices: list[Any] | None) -> Any:
    key = f"{name}.{knob.name}"
    if choices is not None:
        return trial.suggest_categorical(key, choices)
    if knob.integer:
        return trial.suggest_int(key, int(knob.low), int(knob.high), log=knob.log)
    return trial.suggest_float(key, float(knob.low), float(knob.high), log=knob.log)


def knob_choices(space: SearchSpace, strategy: Strategy) -> dict[str, list[Any]]:
    """The choices each categorical knob of ``strategy`` is searched among here: its own, less
    those that cannot run on this machine (``StrategyGraph.excluded_choices``: a package not
    installed, another device) and those only refinement tries."""
    excluded = space.graph.excluded_choices(strategy.name)
    out = {}
    for knob in strategy.knobs:
        if knob.choices:
            left_out = {**excluded.get(knob.name, {}), **dict.fromkeys(knob.refine_only, "refinement only")}
            out[knob.name] = [c for c in knob.choices if c not in left_out]
    return out


def categorical_choices(space: SearchSpace) -> dict[str, list[Any]]:
    """Every categorical parameter :func:`suggest_plan` may ask of a trial here, with its
    choices: what a study's earlier trials must have been searched among to go on here
    (``study.check_choices``)."""
    out: dict[str, list[Any]] = {"micro_batch_size": list(space.micro_batches)}
    if len(space.processes) > 1:
        out["processes"] = list(space.processes)
    for processes, layouts in space.layouts.items():
        out[f"layout.{processes}"] = list(layouts)
    for strategy in space.strategies:
        if strategy.mesh_dim is None:
            out[strategy.name] = [True, False]
        for knob, choices in knob_choices(space, strategy).items():
            if strategy.mesh_dim is None or knob != strategy.degree_knobs[0]:  # a degree is the layout's
                out[f"{strategy.name}.{knob}"] = choices
    return out


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
        choices = knob_choices(space, strategy)
        knobs = {}
        for knob in strategy.knobs:
            if strategy.name in parallel and knob.name == strategy.degree_knobs[0]:
                knobs[knob.name] = parallel[strategy.name]
            else:
                knobs[knob.name] = _suggest_knob(trial, strategy.name, knob, choices.get(knob.name))
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


def tokens_per_step(space: SearchSpace, plan: Plan) -> int:
    return plan.global_batch() * space.workload.seq_len


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


def build_space(settings: PlanSettings, profile: Any, workload: Workload) -> tuple[SearchSpace, StrategyGraph]:
    asked = None if settings.device == devices.AUTO else devices.get(settings.device)
    if settings.cpu_procs is not None and (settings.cpu_procs < 1 or (asked is not None and asked.accelerator)):
        others = " or ".join(f"--device {d.name}" for d in devices.accelerators())
        raise UserError(
            f"--cpu-procs {settings.cpu_procs}: expected a positive number of CPU processes (and not {others})"
        )
    kind, found = devices.in_profile(profile)
    on_accelerator = kind.accelerator and settings.cpu_procs is None and asked in (None, kind)
    if asked is not None and asked.accelerator and not on_accelerator:
        raise UserError(f"--device {asked.name}: no {asked.words} device found on this machine")
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
    device_memory = _device_memory(profile, kind) if on_accelerator else None
    rates: dict[str, float] = {}
    bandwidth = None
    if on_accelerator:
        rates = {dtype: rate for dtype in ("fp32", "tf32", "bf16") if (rate := _rate(profile, dtype)) is not None}
        measured = profile.measured
        bandwidth = measured.copy.median if measured is not None and measured.copy is not None else None
    largest = 256 if on_accelerator else 64
    train = TrainSpec(micro_batch_size=1, seed=0)
    launch = LaunchSpec(device=launch_device)
    space = SearchSpace(
        workload=workload,
        strategies=strategies,
        graph=graph,
        micro_batches=micro_batch_choices(largest, global_batch),
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
        found = layouts(n, usable, graph, workload)
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


def searched_on(space: SearchSpace) -> str:
    """The kind of device a search's trials run on: its launch's, the CPU for "auto"."""
    return devices.CPU if space.launch.device == devices.AUTO else space.launch.device


def _device_memory(profile: Any, kind: devices.Device) -> float | None:
    """One accelerator's memory: its GPU record's, else its kind's own (a TPU's datasheet HBM);
    None where unknown (XLA's CPU backend shares the host's RAM)."""
    if profile.gpus:
        return float(profile.gpus[0].memory_bytes)
    memories = kind.memories()
    return float(memories[0][1]) if memories else None


def _cpu_only(profile: Any) -> Any:
    return dataclasses.replace(profile, gpus=[], links=[])


def _rate(profile: Any, dtype: str) -> float | None:
    try:
        return profile.peak_flops(dtype)[0]
    except UserError:
        return None


def _baseline_micro_batch(space: SearchSpace) -> int:
    """The largest of 16, 8, 4, 2, 1 that the plain run is predicted to fit (else the
    smallest micro-batch there is)."""
    for b in (16, 8, 4, 2, 1):
        if b not in space.micro_batches:
            continue
        estimate = predict(space, plan_for(space, b, []))
        if (
            estimate is None
            or space.device_memory is None
            or estimate.peak_memory_bytes < MEMORY_HEADROOM * space.device_memory
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
