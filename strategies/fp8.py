"""FP8 training: the linears of the blocks run their matmuls in float8 (e4m3 forward, e5m2
gradients) with dynamic scales, weights kept in full precision for the optimizer (torchao's
float8 training, as torchtitan converts models). 8-bit rounding of activations, weights and
gradients changes what is learned: an approximate strategy, searched only when allowed and
then loss-checked against the exact baseline.

Declared, not implemented yet (roadmap item "FP8 training", no issue filed). It needs fp8
tensor cores (compute capability 8.9+: Ada, Hopper), CUDA and the torchao package, and
excludes int8 (one low-precision format per linear).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from autotune.strategy import Knob, Needs, Strategy

_NEEDS = Needs(cuda=True, fp8=True, modules=("torchao",), structure=frozenset({"blocks"}))


@dataclass(kw_only=True, slots=True)
class Fp8Config:
    recipe: Literal["tensorwise", "rowwise"] = "tensorwise"
    """Scaling granularity: one scale per tensor (fastest), or one per row (more accurate
    with outliers, some speed lost)."""
    layers: Literal["blocks", "blocks_and_head"] = "blocks"
    """Which linears train in fp8: those inside the blocks, or the output head too
    (torchtitan leaves the head out by default, for accuracy)."""

    def needs(self) -> Needs:
        """Converting the head needs the workload to declare it."""
        extra = frozenset({"head"}) if self.layers == "blocks_and_head" else frozenset()
        return dataclasses.replace(_NEEDS, structure=_NEEDS.structure | extra)


STRATEGY = Strategy(
    name="fp8",
    summary="float8 matmuls with tensor- or row-wise scales in the linears (approximate)",
    exact=False,
    config=Fp8Config,
    apply=None,
    # It swaps the final linears: after what replaces them (the head, the MLPs).
    changes=frozenset({"linears"}),
    reads=frozenset({"head", "mlp"}),
    needs=_NEEDS,
    conflicts=frozenset({"int8"}),
    knobs=(Knob(name="recipe", choices=("tensorwise", "rowwise")), Knob(name="layers", choices=("blocks", "blocks_and_head"))),
    issue="roadmap item FP8 training, no issue filed yet",
)
