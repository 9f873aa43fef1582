"""The command line behaves as the tools its users know (`--version`, `-h`, the help alone), and its
progress says where it is."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import typer

from autotune import __version__
from autotune.cli import _register, app
from tests.conftest import ROOT


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


def test_the_search_s_status_says_which_trial_of_how_many():
    from autotune.planning.driver import search_status

    assert search_status(3, 8) == "search: trial 3 of 8 running"
    assert search_status(3, None) == "search: trial 3 running"  # a time budget: the line says the budget
    assert search_status(9, 8) == "search: trial 9 running"  # measured again after the search


def test_progress_says_the_budget_used_and_left():
    import time

    from rich.console import Console

    from autotune.cli.plan_view import Progress

    progress = Progress(Console(file=io.StringIO()), budget=420, started=time.monotonic() - 120)
    progress("search: trial 3 of 8 running")
    assert re.fullmatch(
        r"search: trial 3 of 8 running for 0 s, 12[01] s of the 420 s budget used, about 30[01] s left", progress.line()
    )
    progress = Progress(Console(file=io.StringIO()))
    progress("confirmation round 2 of 3: the baseline")
    assert progress.line() == "confirmation round 2 of 3: the baseline for 0 s"


def test_progress_leaves_no_spinner_behind_on_a_terminal():
    import time

    from rich.console import Console

    from autotune.cli.plan_view import Progress

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    progress = Progress(console, budget=60)
    progress("search: trial 1 of 2 running")
    time.sleep(0.3)  # a refresh or two
    progress(None)
    console.print("after the search")
    frames = re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue()))
    assert any("search: trial 1 of 2 running for" in f for f in frames)
    assert not [f for f in frames if re.match(r"\W*for \d+ s", f)], frames  # the stray "⠦ for 0 s"


def test_make_says_so_before_building_deepspeed_s_ops(tmp_path):
    # The one-time build is silent for about two minutes on 2 cores: a line goes first.
    (tmp_path / ".installed").touch()
    # Run from `make test`, this make is a sub-make: its own "Entering directory" line is not ours.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    command = ["make", "--no-print-directory", "-n", f"VENV={tmp_path}", f"{tmp_path}/.deepspeed-ops"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "building DeepSpeed's CPU ops once" in lines[0] and "create_op_builder" in lines[1]


BROKEN = """
from torch import nn

from autotune.workloads import Workload


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(2048, 8)

    def forward(self, idx, targets):
        raise RuntimeError("this model cannot train")


def build():
    return Workload(name="broken_lm:build", build_model=Broken, vocab_size=2048, seq_len=16)
