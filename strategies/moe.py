"""Mixture of experts: the MLP of every n-th block becomes ``num_experts`` MLPs and a router
that sends each token to its ``top_k`` best experts, weighting their outputs by the router's
scores. More parameters at about the same FLOPs per token; the model is a different one, so
it learns something else: an approximate strategy, searched only when allowed and then
loss-checked against the exact baseline.

Declared, not implemented yet (roadmap item "mixture of experts", no issue filed). It
rebuilds the GPT's MLPs from its config, so it needs the built-in GPT (structure mlp, gpt).
"""

from __future__ import annotations

from dataclasses import dataclass

from autotune.strategy import Knob, Needs, Strategy


@dataclass(kw_only=True, slots=True)
class MoeConfig:
    num_experts: int = 8
    """Expert MLPs per converted block, each as wide as the MLP it replaces."""
    top_k: int = 2
    """Experts each token is sent to; FLOPs per token grow with it, not with num_experts."""
    capacity_factor: float = 1.25
    """Tokens one expert takes per step, as a multiple of an even share
    (tokens x top_k / num_experts); tokens over capacity skip the block's MLP."""
    every_n_layers: int = 2
    """Convert blocks 0, n, 2n, ... (1: every block)."""

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts ({self.num_experts}), got {self.top_k}")
        if not 1 <= self.num_experts <= 256:
            raise ValueError(f"num_experts must be from 1 to 256, got {self.num_experts}")
        if not 0 < self.capacity_factor <= 16:  # NaN fails this too
            raise ValueError(f"capacity_factor must be in (0, 16], got {self.capacity_factor}")
        if not 1 <= self.every_n_layers <= 64:
            raise ValueError(f"every_n_layers must be from 1 to 64, got {self.every_n_layers}")


STRATEGY = Strategy(
    name="moe",
    summary="mixture of experts: routed expert MLPs in every n-th block (approximate)",
    exact=False,
    config=MoeConfig,
    apply=None,
    needs=Needs(structure=frozenset({"mlp", "gpt"})),
    knobs=(
        Knob(name="num_experts", choices=(4, 8, 16, 32)),
        Knob(name="top_k", choices=(1, 2)),
        Knob(name="capacity_factor", low=1.0, high=2.0),
        Knob(name="every_n_layers", low=1, high=4, integer=True),
    ),
    issue="roadmap item mixture of experts, no issue filed yet",
)
