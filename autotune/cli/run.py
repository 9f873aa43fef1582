"""`autotune run PLAN`: train with a plan.

A plan of several processes (``launch.nproc_per_node > 1``) starts them here: this command
runs itself again under torchrun, once per process, and waits. Rank 0 prints and writes.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import secrets
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer

from autotune import devices
from autotune.cli.app import ARGS, app, started
from autotune.errors import UserError


@app.command("run")
def run_command(
    plan_path: Annotated[Path, typer.Argument(metavar="PLAN", help="Plan file (JSON).")],
    steps: Annotated[
        Optional[int],
        typer.Option(
            help="Train to this many optimizer steps, the lr schedule's length too (default: the plan's train.steps)."
        ),
    ] = None,
    tokens: Annotated[Optional[int], typer.Option(help="Train on about this many tokens instead.")] = None,
    minutes: Annotated[Optional[float], typer.Option(help="Stop after this many minutes.")] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(help="Directory for log.jsonl, checkpoints/ and summary.json (default: runs/<UTC time>/)."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(help="Continue from the newest complete checkpoint in --out (from step 0 when there is none)."),
    ] = False,
    data: Annotated[
        Optional[str], typer.Option(help="Data directory (from `autotune data prepare`); overrides the plan.")
    ] = None,
    profile: Annotated[Optional[Path], typer.Option(help="Hardware profile of this machine, for measured MFU.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    node_rank: Annotated[
        Optional[int],
        typer.Option(help="This node's rank in a plan of several nodes (default: the rendezvous assigns it)."),
    ] = None,
    trust_workload: Annotated[
        bool,
        typer.Option(help="Import the plan's workload module even if it is not a built-in preset (runs its code)."),
    ] = False,
    adapt: Annotated[
        bool,
        typer.Option(
            help="A plan made on other hardware: measure it here (or re-plan if it cannot run here), "
            "write NAME.adapted.plan.json beside it, and run that."
        ),
    ] = False,
    time_budget: Annotated[
        float, typer.Option(help="With --adapt: seconds for the validation trial or the re-plan.")
    ] = 120.0,
) -> None:
    """Train with PLAN: log every step, evaluate, checkpoint, resume. SIGINT/SIGTERM/SIGHUP stop
    it after the current step with a checkpoint and the summary (exit 130/143/129)."""
    from autotune import distributed
    from autotune import plan as planmod
    from autotune.runtime import rundir, trainer
    from autotune.runtime.metrics import tokens_per_step
    from autotune.runtime.process import die_with_launcher

    launched = os.environ.get(rundir.LAUNCHER_ENV)
    if launched is not None:  # a rank of a run that `autotune run` started under torchrun
        die_with_launcher(int(launched))

    if steps is not None and tokens is not None:
        raise UserError("give --steps or --tokens, not both")
    for name, value in (("steps", steps), ("tokens", tokens), ("minutes", minutes), ("time-budget", time_budget)):
        if value is not None and not 0 < value < math.inf:  # NaN fails this too
            raise UserError(f"--{name} {value:g}: expected a positive, finite number")
    if steps is not None and steps > planmod.MAX_STEPS:
        raise UserError(f"--steps {steps}: a run trains at most {planmod.MAX_STEPS} steps")
    if profile is not None and not profile.exists():
        raise UserError(f"profile {profile}: no such file")
    plan = planmod.load(plan_path)
    if node_rank is not None:
        if not 0 <= node_rank < plan.launch.nnodes:
            raise UserError(
                f"--node-rank {node_rank}: the plan has {plan.launch.nnodes} node(s), ranks 0..{plan.launch.nnodes - 1}"
            )
        plan.launch.node_rank = node_rank
    from autotune import validate

    validate.plan(plan, machine=True, trusted=trust_workload)  # the whole plan and its size here, before anything
    args = list(ARGS)
    if distributed.env_world_size() == 1 and (difference := planmod.other_machine(plan)):
        if not adapt:
            raise UserError(f"{difference}; give --adapt to measure it here (or re-plan) first")
        typer.echo(f"autotune: {difference}; adapting it", err=True)
        plan, adapted_path = _adapt(plan, plan_path, time_budget)
        # The ranks of a multi-process run load the adapted plan, and adapt nothing again.
        args = [str(adapted_path) if Path(a) == plan_path else a for a in args if a != "--adapt"]
    if distributed.env_world_size() == 1 and plan.data_identity is not None:
        from autotune.data import plan_data_identity

        if warning := planmod.other_data(plan, plan_data_identity(plan, data)):
            typer.echo(f"autotune: warning: {warning}", err=True)
    if tokens is not None:
        steps = math.ceil(tokens / tokens_per_step(plan))
    total = steps or plan.train.steps
    if tokens is not None and steps > planmod.MAX_STEPS:
        raise UserError(f"--tokens {tokens} is {steps} steps: a run trains at most {planmod.MAX_STEPS}")
    extra_args: list[str] = []
    if out is None and not resume and distributed.env_world_size() == 1:
        # A run keeps what it trained: with no --out, a fresh directory under runs/.
        # The UTC time and a random suffix: two runs started in the same second get two.
        out = Path("runs") / f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
        extra_args = ["--out", str(out)]
        typer.echo(f"autotune: writing the run to {out}/", err=True)
    if plan.launch.nproc_per_node * plan.launch.nnodes > 1 and distributed.env_world_size() == 1:
        _launch(plan, out, resume, total, args + extra_args)
        return
    main_rank = distributed.env_rank() == 0
    try:
        with _progress(total, enabled=not json_out and main_rank) as on_flush:
            summary = trainer.run(
                plan,
                trainer.RunOptions(
                    steps=steps,
                    minutes=minutes,
                    out_dir=out,
                    resume=resume,
                    data_dir=data,
                    profile_path=str(profile) if profile else None,
                    on_flush=on_flush,
                ),
            )
    except OSError as e:  # a full or read-only disk while running: one line, exit 1
        typer.echo(f"autotune: error: cannot write {e.filename or out} ({e.strerror or e})", err=True)
        raise typer.Exit(1) from None
    code = _exit_code(summary.stopped)
    if summary.stopped == "finished":
        return  # nothing trained: the summary and log stay as they are
    if main_rank:
        from autotune.schema import to_dict, write_json_atomic

        full = to_dict(summary)
        result = {k: v for k, v in full.items() if k != "losses"}
        if out is not None:
            write_json_atomic(out / "summary.json", full)
        if json_out:
            typer.echo(json.dumps(result, indent=2))
        else:
            _print_summary(result)
        if code and launched is None:
            typer.echo(_stopped_line(summary.stopped, summary.steps_done, summary.checkpoint, out), err=True)
    if code and launched is None:  # a rank exits 0: its launcher reads the summary, says it, exits with the code
        raise typer.Exit(code)


def _adapt(plan, plan_path: Path, time_budget: float):
    """:func:`autotune.planning.adapt.adapt`, its lines on stderr; a re-plan of which no trial
    succeeded is one line and exit 1. Returns the adapted plan and its path."""
    from autotune.cli.plan import warnings_to_log
    from autotune.planning.adapt import adapt
    from autotune.planning.settings import NoTrialSucceeded

    try:
        adapted, out = adapt(
            plan,
            plan_path,
            time_budget,
            command=" ".join(["autotune", *ARGS]),
            started_at=started(),
            log=lambda line: typer.echo(f"autotune: {line}", err=True),
            quiet=warnings_to_log,
        )
    except NoTrialSucceeded as e:
        typer.echo(f"autotune: error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"autotune: wrote {out} ({adapted_from_line(adapted)})", err=True)
    return adapted, out


def adapted_from_line(plan) -> str:
    """Both figures of an adapted plan in a few words: here, and on the original machine."""

    def rate(figures) -> str:
        return f"{figures.tokens_per_s:,.0f} tok/s" if figures and figures.tokens_per_s else "not measured"

    origin = plan.adapted_from
    if origin is None:
        return f"{rate(plan.measured)} here"
    there = origin.hardware.summary.get("gpus", origin.hardware.fingerprint)
    return f"{origin.how}: {rate(plan.measured)} here, {rate(origin.measured)} on {there}"


def _exit_code(stopped: str) -> int:
    """128 + the signal's number for a run stopped by a signal (the shell's convention), else 0."""
    return 128 + signal.Signals[stopped].value if stopped.startswith("SIG") else 0


def _stopped_line(stopped: str, steps_done: int | None, checkpoint: str | None, out: Path | None) -> str:
    where = f"at step {steps_done}" if steps_done is not None else "before its first step"
    saved = (
        f"checkpoint {checkpoint}, summary {out / 'summary.json'}; continue with --resume"
        if checkpoint and out
        else "no checkpoint (no checkpoints in this run)"
    )
    return f"autotune: stopped by {stopped} {where}: {saved}"


def _launch(plan, out: Path | None, resume: bool, total: int, args: list[str]) -> None:
    """Run this very command in ``launch.nproc_per_node`` processes under torchrun
    (``autotune.runtime.process.supervise_torchrun``: the run directory's lock shared with the
    ranks, stop signals forwarded to them, torchrun dying with this process). A run that its
    ranks stopped for a signal, whichever process got it, ends as a single process would: the
    stopped line, exit 128 + the signal's number."""
    from autotune import validate
    from autotune.runtime.process import supervise_torchrun
    from autotune.workloads import load_workload

    # Bad input is one line, before any process starts: the mesh against the model's shape too.
    nproc = plan.launch.nproc_per_node
    validate.plan(plan, machine=False, workload=load_workload(plan.workload.name, plan.workload.overrides))
    kind = devices.planned(plan.launch.device)
    gpus = kind.count() if kind.accelerator else 0
    if gpus and nproc > gpus:
        raise UserError(
            f"the plan runs {nproc} processes on {kind.words}, one per GPU, but this machine has {gpus} GPUs"
        )
    supervised = supervise_torchrun(plan, out, resume, total, args)
    if supervised is None:  # the run had already reached its steps
        return
    code, signum, began = supervised
    summary = _read_summary(out, since=began)
    stopped = summary.get("stopped", "")
    if signum and not stopped.startswith("SIG"):  # stopped before the ranks could say so
        stopped = signal.Signals(signum).name
    if stopped.startswith("SIG"):
        typer.echo(_stopped_line(stopped, summary.get("steps_done"), summary.get("checkpoint"), out), err=True)
        raise typer.Exit(_exit_code(stopped))
    if code != 0:
        typer.echo(
            f"autotune: error: the run of {nproc} processes failed (torchrun "
            f"exit status {code}); the failing rank's error is above",
            err=True,
        )
        raise typer.Exit(1)