"""


def test_the_hint_of_a_search_without_a_good_trial_is_a_command_that_works(tmp_path, run_cli, monkeypatch):
    (tmp_path / "broken_lm.py").write_text(BROKEN)
    monkeypatch.syspath_prepend(str(tmp_path))  # this process and the trials' import it
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{os.environ['PYTHONPATH']}")
    storage = f"sqlite:///{tmp_path}/studies.db"
    code, _, err = run_cli(
        "plan", "--workload", "broken_lm:build", "--trials", "1", "--storage", storage, "--out", tmp_path / "p.json"
    )
    assert code == 1 and not (tmp_path / "p.json").exists()
    hint = re.search(r"`(autotune trials [^`]*)` shows why", err).group(1)
    assert f"--storage {storage}" in hint
    code, out, err = run_cli(*shlex.split(hint)[1:], "--json")
    assert code == 0, err
    assert [t["status"] for t in json.loads(out)["trials"] if t["role"] == "baseline"] == ["crash"]
    assert "this model cannot train" in out


def test_the_run_summary_says_n_a_and_why_and_sizes_in_binary_units(tmp_path, run_cli, capsys):
    from autotune.cli.run import _print_summary

    code, out, err = run_cli(
        "run", ROOT / "profiles" / "default" / "tiny.plan.json", "--steps", "2", "--out", tmp_path / "run"
    )
    assert code == 0, err
    assert "None" not in out and re.search(r"peak_memory_bytes\s*│\s*\d+ (MiB|GiB)", out), out

    def printed(result: dict) -> str:  # the table's cells, one space between them
        _print_summary(result)
        return " ".join(re.sub(r"[│┃┏┓┗┛┡┩└┘┌┐─━]", " ", capsys.readouterr().out).split())

    text = printed(
        {
            "tokens_per_s": 8_000.0,
            "mfu": None,
            "mfu_peak_source": None,
            "peak_memory_bytes": 3 * 2**30 // 2,
            "val_loss": None,
        }
    )
    assert "mfu n/a (no peak FLOP/s known for this device; `autotune profile` measures one)" in text
    assert "peak_memory_bytes 1.50 GiB" in text and "val_loss n/a (no evaluation ran)" in text
    text = printed({"tokens_per_s": None, "mfu": None, "peak_memory_bytes": 5 * 2**20})
    assert (
        "n/a (every step was in the first log interval" in text and "mfu n/a (no tokens/s)" in text and "5 MiB" in text
    )


def test_strategies_and_plan_agree_on_what_a_search_here_leaves_out(run_cli):
    from autotune.planning.settings import PlanSettings, load_profile
    from autotune.planning.space import build_space
    from autotune.workloads import load_workload

    settings = PlanSettings(workload="tiny", device="cpu", allow_approximate=True)
    space, _ = build_space(settings, load_profile(settings), load_workload("tiny", {}))
    code, out, err = run_cli("strategies", "--json", "--allow-approximate")
    assert code == 0, err
    shown = {s["name"]: s for s in json.loads(out)}
    searched = {s.name for s in space.strategies}
    assert {name for name, s in shown.items() if s["searched"]} - {
        "grad_accum"
    } == searched  # fixed by the recipe's global batch
    left_out = {name: reason for name, reason in space.left_out.items() if shown[name]["usable"]}
    assert {name: s["search_left_out"] for name, s in shown.items() if s["search_left_out"]} == left_out
    code, out, _ = run_cli("strategies", "--explain", "--allow-approximate")
    assert all(f"{name} (usable): {reason}" in " ".join(out.split()) for name, reason in left_out.items())


def test_an_hf_command_prints_no_import_noise():
    # transformers imports torchao, which logs its CUDA-only extensions failing to load, and
    # torch's pytree logs a deprecation for torchao's Enums: a command prints its own lines only.
    config = ROOT / "tests" / "hf_configs" / "llama-3.2-1b.json"
    cmd = [sys.executable, "-m", "autotune", "strategies", "--workload", "hf", "--workload-config", str(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stderr.splitlines() if not line.startswith("autotune: ")] == []


@pytest.mark.parametrize(
    ("logger", "message", "shown"),
    [
        (
            "torchao",
            "Failed to load /venv/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load this library",
            False,
        ),
        ("torchao", "Failed to load /venv/torchao/_C_other.so: Could not load this library", True),
        (
            "torch.utils._pytree",
            "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile",
            False,
        ),
        ("torch.utils._pytree", "something else", True),
    ],
)
def test_only_the_named_import_notices_are_dropped(logger, message, shown):
    import logging

    from autotune.workloads.hf_config import IMPORT_NOISE

    assert IMPORT_NOISE[logger].filter(logging.LogRecord(logger, logging.WARNING, "", 0, message, None, None)) is shown


def test_a_plan_run_in_process_leaves_the_loggers_as_it_found_them(tmp_path, run_cli):
    # Optuna's log goes to plan.log while the command runs; a handler left on that file would
    # outlive it, and a later command in the process would fail once the folder is gone.
    import logging

    import optuna  # noqa: F401  (its import puts its own screen handler on its logger)

    def handlers() -> dict[str, list]:
        return {name: list(logging.getLogger(name).handlers) for name in ("optuna", "py.warnings")}

    before = handlers()
    code, _, err = run_cli(
        "plan",
        "--trials",
        "1",
        "--warm-start",
        tmp_path / "missing.plan.json",
        "--storage",
        f"sqlite:///{tmp_path}/s.db",
        "--out",
        tmp_path / "p.plan.json",
    )
    assert code == 2 and "missing.plan.json" in err, err
    assert handlers() == before
