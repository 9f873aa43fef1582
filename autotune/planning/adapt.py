"""A plan made on another machine, adapted to this one (``autotune run --adapt``): measured
here as it is by a short validation trial when it can run here, else re-planned with itself
as the first trial after the baseline; written beside it with both machines' figures."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from autotune import devices
from autotune.errors import UserError


def adapted_path(plan_path: Path) -> Path:
    """Where ``--adapt`` writes: NAME.adapted.plan.json beside NAME.plan.json (or NAME.json)."""
    name = plan_path.name
    stem = name.removesuffix(".plan.json") if name.endswith(".plan.json") else plan_path.stem
    return plan_path.with_name(f"{stem}.adapted.plan.json")


def adapt(
    plan: Any,
    plan_path: Path,
    time_budget: float,
    *,
    command: str,
    started_at: float,
    log: Callable[[str], None],
    quiet: Callable[[str | None], AbstractContextManager[None]] = lambda storage: contextlib.nullcontext(),
) -> tuple[Any, Path]:
    """The plan made elsewhere, for this machine: measured here as it is (a short validation
    trial) when it can run here, else re-planned (within ``time_budget`` seconds from
    ``started_at``, under ``quiet(storage)``: where the library warnings of a search go); written
    beside it with both machines' figures (``adapted_from``). Returns the adapted plan and its
    path. A re-plan of which no trial succeeded raises
    :class:`~autotune.planning.settings.NoTrialSucceeded`."""
    from autotune import hardware
    from autotune import plan as planmod
    from autotune.data import plan_data_identity
    from autotune.planning.driver import make_plan
    from autotune.planning.settings import PlanSettings
    from autotune.runtime import trial
    from autotune.schema import check_writable

    out = adapted_path(plan_path)
    check_writable(out, "adapted plan")
    origin = planmod.Adaptation(
        plan=str(plan_path),
        how="validated",
        hardware=plan.hardware,
        measured=plan.measured,
        data_identity=plan.data_identity,
    )
    why_not = illegal_here(plan)
    if why_not is None:
        budget = trial.TrialBudget(warmup_steps=2, timed_steps=5, timeout_s=time_budget)
        result = trial.run_trial(plan, budget)
        if result.figures.status != "ok":
            why_not = f"its validation trial here ended {result.figures.status}"
    if why_not is None:
        here = hardware.current_summary()
        adapted = dataclasses.replace(
            plan,
            hardware=planmod.HardwareSpec(fingerprint=here["fingerprint"], summary=here),
            measured=result.figures,
            baseline=None,  # measured there: the comparison with it does not hold here
            comparison=None,
            data_identity=plan_data_identity(plan),
            adapted_from=origin,
            provenance=dataclasses.replace(plan.provenance, created_at=planmod.utc_now(), command=command),
        )
    else:
        why = f"the plan cannot run here as it is ({why_not})"
        log(f"{why}: re-planning within {time_budget:g} s")
        settings = PlanSettings(
            workload=plan.workload.name,
            workload_overrides=dict(plan.workload.overrides),
            time_budget=time_budget,
            global_batch=plan.global_batch(),
            out=out,
            command=command,
            warm_start=[
                str(plan_path)
            ],  # the plan, translated to what is legal here, is the first trial after the baseline
            started_at=started_at,
        )
        with quiet(settings.storage):  # Optuna's log to plan.log, as `autotune plan` does
            made, _, _ = make_plan(settings, log=log)
        # The search chose how to train here (strategies, launch, micro-batch); what to train is
        # the plan's own: its data, steps, schedule and seed.
        train = dataclasses.replace(plan.train, micro_batch_size=made.train.micro_batch_size)
        adapted = dataclasses.replace(made, train=train, adapted_from=dataclasses.replace(origin, how="replanned"))
        adapted = dataclasses.replace(adapted, data_identity=plan_data_identity(adapted))
    adapted.save(out)
    return adapted, out


def illegal_here(plan) -> str | None:
    """Why ``plan`` cannot run on this machine as it is (None: it can): its device, its
    process count, its nodes."""
    from autotune import validate
    from autotune.workloads import load_workload

    launch = plan.launch
    if launch.nnodes > 1:
        return f"it spans {launch.nnodes} nodes"
    kind = devices.planned(launch.device)
    if kind.accelerator and not kind.is_available():
        return f"it runs on {kind.words} and this machine has no {kind.words} GPU"
    if kind.accelerator and launch.nproc_per_node > kind.count():
        return f"it runs {launch.nproc_per_node} processes, one per GPU, on {kind.count()} GPUs"
    workload = load_workload(plan.workload.name, plan.workload.overrides)
    try:
        validate.plan(plan, machine=False, workload=workload)
    except UserError as e:
        return str(e)
    return None
