"""Pipeline parallelism (``torch.distributed.pipelining``): the blocks are cut into ``degree``
stages on different processes (the embedding with the first, the final norm, head and loss
with the last), and each micro-batch is split into ``microbatches`` pieces that flow through
the stages on a GPipe or 1F1B schedule. The gradients of the pieces are summed before one
optimizer step, each piece's mean loss divided by the number of pieces (and by the
accumulation count), so the update is the plain model's on the same batch up to the order of
the sums: an exact strategy.

What it needs. The model adapter's pipeline stages (``pipeline_stage``: the built-in GPT, and
Hugging Face models laid out as Llama's; others are refused before launch, ``check_workload``),
cut by ``pipeline_split``; at most one stage per block; ``microbatches`` must divide the
micro-batch size (``autotune.contract.mesh.mesh_shape`` checks both before launch). Every rank of the
pipeline reads the same batch (the dp rank's): the first stage feeds the inputs, the last the
targets, and the loss is the adapter's of the last stage's logits (``logits_loss``).

How it runs. The stage module keeps the plain model's parameter names (blocks outside the
stage are parameter-free placeholders, so ``blocks.5`` stays ``blocks.5``), and it is what
the optimizer steps and what torch.distributed.checkpoint saves: every stage writes its own
parameters (``ctx.sharded_state``). The schedule owns each micro-batch's forward and
backward (the strategy's step engine, ``ctx.engine``: ``_pipeline_impl.PipelineEngine``); the
loss it returns is the last stage's, summed over the pipeline group so that every rank logs
the same. A tied head (the GPT's default) lives on the
last stage as a copy of the first stage's embedding: after the backward their gradients are
summed over the pipeline group (Megatron's embedding all-reduce; the stages in between add
zeros), so both copies take the same step, and the gradient norm for clipping counts the copy
once, summed over the stages as torchtitan's ``clip_grad_norm_`` does
(``PipelineEngine.clip_grads``).

Not combined (yet). Data parallel next to the pipeline (ddp, fsdp2: the stage would have to
wrap the data-parallel module, as torchtitan does), tensor parallel inside the stages (3D:
4+ processes, not covered by a test here), a whole-model compile (the schedule calls the
stage, not the loop's forward: compile scope blocks works), and fp16's loss scaler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from autotune.contract.mesh import ParallelDims, setting, sub_mesh
from autotune.contract.strategy import Knob, Needs, Strategy
from autotune.errors import UserError

if TYPE_CHECKING:
    from autotune.contract.context import TrainContext


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


def apply_pipeline_parallel(ctx: TrainContext, cfg: PipelineParallelConfig) -> None:
    ctx.check_needs(STRATEGY, cfg, "launch the plan with 2+ processes; the model's adapter must cut it into stages")
    mesh = sub_mesh(ctx.mesh, "pp")
    if mesh is None or mesh.size() != cfg.degree:
        raise UserError(
            f"pipeline_parallel degree {cfg.degree} has no pp dim of that size in this run's mesh ({ctx.dims})"
        )
    if ctx.grad_scaler:
        raise UserError("pipeline_parallel does not scale the loss for fp16: use precision bf16")
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from autotune.strategies._pipeline_impl import PipelineEngine, PipelineRunner
    from autotune.workloads.adapter import NotSupported, adapter_for, pipeline_split

    adapter, index = adapter_for(ctx.model), mesh.get_local_rank()
    first, last = index == 0, index == cfg.degree - 1
    try:
        start, stop = pipeline_split(len(adapter.blocks()), cfg.degree)[index]
        head, embed = adapter.head(), adapter.embedding()
        stage = adapter.pipeline_stage(start, stop, first=first, last=last)
    except NotSupported as e:
        raise UserError(f"strategy pipeline_parallel cannot cut this model: {e}") from None
    tied = head.weight if head.weight is embed.weight else None
    group = mesh.get_group()
    pipe = PipelineStage(stage, index, cfg.degree, ctx.device, group=group)
    kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[cfg.schedule]
    runner = PipelineRunner(
        ctx, adapter, stage, first=first, last=last, pieces=cfg.microbatches, group=group, tied=tied
    )
    # Gradients are summed over the pieces (scale_grads off): the loss divides instead,
    # which also holds across accumulated micro-batches.
    runner.schedule = kind(pipe, n_microbatches=cfg.microbatches, loss_fn=runner.loss_fn, scale_grads=False)
    ctx.model = stage
    ctx.forward = runner  # evaluation: the batch's loss through the schedule
    ctx.engine = lambda ctx: PipelineEngine(ctx, runner)  # training: the schedule's step
    ctx.sharded_state = True
    ctx.notes.append(
        f"pipeline stage {index} of {cfg.degree} (blocks {start}..{stop - 1}), "
        f"{cfg.schedule}, {cfg.microbatches} pieces per micro-batch"
    )


def check_workload(cfg: PipelineParallelConfig, workload: Any) -> None:
    """The workload's adapter must cut the model into stages (``pp``)."""
    from autotune.workloads.adapter import declared

    if "pp" not in declared(workload.structure):
        raise UserError(
            f"pipeline_parallel: workload {workload.name} cannot be cut "
            "into pipeline stages (its model adapter does not support pp)"
        )


