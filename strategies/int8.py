"""INT8 training: the linears of the blocks run their matmuls in int8 with dynamic row-wise
scales, the weights kept in full precision for the optimizer (torchao's int8 mixed-precision
training, ``torchao.prototype.quantized_training``). Rounding activations and weights to 8
bits changes every gradient step, so the model learns something else: an approximate
strategy, searched only when allowed and then loss-checked against the exact baseline.

What it does: ``quantize_(module, int8_mixed_precision_training(...))`` makes the weight of
each ``nn.Linear`` of the blocks (through the model adapter; the head too with ``layers
blocks_and_head``) an ``Int8MixedPrecisionTrainingLinear`` (torchao's module swap, in place)
whose matmuls quantize input and weight row-wise to int8 and run ``torch._int_mm``;
``backward`` also runs the two gradient matmuls in int8. The parameters stay ordinary full
precision tensors, so the optimizer, FSDP2 and checkpoints see plain weights.
Linears whose dimensions are not multiples of 16 stay as they are. It pays on int8 tensor
cores (CUDA) under ``compile``; a CPU runs it too (tests; left out of CPU searches). Excludes
fp8 (one low-precision format per linear).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from autotune.contract.strategy import Knob, Needs, Strategy
from autotune.errors import UserError
from autotune.strategies.fp8 import convertible, count_linears, targets

if TYPE_CHECKING:
    from autotune.contract.context import TrainContext

_NEEDS = Needs(features=frozenset({"torchao"}), modules=("torchao",), structure=frozenset({"blocks"}))


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


def apply_int8(ctx: TrainContext, cfg: Int8Config) -> None:
    ctx.check_needs(STRATEGY, cfg, "train in bf16 instead (precision)")
    from torchao import quantize_
    from torchao.prototype.quantized_training.int8_mixed_precision import (
        Int8MixedPrecisionTrainingConfig,
        Int8MixedPrecisionTrainingLinear,
    )

    # The module-swap form: the weight-subclass form reaches the int8 matmul only through a
    # __torch_function__ table that torch 2.13 bypasses for F.linear (it then trains in full
    # precision, silently; tests/test_lowp.py checks the losses differ).
    config = Int8MixedPrecisionTrainingConfig(
        output=True, grad_input=cfg.backward, grad_weight=cfg.backward, module_swap=True
    )
    for module in targets(ctx.model, cfg.layers):
        quantize_(module, config, filter_fn=convertible)
    converted = count_linears(targets(ctx.model, cfg.layers), Int8MixedPrecisionTrainingLinear)
    if not converted:
        raise UserError(
            "int8: no linear of the blocks has both dimensions a multiple of 16; nothing would train in int8"
        )
    ctx.notes.append(
        f"int8 ({'forward and backward' if cfg.backward else 'forward'}): {converted} linears of the "
        f"{cfg.layers.replace('_', ' ')} train in int8"
    )


STRATEGY = Strategy(
    name="int8",
    phase="kernels",
    summary="int8 matmuls with row-wise scales in the linears (approximate)",
    exact=False,
    config=Int8Config,
    apply=apply_int8,
    # It swaps the final linears: after what replaces them (the head, the MLPs).
    changes=frozenset({"linears"}),
    reads=frozenset({"head", "mlp"}),
    needs=_NEEDS,
    conflicts=frozenset({"fp8"}),
    knobs=(Knob(name="layers", choices=("blocks", "blocks_and_head")), Knob(name="backward", choices=(True, False))),
    left_out={"cpu": "left out of CPU searches: torchao's int8 training is made for GPU int8 tensor cores"},
)
