"""Trials: one short real training run of a plan, in its own process.

``run_trial`` starts ``python -m autotune.runtime.measure PLAN RESULT`` (torchrun when the
plan uses several processes) in a new process session, under a wall-clock limit. The child
(``autotune.runtime.measure``) builds the executor's own ``Trainer`` (what the planner
measures is what ``autotune run`` does), warms up (compilation included), times a fixed
number of steps with device events and writes one JSON result. An out-of-memory error, a
NaN, a hang, a crash or a kill costs one trial: the parent reads the status from the result
file, or from how the child ended, and the whole process group of a hung child is killed
(``autotune.runtime.process``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from autotune import locks, schema
from autotune.errors import UserError
from autotune.plan import Figures, Plan
from autotune.runtime.process import KillOnSignal, die_with_parent, kill_group

Status = Literal["ok", "oom", "nan", "timeout", "crash", "unsupported", "pruned"]


@dataclass(kw_only=True, slots=True)
class TrialBudget:
    warmup_steps: int = 5
    """Steps run before timing (the first one compiles)."""
    timed_steps: int = 20
    """Steps timed with device events (micro-batch steps: divided by the accumulation, at
    least one optimizer step)."""
    timeout_s: float = 300.0
    """Wall-clock limit of the whole child, start-up and compilation included."""
    target_s: float | None = None
    """Seconds of timed steps to aim for: the first timed optimizer step says how many fit
    (at least one, at most ``timed_steps``' worth), so a slow run (an fp32 baseline of a large
    model) is measured in a few steps and a fast one in ``timed_steps``. None: always
    ``timed_steps`` (the quality guard's runs, which compare losses step by step)."""


@dataclass(kw_only=True, slots=True)
class TrialResult:
    figures: Figures
    """Status and measured figures (DESIGN.md "Trial")."""
    error: str | None = None
    """The error text when the trial failed."""
    wall_s: float = 0.0
    """Wall time of the child, start-up included."""
    startup_s: float | None = None
    """Seconds from the child's start to its model built and its strategies applied (Python,
    torch, the workload, the process group): the per-trial overhead no step pays for."""
    warmup_s: float | None = None
    """Seconds of the untimed warm-up steps (compilation happens here)."""
    timed_s: float | None = None
    """Seconds of the timed steps (their sum)."""


def optimizer_steps(budget: TrialBudget, grad_accum: int) -> tuple[int, int]:
    """Warm-up and timed optimizer steps of a trial with ``grad_accum`` micro-batches a step
    (the most timed ones: ``budget.target_s`` may time fewer, :func:`steps_for_target`).

    One timed step is enough when a step holds many micro-batches (it times all of them); the
    spread between runs is what the confirmation's rounds measure."""
    return max(1, budget.warmup_steps // grad_accum), max(1, budget.timed_steps // grad_accum)


def steps_for_target(target_s: float | None, first_step_s: float, most: int) -> int:
    """Timed optimizer steps for a run whose first timed step took ``first_step_s``: as many as
    fill ``target_s`` (rounded), at least one, at most ``most``."""
    if target_s is None or first_step_s <= 0:
        return most
    return max(1, min(most, round(target_s / first_step_s)))


# -- the parent side -----------------------------------------------------------------------


def cache_root() -> Path:
    """$AUTOTUNE_CACHE, else ~/.cache/autotune: compile cache, locks, trial logs."""
    return Path(os.environ.get("AUTOTUNE_CACHE") or Path.home() / ".cache" / "autotune").expanduser()


def compile_cache_env() -> dict[str, str]:
    """One persistent inductor cache for every trial, so a repeated shape compiles once."""
    return {"TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))}


def trial_command(plan: Plan, plan_path: Path, result_path: Path, budget: TrialBudget) -> list[str]:
    from autotune.distributed import torchrun_command

    args = [
        str(plan_path),
        str(result_path),
        "--warmup",
        str(budget.warmup_steps),
        "--steps",
        str(budget.timed_steps),
        "--progress",
        str(progress_path(result_path)),
    ]
    if budget.target_s is not None:
        args += ["--seconds", repr(budget.target_s)]
    nproc = plan.launch.nproc_per_node
    if nproc * plan.launch.nnodes == 1:
        return [sys.executable, "-m", "autotune.runtime.measure", *args]
    return torchrun_command(nproc, "autotune.runtime.measure", args, plan.launch)


# -- one measuring process per device -------------------------------------------------------

_held: dict[str, tuple[locks.HeldLock, int]] = {}
"""Device lock path -> (the lock, how many holders in this process): re-entrant."""


LOCK_DIR_ENV = "AUTOTUNE_LOCK_DIR"
"""Environment variable naming another folder for the device locks (the tests' own)."""


def device_lock_path(device: str) -> Path:
    """This machine's lock for measuring on ``device``: one per machine, whatever the user or
    $AUTOTUNE_CACHE, in a folder under the system's temporary folder that every user may write
    and only a file's owner delete in (mode 1777, as /tmp itself); $AUTOTUNE_LOCK_DIR names
    another folder."""
    if override := os.environ.get(LOCK_DIR_ENV):
        return Path(override) / f"measure-{device}.lock"
    folder = Path(tempfile.gettempdir()) / "autotune-locks"
    try:
        folder.mkdir()
        folder.chmod(0o1777)  # mkdir's mode goes through the umask
    except FileExistsError:
        pass
    return folder / f"measure-{device}.lock"


@contextlib.contextmanager
def measuring(device: str) -> Iterator[None]:
    """Hold this machine's lock for measuring on ``device`` (a device's name): a trial beside
    another process's trial measures the contention, not the plan. Re-entrant within a
    process, so a planner that holds it for its whole search passes it to its own trials; in
    another process it is a one-line UserError naming the holder's pid."""
    key = str(device_lock_path(device))
    if key in _held:
        lock, count = _held[key]
        _held[key] = (lock, count + 1)
    else:
        _held[key] = (locks.acquire(key, f"measuring on this machine's {device}"), 1)
    try:
        yield
    finally:
        lock, count = _held[key]
        if count == 1:
            del _held[key]
            lock.release()
        else:
            _held[key] = (lock, count - 1)


POLL_S = 0.25
"""How often the parent reads the child's progress while it waits."""


def run_trial(
    plan: Plan,
    budget: TrialBudget,
    *,
    workdir: Path | None = None,
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    on_progress: Callable[[int, float], bool] | None = None,
) -> TrialResult:
    """Run ``plan`` as one isolated trial; never raises for what happens inside the child.

    The child's stdout and stderr go to ``log_path`` (kept; None: a temporary file): a line per
    phase, so that even a trial killed for its time says where it was. Its plan and result go
    to a folder of its own (:func:`_trial_folder`) in ``workdir``, else beside ``log_path``
    (the study's folder), else in the system's temporary folder. While it runs,
    ``on_progress(step, tokens_per_s)`` is called for each timed step the child reports; True
    stops the trial (status "pruned"). Takes the device lock (:func:`measuring`)."""
    folder = workdir or (Path(log_path).parent if log_path is not None else None)
    with measuring(plan.launch.device), _trial_folder(folder) as tmp:
        plan_path, result_path = tmp / "plan.json", tmp / "result.json"
        plan.save(plan_path)
        log_path = Path(log_path) if log_path is not None else tmp / "trial.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        from autotune.distributed import child_env as multiprocess_env

        # Unbuffered: the log has every line the child printed, even if it is killed.
        child_env = multiprocess_env({**os.environ, **compile_cache_env(), "PYTHONUNBUFFERED": "1", **(env or {})})
        start = time.monotonic()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                trial_command(plan, plan_path, result_path, budget),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env,
                start_new_session=True,  # its own process group: a timeout kills all of it
                preexec_fn=die_with_parent,
            )
        try:
            with KillOnSignal(proc):
                ended = _wait(proc, start + budget.timeout_s, progress_path(result_path), on_progress)
        finally:
            if proc.returncode is None:  # interrupted (KeyboardInterrupt, an error): no orphan
                kill_group(proc)
        wall = time.monotonic() - start
        if ended == "timeout":
            return TrialResult(
                figures=Figures(status="timeout"),
                error=_ended(f"no result within {budget.timeout_s:.0f} s", log_path),
                wall_s=wall,
            )
        if ended == "pruned":
            return TrialResult(figures=Figures(status="pruned"), error="stopped by the pruner", wall_s=wall)
        results = _results(result_path)
        if results:
            results[0].wall_s = wall
            return results[0]
        return TrialResult(figures=Figures(status="crash"), error=_how_it_ended(proc.returncode, log_path), wall_s=wall)


TRIAL_FOLDER_PREFIX = "autotune-trial-"


@contextlib.contextmanager
def _trial_folder(parent: Path | None) -> Iterator[Path]:
    """A fresh folder in ``parent`` (None: the system's temporary folder) for one trial's
    files, locked (``.lock``) while this process lives and removed after. The folders beside
    it whose lock is free were left by a planner killed mid-trial: removed first (a folder
    without its lock yet is one being made)."""
    parent = Path(parent if parent is not None else tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    for left in parent.glob(f"{TRIAL_FOLDER_PREFIX}*"):
        try:
            if (left / ".lock").is_file():
                with locks.acquire(left / ".lock", f"trial folder {left}"):
                    shutil.rmtree(left, ignore_errors=True)
        except (UserError, OSError):  # a live trial's, or another user's
            pass
    with (
        tempfile.TemporaryDirectory(prefix=TRIAL_FOLDER_PREFIX, dir=parent) as tmp,
        locks.acquire(Path(tmp) / ".lock", "trial folder"),
    ):
        yield Path(tmp)


def progress_path(result_path: Path) -> Path:
    """Where the child appends one JSON line per timed step: {"step": n, "tokens_per_s": x}."""
    return result_path.with_name(result_path.name + ".progress")


def _wait(
    proc: subprocess.Popen, deadline: float, progress: Path, on_progress: Callable[[int, float], bool] | None
) -> str:
    """Wait for the child: "exited", "timeout" (group killed) or "pruned" (group killed)."""
    seen = 0
    while True:
        try:
            proc.wait(timeout=max(0.0, min(POLL_S, deadline - time.monotonic())))
            return "exited"
        except subprocess.TimeoutExpired:
            pass
        if on_progress is not None:
            reports, seen = read_progress(progress, seen)
            if any(on_progress(step, tokens_per_s) for step, tokens_per_s in reports):
                kill_group(proc)
                return "pruned"
        if time.monotonic() >= deadline:
            kill_group(proc)
            return "timeout"


def read_progress(path: Path, offset: int = 0) -> tuple[list[tuple[int, float]], int]:
    """Complete progress lines after byte ``offset``, and the offset after them."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    complete = data[: data.rfind(b"\n") + 1]
    reports = [(int(r["step"]), float(r["tokens_per_s"])) for r in map(json.loads, complete.splitlines())]
    return reports, offset + len(complete)


def _results(result_path: Path) -> list[TrialResult]:
    """Rank 0's result if it is ok, else every written failure, the first written first.

    Ranks other than 0 write a failure beside rank 0's file; when one rank fails, the others
    fail after it (a peer closed the connection) or are ended by torchrun, so the first
    failure written is the cause."""
    paths = [p for p in [result_path, *result_path.parent.glob(f"{result_path.name}.rank*")] if p.exists()]
    results = {p: schema.from_dict(TrialResult, json.loads(p.read_text())) for p in paths}
    if result_path in results and results[result_path].figures.status == "ok":
        return [results[result_path]]
    return [results[p] for p in sorted(results, key=lambda p: (p.stat().st_mtime_ns, p == result_path))]


_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+(?:Error|Exception|Interrupt|Exit|Failure)\b|error:|fatal)", re.IGNORECASE)


def error_line(log_text: str) -> str | None:
    """The last line of a log that names an error (``RuntimeError: ...``), whole; else its
    last line; None for an empty log."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    for line in reversed(lines):
        if _ERROR_LINE.match(line):
            return line
    return lines[-1] if lines else None


def _how_it_ended(returncode: int, log_path: Path) -> str:
    if returncode < 0:
        return _ended(f"killed by {signal.Signals(-returncode).name}", log_path)
    return _ended(f"exited with status {returncode} and no result", log_path)


def _ended(how: str, log_path: Path) -> str:
    """``how`` a trial ended, with its log's error line (or last line) and the log's path."""
    line = error_line(_tail(log_path))
    return how + (f": {line}" if line else "") + f" (log {log_path})"


def _tail(path: Path, size: int = 64 * 1024) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode(errors="replace")
