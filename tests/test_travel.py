"""Plans that travel (issue 14, item 2): the data's identity in plans and runs, and a plan made
on other hardware refused by `autotune run` unless --adapt, which measures it here."""

import json
import time
from pathlib import Path

import pytest

from autotune import data as datamod
from autotune import hardware
from autotune import plan as planmod
from tests.conftest import DEFAULT_PLAN, ROOT

H200 = hardware.HardwareProfile.load(ROOT / "profiles" / "h200-1gpu.json")
TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(2000))  # ~70k chars


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("travel")
    (folder / "text.txt").write_text(TEXT)
    datamod.prepare([folder / "text.txt"], folder / "data", vocab_size=300)
    return folder / "data"


def _plan(tmp_path: Path, dataset: Path, **top) -> Path:
    """The tiny CPU plan (legal here) on ``dataset``, short, with ``top``-level fields set."""
    data = json.loads(DEFAULT_PLAN.read_text())
    data["train"].update(data=str(dataset), eval_interval=0, checkpoint_interval=0, log_interval=1)
    data.update(top)
    path = tmp_path / "made-there.plan.json"
    path.write_text(json.dumps(data))
    return path


def _from_h200() -> dict:
    return {
        "hardware": {"fingerprint": H200.fingerprint, "summary": H200.summary()},
        "measured": {"status": "ok", "tokens_per_s": 123456.0, "step_time_s": 0.01},
    }


def test_the_identity_is_recorded_once_and_names_the_bytes(dataset, tmp_path):
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["identity"].startswith("sha256:") and meta["recipe"] == "prepared"
    assert datamod.data_identity(dataset) == meta["identity"]
    # A dataset made before identities were recorded gets one on first use, the same, cached.
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        (copy / name).write_bytes((dataset / name).read_bytes())
    old = {k: v for k, v in meta.items() if k not in ("identity", "recipe")}
    (copy / "meta.json").write_text(json.dumps(old))
    assert datamod.data_identity(copy) == meta["identity"]
    assert json.loads((copy / "meta.json").read_text())["identity"] == meta["identity"]
    # Other tokens: another identity (the cached value is what it reads, so drop it first).
    tokens = bytearray((copy / "train.bin").read_bytes())
    tokens[-1] ^= 1
    (copy / "train.bin").write_bytes(bytes(tokens))
    (copy / "meta.json").write_text(json.dumps(old))
    assert datamod.data_identity(copy) != meta["identity"]


def test_a_run_on_other_data_is_named_and_records_its_data(dataset, tmp_path, run_cli):
    plan = _plan(tmp_path, dataset, data_identity="sha256:" + "0" * 64)
    code, _, err = run_cli("run", plan, "--steps", "2", "--out", tmp_path / "out", "--json")
    assert code == 0, err
    (warning,) = [line for line in err.splitlines() if line.startswith("autotune: warning:")]
    assert "other data" in warning and "sha256:0000" in warning
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["data_identity"] == datamod.data_identity(dataset)


