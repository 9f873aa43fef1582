"""The ``autotune`` command's Typer app, its own options and what the running command records
(its arguments, when it began): what every subcommand module imports to register itself
(``autotune.cli`` imports those modules when it runs, and nothing of theirs).
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="autotune",
    help="Find the fastest correct way to train a model on this hardware, then train it that way.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Inherited by every subcommand's context, `data`'s included.
    context_settings={"help_option_names": ["-h", "--help"]},
)


def version() -> str:
    """The installed distribution's version, else (a source tree on PYTHONPATH) the package's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("autotune")
    except PackageNotFoundError:
        from autotune import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"autotune {version()}")
        raise typer.Exit()


@app.callback()  # the app's own options; its help is the Typer's
def _options(
    show_version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    pass


ARGS: list[str] = []
"""The arguments of the running command, for recording in plans."""

STARTED: list[float] = [0.0]
"""When the running command began, on time.monotonic(): a ``--time-budget`` counts from it."""


def started() -> float:
    """When the running command began (time.monotonic()), what its ``--time-budget`` counts from."""
    return STARTED[0]
