"""The README says what the command line does: its synopsis is the parser's, and its blocks
marked runnable run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from autotune.cli import app
from tests.conftest import ROOT
from tests.test_cli import commands

README = (ROOT / "README.md").read_text()
HELP = {"-h", "--help"}
RUNNABLE = re.compile(r"^<!-- runnable -->\n```bash\n(.*?)^```$", re.M | re.S)
"""A ```bash block right after a `<!-- runnable -->` line: tests run it, so it must run in seconds on a CPU."""


def synopsis() -> dict[str, set[str]]:
    """The options of each command line in the README's "Commands" block, by the command's words
    ("" for the app itself); a line not starting with `autotune` continues the one above."""
    block = README.split("## Commands\n\n```\n", 1)[1].split("```", 1)[0]
    lines: dict[str, set[str]] = {}
    words = ""
    for line in block.splitlines():
        if line.startswith("autotune"):
            words = " ".join(re.match(r"autotune((?: [a-z]+)*)", line).group(1).split())
            lines.setdefault(words, set())
        lines[words] |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line))
    return lines


def parser() -> dict[str, set[str]]:
    """The same from the real parser: every leaf command's options and the app's own."""
    import typer

    def options(command) -> set[str]:
        return {o for p in command.params if p.param_type_name == "option" for o in p.opts} - HELP

    found = {name: options(command) for name, command in commands().items()}
    found[""] = options(typer.main.get_command(app))
    return found


def test_the_synopsis_is_the_parser_s():
    readme, real = synopsis(), parser()
    assert sorted(readme) == sorted(real), "commands differ between the README's synopsis and the parser"
    for name in real:
        assert readme[name] == real[name], (
            f"autotune {name}: missing from the README {sorted(real[name] - readme[name])}, "
            f"not in the parser {sorted(readme[name] - real[name])}"
        )


def test_the_readme_runs_as_written(tmp_path):
    blocks = RUNNABLE.findall(README)
    assert blocks, "no block of the README is marked <!-- runnable -->"
    # A clone's layout for what the blocks read; what they write lands in tmp_path.
    for name in ("profiles", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "autotune").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m autotune "$@"\n')
    (bin_dir / "autotune").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    for block in blocks:
        proc = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-x", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
        )
        assert proc.returncode == 0, f"README block failed ({proc.returncode}):\n{block}\n{proc.stderr[-3000:]}"
