import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PLAN = ROOT / "profiles" / "default" / "tiny.plan.json"

# Child processes started by tests import the checkout's autotune and the test fixtures.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
# The device locks of a test session stay under its cache, away from the machine-wide ones
# (where another session's planner, or a user's, would refuse its trials).
os.environ.setdefault(
    "AUTOTUNE_LOCK_DIR", str(Path(os.environ.get("AUTOTUNE_CACHE") or Path.home() / ".cache" / "autotune") / "locks")
)
# Keep CPU tests single-threaded per process: CI has 2 cores and tests start children.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS, which torch reads on import)

# tests/xla/ runs in the XLA environment (torch 2.9 + torch-xla: `make test` runs it there, with
# PJRT_DEVICE=CPU); an environment without torch-xla leaves it out instead of failing on import.
collect_ignore = [] if importlib.util.find_spec("torch_xla") else ["xla"]

# Without a GPU, Triton kernels run in Triton's interpreter (tests/test_kernels.py). It is chosen
# when triton is first imported, which torch.compile may do in this process before those tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


FATAL = re.compile(r"terminate called|what\(\)|Traceback|Error|Exception|Fatal|SIG[A-Z]+\(|Aborted|enforce fail")
"""A line of a worker's stderr that says why it died (torchrun's own summary comes after)."""


def worker_failure(proc: subprocess.CompletedProcess) -> str:
    """The message for a torchrun command that failed: its stderr's tail, then the lines that
    say why a rank died, last, where a CI log's tail shows them (torchrun's summary only names
    the signal)."""
    lines = proc.stderr.splitlines()
    fatal = [line for line in lines if FATAL.search(line) and "torch/distributed" not in line][-12:]
    return "\n".join([proc.stderr[-3000:], f"exit status {proc.returncode}; why the ranks ended:", *fatal])


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    from autotune.cli import main

    def call(*args: str):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
