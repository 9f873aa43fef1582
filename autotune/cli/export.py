"""`autotune export PLAN --to torchrun|deepspeed|accelerate|slurm`: the plan for another launcher."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from autotune.cli.app import app


@app.command("export")
def export_command(
    plan_path: Annotated[Path, typer.Argument(metavar="PLAN", help="Plan file (JSON).")],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="torchrun (the command line), deepspeed (ds_config.json of a zero plan), "
            "accelerate (config YAML) or slurm (an sbatch script).",
        ),
    ],
    out: Annotated[Optional[Path], typer.Option(help="Write it to this file (default: print it).")] = None,
) -> None:
    """Write PLAN in another launcher's terms; refuse, with one line, what the target cannot express."""
    import os
    import stat

    from autotune import export
    from autotune import plan as planmod
    from autotune.errors import UserError
    from autotune.schema import write_bytes_atomic
    from autotune.terminal import visible

    plan = planmod.load(plan_path)
    text = export.export(plan, plan_path, to)  # all checks before anything is written
    if out is None:
        typer.echo(text, nl=False)
        return
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file")
    try:
        write_bytes_atomic(out, text.encode())
        if to == "slurm":
            os.chmod(out, os.stat(out).st_mode | stat.S_IXUSR)
    except OSError as e:  # a read-only or full disk, a file where a folder should be: one line, exit 1
        typer.echo(f"autotune: error: cannot write {visible(out)} ({e.strerror or e})", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"export: {out}", err=True)
