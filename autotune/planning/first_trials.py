"""The first trials of a new study: the plain baseline, the warm starts (configurations
measured by another search, translated into this space) and the expert priors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from autotune import apply, catalog, devices
from autotune import plan as planmod
from autotune.contract.strategy import Knob, Prior, PriorFacts
from autotune.errors import UserError
from autotune.limits import usable_cores
from autotune.plan import Plan
from autotune.planning.objective import check_legal
from autotune.planning.space import SearchSpace, baseline_params, layout_name, searched_on, suggest_plan
from autotune.planning.study import make_storage, study_lock
from autotune.planning.summary import BASELINE, plan_of


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


def expert_priors(space: SearchSpace) -> list[dict[str, Any]]:
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


def _prior(space: SearchSpace, name: str, device: str, processes: int) -> Prior | None:
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


def _with_processes(space: SearchSpace, priors: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
