"""What is here: the CPU and RAM (psutil), the accelerators' devices and the links between them
(each kind's ``Device.detect_devices``: for NVIDIA GPUs torch's properties and NVML's clocks,
power, PCIe, NVLink and NUMA), the XLA devices (a TPU, or XLA's CPU backend, through torch-xla:
``devices/xla.py``) and the software stack; then, unless
``quick``, what it does (:mod:`autotune.hardware.measure`).

Anything detection cannot find out is left unknown (``None``) with the reason in
``HardwareProfile.notes``: a machine without a GPU, NVML or torch_xla is a normal case, never a
crash. torch, NVML and torch_xla are imported inside functions.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import socket
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import psutil

from autotune import devices
from autotune.devices import Device, Inventory, ask
from autotune.hardware.measure import measure
from autotune.hardware.profile import (
    SCHEMA_VERSION,
    CpuInfo,
    HardwareProfile,
    Machine,
    SoftwareInfo,
    TpuInfo,
    fingerprint_of,
    summary_of,
)

Log = Callable[[str], None]


def detect(quick: bool = False, *, log: Log | None = None) -> HardwareProfile:
    """Profile this machine: detect it, and unless ``quick`` measure it. Never raises for a missing device."""
    say = log or (lambda _: None)
    notes: list[str] = []
    kind, machine = _identify(notes)
    software = _software(kind, machine, notes)
    measured = None if quick else ask(notes, "measurements", lambda: measure(kind, machine.gpus, notes, say))
    # The profile's field names are its saved format (SoftwareInfo.cuda, cuda_driver_version).
    return HardwareProfile(
        schema_version=SCHEMA_VERSION,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        hostname=socket.gethostname(),
        fingerprint=fingerprint_of(machine),
        cpu=machine.cpu,
        gpus=machine.gpus,
        links=machine.links,
        driver_version=machine.driver_version,
        cuda_driver_version=machine.cuda_driver_version,
        tpu=machine.tpu,
        software=software,
        measured=measured,
        notes=notes,
    )


def current_fingerprint() -> str:
    """The fingerprint of this machine now, detected without measuring (about a second)."""
    return fingerprint_of(_identify([])[1])


def current_summary() -> dict[str, str]:
    """:meth:`HardwareProfile.summary` of this machine now, detected without measuring."""
    machine = _identify([])[1]
    return summary_of(fingerprint_of(machine), machine)


def _identify(notes: list[str]) -> tuple[Device, Machine]:
    """This machine as the fingerprint sees it, and the accelerator kind whose devices it records."""
    cpu = _detect_cpu()
    notes.append("cpu.ram_bytes is the total the OS reports now; on some virtual machines it grows as memory is used")
    kind, found = _accelerator(notes)
    machine = Machine(
        cpu=cpu,
        gpus=found.gpus,
        links=found.links,
        driver_version=found.driver_version,
        cuda_driver_version=found.runtime_version,
        tpu=_detect_tpu(notes),
    )
    return kind, machine


def _accelerator(notes: list[str]) -> tuple[Device, Inventory]:
    """The first accelerator kind with devices here and what it found; with none, the first
    kind's findings (its driver, on a machine without its devices), or nothing at all."""
    found = [(kind, kind.detect_devices(notes)) for kind in devices.accelerators()]
    for kind, inventory in found:
        if inventory.gpus:
            return kind, inventory
    return found[0] if found else (devices.get(devices.CPU), Inventory())


def _detect_cpu() -> CpuInfo:
    logical = psutil.cpu_count() or os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    return CpuInfo(
        model=_cpu_model(),
        physical_cores=psutil.cpu_count(logical=False),
        logical_cores=logical,
        usable_cores=usable,
        ram_bytes=psutil.virtual_memory().total,
    )


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def _detect_tpu(notes: list[str]) -> TpuInfo:
    """The XLA devices torch-xla reaches (the profile's ``tpu`` record): a TPU, or XLA's CPU backend."""
    from autotune.devices import xla

    found, version = xla.DEVICE.detect(notes)
    return TpuInfo(present=found.count > 0, kind=found.name, count=found.count, torch_xla=version)


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _software(kind: Device, machine: Machine, notes: list[str]) -> SoftwareInfo:
    import torch

    stack = kind.probe_software(machine.gpus, notes)
    return SoftwareInfo(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=stack.runtime,
        cudnn=stack.dnn,
        nccl=stack.collectives,
        triton=_dist_version("triton"),
        deepspeed=_dist_version("deepspeed"),
        optuna=_dist_version("optuna"),
        torchao=_torchao_version(notes),
        sdpa_flash=stack.sdpa_flash,
        sdpa_cudnn=stack.sdpa_cudnn,
        flash_attn_3=stack.flash_attn_3,
    )


def _torchao_version(notes: list[str]) -> str | None:
    if importlib.util.find_spec("torchao") is None:
        return None
    # Its distribution's metadata, not an import: importing torchao loads its CUDA extensions
    # and prints their failures and torch's deprecation lines on every command.
    from importlib import metadata

    return ask(notes, "torchao", lambda: metadata.version("torchao"))
