"""What the machine is and what it does (``autotune profile``), one concern a module:

- :mod:`~autotune.hardware.profile`: the saved HardwareProfile (a public, versioned format),
  its fingerprint and summary;
- :mod:`~autotune.hardware.detection`: what is here (CPU, memory, each accelerator kind's devices
  and links through the device layer, a TPU, the software stack);
- :mod:`~autotune.hardware.measure`: matmul rate, memory and host-to-device bandwidth, all-reduce;
- :mod:`~autotune.hardware.allreduce`: the all-reduce worker torchrun starts.

The device-specific parts (NVML, NVLink, torch's GPU properties, the fused-attention probes)
are the device layer's (``Device.detect_devices``, ``Device.probe_software``). This package
re-exports what its importers use; nothing here imports torch at import time.
"""

from __future__ import annotations

from autotune.hardware.detection import current_fingerprint, current_summary, detect
from autotune.hardware.measure import allreduce_env, measure_allreduce
from autotune.hardware.profile import (
    MATMUL_DTYPES,
    SCHEMA_VERSION,
    SUMMARY_FIELDS,
    AllReducePoint,
    CpuInfo,
    GiB,
    GpuInfo,
    GpuLink,
    HardwareProfile,
    Measurements,
    MiB,
    SoftwareInfo,
    Stat,
    TpuInfo,
    default_profile_path,
    links_summary,
    summary_differences,
)

__all__ = [
    "MATMUL_DTYPES",
    "SCHEMA_VERSION",
    "SUMMARY_FIELDS",
    "AllReducePoint",
    "CpuInfo",
    "GiB",
    "GpuInfo",
    "GpuLink",
    "HardwareProfile",
    "Measurements",
    "MiB",
    "SoftwareInfo",
    "Stat",
    "TpuInfo",
    "allreduce_env",
    "current_fingerprint",
    "current_summary",
    "default_profile_path",
    "detect",
    "links_summary",
    "measure_allreduce",
    "summary_differences",
]
