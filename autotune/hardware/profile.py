"""The saved HardwareProfile: what the machine is and what it does, its fingerprint and summary.

A public, versioned format (``schema_version``), loaded strictly; committed profiles
(``profiles/*.json``, ``bench/results/**``) must keep loading. Some field names carry the word
CUDA (``SoftwareInfo.cuda``, ``cuda_driver_version``, the summary's "cuda_major"): they are
keys of that format, not device code, and stay as they are (tests/test_devices.py allows them
here by name). Filled by :mod:`autotune.hardware.detection` (the device layer's
``Device.detect_devices`` for the GPUs and their links) and :mod:`autotune.hardware.measure`.
Nothing here imports torch: loading a profile needs none of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from autotune import devices
from autotune.errors import SchemaError, UserError
from autotune.schema import from_dict, read_json, to_dict, write_json_atomic

SCHEMA_VERSION = 1
MATMUL_DTYPES = ("fp32", "tf32", "bf16", "fp8")
MiB = 1 << 20
GiB = 1 << 30

# --------------------------------------------------------------------------- the saved format


@dataclass(kw_only=True, slots=True)
class Stat:
    """One measured figure: the median over repeated timed runs, with its spread."""

    median: float
    """Median over the repeats; the figure to use."""
    min: float
    """Lowest of the repeats."""
    max: float
    """Highest of the repeats."""
    repeats: int
    """How many timed repeats the figure is made of."""
    unit: str
    """What is counted per second: "flop/s" or "byte/s"."""

    @classmethod
    def of(cls, values: Sequence[float], unit: str) -> Stat:
        return cls(median=statistics.median(values), min=min(values), max=max(values), repeats=len(values), unit=unit)


@dataclass(kw_only=True, slots=True)
class CpuInfo:
    """The host processor and memory."""

    model: str
    """CPU model name as the OS reports it ("unknown" where it does not)."""
    physical_cores: int | None
    """Physical cores (psutil); None where the OS does not say."""
    logical_cores: int
    """Logical CPUs, hyper-threads included (psutil.cpu_count())."""
    usable_cores: int
    """CPUs this process may run on (its affinity mask; fewer than logical in a restricted container)."""
    ram_bytes: int
    """Total RAM as the OS reports it at profile time. On some virtual machines this starts low
    and grows as memory is used, so it can understate what a program may allocate."""


@dataclass(kw_only=True, slots=True)
class GpuInfo:
    """One GPU that torch can use. NVML-only fields are None where NVML is missing or silent."""

    index: int
    """CUDA device ordinal as torch numbers it (after CUDA_VISIBLE_DEVICES)."""
    name: str
    """Device name, e.g. "NVIDIA H200"."""
    uuid: str | None
    """Device UUID (torch), None where torch does not give it."""
    memory_bytes: int
    """Device memory that CUDA reports (torch total_memory)."""
    capability: str
    """Compute capability "major.minor", e.g. "9.0"."""
    sm_count: int
    """Streaming multiprocessors (torch multi_processor_count)."""
    tf32: bool
    """TF32 matrix units (capability >= 8.0)."""
    bf16: bool
    """bf16 matrix units (capability >= 8.0)."""
    fp8: bool
    """fp8 matrix units (capability >= 8.9)."""
    max_sm_clock_mhz: int | None
    """Highest SM clock (NVML)."""
    max_memory_clock_mhz: int | None
    """Highest memory clock (NVML)."""
    power_limit_w: float | None
    """Enforced power limit in watts (NVML)."""
    pcie_generation: int | None
    """Highest PCIe generation of the device's link, device and slot together (NVML)."""
    pcie_width: int | None
    """Highest PCIe lane count of the device's link (NVML)."""
    numa_node: int | None
    """NUMA node closest to the device (NVML); None where NVML does not say."""
    cpu_affinity: str | None
    """CPUs closest to the device as ranges, e.g. "0-31,64-95" (NVML)."""


LinkKind = Literal["nvlink", "nvswitch", "pcie", "unknown"]


@dataclass(kw_only=True, slots=True)
class GpuLink:
    """How one pair of GPUs reaches each other."""

    a: int
    """CUDA ordinal of the first GPU (a < b)."""
    b: int
    """CUDA ordinal of the second GPU."""
    kind: LinkKind
    """nvlink: direct NVLinks between the two; nvswitch: both reach an NVSwitch over NVLink;
    pcie: no NVLink between them; unknown: NVML could not say."""
    nvlink_count: int
    """NVLinks the pair can use (direct links, or the fewer switch links of the two); 0 without NVLink."""
    nvlink_generation: str | None
    """NVLink version, e.g. "4.0" (NVML nvmlDeviceGetNvLinkVersion)."""
    pcie_path: str | None
    """Closest common PCIe ancestor in nvidia-smi's legend: BOARD, PIX, PXB, PHB, NODE, SYS (NVML)."""
    peer_access: bool | None
    """Each GPU can access the other's memory directly (torch.cuda.can_device_access_peer)."""


