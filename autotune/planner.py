"""`autotune plan`, the driver: profile + workload → graph → search → confirmation → plan file."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune import catalog, search
from autotune.apply import DISTRIBUTING
from autotune import plan as planmod
from autotune.errors import UserError
from autotune.graph import StrategyGraph
from autotune.plan import Figures, LaunchSpec, LossCheck, Plan, StrategySpec, TrainSpec
from autotune.strategy import Facts
from autotune.trial import TrialBudget, optimizer_steps, run_trial
from autotune.workloads import Workload, load_workload

# Usable on a CPU but not worth a trial there: inductor's C++ build of even the tiny model
# takes minutes on 2 cores (measured 245 s for one trial), longer than the whole search.
CPU_LEFT_OUT = {"compile": "left out of CPU searches: its C++ code generation takes minutes, longer than a trial"}
EXACT_LOSS_TOLERANCE = 0.02  # bf16 against fp32 over a short run: rounding, not learning
APPROXIMATE_LOSS_TOLERANCE = 0.05  # an approximate plan may learn a little differently


@dataclass(kw_only=True, slots=True)
class PlanSettings:
    workload: str
    """Preset or package.module:factory."""
    trials: int | None = None
    """Stop when the study holds this many finished trials (resumed ones count)."""
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
    out: Path | None = None
    """Plan file; None: plans/<study>.plan.json."""
    profile: Path | None = None
    """Hardware profile of this machine; None: detect quickly (no measurements)."""
    device: str = "auto"
    """auto, cuda or cpu."""
    cpu_procs: int | None = None
    """Search runs of up to this many CPU processes (gloo) too; implies device cpu."""
    budget: TrialBudget = dataclasses.field(default_factory=TrialBudget)
    """Steps and time limit of each trial."""
    confirm_factor: int = 3
    """The confirmation run times this many times the trial's steps."""
    command: str | None = None
    """The command line, recorded in the plan."""


def _profile(settings: PlanSettings) -> Any:
    from autotune import hardware

    if settings.profile is None:
        return hardware.detect(quick=True)
    profile = hardware.HardwareProfile.load(settings.profile)
    if profile.fingerprint != hardware.current_fingerprint():
        raise UserError(f"profile {settings.profile} was made on another machine (fingerprint {profile.fingerprint}); run `autotune profile` here")
    return profile


def build_space(settings: PlanSettings, profile: Any, workload: Workload) -> tuple[search.SearchSpace, StrategyGraph]:
    if settings.cpu_procs is not None and (settings.cpu_procs < 1 or settings.device == "cuda"):
        raise UserError(f"--cpu-procs {settings.cpu_procs}: expected a positive number of CPU processes (and not --device cuda)")
    use_cuda = settings.device != "cpu" and settings.cpu_procs is None and bool(profile.gpus)
    if settings.device == "cuda" and not use_cuda:
        raise UserError("--device cuda: no CUDA GPU found on this machine")
    most = len(profile.gpus) if use_cuda else settings.cpu_procs or 1
    facts = Facts.of(profile if use_cuda else _cpu_only(profile), workload, processes=most)
    graph = StrategyGraph(facts, allow_approximate=settings.allow_approximate)
    left_out = {} if use_cuda else dict(CPU_LEFT_OUT)
    global_batch = workload.global_batch if settings.global_batch is None else (settings.global_batch or None)
    if global_batch is not None and global_batch < 1:
        raise UserError(f"--global-batch {global_batch}: expected a positive number of samples, or 0 to search it")
    # Under a fixed global batch the accumulation follows from the micro-batch: not a knob.
    derived = {"grad_accum"} if global_batch is not None else set()
    strategies = [catalog.get(n) for n in graph.usable() if n not in left_out and n not in derived]
    device_memory = float(profile.gpus[0].memory_bytes) if use_cuda else None
    rates: dict[str, float] = {}
    bandwidth = None
    if use_cuda:
        rates = {dtype: rate for dtype in ("fp32", "tf32", "bf16") if (rate := _rate(profile, dtype)) is not None}
        measured = profile.measured
        bandwidth = measured.copy.median if measured is not None and measured.copy is not None else None
    largest = 256 if use_cuda else 64
    train = TrainSpec(micro_batch_size=1, seed=0)
    launch = LaunchSpec(device="cuda" if use_cuda else "cpu")
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


