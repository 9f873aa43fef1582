"""Kinds of device, one module each (``cpu.py``, ``cuda.py``), found by discovery.

Each public module of this package (a name not starting with ``_``, ``base`` aside) defines
``DEVICE``, an instance of a :class:`~autotune.devices.base.Device` subclass whose ``name`` is
the module's: adding a kind is adding its module (and its test), nothing else. The CPU is the
one kind that is not an accelerator, and the fallback of :func:`detect`.

A device's name is data (plans' ``launch.device``, checkpoints' RNG states, profiles' figures):
the names live here, and the rest of the code asks this registry.
"""

from __future__ import annotations

import functools
import importlib
import os
import pkgutil
from typing import TYPE_CHECKING, Any

from autotune.devices.base import FEATURES, Device, Found, Inventory, Stack, Timer, ask, why
from autotune.errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = [
    "FEATURES",
    "Device",
    "Found",
    "Inventory",
    "Stack",
    "Timer",
    "accelerators",
    "ask",
    "available",
    "detect",
    "get",
    "names",
    "of",
    "planned",
    "resolve",
    "usable_cores",
    "why",
]

CPU = "cpu"
"""The host's kind, which every machine has."""
AUTO = "auto"
"""A plan's ``launch.device`` that takes whichever accelerator is here (:func:`detect`)."""


@functools.cache
def _registry() -> dict[str, Device]:
    found: dict[str, Device] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.name == "base":
            continue
        device = getattr(importlib.import_module(f"{__name__}.{info.name}"), "DEVICE", None)
        if not isinstance(device, Device) or device.name != info.name:
            raise TypeError(f"autotune.devices.{info.name} must define DEVICE, a Device named {info.name!r}")
        found[info.name] = device
    # The CPU last: the kinds are tried in this order, accelerators first.
    return dict(sorted(found.items(), key=lambda kv: (not kv[1].accelerator, kv[0])))


def names() -> tuple[str, ...]:
    """Every kind's name, the accelerators first."""
    return tuple(_registry())


def get(name: str) -> Device:
    """The kind called ``name``; a UserError naming the known ones otherwise."""
    try:
        return _registry()[name]
    except KeyError:
        raise UserError(f"unknown device {name!r}: expected one of {', '.join(names())}") from None


def of(device: torch.device | str) -> Device:
    """The kind of a ``torch.device`` (or of its type's name)."""
    return get(device if isinstance(device, str) else device.type)


def accelerators() -> tuple[Device, ...]:
    """Every kind but the CPU."""
    return tuple(d for d in _registry().values() if d.accelerator)


def available() -> tuple[Device, ...]:
    """The kinds this process can use, the accelerators first (the CPU always)."""
    return tuple(d for d in _registry().values() if d.is_available())


def detect() -> Device:
    """The kind a run here trains on by default: the first accelerator available, else the CPU."""
    return available()[0]


def planned(requested: str) -> Device:
    """The kind a plan's ``launch.device`` trains on here, whether this machine has it or not:
    ``auto`` is :func:`detect`'s."""
    return detect() if requested == AUTO else get(requested)


def resolve(requested: str) -> Device:
    """The kind of a plan's ``launch.device`` here: ``auto`` is :func:`detect`'s; a named
    accelerator that is missing is a UserError."""
    device = planned(requested)
    if not device.is_available():
        raise UserError(f"the plan asks for {device.words}, but no {device.words} device is available")
    return device


def in_profile(profile: Any | None) -> tuple[Device, Found]:
    """The accelerator a HardwareProfile found (the first kind with any), else the CPU, and what it found."""
    for device in accelerators():
        found = device.found_in(profile)
        if found.count:
            return device, found
    return get(CPU), get(CPU).found_in(profile)


def needing(feature: str | None) -> tuple[Device, ...]:
    """The accelerators that have ``feature`` at some compute capability (None: every accelerator)."""
    return tuple(d for d in accelerators() if feature is None or feature in d.features((99, 9)))


def usable_cores() -> int:
    """Cores of the host this process may run on (its CPU affinity where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
