"""Issue 27's hostile inputs, one table: each command is refused with one line on stderr that
says why, exit 2 (bad input) or 1 (what only writing finds), nothing on stdout, and nothing on
disk written or changed (every file under the test's folder keeps its bytes, none appears).

The faults that are not a refusal live beside what they break: ranks that die with their
launcher (tests/test_run_faults.py), plan text quoted in exports (tests/test_export.py), plan
fields escaped on the terminal (tests/test_terminal.py), a huge field in linear time."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from autotune import plan as planmod
from tests.conftest import DEFAULT_PLAN, ROOT
from tests.test_limits import _hf  # the workload of Llama 3.2 1B's published config.json, changed

PLAN_A = ROOT / "profiles" / "h200-phase8-small.plan.json"


def _plan(tmp: Path, name: str = "p", base: Path = DEFAULT_PLAN, **changes) -> Path:
    """A copy of ``base`` with sections changed ({"train.eval_batches": 9, "workload": {...}}),
    made on no particular machine."""
    data = json.loads(base.read_text())
    if base == DEFAULT_PLAN:
        data["hardware"] = {"fingerprint": None, "summary": {}}
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            data[section][field] = value
        else:
            data[section] = value
    path = tmp / f"{name}.plan.json"
    path.write_text(json.dumps(data))
    return path


def _two_nodes(tmp: Path, endpoint: str) -> Path:
    return _plan(
        tmp,
        strategies=[{"name": "ddp", "knobs": {}}],
        launch={"nproc_per_node": 1, "nnodes": 2, "rdzv_endpoint": endpoint, "device": "cpu"},
    )


def _text(tmp: Path) -> Path:
    path = tmp / "a.txt"
    path.write_text("def f(x):\n    return x + 1\n" * 1000)  # enough to split into train and val
    return path


def _run_folder(tmp: Path) -> Path:
    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    return run


def _foreign(tmp: Path) -> Path:
    """Someone's own SQLite database."""
    path = tmp / "notes.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        db.execute("INSERT INTO notes (text) VALUES ('mine')")
    db.close()
    return path


Args = Callable[[Path], list]

