"""Tensor parallelism (Megatron-style, with ``torch.distributed.tensor.parallel``): each
block's attention heads and MLP width are split over ``degree`` processes, column-wise into a
layer (qkv, fc) and row-wise out of it (proj), with one all-reduce per layer, or, with sequence
parallelism, a reduce-scatter out of it and an all-gather into the next, the norms working on
a slice of the sequence in between (torchtitan's ``apply_tp``). The same matmuls are summed
in another order: an exact strategy.

What it needs. The model adapter's tensor-parallel plan (``tp_plan``: module FQN -> style):
the built-in GPT's blocks' ``attn.qkv``/``attn.proj`` and ``mlp.fc``/``mlp.proj`` linears (its
fused qkv rows are head-major, so a column split gives each rank whole heads and the attention
reads its local head count from the width), with the norms for sequence parallel; a Hugging
Face model's own ``base_model_tp_plan``, its untied head split by vocabulary columns and
gathered, and for sequence parallel the Llama layout's norms (HF's plans name none). A model
without a plan, or sequence parallel where the adapter knows no norms, is refused before
launch (``check_workload``). ``degree`` must divide the query and kv heads and the MLP width
(the workload's shape, checked by ``autotune.contract.mesh.mesh_shape`` before launch, and the built
model's adapter's at apply), the process count and, with sequence parallel, the sequence length. Dropout,
when on, draws its masks per rank.

The GPT's embedding, position table, final norm and (tied, possibly vocab-padded) head stay
whole on every rank of the tp group: each computes them alike on the same batch, so their
gradients agree without a reduction. That is the simplest correct choice: it keeps the tied
head and the vocab-padding mask as they are; torchtitan's vocab-parallel head with
``loss_parallel`` (which splits the largest matmul of a small model) is left for later.

The parameters of the blocks become DTensors under their plain names, so checkpoints go
through torch.distributed.checkpoint (``ctx.sharded_state``), and the gradient norm for
clipping is summed shard by shard (``autotune.contract.grads.grad_norm``). The data-parallel
dimension, when there is one, is fsdp2's (2D, as in torchtitan); DDP does not take DTensor
parameters (torchtitan refuses DDP with TP too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autotune.contract.mesh import sub_mesh
from autotune.contract.strategy import Knob, Needs, Strategy
from autotune.errors import UserError

if TYPE_CHECKING:
    from autotune.contract.context import TrainContext


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
    ctx.check_needs(
        STRATEGY, cfg, "launch the plan with 2+ processes and declare the model's blocks, attention and mlp"
    )
    mesh = sub_mesh(ctx.mesh, "tp")
    if mesh is None or mesh.size() != cfg.degree:
        raise UserError(
            f"tensor_parallel degree {cfg.degree} has no tp dim of that size in this run's mesh ({ctx.dims})"
        )
    seq_len = ctx.workload.seq_len
    if cfg.sequence_parallel and seq_len % cfg.degree:
        raise UserError(
            f"tensor_parallel degree {cfg.degree} does not divide the sequence length {seq_len} (sequence_parallel)"
        )
    from torch.distributed.tensor.parallel import parallelize_module

    from autotune.workloads.adapter import NotSupported, adapter_for

    adapter = adapter_for(ctx.model)
    try:
        shape = adapter.shape()
        plan = adapter.tp_plan(sequence_parallel=cfg.sequence_parallel)
    except NotSupported as e:
        raise UserError(f"strategy tensor_parallel cannot split this model: {e}") from None
    for what, n in (("query heads", shape.n_heads), ("kv heads", shape.n_kv_heads), ("MLP width", shape.d_ff)):
        if n % cfg.degree:
            raise UserError(f"tensor_parallel degree {cfg.degree} does not divide the model's {n} {what}")
    parallelize_module(ctx.model, mesh, plan)
    ctx.sharded_state = True
    ctx.notes.append(f"tensor parallel over {cfg.degree} processes, sequence parallel {cfg.sequence_parallel}")


def check_workload(cfg: TensorParallelConfig, workload: Any) -> None:
    """The workload's adapter must have a tensor-parallel plan (``tp``), with the norms for
    sequence parallel (``sp``) if asked."""
    from autotune.workloads.structure import declared

    structure = declared(workload.structure)
    if "tp" not in structure:
        raise UserError(
            f"tensor_parallel: workload {workload.name} has no "
            "tensor-parallel plan (its model adapter does not support tp)"
        )
    if cfg.sequence_parallel and "sp" not in structure:
        raise UserError(
            f"tensor_parallel: workload {workload.name}'s tensor-parallel plan names "
            "no norms to split along the sequence (use sequence_parallel false)"
        )


def tensor_parallel_cost(cfg: Any, terms: Any) -> None:
    """The cost model's term (``contract.cost.CostTerms``): each block split tp ways; sequence
    parallel also splits the norms' and residuals' activations (without it they stay whole:
    half the activations)."""
    terms.model_shards *= terms.tp
    if terms.tp > 1:
        terms.activation_share *= 1 / terms.tp if getattr(cfg, "sequence_parallel", True) else 0.5 + 0.5 / terms.tp


STRATEGY = Strategy(
    name="tensor_parallel",
    phase="shard",
    summary="split heads and MLP width of each block over processes (Megatron TP, sequence parallel)",
    exact=True,
    config=TensorParallelConfig,
    apply=apply_tensor_parallel,
    mesh_dim="tp",
    # It shards the final linears: swaps that replace them come first (torchtitan converts
    # float8 before TP), and the final norms are what sequence parallel splits.
    changes=frozenset({"placement"}),
    reads=frozenset({"embedding", "head", "mlp", "linears", "norms"}),
    needs=Needs(
        min_devices=2, features=frozenset({"collectives"}), structure=frozenset({"blocks", "attention", "mlp"})
    ),
    check_workload=check_workload,
    # DDP all-reduces plain gradients; the blocks' DTensor gradients need fsdp2 for data
    # parallel next to TP (torchtitan refuses DDP with TP too).
    conflicts=frozenset({"ddp"}),
    cost=tensor_parallel_cost,
    knobs=(Knob(name="degree", choices=(2, 4, 8)), Knob(name="sequence_parallel", choices=(True, False))),
)
