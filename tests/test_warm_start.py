"""Warm start (--warm-start): another search's configurations, translated into this search
space and legal here, are the first trials after the baseline; never twice, never on resume."""

import json
import re
import shutil

import optuna
import pytest

from autotune import hardware
from autotune import plan as planmod
from autotune.errors import UserError
from autotune.planning.first_trials import ensure_first_trials, expert_priors, plan_params, warm_starts
from autotune.planning.objective import check_legal
from autotune.planning.settings import PlanSettings
from autotune.planning.space import SearchSpace, build_space, suggest_plan
from autotune.planning.study import open_study
from autotune.workloads import load_workload
from tests.conftest import ROOT

PLAN_2PROCS = ROOT / "bench" / "results" / "cpu-procs" / "tiny-2procs.plan.json"
STUDY_2PROCS = ROOT / "bench" / "results" / "cpu-procs" / "studies-2procs.db"


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    """The tiny search over 1 or 2 CPU processes (as `autotune plan --cpu-procs 2`)."""
    built, _ = build_space(
        PlanSettings(workload="tiny", cpu_procs=2), hardware.detect(quick=True), load_workload("tiny")
    )
    return built


def _plan_file(tmp_path, **changes) -> str:
    data = json.loads(PLAN_2PROCS.read_text())
    data.update(changes)
    path = tmp_path / "source.plan.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_plan_file_is_the_first_trial_after_the_baseline(space):
    starts = warm_starts(space, [str(PLAN_2PROCS)])
    assert [w.source for w in starts] == [str(PLAN_2PROCS)]
    params = starts[0].params
    # Its configuration: bf16 over 2 DDP processes at micro-batch 16 (accumulation 2 follows).
    assert params["processes"] == 2 and params["layout.2"] == "ddp" and params["micro_batch_size"] == 16
    assert params["precision"] is True and params["precision.dtype"] == "bf16"
    plan = suggest_plan(optuna.trial.FixedTrial(params), space)
    check_legal(space, plan)
    assert plan.strategy_configs() == planmod.load(PLAN_2PROCS).strategy_configs()
    study = optuna.create_study(direction="maximize")
    ensure_first_trials(study, space, expert_priors(space), starts)
    roles = [t.user_attrs["role"] for t in study.trials]
    assert roles[:2] == ["baseline", "warm_start"] and set(roles[2:]) == {"prior"}
    assert study.trials[1].user_attrs["source"] == str(PLAN_2PROCS)
    fixed = [t.system_attrs["fixed_params"] for t in study.trials]
    assert fixed[1] == params
    assert all(a != b for i, a in enumerate(fixed) for b in fixed[i + 1 :]), "an identical params dict enqueued twice"


def test_translated_to_this_space(space, tmp_path):
    """Strategies not searched here are left off, the micro-batch is the nearest of the space,
    the processes at most this machine's, a knob value beyond its range the nearest end."""
    source = json.loads(PLAN_2PROCS.read_text())
    source["train"]["micro_batch_size"] = 12
    source["launch"]["nproc_per_node"] = 4
    source["strategies"] = [
        {"name": "precision", "knobs": {"dtype": "bf16", "tf32": True}},
        {"name": "fp8", "knobs": {}},
        {"name": "ddp", "knobs": {"bucket_cap_mb": 1000}},
    ]
    lines: list[str] = []
    params = plan_params(space, planmod.from_dict(source), log=lines.append)
    assert params["micro_batch_size"] in (8, 16) and params["processes"] == 2 and params["layout.2"] == "ddp"
    assert params["ddp.bucket_cap_mb"] == 200  # the end of the searched range
    assert "fp8" not in params
    text = "\n".join(lines)
    assert (
        "fp8 not searched here" in text
        and "4 processes, 2 here" in text
        and "micro-batch 12" in text
        and "ddp.bucket_cap_mb 1000" in text
    )