# (id, the command's arguments made in the test's folder, exit code, words of the one line)
HOSTILE: list[tuple[str, Args, int, str]] = [
    # Serious: plan text that would become shell code, a port that is no number.
    (
        "export_slurm_injection",
        lambda t: ["export", _two_nodes(t, '127.0.0.1:1";touch PWNED;"'), "--to", "slurm", "--out", t / "job.sbatch"],
        2,
        "rdzv_endpoint must be host:port",
    ),
    (
        "export_torchrun_injection",
        lambda t: ["export", _two_nodes(t, "$(touch PWNED):1"), "--to", "torchrun", "--out", t / "job.sh"],
        2,
        "rdzv_endpoint must be host:port",
    ),
    (
        "export_accelerate_port",
        lambda t: ["export", _two_nodes(t, "node0:abc"), "--to", "accelerate", "--out", t / "acc.yaml"],
        2,
        "rdzv_endpoint must be host:port",
    ),
    # Serious: a plan that passes every bound and would exhaust the machine.
    (
        "run_layers_16777216",
        lambda t: ["run", _plan(t, workload={"name": "tiny", "overrides": {"n_layers": 16_777_216}}), "--out", t / "o"],
        2,
        "in 16,777,216 layers",
    ),
    (
        "show_layers_16777216",
        lambda t: ["show", _plan(t, workload={"name": "tiny", "overrides": {"n_layers": 16_777_216}})],
        2,
        "in 16,777,216 layers",
    ),
    (
        "run_eval_batches_1e9",
        lambda t: ["run", _plan(t, **{"train.eval_batches": 10**9, "train.eval_interval": 1}), "--out", t / "o"],
        2,
        "eval_batches must be at most 65536",
    ),
    (
        "run_nproc_1e18",
        lambda t: [
            "run",
            _plan(t, strategies=[{"name": "ddp", "knobs": {}}], **{"launch.nproc_per_node": 10**18}),
            "--out",
            t / "o",
        ],
        2,
        "nproc_per_node must be at most 1024",
    ),
    (
        "show_hf_layers_1e6",
        lambda t: ["show", _plan(t, workload=_hf(num_hidden_layers=1_000_000))],
        2,
        "num_hidden_layers 1,000,000 is more than 65,536 layers",
    ),
    (
        "run_hf_layers_1e6",
        lambda t: ["run", _plan(t, workload=_hf(num_hidden_layers=1_000_000)), "--out", t / "o"],
        2,
        "num_hidden_layers 1,000,000 is more than 65,536 layers",
    ),
    (
        "show_hf_hidden_size_-64",
        lambda t: ["show", _plan(t, workload=_hf(hidden_size=-64))],
        2,
        "negative dimension -64",
    ),
    (
        "run_hf_hidden_size_-64",
        lambda t: ["run", _plan(t, workload=_hf(hidden_size=-64)), "--out", t / "o"],
        2,
        "negative dimension -64",
    ),
    # Lesser: a study read from someone's own SQLite file.
    (
        "compare_foreign_sqlite",
        lambda t: ["compare", f"sqlite:///{_foreign(t)}#some-study"],
        2,
        "not an Optuna storage",
    ),
    (
        "plan_warm_start_foreign_sqlite",
        lambda t: ["plan", "--trials", "1", "--warm-start", f"sqlite:///{_foreign(t)}", "--out", t / "p.plan.json"],
        2,
        "not an Optuna storage",
    ),
    (
        "plan_exclude_unknown",
        lambda t: [
            "plan",
            "--trials",
            "1",
            "--exclude",
            "warp_drive",
            "--storage",
            f"sqlite:///{t}/s.db",
            "--out",
            t / "p.plan.json",
        ],
        2,
        "--exclude warp_drive: unknown strategy",
    ),
    # Lesser: numbers that are no rate, no time, no count.
    (
        "compare_nan_rate",
        lambda t: [
            "compare",
            PLAN_A,
            _plan(
                t, "rate", PLAN_A, measured={**json.loads(PLAN_A.read_text())["measured"], "tokens_per_s": float("nan")}
            ),
        ],
        2,
        "rate.plan.json: measured tokens/s nan is not a positive number",
    ),
    (
        "compare_inf_rate",
        lambda t: [
            "compare",
            PLAN_A,
            _plan(
                t, "rate", PLAN_A, measured={**json.loads(PLAN_A.read_text())["measured"], "tokens_per_s": float("inf")}
            ),
        ],
        2,
        "rate.plan.json: measured tokens/s inf is not a positive number",
    ),
    (
        "compare_negative_rate",
        lambda t: [
            "compare",
            PLAN_A,
            _plan(t, "rate", PLAN_A, measured={**json.loads(PLAN_A.read_text())["measured"], "tokens_per_s": -5.0}),
        ],
        2,
        "rate.plan.json: measured tokens/s -5.0 is not a positive number",
    ),
    (
        "compare_1e-300_rate",
        lambda t: [
            "compare",
            PLAN_A,
            _plan(t, "rate", PLAN_A, measured={**json.loads(PLAN_A.read_text())["measured"], "tokens_per_s": 1e-300}),
            "--cost-per-gpu-hour",
            "h200=3.50",
        ],
        2,
        "rate.plan.json: measured tokens/s 1e-300 is too small to estimate the time for 1e+09 tokens",
    ),  # the hours overflow
    (
        "run_steps_1e20",
        lambda t: ["run", DEFAULT_PLAN, "--steps", str(10**20), "--out", t / "o"],
        2,
        f"a run trains at most {planmod.MAX_STEPS} steps",
    ),
    (
        "run_tokens_1e20",
        lambda t: ["run", DEFAULT_PLAN, "--tokens", str(10**20), "--out", t / "o"],
        2,
        f"--tokens {10**20} is ",
    ),
    (
        "plan_budget_nan",
        lambda t: ["plan", "--time-budget", "nan", "--out", t / "p.plan.json"],
        2,
        "--time-budget nan: expected a positive, finite number",
    ),
    (
        "plan_budget_inf",
        lambda t: ["plan", "--time-budget", "inf", "--out", t / "p.plan.json"],
        2,
        "--time-budget inf: expected a positive, finite number",
    ),
    (
        "plan_budget_negative",
        lambda t: ["plan", "--time-budget", "-5", "--out", t / "p.plan.json"],
        2,
        "--time-budget -5: expected a positive, finite number",
    ),
    (
        "run_minutes_nan",
        lambda t: ["run", DEFAULT_PLAN, "--minutes", "nan", "--out", t / "o"],
        2,
        "--minutes nan: expected a positive, finite number",
    ),
    (
        "run_minutes_inf",
        lambda t: ["run", DEFAULT_PLAN, "--minutes", "inf", "--out", t / "o"],
        2,
        "--minutes inf: expected a positive, finite number",
    ),
    (
        "run_adapt_budget_nan",
        lambda t: ["run", DEFAULT_PLAN, "--adapt", "--time-budget", "nan", "--out", t / "o"],
        2,
        "--time-budget nan: expected a positive, finite number",
    ),
    # Lesser: data prepare on what is no text, no vocabulary, no place for a dataset.
    (
        "prepare_vocab_2147483647",
        lambda t: ["data", "prepare", "--text", _text(t), "--out", t / "d", "--vocab", "2147483647"],
        2,
        "vocab size 2,147,483,647 is more than 1,048,576 tokens",
    ),
    (
        "prepare_dev_zero",
        lambda t: ["data", "prepare", "--text", "/dev/zero", "--out", t / "d", "--vocab", "512"],
        2,
        "text file /dev/zero: not a regular file",
    ),
    (
        "prepare_out_a_file",
        lambda t: ["data", "prepare", "--text", _text(t), "--out", _text(t), "--vocab", "512"],
        2,
        "is a file, not a folder",
    ),
    (
        "prepare_out_a_run",
        lambda t: ["data", "prepare", "--text", _text(t), "--out", _run_folder(t), "--vocab", "512"],
        2,
        "a folder holding other files, not a dataset",
    ),
    # Root may write in any folder (os.access says so): /proc refuses it only when written, exit 1.
    (
        "prepare_out_unwritable",
        lambda t: ["data", "prepare", "--text", _text(t), "--out", "/proc/autotune-test/data", "--vocab", "512"],
        1,
        "/proc",
    ),
    (
        "export_out_unwritable",
        lambda t: [
            "export",
            _plan(t, strategies=[{"name": "ddp", "knobs": {}}], **{"launch.nproc_per_node": 2}),
            "--to",
            "slurm",
            "--out",
            _text(t) / "job.sbatch",
        ],
        1,
        "cannot write",
    ),
]


def _files(folder: Path) -> dict[str, str]:
    """Every path under ``folder``, with a digest of each file's bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
        for p in folder.rglob("*")
    }


@pytest.fixture(scope="module", autouse=True)
def _torchao_said_its_piece():
    # transformers' first model imports torchao, which logs its own lines once a process:
    # here, before the commands whose stderr is checked.
    pytest.importorskip("transformers")
    from autotune.workloads.hf import hf_workload

    hf_workload("hf:llama", {"hidden_size": 8, "num_attention_heads": 1, "num_hidden_layers": 1, "vocab_size": 8})


@pytest.mark.parametrize("args, code, words", [pytest.param(a, c, w, id=i) for i, a, c, w in HOSTILE])
def test_a_hostile_input_is_one_line_and_nothing_written(tmp_path, run_cli, capsys, args, code, words):
    given = tmp_path / "given"
    given.mkdir()
    argv = args(given)
    capsys.readouterr()
    before = _files(tmp_path)
    got, out, err = run_cli(*argv)
    assert (got, out) == (code, ""), err
    assert err.count("\n") == 1 and err.startswith("autotune: error: ") and words in err, err
    assert _files(tmp_path) == before
