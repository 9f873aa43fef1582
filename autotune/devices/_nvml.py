"""NVML, for the CUDA device's detection: the session, each GPU's clocks, power, PCIe and NUMA
fields, and the driver's versions. pynvml is imported inside :func:`session`, so a machine
without it (or without a driver) profiles as one with no NVML, the reason noted."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

import psutil

from autotune.devices.base import ask, why

if TYPE_CHECKING:
    from autotune.hardware.profile import GpuInfo


@contextmanager
def session(notes: list[str]) -> Iterator[Any | None]:
    """The pynvml module, initialised, or None (reason noted) when NVML is not there."""
    try:
        import pynvml
    except ImportError as e:
        notes.append(f"NVML unavailable: cannot import pynvml ({e})")
        nv = None
    else:
        try:
            pynvml.nvmlInit()
            nv = pynvml
        except Exception as e:  # NVMLError (no driver, no library) or a broken binding
            notes.append(f"NVML unavailable: nvmlInit failed ({why(e)})")
            nv = None
    try:
        yield nv
    finally:
        if nv is not None:
            with suppress(Exception):
                nv.nvmlShutdown()


def torch_uuid(props: Any) -> str | None:
    """The device's UUID as torch gives it, None where it does not."""
    uuid = getattr(props, "uuid", None)
    return str(uuid) if uuid is not None else None


def handle(nv: Any, index: int, props: Any, count: int) -> Any:
    """NVML's handle for torch's GPU ``index``: by UUID, else by position when NVML sees the same GPUs."""
    uuid = torch_uuid(props)
    if uuid is not None:
        with suppress(Exception):  # NVMLError, or TypeError from bindings that want str rather than bytes
            return nv.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}".encode())
    if "CUDA_VISIBLE_DEVICES" not in os.environ and nv.nvmlDeviceGetCount() == count:
        return nv.nvmlDeviceGetHandleByIndex(index)
    raise LookupError("cannot match the CUDA device to an NVML device")


def fill(info: GpuInfo, nv: Any, h: Any, notes: list[str]) -> None:
    """The NVML-only fields of ``info``; each one NVML cannot give stays None, noted."""
    label = f"gpu {info.index}"
    info.max_sm_clock_mhz = ask(
        notes, f"{label} max SM clock", lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM)
    )
    info.max_memory_clock_mhz = ask(
        notes, f"{label} max memory clock", lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_MEM)
    )
    info.power_limit_w = ask(notes, f"{label} power limit", lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000)
    info.pcie_generation = ask(notes, f"{label} PCIe generation", lambda: nv.nvmlDeviceGetMaxPcieLinkGeneration(h))
    info.pcie_width = ask(notes, f"{label} PCIe width", lambda: nv.nvmlDeviceGetMaxPcieLinkWidth(h))
    node = ask(notes, f"{label} NUMA node", lambda: nv.nvmlDeviceGetNumaNodeId(h))
    info.numa_node = node if node is not None and node >= 0 else None
    words = math.ceil((psutil.cpu_count() or 1) / 64)
    info.cpu_affinity = ask(notes, f"{label} CPU affinity", lambda: cpu_ranges(nv.nvmlDeviceGetCpuAffinity(h, words)))


def cpu_ranges(mask_words: Sequence[int]) -> str:
    """64-bit affinity words to "0-31,64-95"."""
    cpus = [w * 64 + bit for w, word in enumerate(mask_words) for bit in range(64) if int(word) >> bit & 1]
    ranges: list[list[int]] = []
    for cpu in cpus:
        if ranges and ranges[-1][1] == cpu - 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(f"{lo}-{hi}" if hi > lo else str(lo) for lo, hi in ranges)


def note_unusable_gpus(nv: Any, usable: int, notes: list[str]) -> None:
    """Say so when NVML sees more GPUs than torch can use."""
    seen = ask(notes, "NVML device count", nv.nvmlDeviceGetCount)
    if seen is not None and seen > usable:
        notes.append(f"NVML sees {seen} GPU(s), torch can use {usable} (CUDA_VISIBLE_DEVICES, or torch without CUDA)")


def driver_version(nv: Any, notes: list[str]) -> str | None:
    """The NVIDIA driver's version, e.g. "580.159.04"."""
    return ask(notes, "NVIDIA driver version", lambda: text(nv.nvmlSystemGetDriverVersion()))


def runtime_version(nv: Any, notes: list[str]) -> str | None:
    """The highest CUDA version the driver supports, e.g. "13.0"."""
    return ask(notes, "driver CUDA version", lambda: version(nv.nvmlSystemGetCudaDriverVersion()))


def text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def version(v: int) -> str:
    """NVML and CUDA encode 13.0 as 13000."""
    return f"{v // 1000}.{v % 1000 // 10}"
