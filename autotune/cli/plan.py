"""`autotune plan`: search the strategies' settings by short real trials; write the winner."""

from __future__ import annotations

import contextlib
import math
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from autotune import devices
from autotune.cli.app import ARGS, app, started
from autotune.errors import UserError


@app.command("plan")
def plan_command(
    workload: Annotated[
        str,
        typer.Option(help="Preset (tiny, phase8-small, gpt2-124m, gpt-1b), hf:<model_type> or package.module:factory."),
    ] = "tiny",
    workload_config: Annotated[
        Optional[Path],
        typer.Option(
            help="Hugging Face model config: a config.json, or a local folder holding "
            "one (and its safetensors); with --workload hf or hf:<model_type>."
        ),
    ] = None,
    seq_len: Annotated[
        Optional[int],
        typer.Option(
            help="Tokens per sample (the workload's seq_len override; "
            "default for hf: and factory models: their positions, up to 1024)."
        ),
    ] = None,
    trials: Annotated[
        Optional[int], typer.Option(help="Finished trials the study should hold (resumed ones count).")
    ] = None,
    time_budget: Annotated[
        Optional[float],
        typer.Option(help="Seconds for the whole command, confirmation included (within max(15 s, 10%))."),
    ] = None,
    storage: Annotated[
        Optional[str], typer.Option(help="Optuna storage URL (default sqlite:///plans/studies.db).")
    ] = None,
    study: Annotated[
        Optional[str], typer.Option(help="Study name (default: workload and hardware fingerprint).")
    ] = None,
    global_batch: Annotated[
        Optional[int],
        typer.Option(help="Samples per optimizer step, kept fixed (default: the workload's recipe; 0: search it too)."),
    ] = None,
    sampler: Annotated[str, typer.Option(help="tpe (multivariate, seeded), random or qmc.")] = "tpe",
    seed: Annotated[int, typer.Option(help="Sampler seed.")] = 0,
    allow_approximate: Annotated[
        bool, typer.Option(help="Also search strategies that change what is learned.")
    ] = False,
    quality_tolerance: Annotated[
        float, typer.Option(help="Approximate plans' loss may end at most this much (relative) above the exact one's.")
    ] = 0.01,
    guard_steps: Annotated[
        int,
        typer.Option(
            help="Optimizer steps of the quality guard's runs (an approximate best trial and the best exact one, each)."
        ),
    ] = 200,
    out: Annotated[Optional[Path], typer.Option(help="Plan file to write (default plans/<study>.plan.json).")] = None,
    profile: Annotated[Optional[Path], typer.Option(help="Hardware profile of this machine (measured rates).")] = None,
    device: Annotated[str, typer.Option(help="auto, or a device: " + ", ".join(devices.names()) + ".")] = "auto",
    cpu_procs: Annotated[
        Optional[int],
        typer.Option(help="Also search runs of up to N CPU processes (gloo, torchrun); implies --device cpu."),
    ] = None,
    trial_steps: Annotated[int, typer.Option(help="Timed steps per trial.")] = 20,
    warmup_steps: Annotated[int, typer.Option(help="Warm-up steps per trial (compilation happens here).")] = 5,
    trial_seconds: Annotated[
        float, typer.Option(help="Timed seconds a trial aims for (at least one optimizer step, at most --trial-steps).")
    ] = 5.0,
    trial_timeout: Annotated[float, typer.Option(help="Seconds before a trial is killed.")] = 300.0,
    report: Annotated[Optional[Path], typer.Option(help="Write Optuna's plots (HTML) to this directory.")] = None,
    exclude: Annotated[
        Optional[list[str]],
        typer.Option(help="A strategy the search leaves out (`autotune strategies` lists them); repeatable."),
    ] = None,
    warm_start: Annotated[
        Optional[list[str]],
        typer.Option(
            help="A plan file, or a storage URL[#STUDY] (its best 3 trials), "
            "tried first after the baseline; repeatable."
        ),
    ] = None,
) -> None:
    """Search, confirm the best trial against the baseline (interleaved), and write it as a plan."""
    from autotune.planning.driver import make_plan
    from autotune.planning.settings import GUARD_STEPS_RANGE, NoTrialSucceeded, PlanSettings
    from autotune.runtime.trial import TrialBudget
    from autotune.schema import check_writable_dir

    if trials is None and time_budget is None:
        raise UserError("give --trials N and/or --time-budget SECONDS")
    if trials is not None and trials < 1:
        raise UserError("--trials must be positive")
    if time_budget is not None and not 0 < time_budget < math.inf:  # NaN fails this too
        raise UserError(f"--time-budget {time_budget:g}: expected a positive, finite number of seconds")
    if not 0 < quality_tolerance < 1:  # NaN fails this too
        raise UserError(
            f"--quality-tolerance {quality_tolerance:g}: expected a fraction above 0 and below 1 (0.01 is 1%)"
        )
    low, high = GUARD_STEPS_RANGE
    if not low <= guard_steps <= high:
        raise UserError(f"--guard-steps {guard_steps}: expected {low} to {high:,} optimizer steps")
    if device not in (devices.AUTO, *devices.names()):
        raise UserError(f"--device {device}: expected {', '.join((devices.AUTO, *devices.names()))}")
    if trial_steps < 1 or warmup_steps < 1:
        raise UserError("--trial-steps and --warmup-steps must be positive")
    if not 0 < trial_seconds < 3600:  # NaN and inf fail this too
        raise UserError(f"--trial-seconds {trial_seconds:g}: expected seconds above 0 and below 3600")
    from autotune.planning.objective import MIN_TRIAL_S

    if not trial_timeout >= MIN_TRIAL_S:  # also NaN; a trial starts python and torch first
        raise UserError(f"--trial-timeout {trial_timeout:g}: expected at least {MIN_TRIAL_S:g} seconds")
    if report is not None:
        check_writable_dir(report, "--report")
    overrides: dict[str, Any] = {}
    if workload_config is not None:
        from autotune.workloads.hf_config import from_command_line

        workload, overrides = from_command_line(workload, workload_config)
    if seq_len is not None:
        if seq_len < 1:
            raise UserError(f"--seq-len {seq_len}: expected a positive number of tokens")
        overrides["seq_len"] = seq_len
    settings = PlanSettings(
        workload=workload,
        workload_overrides=overrides,
        trials=trials,
        time_budget=time_budget,
        storage=storage,
        study_name=study,
        global_batch=global_batch,
        sampler=sampler,
        seed=seed,
        allow_approximate=allow_approximate,
        quality_tolerance=quality_tolerance,
        guard_steps=guard_steps,
        out=out,
        profile=profile,
        device=device,
        cpu_procs=cpu_procs,
        budget=TrialBudget(
            warmup_steps=warmup_steps, timed_steps=trial_steps, timeout_s=trial_timeout, target_s=trial_seconds
        ),
        command=shlex.join(["autotune", *ARGS]),
        warm_start=list(warm_start or []),
        exclude=tuple(exclude or ()),
        started_at=started(),
    )
    from rich.console import Console

    from autotune.cli.plan_view import Progress, TrialTable, print_summary

    console = Console()
    table = TrialTable(console)
    with warnings_to_log(storage):
        try:
            plan, summary, space = make_plan(
                settings,
                on_result=table.row,
                log=_plain(console),
                status=Progress(console, budget=time_budget, started=started()),
            )
        except NoTrialSucceeded as e:
            print(f"autotune: error: {e}", file=sys.stderr)
            raise typer.Exit(1) from None
        print_summary(
            console, plan, summary, space, settings.out or Path("plans") / f"{plan.provenance.study}.plan.json"
        )
        if report is not None:
            from autotune.report import write_report

            for path in write_report(plan.provenance.study, settings.storage or "sqlite:///plans/studies.db", report):
                console.print(f"report: {path}")


