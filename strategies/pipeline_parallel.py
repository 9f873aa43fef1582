"""Pipeline parallelism (``torch.distributed.pipelining``): the blocks are cut into ``degree``
stages on different processes (the embedding with the first, the final norm, head and loss
with the last), and each micro-batch is split into ``microbatches`` pieces that flow through
the stages on a GPipe or 1F1B schedule. The gradients of the pieces are summed before one
optimizer step, each piece's mean loss divided by the number of pieces (and by the
accumulation count), so the update is the plain model's on the same batch up to the order of
the sums: an exact strategy.

What it needs. The built-in GPT (its embedding, position table, blocks, final norm and head);
at most one stage per block; ``microbatches`` must divide the micro-batch size
(``autotune.mesh.mesh_shape`` checks both before launch). Every rank of the pipeline reads the
same batch (the dp rank's): the first stage feeds the inputs, the last the targets.

How it runs. The stage module keeps the plain model's parameter names (blocks outside the
stage are parameter-free placeholders, so ``blocks.5`` stays ``blocks.5``), and it is what
the optimizer steps and what torch.distributed.checkpoint saves: every stage writes its own
parameters (``ctx.sharded_state``). The schedule owns each micro-batch's forward and
backward (``ctx.forward_backward``); the loss it returns is the last stage's, summed over the
pipeline group so that every rank logs the same. A tied head (the GPT's default) lives on the
last stage as a copy of the first stage's embedding: after the backward their gradients are
summed over the pipeline group (Megatron's embedding all-reduce; the stages in between add
zeros), so both copies take the same step, and the gradient norm for clipping counts the copy
once, summed over the stages as torchtitan's ``clip_grad_norm_`` does (``ctx.clip_grads``).

Not combined (yet). Data parallel next to the pipeline (ddp, fsdp2: the stage would have to
wrap the data-parallel module, as torchtitan does), tensor parallel inside the stages (3D:
4+ processes, not covered by a test here), a whole-model compile (the schedule calls the
stage, not the loop's forward: compile scope blocks works), and fp16's loss scaler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from autotune import distributed
from autotune.context import TrainContext
from autotune.errors import UserError
from autotune.mesh import sub_mesh
from autotune.strategy import Knob, Needs, Strategy
from autotune.workloads.gpt import GPT


@dataclass(kw_only=True, slots=True)
class PipelineParallelConfig:
    degree: int = 2
    """Pipeline stages, one per process group; at most the number of blocks."""
    schedule: Literal["gpipe", "1f1b"] = "1f1b"
    """gpipe: all forwards, then all backwards (activations of every micro-batch live at once);
    1f1b: one forward, one backward in turn (activations of at most ``degree`` micro-batches)."""
    microbatches: int = 4
    """Pieces each micro-batch is split into: at least ``degree`` (to fill the pipeline) and a
    divisor of the micro-batch size (both checked with the mesh); the idle share of each stage
    (the bubble) is about (degree - 1) / (microbatches + degree - 1)."""

    def __post_init__(self) -> None:
        if self.degree < 2:
            raise ValueError(f"degree must be at least 2, got {self.degree}")
        if not 1 <= self.microbatches <= 256:
            raise ValueError(f"microbatches must be from 1 to 256, got {self.microbatches}")


class GPTStage(nn.Module):
    """Blocks ``[start, stop)`` of a GPT, with its embedding if first and its head if last,
    under the plain model's parameter names."""

    def __init__(self, model: GPT, start: int, stop: int, *, first: bool, last: bool) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.first, self.last, self.span = first, last, (start, stop)
        if first:
            self.embed, self.pos = model.embed, model.pos
        # Placeholders keep the indices (and names) of this stage's blocks.
        self.blocks = nn.ModuleList(block if start <= i < stop else nn.Identity() for i, block in enumerate(model.blocks))
        if last:
            self.norm, self.head = model.norm, model.head
        self._flops = model.flops_per_token()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """First stage: token ids (B, T); others: the residual stream (B, T, C). Last stage
        returns the logits (B, T, V), the others the residual stream."""
        if self.first:
            x = self.embed(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for i in range(*self.span):
            x = self.blocks[i](x)
        return self.head(self.norm(x)) if self.last else x

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return GPT.loss(self, logits, targets)  # type: ignore[arg-type]  # reads self.cfg only

    def flops_per_token(self) -> int:
        """The whole model's (MFU counts every stage's work)."""
        return self._flops


class PipelineRunner:
    """The schedule of this rank's stage: one micro-batch's forward and backward for the
    loop (``forward_backward``), the loss of a batch for evaluation (``__call__``)."""

    def __init__(self, ctx: TrainContext, stage: GPTStage, pieces: int, group: Any, tied: nn.Parameter | None) -> None:
        self.ctx, self.stage, self.pieces, self.group, self.tied = ctx, stage, pieces, group, tied
        self.schedule: Any = None
        """The torch schedule, built on this runner's ``loss_fn``."""
        self.divisor = pieces * ctx.grad_accum
        """What each piece's mean loss is divided by (gradients are summed over pieces)."""

    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.stage.loss(logits, targets) / self.divisor

    def _run(self, x: torch.Tensor, y: torch.Tensor, step: Any) -> torch.Tensor:
        losses: list[torch.Tensor] = []
        with self.ctx.autocast():
            step(*((x,) if self.stage.first else ()), target=y if self.stage.last else None, losses=losses)
        loss = torch.stack(losses).sum().detach().float() if self.stage.last else torch.zeros((), device=x.device)
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
        stage, tied = self.stage, self.tied
        own = stage.embed.weight if stage.first else stage.head.weight if stage.last else None
        grad = own.grad if own is not None and own.grad is not None else torch.zeros_like(tied)
        dist.all_reduce(grad, group=self.group)
        if own is not None:
            own.grad = grad

    def clip_grads(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        # The last stage's copy of a tied head is counted on the first stage.
        skip = frozenset({id(self.stage.head.weight)}) if self.tied is not None and self.stage.last else frozenset()
        return distributed.clip_grad_norm_(params, max_norm, self.group, skip)


def apply_pipeline_parallel(ctx: TrainContext, cfg: PipelineParallelConfig) -> None:
    ctx.check_needs(STRATEGY, cfg, "launch the plan with 2+ processes; the model must be the built-in GPT")
    mesh = sub_mesh(ctx.mesh, "pp")
    if mesh is None or mesh.size() != cfg.degree:
        raise UserError(f"pipeline_parallel degree {cfg.degree} has no pp dim of that size in this run's mesh ({ctx.dims})")
    if ctx.grad_scaler:
        raise UserError("pipeline_parallel does not scale the loss for fp16: use precision bf16")
    if ctx.forward is not ctx.model:
        raise UserError("pipeline_parallel cuts the model itself, but another strategy already wrapped its forward")
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    model: GPT = ctx.model
    layers, index = len(model.blocks), mesh.get_local_rank()
    start, stop = index * layers // cfg.degree, (index + 1) * layers // cfg.degree
    tied = model.head.weight if model.head.weight is model.embed.weight else None
    stage = GPTStage(model, start, stop, first=index == 0, last=index == cfg.degree - 1)
    group = mesh.get_group()
    pipe = PipelineStage(stage, index, cfg.degree, ctx.device, group=group)
    kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[cfg.schedule]
    runner = PipelineRunner(ctx, stage, cfg.microbatches, group, tied)
    # Gradients are summed over the pieces (scale_grads off): the loss divides instead,
    # which also holds across accumulated micro-batches.
    runner.schedule = kind(pipe, n_microbatches=cfg.microbatches, loss_fn=runner.loss_fn, scale_grads=False)
    ctx.model = stage
    ctx.forward = runner  # evaluation: the batch's loss through the schedule
    ctx.forward_backward = runner.forward_backward
    ctx.clip_grads = runner.clip_grads
    ctx.sharded_state = True
    ctx.notes.append(f"pipeline stage {index} of {cfg.degree} (blocks {start}..{stop - 1}), {cfg.schedule}, {cfg.microbatches} pieces per micro-batch")


STRATEGY = Strategy(
    name="pipeline_parallel",
    summary="cut the blocks into stages over processes, micro-batches on a GPipe or 1F1B schedule",
    exact=True,
    config=PipelineParallelConfig,
    apply=apply_pipeline_parallel,
    needs=Needs(min_devices=2, structure=frozenset({"blocks", "embed", "head", "gpt"})),
    # Data parallel next to the pipeline would wrap each stage (torchtitan's FSDP + PP), and
    # TP inside the stages needs 4+ processes to test: not done yet (see the docstring).
    conflicts=frozenset({"ddp", "fsdp2", "tensor_parallel"}),
    # The first and last stages hold the embedding and head: vocab padding replaces them first.
    after=frozenset({"vocab_padding"}),
    knobs=(
        Knob(name="degree", choices=(2, 4, 8)),
        Knob(name="schedule", choices=("gpipe", "1f1b")),
        Knob(name="microbatches", low=2, high=32, log=True, integer=True),
    ),
)
