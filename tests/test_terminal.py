"""Plans travel between machines: the strings in a plan or a study reach the terminal with their
escape sequences made visible and their rich markup printed as text. The real CLI runs in a
subprocess and its raw output bytes are checked."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from autotune.terminal import escape, visible
from tests.conftest import DEFAULT_PLAN, ROOT

HOSTILE = "\x1b]0;title\x07 \x1b]52;c;UFdORUQ=\x07 [link=http://x]y[/link] \x9b31m \u202eevil"
"""A window title, a clipboard write (OSC 52), rich markup, a C1 CSI and a right-to-left override."""
SHOWN = "\\x1b]0;title\\x07 \\x1b]52;c;UFdORUQ=\\x07 [link=http://x]y[/link] \\x9b31m \\u202eevil"
"""How it is printed: every character to be seen, none obeyed."""


def inert(raw: bytes) -> str:
    """The output as text, once it is known to hold no control character but newlines and no
    bidirectional override."""
    text = raw.decode()
    bidi = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
    obeyed = {c for c in text if c != "\n" and (ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in bidi)}
    assert not obeyed, sorted(obeyed)
    return text


def autotune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "autotune", *args],
        capture_output=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "COLUMNS": "400"},
    )  # wide enough that no cell wraps


def hostile_plan(tmp_path) -> str:
    """The default plan with HOSTILE in every free-text field."""
    data = json.loads(DEFAULT_PLAN.read_text())
    data["train"]["data"] = HOSTILE
    data["hardware"] = {"fingerprint": HOSTILE, "summary": {"cpu": HOSTILE, "gpus": HOSTILE, "note": HOSTILE}}
    data["measured"] = {"status": "ok", "tokens_per_s": 1000.0, "mfu": 0.1, "mfu_peak_source": HOSTILE}
    data["provenance"].update(command=HOSTILE, study=HOSTILE, torch_version=HOSTILE, created_at=HOSTILE)
    path = tmp_path / "hostile.plan.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_visible_and_escape():
    assert visible("a\x1b[2Jb\n\tc\x7f\x85\u202e") == "a\\x1b[2Jb\\n\\tc\\x7f\\x85\\u202e"
    assert visible("plain text, ünïcode, 中文") == "plain text, ünïcode, 中文"
    assert escape("[bold]x[/bold]\x07") == "\\[bold]x\\[/bold]\\x07"


@pytest.mark.parametrize("command", ["show", "compare"])
def test_a_plans_text_is_shown_not_obeyed(tmp_path, command):
    r = autotune(command, hostile_plan(tmp_path))
    assert r.returncode == 0, r.stderr
    out = inert(r.stdout)
    assert out.count(SHOWN) >= 3, (
        out
    )  # machine or hardware, fingerprint, MFU's peak (and data: compare normalises its //)
    assert inert(r.stderr) == ""


@pytest.mark.parametrize(
    "args",
    [
        ["show", "{plan}"],  # a knob's value, in the error line
        ["compare", "{plan}"],
        ["export", "{plan}", "--to", "torchrun"],
        ["strategies", "--workload", HOSTILE],
    ],
)
def test_an_error_about_a_plans_text_is_one_inert_line(tmp_path, args):
    data = json.loads(DEFAULT_PLAN.read_text())
    data["strategies"] = [{"name": "compile", "knobs": {"mode": HOSTILE}}]
    plan = tmp_path / "hostile-knob.plan.json"
    plan.write_text(json.dumps(data))
    r = autotune(*(a.replace("{plan}", str(plan)) for a in args))
    assert r.returncode == 2 and r.stdout == b""
    err = inert(r.stderr)
    assert len(err.strip().splitlines()) == 1 and "\\x1b]0;title\\x07" in err, err


def test_a_studys_text_is_shown_not_obeyed(tmp_path):
    """`autotune trials` of a (shared) study whose name, roles, plans and errors carry escapes."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    study = optuna.create_study(study_name=HOSTILE, storage=storage, direction="maximize")
    plan = json.loads(DEFAULT_PLAN.read_text())
    plan["strategies"] = [{"name": HOSTILE, "knobs": {"k": HOSTILE}}]
    attrs = {"plan": plan, "role": HOSTILE, "status": HOSTILE, "error": HOSTILE}
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs=attrs))
    r = autotune("trials", "--storage", storage)
    assert r.returncode == 0, r.stderr
    out = inert(r.stdout)
    assert out.count(SHOWN) >= 4, out  # the title, the role, the status, the error


def test_the_planners_trial_rows_show_a_trials_error_as_text():
    import optuna
    from rich.console import Console

    from autotune import plan as planmod
    from autotune.cli.plan_view import TrialTable

    trial = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"error": HOSTILE})
    out = io.StringIO()
    TrialTable(Console(file=out, width=400, force_terminal=True)).row(trial, planmod.load(DEFAULT_PLAN), None, "crash")
    text = out.getvalue()
    assert "\x1b]" not in text and "\x07" not in text and SHOWN in text  # rich's own colours only, no OSC


@pytest.mark.parametrize("command", ["compare", "show"])
def test_a_huge_field_is_cut_and_printed_in_linear_time(tmp_path, run_cli, command):
    """rich wraps an unbroken 8 MB word in time quadratic in its length (compare: 34 s on 2
    cores, show: minutes); cut to MAX_SHOWN characters it is printed at once."""
    import time

    from autotune.terminal import MAX_SHOWN

    data = json.loads(DEFAULT_PLAN.read_text())
    data["train"]["data"] = "x" * 8_000_000
    path = tmp_path / "huge.plan.json"
    path.write_text(json.dumps(data))
    assert run_cli(command, DEFAULT_PLAN)[0] == 0  # imports done before the clock starts
    began = time.perf_counter()
    code, out, err = run_cli(command, path)
    took = time.perf_counter() - began
    assert code == 0, err
    unwrapped = "".join(out.replace("│", "").split())  # the cell folds over many lines
    assert f"x…({8_000_000 - MAX_SHOWN:,}morecharacters)" in unwrapped and unwrapped.count("x" * MAX_SHOWN) == 1
    assert took < 5, took  # under 0.1 s here; the margin is for a loaded CI machine