def test_a_plan_from_other_hardware_is_refused_then_adapted_and_run(dataset, tmp_path, run_cli):
    plan = _plan(tmp_path, dataset, **_from_h200())
    adapted = tmp_path / "made-there.adapted.plan.json"
    # Without --adapt: exit 2, one line naming the difference, nothing written.
    code, _, err = run_cli("run", plan, "--steps", "2", "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1, err
    here = hardware.current_summary()
    assert f"GPUs 1 x NVIDIA H200 here {here['gpus']}" in err and H200.fingerprint in err and "--adapt" in err
    assert not adapted.exists() and not (tmp_path / "out").exists()
    # With --adapt: a validation trial here, the adapted plan beside it with both figures, then the run.
    code, _, err = run_cli("run", plan, "--adapt", "--steps", "2", "--out", tmp_path / "out", "--json")
    assert code == 0, err
    made = planmod.load(adapted)
    assert made.adapted_from is not None and made.adapted_from.how == "validated"
    assert made.adapted_from.plan == str(plan) and made.adapted_from.hardware.fingerprint == H200.fingerprint
    assert made.adapted_from.measured.tokens_per_s == 123456.0
    assert made.measured.status == "ok" and made.measured.tokens_per_s > 0
    assert made.hardware.fingerprint == here["fingerprint"] and made.baseline is None
    assert made.data_identity == datamod.data_identity(dataset)
    assert made.strategies == planmod.load(plan).strategies and made.train == planmod.load(plan).train
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps_done"] == 2 and summary["data_identity"] == made.data_identity
    # The adapted plan runs here as it is.
    assert planmod.other_machine(made) is None


def test_plans_for_any_machine_run_anywhere():
    assert planmod.other_machine(planmod.load(DEFAULT_PLAN)) is None
    assert json.loads(DEFAULT_PLAN.read_text())["hardware"]["fingerprint"] is None


def test_summary_differences_name_each_field():
    cpu_only = dict(H200.summary(), gpus="none", cuda_major="none")
    assert hardware.summary_differences(H200.summary(), cpu_only) == [
        "GPUs 1 x NVIDIA H200 here none",
        "CUDA major 13 here none",
    ]
    assert hardware.summary_differences({"gpus": "8 x Imaginary GPU"}, cpu_only) == ["GPUs 8 x Imaginary GPU here none"]
    assert hardware.summary_differences(H200.summary(), H200.summary()) == []


def test_a_plan_that_cannot_run_here_is_replanned_from_it_and_keeps_its_training(
    dataset, tmp_path, run_cli, monkeypatch
):
    # Made for one H200 (CUDA): on this CPU machine it cannot run as it is, so --adapt re-plans
    # within the time budget, the plan's configuration translated to what is legal here as the
    # first trial after the baseline; the adapted plan is this machine's and trains what the
    # original trains (its data, steps, schedule), only the way it trains is new.
    monkeypatch.chdir(tmp_path)  # the re-plan's study goes to plans/studies.db, as `autotune plan`'s does
    # Called in a process an hour old (as late in a test session, or from a notebook), the
    # command's budget counts from the call, not from the process's start.
    import psutil

    monkeypatch.setattr(psutil.Process, "create_time", lambda self: time.time() - 3600)
    plan = _plan(
        tmp_path,
        dataset,
        **_from_h200(),
        launch={"nproc_per_node": 1, "nnodes": 1, "device": "cuda"},
        strategies=[{"name": "precision", "knobs": {"dtype": "bf16", "tf32": True}}],
        workload={"name": "tiny", "overrides": {"n_layers": 2}},
    )
    data = json.loads(plan.read_text())
    data["train"].update(lr=0.0017, steps=40)
    plan.write_text(json.dumps(data))
    code, _, err = run_cli(
        "run", plan, "--adapt", "--time-budget", "40", "--steps", "2", "--out", tmp_path / "out", "--json"
    )
    assert code == 0, err
    assert "(it runs on CUDA and this machine has no CUDA GPU): re-planning within 40 s" in err, err
    assert not [line for line in err.splitlines() if line.startswith("[I ")]  # Optuna's log went to plan.log
    made = planmod.load(tmp_path / "made-there.adapted.plan.json")
    assert made.adapted_from.how == "replanned" and made.adapted_from.measured.tokens_per_s == 123456.0
    assert made.launch.device == "cpu" and made.measured.status == "ok" and made.measured.tokens_per_s > 0
    assert made.hardware.fingerprint == hardware.current_summary()["fingerprint"]
    assert made.workload == planmod.load(plan).workload and made.global_batch() == 16
    assert (made.train.data, made.train.lr, made.train.steps) == (str(dataset), 0.0017, 40)
    assert made.data_identity == datamod.data_identity(dataset)
    import optuna

    (study,) = optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/plans/studies.db")
    trials = optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{tmp_path}/plans/studies.db").trials
    # The plan's own configuration comes first after the baseline (whether it runs within 40 s
    # on this machine is the budget's business, tested with the planner's).
    assert trials[1].user_attrs["role"] == "warm_start"
    first = trials[1].system_attrs["fixed_params"]
    # bf16 carried over; TF32, a GPU switch, is not searched on a CPU: the nearest choice, off.
    assert (first["precision"], first["precision.dtype"], first["precision.tf32"]) == (True, "bf16", False)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps_done"] == 2 and summary["data_identity"] == made.data_identity


def test_a_replan_in_which_no_trial_succeeds_is_one_error_line_exit_1_and_writes_no_plan(
    dataset, tmp_path, run_cli, monkeypatch
):
    # A CUDA plan of a model whose every loss is NaN here: --adapt re-plans, and no trial of
    # the re-plan succeeds. Not a traceback: the reason and the command that shows the trials.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOTUNE_TEST_ALWAYS_NAN", "1")
    plan = _plan(
        tmp_path,
        dataset,
        **_from_h200(),
        launch={"nproc_per_node": 1, "nnodes": 1, "device": "cuda"},
        strategies=[],
        workload={"name": "tests.faults:build", "overrides": {}},
    )
    code, out, err = run_cli(
        "run", plan, "--adapt", "--trust-workload", "--time-budget", "26", "--steps", "2", "--out", tmp_path / "out"
    )
    assert code == 1 and out == "", err
    *notes, last = err.strip().splitlines()
    assert last.startswith("autotune: error: no trial of study ") and "succeeded" in last and "Traceback" not in err, (
        err
    )
    assert all(line.startswith("autotune: ") and "error" not in line for line in notes), err
    assert not (tmp_path / "made-there.adapted.plan.json").exists() and not (tmp_path / "out").exists()
