"""ZeRO through DeepSpeed: optimizer state (stage 1), gradients too (stage 2) or parameters
too (stage 3) sharded across processes, optionally offloaded to the CPU. Each process still
takes the step of the global batch's mean gradient: an exact strategy.

Declared, not implemented yet (issue 6). It needs the deepspeed package, CUDA and two or more
processes. DeepSpeed's engine owns the model, the gradients and the optimizer step, so it
excludes the torch data-parallel wrappers (DDP, FSDP2) and combines with neither torch's
DTensor tensor parallelism nor ``torch.distributed.pipelining`` (DeepSpeed's own pipeline
engine takes stage 1 at most).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from autotune.strategies.ddp import WRAP_AFTER
from autotune.strategy import Knob, Needs, Strategy


@dataclass(kw_only=True, slots=True)
class ZeroConfig:
    stage: Literal[1, 2, 3] = 2
    """What is sharded: 1 optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """Keep the optimizer state and run the optimizer step on the CPU (ZeRO-Offload)."""
    offload_params: bool = False
    """Keep parameters in CPU memory between uses (ZeRO-Infinity); stage 3 only."""

    def __post_init__(self) -> None:
        if self.offload_params and self.stage != 3:
            raise ValueError(f"offload_params needs stage 3, got stage {self.stage}")


STRATEGY = Strategy(
    name="zero",
    summary="ZeRO stage 1/2/3 sharding through DeepSpeed, optional CPU offload",
    exact=True,
    config=ZeroConfig,
    apply=None,
    needs=Needs(cuda=True, min_devices=2, modules=("deepspeed",)),
    conflicts=frozenset({"ddp", "fsdp2", "tensor_parallel", "pipeline_parallel"}),
    after=WRAP_AFTER - {"tensor_parallel", "pipeline_parallel"},
    knobs=(
        Knob(name="stage", choices=(1, 2, 3)),
        Knob(name="offload_optimizer", choices=(True, False)),
        Knob(name="offload_params", choices=(True, False)),
    ),
    issue="issue 6 (multi-process strategies)",
)
