"""Every committed plan that this machine can run (the CPU ones) still trains under
`autotune run`, two steps, as its own processes; the GPU plans load and pass the plan check
here (tests/test_bad_input.py, tests/test_layering.py) and run on the GPU machine
(bench/README.md). A plan made on another CPU is refused here in one line (`--adapt` adapts
it: tests/test_travel.py); with its fingerprint taken out, as on its own machine, it trains."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CPU_PLANS = sorted(
    p
    for p in ROOT.glob("**/*.plan.json")
    if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)
    and json.loads(p.read_text())["launch"]["device"] == "cpu"
)


def test_the_cpu_plans_are_found():
    assert {p.name for p in CPU_PLANS} >= {"tiny.plan.json", "tiny-2procs.plan.json", "tiny-4procs.plan.json"}


@pytest.mark.parametrize("path", CPU_PLANS, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_committed_cpu_plan_trains(path, tmp_path):
    from autotune.hardware import current_fingerprint
    from autotune.limits import usable_cores

    out = tmp_path / "run"
    data = json.loads(path.read_text())
    fingerprint = data.get("hardware", {}).get("fingerprint")
    if fingerprint is not None and fingerprint != current_fingerprint():
        refused = subprocess.run(
            [sys.executable, "-m", "autotune", "run", str(path), "--steps", "2", "--out", str(out)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert not out.exists()
        data["hardware"] = {"fingerprint": None, "summary": {}}
    copy = tmp_path / path.name
    copy.write_text(json.dumps(data))
    r = subprocess.run(
        [sys.executable, "-m", "autotune", "run", str(copy), "--steps", "2", "--out", str(out), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=280,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    if data["launch"]["nproc_per_node"] > usable_cores():  # said, not refused (autotune.limits)
        assert (
            f"autotune: warning: {data['launch']['nproc_per_node']} processes on {usable_cores()} core(s)" in r.stderr
        )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == 2
