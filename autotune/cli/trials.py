"""`autotune trials`: list a study's trials without running anything."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from autotune.cli.app import app


@app.command("trials")
def trials_command(
    study: Annotated[Optional[str], typer.Option(help="Study name (default: the only study in the storage).")] = None,
    storage: Annotated[
        Optional[str], typer.Option(help="Optuna storage URL (default sqlite:///plans/studies.db).")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """List a study's trials: number, role, status, tokens/s, peak memory, batch, strategies, error."""
    from autotune.report import load_study, trial_rows

    loaded = load_study(storage, study)
    rows = trial_rows(loaded)
    if json_out:
        typer.echo(json.dumps({"study": loaded.study_name, "trials": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    from autotune.terminal import escape  # a study's text (a shared one's too): no escape codes, no markup

    table = Table(
        "trial",
        "role",
        "status",
        "tokens/s",
        "mem GiB",
        "batch",
        "strategies",
        "error",
        title=f"study {escape(loaded.study_name)}",
    )
    for r in rows:
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] is not None else "-"
        mem = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r["peak_memory_bytes"] else "-"
        batch = (
            "-"
            if r["micro_batch_size"] is None
            else f"{r['micro_batch_size']}x{r['grad_accum']}" + (f"x{r['processes']}p" if r["processes"] > 1 else "")
        )
        names = (
            ", ".join(n + ("(" + ",".join(map(str, k.values())) + ")" if k else "") for n, k in r["strategies"].items())
            or "plain"
        )
        table.add_row(*map(escape, (r["number"], r["role"], r["status"], tps, mem, batch, names, r["error"] or "")))
    Console().print(table)
