"""The strategy catalog: every module in ``strategies/`` that defines ``STRATEGY``."""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from autotune.contract.strategy import Strategy, check_exports, check_knob_fields
from autotune.errors import UserError


@cache
def catalog() -> dict[str, Strategy]:
    import autotune.strategies as package

    out: dict[str, Strategy] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        strategy = getattr(module, "STRATEGY", None)
        if strategy is None:
            continue
        if strategy.name in out:
            raise RuntimeError(f"strategy {strategy.name} declared twice")
        check_knob_fields(strategy)
        check_exports(strategy)
        out[strategy.name] = strategy
    return out


REMOVED = {
    "tpu": 'strategy tpu was removed: a TPU is a device now (issue 30); drop it and set launch.device to "xla"',
}
"""Strategies that plans may still name, and what to write instead: a one-line migration."""


def get(name: str) -> Strategy:
    strategies = catalog()
    if name in REMOVED and name not in strategies:
        raise UserError(REMOVED[name])
    if name not in strategies:
        raise UserError(f"unknown strategy {name!r} (known: {', '.join(sorted(strategies))})")
    return strategies[name]
