"""Trials in real child processes: figures when it works, the right status when it fails."""

import json

import pytest

from autotune import plan as planmod
from autotune.trial import TrialBudget, run_trial
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


def test_hung_trial_is_killed_with_its_group():
    result = run_trial(plan_for(faults.HANG), TrialBudget(warmup_steps=1, timed_steps=1, timeout_s=8))
    assert result.figures.status == "timeout"
    assert 8 <= result.wall_s < 20


def test_unsupported_plan_is_reported_not_raised():
    # fp16 needs CUDA: the child refuses it, the parent records "unsupported".
    data = plan_for(4).to_dict()
    data["strategies"] = [{"name": "precision", "knobs": {"dtype": "fp16"}}]
    result = run_trial(planmod.from_dict(data), BUDGET)
    assert result.figures.status in ("unsupported", "crash")
    assert "CUDA" in result.error
