"""Process helpers shared by the planner's trials and `autotune run`: a child that dies with
its parent, however the parent dies."""

from __future__ import annotations

import ctypes
import os
import signal

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