@contextlib.contextmanager
def warnings_to_log(storage: str | None) -> Iterator[None]:
    """Library warnings (Optuna's ExperimentalWarning, torch's UserWarnings) and Optuna's log
    go to plan.log beside the study (created at the first message; under the cache for a
    database server), not the screen, while the command runs; then as they were (a command
    run in-process leaves no handler on a file another command may remove)."""
    import logging

    import optuna

    url = storage or "sqlite:///plans/studies.db"
    if url.startswith("sqlite:///"):
        folder = Path(url.removeprefix("sqlite:///")).parent
    else:  # a database server: the log stays on this machine, under its cache
        from autotune.runtime.trial import cache_root

        folder = cache_root()
        folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / "plan.log", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger(name) for name in ("py.warnings", "optuna")]
    saved = [(list(logger.handlers), logger.propagate) for logger in loggers]
    verbosity = optuna.logging.get_verbosity()
    logging.captureWarnings(True)
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False
    optuna.logging.disable_default_handler()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        for logger, (handlers, propagate) in zip(loggers, saved):
            logger.handlers[:] = handlers  # Optuna's own screen handler too, where it was
            logger.propagate = propagate
        handler.close()
        logging.captureWarnings(False)
        optuna.logging.set_verbosity(verbosity)


def _plain(console: Any) -> Callable[[str], None]:
    """The planner's log lines, printed as text: they quote plans, studies and trial errors,
    someone else's text, so rich must not read markup (``[link=...]``) in them."""
    return lambda line: console.print(line, markup=False)
