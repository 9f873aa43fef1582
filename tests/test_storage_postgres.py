"""One search shared by two machines over a real PostgreSQL server (a throwaway cluster on
localhost, tests/postgres.py): two planner processes on one study run every trial once and
finish with the same plan; a server that does not answer is one line within the timeout;
optuna-dashboard opens the study."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.postgres import cluster

PLANNER = [
    "--workload",
    "tiny",
    "--trials",
    "2",
    "--trial-steps",
    "4",
    "--warmup-steps",
    "1",
    "--trial-timeout",
    "120",
    "--exclude",
    "compile",
]


@pytest.fixture(scope="module")
def postgres_url():
    with cluster() as url:
        yield url


def _planner(url: str, tmp: Path, name: str, core: int) -> subprocess.Popen:
    # Each "machine" has its own cache (device lock, compile cache, corpus), plan file and core:
    # sharing the cores, one planner's confirmation would measure the other's trials beside it
    # and could write its baseline where the other writes the chosen trial.
    env = {
        **os.environ,
        "AUTOTUNE_CACHE": str(tmp / f"cache-{name}"),
        "AUTOTUNE_LOCK_DIR": str(tmp / f"cache-{name}" / "locks"),
        "PYTHONUNBUFFERED": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "autotune", "plan", *PLANNER, "--storage", url, "--out", str(tmp / f"{name}.plan.json")],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {core}),
    )


def test_two_planners_share_one_study_run_each_trial_once_and_agree(postgres_url, tmp_path):
    import optuna

    cores = sorted(os.sched_getaffinity(0))
    a = _planner(postgres_url, tmp_path, "a", cores[0])
    b = _planner(postgres_url, tmp_path, "b", cores[-1])
    out_a, out_b = a.communicate(timeout=600)[0], b.communicate(timeout=600)[0]
    assert a.returncode == 0, out_a[-3000:]
    assert b.returncode == 0, out_b[-3000:]
    names = optuna.get_all_study_names(postgres_url)
    assert len(names) == 1  # the same workload on the same machine: one study
    study = optuna.load_study(study_name=names[0], storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    launched = [t for t in trials if t.user_attrs.get("launched")]
    # Every trial ran once: 2 launched by each planner, the baseline and each prior once.
    by_planner = Counter(t.user_attrs.get("planner") for t in launched)
    assert sorted(by_planner.values()) == [2, 2], by_planner
    roles = Counter(t.user_attrs.get("role") for t in trials if t.user_attrs.get("role"))
    assert roles["baseline"] == 1, roles
    priors = [json.dumps(t.params, sort_keys=True) for t in trials if t.user_attrs.get("role") == "prior"]
    assert len(priors) == len(set(priors)), priors
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    plan_a, plan_b = (json.loads((tmp_path / f"{n}.plan.json").read_text()) for n in "ab")
    verdicts = [(p["provenance"]["trial"], p["comparison"]["verdict"]) for p in (plan_a, plan_b)]
    assert plan_a["provenance"]["trial"] == plan_b["provenance"]["trial"], (verdicts, out_a[-2500:], out_b[-2500:])
    assert plan_a["strategies"] == plan_b["strategies"] and plan_a["train"] == plan_b["train"]


def test_a_server_that_does_not_answer_is_one_line_within_the_timeout(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "autotune",
            "plan",
            *PLANNER,
            "--storage",
            f"postgresql://autotune@127.0.0.1:{port}/none",
            "--out",
            str(tmp_path / "p.plan.json"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env={**os.environ, "AUTOTUNE_CACHE": str(tmp_path / "cache")},
    )
    assert r.returncode == 2, r.stderr
    assert "cannot connect" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "p.plan.json").exists()


def test_optuna_dashboard_opens_the_study(postgres_url, tmp_path):
    pytest.importorskip("optuna_dashboard")
    import optuna

    name = "dashboard-check"
    study = optuna.create_study(study_name=name, storage=postgres_url, direction="maximize", load_if_exists=True)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The README's command.
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "optuna-dashboard"),
            postgres_url,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        body = None
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    body = json.loads(response.read())
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"optuna-dashboard exited: {server.stderr.read()[-2000:]}")
                time.sleep(0.3)
        assert body is not None, "optuna-dashboard did not answer"
        studies = {s["study_name"]: s for s in body["study_summaries"]}
        assert name in studies
    finally:
        server.terminate()
        server.wait(timeout=30)