def _process_counts(most: int) -> list[int]:
    """1, the powers of two below ``most``, and ``most``."""
    counts = [1]
    while counts[-1] * 2 < most:
        counts.append(counts[-1] * 2)
    return counts + ([most] if most > 1 else [])


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
        if estimate is None or space.device_memory is None or estimate.peak_memory_bytes < search.MEMORY_HEADROOM * space.device_memory:
            return b
    return min(space.micro_batches)


def expert_priors(space: search.SearchSpace) -> list[dict[str, Any]]:
    """What a careful engineer tries first, enqueued as the trials after the baseline (an
    Optuna warm start; TPE then searches around whichever measures best).

    On a GPU: bf16 + cuDNN (else flash) SDPA + compile + padded vocab + fused AdamW at
    micro-batch 48 (the hand-tuned phase8-small setting, with flash) and the same at micro-batch 96 (CUDA graphs are left to
    the search: they cannot run with accumulation, see strategies/compile.py). On a CPU: bf16 autocast (1.24x the fp32
    baseline on tiny on the 2-core dev machine, trial 1 against trial 0 in
    bench/results/cpu-procs/plan-2procs.log), and the largest micro-batch."""
    usable = {s.name for s in space.strategies}
    params: dict[str, Any] = {s.name: False for s in space.strategies if s.name not in DISTRIBUTING}
    if space.launch.device != "cuda":
        priors = [params | {"micro_batch_size": max(space.micro_batches)}]
        if "precision" in usable:
            bf16 = params | {"precision": True} | _with_defaults("precision", {"precision.dtype": "bf16", "precision.tf32": False})
            priors.insert(0, bf16 | {"micro_batch_size": space.baseline_micro_batch})
        return _with_processes(space, priors)
    # cuDNN's attention measured 1.049x flash's on phase8-small at micro-batch 96 on an H200
    # (bench/results/ab/attention_ab_h200.jsonl); flash where cuDNN's is excluded.
    excluded = space.graph.excluded_choices("attention").get("backend", {})
    backend = next((b for b in ("cudnn", "flash") if b not in excluded), "flash")
    wanted = {
        "precision": {"precision.dtype": "bf16", "precision.tf32": True},
        "attention": {"attention.backend": backend},
        "compile": {"compile.mode": "default", "compile.scope": "model"},
        "vocab_padding": {"vocab_padding.multiple": 64},
        "optimizer": {"optimizer.implementation": "fused"},
    }
    for name, knobs in wanted.items():
        if name in usable:
            params[name] = True
            params.update(_with_defaults(name, knobs))
    first = max([b for b in space.micro_batches if b <= 48] or space.micro_batches)
    priors = [params | {"micro_batch_size": first}]
    larger = [b for b in space.micro_batches if first < b <= 2 * first]
    if larger:
        priors.append(params | {"micro_batch_size": max(larger)})
    return _with_processes(space, priors)


def _with_processes(space: search.SearchSpace, priors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Priors of one process pinned to one process; where several are possible, the first
    prior again over all of them with DDP (the layout that pays first at these sizes)."""
    if len(space.processes) == 1:
        return priors
    out = [p | {"processes": 1} for p in priors]
    most = max(space.processes)
    if "ddp" in space.layouts.get(most, []):
        first = priors[0]
        fits = [b for b in space.micro_batches if space.global_batch is None or space.global_batch % (b * most) == 0]
        if fits:
            mb = max([b for b in fits if b <= first["micro_batch_size"]] or [min(fits)])
            out.insert(1, first | {"processes": most, f"layout.{most}": "ddp", "micro_batch_size": mb} | _with_defaults("ddp", {}))
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


def study_name(workload: str, fingerprint: str, global_batch: int | None = None) -> str:
    """``workload-fingerprint``; a global batch other than the recipe's (``global_batch``, 0
    for a searched one) is another recipe, so another study: ``workload-gbN-fingerprint``."""
    recipe = "" if global_batch is None else f"-gb{global_batch or 'free'}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{workload}{recipe}-{fingerprint}")


def confirm(plan: Plan, baseline: Plan | None, settings: PlanSettings) -> tuple[Figures, Figures | None, LossCheck | None]:
    """Run the best plan and the baseline again, longer and back to back (so the speed-up is
    measured under the same conditions), and a plain run on the plan's batches for the loss."""
    budget = dataclasses.replace(
        settings.budget,
        timed_steps=settings.budget.timed_steps * settings.confirm_factor,
        timeout_s=settings.budget.timeout_s * settings.confirm_factor,
    )
    measured = run_trial(plan, budget).figures
    base = run_trial(baseline, budget).figures if baseline is not None else None
    return measured, base, _loss_check(plan, measured, budget)


