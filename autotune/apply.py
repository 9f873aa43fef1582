"""Applies the chosen strategies in the order of their phases (``autotune.contract.order``).

It only applies: every check a plan passes before anything starts is ``autotune.validate``'s,
which the executor calls before it builds the model."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from autotune import catalog
from autotune.contract.order import application_order
from autotune.errors import UserError

if TYPE_CHECKING:
    from autotune.contract.context import TrainContext


@functools.cache
def order() -> tuple[str, ...]:
    """The catalog's strategies in the order they are applied: by phase, then by what they read
    and change (``autotune.contract.order``). A strategy missing from a plan is skipped."""
    return application_order(catalog.catalog())


def distributing() -> tuple[str, ...]:
    """Strategies that split the work over processes (each declares its ``mesh_dim``), in
    :func:`order`; a run of several processes needs one, or each process would train a model of its own."""
    strategies = catalog.catalog()
    return tuple(name for name in order() if strategies[name].mesh_dim is not None)


def apply_strategies(ctx: TrainContext, chosen: dict[str, Any]) -> None:
    """Apply ``chosen`` (strategy name -> typed config, checked by ``autotune.validate.plan``) to
    ``ctx`` in :func:`order`."""
    unordered = set(chosen) - set(order())
    if unordered:
        raise UserError(f"strategy {sorted(unordered)[0]} has no place in the order of application")
    for name in order():
        if name not in chosen:
            continue
        strategy = catalog.get(name)
        if strategy.apply is None:
            raise UserError(f"strategy {name} is not implemented yet ({strategy.issue})")
        strategy.apply(ctx, chosen[name])