def test_illegal_configuration_is_dropped_with_a_log_line(space, tmp_path):
    """A layout this machine cannot run (tensor parallel over 4) is dropped; the legal one stays."""
    bad = _plan_file(
        tmp_path,
        strategies=[{"name": "tensor_parallel", "knobs": {"degree": 4}}],
        launch={"nproc_per_node": 4, "device": "cpu"},
    )
    lines: list[str] = []
    starts = warm_starts(space, [bad, str(PLAN_2PROCS)], log=lines.append)
    assert [w.source for w in starts] == [str(PLAN_2PROCS)]
    assert any(
        line.startswith(f"warm start {bad}: dropped, layout tensor_parallel:4 over 2 processes") for line in lines
    ), lines


def test_study_url_takes_its_best_three(space, tmp_path):
    db = tmp_path / "other.db"
    shutil.copy(STUDY_2PROCS, db)
    url = f"sqlite:///{db}"
    study = optuna.load_study(study_name="tiny-d2b885a115d3", storage=url)
    best = sorted(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: -t.value)[:3]
    starts = warm_starts(space, [url])  # the one study it holds, unnamed
    assert starts and all(w.source.startswith(f"{url}#tiny-d2b885a115d3 trial ") for w in starts)
    numbers = [int(w.source.rsplit(" ", 1)[1]) for w in starts]
    assert set(numbers) <= {t.number for t in best}
    assert numbers[0] == best[0].number  # the best first (unless it is the baseline itself)
    assert warm_starts(space, [f"{url}#tiny-d2b885a115d3"]) == starts
    # The plan file of that study's best is the same configuration: not enqueued twice.
    assert len(warm_starts(space, [f"{url}#tiny-d2b885a115d3", str(PLAN_2PROCS)])) == len(starts)


@pytest.mark.parametrize(
    "source, words",
    [
        ("missing.plan.json", "no such plan file"),
        ("sqlite:///{tmp}/missing.db", "no such database file"),
        ("sqlite:///{db}#nope", "no study nope (there: tiny-d2b885a115d3)"),
        ("postgresql://nobody@127.0.0.1:1/none", "cannot connect"),
    ],
)
def test_bad_source_is_one_line_and_writes_nothing(space, tmp_path, source, words):
    db = tmp_path / "other.db"
    shutil.copy(STUDY_2PROCS, db)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(UserError, match=re.escape(words)) as e:
        warm_starts(space, [source.format(tmp=tmp_path, db=db)])
    assert "\n" not in str(e.value)
    assert sorted(tmp_path.iterdir()) == before


def test_resumed_study_enqueues_nothing_again(space, tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    starts = warm_starts(space, [str(PLAN_2PROCS)])
    study = open_study("s", url, "tpe", 0)
    ensure_first_trials(study, space, expert_priors(space), starts)
    count = len(study.trials)
    again = open_study("s", url, "tpe", 0)
    ensure_first_trials(again, space, expert_priors(space), starts)
    assert len(again.trials) == count
    assert sum(t.user_attrs.get("role") == "warm_start" for t in again.trials) == 1


def test_cli_missing_plan_file_is_exit_2_and_nothing_written(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(
        "plan", "--workload", "tiny", "--trials", "1", "--cpu-procs", "2", "--warm-start", "missing.plan.json"
    )
    assert code == 2 and "no such plan file" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_study_that_does_not_exist_is_exit_2_and_nothing_written(run_cli, tmp_path, monkeypatch):
    shutil.copy(STUDY_2PROCS, tmp_path / "other.db")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(
        "plan", "--workload", "tiny", "--trials", "1", "--cpu-procs", "2", "--warm-start", "sqlite:///other.db#nope"
    )
    assert code == 2 and "no study nope" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]


def test_one_process_here_leaves_the_layout_off(tmp_path):
    """Without --cpu-procs on 2 cores the search is one process: DDP (not searched with one process) is left
    off, saying so."""
    one, _ = build_space(PlanSettings(workload="tiny", cpu_procs=1), hardware.detect(quick=True), load_workload("tiny"))
    lines: list[str] = []
    params = plan_params(one, planmod.load(PLAN_2PROCS), log=lines.append)
    assert "processes" not in params and params["precision"] is True
    assert "2 processes, 1 here" in lines and "ddp not searched here, left off" in lines
