"""The XLA tests (tests/xla/) as one test of the main suite: they need torch-xla, which runs only
on torch 2.9, so they run in their own environment (``.venv-xla``, ``make xla-env``) on XLA's CPU
backend, as a child pytest. Being one test here, pytest-xdist runs them beside the others instead
of after them (about 2.5 minutes, mostly one plan on the XLA device). No skip: without the
environment this fails, as ``make test`` would."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

XLA_PYTHON = ROOT / ".venv-xla" / "bin" / "python"
TIMEOUT_S = 900
"""The XLA tests take about 150 s alone on 2 cores; this is 6x that, for a loaded machine."""


def test_the_xla_tests_pass_in_their_own_environment() -> None:
    assert XLA_PYTHON.exists(), f"no {XLA_PYTHON.relative_to(ROOT)}: `make xla-env` builds the XLA environment"
    cmd = [str(XLA_PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=5", "tests/xla"]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "PJRT_DEVICE": "CPU"}, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    print(proc.stdout[-3000:])  # the child's summary and its slowest tests, shown with -rA or on failure
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-8000:]}\n{proc.stderr[-3000:]}"
    )
