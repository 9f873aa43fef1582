"""The study a search runs in: opened only where its figures compare (the settings they were
measured under, the choices they were searched among), its storage's errors in one line, and
where its trials' logs live."""

import contextlib
import os
import subprocess
import sys

import optuna
import pytest

from autotune.errors import UserError
from autotune.planning.settings import PlanSettings
from autotune.planning.space import build_space, categorical_choices, suggest_plan
from autotune.planning.study import make_storage, open_study, study_identity, trial_log_dir
from autotune.runtime.trial import TrialBudget
from autotune.workloads import load_workload
from tests.conftest import ROOT


def test_a_study_refuses_figures_measured_under_other_settings(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    identity = study_identity(TrialBudget(warmup_steps=5, timed_steps=20), 192)
    assert set(identity) == {"warmup_steps", "timed_steps", "torch", "autotune", "global_batch"}
    open_study("same", url, "tpe", 0, identity=identity)
    open_study("same", url, "tpe", 0, identity=identity)  # the same settings: reopened
    other = identity | {"timed_steps": "6", "torch": "9.9"}
    with pytest.raises(UserError) as e:
        open_study("same", url, "tpe", 0, identity=other)
    message = str(e.value)
    assert "\n" not in message and "use another --study" in message
    assert "timed_steps 20 (now 6)" in message and f"torch {identity['torch']} (now 9.9)" in message
    assert "warmup_steps" not in message


def _searched_elsewhere(url: str, name: str, choices: dict) -> optuna.Study:
    """A study whose one trial was searched on a machine that offered fp16 too (a CUDA device):
    the trial as Optuna records it, with the categorical distributions of that machine's space."""
    from optuna.distributions import CategoricalDistribution

    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    there = {"micro_batch_size": choices["micro_batch_size"], "precision": [True, False]}
    there["precision.dtype"] = [*choices["precision.dtype"], "fp16"]
    study.add_trial(
        optuna.trial.create_trial(
            params={"micro_batch_size": 4, "precision": True, "precision.dtype": "fp16"},
            distributions={k: CategoricalDistribution(v) for k, v in there.items()},
            value=1000.0,
        )
    )
    return study


def test_a_study_searched_among_other_choices_is_refused_before_its_search_breaks(tmp_path):
    """A categorical knob's choices depend on the machine (fp16 needs CUDA; triton_kernels' loss
    offers liger and cce where they are installed). Optuna cannot sample a categorical whose
    choices changed, so a study searched elsewhere, or before an extra was installed, would stop
    the search at its first trial with Optuna's ValueError; the study refuses it when opened."""
    from autotune import hardware

    space, _ = build_space(PlanSettings(workload="tiny"), hardware.detect(quick=True), load_workload("tiny"))
    choices = categorical_choices(space)
    assert choices["precision.dtype"] == ["fp32", "bf16"] and choices["precision"] == [True, False]
    url = f"sqlite:///{tmp_path}/s.db"
    study = _searched_elsewhere(url, "shared", choices)
    with pytest.raises(ValueError, match="dynamic value space"):  # what the search would meet
        study.optimize(lambda t: suggest_plan(t, space) and 1.0, n_trials=5)
    with pytest.raises(UserError) as e:
        open_study("shared", url, "tpe", 0, choices=choices)
    assert str(e.value) == (
        "study shared searched precision.dtype among [fp32, bf16, fp16] (here [fp32, bf16]): "
        "an extra package or the device differs from its trials'; use another --study "
        "(--warm-start STORAGE#shared starts from its best)"
    )
    # The same choices: opened, and searched on.
    open_study("here", url, "tpe", 0, choices=choices).optimize(lambda t: suggest_plan(t, space) and 1.0, n_trials=3)
    assert len(open_study("here", url, "tpe", 0, choices=choices).trials) == 3


def test_categorical_choices_are_those_suggest_plan_asks():
    """``categorical_choices`` restates what :func:`suggest_plan` offers (processes and layouts
    too): every categorical a trial records is in it, with the same choices."""
    from autotune import hardware

    settings = PlanSettings(workload="tiny", cpu_procs=2)
    space, _ = build_space(settings, hardware.detect(quick=True), load_workload("tiny"))
    choices = categorical_choices(space)
    assert choices["processes"] == [1, 2] and choices["layout.2"]

    def suggest(trial: optuna.Trial) -> float:
        with contextlib.suppress(UserError):  # a micro-batch the processes cannot split: asked all the same
            suggest_plan(trial, space)
        return 1.0

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(suggest, n_trials=60)
    recorded = {}
    for t in study.trials:
        for name, dist in t.distributions.items():
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                recorded[name] = list(dist.choices)
    assert recorded.items() <= choices.items()
    assert {"processes", "layout.2", "precision.dtype", "optimizer.implementation"} <= set(recorded)


def test_autotune_plan_on_a_study_searched_among_other_choices_is_one_line_and_writes_nothing(tmp_path):
    from autotune import hardware

    space, _ = build_space(PlanSettings(workload="tiny"), hardware.detect(quick=True), load_workload("tiny"))
    url = f"sqlite:///{tmp_path}/s.db"
    _searched_elsewhere(url, "shared", categorical_choices(space))
    out = tmp_path / "p.plan.json"
    cmd = [sys.executable, "-m", "autotune", "plan", "--workload", "tiny", "--study", "shared", "--storage", url]
    run = subprocess.run(
        [*cmd, "--trials", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        "autotune: error: study shared searched precision.dtype among [fp32, bf16, fp16] (here [fp32, bf16]): "
        "an extra package or the device differs from its trials'; use another --study "
        "(--warm-start STORAGE#shared starts from its best)"
    ]
    assert not out.exists() and len(optuna.load_study(study_name="shared", storage=url).trials) == 1


@pytest.mark.parametrize(
    "url, needle",
    [
        ("not a url", "cannot connect"),
        ("nosuchdialect://x/y", "cannot connect"),
        ("sqlite:////nonexistent-folder/deeper/s.db", "cannot connect"),
        ("postgresql://localhost:1/x", "cannot connect"),
    ],
)
def test_bad_storage_urls_are_one_line(url, needle):
    with pytest.raises(UserError) as e:
        make_storage(url)
    assert str(e.value).startswith(f"storage URL {url}: {needle}") and "\n" not in str(e.value)


def test_read_only_sqlite_folder_is_one_line(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(UserError, match="cannot connect"):
            make_storage(f"sqlite:///{folder}/s.db")
    finally:
        folder.chmod(0o700)


def test_trial_logs_live_beside_a_sqlite_study(tmp_path, monkeypatch):
    assert (
        trial_log_dir(f"sqlite:///{tmp_path}/plans/studies.db", "tiny-abc")
        == tmp_path / "plans" / "trials" / "tiny-abc"
    )
    monkeypatch.setenv("AUTOTUNE_CACHE", str(tmp_path / "cache"))
    assert trial_log_dir("postgresql://host/db", "a:b") == tmp_path / "cache" / "trials" / "a_b"
