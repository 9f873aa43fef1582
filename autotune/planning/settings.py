"""What ``autotune plan`` is asked to do (:class:`PlanSettings`, with the defaults of its
flags), and the hardware profile it plans for, checked to be this machine's."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune.errors import UserError
from autotune.runtime.trial import TrialBudget

QUALITY_TOLERANCE = 0.01
"""The quality guard's default (--quality-tolerance): an approximate plan's loss may be this much
(relative) above the exact reference's on the same batches at equal steps; lower is always fine."""
GUARD_STEPS = 200
"""The quality guard's default length (--guard-steps): optimizer steps of an approximate plan
and of the study's best exact configuration, each, on the same real-text batches."""
GUARD_STEPS_RANGE = (10, 100_000)
"""--guard-steps' legal range: at least ten steps so the last 10% is a step."""
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
    baseline, before the expert priors (:func:`autotune.planning.first_trials.warm_starts`)."""
    started_at: float | None = None
    """When the command began, on time.monotonic(), what ``time_budget`` counts from; None: when
    :func:`~autotune.planning.driver.make_plan` is called."""


class NoTrialSucceeded(RuntimeError):
    """Every trial of the study failed or was pruned: there is nothing to confirm."""


def load_profile(settings: PlanSettings) -> Any:
    """The hardware profile to plan for: ``settings.profile``, refused when made on another
    machine; else the one `autotune profile` saved, where it is this machine's; else detected
    quickly (no measurements)."""
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
