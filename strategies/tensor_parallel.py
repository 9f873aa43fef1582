"""Tensor parallelism (Megatron-style, with ``torch.distributed.tensor.parallel``): each
block's attention heads and MLP width are split over ``degree`` processes, column-wise into a
layer and row-wise out of it, with one all-reduce (or, with sequence parallelism, a
reduce-scatter and an all-gather) per layer. The same matmuls are summed in another order:
an exact strategy.

Declared, not implemented yet (issue 6). It rewrites the attention and MLP of each block, so
the workload must declare blocks, attention and mlp; it needs two or more processes, and
``degree`` must divide the process count, the heads and the MLP width.
"""

from __future__ import annotations

from dataclasses import dataclass

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


STRATEGY = Strategy(
    name="tensor_parallel",
    summary="split heads and MLP width of each block over processes (Megatron TP, sequence parallel)",
    exact=True,
    config=TensorParallelConfig,
    apply=None,
    needs=Needs(min_devices=2, structure=frozenset({"blocks", "attention", "mlp"})),
    # It shards the final linears: swaps that replace them come first (torchtitan converts
    # float8 before TP), and the fused norms of triton_kernels are what sequence parallel splits.
    after=frozenset({"vocab_padding", "moe", "int8", "fp8", "triton_kernels"}),
    knobs=(Knob(name="degree", choices=(2, 4, 8)), Knob(name="sequence_parallel", choices=(True, False))),
    issue="issue 6 (multi-process strategies)",
)
