"""The AdamW implementation: "fused" (one kernel for all parameters, on CUDA and, since torch
2.4, on the CPU), "foreach" (a few multi-tensor kernels per step) or "forloop" (a loop of
per-parameter kernels: the slow reference). All three compute the same AdamW update; they
differ only in the order of floating-point operations: an exact strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from autotune.contract.strategy import NOTHING_TO_SET, Knob, Needs, Prior, PriorFacts, Strategy

if TYPE_CHECKING:
    from autotune.contract.context import TrainContext

# AdamW keyword arguments of each implementation: both set, since fused and foreach together
# are an error and the executor's default is fused on CUDA, foreach elsewhere.
_KWARGS = {
    "fused": {"fused": True, "foreach": False},
    "foreach": {"fused": False, "foreach": True},
    "forloop": {"fused": False, "foreach": False},
}


@dataclass(kw_only=True, slots=True)
class OptimizerConfig:
    implementation: Literal["fused", "foreach", "forloop"] = "fused"
    """How torch.optim.AdamW runs its update."""

    def needs(self) -> Needs:
        """fused and foreach need torch's multi-tensor kernels on the device (not XLA's)."""
        return Needs(features=frozenset({"foreach"}) if self.implementation != "forloop" else frozenset())


def apply_optimizer(ctx: TrainContext, cfg: OptimizerConfig) -> None:
    ctx.check_needs(STRATEGY, cfg, "use implementation forloop on this device")
    ctx.optimizer_options.update(_KWARGS[cfg.implementation])
    ctx.notes.append(f"AdamW {cfg.implementation}")


def optimizer_prior(facts: PriorFacts) -> Prior | None:
    """On a GPU the fused AdamW (one kernel for every parameter); where it cannot run (XLA), none."""
    if not facts.accelerator or "fused" in facts.excluded.get("implementation", {}):
        return None
    return Prior(knobs={"implementation": "fused"})


STRATEGY = Strategy(
    name="optimizer",
    phase="loop",
    summary="AdamW implementation: fused, foreach or for-loop",
    exact=True,
    config=OptimizerConfig,
    apply=apply_optimizer,
    knobs=(Knob(name="implementation", choices=("fused", "foreach", "forloop")),),
    prior=optimizer_prior,
    # Which AdamW implementation the script builds: not the launcher's.
    exports={"accelerate": NOTHING_TO_SET},
)