def _loss_check(plan: Plan, measured: Figures, budget: TrialBudget) -> LossCheck | None:
    if measured.status != "ok":
        return None
    # The plain reference keeps the global batch (part of the recipe): one process
    # accumulating what the plan's data-parallel processes train on. With one dp group it sees
    # the same batches in the same steps; with several, as many other batches of the corpus.
    dp = plan.global_batch() // (plan.train.micro_batch_size * plan.grad_accum())
    accum = plan.grad_accum() * dp
    plain = dataclasses.replace(
        plan,
        strategies=[StrategySpec(name="grad_accum", knobs={"steps": accum})] if accum > 1 else [],
        launch=dataclasses.replace(plan.launch, nproc_per_node=1, nnodes=1),
    )
    # Budgets count each process's micro-batches: the reference runs dp times as many, so
    # that both take the same optimizer steps.
    reference = run_trial(plain, dataclasses.replace(budget, warmup_steps=budget.warmup_steps * dp, timed_steps=budget.timed_steps * dp)).figures
    if reference.status != "ok":
        return None
    exact = all(catalog.get(s.name).exact for s in plan.strategies)
    tolerance = EXACT_LOSS_TOLERANCE if exact else APPROXIMATE_LOSS_TOLERANCE
    diff = abs(measured.loss_end / reference.loss_end - 1.0)
    return LossCheck(
        steps=sum(optimizer_steps(budget, plan.grad_accum())),
        loss_start=measured.loss_start,
        loss_end=measured.loss_end,
        reference_loss_start=reference.loss_start,
        reference_loss_end=reference.loss_end,
        tolerance=tolerance,
        passed=diff <= tolerance,
    )


def make_plan(settings: PlanSettings, *, on_result: Callable | None = None, log: Callable[[str], None] = print) -> tuple[Plan, search.Summary, search.SearchSpace]:
    workload = load_workload(settings.workload)
    profile = _profile(settings)
    space, graph = build_space(settings, profile, workload)
    if workload.config is not None and not space.train.random_tokens:
        from autotune import data

        data.default_dataset(workload.vocab_size)  # build once here, not in every trial
    recipe = None if settings.global_batch == workload.global_batch else settings.global_batch
    name = settings.study_name or study_name(settings.workload, profile.fingerprint, recipe)
    storage = settings.storage or "sqlite:///plans/studies.db"
    if storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    study = search.open_study(name, storage, settings.sampler, settings.seed)
    search.ensure_first_trials(study, space, expert_priors(space))
    objective = search.Objective(space=space, budget=settings.budget, on_result=on_result)
    search.optimize(study, objective, trials=settings.trials, time_budget=settings.time_budget)
    summary = search.summarize(study)
    if summary.best is None:
        raise RuntimeError(f"no trial of study {name} succeeded: {summary.counts}")
    best = search.plan_of(summary.best)
    log(f"confirming trial {summary.best.number} ({summary.best.value:,.0f} tokens/s) and the baseline with longer runs")
    baseline_plan = search.plan_of(summary.baseline) if summary.baseline else None
    measured, baseline, loss_check = confirm(best, baseline_plan, settings)
    plan = dataclasses.replace(
        best,
        hardware=planmod.HardwareSpec(fingerprint=profile.fingerprint, summary=profile.summary()),
        measured=measured,
        baseline=baseline,
        loss_check=loss_check,
        provenance=planmod.Provenance(
            torch_version=_torch_version(),
            study=name,
            trial=summary.best.number,
            created_at=planmod.utc_now(),
            command=settings.command,
        ),
    )
    out = settings.out or Path("plans") / f"{name}.plan.json"
    plan.save(out)
    return plan, summary, space


def _torch_version() -> str:
    import torch

    return torch.__version__
