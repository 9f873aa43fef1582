"""FP8 training: the linears of the blocks run their matmuls in float8 (e4m3 forward, e5m2
gradients) with dynamic scales, weights kept in full precision for the optimizer (torchao's
float8 training, converted as torchtitan does). 8-bit rounding of activations, weights and
gradients changes what is learned: an approximate strategy, searched only when allowed and
then loss-checked against the exact baseline.

What it does: ``torchao.float8.convert_to_float8_training`` swaps each ``nn.Linear`` of the
blocks (found through the model adapter; the output head too with ``layers
blocks_and_head``) for a ``Float8Linear`` whose matmuls cast input, weight and gradient to
float8 with the recipe's scales (``tensorwise``: one per tensor; ``rowwise``: one per row,
torchao's recipe names). Linears whose dimensions are not multiples of 16 stay as they are:
float8 matmuls (``torch._scaled_mm``) need them. It pays on fp8 tensor cores (compute
capability 8.9+: Ada, Hopper) and under ``compile``, which fuses the casts. Off a GPU it runs
torchao's emulation (the same float8 rounding, matmuls in high precision): for tests, never a
speed-up, so the planner leaves it out of CPU searches.
Excludes int8 (one low-precision format per linear). Applied before tensor parallel and
FSDP2 wrap the converted linears (phase "kernels", before "shard" and "wrap_model"), as
torchtitan does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from autotune import devices
from autotune.contract.strategy import Knob, Needs, Prior, PriorFacts, Strategy
from autotune.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from autotune.contract.context import TrainContext
    from autotune.plan import Plan

_NEEDS = Needs(features=frozenset({"fp8", "torchao"}), modules=("torchao",), structure=frozenset({"blocks"}))

ALIGNMENT = 16
"""Float8 matmuls need both dimensions of a weight to be multiples of this."""


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


def convertible(module: nn.Module, _fqn: str = "") -> bool:
    """A linear that float8 matmuls can take (both dimensions multiples of ALIGNMENT)."""
    from torch import nn

    return (
        isinstance(module, nn.Linear) and module.in_features % ALIGNMENT == 0 and module.out_features % ALIGNMENT == 0
    )


def targets(model: nn.Module, layers: str) -> list[nn.Module]:
    """The modules whose linears a low-precision strategy converts: the blocks, and the
    output head with ``layers == "blocks_and_head"`` (through the model adapter)."""
    from autotune.workloads.adapter import NotSupported, adapter_for

    adapter = adapter_for(model)
    try:
        out = list(adapter.blocks())
        if layers == "blocks_and_head":
            out.append(adapter.head())
    except NotSupported as e:
        raise UserError(
            f"the model's adapter cannot give its {'blocks and head' if layers == 'blocks_and_head' else 'blocks'}: {e}"
        ) from None
    return out


def count_linears(modules: list[nn.Module], kind: type) -> int:
    return sum(isinstance(m, kind) for top in modules for m in ([top] if isinstance(top, kind) else top.modules()))


def apply_fp8(ctx: TrainContext, cfg: Fp8Config) -> None:
    ctx.check_needs(STRATEGY, cfg, "train in bf16 instead (precision), or on an Ada/Hopper GPU")
    from torch import nn
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    # Off a GPU, torchao's emulation: the same float8 rounding of every input, weight and
    # gradient, the matmul in high precision (torch's CPU float8 matmul is minutes a step).
    config = dataclasses.replace(
        Float8LinearConfig.from_recipe_name(cfg.recipe), emulate=not devices.of(ctx.device).accelerator
    )
    for module in targets(ctx.model, cfg.layers):
        if not isinstance(module, nn.Linear):
            convert_to_float8_training(module, config=config, module_filter_fn=convertible)
        elif convertible(module):  # the head itself: convert_to_float8_training swaps children only
            _replace(ctx.model, module, Float8Linear.from_float(module, config=config))
    converted = count_linears(targets(ctx.model, cfg.layers), Float8Linear)
    if not converted:
        raise UserError(
            "fp8: no linear of the blocks has both dimensions a multiple of 16; nothing would train in float8"
        )
    ctx.notes.append(
        f"fp8 ({cfg.recipe} scales): {converted} linears of the {cfg.layers.replace('_', ' ')} train in float8"
    )


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is a child in ``root``."""
    for parent in root.modules():
        for name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, name, new)


def export_accelerate(cfg: Fp8Config, plan: Plan) -> dict[str, Any]:
    """Accelerate's fp8 through torchao (its ``AO`` backend), in place of the precision's autocast
    dtype. That backend takes torchao's default recipe, tensorwise, and keeps the model's first
    and last linears (the head) in high precision: other settings are refused, not misstated."""
    if cfg.recipe != "tensorwise" or cfg.layers != "blocks":
        raise UserError(
            f"fp8 with recipe {cfg.recipe} and layers {cfg.layers}: an Accelerate config's "
            "torchao backend takes tensorwise scales in the blocks only; export --to torchrun"
        )
    return {"mixed_precision": "fp8", "fp8_config": {"backend": "AO"}}


FP8_PRIOR_MIN_D_MODEL = 2048
"""Narrowest model the fp8 prior turns fp8 on for. Measured on one H200 (torch 2.11, torchao
0.18, bf16 + compile, tensorwise scales in the blocks' linears): 1.13x bf16 at gpt-1b's d 2048
(bench/results/approx/fp8_gpt-1b_h200.jsonl), 0.88x at phase8-small's d 512: below a few
thousand columns the casts and amax reductions cost more than the float8 tensor cores save."""


def fp8_prior(facts: PriorFacts) -> Prior | None:
    """On a GPU with fp8 tensor cores, tensorwise scales in the blocks' linears for a model at
    least FP8_PRIOR_MIN_D_MODEL wide (rowwise measured 0.97x at d 2048, the head's vocabulary
    matmul is left in bf16 as torchtitan does by default)."""
    if not facts.accelerator or facts.d_model is None or facts.d_model < FP8_PRIOR_MIN_D_MODEL:
        return None
    return Prior(knobs={"recipe": "tensorwise", "layers": "blocks"})


STRATEGY = Strategy(
    name="fp8",
    phase="kernels",
    summary="float8 matmuls with tensor- or row-wise scales in the linears (approximate)",
    exact=False,
    config=Fp8Config,
    apply=apply_fp8,
    # It swaps the final linears: after what replaces them (the head, the MLPs).
    changes=frozenset({"linears"}),
    reads=frozenset({"head", "mlp"}),
    needs=_NEEDS,
    conflicts=frozenset({"int8"}),
    knobs=(
        Knob(name="recipe", choices=("tensorwise", "rowwise")),
        Knob(name="layers", choices=("blocks", "blocks_and_head")),
    ),
    # Emulated on a CPU: no float8 units there.
    left_out={"cpu": "left out of CPU searches: emulated on a CPU (no float8 units), never a speed-up"},
    prior=fp8_prior,
    # No DeepSpeed export: the config autotune run hands DeepSpeed has no float8 linears.
    exports={"accelerate": export_accelerate},
)
