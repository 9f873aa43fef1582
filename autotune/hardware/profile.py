"""What the machine is and what it does: detection, measurement, and the saved HardwareProfile.

``detect(quick)`` looks at the CPU and RAM (psutil), the GPUs and the links between them (torch
for what CUDA can use, NVML for clocks, power, PCIe, NVLink and NUMA), a TPU (torch_xla) and
the software stack; unless ``quick``, it then measures dense matmul rate per dtype, memory and
host-to-device bandwidth, and all-reduce bus bandwidth between GPUs. Anything it cannot find
out is left unknown (``None``) with the reason in ``HardwareProfile.notes``: a machine without
a GPU, NVML or torch_xla is a normal case, never a crash.

Saved profiles are a public format (``schema_version``), loaded strictly. torch, NVML and
torch_xla are imported inside functions, so loading a profile needs none of them.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import psutil

from autotune import devices
from autotune.errors import SchemaError, UserError
from autotune.schema import from_dict, read_json, to_dict, write_json_atomic

SCHEMA_VERSION = 1
MATMUL_DTYPES = ("fp32", "tf32", "bf16", "fp8")
MiB = 1 << 20
GiB = 1 << 30

T = TypeVar("T")
Log = Callable[[str], None]


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
    """A TPU reached through torch_xla."""

    present: bool
    """A TPU runtime answered."""
    kind: str | None
    """Device kind, e.g. "TPU v5"; None without a TPU."""
    count: int
    """TPU devices the runtime sees."""
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
        return _summary(self.fingerprint, self)


def _summary(fingerprint: str, m: HardwareProfile | _Machine) -> dict[str, str]:
    gpus = f"{len(m.gpus)} x {m.gpus[0].name}" if m.gpus else "none"
    tpu = f"{m.tpu.count} x {m.tpu.kind}" if m.tpu.present else "none"
    cores = m.cpu.physical_cores or m.cpu.logical_cores
    cuda = m.cuda_driver_version.split(".")[0] if m.cuda_driver_version else "none"
    return {
        "fingerprint": fingerprint,
        "gpus": gpus,
        "links": links_summary(m.links),
        "cuda_major": cuda,
        "tpu": tpu,
        "cpu": f"{m.cpu.model} ({cores} cores)",
    }


def current_summary() -> dict[str, str]:
    """:meth:`HardwareProfile.summary` of this machine now, detected without measuring."""
    machine = _identify([])
    return _summary(_fingerprint(machine), machine)


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


# --------------------------------------------------------------------------- detection


@dataclass(kw_only=True, slots=True)
class _Machine:
    """What detection finds before measuring: everything the fingerprint is made of."""

    cpu: CpuInfo
    gpus: list[GpuInfo]
    links: list[GpuLink]
    driver_version: str | None
    cuda_driver_version: str | None
    tpu: TpuInfo


def detect(quick: bool = False, *, log: Log | None = None) -> HardwareProfile:
    """Profile this machine: detect it, and unless ``quick`` measure it. Never raises for a missing device."""
    say = log or (lambda _: None)
    notes: list[str] = []
    machine = _identify(notes)
    software = _software(machine.gpus, notes)
    measured = None if quick else _ask(notes, "measurements", lambda: measure(machine.gpus, notes, say))
    return HardwareProfile(
        schema_version=SCHEMA_VERSION,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        hostname=socket.gethostname(),
        fingerprint=_fingerprint(machine),
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
    return _fingerprint(_identify([]))


def _fingerprint(m: _Machine) -> str:
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


def _identify(notes: list[str]) -> _Machine:
    cpu = _detect_cpu()
    notes.append("cpu.ram_bytes is the total the OS reports now; on some virtual machines it grows as memory is used")
    with _nvml(notes) as nv:
        torch_gpus = _torch_gpus(notes)
        handles = [
            _ask(notes, f"gpu {index} NVML fields", lambda: _nvml_handle(nv, index, props, len(torch_gpus)))
            if nv is not None
            else None
            for index, props in torch_gpus
        ]
        gpus = [_gpu_info(nv, h, index, props, notes) for (index, props), h in zip(torch_gpus, handles)]
        links = _links(nv, handles, notes)
        if nv is not None:
            _note_unusable_gpus(nv, len(gpus), notes)
        driver = _ask(notes, "NVIDIA driver version", lambda: _text(nv.nvmlSystemGetDriverVersion())) if nv else None
        cuda = (
            _ask(notes, "driver CUDA version", lambda: _cuda_version(nv.nvmlSystemGetCudaDriverVersion()))
            if nv
            else None
        )
    return _Machine(
        cpu=cpu, gpus=gpus, links=links, driver_version=driver, cuda_driver_version=cuda, tpu=_detect_tpu(notes)
    )


def _ask(notes: list[str], what: str, fn: Callable[[], T]) -> T | None:
    """``fn()``, or None with the reason noted when it raises: one failed probe never stops the profile."""
    try:
        return fn()
    except Exception as e:  # any failure of a probe is reported, not raised
        notes.append(f"{what}: unknown ({_why(e)})")
        return None


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1]}" if text else type(e).__name__


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _cuda_version(v: int) -> str:
    """NVML and CUDA encode 13.0 as 13000."""
    return f"{v // 1000}.{v % 1000 // 10}"


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


@contextmanager
def _nvml(notes: list[str]) -> Iterator[Any | None]:
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
            notes.append(f"NVML unavailable: nvmlInit failed ({_why(e)})")
            nv = None
    try:
        yield nv
    finally:
        if nv is not None:
            with suppress(Exception):
                nv.nvmlShutdown()


def _torch_gpus(notes: list[str]) -> list[tuple[int, Any]]:
    """(CUDA ordinal, torch device properties) of each GPU torch can use."""
    import torch

    try:
        if not torch.cuda.is_available():
            return []
        return [(i, torch.cuda.get_device_properties(i)) for i in range(torch.cuda.device_count())]
    except Exception as e:  # a broken CUDA install: report, carry on as a CPU machine
        notes.append(f"CUDA GPUs: unknown, torch cannot query them ({_why(e)})")
        return []


def _torch_uuid(props: Any) -> str | None:
    uuid = getattr(props, "uuid", None)
    return str(uuid) if uuid is not None else None


def _nvml_handle(nv: Any, index: int, props: Any, count: int) -> Any:
    """NVML's handle for torch's GPU ``index``: by UUID, else by position when NVML sees the same GPUs."""
    uuid = _torch_uuid(props)
    if uuid is not None:
        with suppress(Exception):  # NVMLError, or TypeError from bindings that want str rather than bytes
            return nv.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}".encode())
    if "CUDA_VISIBLE_DEVICES" not in os.environ and nv.nvmlDeviceGetCount() == count:
        return nv.nvmlDeviceGetHandleByIndex(index)
    raise LookupError("cannot match the CUDA device to an NVML device")


def _gpu_info(nv: Any | None, handle: Any | None, index: int, props: Any, notes: list[str]) -> GpuInfo:
    capability = (props.major, props.minor)
    info = GpuInfo(
        index=index,
        name=props.name,
        uuid=_torch_uuid(props),
        memory_bytes=props.total_memory,
        capability=f"{props.major}.{props.minor}",
        sm_count=props.multi_processor_count,
        tf32=capability >= (8, 0),
        bf16=capability >= (8, 0),
        fp8=capability >= (8, 9),
        max_sm_clock_mhz=None,
        max_memory_clock_mhz=None,
        power_limit_w=None,
        pcie_generation=None,
        pcie_width=None,
        numa_node=None,
        cpu_affinity=None,
    )
    if handle is not None:
        _fill_from_nvml(info, nv, handle, notes)
    return info


def _fill_from_nvml(info: GpuInfo, nv: Any, h: Any, notes: list[str]) -> None:
    label = f"gpu {info.index}"
    info.max_sm_clock_mhz = _ask(
        notes, f"{label} max SM clock", lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM)
    )
    info.max_memory_clock_mhz = _ask(
        notes, f"{label} max memory clock", lambda: nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_MEM)
    )
    info.power_limit_w = _ask(notes, f"{label} power limit", lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000)
    info.pcie_generation = _ask(notes, f"{label} PCIe generation", lambda: nv.nvmlDeviceGetMaxPcieLinkGeneration(h))
    info.pcie_width = _ask(notes, f"{label} PCIe width", lambda: nv.nvmlDeviceGetMaxPcieLinkWidth(h))
    node = _ask(notes, f"{label} NUMA node", lambda: nv.nvmlDeviceGetNumaNodeId(h))
    info.numa_node = node if node is not None and node >= 0 else None
    words = math.ceil((psutil.cpu_count() or 1) / 64)
    info.cpu_affinity = _ask(notes, f"{label} CPU affinity", lambda: _cpu_ranges(nv.nvmlDeviceGetCpuAffinity(h, words)))


def _cpu_ranges(mask_words: Sequence[int]) -> str:
    """64-bit affinity words to "0-31,64-95"."""
    cpus = [w * 64 + bit for w, word in enumerate(mask_words) for bit in range(64) if int(word) >> bit & 1]
    ranges: list[list[int]] = []
    for cpu in cpus:
        if ranges and ranges[-1][1] == cpu - 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(f"{lo}-{hi}" if hi > lo else str(lo) for lo, hi in ranges)


def _note_unusable_gpus(nv: Any, usable: int, notes: list[str]) -> None:
    seen = _ask(notes, "NVML device count", nv.nvmlDeviceGetCount)
    if seen is not None and seen > usable:
        notes.append(f"NVML sees {seen} GPU(s), torch can use {usable} (CUDA_VISIBLE_DEVICES, or torch without CUDA)")


# NVML's nvmlNvlinkVersion_t values, and its topology levels in nvidia-smi's legend.
_NVLINK_VERSIONS = {1: "1.0", 2: "2.0", 3: "2.2", 4: "3.0", 5: "3.1", 6: "4.0", 7: "5.0", 8: "6.0"}
_PCIE_PATHS = {0: "BOARD", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}


@dataclass(kw_only=True, slots=True)
class _NvLinkEnd:
    """One active NVLink of a GPU and what its far end is."""

    to_gpu: bool | None
    """The far end is a GPU (True), an NVSwitch or other device (False), or NVML cannot say (None)."""
    bus: tuple[int, int, int] | None
    """PCI (domain, bus, device) of the far end."""
    version: str | None
    """NVLink version of the link."""


def _links(nv: Any | None, handles: list[Any | None], notes: list[str]) -> list[GpuLink]:
    if len(handles) < 2:
        return []
    buses = [_pci_bus(nv, h, i, notes) for i, h in enumerate(handles)]
    ends = [
        _ask(notes, f"gpu {i} NVLinks", lambda: _nvlink_ends(nv, h)) if h is not None else None
        for i, h in enumerate(handles)
    ]
    pairs = [(a, b) for a in range(len(handles)) for b in range(a + 1, len(handles))]
    return [_link(nv, a, b, handles, buses, ends, notes) for a, b in pairs]


def _pci_bus(nv: Any | None, h: Any | None, index: int, notes: list[str]) -> tuple[int, int, int] | None:
    if h is None:
        return None
    return _ask(notes, f"gpu {index} PCI bus", lambda: _pci_key(nv.nvmlDeviceGetPciInfo(h)))


def _link(
    nv: Any | None,
    a: int,
    b: int,
    handles: list[Any | None],
    buses: list[tuple[int, int, int] | None],
    ends: list[list[_NvLinkEnd] | None],
    notes: list[str],
) -> GpuLink:
    peer = _ask(notes, f"peer access {a}<->{b}", lambda: _peer_access(a, b))
    ends_a, ends_b = ends[a], ends[b]
    if nv is None or ends_a is None or ends_b is None:
        return GpuLink(
            a=a, b=b, kind="unknown", nvlink_count=0, nvlink_generation=None, pcie_path=None, peer_access=peer
        )
    direct = [e for e in ends_a if e.bus is not None and e.bus == buses[b]]
    switch_a, switch_b = _switch_links(ends_a, buses), _switch_links(ends_b, buses)
    kind: LinkKind
    if direct:
        kind, used = "nvlink", direct
    elif switch_a and switch_b:
        kind, used = "nvswitch", min(switch_a, switch_b, key=len)
    else:
        kind, used = "pcie", []
    versions = sorted({e.version for e in used if e.version})
    path = _ask(
        notes,
        f"PCIe path {a}<->{b}",
        lambda: _PCIE_PATHS.get(nv.nvmlDeviceGetTopologyCommonAncestor(handles[a], handles[b])),
    )
    return GpuLink(
        a=a,
        b=b,
        kind=kind,
        nvlink_count=len(used),
        nvlink_generation=versions[-1] if versions else None,
        pcie_path=path,
        peer_access=peer,
    )


def _switch_links(ends: list[_NvLinkEnd], gpu_buses: list[tuple[int, int, int] | None]) -> list[_NvLinkEnd]:
    """Links that end at an NVSwitch: said so by NVML, or ending at no GPU we know when NVML cannot say."""
    return [e for e in ends if e.to_gpu is False or (e.to_gpu is None and e.bus not in gpu_buses)]


def _nvlink_ends(nv: Any, h: Any) -> list[_NvLinkEnd]:
    """The GPU's active NVLinks. Links past the device's count answer with an error and are skipped."""
    ends = []
    for link in range(nv.NVML_NVLINK_MAX_LINKS):
        try:
            if nv.nvmlDeviceGetNvLinkState(h, link) != nv.NVML_FEATURE_ENABLED:
                continue
        except nv.NVMLError:
            continue
        ends.append(
            _NvLinkEnd(to_gpu=_far_is_gpu(nv, h, link), bus=_far_bus(nv, h, link), version=_nvlink_version(nv, h, link))
        )
    return ends


def _far_is_gpu(nv: Any, h: Any, link: int) -> bool | None:
    try:
        return nv.nvmlDeviceGetNvLinkRemoteDeviceType(h, link) == nv.NVML_NVLINK_DEVICE_TYPE_GPU
    except (nv.NVMLError, AttributeError):  # old drivers and bindings lack it
        return None


def _far_bus(nv: Any, h: Any, link: int) -> tuple[int, int, int] | None:
    try:
        return _pci_key(nv.nvmlDeviceGetNvLinkRemotePciInfo(h, link))
    except nv.NVMLError:
        return None


def _nvlink_version(nv: Any, h: Any, link: int) -> str | None:
    try:
        return _NVLINK_VERSIONS.get(nv.nvmlDeviceGetNvLinkVersion(h, link))
    except nv.NVMLError:
        return None


def _pci_key(pci: Any) -> tuple[int, int, int]:
    return (int(pci.domain), int(pci.bus), int(pci.device))


def _peer_access(a: int, b: int) -> bool:
    import torch

    return bool(torch.cuda.can_device_access_peer(a, b) and torch.cuda.can_device_access_peer(b, a))


def _detect_tpu(notes: list[str]) -> TpuInfo:
    version = _dist_version("torch_xla")
    absent = TpuInfo(present=False, kind=None, count=0, torch_xla=version)
    if importlib.util.find_spec("torch_xla") is None:
        return absent
    try:
        import torch_xla.runtime as xr

        device_type = xr.device_type()
        if device_type != "TPU":
            notes.append(f"TPU: none (torch_xla's runtime device is {device_type})")
            return absent
        count = xr.global_runtime_device_count()
    except Exception as e:  # torch_xla present but no runtime behind it
        notes.append(f"TPU: unknown, torch_xla did not answer ({_why(e)})")
        return absent
    kind = _ask(notes, "TPU version", _tpu_kind)
    return TpuInfo(present=True, kind=kind or "TPU", count=count, torch_xla=version)


def _tpu_kind() -> str:
    import torch_xla.tpu

    return f"TPU v{torch_xla.tpu.version()}"


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _software(gpus: list[GpuInfo], notes: list[str]) -> SoftwareInfo:
    import torch

    cuda = bool(gpus)
    nccl = _ask(notes, "NCCL version", lambda: ".".join(map(str, torch.cuda.nccl.version()))) if cuda else None
    return SoftwareInfo(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=_ask(notes, "cuDNN version", lambda: _cudnn_version(torch.backends.cudnn.version())),
        nccl=nccl,
        triton=_dist_version("triton"),
        deepspeed=_dist_version("deepspeed"),
        optuna=_dist_version("optuna"),
        torchao=_torchao_version(notes),
        sdpa_flash=cuda and _runs(notes, "torch SDPA flash backend", lambda: _sdpa("FLASH_ATTENTION")),
        sdpa_cudnn=cuda and _runs(notes, "torch SDPA cuDNN backend", lambda: _sdpa("CUDNN_ATTENTION")),
        flash_attn_3=_flash_attn_3(gpus, notes),
    )


def _runs(notes: list[str], what: str, fn: Callable[[], object]) -> bool:
    try:
        fn()
        return True
    except Exception as e:  # not usable here: say why
        notes.append(f"{what}: not usable ({_why(e)})")
        return False


def _cudnn_version(v: int | None) -> str | None:
    """cuDNN 9 encodes 9.10.2 as 91002; cuDNN 8 encodes 8.9.7 as 8907."""
    if v is None:
        return None
    if v >= 90000:
        return f"{v // 10000}.{v % 10000 // 100}.{v % 100}"
    return f"{v // 1000}.{v % 1000 // 100}.{v % 100}"


def _torchao_version(notes: list[str]) -> str | None:
    if importlib.util.find_spec("torchao") is None:
        return None
    # Its distribution's metadata, not an import: importing torchao loads its CUDA extensions
    # and prints their failures and torch's deprecation lines on every command.
    from importlib import metadata

    return _ask(notes, "torchao", lambda: metadata.version("torchao"))


def _attention_inputs(layout: str) -> tuple[Any, Any, Any]:
    """Small random bf16 q, k, v on GPU 0: "bhsd" (B, heads, seq, head_dim) for SDPA, "bshd" for FlashAttention."""
    import torch

    shape = (1, 4, 256, 64) if layout == "bhsd" else (1, 256, 4, 64)
    return tuple(torch.randn(shape, device="cuda:0", dtype=torch.bfloat16) for _ in range(3))  # type: ignore[return-value]


def _sdpa(backend: str) -> None:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = _attention_inputs("bhsd")
    with sdpa_kernel(getattr(SDPBackend, backend)):
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.cuda.synchronize()


def _flash_attn_3(gpus: list[GpuInfo], notes: list[str]) -> bool:
    if importlib.util.find_spec("flash_attn_interface") is None:
        return False
    if not gpus or not gpus[0].capability.startswith("9."):
        notes.append("FlashAttention-3: installed, but it runs on Hopper GPUs (capability 9.x) only")
        return False

    def run() -> None:
        import flash_attn_interface
        import torch

        q, k, v = _attention_inputs("bshd")
        flash_attn_interface.flash_attn_func(q, k, v, causal=True)
        torch.cuda.synchronize()

    return _runs(notes, "FlashAttention-3", run)


# --------------------------------------------------------------------------- measurement


@dataclass(kw_only=True, slots=True)
class MeasureConfig:
    """How big and how long each measurement is."""

    matmul_n: int
    """Square matmul size n, large enough to fill the device."""
    copy_bytes: int
    """Buffer of the bandwidth copy, far larger than any cache."""
    h2d_bytes: int
    """Pinned host buffer copied to the GPU (CUDA only)."""
    allreduce_bytes: tuple[int, ...]
    """All-reduce message sizes (two or more GPUs only)."""
    budget_s: float
    """Timed seconds per figure, split over the repeats; a figure whose single run takes longer is skipped."""
    warmup_s: float
    """Untimed running before each figure, so clocks, caches and library choices settle."""
    repeats: int
    """Timed repeats per figure; a figure is their median with min and max."""


CUDA_MEASURE = MeasureConfig(
    matmul_n=8192,  # 2 * 8192^3 = 1.1 TFLOP a product: about 1.4 ms in bf16 on an H100
    copy_bytes=2 * GiB,  # 2 GiB read + 2 GiB written, ~80x an H100's 50 MiB L2
    h2d_bytes=256 * MiB,
    allreduce_bytes=(MiB, 16 * MiB, 128 * MiB, GiB),
    budget_s=1.0,
    warmup_s=1.0,  # clocks settle after about a second of full load
    repeats=10,
)
CPU_MEASURE = MeasureConfig(
    matmul_n=2048,  # 17 GFLOP a product: about 0.2 s on two cores
    copy_bytes=256 * MiB,
    h2d_bytes=0,
    allreduce_bytes=(),
    budget_s=1.5,
    warmup_s=0.2,
    repeats=5,
)
ALLREDUCE_TIMEOUT_S = 120
"""Longest the all-reduce child processes may take, NCCL start-up included."""


class Clock(Protocol):
    def time(self, fn: Callable[[], object], n: int) -> float:
        """Seconds that ``n`` back-to-back calls of ``fn`` take."""
        ...


class DeviceClock:
    """The device's own timer (``Device.timer``: events on an accelerator, the host clock on a
    CPU) around ``n`` calls, read once the device has finished them."""

    def __init__(self, device: Any) -> None:
        self.device, self.kind = device, devices.of(device)

    def time(self, fn: Callable[[], object], n: int) -> float:
        with self.kind.timer(self.device) as timer:
            for _ in range(n):
                fn()
        self.kind.synchronize(self.device)
        return timer.seconds()


class TooSlow(Exception):
    """One run of a figure takes longer than its whole budget."""


def bench(fn: Callable[[], object], work: float, clock: Clock, cfg: MeasureConfig, unit: str) -> Stat:
    """Rate of ``fn`` in ``work`` units per second: warm up, then the median of cfg.repeats timed runs."""
    fn()  # the first call pays for library set-up and kernel choice
    once = max(clock.time(fn, 1), 1e-9)
    if once > cfg.budget_s:
        raise TooSlow(f"one run takes {once:.1f} s, over the {cfg.budget_s} s budget")
    clock.time(fn, max(1, math.ceil(cfg.warmup_s / once)))
    iters = max(1, round(cfg.budget_s / cfg.repeats / once))
    return Stat.of([work * iters / max(clock.time(fn, iters), 1e-9) for _ in range(cfg.repeats)], unit)


def measure(gpus: list[GpuInfo], notes: list[str], log: Log) -> Measurements:
    """Measure GPU 0 (and all-reduce across all GPUs), or the CPU when there is no GPU."""
    import torch

    start = time.perf_counter()
    if gpus:
        torch.cuda.set_device(0)
        device, cfg = torch.device("cuda", 0), CUDA_MEASURE
        dtypes = [d for d in MATMUL_DTYPES if d == "fp32" or getattr(gpus[0], d)]
    else:
        device, cfg = torch.device("cpu"), CPU_MEASURE
        dtypes = ["fp32", "bf16"]
    clock = DeviceClock(device)
    matmul = {}
    for dtype in dtypes:
        log(f"measuring {dtype} matmul ({cfg.matmul_n}^3) on {device}")
        rate = _ask(notes, f"{dtype} matmul on {device}", lambda: _bench_matmul(dtype, device, clock, cfg))
        if rate is not None:
            matmul[dtype] = rate
    log(f"measuring memory bandwidth ({cfg.copy_bytes // MiB} MiB copy) on {device}")
    copy = _ask(notes, f"copy bandwidth on {device}", lambda: _bench_copy(device, clock, cfg))
    h2d = None
    if gpus:
        log(f"measuring host-to-device bandwidth ({cfg.h2d_bytes // MiB} MiB, pinned)")
        h2d = _ask(notes, "host-to-device bandwidth", lambda: _bench_h2d(device, clock, cfg))
        torch.cuda.empty_cache()  # give the all-reduce processes the memory back
    allreduce: list[AllReducePoint] = []
    if len(gpus) >= 2:
        log(f"measuring all-reduce across {len(gpus)} GPUs (torchrun, NCCL)")
        allreduce = _ask(notes, "all-reduce bandwidth", lambda: measure_allreduce(len(gpus), cfg.allreduce_bytes)) or []
        if allreduce:
            notes.append("all-reduce measured with NVLink SHARP off (NCCL_NVLS_ENABLE=0)")
    return Measurements(
        device=str(device),
        matmul_n=cfg.matmul_n,
        matmul=matmul,
        copy_bytes=cfg.copy_bytes,
        copy=copy,
        h2d_bytes=cfg.h2d_bytes if gpus else None,
        h2d=h2d,
        allreduce=allreduce,
        seconds=time.perf_counter() - start,
    )


@contextmanager
def _fp32_precision(precision: str) -> Iterator[None]:
    """fp32 matmuls in full precision ("highest") or on TF32 units ("high") inside the block."""
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _bench_matmul(dtype: str, device: Any, clock: Clock, cfg: MeasureConfig) -> Stat:
    import torch

    n = cfg.matmul_n
    if dtype == "fp8":
        a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
        one = torch.ones((), device=device)

        def fn() -> object:
            return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True)

    else:
        tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        a, b = (torch.randn(n, n, device=device, dtype=tdtype) for _ in range(2))

        def fn() -> object:
            # Plain `a @ b` (the caching allocator makes the output free): with out= cuBLAS
            # was seen picking a slower kernel on an H200 (676 against 784 TFLOP/s).
            return a @ b

    with _fp32_precision("high" if dtype == "tf32" else "highest"):
        return bench(fn, 2 * n**3, clock, cfg, "flop/s")


def _bench_copy(device: Any, clock: Clock, cfg: MeasureConfig) -> Stat:
    import torch

    src = torch.randn(cfg.copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src), 2 * cfg.copy_bytes, clock, cfg, "byte/s")


def _bench_h2d(device: Any, clock: Clock, cfg: MeasureConfig) -> Stat:
    import torch

    host = torch.randn(cfg.h2d_bytes // 4).pin_memory()
    dst = torch.empty(host.shape, device=device)
    return bench(lambda: dst.copy_(host, non_blocking=True), cfg.h2d_bytes, clock, cfg, "byte/s")


def allreduce_env() -> dict[str, str]:
    """Environment of the all-reduce processes: NVLink SHARP / multicast off, this autotune importable."""
    env = dict(os.environ)
    # Multicast over NVLink can take a shared host's GPUs out of service: never let it start.
    env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def measure_allreduce(
    nproc: int, sizes: Sequence[int], device: Literal["cuda", "cpu"] = "cuda", timeout_s: float = ALLREDUCE_TIMEOUT_S
) -> list[AllReducePoint]:
    """All-reduce bandwidth at each size, one process per GPU through torchrun (NCCL; "cpu": gloo, for tests)."""
    with tempfile.TemporaryDirectory(prefix="autotune-allreduce-") as tmp:
        out = Path(tmp) / "allreduce.json"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "autotune.allreduce_bench", "--device", device, "--out", str(out),
            "--sizes", ",".join(map(str, sizes)),
        ]  # fmt: skip
        _run_process_group(cmd, allreduce_env(), timeout_s)
        data = read_json(out, "all-reduce result")
    if not isinstance(data, list):
        raise RuntimeError("all-reduce result: expected a list")
    return [from_dict(AllReducePoint, p, f"allreduce[{i}]") for i, p in enumerate(data)]


def _run_process_group(cmd: list[str], env: dict[str, str], timeout_s: float) -> None:
    """Run ``cmd`` in its own process group; on a timeout kill the whole group (torchrun and its workers)."""
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"timed out after {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        errors = [line for line in output.splitlines() if "Error" in line] or output.splitlines() or ["no output"]
        raise RuntimeError(f"exit status {proc.returncode}: {errors[-1].strip()}")
