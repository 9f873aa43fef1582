"""The strategy catalog: every optimization autotune knows, read from ``strategies/``."""

from __future__ import annotations

import importlib
from functools import cache

from autotune.errors import UserError
from autotune.strategy import Strategy, check_knob_fields

# One module per strategy in autotune.strategies; each defines STRATEGY.
MODULES = ("precision", "grad_accum", "compile")


@cache
def catalog() -> dict[str, Strategy]:
    out: dict[str, Strategy] = {}
    for module in MODULES:
        strategy: Strategy = importlib.import_module(f"autotune.strategies.{module}").STRATEGY
        if strategy.name in out:
            raise RuntimeError(f"strategy {strategy.name} declared twice")
        check_knob_fields(strategy)
        out[strategy.name] = strategy
    return out


def get(name: str) -> Strategy:
    strategies = catalog()
    if name not in strategies:
        raise UserError(f"unknown strategy {name!r} (known: {', '.join(sorted(strategies))})")
    return strategies[name]
