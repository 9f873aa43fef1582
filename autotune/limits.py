"""What this machine has, for the checks of a plan's size (``autotune.validate.on_this_machine``):
the device a plan's ``launch.device`` trains on here and its memory, the host's usable cores
(``autotune.devices.usable_cores``), and sizes and counts in words for the refusals.
"""

from __future__ import annotations

import sys
from typing import Any

from autotune.devices import usable_cores

__all__ = ["count", "device_here", "size", "usable_cores", "warn_if_oversubscribed"]


def warn_if_oversubscribed(launch: Any) -> None:
    """One line on stderr where the plan's CPU processes outnumber the cores (the command goes
    on: ``validate.on_this_machine`` refused more than MAX_OVERSUBSCRIPTION a core). Said once the
    plan is accepted, so that a refusal stays the command's one line."""
    cores = usable_cores()
    if not device_here(launch.device)[0] and launch.nproc_per_node > cores:
        print(
            f"autotune: warning: {launch.nproc_per_node} processes on {cores} core(s): each runs slower than alone",
            file=sys.stderr,
        )


def _here(kind: Any) -> bool:
    """Whether this machine has ``kind``: without importing torch where the kind can tell it
    is absent (then ``show`` checks a plan without torch: the layering contract,
    tests/test_layering.py), else by asking torch."""
    if "torch" not in sys.modules and kind.surely_absent():
        return False
    return bool(kind.is_available())


def device_here(requested: str) -> tuple[bool, int | None, str, int | None]:
    """(trains on an accelerator, how many here, the device in words, its memory) for a plan's
    ``launch.device``: a plan for an accelerator this machine lacks has neither devices nor
    memory to check against."""
    import psutil

    from autotune import devices

    if requested == devices.AUTO:
        kind = next((k for k in devices.accelerators() if _here(k)), devices.get(devices.CPU))
    else:
        kind = devices.get(requested)
    if not kind.accelerator:
        return False, None, "RAM", psutil.virtual_memory().total
    if not _here(kind):
        return True, None, f"a {kind.words} plan", None
    memories = kind.memories()
    if not memories:  # devices that share the host's RAM (XLA's CPU backend)
        return True, kind.count(), "RAM", psutil.virtual_memory().total
    name, memory = min(memories, key=lambda m: m[1])
    return True, len(memories), f"memory on each {name}", memory


def size(n: float) -> str:
    """Bytes, readably: 1.5 GiB, 2.1 TiB."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:,.1f} {units[i]}" if i else f"{n:,.0f} B"


def count(n: float) -> str:
    """A count, readably: 124.4M, 13.2T."""
    units = ("", "K", "M", "B", "T")
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:,.1f}{units[i]}" if i else f"{n:,.0f}"
