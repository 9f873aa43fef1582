"""`autotune show PLAN`: print a plan readably."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from autotune.cli.app import app


@app.command("show")
def show_command(
    plan_path: Annotated[Path, typer.Argument(metavar="PLAN", help="Plan file (JSON).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the validated plan as JSON.")] = False,
    trust_workload: Annotated[
        bool,
        typer.Option(help="Import the plan's workload module even if it is not a built-in preset (runs its code)."),
    ] = False,
) -> None:
    """Validate PLAN as `autotune run` does and print it: workload, strategies, launch, measured figures."""
    from autotune import plan as planmod
    from autotune import validate
    from autotune.limits import warn_if_oversubscribed

    plan = planmod.load(plan_path)
    # The same checks as run: show passes no plan that run rejects, its size on this machine included.
    fit = validate.plan(plan, machine=True, trusted=trust_workload).fit
    warn_if_oversubscribed(plan.launch)
    if json_out:
        typer.echo(json.dumps(plan.to_dict(), indent=2))
        return

    from rich.console import Console
    from rich.table import Table

    from autotune.terminal import escape  # a plan's strings are someone else's text: no escape codes, no markup

    console = Console()
    overrides = escape(", ".join(f"{k}={v}" for k, v in plan.workload.overrides.items()))
    console.print(f"[bold]plan[/bold] {escape(plan_path)}  (schema v{plan.schema_version})")
    console.print(f"workload  {escape(plan.workload.name)}" + (f" ({overrides})" if overrides else ""))
    hw = plan.hardware
    summary = f"  {escape(_fmt_summary(hw.summary))}" if hw.summary else ""
    console.print(f"hardware  {escape(hw.fingerprint or 'any')}{summary}")
    launch = plan.launch
    console.print(f"launch    {launch.nnodes} node(s) x {launch.nproc_per_node} process(es), device {launch.device}")
    t = plan.train
    console.print(
        f"train     micro-batch {t.micro_batch_size}, {t.steps} steps, lr {t.lr:g}, seed {t.seed}, "
        f"data {escape(t.data)}"
    )
    if fit is not None:
        console.print(f"estimate  {fit.line()}")
    strategies = Table("strategy", "knobs", title="strategies (in plan order)")
    for s in plan.strategies:
        strategies.add_row(escape(s.name), escape(", ".join(f"{k}={v}" for k, v in s.knobs.items()) or "(defaults)"))
    if not plan.strategies:
        strategies.add_row("(none)", "plain baseline")
    console.print(strategies)
    if plan.measured or plan.baseline:
        figures = Table("", "tokens/s", "step s", "MFU", "peak mem GiB", "loss start→end", "status", title="figures")
        for label, f in (("measured", plan.measured), ("baseline", plan.baseline)):
            if f is None:
                continue
            figures.add_row(
                label,
                _num(f.tokens_per_s, "{:,.0f}"),
                _num(f.step_time_s, "{:.4f}"),
                _num(f.mfu, "{:.1%}") + (f" ({escape(f.mfu_peak_source)})" if f.mfu_peak_source else ""),
                _num(f.peak_memory_bytes and f.peak_memory_bytes / 2**30, "{:.2f}"),
                f"{_num(f.loss_start, '{:.3f}')}→{_num(f.loss_end, '{:.3f}')}",
                f.status,
            )
        console.print(figures)
    if plan.quality_guard is not None:
        console.print(_guard_table(plan.quality_guard))
    p = plan.provenance
    console.print(
        f"made by   autotune {escape(p.autotune_version)}, torch {escape(p.torch_version)}, "
        f"{escape(p.created_at)}" + (f", study {escape(p.study)} trial {p.trial}" if p.study else "")
    )
    if p.command:
        console.print(f"command   {escape(p.command)}")


def _guard_table(g):
    """The quality guard of an approximate plan: both runs' loss and time-to-loss."""
    from rich.table import Table

    verdict = "passed" if g.passed else "failed"
    ratio = f", time-to-loss {g.time_to_loss_ratio:.2f}x the exact run's" if g.time_to_loss_ratio else ""
    table = Table(
        "",
        "loss start",
        "tail loss",
        "wall s",
        "time-to-loss s",
        title=f"quality guard: {verdict} against exact trial {g.reference_trial}, {g.steps} steps, "
        f"tolerance {g.tolerance:.2%}{ratio}",
    )
    for label, run in (("plan", g.candidate), ("exact", g.exact)):
        table.add_row(
            label, f"{run.start:.4f}", f"{run.tail_mean:.4f}", f"{run.wall_s:.1f}", _num(run.time_to_loss_s, "{:.1f}")
        )
    return table


def _num(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _fmt_summary(summary: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in summary.items())
