"""`autotune report`: a study's plots as HTML, offline, without re-running anything."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from autotune.cli.app import app


@app.command("report")
def report_command(
    out: Annotated[Path, typer.Option(help="Directory for the HTML files (plotly inlined: they open offline).")],
    study: Annotated[Optional[str], typer.Option(help="Study name (default: the only study in the storage).")] = None,
    storage: Annotated[
        Optional[str], typer.Option(help="Optuna storage URL (default sqlite:///plans/studies.db).")
    ] = None,
) -> None:
    """Write the study's history, parameter importances and tokens/s against memory as HTML."""
    from autotune.report import load_study, write_report

    loaded = load_study(storage, study)  # refuse a bad storage or study before writing anything
    for path in write_report(loaded.study_name, storage or "sqlite:///plans/studies.db", out):
        typer.echo(f"report: {path}")
