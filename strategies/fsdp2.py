"""Fully sharded data parallel, FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters,
gradients and optimizer state are sharded across processes; each block's parameters are
all-gathered just before use and gradients reduce-scattered after. Every process takes the
step of the global batch's mean gradient, with parameters gathered in ``param_dtype`` (mixed
precision, like autocast) and gradients reduced in fp32: an exact strategy.

Declared, not implemented yet (issue 6). It shards block by block (torchtitan's
``apply_fsdp``), so the workload must declare its blocks; it needs two or more processes and
excludes the other data-parallel wrappers (DDP, ZeRO).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from autotune.strategies.ddp import WRAP_AFTER
from autotune.strategy import Knob, Needs, Strategy

_NEEDS = Needs(min_devices=2, structure=frozenset({"blocks"}))


@dataclass(kw_only=True, slots=True)
class Fsdp2Config:
    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward and gather them again for the
    backward (least memory); False keeps them until the backward (one all-gather fewer)."""
    param_dtype: Literal["bf16", "fp32"] = "bf16"
    """dtype parameters are gathered and computed in (MixedPrecisionPolicy); gradients are
    reduced in fp32 either way."""

    def needs(self) -> Needs:
        """bf16 parameters need bf16 tensor cores on a GPU."""
        return dataclasses.replace(_NEEDS, bf16=self.param_dtype == "bf16")


STRATEGY = Strategy(
    name="fsdp2",
    summary="fully sharded data parallel per block (FSDP2 fully_shard), bf16 or fp32 gathers",
    exact=True,
    config=Fsdp2Config,
    apply=None,
    needs=_NEEDS,
    conflicts=frozenset({"ddp", "zero"}),
    after=WRAP_AFTER,
    knobs=(
        Knob(name="reshard_after_forward", choices=(True, False)),
        Knob(name="param_dtype", choices=("bf16", "fp32")),
    ),
    issue="issue 6 (multi-process strategies)",
)