def _read_summary(out: Path | None, since: float) -> dict:
    """``out/summary.json`` if it was written at ``since`` (a time.time()) or later, else {}."""
    path = out / "summary.json" if out else None
    try:
        return json.loads(path.read_text()) if path and path.stat().st_mtime >= since else {}
    except (OSError, ValueError):
        return {}


def _progress(total: int, enabled: bool):
    """A rich progress bar fed by the executor's log flushes."""
    import contextlib

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    @contextlib.contextmanager
    def bar():
        if not enabled:
            yield None
            return
        with Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            transient=False,
        ) as progress:
            task = progress.add_task("train", total=total, info="")

            def on_flush(record: dict) -> None:
                info = f"loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s"
                if "val_loss" in record:
                    info += f"  val {record['val_loss']:.4f}"
                progress.update(task, completed=record["step"] + 1, info=info)

            yield on_flush

    return bar()


NOT_MEASURED = {
    "tokens_per_s": "every step was in the first log interval, left out as warm-up",
    "mfu": "no peak FLOP/s known for this device; `autotune profile` measures one",
    "val_loss": "no evaluation ran",
}
"""Why a figure of the run summary is None, as its table says."""


def _print_summary(result: dict) -> None:
    """The summary as a table: sizes in MiB or GiB, a figure not measured as "n/a" and why."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="run summary", show_header=False)
    for key, value in result.items():
        if value is None:
            why = "no tokens/s" if key == "mfu" and result.get("tokens_per_s") is None else NOT_MEASURED.get(key)
            value = f"n/a ({why})" if why else "n/a"
        elif key.endswith("_bytes"):
            value = f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"
        elif isinstance(value, float):
            value = f"{value:,.4f}" if abs(value) < 100 else f"{value:,.0f}"
        table.add_row(key, str(value))
    Console().print(table)
