"""Processes, in one place: a child that dies with its parent however the parent dies, the
stop signals of a run, a trial's process group, and the torchrun that `autotune run` starts
for a plan of several processes.

Imports no torch at module level: the planner (a trial's parent) imports it too.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autotune.plan import Plan

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)  # loaded at import, before any fork: preexec_fn only calls it


def die_with_parent(signum: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Have the kernel send ``signum`` to this process when its parent dies (PR_SET_PDEATHSIG),
    however it dies (SIGKILL included): a planner killed mid-trial takes its trial with it, so
    the next trial is not measured beside an orphan, and a killed `autotune run` its torchrun.
    Runs in the child before exec, and again in each rank (whose parent is torchrun), so the
    chain planner -> torchrun -> ranks dies together. ``parent``: the pid the parent must be
    (default: the parent now); if it is not once armed, it died before prctl and nobody will
    send the signal: this process gets it at once."""
    parent = os.getppid() if parent is None else parent
    _libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signum)


# -- a run's stop signals ------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Signals that stop a run after its current step, with a checkpoint and the summary (Slurm
sends SIGTERM, a terminal SIGINT, a dropped SSH session SIGHUP); the command then exits 128 +
the signal's number."""


class Stop:
    """A stop signal (STOP_SIGNALS) while training: remember it; the loop finishes its step, then
    stops. With several processes the ranks agree on the step: after each one, an all-reduce
    (max) of the signal number on a CPU gloo group (no device sync), so a rank signalled a
    moment later stops at the same step as the others."""

    def __init__(self) -> None:
        self.signum = 0
        self.control: Any = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Stop:
        if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._set)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _set(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum

    def agreed(self) -> int:
        """The signal this step stops for (0: none), the same on every rank."""
        if self.control is None:
            return self.signum
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.signum], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        return int(flag.item())


# -- a trial's process group: killed with its planner ----------------------------------------


class KillOnSignal:
    """While a trial runs in the main thread, SIGTERM kills the trial's process group before
    the planner ends as it would have (SIGINT raises KeyboardInterrupt, handled by the
    caller's ``finally``)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.previous: Any = None

    def __enter__(self) -> KillOnSignal:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

    def _handle(self, signum: int, frame: Any) -> None:
        kill_group(self.proc)
        signal.signal(signal.SIGTERM, self.previous)
        if callable(self.previous):
            self.previous(signum, frame)
        else:  # SIG_DFL: end as SIGTERM would have
            os.kill(os.getpid(), signum)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# -- `autotune run` of several processes: torchrun, supervised ------------------------------


def supervise_torchrun(
    plan: Plan, out: Path | None, resume: bool, total: int, args: list[str]
) -> tuple[int, int, float] | None:
    """Run ``autotune ARGS`` under torchrun, ``plan.launch.nproc_per_node`` processes, and wait.

    This process takes the run directory's lock, then shares it with the ranks (each holds it
    while it lives, so no other run takes the directory while any of them trains), and forwards
    SIGINT/SIGTERM/SIGHUP to the ranks (they stop at their next step) while it waits for torchrun.
    torchrun gets its own session, so a terminal's Ctrl-C reaches the ranks once, through here;
    it dies with this process, and its ranks with it (PR_SET_PDEATHSIG, however it dies).
    Returns torchrun's exit status, the first stop signal this process got (0: none) and when
    torchrun started (a time.time()); None when the run in ``out`` had already reached ``total``."""
    from autotune import distributed
    from autotune.limits import warn_if_oversubscribed
    from autotune.runtime import rundir

    nproc = plan.launch.nproc_per_node
    created = out is not None and not out.exists()
    with Forward() as forward:
        lock = rundir.lock_out_dir(out)
        try:
            rundir.check_out_dir(out, resume)
            done = rundir.finished_step(out, total) if resume else None
            if done is not None:
                rundir.notify(f"the run in {out} already reached step {done}: nothing to do")
                return None
            warn_if_oversubscribed(plan.launch)
            if lock is not None:
                lock.share()
            me = os.getpid()
            env = distributed.child_env() | {rundir.LAUNCHER_ENV: str(me)}
            # On each node of a multi-node plan the same command joins the plan's rendezvous.
            cmd = distributed.torchrun_command(nproc, "autotune", args, plan.launch)
            began = time.time()
            proc = subprocess.Popen(
                cmd, env=env, start_new_session=True, preexec_fn=lambda: die_with_parent(signal.SIGKILL, me)
            )
            code = forward.wait(proc)
        finally:
            if lock is not None:
                if created:
                    rundir.remove_if_unused(out)
                lock.release()
    return code, forward.signum, began


class Forward:
    """While torchrun runs: a stop signal (SIGINT, SIGTERM, SIGHUP) to this process goes to the
    ranks, torchrun's children (torchrun itself would end them and print a traceback), and the
    first one is remembered. One that arrives before the ranks exist reaches them once they do."""

    POLL_S = 0.2

    def __init__(self) -> None:
        self.signum = 0
        self._pending = 0
        self._proc = None
        self._old: dict = {}

    def __enter__(self) -> Forward:
        for sig in STOP_SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, frame) -> None:
        self.signum = self.signum or signum
        self._pending = signum
        self._deliver()

    def _deliver(self) -> None:
        import psutil

        if not self._pending or self._proc is None:
            return
        try:
            ranks = psutil.Process(self._proc.pid).children()
        except psutil.NoSuchProcess:
            return
        for rank in ranks:
            try:
                rank.send_signal(self._pending)
            except psutil.NoSuchProcess:
                pass
        if ranks:
            self._pending = 0

    def wait(self, proc) -> int:
        self._proc = proc
        while True:
            self._deliver()
            try:
                return proc.wait(timeout=self.POLL_S)
            except subprocess.TimeoutExpired:
                pass


def die_with_launcher(launcher: int) -> None:
    """In a rank: SIGTERM (a checkpoint, the summary, exit) when its torchrun dies, and at once
    if torchrun or the `autotune run` above it (pid ``launcher``), which torchrun dies with, is
    gone already: no rank trains on with nobody holding its run directory."""
    import psutil

    die_with_parent(signal.SIGTERM)
    try:
        alive = psutil.Process(os.getppid()).ppid() == launcher
    except psutil.NoSuchProcess:
        alive = False
    if not alive:
        os.kill(os.getpid(), signal.SIGTERM)
