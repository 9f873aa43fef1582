"""What ``pipeline_parallel`` runs (``strategies/pipeline_parallel.py`` says how and why):
the schedule of this rank's stage and the step engine that trains through it. Imported by
its ``apply`` only: this module imports torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from autotune.contract import grads
from autotune.contract.engine import LoopEngine

if TYPE_CHECKING:
    from autotune.contract.context import TrainContext
    from autotune.workloads.adapter import ModelAdapter


class PipelineRunner:
    """The schedule of this rank's stage: one micro-batch's forward and backward for the
    loop (``forward_backward``), the loss of a batch for evaluation (``__call__``)."""

    def __init__(
        self,
        ctx: TrainContext,
        adapter: ModelAdapter,
        stage: nn.Module,
        *,
        first: bool,
        last: bool,
        pieces: int,
        group: Any,
        tied: nn.Parameter | None,
    ) -> None:
        self.ctx, self.adapter, self.stage, self.pieces, self.group, self.tied = (
            ctx,
            adapter,
            stage,
            pieces,
            group,
            tied,
        )
        self.first, self.last = first, last
        """Whether this rank's stage takes the token ids / gives the logits."""
        self.schedule: Any = None
        """The torch schedule, built on this runner's ``loss_fn``."""
        self.divisor = pieces * ctx.grad_accum
        """What each piece's mean loss is divided by (gradients are summed over pieces)."""

    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.adapter.logits_loss(logits, targets) / self.divisor

    def _run(self, x: torch.Tensor, y: torch.Tensor, step: Any) -> torch.Tensor:
        losses: list[torch.Tensor] = []
        with self.ctx.autocast():
            step(*((x,) if self.first else ()), target=y if self.last else None, losses=losses)
        loss = torch.stack(losses).sum().detach().float() if self.last else torch.zeros((), device=x.device)
        dist.all_reduce(loss, group=self.group)  # the last stage's loss on every rank
        return loss

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, last_micro: bool) -> torch.Tensor:
        self.divisor = self.pieces * self.ctx.grad_accum
        loss = self._run(x, y, self.schedule.step)
        if last_micro and self.tied is not None:
            self._sum_tied_grads()
        return loss

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss of the batch (x, y), forward only."""
        self.divisor = self.pieces
        return self._run(x, y, self.schedule.eval)

    def _sum_tied_grads(self) -> None:
        tied = self.tied
        # The first stage's embedding and the last stage's head are this rank's copy of the
        # tied weight; the stages in between hold none and add zeros.
        own = tied if self.first or self.last else None
        grad = own.grad if own is not None and own.grad is not None else torch.zeros_like(tied)
        dist.all_reduce(grad, group=self.group)
        if own is not None:
            own.grad = grad

    def clip_grads(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        # The last stage's copy of a tied head is counted on the first stage.
        skip = frozenset({id(self.tied)}) if self.tied is not None and self.last else frozenset()
        return grads.clip_grad_norm_(params, max_norm, self.group, skip)


class PipelineEngine(LoopEngine):
    """The default loop's optimizer step, clipping and checkpoints, with each micro-batch's
    forward and backward run by the schedule (``PipelineRunner.forward_backward``) and the
    gradient norm taken over the pipeline group (``PipelineRunner.clip_grads``)."""

    flatten_optimizer_state = True
    """Pipeline stages hold different parameters: their optimizer param groups are keyed by
    parameter name (flattened, as torchtitan saves them), not by a group index that every
    stage would write with other contents."""

    def __init__(self, ctx: TrainContext, runner: PipelineRunner) -> None:
        super().__init__(ctx)
        self.runner = runner

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, *, last: bool) -> torch.Tensor:
        return self.runner.forward_backward(x, y, last)

    def clip_grads(self) -> None:
        self.runner.clip_grads(self.params, self.grad_clip)
