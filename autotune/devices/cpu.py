"""The host's CPU: the device every machine has, and the base class's answers."""

from __future__ import annotations

from typing import Any

from autotune.devices.base import Device, Found

EAGER = frozenset({"inductor", "collectives", "torchao", "foreach"})
"""What torch's eager devices (the CPU, CUDA) run that a lazily traced one (XLA) does not."""


class Cpu(Device):
    name = "cpu"
    title = "CPU"
    accelerator = False
    backend = "gloo"
    startup_floor_s = 3.0
    compile_floor_s = 0.0

    def is_available(self) -> bool:
        return True

    def count(self) -> int:
        return 1

    def found_in(self, profile: Any | None) -> Found:
        return Found(count=1, name=profile.cpu.model if profile is not None else None)

    def features(self, compute_capability: tuple[int, int] | None) -> frozenset[str]:
        # Any CPU runs bf16 autocast (oneDNN emulates it where it has no bf16 units) and
        # float8 matmuls in software: the strategies run, the search leaves them out.
        return frozenset({"bf16", "fp8"}) | EAGER


DEVICE = Cpu()
