"""A run's folder: its lock (held while any process of the run lives), the checks before a
run starts there, what a killed run left behind, and the JSONL log."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from autotune import distributed, locks
from autotune.errors import UserError
from autotune.schema import write_bytes_atomic

LAUNCHER_ENV = "AUTOTUNE_RUN_LAUNCHER"
"""Set to its pid by the `autotune run` that starts a run's processes under torchrun: it
takes the run directory's lock and shares it with them."""


def notify(message: str) -> None:
    """One line on stderr from rank 0 (every rank reaches the same conclusion)."""
    if distributed.env_rank() == 0:
        print(f"autotune: {message}", file=sys.stderr, flush=True)


def lock_out_dir(out: Path | None) -> locks.HeldLock | None:
    """Hold ``out/.lock`` for this run, so that two runs never share a run directory: the
    single process holds it; each rank of a launched run holds it shared with its launching
    `autotune run` (which shared it with them), so that it stays held while any rank lives,
    even after the launcher is gone; other ranks (a process group not launched by autotune)
    leave it to rank 0."""
    launched = os.environ.get(LAUNCHER_ENV) is not None
    if out is None or (distributed.env_rank() != 0 and not launched):
        return None
    try:
        return locks.acquire(out / ".lock", f"run directory {out}", shared=launched)
    except OSError as e:
        raise UserError(f"cannot write to {out} ({e.strerror})") from None


def remove_if_unused(out: Path) -> None:
    """Remove the run directory ``out``, which this run created, if it holds nothing but its
    lock: a run refused before its first step leaves no folder behind. Under the lock."""
    if {p.name for p in out.iterdir()} <= {".lock"}:
        (out / ".lock").unlink(missing_ok=True)
        out.rmdir()


def check_out_dir(out: Path | None, resume: bool) -> None:
    """Refuse to resume without a run directory, to start a run over another one, or to
    start where nothing can be written (before training, not at the first checkpoint)."""
    if resume and out is None:
        raise UserError("--resume needs --out DIR, where the checkpoints are")
    if out is None:
        return
    if not resume and (out / "log.jsonl").exists():
        raise UserError(f"{out} already holds a run: continue it with --resume, or use another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UserError(f"cannot write to {out} ({e.strerror})") from None


def finished_step(out: Path | None, total_steps: int) -> int | None:
    """The step a finished run in ``out`` reached (its summary says it trained to the end and
    that is at least ``total_steps``), else None."""
    path = out / "summary.json" if out else None
    if path is None or not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    done = summary.get("steps_done") if isinstance(summary, dict) else None
    if summary.get("stopped") == "steps" and isinstance(done, int) and done >= total_steps:
        return done
    return None


def clean_stale_files(out: Path) -> None:
    """Remove what a run killed while writing left behind (temporary files, a checksum whose
    checkpoint never landed). Only under the run directory's lock: nobody else writes there."""
    ckpt_dir = out / "checkpoints"
    stale = [*out.glob(".*.tmp"), *ckpt_dir.glob(".step_*.tmp"), *ckpt_dir.glob(".step_*.pt.*.tmp")]
    stale += [p for p in ckpt_dir.glob("step_*.pt.sha256") if not p.with_suffix("").exists()]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


class Log:
    """Append-only JSONL, flushed at every write so a killed run keeps what it logged."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("a")

    def write(self, records: list[dict[str, Any]]) -> None:
        self._f.write("".join(json.dumps(r) + "\n" for r in records))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def truncate_log(log_path: Path, step: int) -> None:
    if not log_path.exists():
        return
    kept = []
    for line in _lines(log_path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the half-written last line of a killed run
            continue
        if record["step"] < step:
            kept.append(line)
    write_bytes_atomic(log_path, "".join(kept).encode())


def _lines(path: Path) -> Iterator[str]:
    with path.open() as f:
        for line in f:
            if line.strip():
                yield line if line.endswith("\n") else line + "\n"


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _lines(Path(path))]
