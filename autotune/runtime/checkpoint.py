"""Checkpoints of a run: written atomically with their sha256 (a sidecar beside a ``.pt``, a
manifest inside a sharded directory), so a damaged one is named and passed over; a resume
checks that plan and checkpoint describe the same run.

A whole model (one process, or DDP's identical replicas) is one ``step_XXXXXXXX.pt`` written
by rank 0; sharded state (FSDP2, tp, pp, ZeRO) a ``step_XXXXXXXX/`` directory every rank
writes through the step engine.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from autotune.errors import UserError
from autotune.runtime.rundir import notify
from autotune.schema import fsync_dir, write_bytes_atomic

if TYPE_CHECKING:
    from autotune.runtime.trainer import Trainer

CHECKPOINT_FORMAT = 2
"""2: the GPT's fused qkv rows are head-major (each head's q, k, v together, so tensor
parallel splits whole heads); a format-1 checkpoint holds them q-block, k-block, v-block and
would load without error into a different model, so it is refused."""


def check_format(state: dict[str, Any]) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT} "
            "(written by another autotune version; its model layout differs)"
        )


# -- RNG state in weights_only-loadable form ----------------------------------------------


def numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def numpy_state_from(s: dict[str, Any]) -> tuple:
    return (s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"])


def python_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def python_state_from(s: list[Any]) -> tuple:
    return (s[0], tuple(s[1]), s[2])


# -- writing and reading checkpoints ------------------------------------------------------

KEEP_CHECKPOINTS = 2
MANIFEST = "manifest.sha256.json"
"""In a sharded checkpoint directory: every other file's sha256, by path relative to it."""


