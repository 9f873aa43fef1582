"""Every check a plan passes before anything is launched, on the CPU (STYLE.md 3).

:func:`plan` is the one entry point. ``autotune run`` and ``autotune show`` call it on the plan
they load (show passes no plan that run rejects), ``autotune run`` again before it starts
torchrun, the planner on each trial's plan before launching it (with the search's graph, which
also judges each strategy's needs on this machine), and every process that trains (the trial
child and each rank of a run, through the executor's ``Trainer``) before it builds the model.
``autotune.apply`` only applies.

What it checks, in this order, each refusal a one-line :class:`~autotune.errors.UserError`
naming the broken rule:

1. the knobs: each strategy's typed config (``Plan.strategy_configs``: their bounds, and knobs
   of one strategy that cannot go together);
2. the graph: the combination (an unknown or unimplemented strategy, a conflict, a requirement
   left out; ``autotune.graph``), and with ``graph`` each one's needs on this machine;
3. the settings (:func:`settings`): the model structure each strategy needs from the workload's
   adapter, each strategy's ``check_with`` (settings of the others its own exclude) and
   ``check_workload`` (settings the model cannot take);
4. the mesh (:func:`processes`): several processes need a strategy that splits the work, over a
   mesh whose dp × tp × pp factorisation holds for the model's shape and the micro-batch
   (``autotune.contract.mesh.mesh_shape``, which calls each strategy's ``check_mesh``);
5. the size (:func:`on_this_machine`, with ``machine=True``): the plan's processes and its predicted
   memory against this machine.

Rules of one strategy stay in it (``check_with``, ``check_workload``, ``check_mesh``, ``needs``):
this module reaches them through the contract and names none. What the hardware lacks is judged
where the strategies are applied (``TrainContext.check_needs``) unless ``graph`` is given, so
that a CUDA plan is still readable on a CPU machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autotune import catalog
from autotune.contract.mesh import mesh_shape
from autotune.contract.strategy import Chosen
from autotune.errors import UserError
from autotune.limits import count, device_here, size, usable_cores

if TYPE_CHECKING:
    from autotune.graph import StrategyGraph
    from autotune.plan import Plan

MAX_OVERSUBSCRIPTION = 4
"""CPU processes a core at most. More than one a core is allowed with a warning (each process
then runs slower than alone: the planner's trials measured that, a hand-written plan may not;
``autotune.limits.warn_if_oversubscribed``)."""
EVAL_BYTES_PER_TOKEN = 20
"""What the validation batches hold a token, all evaluations long (``data.val_batches``): its
int32 window on the host, its int64 input and target on the device."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Checked:
    """What :func:`plan` found while checking: what a caller would otherwise count again."""

    workload: Any
    """The plan's Workload (without a shape where it was loaded here for a factory: reading
    one builds the model)."""
    mesh: tuple[int, int, int]
    """(dp, tp, pp) of the plan's processes."""
    fit: Fit | None = None
    """The plan's size on this machine (``machine=True``; None where the shape is not known)."""


def plan(
    plan: Plan, *, machine: bool, workload: Any = None, graph: StrategyGraph | None = None, trusted: bool = True
) -> Checked:
    """Check ``plan`` completely before anything is launched; UserError naming the broken rule.

    ``workload``: the plan's, already loaded (the planner's, the executor's); None: loaded here,
    its module imported only when ``trusted``, a preset's shape counted from its config (no
    torch: ``autotune show``), a factory's not read. ``graph``: the search's StrategyGraph, which
    also refuses a strategy whose needs this machine lacks; None: the combination is judged on
    any machine. ``machine``: also the plan's processes and memory against this machine
    (:func:`on_this_machine`)."""
    if workload is None:
        from autotune.workloads import load_workload

        workload = load_workload(plan.workload.name, plan.workload.overrides, trusted=trusted, with_shape=False)
    configs = plan.strategy_configs()
    if graph is not None:
        graph.check(configs)
    else:
        from autotune.graph import check_combination

        check_combination(configs)
    settings(configs, workload=workload)
    world = plan.launch.nproc_per_node * plan.launch.nnodes
    mesh = processes(world, configs, workload=workload, micro_batch_size=plan.train.micro_batch_size)
    fit = on_this_machine(plan, workload) if machine else None
    return Checked(workload=workload, mesh=mesh, fit=fit)


def settings(chosen: dict[str, Any], *, workload: Any = None) -> None:
    """Refuse settings of two strategies that cannot run together, with a one-line UserError
    naming the rule: each strategy may declare ``check_with(chosen)`` for the settings
    its own knobs exclude in the others (compile's CUDA graphs exclude accumulation). Whole
    strategies that conflict are graph edges instead. With ``workload``, each strategy's
    ``check_workload`` refuses settings the model cannot take (a window above seq_len), and
    a strategy that needs structure the model's adapter lacks (TP on a model with no TP plan)
    is refused before anything is launched."""
    declared = {name: catalog.get(name) for name in chosen}
    for name, strategy in declared.items():
        missing = sorted(strategy.needs.structure - frozenset(workload.structure)) if workload is not None else []
        if missing:
            raise UserError(
                f"strategy {name} needs the workload to support {', '.join(missing)}; {workload.name} does not "
                "(`autotune strategies --workload ... --explain` lists what it supports)"
            )
        if strategy.check_with is not None:
            strategy.check_with(Chosen(chosen, declared))
        if workload is not None and strategy.check_workload is not None:
            strategy.check_workload(chosen[name], workload)


