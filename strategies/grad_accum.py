"""Gradient accumulation: several micro-batches per optimizer step. The global batch grows
by the factor at the same activation memory; the mean loss over the global batch is the
same function, so the strategy is exact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autotune.contract.strategy import NOTHING_TO_SET, Knob, Strategy

if TYPE_CHECKING:
    from autotune.contract.context import TrainContext


@dataclass(kw_only=True, slots=True)
class GradAccumConfig:
    steps: int = 2
    """Micro-batches per optimizer step."""

    def __post_init__(self) -> None:
        # The planner derives up to planning.space.MAX_ACCUM (64); more only ever loses, and 1000 hangs a step.
        if not 1 <= self.steps <= 128:
            raise ValueError(f"steps must be from 1 to 128, got {self.steps}")


def apply_grad_accum(ctx: TrainContext, cfg: GradAccumConfig) -> None:
    ctx.grad_accum = cfg.steps
    ctx.notes.append(f"gradient accumulation x{cfg.steps}")


def grad_accum_cost(cfg: GradAccumConfig, terms: Any) -> None:
    """The cost model's term (``contract.cost.CostTerms``): a step runs ``steps`` micro-batches (their
    tokens, FLOPs and kernel launches) at one micro-batch's memory."""
    terms.micro_batches = cfg.steps


STRATEGY = Strategy(
    name="grad_accum",
    phase="loop",
    summary="gradient accumulation over several micro-batches",
    exact=True,
    config=GradAccumConfig,
    apply=apply_grad_accum,
    changes=frozenset({"accumulation"}),
    cost=grad_accum_cost,
    knobs=(Knob(name="steps", low=1, high=16, log=True, integer=True),),
    # Either config states accumulation only in zero's export, which reads the plan's.
    exports={"accelerate": NOTHING_TO_SET, "deepspeed": NOTHING_TO_SET},
)