def save_checkpoint(trainer: Trainer, step: int, ckpt_dir: Path) -> Path:
    """Atomically write the checkpoint of ``step``; keep the newest KEEP_CHECKPOINTS.

    A whole model (one process, or DDP's identical replicas) goes into ``step_XXXXXXXX.pt``,
    written by rank 0 (temporary file, fsync, rename), then its sha256 beside it in
    ``step_XXXXXXXX.pt.sha256`` (sha256sum's format), the same way: a failure (a full disk)
    leaves neither file, a kill between them a ``.pt`` that a resume passes over as having no
    checksum, never a checksum of a missing checkpoint. Sharded state (FSDP2, tp, pp, ZeRO) goes into a directory
    ``step_XXXXXXXX/`` that every rank writes through the step engine (``StepEngine.save``:
    torch.distributed.checkpoint, or DeepSpeed's own), with a MANIFEST of its files' sha256.
    Every rank calls this, and returns once the checkpoint is complete.
    """
    if trainer.ctx.sharded_state:
        path = _save_sharded(trainer, step, ckpt_dir)
    else:
        path = ckpt_dir / f"step_{step:08d}.pt"
        if trainer.rank == 0:
            buf = io.BytesIO()
            torch.save(trainer.state_dict(step), buf)
            payload = buf.getvalue()
            write_bytes_atomic(path, payload)
            try:
                write_bytes_atomic(_sidecar(path), f"{hashlib.sha256(payload).hexdigest()}  {path.name}\n".encode())
            except OSError:
                path.unlink(missing_ok=True)
                raise
            for old in _checkpoints(ckpt_dir, sharded=False)[:-KEEP_CHECKPOINTS]:
                old.unlink(missing_ok=True)
                _sidecar(old).unlink(missing_ok=True)
    if trainer.world_size > 1:
        import torch.distributed as dist

        dist.barrier()  # no rank looks for the checkpoint before rank 0 has put it in place
    return path


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): _sha256(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def checksum_problem(path: Path) -> str | None:
    """Why ``path`` is not the checkpoint that was written (None: every checksum matches)."""
    if path.is_dir():
        try:
            expected = json.loads((path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            return "no readable checksum manifest"
        actual = _digests(path)
        for name, digest in expected.items():
            if name not in actual:
                return f"{name} is missing"
            if actual[name] != digest:
                return f"checksum mismatch in {name}"
        return None
    try:
        expected = _sidecar(path).read_text().split()[0]
    except (OSError, IndexError):
        return "no checksum file"
    return None if _sha256(path) == expected else "checksum mismatch"


def _save_sharded(trainer: Trainer, step: int, ckpt_dir: Path) -> Path:
    """The step engine's save of the model and optimizer shards (torch.distributed.checkpoint,
    or DeepSpeed's own) into a temporary directory, then rank 0 adds ``meta.pt`` (step, scaler,
    RNG) and the checksum manifest and renames it into place: a ``step_XXXXXXXX/`` directory is
    complete or absent."""
    import torch.distributed as dist

    final, tmp = ckpt_dir / f"step_{step:08d}", ckpt_dir / f".step_{step:08d}.tmp"
    main = trainer.rank == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing
        tmp.mkdir(parents=True)
    dist.barrier()  # no rank writes into tmp before it is fresh
    trainer.engine.save(tmp)  # returns on every rank once all is written
    if main:
        buf = io.BytesIO()
        torch.save(trainer.extra_state(step), buf)
        write_bytes_atomic(tmp / "meta.pt", buf.getvalue())
        write_bytes_atomic(tmp / MANIFEST, (json.dumps(_digests(tmp), indent=1) + "\n").encode())
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        fsync_dir(ckpt_dir)
        for old in _checkpoints(ckpt_dir, sharded=True)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoints(ckpt_dir: Path, *, sharded: bool) -> list[Path]:
    """Complete checkpoints of one kind in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.exists():
        return []
    if sharded:
        return sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and (p / "meta.pt").is_file())
    return sorted(ckpt_dir.glob("step_*.pt"))


def _pick_checkpoint(trainer: Trainer, ckpt_dir: Path, control: Any) -> Path | None:
    """The newest checkpoint whose checksums match, chosen by rank 0 (one reader of the
    files) and sent to the others; each one passed over is named on stderr."""
    chosen = None
    if trainer.rank == 0:
        passed: list[tuple[Path, str]] = []
        for path in reversed(_checkpoints(ckpt_dir, sharded=trainer.ctx.sharded_state)):
            problem = checksum_problem(path)
            if problem is None:
                chosen = path
                break
            passed.append((path, problem))
        for path, problem in passed:
            then = f"resuming from {chosen.name}" if chosen else "no older complete checkpoint"
            notify(f"checkpoint {path} is corrupt ({problem}): {then}")
    if control is not None:
        import torch.distributed as dist

        box = [str(chosen) if chosen else None]
        dist.broadcast_object_list(box, src=0, group=control)
        chosen = Path(box[0]) if box[0] else None
    return chosen


def resume(trainer: Trainer, ckpt_dir: Path, control: Any) -> int:
    """Load the newest complete checkpoint (one made by this very run: plan and checkpoint
    must agree); returns its step, 0 when there is none yet."""
    path = _pick_checkpoint(trainer, ckpt_dir, control)
    if path is None:
        notify(f"no complete checkpoint in {ckpt_dir}: starting from step 0")
        return 0
    if trainer.ctx.sharded_state:
        step = _load_sharded(trainer, path)
    else:
        state = torch.load(path, map_location=trainer.device, weights_only=True)
        check_same_run(state, trainer, path)
        step = trainer.load_state_dict(state)
    notify(f"resuming from step {step} ({path})")
    return step


def check_same_run(state: dict[str, Any], trainer: Trainer, path: Path) -> None:
    """Refuse a checkpoint made under another plan, naming every difference in one line."""
    check_format(state)
    saved, current = state.get("run"), trainer.identity()
    if not isinstance(saved, dict):
        return  # made before checkpoints recorded their run: nothing to compare
    diffs = [
        f"{k} {saved.get(k)!r} (checkpoint) vs {current.get(k)!r} (plan)"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise UserError(
            f"checkpoint {path} is of another run: {'; '.join(diffs)} "
            "(resume with the plan and --steps it was made with, or use another --out)"
        )


def _load_sharded(trainer: Trainer, path: Path) -> int:
    """Every rank reads its shards of ``path`` in place, through the step engine."""
    meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    check_same_run(meta, trainer, path)
    trainer.engine.load(path)
    return trainer.load_extra_state(meta)
