"""The README says what the command line does: its synopsis is the parser's, and its blocks
marked runnable run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from autotune.cli import app
from tests.conftest import ROOT
from tests.test_cli import commands

README = (ROOT / "README.md").read_text()
RUNNABLE = re.compile(r"^<!-- runnable -->\n```bash\n(.*?)^```$", re.M | re.S)
"""A ```bash block right after a `<!-- runnable -->` line: tests run it, so it must run in seconds on a CPU."""


def synopsis() -> dict[str, str]:
    """The text of each command line in the README's "Commands" block by the command's words ("" for
    the app itself, "data prepare"); a line not starting with `autotune` continues the one above."""
    block = README.split("## Commands\n\n```\n", 1)[1].split("```", 1)[0]
    lines: dict[str, str] = {}
    words = ""
    for line in block.splitlines():
        if line.startswith("autotune"):
            words = " ".join(re.match(r"autotune((?: [a-z]+)*)", line).group(1).split())
            line = line.removeprefix(f"autotune {words}".rstrip())
        lines[words] = lines.get(words, "") + " " + line.strip()
    return lines


def options(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


def required(text: str) -> str:
    """``text`` without its [optional] parts, nested ones included."""
    while (shorter := re.sub(r"\[[^\[\]]*\]", "", text)) != text:
        text = shorter
    return text


def test_the_synopsis_is_the_parser_s():
    import typer

    readme, real = synopsis(), {**commands(), "": typer.main.get_command(app)}
    assert sorted(readme) == sorted(real), "commands differ between the README's synopsis and the parser"
    for name, command in real.items():
        opts = [p for p in command.params if p.param_type_name == "option"]  # --help is not among them
        shown, wanted = options(readme[name]), {o for p in opts for o in p.opts}
        assert shown == wanted, (
            f"autotune {name}: missing from the README {sorted(wanted - shown)}, "
            f"not in the parser {sorted(shown - wanted)}"
        )
        # Outside [brackets]: the required options, and an eager one's own form (`autotune --version`).
        eager = {p.opts[0] for p in opts if p.is_eager}
        assert options(required(readme[name])) - eager == {p.opts[0] for p in opts if p.required}, (
            f"autotune {name}: [optional] options differ"
        )
        arguments = [p.metavar.removesuffix("...") for p in command.params if p.param_type_name == "argument"]
        shown_arguments = [
            word.split("|")[0].removesuffix("...").strip("[]") for word in readme[name].split()[: len(arguments)]
        ]
        assert shown_arguments == arguments, (
            f"autotune {name}: arguments {arguments}"
        )  # PLAN|STORAGE_URL#STUDY... is PLAN..., [PATH]... an optional PATH...


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
            ["bash", "-e", "-o", "pipefail", "-x", "-c", block],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, f"README block failed ({proc.returncode}):\n{block}\n{proc.stderr[-3000:]}"
