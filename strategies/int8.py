"""INT8 training: the linears of the blocks run their matmuls in int8 with dynamic row-wise
scales, the weights kept in full precision for the optimizer (torchao's int8 mixed-precision
training). Rounding activations and weights to 8 bits changes every gradient step, so the
model learns something else: an approximate strategy, searched only when allowed and then
loss-checked against the exact baseline.

Declared, not implemented yet (roadmap item "INT8 training", no issue filed). It needs CUDA
and the torchao package, and excludes fp8 (one low-precision format per linear).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from autotune.strategy import Knob, Needs, Strategy

_NEEDS = Needs(cuda=True, modules=("torchao",), structure=frozenset({"blocks"}))


@dataclass(kw_only=True, slots=True)
class Int8Config:
    layers: Literal["blocks", "blocks_and_head"] = "blocks"
    """Which linears train in int8: those inside the blocks, or the output head too (the
    largest matmul of a small model, and the most sensitive to rounding)."""
    backward: bool = True
    """Also run the two backward matmuls (input and weight gradients) in int8, not only the forward."""

    def needs(self) -> Needs:
        """Converting the head needs the workload to declare it."""
        extra = frozenset({"head"}) if self.layers == "blocks_and_head" else frozenset()
        return dataclasses.replace(_NEEDS, structure=_NEEDS.structure | extra)


STRATEGY = Strategy(
    name="int8",
    summary="int8 matmuls with row-wise scales in the linears (approximate)",
    exact=False,
    config=Int8Config,
    apply=None,
    # It swaps the final linears: after what replaces them (the head, the MLPs).
    changes=frozenset({"linears"}),
    reads=frozenset({"head", "mlp"}),
    needs=_NEEDS,
    conflicts=frozenset({"fp8"}),
    knobs=(Knob(name="layers", choices=("blocks", "blocks_and_head")), Knob(name="backward", choices=(True, False))),
    issue="roadmap item INT8 training, no issue filed yet",
)
