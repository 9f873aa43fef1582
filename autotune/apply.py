"""Applies the chosen strategies in the order of their phases (``autotune.contract.order``), and
checks a plan before anything starts."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from autotune import catalog
from autotune.contract.mesh import mesh_shape
from autotune.contract.order import application_order
from autotune.errors import UserError

if TYPE_CHECKING:
    from autotune.contract.context import TrainContext


@functools.cache
def order() -> tuple[str, ...]:
    """The catalog's strategies in the order they are applied: by phase, then by what they read
    and change (``autotune.contract.order``). A strategy missing from a plan is skipped."""
    return application_order(catalog.catalog())


def distributing() -> tuple[str, ...]:
    """Strategies that split the work over processes (each declares its ``mesh_dim``), in
    :func:`order`; a run of several processes needs one, or each process would train a model of its own."""
    strategies = catalog.catalog()
    return tuple(name for name in order() if strategies[name].mesh_dim is not None)


def apply_strategies(ctx: TrainContext, chosen: dict[str, Any]) -> None:
    """Apply ``chosen`` (strategy name -> typed config) to ``ctx`` in :func:`order`."""
    unordered = set(chosen) - set(order())
    if unordered:
        raise UserError(f"strategy {sorted(unordered)[0]} has no place in the order of application")
    check_processes(ctx.processes, chosen, workload=ctx.workload)
    check_settings(chosen, workload=ctx.workload)
    for name in order():
        if name not in chosen:
            continue
        strategy = catalog.get(name)
        if strategy.apply is None:
            raise UserError(f"strategy {name} is not implemented yet ({strategy.issue})")
        strategy.apply(ctx, chosen[name])


def check_plan(plan: Any, *, trusted: bool = True) -> Any:
    """Check a whole plan before anything starts; returns its Workload. ``autotune run`` and
    ``autotune show`` call it alike, so show passes no plan that run rejects.

    Loading the plan already checked its schema, every train setting and each strategy's
    knobs (their configs' legal bounds). Here: the workload (imported only when ``trusted``),
    the strategies' combination (graph conflicts and requires), each one's ``check_with``,
    and the mesh over the plan's processes with the model's shape and the micro-batch (a
    factory's workload is returned without one: reading it builds the model). What the
    hardware needs stays checked where strategies are applied (``TrainContext``), so a CUDA
    plan is still readable on a CPU machine."""
    from autotune.graph import check_combination
    from autotune.workloads import load_workload

    # A preset's shape is counted from its config, with no torch (autotune show); a factory's
    # is not read here (its model would be built).
    workload = load_workload(plan.workload.name, plan.workload.overrides, trusted=trusted, with_shape=False)
    configs = plan.strategy_configs()
    check_combination(configs)
    check_settings(configs, workload=workload)
    world = plan.launch.nproc_per_node * plan.launch.nnodes
    check_processes(world, configs, workload=workload, micro_batch_size=plan.train.micro_batch_size)
    return workload


def check_processes(world_size: int, chosen: Any, *, workload: Any = None, micro_batch_size: int | None = None) -> None:
    """A run of several processes must split its work with one of :func:`distributing`, over a mesh
    whose dp × tp × pp factorisation holds (``autotune.contract.mesh.mesh_shape``, which names the
    broken rule); ``workload`` and ``micro_batch_size`` add the model's and the batch's checks."""
    split = distributing()
    if world_size > 1 and not set(chosen) & set(split):
        raise UserError(
            f"a run of {world_size} processes needs one of the "
            f"strategies {', '.join(split)} (or launch.nproc_per_node 1)"
        )
    mesh_shape(world_size, chosen, workload=workload, micro_batch_size=micro_batch_size)


def check_settings(chosen: dict[str, Any], *, workload: Any = None) -> None:
    """Refuse settings of two strategies that cannot run together, with a one-line UserError
    naming the rule: each strategy may declare ``check_with(chosen)`` for the settings
    its own knobs exclude in the others (compile's CUDA graphs exclude accumulation). Whole
    strategies that conflict are graph edges instead. With ``workload``, each strategy's
    ``check_workload`` refuses settings the model cannot take (a window above seq_len), and
    a strategy that needs structure the model's adapter lacks (TP on a model with no TP plan)
    is refused before anything is launched."""
    for name in chosen:
        strategy = catalog.get(name)
        missing = sorted(strategy.needs.structure - frozenset(workload.structure)) if workload is not None else []
        if missing:
            raise UserError(
                f"strategy {name} needs the workload to support {', '.join(missing)}; {workload.name} does not "
                "(`autotune strategies --workload ... --explain` lists what it supports)"
            )
        if strategy.check_with is not None:
            strategy.check_with(chosen)
        if workload is not None and strategy.check_workload is not None:
            strategy.check_workload(chosen[name], workload)