@dataclass(kw_only=True, slots=True)
class TpuInfo:
    """The XLA devices reached through torch_xla (``autotune/devices/xla.py``): TPUs, or XLA's
    CPU backend. The key is ``tpu`` in the saved format, which predates the CPU backend."""

    present: bool
    """An XLA runtime answered with a device (a TPU, or the CPU backend where PJRT_DEVICE=CPU)."""
    kind: str | None
    """Device kind, e.g. "TPU v5 lite" (v5e) or "CPU (XLA)"; None without one."""
    count: int
    """XLA devices the runtime sees."""
    torch_xla: str | None
    """Installed torch_xla version; None when it is not installed."""


@dataclass(kw_only=True, slots=True)
class SoftwareInfo:
    """Versions of the stack, and which fast paths actually run here."""

    python: str
    """Python version."""
    torch: str
    """torch version."""
    cuda: str | None
    """CUDA runtime torch was built with (torch.version.cuda)."""
    cudnn: str | None
    """cuDNN version torch loads."""
    nccl: str | None
    """NCCL version torch loads."""
    triton: str | None
    """Installed triton version."""
    deepspeed: str | None
    """Installed deepspeed version."""
    optuna: str | None
    """Installed optuna version."""
    torchao: str | None
    """torchao version, when it imports."""
    sdpa_flash: bool
    """torch's FlashAttention SDPA backend ran a small causal bf16 attention on GPU 0."""
    sdpa_cudnn: bool
    """torch's cuDNN SDPA backend ran a small causal bf16 attention on GPU 0."""
    flash_attn_3: bool
    """FlashAttention-3 (flash_attn_interface) imported and ran a small causal bf16 attention on GPU 0."""


@dataclass(kw_only=True, slots=True)
class AllReducePoint:
    """All-reduce (sum, fp32) of one message size across all GPUs, one process per GPU over NCCL."""

    size_bytes: int
    """Message size per GPU."""
    algbw: Stat
    """Algorithm bandwidth: size / time."""
    busbw: Stat
    """Bus bandwidth, nccl-tests convention: algbw * 2(n-1)/n."""


@dataclass(kw_only=True, slots=True)
class Measurements:
    """What the machine does, measured on one device (GPU 0, else the CPU)."""

    device: str
    """Where it was measured: "cuda:0" or "cpu"."""
    matmul_n: int
    """Square matmul size n: (n x n) @ (n x n), 2n^3 flops a product."""
    matmul: dict[str, Stat]
    """Dense matmul rate per dtype (fp32, tf32, bf16, fp8); a dtype that was not measured is absent."""
    copy_bytes: int
    """Buffer size of the device-to-device copy."""
    copy: Stat | None
    """Memory bandwidth: bytes read plus bytes written per second in a large copy."""
    h2d_bytes: int | None
    """Buffer size of the host-to-device copy; None on the CPU."""
    h2d: Stat | None
    """Host-to-device bandwidth from pinned memory; None on the CPU."""
    allreduce: list[AllReducePoint]
    """All-reduce across all GPUs at several sizes; empty with fewer than two GPUs."""
    seconds: float
    """Wall time the measurements took."""


