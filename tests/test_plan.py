"""Plan files: strict loading, round trips, and bad input through the CLI."""

import json

import pytest

from autotune import plan as planmod
from autotune.errors import UserError
from tests.conftest import DEFAULT_PLAN, ROOT


def default_dict():
    return json.loads(DEFAULT_PLAN.read_text())


def test_bundled_plan_loads_and_round_trips(tmp_path):
    plan = planmod.load(DEFAULT_PLAN)
    assert plan.workload.name == "tiny"
    out = tmp_path / "p.json"
    plan.save(out)
    assert planmod.load(out) == plan
    # Saving does not change the object saved.
    before = plan.to_dict()
    plan.save(out)
    assert plan.to_dict() == before


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.update(surprise=1), "surprise"),
        (lambda d: d["train"].update(micro_batch_size="16"), "train.micro_batch_size"),
        (lambda d: d["train"].update(micro_batch_size=True), "train.micro_batch_size"),
        (lambda d: d["train"].pop("micro_batch_size"), "train.micro_batch_size"),
        (lambda d: d["strategies"].append({"name": "warp_drive"}), "strategies[0].name"),
        (
            lambda d: d["strategies"].append({"name": "precision", "knobs": {"dtype": "fp64"}}),
            "strategies[0].knobs.dtype",
        ),
        (lambda d: d["strategies"].append({"name": "precision", "knobs": {"speed": 2}}), "strategies[0].knobs.speed"),
        (lambda d: d["launch"].update(device="gpu"), "launch.device"),
        (lambda d: d.update(schema_version=99), "schema_version"),
        (lambda d: d["train"].update(steps=0), "train"),
    ],
)
def test_malformed_plans_name_the_field(mutate, field):
    data = default_dict()
    mutate(data)
    with pytest.raises(UserError) as e:
        planmod.from_dict(data)
    assert str(e.value).startswith(field), str(e.value)


def test_duplicate_strategy_rejected():
    data = default_dict()
    data["strategies"] = [{"name": "precision"}, {"name": "precision"}]
    with pytest.raises(UserError, match="listed twice"):
        planmod.from_dict(data)


def test_strategy_knobs_are_typed():
    data = default_dict()
    data["strategies"] = [
        {"name": "precision", "knobs": {"dtype": "bf16"}},
        {"name": "grad_accum", "knobs": {"steps": 4}},
    ]
    configs = planmod.from_dict(data).strategy_configs()
    assert configs["precision"].dtype == "bf16" and configs["precision"].tf32 is True
    assert configs["grad_accum"].steps == 4


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "invalid JSON"),
        (json.dumps({**default_dict(), "extra": 1}), "extra: unknown key"),
        (json.dumps({**default_dict(), "strategies": [{"name": "nope"}]}), "unknown strategy 'nope'"),
        (
            json.dumps({**default_dict(), "train": {**default_dict()["train"], "lr": "fast"}}),
            "train.lr: expected a number",
        ),
    ],
)
@pytest.mark.parametrize("command", ["show", "run"])
def test_cli_rejects_bad_plans_with_one_line_and_writes_nothing(tmp_path, run_cli, content, needle, command):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    out_dir = tmp_path / "out"
    args = [command, bad] + (["--out", out_dir, "--steps", "2"] if command == "run" else [])
    code, stdout, stderr = run_cli(*args)
    assert code == 2
    assert needle in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out_dir.exists()
    assert bad.read_text() == content


def test_cli_missing_plan(tmp_path, run_cli):
    code, _, err = run_cli("show", tmp_path / "nope.json")
    assert code == 2 and "no such file" in err


def test_show_prints_plan(run_cli):
    code, out, _ = run_cli("show", DEFAULT_PLAN)
    assert code == 0 and "tiny" in out
    code, out, _ = run_cli("show", DEFAULT_PLAN, "--json")
    assert code == 0 and json.loads(out)["workload"]["name"] == "tiny"


def test_show_prints_an_approximate_plans_quality_guard(run_cli):
    # The committed H200 fp8 plan of gpt-1b: its guard's verdict and both runs' figures.
    code, out, _ = run_cli("show", ROOT / "bench/results/approx-planner/gpt1b/gpt-1b.plan.json")
    assert code == 0 and "quality guard: passed against exact trial 1, 201 steps" in " ".join(out.split())
    assert "5.0995" in out and "5.1006" in out
    code, out, _ = run_cli("show", DEFAULT_PLAN)
    assert "quality guard" not in out


@pytest.mark.parametrize(
    "args", [["run", "--bogus"], ["run", "--steps", "x", str(DEFAULT_PLAN)], ["show"], ["profile", "--nope"]]
)
def test_usage_errors_are_one_line_exit_2(run_cli, args):
    code, _, err = run_cli(*args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("autotune: error:")


def test_committed_plans_keep_loading():
    # Plans are a public format: every committed one (old versions too) must keep loading.
    paths = sorted((ROOT / "profiles").rglob("*.plan.json")) + sorted((ROOT / "bench").rglob("*.plan.json"))
    assert len(paths) >= 2
    for path in paths:
        planmod.load(path)
