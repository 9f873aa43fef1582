"""A planner killed mid-trial, in real processes: its trial dies with it, the device stays
locked only while it lives, the trial's log and folder stay in the study's folder until the
next trial removes the folder, and the resumed study retries the interrupted trial."""

import os
import signal
import subprocess
import sys
import time

import optuna
import psutil
import pytest

from autotune.planning.study import GRACE_S
from autotune.planning.summary import INTERRUPTED, baseline_trial, interrupted, summarize
from autotune.report import trial_rows
from tests import faults
from tests.conftest import ROOT


def _start(tmp_path, *args, **kw):
    env = {**os.environ, "AUTOTUNE_CACHE": str(tmp_path / "cache"), "AUTOTUNE_TEST_HANG_ONCE": str(tmp_path / "hung")}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.search_driver", *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _wait_for_hang(tmp_path, planner):
    deadline = time.monotonic() + 120
    while not (tmp_path / "hung").exists():
        assert planner.poll() is None, planner.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(0.5)  # the child is inside its hanging step
    trial = psutil.Process(planner.pid).children(recursive=True)
    assert trial and any("autotune.runtime.measure" in " ".join(p.cmdline()) for p in trial)
    return trial


@pytest.mark.slow
def test_killed_planner_leaves_no_trial_and_the_study_retries_it(tmp_path):
    db = tmp_path / "studies.db"
    # Micro-batch 4 beside the hanging 11: with 2 and 11 alone every configuration is measured
    # once the retry ran, and the resumed planner's second trial would be a pruned repeat.
    planner = _start(tmp_path, db, 2, faults.HANG_ONCE, 4)
    trial = _wait_for_hang(tmp_path, planner)

    # Another planner on this device is refused at once, naming the one measuring.
    other = _start(tmp_path, tmp_path / "other.db", 1)
    _, err = other.communicate(timeout=120)
    assert other.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert f"pid {planner.pid}" in err and "measure-cpu.lock" in err

    planner.send_signal(signal.SIGKILL)
    planner.wait()
    _, alive = psutil.wait_procs(trial, timeout=10)
    assert not alive, [p.cmdline() for p in alive]  # no orphan measured beside the next trial

    # Its log says where it was; its folder is in the study's, not the system's temporary one.
    folder = tmp_path / "trials" / "faults"
    assert "trial: built on cpu" in (folder / "1.log").read_text()
    assert [p.name.startswith("autotune-trial-") for p in folder.iterdir() if p.is_dir()] == [True]

    time.sleep(GRACE_S)  # until the killed trial's heartbeat is stale
    again = _start(tmp_path, db, 2, faults.HANG_ONCE, 4)
    _, err = again.communicate(timeout=240)
    assert again.returncode == 0, err
    study = optuna.load_study(study_name="faults", storage=f"sqlite:///{db}")
    states = [(t.number, t.state.name, t.params.get("micro_batch_size")) for t in study.trials]
    killed = study.trials[1]
    assert interrupted(killed) and killed.params["micro_batch_size"] == faults.HANG_ONCE, states
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE", states
    assert retry[0].params["micro_batch_size"] == faults.HANG_ONCE
    # --trials 2 of the resumed planner: the retry and one more, the interrupted one not counted.
    launched = [t for t in study.trials if t.number > 1 and t.user_attrs.get("launched")]
    assert len(launched) == 2 and all(t.state.is_finished() for t in study.trials), states
    assert summarize(study).counts.get("interrupted") == 1
    row = trial_rows(study)[1]
    assert (row["status"], row["error"]) == ("interrupted", INTERRUPTED)
    assert not [p for p in folder.iterdir() if p.is_dir()]  # the next trial removed the dead one's folder
    assert baseline_trial(study).state.name == "COMPLETE"
    # Each launched trial's output is kept beside the study.
    log = retry[0].user_attrs["log"]
    assert log == str(tmp_path / "trials" / "faults" / f"{retry[0].number}.log") and os.path.exists(log)


@pytest.mark.slow
def test_sigterm_to_the_planner_kills_the_trial_group(tmp_path):
    planner = _start(tmp_path, tmp_path / "studies.db", 2, faults.HANG_ONCE)
    trial = _wait_for_hang(tmp_path, planner)
    planner.send_signal(signal.SIGTERM)
    assert planner.wait(timeout=20) == -signal.SIGTERM
    _, alive = psutil.wait_procs(trial, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
