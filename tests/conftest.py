import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PLAN = ROOT / "profiles" / "default" / "tiny.plan.json"

# Child processes started by tests import the checkout's autotune and the test fixtures.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
# The device locks of a test session stay under its cache, away from the machine-wide ones
# (where another session's planner, or a user's, would refuse its trials). Under pytest-xdist
# each worker has its own, as two planners on two machines would: a planner of one worker
# never waits for, or refuses a trial because of, the other worker's.
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
_LOCKS = os.environ.setdefault(
    "AUTOTUNE_LOCK_DIR", str(Path(os.environ.get("AUTOTUNE_CACHE") or Path.home() / ".cache" / "autotune") / "locks")
)
if WORKER and not _LOCKS.endswith("-" + WORKER):  # a worker inherits the controller's environment
    os.environ["AUTOTUNE_LOCK_DIR"] = f"{_LOCKS}-{WORKER}"
# Each worker has a temporary folder of its own: torch puts inductor's shared C++ artefacts under
# it (/tmp/torchinductor_$USER, whatever a trial's cache), and two workers' trials building one at
# once left a truncated .so that a later trial loaded ("file too short"). A run without workers
# (make test's serial part, after them) takes the first worker's, where those artefacts are built:
# a cold build inside a timed trial is what a budget sized for an idle machine cannot absorb.
_tmp = (
    Path(os.environ.setdefault("AUTOTUNE_TESTS_TMPROOT", tempfile.gettempdir())) / f"autotune-tests-{WORKER or 'gw0'}"
)
_tmp.mkdir(exist_ok=True)
os.environ["TMPDIR"] = tempfile.tempdir = str(_tmp)
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


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the marks this adds
def pytest_collection_modifyitems(config, items):
    """Under ``pytest -n 2 --dist loadgroup`` (``make test``), the tests that share a fixture
    built once per module (a planned study, a cluster, a built model) run on one worker, so that
    it is built once; every other test goes to whichever worker is free."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        if getattr(item.module, "XDIST_SPREAD", False):  # its module fixture is cheap under xdist
            continue
        if any(d.scope in ("module", "package") for defs in info.name2fixturedefs.values() for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def pytest_collection_finish(session):
    """On an xdist worker under ``--dist loadgroup``: every grouped test must carry its group in
    its id, which is all the scheduler reads. pytest 9.2 with pytest-xdist 3.8 silently drops it
    (pytest-xdist#1386): each worker would then build the module fixtures again, minutes each."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    lost = [item.nodeid for item in session.items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        message = (
            f"pytest-xdist's loadgroup lost the group of {len(lost)} tests (first: {lost[0]}); "
            f"pytest {pytest.__version__} with this pytest-xdist does not group (pytest-xdist#1386): "
            "install the [dev] extra's pytest"
        )
        sys.stderr.write(f"ERROR: {message}\n")  # a worker's exception reaches the controller as a closed channel
        raise pytest.UsageError(message)
