"""Trials in real child processes: figures when it works, the right status when it fails."""

import json
import os
import subprocess
import sys

import pytest

from autotune import plan as planmod
from autotune.runtime import trial
from autotune.runtime.trial import TrialBudget, error_line, run_trial
from tests import faults
from tests.conftest import DEFAULT_PLAN


def plan_for(micro_batch: int, workload: str = "tests.faults:build") -> planmod.Plan:
    data = json.loads(DEFAULT_PLAN.read_text())
    data["workload"] = {"name": workload, "overrides": {}}
    data["train"]["micro_batch_size"] = micro_batch
    return planmod.from_dict(data)


BUDGET = TrialBudget(warmup_steps=2, timed_steps=3, timeout_s=60)


def test_ok_trial_reports_figures():
    result = run_trial(plan_for(4), BUDGET)
    f = result.figures
    assert f.status == "ok", result.error
    assert f.tokens_per_s > 0 and f.step_time_s > 0 and f.peak_memory_bytes > 0
    assert f.loss_start is not None and f.loss_end is not None


@pytest.mark.parametrize(
    "micro_batch, status, needle",
    [
        (faults.OOM, "oom", "out of memory"),
        (faults.NAN, "nan", "non-finite"),
        (faults.SIGKILL, "crash", "SIGKILL"),
    ],
)
def test_failures_have_their_status(micro_batch, status, needle):
    result = run_trial(plan_for(micro_batch), BUDGET)
    assert result.figures.status == status
    assert needle in result.error


def test_hung_trial_is_killed_with_its_group_and_its_log_says_where_it_was(tmp_path):
    log = tmp_path / "trials" / "3.log"
    result = run_trial(plan_for(faults.HANG), TrialBudget(warmup_steps=1, timed_steps=1, timeout_s=8), log_path=log)
    assert result.figures.status == "timeout"
    assert 8 <= result.wall_s < 20
    # The log's last line (building, or built, on a loaded machine) ends the error.
    assert result.error.startswith("no result within 8 s: trial: ") and result.error.endswith(f" (log {log})")
    assert sorted(p.name for p in log.parent.iterdir()) == ["3.log"]  # its own folder beside the log is gone


def test_unsupported_plan_is_reported_not_raised():
    # fp16 needs CUDA: the child refuses it, the parent records "unsupported".
    data = plan_for(4).to_dict()
    data["strategies"] = [{"name": "precision", "knobs": {"dtype": "fp16"}}]
    result = run_trial(planmod.from_dict(data), BUDGET)
    assert result.figures.status in ("unsupported", "crash")
    assert "CUDA" in result.error


def test_output_is_kept_in_the_log_and_the_error_line_is_whole(tmp_path):
    log = tmp_path / "trials" / "7.log"
    result = run_trial(plan_for(faults.SIGKILL), BUDGET, log_path=log)
    assert result.figures.status == "crash" and str(log) in result.error
    assert log.exists()
    long = "RuntimeError: " + "x" * 300
    assert error_line(f"Traceback (most recent call last):\n  File 'a.py'\n{long}\nnoise after\n") == long
    assert error_line("just a line\n") == "just a line" and error_line("") is None


def test_progress_stops_a_trial_when_asked(tmp_path):
    seen = []

    def on_progress(step, tokens_per_s):
        seen.append((step, tokens_per_s))
        return step >= 2

    slow = TrialBudget(warmup_steps=1, timed_steps=50, timeout_s=60)
    result = run_trial(plan_for(faults.SLOW), slow, on_progress=on_progress)
    assert result.figures.status == "pruned"
    assert [s for s, _ in seen][:2] == [1, 2] and all(t > 0 for _, t in seen)
    assert result.wall_s < 30  # 50 steps of 0.3 s were not waited for


def test_the_device_lock_is_one_per_machine_whatever_the_cache_and_every_user_may_take_it(
    tmp_path, monkeypatch
) -> None:
    import tempfile

    from autotune import locks

    monkeypatch.delenv("AUTOTUNE_LOCK_DIR")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this machine's temporary folder, as the test sees it
    paths = set()
    for cache in ("a", "b"):
        monkeypatch.setenv("AUTOTUNE_CACHE", str(tmp_path / cache))
        paths.add(trial.device_lock_path("cpu"))
    (path,) = paths
    assert path == tmp_path / "autotune-locks" / "measure-cpu.lock"
    assert path.parent.stat().st_mode & 0o7777 == 0o1777  # sticky and world-writable, as /tmp
    old = os.umask(0o077)
    try:
        with trial.measuring("cpu"):
            assert path.stat().st_mode & 0o777 == 0o666  # whatever the umask
            held = subprocess.run(
                [sys.executable, "-c", "from autotune import locks; locks.acquire(" + repr(str(path)) + ", 'x')"],
                capture_output=True,
                text=True,
                env={**os.environ, "AUTOTUNE_CACHE": str(tmp_path / "b")},
            )
            assert "x is in use by another autotune process" in held.stderr
    finally:
        os.umask(old)
    locks.acquire(path, "x").release()  # free again once released
