"""`autotune run PLAN`: train with a plan.

A plan of several processes (``launch.nproc_per_node > 1``) starts them here: this command
runs itself again under torchrun, once per process, and waits. Rank 0 prints and writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from autotune.cli import app
from autotune.errors import UserError


@app.command("run")
def run_command(
    plan_path: Annotated[Path, typer.Argument(metavar="PLAN", help="Plan file (JSON).")],
    steps: Annotated[Optional[int], typer.Option(help="Train to this many optimizer steps (default: the plan's train.steps).")] = None,
    tokens: Annotated[Optional[int], typer.Option(help="Train on about this many tokens instead.")] = None,
    minutes: Annotated[Optional[float], typer.Option(help="Stop after this many minutes.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Directory for log.jsonl, checkpoints/ and summary.json.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in --out.")] = False,
    data: Annotated[Optional[str], typer.Option(help="Data directory (from `autotune data prepare`); overrides the plan.")] = None,
    profile: Annotated[Optional[Path], typer.Option(help="Hardware profile of this machine, for measured MFU.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    node_rank: Annotated[Optional[int], typer.Option(help="This node's rank in a plan of several nodes (default: the rendezvous assigns it).")] = None,
    trust_workload: Annotated[bool, typer.Option(help="Import the plan's workload module even if it is not a built-in preset (runs its code).")] = False,
) -> None:
    """Train with PLAN: log every step, evaluate, checkpoint, resume."""
    from autotune import distributed
    from autotune import plan as planmod
    from autotune import train

    if steps is not None and tokens is not None:
        raise UserError("give --steps or --tokens, not both")
    for name, value in (("steps", steps), ("tokens", tokens), ("minutes", minutes)):
        if value is not None and value <= 0:
            raise UserError(f"--{name} must be positive")
    if profile is not None and not profile.exists():
        raise UserError(f"profile {profile}: no such file")
    plan = planmod.load(plan_path)
    if node_rank is not None:
        if not 0 <= node_rank < plan.launch.nnodes:
            raise UserError(f"--node-rank {node_rank}: the plan has {plan.launch.nnodes} node(s), ranks 0..{plan.launch.nnodes - 1}")
        plan.launch.node_rank = node_rank
    from autotune.apply import check_plan

    check_plan(plan, trusted=trust_workload)  # the whole plan, before anything starts or is written
    if distributed.env_world_size() == 1 and (warning := planmod.other_machine(plan)):
        typer.echo(f"autotune: warning: {warning}", err=True)
    if plan.launch.nproc_per_node * plan.launch.nnodes > 1 and distributed.env_world_size() == 1:
        _launch(plan, out, resume)
        return
    main_rank = distributed.env_rank() == 0
    if tokens is not None:
        steps = math.ceil(tokens / train.tokens_per_step(plan))
    total = steps or plan.train.steps
    with _progress(total, enabled=not json_out and main_rank) as on_flush:
        summary = train.run(
            plan,
            train.RunOptions(
                steps=steps,
                minutes=minutes,
                out_dir=out,
                resume=resume,
                data_dir=data,
                profile_path=str(profile) if profile else None,
                on_flush=on_flush,
            ),
        )
    if not main_rank:
        return
    from autotune.schema import to_dict, write_json_atomic

    full = to_dict(summary)
    result = {k: v for k, v in full.items() if k != "losses"}
    if out is not None:
        write_json_atomic(out / "summary.json", full)
    if json_out:
        typer.echo(json.dumps(result, indent=2))
    else:
        _print_summary(result)


def _launch(plan, out: Path | None, resume: bool) -> None:
    """Run this very command in ``launch.nproc_per_node`` processes under torchrun."""
    import subprocess

    import torch

    from autotune import distributed, train
    from autotune.apply import check_processes
    from autotune.cli import ARGS
    from autotune.workloads import load_workload

    # Bad input is one line, before any process starts.
    nproc = plan.launch.nproc_per_node
    workload = load_workload(plan.workload.name, plan.workload.overrides)
    check_processes(nproc * plan.launch.nnodes, plan.strategy_configs(), workload=workload, micro_batch_size=plan.train.micro_batch_size)
    train.check_out_dir(out, resume)
    gpus = torch.cuda.device_count()
    if plan.launch.device != "cpu" and gpus and nproc > gpus:
        raise UserError(f"the plan runs {nproc} processes on CUDA, one per GPU, but this machine has {gpus} GPUs")
    # On each node of a multi-node plan the same command joins the plan's rendezvous.
    code = subprocess.run(distributed.torchrun_command(nproc, "autotune", list(ARGS), plan.launch), env=distributed.child_env()).returncode
    if code != 0:
        typer.echo(f"autotune: error: the run of {nproc} processes failed (torchrun exit status {code}); the failing rank's error is above", err=True)
        raise typer.Exit(1)


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
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), transient=False,
        ) as progress:
            task = progress.add_task("train", total=total, info="")

            def on_flush(record: dict) -> None:
                info = f"loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s"
                if "val_loss" in record:
                    info += f"  val {record['val_loss']:.4f}"
                progress.update(task, completed=record["step"] + 1, info=info)

            yield on_flush

    return bar()


def _print_summary(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="run summary", show_header=False)
    for key, value in result.items():
        if isinstance(value, float):
            value = f"{value:,.4f}" if abs(value) < 100 else f"{value:,.0f}"
        table.add_row(key, str(value))
    Console().print(table)
