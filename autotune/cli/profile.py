"""`autotune profile`: what this machine is and what it does, saved as a HardwareProfile."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from autotune.cli.app import app
from autotune.errors import UserError

if TYPE_CHECKING:
    from rich.console import RenderableType

    from autotune.hardware.profile import HardwareProfile, Stat


@app.command()
def profile(
    out: Annotated[
        Path | None, typer.Option("--out", help="Where to write the profile. Default: ~/.cache/autotune/hardware.json.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the profile as JSON instead of tables.")] = False,
    quick: Annotated[
        bool, typer.Option("--quick", help="Detect only, measure nothing (seconds, not a minute).")
    ] = False,
) -> None:
    """Detect this machine (CPU, GPUs and their links, TPU, software) and measure it (matmul rate per dtype,
    memory and host-to-device bandwidth, all-reduce between GPUs)."""
    from autotune import hardware
    from autotune.schema import check_writable, to_dict

    path = out or hardware.default_profile_path()
    check_writable(path, "--out")  # before a minute of measuring
    prof = hardware.detect(quick=quick, log=_log)
    try:
        prof.save(path)
    except OSError as e:
        raise UserError(f"--out {path}: cannot write ({e.strerror or e})") from None
    if as_json:
        print(json.dumps(to_dict(prof), indent=2))
    else:
        from rich.console import Console

        Console().print(*_render(prof))
    _log(f"wrote {path}")


def _log(message: str) -> None:
    print(f"autotune: {message}", file=sys.stderr, flush=True)


def _render(p: HardwareProfile) -> list[RenderableType]:
    from rich.table import Table

    machine = Table(title=f"Machine {p.fingerprint}", show_header=False)
    cpu = p.cpu
    for key, value in (
        ("host", p.hostname),
        (
            "CPU",
            f"{cpu.model}: {cpu.physical_cores or '?'} physical, "
            f"{cpu.logical_cores} logical, {cpu.usable_cores} usable",
        ),
        ("RAM", f"{cpu.ram_bytes / 2**30:.1f} GiB (as the OS reports it now)"),
        ("driver / CUDA", " / ".join((p.driver_version or "-", p.cuda_driver_version or "-"))),
        ("XLA", f"{p.tpu.count} x {p.tpu.kind} (torch-xla {p.tpu.torch_xla})" if p.tpu.present else "none"),
        ("software", _software_line(p)),
    ):
        machine.add_row(key, value)
    parts: list[RenderableType] = [machine]
    if p.gpus:
        parts.append(_gpu_table(p))
    if p.links:
        parts.append(_link_table(p))
    if p.measured is not None:
        parts.append(_measured_table(p))
    if p.notes:
        parts.append("Notes:\n" + "\n".join(f"  - {note}" for note in p.notes))
    return parts


def _software_line(p: HardwareProfile) -> str:
    s = p.software
    versions = {
        "torch": s.torch, "cuda": s.cuda, "cudnn": s.cudnn, "nccl": s.nccl, "triton": s.triton,
        "deepspeed": s.deepspeed, "optuna": s.optuna, "torchao": s.torchao,
    }  # fmt: skip
    usable = {"SDPA flash": s.sdpa_flash, "SDPA cuDNN": s.sdpa_cudnn, "FA3": s.flash_attn_3}
    return (
        ", ".join(f"{name} {v}" for name, v in versions.items() if v)
        + "; usable: "
        + (", ".join(name for name, ok in usable.items() if ok) or "no fused attention")
    )


def _gpu_table(p: HardwareProfile) -> RenderableType:
    from rich.table import Table

    table = Table(title="GPUs")
    for column in ("#", "name", "memory", "cc", "SMs", "dtypes", "max SM clock", "power", "PCIe", "NUMA", "CPUs"):
        table.add_column(column)
    for g in p.gpus:
        dtypes = "fp32 " + " ".join(d for d in ("tf32", "bf16", "fp8") if getattr(g, d))
        table.add_row(
            str(g.index), g.name, f"{g.memory_bytes / 2**30:.0f} GiB", g.capability, str(g.sm_count), dtypes,
            _opt(g.max_sm_clock_mhz, "{} MHz"), _opt(g.power_limit_w, "{:.0f} W"),
            f"gen{g.pcie_generation} x{g.pcie_width}" if g.pcie_generation else "-",
            _opt(g.numa_node, "{}"), g.cpu_affinity or "-",
        )  # fmt: skip
    return table


def _link_table(p: HardwareProfile) -> RenderableType:
    from rich.table import Table

    table = Table(title="GPU links")
    for column in ("pair", "kind", "NVLinks", "PCIe path", "peer access"):
        table.add_column(column)
    for link in p.links:
        nvlinks = f"{link.nvlink_count} x v{link.nvlink_generation or '?'}" if link.nvlink_count else "-"
        peer = "-" if link.peer_access is None else ("yes" if link.peer_access else "no")
        table.add_row(f"{link.a}-{link.b}", link.kind, nvlinks, link.pcie_path or "-", peer)
    return table


def _measured_table(p: HardwareProfile) -> RenderableType:
    from rich.table import Table

    m = p.measured
    assert m is not None
    table = Table(title=f"Measured on {m.device} in {m.seconds:.1f} s (median, min-max)")
    for column in ("figure", "median", "min - max", "repeats"):
        table.add_column(column)
    rows: list[tuple[str, Stat]] = [(f"matmul {d} ({m.matmul_n}^3)", s) for d, s in m.matmul.items()]
    if m.copy is not None:
        rows.append((f"memory bandwidth, read+write ({m.copy_bytes >> 20} MiB copy)", m.copy))
    if m.h2d is not None and m.h2d_bytes is not None:
        rows.append((f"host to device, pinned ({m.h2d_bytes >> 20} MiB)", m.h2d))
    for point in m.allreduce:
        rows.append((f"all-reduce busbw ({point.size_bytes >> 20} MiB)", point.busbw))
    for name, stat in rows:
        scale, unit = _scale(stat)
        spread = f"{stat.min / scale:.1f} - {stat.max / scale:.1f}"
        table.add_row(name, f"{stat.median / scale:.1f} {unit}", spread, str(stat.repeats))
    return table


def _scale(stat: Stat) -> tuple[float, str]:
    """Divisor and unit for showing a figure: TFLOP/s or GFLOP/s, and GB/s (1e9 bytes, as nccl-tests)."""
    if stat.unit == "flop/s":
        return (1e12, "TFLOP/s") if stat.median >= 1e12 else (1e9, "GFLOP/s")
    return 1e9, "GB/s"


def _opt(value: object, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)
