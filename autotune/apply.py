"""The one function that owns the order in which strategies are applied."""

from __future__ import annotations

from typing import Any

from autotune import catalog
from autotune.context import TrainContext
from autotune.errors import UserError

# The order of application, one rule a line. A strategy missing from a plan is skipped.
ORDER = (
    # precision first: it sets autocast and TF32, which everything traced later must see.
    "precision",
    # accumulation only sets the loop's micro-batch count; no model change.
    "grad_accum",
    # compile last among model transforms: it traces whatever the earlier ones built.
    "compile",
)


def apply_strategies(ctx: TrainContext, chosen: dict[str, Any]) -> None:
    """Apply ``chosen`` (strategy name -> typed config) to ``ctx`` in ORDER."""
    unordered = set(chosen) - set(ORDER)
    if unordered:
        raise UserError(f"strategy {sorted(unordered)[0]} has no place in the order of application")
    for name in ORDER:
        if name not in chosen:
            continue
        strategy = catalog.get(name)
        if strategy.apply is None:
            raise UserError(f"strategy {name} is not implemented yet ({strategy.issue})")
        strategy.apply(ctx, chosen[name])
