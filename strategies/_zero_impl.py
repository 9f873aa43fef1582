"""What ``zero`` runs (``strategies/zero.py`` says how and why): the step engine that trains
and checkpoints through DeepSpeed's engine. Imported by its ``apply`` only: this module
imports torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from autotune.contract.engine import StepEngine
from autotune.errors import UserError

if TYPE_CHECKING:
    from autotune.contract.context import TrainContext


class DeepSpeedStep(StepEngine):
    """The step through DeepSpeed's ``engine``: per micro-batch the forward under the loop's
    autocast, ``engine.backward`` (which divides by the accumulation count) and
    ``engine.step()``, which reduces, clips, steps and zeroes the gradients at the
    accumulation boundary only (the last micro-batch's): :meth:`step` has nothing left to do.
    The state is sharded: DeepSpeed's own checkpoints, with ``config`` beside them."""

    def __init__(self, ctx: TrainContext, engine: Any, optimizer: Any, config: dict[str, Any], *, tag: str) -> None:
        self.ctx, self.engine, self.config, self.tag = ctx, engine, config, tag
        self.optimizer = optimizer
        """DeepSpeed's ZeRO optimizer (the engine's): its param groups take the learning rate."""
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=False)  # fp16 is refused
        self.grad_accum = ctx.grad_accum

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, *, last: bool) -> torch.Tensor:
        with self.ctx.autocast():
            loss = self.engine(x, y)
        self.engine.backward(loss)  # divides by the accumulation count itself
        self.engine.step()  # reduces, clips and steps at the accumulation boundary only
        return loss.detach() / self.grad_accum

    def step(self) -> None:
        """Nothing: the last micro-batch's ``engine.step()`` was the optimizer step."""

    def state_dict(self) -> dict[str, Any]:
        raise TypeError("DeepSpeed's state is sharded: save it with save(path)")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise TypeError("DeepSpeed's state is sharded: load it with load(path)")

    def save(self, path: Path) -> None:
        self.engine.save_checkpoint(str(path), tag=self.tag, save_latest=False)
        if dist.get_rank() == 0:
            (path / "deepspeed_config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        dist.barrier()  # every rank's partition is written

    def load(self, path: Path) -> None:
        loaded, _ = self.engine.load_checkpoint(str(path), tag=self.tag, load_lr_scheduler_states=False)
        if loaded is None:
            raise UserError(f"{path}: no DeepSpeed checkpoint there")