def processes(
    world_size: int, chosen: Any, *, workload: Any = None, micro_batch_size: int | None = None
) -> tuple[int, int, int]:
    """A run of several processes must split its work with one of ``apply.distributing()``, over
    a mesh whose dp × tp × pp factorisation holds (``autotune.contract.mesh.mesh_shape``, which
    names the broken rule); ``workload`` and ``micro_batch_size`` add the model's and the batch's
    checks. Returns (dp, tp, pp)."""
    from autotune.apply import distributing

    split = distributing()
    if world_size > 1 and not set(chosen) & set(split):
        raise UserError(
            f"a run of {world_size} processes needs one of the "
            f"strategies {', '.join(split)} (or launch.nproc_per_node 1)"
        )
    return mesh_shape(world_size, chosen, workload=workload, micro_batch_size=micro_batch_size)


@dataclass(kw_only=True, slots=True)
class Fit:
    """What :func:`on_this_machine` counted: the figures ``autotune show`` prints."""

    parameters: int
    """Parameters of the model (all of them, counted from its shape)."""
    peak_memory_bytes: float
    """Predicted peak memory of one process: the cost model's, plus the validation batches."""
    memory_bytes: int | None
    """Memory of the device each process trains on here (host RAM shared by the CPU processes);
    None where the plan trains on a device this machine lacks (its memory is not checked)."""
    where: str
    """That memory, in words ("RAM")."""

    def line(self) -> str:
        """One line: the estimate, and what it was checked against."""
        against = (
            f"; this machine has {size(self.memory_bytes)} of {self.where}"
            if self.memory_bytes is not None
            else f" ({self.where}: no GPU here to check it against)"
        )
        return (
            f"{count(self.parameters)} parameters, peak memory about {size(self.peak_memory_bytes)} a process{against}"
        )


def on_this_machine(plan: Any, workload: Any) -> Fit | None:
    """Refuse ``plan`` (a UserError naming the numbers) if its processes or its memory exceed
    this machine. Each setting of a plan is bounded on load; their product is not: a model of
    16 million layers, a validation pass of a million micro-batches, or more processes than the
    node has cores or GPUs pass every bound and then exhaust the machine. The model's size is
    counted arithmetically (the cost model's estimate over the shape read off a model built on
    the meta device, deep ones from their first blocks). Returns what was counted; None for a
    user's model whose shape is not known, and in a rank of a run (its launching command
    checked the plan)."""
    from autotune import costmodel
    from autotune.workloads import shaped

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a rank of a run: its launching command checked the plan
        return None
    launch, train = plan.launch, plan.train
    on_accelerator, devices, where, memory = device_here(launch.device)
    nproc = launch.nproc_per_node
    if on_accelerator and devices is not None and nproc > devices:
        raise UserError(f"the plan runs {nproc:,} processes a node, one per GPU, but this machine has {devices} GPU(s)")
    if not on_accelerator:
        cores = usable_cores()
        if nproc > cores * MAX_OVERSUBSCRIPTION:
            raise UserError(
                f"the plan runs {nproc:,} processes a node on the CPU, but this machine has {cores} core(s) "
                f"(at most {MAX_OVERSUBSCRIPTION} processes a core)"
            )
    workload = shaped(workload) if workload.shape is None else workload
    if workload.shape is None:
        return None
    shape = workload.shape
    configs = plan.strategy_configs()
    estimate = costmodel.estimate(workload, train.micro_batch_size, configs, processes=nproc * launch.nnodes)
    eval_tokens = train.eval_batches * train.micro_batch_size * (shape.seq_len + 1) if train.eval_interval else 0
    peak = estimate.peak_memory_bytes + EVAL_BYTES_PER_TOKEN * eval_tokens
    fit = Fit(parameters=costmodel.parameters(shape), peak_memory_bytes=peak, memory_bytes=memory, where=where)
    need = peak * (1 if on_accelerator else nproc)  # the CPU processes share the host's memory
    if memory is not None and need > memory:
        parts = estimate.breakdown
        state = parts["weights"] + parts["optimizer"] + parts["gradients"]
        evals = (
            f", {size(EVAL_BYTES_PER_TOKEN * eval_tokens)} for {train.eval_batches:,} validation micro-batches"
            if eval_tokens
            else ""
        )
        shared = (
            f"its {nproc} processes share this machine's {size(memory)} of {where}"
            if need != peak
            else f"this machine has {size(memory)} of {where}"
        )
        raise UserError(
            f"the plan needs about {size(peak)} a process: {size(state)} for the training state "
            f"({count(fit.parameters)} parameters in {shape.n_layers:,} layers), "
            f"{size(parts['activations'] + parts['logits'])} for activations at micro-batch "
            f"{train.micro_batch_size:,}{evals}; {shared}"
        )
    return fit
