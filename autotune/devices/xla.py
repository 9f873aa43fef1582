"""TPUs, and XLA's CPU backend, through torch-xla (PJRT): a lazily traced device.

A step is traced, not run: ``torch_xla.sync()`` (formerly ``xm.mark_step``) at its end cuts the
trace into one graph, which XLA compiles on the host the first time it sees it and runs on the
device. A change in the graph (another shape, a Python branch on a value) compiles another one,
so the loop keeps shapes static and never reads a value back inside the timed steps. The timer
syncs and waits for the device (``xm.wait_device_ops``): an XLA step has no events to record.

Supported: torch-xla 2.9.0 on torch 2.9 (its own environment, ``make xla-env``; the project's
main one runs torch 2.11-2.13, which torch-xla 2.9 cannot load). Tested on XLA's CPU backend
(``PJRT_DEVICE=CPU``: one device) in CI; not yet run on a TPU. torch-xla's last release is a
year old and Google is moving PyTorch on TPU to a native backend: :func:`versions` says at
start-up what is here and whether it is the tested pair.

The kind is available where torch-xla imports and a runtime is chosen: ``PJRT_DEVICE`` set (CPU,
TPU), or libtpu installed (a TPU VM, where torch-xla picks the TPU by itself). Without either,
torch-xla would fall back to its CPU backend with a warning; here it is not taken unasked.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from autotune.devices.base import Device, Found, Timer, why
from autotune.errors import UserError

if TYPE_CHECKING:
    import torch

SUPPORTED = {"torch_xla": "2.9.0", "torch": "2.9"}
"""The pair this module is tested with: torch-xla 2.9.0 on torch 2.9.x (PyPI's 2.9.1)."""

# Per chip, dense, from Google's Cloud TPU system-architecture pages (docs.cloud.google.com/tpu/
# docs/v4, v5e, v5p, v6e). Device kinds as the runtime names them ("TPU v5 lite" is v5e, "TPU
# v6 lite" v6e), or as the accelerator type does ("v5litepod-8"); first match wins.
DATASHEET: tuple[tuple[str, dict[str, float], int, float], ...] = (
    (r"v4\b", {"bf16": 275e12, "int8": 275e12}, 32 << 30, 1200e9),
    (r"v5 ?lite|v5e", {"bf16": 197e12, "int8": 394e12}, 16 << 30, 819e9),
    (r"v5p?\b", {"bf16": 459e12, "int8": 918e12}, 95 << 30, 2765e9),
    (r"v6 ?lite|v6e", {"bf16": 918e12, "int8": 1836e12}, 32 << 30, 1640e9),
)
"""(pattern of the TPU's kind, its matmul rate by dtype in flop/s, HBM bytes, HBM bytes/s)."""

CPU_BACKEND = "CPU (XLA)"
"""The device kind of XLA's CPU backend, as profiles and messages name it."""

MATMUL_PRECISION = {True: "high", False: "highest"}
"""``torch_xla.backends.set_mat_mul_precision`` for fp32 matmuls, by the precision strategy's
``tf32`` switch: "high" (three bf16 passes, bf16_3x: TF32's role on a GPU), or "highest" (about
full fp32, PyTorch's plain default). torch-xla's own default ("default", one bf16 pass) is
never chosen: a plain fp32 baseline computes in fp32."""

_FEATURES = frozenset({"bf16", "gspmd"})
"""What an XLA device does: bf16 (a TPU's MXUs; the CPU backend emulates it) and torch-xla's
SPMD partitioner. Not inductor, CUDA's kernels, torchao's training tensors nor torch.distributed's
collectives between processes (NCCL or gloo): torch-xla brings its own of each."""

_LACKS = {
    "inductor": "torch.compile's inductor (XLA compiles the step itself)",
    "collectives": "torch.distributed's process groups over NCCL or gloo (XLA shards through SPMD instead)",
    "torchao": "torchao's training tensors (CUDA and CPU kernels)",
    "foreach": "torch's multi-tensor kernels (AdamW fused or foreach)",
    "triton": "Triton kernels (CUDA's)",
    "fused_attention": "SDPA's fused CUDA backends and FlashAttention",
    "fused_optimizer": "a fused AdamW (CUDA's kernel)",
    "fp8": "float8 matmuls",
}
"""Why an XLA device lacks a feature, for ``autotune strategies --explain``."""


def _env_chosen() -> bool:
    """A runtime is chosen: PJRT_DEVICE set, or libtpu installed (a TPU VM)."""
    return bool(os.environ.get("PJRT_DEVICE")) or importlib.util.find_spec("libtpu") is not None


@functools.cache
def _runtime() -> tuple[str, int] | None:
    """(device type, device count) of torch-xla's runtime; None where it is not installed or not chosen."""
    if importlib.util.find_spec("torch_xla") is None or not _env_chosen():
        return None
    import torch_xla.runtime as xr

    return xr.device_type(), xr.global_runtime_device_count()


def versions() -> tuple[str | None, str | None, str | None]:
    """(torch-xla's version, torch's, a warning where they are not the tested pair or None)."""
    try:
        xla = importlib.metadata.version("torch_xla")
    except importlib.metadata.PackageNotFoundError:
        return None, None, None
    torch_version = importlib.metadata.version("torch")
    if xla != SUPPORTED["torch_xla"] or not torch_version.startswith(SUPPORTED["torch"] + "."):
        return (
            xla,
            torch_version,
            (
                f"torch-xla {xla} on torch {torch_version}: autotune is tested with torch-xla "
                f"{SUPPORTED['torch_xla']} on torch {SUPPORTED['torch']} (README, TPUs through torch-xla)"
            ),
        )
    return xla, torch_version, None


@functools.cache
def _say_versions() -> None:
    """Once a process, on stderr: the torch-xla and torch here where they are not the tested pair."""
    warning = versions()[2]
    if warning:
        print(f"autotune: warning: {warning}", file=sys.stderr, flush=True)


class SyncTimer(Timer):
    """Host time of one step, synced: the step's graph is launched and waited for at the exit."""

    def __exit__(self, *exc: Any) -> None:
        import torch_xla
        import torch_xla.core.xla_model as xm

        torch_xla.sync()
        xm.wait_device_ops()
        self.t1 = time.perf_counter()


class Xla(Device):
    name = "xla"
    title = "XLA"
    backend = "gloo"  # not used: a run on XLA is one process (SPMD shards within it)
    # AdamW and clipping one tensor at a time: torch's foreach kernels refuse XLA tensors, and XLA
    # fuses the traced step anyway; there is no fused CUDA AdamW to ask for.
    foreach = False
    startup_floor_s = 8.0  # torch and torch-xla import (4.5 s on the 2-core dev machine), the client
    compile_floor_s = 5.0  # the first step's compilation: tiny on the CPU backend takes 2-4 s

    def is_available(self) -> bool:
        try:
            runtime = _runtime()
        except Exception:  # installed but no runtime behind it (no libtpu, a TPU held by another process)
            return False
        return runtime is not None and runtime[1] > 0

    def count(self) -> int:
        return _runtime()[1] if self.is_available() else 0  # type: ignore[index]

    def surely_absent(self) -> bool:
        return importlib.util.find_spec("torch_xla") is None

    def found_in(self, profile: Any | None) -> Found:
        tpu = getattr(profile, "tpu", None)
        if tpu is None or not tpu.present:
            return Found(count=0)
        return Found(count=tpu.count, name=tpu.kind)

    def found_here(self, device: torch.device) -> Found:
        return Found(count=self.count(), name=self.device_name(device))

    def memories(self) -> list[tuple[str, int]]:
        name = self.device_name(None)
        row = _datasheet(name)
        return [(name, row[2])] * self.count() if row is not None else []

    def detect(self, notes: list[str]) -> tuple[Found, str | None]:
        """The XLA devices here (a TPU's generation and count, or XLA's CPU backend; none without
        torch-xla or a chosen runtime) and torch-xla's version, for ``autotune profile``."""
        version, _, warning = versions()
        if version is None:
            return Found(count=0), None
        if warning:
            notes.append(warning)
        if not _env_chosen():
            notes.append("XLA: torch-xla is installed, but no runtime is chosen (set PJRT_DEVICE=CPU or TPU)")
            return Found(count=0), version
        try:
            count = self.count() if self.is_available() else 0
            kind = self.device_name(None)
        except Exception as e:  # torch-xla present but no runtime behind it
            notes.append(f"XLA: unknown, torch-xla did not answer ({why(e)})")
            return Found(count=0), version
        if not count:
            notes.append("XLA: torch-xla's runtime found no device")
            return Found(count=0), version
        if kind == CPU_BACKEND:
            notes.append("XLA: the CPU backend (one device; SPMD over several needs TPUs)")
        return Found(count=count, name=kind), version

    def features(self, compute_capability: tuple[int, int] | None) -> frozenset[str]:
        # bf16 autocast is torch's on the "xla" device type (the base class's), which torch-xla registers.
        return _FEATURES

    def lacks(self, feature: str, found: Found) -> str:
        if feature in _LACKS:
            return f"needs {_LACKS[feature]}, which {found.name or self.words} does not run"
        return super().lacks(feature, found)

    def datasheet_flops(self, name: str, dtype: str) -> float | None:
        row = _datasheet(name)
        return row[1].get(dtype) if row is not None else None

    def torch_device(self, local_rank: int | None = None) -> torch.device:
        if not self.is_available():
            raise UserError("no XLA device is available: install .[xla] (make xla-env) and set PJRT_DEVICE=CPU or TPU")
        if local_rank:
            raise UserError("a run on XLA is one process: its devices are used through SPMD, not torchrun")
        _say_versions()
        import torch_xla

        return torch_xla.device()

    def device_name(self, device: torch.device | None) -> str:
        """The TPU's kind ("TPU v5 lite"), or CPU_BACKEND."""
        return _device_kind()

    def synchronize(self, device: torch.device) -> None:
        import torch_xla
        import torch_xla.core.xla_model as xm

        torch_xla.sync()
        xm.wait_device_ops()

    def mark_step(self, device: torch.device) -> None:
        import torch_xla

        torch_xla.sync()

    def timer(self, device: torch.device) -> Timer:
        return SyncTimer(device)

    def place(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``Module.to`` makes a new Parameter per module for an XLA tensor (torch cannot swap a CPU
        tensor's data for an XLA one in place), so a parameter two modules share (a head tied to
        the embedding) would come out as two, trained apart: each is tied again to the first."""
        sites: dict[int, list[tuple[torch.nn.Module, str]]] = {}
        for module in model.modules():
            for name, param in module._parameters.items():
                if param is not None:
                    sites.setdefault(id(param), []).append((module, name))
        model.to(device)
        for (first, first_name), *others in sites.values():
            for module, name in others:
                module._parameters[name] = first._parameters[first_name]
        return model

    def checkpoint_function(self) -> Callable[..., Any] | None:
        """torch-xla's checkpoint: torch's saves and restores the RNG state of ``torch.<device>``,
        which XLA does not have (an AttributeError at the first checkpointed block); torch-xla's
        uses XLA's RNG and puts an optimization barrier before the recomputation, so that XLA's
        common-subexpression elimination does not fold it back into the forward's. It is the
        reentrant kind only (use_reentrant=True)."""
        from torch_xla.utils.checkpoint import checkpoint

        return checkpoint

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """AdamW's state made now, as its first step would (a step count on the host, two zero
        moments per parameter), and synced: otherwise the first step traces a graph of its own
        that creates them, and compiles twice (9 s each for tiny on the 2-core dev machine)."""
        import torch
        import torch_xla
        from torch.optim.optimizer import _get_scalar_dtype

        if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) or optimizer.state:
            return
        for group in optimizer.param_groups:
            if group.get("capturable") or group.get("fused"):
                return  # their step count lives on the device: left to AdamW
            for p in group["params"]:
                state = {"step": torch.tensor(0.0, dtype=_get_scalar_dtype())}
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                optimizer.state[p] = state
        torch_xla.sync()

    def compilations(self) -> tuple[int, float] | None:
        """torch-xla's CompileTime metric: its samples and their sum (nanoseconds in the metric)."""
        import torch_xla.debug.metrics as met

        data = met.metric_data("CompileTime")
        return (int(data[0]), data[1] / 1e9) if data else (0, 0.0)

    def peak_memory_bytes(self, device: torch.device) -> int:
        """The runtime's peak bytes in use where it reports them (a TPU); the process's peak
        resident set on the CPU backend, whose allocator keeps no statistics."""
        import torch_xla.core.xla_model as xm

        try:
            info = xm.get_memory_info(device)
        except RuntimeError:  # "GetAllocatorStats is not supported" (the CPU backend)
            return super().peak_memory_bytes(device)
        return int(info.get("peak_bytes_used", info.get("bytes_used", 0)))

    def rng_state(self, device: torch.device) -> Any | None:
        import torch_xla.core.xla_model as xm

        return xm.get_rng_state(device)

    def set_rng_state(self, state: Any, device: torch.device) -> None:
        import torch_xla.core.xla_model as xm

        xm.set_rng_state(int(state), device)

    def allow_tf32(self, on: bool) -> None:
        """The fp32 matmul precision (:data:`MATMUL_PRECISION`): XLA has no TF32 switch, it has passes."""
        import torch_xla.backends

        if torch_xla.backends.get_mat_mul_precision() == MATMUL_PRECISION[on]:
            return
        log = logging.getLogger(torch_xla.backends.__name__)
        level = log.level
        log.setLevel(logging.ERROR)  # it warns at every set, "not recommended": here it is a plan's setting
        try:
            torch_xla.backends.set_mat_mul_precision(MATMUL_PRECISION[on])
        finally:
            log.setLevel(level)


def _datasheet(name: str | None) -> tuple[str, dict[str, float], int, float] | None:
    if not name or not name.startswith("TPU"):
        return None
    return next((row for row in DATASHEET if re.search(row[0], name, re.IGNORECASE)), None)


@functools.cache
def _device_kind() -> str:
    """The first device's kind as the runtime names it ("TPU v4"); CPU_BACKEND on XLA's CPU backend."""
    import torch_xla.runtime as xr

    if xr.device_type() != "TPU":
        return CPU_BACKEND if xr.device_type() == "CPU" else f"{xr.device_type()} (XLA)"
    attrs = xr.global_runtime_device_attributes()
    kind = str(attrs[0].get("device_kind") or attrs[0].get("name") or "") if attrs else ""
    if kind.startswith("TPU"):
        return kind
    from torch_xla._internal import tpu

    return f"TPU {tpu.get_tpu_type()}"  # the VM's accelerator type: "v5litepod-8" gives "TPU v5litepod"


DEVICE = Xla()
