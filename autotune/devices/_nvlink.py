"""How the CUDA device's GPUs reach each other, read from NVML: direct NVLinks, NVLinks to an
NVSwitch, or PCIe only, with the closest common PCIe ancestor and peer access per pair."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from autotune.devices.base import ask
from autotune.hardware.profile import GpuLink, LinkKind

# NVML's nvmlNvlinkVersion_t values, and its topology levels in nvidia-smi's legend.
NVLINK_VERSIONS = {1: "1.0", 2: "2.0", 3: "2.2", 4: "3.0", 5: "3.1", 6: "4.0", 7: "5.0", 8: "6.0"}
PCIE_PATHS = {0: "BOARD", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}

Bus = tuple[int, int, int]
"""PCI (domain, bus, device)."""


@dataclass(kw_only=True, slots=True)
class NvLinkEnd:
    """One active NVLink of a GPU and what its far end is."""

    to_gpu: bool | None
    """The far end is a GPU (True), an NVSwitch or other device (False), or NVML cannot say (None)."""
    bus: Bus | None
    """PCI (domain, bus, device) of the far end."""
    version: str | None
    """NVLink version of the link."""


def links(nv: Any | None, handles: list[Any | None], notes: list[str]) -> list[GpuLink]:
    """One GpuLink per pair of GPUs (``handles``: NVML's, by CUDA ordinal; None where unmatched)."""
    if len(handles) < 2:
        return []
    buses = [_pci_bus(nv, h, i, notes) for i, h in enumerate(handles)]
    ends = [
        ask(notes, f"gpu {i} NVLinks", lambda: nvlink_ends(nv, h)) if h is not None else None
        for i, h in enumerate(handles)
    ]
    pairs = [(a, b) for a in range(len(handles)) for b in range(a + 1, len(handles))]
    return [_link(nv, a, b, handles, buses, ends, notes) for a, b in pairs]


def _pci_bus(nv: Any | None, h: Any | None, index: int, notes: list[str]) -> Bus | None:
    if h is None:
        return None
    return ask(notes, f"gpu {index} PCI bus", lambda: _pci_key(nv.nvmlDeviceGetPciInfo(h)))


def _link(
    nv: Any | None,
    a: int,
    b: int,
    handles: list[Any | None],
    buses: list[Bus | None],
    ends: list[list[NvLinkEnd] | None],
    notes: list[str],
) -> GpuLink:
    peer = ask(notes, f"peer access {a}<->{b}", lambda: _peer_access(a, b))
    ends_a, ends_b = ends[a], ends[b]
    if nv is None or ends_a is None or ends_b is None:
        return GpuLink(
            a=a, b=b, kind="unknown", nvlink_count=0, nvlink_generation=None, pcie_path=None, peer_access=peer
        )
    direct = [e for e in ends_a if e.bus is not None and e.bus == buses[b]]
    switch_a, switch_b = switch_links(ends_a, buses), switch_links(ends_b, buses)
    kind: LinkKind
    if direct:
        kind, used = "nvlink", direct
    elif switch_a and switch_b:
        kind, used = "nvswitch", min(switch_a, switch_b, key=len)
    else:
        kind, used = "pcie", []
    versions = sorted({e.version for e in used if e.version})
    path = ask(
        notes,
        f"PCIe path {a}<->{b}",
        lambda: PCIE_PATHS.get(nv.nvmlDeviceGetTopologyCommonAncestor(handles[a], handles[b])),
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


def switch_links(ends: list[NvLinkEnd], gpu_buses: list[Bus | None]) -> list[NvLinkEnd]:
    """Links that end at an NVSwitch: said so by NVML, or ending at no GPU we know when NVML cannot say."""
    return [e for e in ends if e.to_gpu is False or (e.to_gpu is None and e.bus not in gpu_buses)]


def nvlink_ends(nv: Any, h: Any) -> list[NvLinkEnd]:
    """The GPU's active NVLinks. Links past the device's count answer with an error and are skipped."""
    ends = []
    for link in range(nv.NVML_NVLINK_MAX_LINKS):
        try:
            if nv.nvmlDeviceGetNvLinkState(h, link) != nv.NVML_FEATURE_ENABLED:
                continue
        except nv.NVMLError:
            continue
        ends.append(
            NvLinkEnd(to_gpu=_far_is_gpu(nv, h, link), bus=_far_bus(nv, h, link), version=_nvlink_version(nv, h, link))
        )
    return ends


def _far_is_gpu(nv: Any, h: Any, link: int) -> bool | None:
    try:
        return nv.nvmlDeviceGetNvLinkRemoteDeviceType(h, link) == nv.NVML_NVLINK_DEVICE_TYPE_GPU
    except (nv.NVMLError, AttributeError):  # old drivers and bindings lack it
        return None


def _far_bus(nv: Any, h: Any, link: int) -> Bus | None:
    try:
        return _pci_key(nv.nvmlDeviceGetNvLinkRemotePciInfo(h, link))
    except nv.NVMLError:
        return None


def _nvlink_version(nv: Any, h: Any, link: int) -> str | None:
    try:
        return NVLINK_VERSIONS.get(nv.nvmlDeviceGetNvLinkVersion(h, link))
    except nv.NVMLError:
        return None


def _pci_key(pci: Any) -> Bus:
    return (int(pci.domain), int(pci.bus), int(pci.device))


def _peer_access(a: int, b: int) -> bool:
    import torch

    return bool(torch.cuda.can_device_access_peer(a, b) and torch.cuda.can_device_access_peer(b, a))
