"""`autotune compare PLAN...`: plans (or studies) side by side, with time and $ to train N tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from autotune.cli.app import app


@app.command("compare")
def compare_command(
    sources: Annotated[
        list[str],
        typer.Argument(metavar="PLAN...", help="Plan files, or a study as STORAGE_URL#STUDY (its trials' tokens/s)."),
    ],
    cost_per_gpu_hour: Annotated[
        Optional[list[str]],
        typer.Option(
            "--cost-per-gpu-hour",
            metavar="LABEL=USD",
            help="Price of a GPU-hour: LABEL matches the GPU name (h200=3.50), or cpu (a machine-hour). Repeatable.",
        ),
    ] = None,
    tokens: Annotated[
        str, typer.Option(help="Tokens of the run whose training time is estimated (1e9 or 1000000000).")
    ] = "1e9",
    html: Annotated[
        Optional[Path],
        typer.Option("--html", metavar="FILE", help="Also write a self-contained HTML page (plotly inlined)."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the figures as JSON instead of the table.")] = False,
    force: Annotated[
        bool, typer.Option(help="Compare plans of different workloads or data anyway (with a warning).")
    ] = False,
) -> None:
    """Compare plans side by side: machine, strategies (differences marked *), tokens/s, MFU, memory, loss check,
    time and $ per 1e9 tokens."""
    from autotune import compare as cmp
    from autotune.errors import UserError
    from autotune.schema import write_bytes_atomic
    from autotune.terminal import visible

    prices = cmp.parse_prices(cost_per_gpu_hour or [])
    c = cmp.compare(sources, prices=prices, tokens=cmp.parse_tokens(tokens), force=force)
    if html is not None:  # written first: a page that cannot be written is one line, nothing printed
        try:
            write_bytes_atomic(html, cmp.to_html(c).encode())
        except OSError as e:
            raise UserError(f"--html {html}: {e.strerror or e}") from None
    for line in c.warnings:
        typer.echo(f"autotune: warning: {visible(line)}", err=True)
    if json_out:
        typer.echo(json.dumps(c.to_dict(), indent=2))
    else:
        _print_table(c)
    if html is not None:
        typer.echo(f"html: {html}", err=json_out)


def _print_table(c) -> None:
    from rich.console import Console
    from rich.table import Table

    from autotune.compare import _short, table_rows
    from autotune.terminal import escape

    table = Table("", title="autotune compare (* a setting that differs)")
    for e in c.entries:
        table.add_column(escape(_short(e.source)), overflow="fold")  # paths wrap rather than lose their ends
    for label, values, mark in table_rows(c):
        cells = [escape(f"{label} *" if mark else label), *map(escape, values)]  # plans' text, never markup
        table.add_row(*((f"[bold]{cell}[/bold]" if mark else cell) for cell in cells))
    Console().print(table)