@dataclass(kw_only=True, slots=True)
class HardwareProfile:
    """What the machine is and what it does. Saved as JSON; see the module docstring."""

    schema_version: int
    """Format version; this autotune reads SCHEMA_VERSION only."""
    created: str
    """When it was made, ISO 8601 UTC."""
    hostname: str
    """Host name at profile time (informative; not part of the fingerprint)."""
    fingerprint: str
    """12 hex of sha256 over what decides performance (see fingerprint_of); no measured number."""
    cpu: CpuInfo
    """Host processor and memory."""
    gpus: list[GpuInfo]
    """GPUs torch can use, by CUDA ordinal; empty without one."""
    links: list[GpuLink]
    """One entry per pair of GPUs."""
    driver_version: str | None
    """NVIDIA driver version (NVML)."""
    cuda_driver_version: str | None
    """Highest CUDA version the driver supports, e.g. "13.0" (NVML)."""
    tpu: TpuInfo
    """TPU through torch_xla, or its absence."""
    software: SoftwareInfo
    """Library versions and usable fast paths."""
    measured: Measurements | None
    """Measured figures; None for a quick (detect-only) profile."""
    notes: list[str]
    """What could not be found out or measured, and why; caveats on the figures."""

    @classmethod
    def load(cls, path: str | os.PathLike) -> HardwareProfile:
        """Read a saved profile strictly: bad JSON, an unknown key or a wrong type is a UserError naming the field."""
        data = read_json(path, "profile")
        # The version first: a newer file's new keys should read as "newer file", not "unknown key".
        if isinstance(data, dict) and data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise SchemaError(
                "schema_version",
                f"unsupported version {data['schema_version']!r} (this autotune reads {SCHEMA_VERSION})",
            )
        return from_dict(cls, data)

    def save(self, path: str | os.PathLike) -> None:
        """Write the profile atomically; the object is left untouched."""
        write_json_atomic(path, to_dict(self))

    def peak_flops(self, dtype: str) -> tuple[float, str]:
        """Peak dense matmul rate of one device for ``dtype``, and where it comes from.

        The measured median ("measured") when this profile measured it, else the vendor's dense
        figure for a known GPU ("datasheet"). Raises UserError when there is neither.
        """
        if dtype not in MATMUL_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(MATMUL_DTYPES)}")
        if self.measured is not None and dtype in self.measured.matmul:
            return self.measured.matmul[dtype].median, "measured"
        kind, found = devices.in_profile(self)
        rate = kind.datasheet_flops(found.name, dtype) if kind.accelerator and found.name else None
        if rate is not None:
            return rate, "datasheet"
        device = self.gpus[0].name if self.gpus else self.cpu.model
        raise UserError(
            f"no {dtype} matmul rate for {device}: not measured in this profile and not in the datasheet table "
            "(run `autotune profile` without --quick)"
        )

    def summary(self) -> dict[str, str]:
        """A few words on the machine, for embedding in plans."""
        return summary_of(self.fingerprint, self)


def summary_of(fingerprint: str, m: HardwareProfile | Machine) -> dict[str, str]:
    """A few words on the machine ``m`` whose fingerprint is ``fingerprint``, for embedding in plans."""
    gpus = f"{len(m.gpus)} x {m.gpus[0].name}" if m.gpus else "none"
    tpu = f"{m.tpu.count} x {m.tpu.kind}" if m.tpu.present else "none"
    cores = m.cpu.physical_cores or m.cpu.logical_cores
    major = m.cuda_driver_version.split(".")[0] if m.cuda_driver_version else "none"
    return {
        "fingerprint": fingerprint,
        "gpus": gpus,
        "links": links_summary(m.links),
        "cuda_major": major,
        "tpu": tpu,
        "cpu": f"{m.cpu.model} ({cores} cores)",
    }


def links_summary(links: Sequence[GpuLink]) -> str:
    """The GPU pairs' links in a few words, e.g. "6 nvswitch x18 (4.0)"; "none" for one GPU."""
    if not links:
        return "none"
    kinds: dict[str, int] = {}
    for link in links:
        words = link.kind + (f" x{link.nvlink_count}" if link.nvlink_count else "")
        words += f" ({link.nvlink_generation})" if link.nvlink_generation else ""
        kinds[words] = kinds.get(words, 0) + 1
    return ", ".join(f"{n} {words}" for words, n in sorted(kinds.items()))


SUMMARY_FIELDS = {"gpus": "GPUs", "links": "links", "cuda_major": "CUDA major", "tpu": "TPU", "cpu": "CPU"}
"""The fields of :meth:`HardwareProfile.summary` that tell machines apart, and their names."""


def summary_differences(made_on: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """Each field where two machines' summaries differ, as "GPUs 1 x NVIDIA H200 here none".

    A field either summary lacks (plans written before it was recorded) is not compared."""
    return [
        f"{name} {made_on[key]} here {here[key]}"
        for key, name in SUMMARY_FIELDS.items()
        if key in made_on and key in here and str(made_on[key]) != str(here[key])
    ]


def default_profile_path() -> Path:
    """Where `autotune profile` writes without --out: the user's cache folder."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "autotune" / "hardware.json"


@dataclass(kw_only=True, slots=True)
class Machine:
    """What detection finds before measuring: everything the fingerprint is made of."""

    cpu: CpuInfo
    gpus: list[GpuInfo]
    links: list[GpuLink]
    driver_version: str | None
    cuda_driver_version: str | None
    tpu: TpuInfo


def fingerprint_of(m: Machine) -> str:
    """12 hex of sha256 over GPU models and count, link topology, driver and CUDA major, CPU model and cores.

    RAM is left out: on some virtual machines the reported total changes while running.
    """
    material = {
        "cpu": [m.cpu.model, m.cpu.physical_cores, m.cpu.logical_cores],
        "gpus": [g.name for g in m.gpus],
        "links": [[link.a, link.b, link.kind, link.nvlink_count, link.nvlink_generation] for link in m.links],
        "driver_major": m.driver_version.split(".")[0] if m.driver_version else None,
        "cuda_major": m.cuda_driver_version.split(".")[0] if m.cuda_driver_version else None,
        "tpu": [m.tpu.kind, m.tpu.count],
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:12]
