"""The command line behaves as the tools its users know: `--version`, `-h`, the help alone."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer

from autotune import __version__
from autotune.cli import _register, app


def commands() -> dict:
    """Every leaf command of the real parser (typer's vendored click) by its words ("run", "data prepare")."""
    _register()
    found = {}

    def walk(command, words: tuple[str, ...]) -> None:
        if hasattr(command, "commands"):  # a group
            for name, sub in command.commands.items():
                walk(sub, (*words, name))
        else:
            found[" ".join(words)] = command

    walk(typer.main.get_command(app), ())
    return found


def test_version_is_the_package_s(run_cli):
    code, out, err = run_cli("--version")
    assert (code, out, err) == (0, f"autotune {__version__}\n", "")


@pytest.mark.parametrize("words", [(), ("data",), *[tuple(name.split()) for name in commands()]])
def test_h_is_help_on_the_app_and_every_command(run_cli, words):
    code, out, err = run_cli(*words, "-h")
    assert code == 0 and err == "", err
    assert "Usage:" in out and "--help" in out and "-h" in out


@pytest.mark.parametrize("words", [(), ("data",)])
def test_a_group_alone_prints_its_help_and_succeeds(run_cli, words):
    code, out, _ = run_cli(*words)
    assert code == 0 and "Usage:" in out and "Commands" in out


def test_the_console_entry_alone_exits_0():
    proc = subprocess.run([sys.executable, "-m", "autotune"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout and "plan" in proc.stdout