def check_mesh(cfg: Any, dims: ParallelDims, micro_batch_size: int | None) -> None:
    """Each micro-batch is cut into ``microbatches`` pieces: at least one per stage (or the
    pipeline never fills), and as many as divide the micro-batch."""
    micro = int(setting(cfg, "microbatches", PipelineParallelConfig().microbatches))
    if dims.pp > 1 and micro < dims.pp:
        raise UserError(
            f"pipeline_parallel microbatches {micro} is fewer than its {dims.pp} stages (the pipeline never fills)"
        )
    if dims.pp > 1 and micro_batch_size is not None and micro_batch_size % micro:
        raise UserError(
            f"pipeline_parallel microbatches {micro} does not divide the micro-batch size {micro_batch_size}"
        )


def pipeline_parallel_cost(cfg: Any, terms: Any) -> None:
    """The cost model's term (``contract.cost.CostTerms``): a stage's L/pp blocks; 1F1B keeps at
    most pp pieces of the micro-batch in flight, GPipe all of them."""
    terms.model_shards *= terms.pp
    if terms.pp > 1:
        pieces = getattr(cfg, "microbatches", 4)
        in_flight = 1.0 if getattr(cfg, "schedule", "1f1b") == "gpipe" else min(terms.pp, pieces) / pieces
        terms.activation_share *= in_flight / terms.pp


STRATEGY = Strategy(
    name="pipeline_parallel",
    phase="shard",
    summary="cut the blocks into stages over processes, micro-batches on a GPipe or 1F1B schedule",
    exact=True,
    config=PipelineParallelConfig,
    apply=apply_pipeline_parallel,
    mesh_dim="pp",
    takes_model=True,
    # A search layout sets microbatches to the degree: the fewest pieces that fill the stages.
    degree_knobs=("degree", "microbatches"),
    check_mesh=check_mesh,
    # The first and last stages hold the embedding and head: vocab padding replaces them first.
    changes=frozenset({"stages"}),
    reads=frozenset({"embedding", "head"}),
    needs=Needs(min_devices=2, features=frozenset({"collectives"}), structure=frozenset({"blocks", "embed", "head"})),
    check_workload=check_workload,
    # Data parallel next to the pipeline would wrap each stage (torchtitan's FSDP + PP), and
    # TP inside the stages needs 4+ processes to test: not done yet (see the docstring).
    conflicts=frozenset({"ddp", "fsdp2", "tensor_parallel"}),
    cost=pipeline_parallel_cost,
    knobs=(
        Knob(name="degree", choices=(2, 4, 8)),
        Knob(name="schedule", choices=("gpipe", "1f1b")),
        Knob(name="microbatches", low=2, high=32, log=True, integer=True),
    ),
)
