"""Tensor parallelism (Megatron-style, with ``torch.distributed.tensor.parallel``): each
block's attention heads and MLP width are split over ``degree`` processes, column-wise into a
layer (qkv, fc) and row-wise out of it (proj), with one all-reduce per layer, or, with sequence
parallelism, a reduce-scatter out of it and an all-gather into the next, the norms working on
a slice of the sequence in between (torchtitan's ``apply_tp``). The same matmuls are summed
in another order: an exact strategy.

What it needs. The blocks' ``attn.qkv``/``attn.proj`` and ``mlp.fc``/``mlp.proj`` linears
(the built-in GPT: its fused qkv rows are head-major, so a column split gives each rank whole
heads and the attention reads its local head count from the width); ``degree`` must divide the
heads, the MLP width, the process count (``autotune.mesh.mesh_shape`` checks it before launch)
and, with sequence parallel, the sequence length. Dropout, when on, draws its masks per rank.

The embedding, the position table, the final norm and the (tied, possibly vocab-padded) head
stay whole on every rank of the tp group: each computes them alike on the same batch, so their
gradients agree without a reduction. That is the simplest correct choice: it keeps the tied
head and the vocab-padding mask as they are; torchtitan's vocab-parallel head with
``loss_parallel`` (which splits the largest matmul of a small model) is left for later.

The parameters of the blocks become DTensors under their plain names, so checkpoints go
through torch.distributed.checkpoint (``ctx.sharded_state``), and the gradient norm for
clipping is summed shard by shard (``autotune.distributed.grad_norm``). The data-parallel
dimension, when there is one, is fsdp2's (2D, as in torchtitan); DDP does not take DTensor
parameters (torchtitan refuses DDP with TP too).
"""

from __future__ import annotations

from dataclasses import dataclass

from autotune.context import TrainContext
from autotune.errors import UserError
from autotune.mesh import sub_mesh
from autotune.strategy import Knob, Needs, Strategy


@dataclass(kw_only=True, slots=True)
class TensorParallelConfig:
    degree: int = 2
    """Processes each block is split over; the rest of the processes replicate (data parallel)."""
    sequence_parallel: bool = True
    """Also split norms and dropout along the sequence between the parallel regions, dividing
    their activation memory by ``degree`` at the same communication volume."""

    def __post_init__(self) -> None:
        if self.degree < 2:
            raise ValueError(f"degree must be at least 2, got {self.degree}")


def apply_tensor_parallel(ctx: TrainContext, cfg: TensorParallelConfig) -> None:
    ctx.check_needs(STRATEGY, cfg, "launch the plan with 2+ processes and declare the model's blocks, attention and mlp")
    mesh = sub_mesh(ctx.mesh, "tp")
    if mesh is None or mesh.size() != cfg.degree:
        raise UserError(f"tensor_parallel degree {cfg.degree} has no tp dim of that size in this run's mesh ({ctx.dims})")
    seq_len = ctx.workload.seq_len
    if cfg.sequence_parallel and seq_len % cfg.degree:
        raise UserError(f"tensor_parallel degree {cfg.degree} does not divide the sequence length {seq_len} (sequence_parallel)")
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel, parallelize_module

    model = ctx.model
    if cfg.sequence_parallel:
        # Between the parallel regions the residual stream is this rank's slice of the
        # sequence (B, T/tp, C): the norms run on it; attention and MLP gather the whole.
        gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True)
        plan = {
            "norm1": SequenceParallel(),
            "attn": gather,
            "attn.qkv": ColwiseParallel(),
            "attn.proj": RowwiseParallel(output_layouts=Shard(1)),  # reduce-scatter
            "norm2": SequenceParallel(),
            "mlp": gather,
            "mlp.fc": ColwiseParallel(),
            "mlp.proj": RowwiseParallel(output_layouts=Shard(1)),
        }
    else:
        plan = {"attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel(), "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel()}
    for block in model.blocks:
        parallelize_module(block, mesh, plan)
    if cfg.sequence_parallel:
        # The whole embedding output enters the first block as this rank's slice (no
        # communication); the last block's slices are gathered for the whole final norm and head.
        parallelize_module(
            model.blocks[0], mesh, PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True)
        )
        parallelize_module(model.norm, mesh, PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True))
    ctx.sharded_state = True
    ctx.notes.append(f"tensor parallel over {cfg.degree} processes, sequence parallel {cfg.sequence_parallel}")


STRATEGY = Strategy(
    name="tensor_parallel",
    summary="split heads and MLP width of each block over processes (Megatron TP, sequence parallel)",
    exact=True,
    config=TensorParallelConfig,
    apply=apply_tensor_parallel,
    needs=Needs(min_devices=2, structure=frozenset({"blocks", "attention", "mlp", "gpt"})),
    # DDP all-reduces plain gradients; the blocks' DTensor gradients need fsdp2 for data
    # parallel next to TP (torchtitan refuses DDP with TP too).
    conflicts=frozenset({"ddp"}),
    # It shards the final linears: swaps that replace them come first (torchtitan converts
    # float8 before TP), and the fused norms of triton_kernels are what sequence parallel splits.
    after=frozenset({"vocab_padding", "moe", "int8", "fp8", "triton_kernels"}),
    knobs=(Knob(name="degree", choices=(2, 4, 8)), Knob(name="sequence_parallel", choices=(True, False))),
)
