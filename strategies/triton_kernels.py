"""Fused Triton kernels (kernels/, in the Liger-Kernel layout): LayerNorm forward and
backward in one kernel each, and the output head fused with the cross-entropy, computed in
chunks so the (tokens x vocab) logits are never held whole. The same maths in another order
of floating-point operations: an exact strategy.

Declared, not implemented yet (roadmap item "custom Triton kernels", no issue filed). It
needs CUDA and the triton package; the fused loss replaces the model's head and the loss its
adapter computes from the head's output, so that kernel needs a workload whose adapter serves
both ("head" and "loss": the built-in GPT, an hf: model with an output head).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from autotune.strategy import Knob, Needs, Strategy

_NEEDS = Needs(cuda=True, modules=("triton",))


@dataclass(kw_only=True, slots=True)
class TritonKernelsConfig:
    layernorm: bool = True
    """Replace every nn.LayerNorm with the fused Triton LayerNorm."""
    cross_entropy: bool = True
    """Replace the head matmul and the cross-entropy with one chunked fused kernel."""

    def __post_init__(self) -> None:
        if not (self.layernorm or self.cross_entropy):
            raise ValueError("at least one of layernorm and cross_entropy must be on")

    def needs(self) -> Needs:
        """The fused loss replaces the head and the adapter's loss."""
        return dataclasses.replace(_NEEDS, structure=frozenset({"head", "loss"}) if self.cross_entropy else frozenset())


STRATEGY = Strategy(
    name="triton_kernels",
    summary="fused Triton kernels: LayerNorm, head + cross-entropy",
    exact=True,
    config=TritonKernelsConfig,
    apply=None,
    # The fused loss reads the head's final weight: after what replaces it (vocab padding).
    changes=frozenset({"norms", "loss"}),
    reads=frozenset({"head"}),
    needs=_NEEDS,
    knobs=(Knob(name="layernorm", choices=(True, False)), Knob(name="cross_entropy", choices=(True, False))),
    issue="roadmap item custom Triton kernels, no issue filed yet",
)
