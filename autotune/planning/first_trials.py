"""The first trials of a new study: the plain baseline, the warm starts (configurations
measured by another search, translated into this space) and the expert priors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from autotune import plan as planmod
from autotune.errors import UserError
from autotune.plan import Plan
from autotune.planning.objective import check_legal
from autotune.planning.space import SearchSpace, baseline_params, layout_name, suggest_plan
from autotune.planning.study import make_storage, study_lock
from autotune.planning.summary import BASELINE, plan_of
from autotune.strategy import Knob


def ensure_first_trials(
    study: optuna.Study, space: SearchSpace, priors: list[dict[str, Any]], warm: list[WarmStart] | None = None
) -> None:
    """Enqueue the baseline (always trial 0), the warm starts (:func:`warm_starts`: measured
    elsewhere, so before the guesses) and the expert priors into a new study, once, none twice:
    planners that start together on one shared study (machines on a PostgreSQL or MySQL
    server, or processes on one SQLite file) take a lock in the database first, so only one
    enqueues."""
    with study_lock(study):
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
