"""The search with real trials: faults cost one trial each; a killed planner resumes."""

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from autotune import costmodel, search
from autotune import plan as planmod
from autotune.graph import StrategyGraph
from autotune.plan import LaunchSpec, TrainSpec
from autotune.strategy import Facts
from autotune.trial import TrialBudget
from autotune.workloads import load_workload
from tests import faults
from tests.conftest import ROOT

optuna.logging.set_verbosity(optuna.logging.WARNING)


def fault_space() -> search.SearchSpace:
    workload = load_workload("tests.faults:build")
    return search.SearchSpace(
        workload=workload,
        strategies=[],
        graph=StrategyGraph(Facts.of(None, workload)),
        micro_batches=(2, faults.OOM, faults.NAN, faults.HANG, faults.SIGKILL),
        baseline_micro_batch=2,
        train=TrainSpec(micro_batch_size=1),
        launch=LaunchSpec(device="cpu"),
        device_memory=None,
    )


def test_each_fault_costs_one_trial_and_the_search_completes(tmp_path):
    space = fault_space()
    study = search.open_study("faults", f"sqlite:///{tmp_path}/s.db", "tpe", 0)
    search.ensure_first_trials(study, space, [])
    for mb in (faults.OOM, faults.NAN, faults.HANG, faults.SIGKILL, 2):
        study.enqueue_trial({"micro_batch_size": mb})
    objective = search.Objective(space=space, budget=TrialBudget(warmup_steps=1, timed_steps=3, timeout_s=20))
    search.optimize(study, objective, trials=6, time_budget=None)
    by_mb = {t.params["micro_batch_size"]: t for t in study.trials}
    status = {mb: (t.state.name, t.user_attrs["status"]) for mb, t in by_mb.items()}
    assert status[faults.OOM] == ("PRUNED", "oom")
    assert status[faults.NAN] == ("FAIL", "nan")
    assert status[faults.HANG] == ("FAIL", "timeout")
    assert status[faults.SIGKILL] == ("FAIL", "crash")
    assert "SIGKILL" in by_mb[faults.SIGKILL].user_attrs["error"]
    assert status[2] == ("COMPLETE", "ok")
    assert search.summarize(study).best.params["micro_batch_size"] == 2


def test_illegal_and_oversized_trials_are_pruned_before_launch(tmp_path):
    workload = load_workload("phase8-small")
    space = search.SearchSpace(
        workload=workload, strategies=[], graph=StrategyGraph(Facts.of(None, workload)),
        micro_batches=(128,), baseline_micro_batch=128, train=TrainSpec(micro_batch_size=1),
        launch=LaunchSpec(device="cpu"), device_memory=8 * 2**30,
    )
    study = search.open_study("prune", f"sqlite:///{tmp_path}/s.db", "tpe", 0)
    search.optimize(study, search.Objective(space=space, budget=TrialBudget()), trials=1, time_budget=None)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["error"].startswith("predicted")
    assert trial.user_attrs["predicted_peak_memory_bytes"] > 8 * 2**30


def _plan_cmd(db, out):
    return [sys.executable, "-m", "autotune", "plan", "--workload", "tiny", "--trials", "5", "--storage", f"sqlite:///{db}",
            "--out", str(out), "--trial-steps", "6", "--warmup-steps", "2", "--device", "cpu"]


@pytest.mark.slow
def test_tiny_plan_beats_its_baseline_and_resumes_after_sigkill(tmp_path):
    db, out = tmp_path / "studies.db", tmp_path / "tiny.plan.json"
    proc = subprocess.Popen(_plan_cmd(db, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    url = f"sqlite:///{db}"

    def complete() -> int:
        try:
            (name,) = optuna.get_all_study_names(url)
        except (ValueError, KeyError, Exception):
            return 0
        study = optuna.load_study(study_name=name, storage=url)
        return len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))

    while complete() < 2:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (name,) = optuna.get_all_study_names(url)
    before = {t.number: t.value for t in optuna.load_study(study_name=name, storage=url).trials if t.state.name == "COMPLETE"}
    assert not out.exists()

    again = subprocess.run(_plan_cmd(db, out), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    study = optuna.load_study(study_name=name, storage=url)
    after = {t.number: t.value for t in study.trials if t.state.name == "COMPLETE"}
    assert before.items() <= after.items()  # no completed trial lost
    assert study.trials[0].user_attrs["role"] == "baseline"
    assert len([t for t in study.trials if t.state.is_finished()]) >= 5
    assert not [t for t in study.trials if t.state.name == "RUNNING"]  # the killed one was failed

    plan = planmod.load(out)
    assert plan.measured.status == "ok" and plan.baseline.status == "ok"
    assert plan.measured.tokens_per_s > plan.baseline.tokens_per_s
    assert plan.loss_check is not None and plan.loss_check.passed
    assert plan.provenance.study == name

    from autotune import train

    summary = train.run(plan, train.RunOptions(steps=3))
    assert summary.steps_done == 3


def test_costmodel_flops_match_flop_counter():
    # Naive attention is plain matmuls, so FlopCounterMode counts exactly PaLM's 12 L d s.
    from torch.utils.flop_counter import FlopCounterMode

    from autotune.train import Trainer

    for strategies in ([], [{"name": "activation_checkpoint", "knobs": {"mode": "full"}}],
                       [{"name": "activation_checkpoint", "knobs": {"mode": "selective", "every": 3}}]):
        data = json.loads((ROOT / "profiles/default/tiny.plan.json").read_text())
        data["strategies"] = [{"name": "attention", "knobs": {"backend": "naive"}}, *strategies]
        data["train"]["micro_batch_size"] = 2
        plan = planmod.from_dict(data)
        trainer = Trainer(plan)
        x, y = trainer.batches.get(0)
        with FlopCounterMode(display=False) as counter:
            trainer.ctx.forward(x, y).backward()
        trainer.close()
        predicted = costmodel.flops_per_step(trainer.ctx.workload, 2, plan.strategy_configs())
        assert counter.get_total_flops() == predicted, strategies
