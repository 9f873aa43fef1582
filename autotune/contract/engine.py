"""The step engine: one protocol for whatever runs a training step.

The executor (``autotune.runtime.trainer``) calls only its engine: ``train_step`` once per optimizer
step, ``state_dict`` / ``save`` and their loads for checkpoints. The default loop is
:class:`LoopEngine` (the module's forward under autocast, the scaled backward, DDP's no_sync
on all but a step's last micro-batch, clipping and AdamW). A strategy that owns backward and
the optimizer step sets ``TrainContext.engine`` to a builder of its own engine, called once
every strategy is applied: the pipeline schedules (``strategies/_pipeline_impl.py``) and
DeepSpeed's engine (``strategies/_zero_impl.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from autotune import devices
from autotune.contract.grads import adamw_groups, clip_grad_norm_

if TYPE_CHECKING:
    from autotune.contract.context import MicroBatch, TrainContext
    from autotune.plan import TrainSpec


class StepEngine(Protocol):
    """What the executor trains through. ``train_step`` loops ``forward_backward`` over the
    step's micro-batches, then calls ``step``; an engine subclasses this to inherit it."""

    optimizer: Any
    """The optimizer: its param groups take the schedule's learning rate each step."""
    scaler: torch.amp.GradScaler
    """The loss scaler, saved with every checkpoint (disabled but under fp16)."""
    grad_accum: int
    """Micro-batches per optimizer step."""

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, *, last: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch (inputs ``x``, targets ``y``; ``last``: the
        step's last one) with the loss divided by the accumulation count; returns that loss,
        detached, the same on every rank of a model-parallel group."""
        ...

    def step(self) -> None:
        """The optimizer step on the accumulated gradients (clipped to ``grad_clip``), then
        the gradients zeroed."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Model and optimizer state, ``{"model": ..., "optimizer": ...}``, of a process whose
        model is whole (checkpoints without ``ctx.sharded_state``)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...

    def save(self, path: Path) -> None:
        """Write this rank's share of the model and optimizer state into directory ``path``
        (sharded checkpoints: every rank calls it, it returns once all is written)."""
        ...

    def load(self, path: Path) -> None:
        """Read back what :meth:`save` wrote (every rank)."""
        ...

    def train_step(self, batch: MicroBatch, lr: float) -> torch.Tensor:
        """One optimizer step at learning rate ``lr`` over the micro-batches ``batch(0)``,
        ``batch(1)``...; returns the step's mean loss, still on the device."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = self.grad_accum
        total = None
        for micro in range(accum):
            x, y = batch(micro)
            loss = self.forward_backward(x, y, last=micro == accum - 1)
            total = loss if total is None else total + loss
        self.step()
        assert total is not None
        return total


def make_optimizer(
    model: torch.nn.Module, spec: TrainSpec, device: torch.device, options: dict[str, Any]
) -> torch.optim.Optimizer:
    """The plan's AdamW: decay on matrices only, fused where the device has it, ``options`` on top."""
    groups = adamw_groups(model, spec.weight_decay)  # decay on matrices only, one group per mesh
    kwargs: dict[str, Any] = devices.of(device).optimizer_kwargs()
    kwargs.update(options)
    return torch.optim.AdamW(groups, lr=spec.lr, betas=(spec.beta1, spec.beta2), **kwargs)


class LoopEngine(StepEngine):
    """The default loop: ``ctx.forward`` under the context's autocast, the backward through the
    GradScaler, inside ``ctx.sync_context`` (DDP reduces on a step's last micro-batch only);
    clipping by the global norm and the plan's AdamW. Checkpoints: the model's and optimizer's
    state dicts when the model is whole, torch.distributed.checkpoint when it is sharded."""

    flatten_optimizer_state: bool = False
    """Key the sharded optimizer state by parameter name (flattened), not by param group."""

    def __init__(self, ctx: TrainContext) -> None:
        if ctx.spec is None:
            raise ValueError("the step engine is built from the plan's training settings (ctx.spec)")
        self.ctx = ctx
        self.grad_clip = ctx.spec.grad_clip
        """Global gradient norm to clip to; 0: no clipping."""
        self.optimizer = make_optimizer(ctx.model, ctx.spec, ctx.device, ctx.optimizer_options)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.grad_scaler)
        self.grad_accum = ctx.grad_accum
        self.params = [p for p in ctx.model.parameters() if p.requires_grad]
        """What is clipped."""

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, *, last: bool) -> torch.Tensor:
        ctx = self.ctx
        with ctx.sync_context(last):
            with ctx.autocast():
                loss = ctx.forward(x, y) / self.grad_accum
            self.scaler.scale(loss).backward()
        return loss.detach()

    def clip_grads(self) -> None:
        """Clip ``params``' gradients to ``grad_clip`` by their global norm (a strategy's own
        norm where it spreads parameters over groups: ``TrainContext.clip_grads``)."""
        (self.ctx.clip_grads or clip_grad_norm_)(self.params, self.grad_clip)

    def step(self) -> None:
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            self.clip_grads()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.ctx.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ctx.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def sharded_state_dict(self) -> dict[str, Any]:
        """Model and optimizer state as this rank's shards (DTensors) under the plain model's
        parameter names, for torch.distributed.checkpoint; also the template a load fills."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(self.ctx.model, self.optimizer, options=self._options())
        return {"model": model, "optimizer": optimizer}

    def save(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        # Returns on every rank once all shards and the coordinator's .metadata are written.
        dcp.save(self.sharded_state_dict(), checkpoint_id=path)

    def load(self, path: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self.sharded_state_dict()
        dcp.load(state, checkpoint_id=path)  # resharded if the layout changed
        set_state_dict(
            self.ctx.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=self._options(),
        )

    def _options(self) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(flatten_optimizer_state_dict=self.flatten_optimizer_state)
