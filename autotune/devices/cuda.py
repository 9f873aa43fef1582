"""NVIDIA GPUs through CUDA: events for timing, NCCL between processes, fused AdamW; for
``autotune profile``, the GPUs torch can use with NVML's fields (``_nvml.py``) and the links
between them (``_nvlink.py``), the CUDA libraries torch loads and the fused attention paths
that run on GPU 0."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from autotune.devices.base import Device, Found, Inventory, Stack, Timer, ask, why
from autotune.devices.cpu import EAGER
from autotune.errors import UserError

if TYPE_CHECKING:
    import torch

    from autotune.hardware.profile import GpuInfo

# Dense (no sparsity) rates per device from the vendors' datasheets, first match wins. The SXM
# H100 and the H200 share one chip; nvidia-smi names the SXM H100 "NVIDIA H100 80GB HBM3".
_HOPPER_SXM = {"fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp8": 1978.9e12}
DATASHEET: tuple[tuple[str, dict[str, float]], ...] = (
    (r"\bH200\b(?!.*\bNVL\b)", _HOPPER_SXM),
    (r"\bH100\b.*\b(HBM3|SXM)", _HOPPER_SXM),
    (r"\bH100\b.*\bPCIe\b", {"fp32": 51.2e12, "tf32": 378e12, "bf16": 756e12, "fp8": 1513e12}),
    (r"\bA100\b", {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12}),
    (r"\bL40S\b", {"fp32": 91.6e12, "tf32": 183e12, "bf16": 362e12, "fp8": 733e12}),
    (r"\bL4\b", {"fp32": 30.3e12, "tf32": 60e12, "bf16": 121e12, "fp8": 242e12}),
)
"""(pattern of the GPU's name, its dense matmul rate by dtype in flop/s)."""

BF16_CAPABILITY = (8, 0)
"""Lowest compute capability with bf16 tensor cores (Ampere)."""
FP8_CAPABILITY = (8, 9)
"""Lowest compute capability with fp8 tensor cores (Ada, Hopper)."""
ALWAYS = EAGER | {"fp16", "tf32", "graphs", "pinned_memory", "triton", "fused_attention", "fused_optimizer"}
"""What every CUDA GPU this project runs on can do, whatever its compute capability."""


class EventTimer(Timer):
    """Device time between two CUDA events on the current stream: no sync per step."""

    def __enter__(self) -> EventTimer:
        import torch

        self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.start.record()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.end.record()

    def finished(self) -> bool:
        return bool(self.end.query())

    def seconds(self) -> float:
        return self.start.elapsed_time(self.end) / 1e3


class Cuda(Device):
    name = "cuda"
    title = "CUDA"
    backend = "nccl"
    startup_floor_s = 15.0
    compile_floor_s = 30.0

    def is_available(self) -> bool:
        import torch

        return torch.cuda.is_available()

    def count(self) -> int:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0

    def surely_absent(self) -> bool:
        """NVML says for certain that no NVIDIA GPU is here: no driver library, no loaded
        driver, or no device (anything else asks torch, which knows CUDA_VISIBLE_DEVICES)."""
        try:
            import pynvml
        except ImportError:
            return False
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            absent = (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
            return getattr(e, "value", None) in absent
        try:
            return pynvml.nvmlDeviceGetCount() == 0
        except pynvml.NVMLError:
            return False
        finally:
            pynvml.nvmlShutdown()

    def found_in(self, profile: Any | None) -> Found:
        gpus = list(profile.gpus) if profile is not None else []
        caps = [capability(g.capability) for g in gpus]
        return Found(
            count=len(gpus), name=gpus[0].name if gpus else None, compute_capability=min(caps) if caps else None
        )

    def found_here(self, device: torch.device) -> Found:
        import torch

        return Found(
            count=torch.cuda.device_count(),
            name=torch.cuda.get_device_name(device),
            compute_capability=tuple(torch.cuda.get_device_capability(device)),  # type: ignore[arg-type]
        )

    def memories(self) -> list[tuple[str, int]]:
        import torch

        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        return [(p.name, int(p.total_memory)) for p in props]

    def multiprocessors(self, device: torch.device) -> int | None:
        import torch

        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _MULTIPROCESSORS:
            _MULTIPROCESSORS[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return _MULTIPROCESSORS[index]

    def detect_devices(self, notes: list[str]) -> Inventory:
        """The GPUs torch can use (by CUDA ordinal), NVML's fields of each where NVML matches
        them, the NVLink/PCIe topology of each pair, and the driver's versions."""
        from autotune.devices import _nvlink, _nvml

        with _nvml.session(notes) as nv:
            torch_gpus = _torch_gpus(notes)
            handles = [
                ask(notes, f"gpu {index} NVML fields", lambda: _nvml.handle(nv, index, props, len(torch_gpus)))
                if nv is not None
                else None
                for index, props in torch_gpus
            ]
            gpus = [_gpu_info(nv, h, index, props, notes) for (index, props), h in zip(torch_gpus, handles)]
            links = _nvlink.links(nv, handles, notes)
            if nv is None:
                return Inventory(gpus=gpus, links=links)
            _nvml.note_unusable_gpus(nv, len(gpus), notes)
            return Inventory(
                gpus=gpus,
                links=links,
                driver_version=_nvml.driver_version(nv, notes),
                runtime_version=_nvml.runtime_version(nv, notes),
            )

    def probe_software(self, gpus: list[GpuInfo], notes: list[str]) -> Stack:
        """CUDA, cuDNN and NCCL as torch loads them; SDPA's flash and cuDNN backends and
        FlashAttention-3 each run once on GPU 0 where there is one."""
        import torch

        nccl = ask(notes, "NCCL version", lambda: ".".join(map(str, torch.cuda.nccl.version()))) if gpus else None
        dnn = ask(notes, "cuDNN version", lambda: cudnn_version(torch.backends.cudnn.version()))
        return Stack(
            runtime=torch.version.cuda,
            dnn=dnn,
            collectives=nccl,
            sdpa_flash=bool(gpus) and _runs(notes, "torch SDPA flash backend", lambda: _sdpa("FLASH_ATTENTION")),
            sdpa_cudnn=bool(gpus) and _runs(notes, "torch SDPA cuDNN backend", lambda: _sdpa("CUDNN_ATTENTION")),
            flash_attn_3=_flash_attn_3(gpus, notes),
        )

    def features(self, compute_capability: tuple[int, int] | None) -> frozenset[str]:
        cc = compute_capability or (0, 0)
        return ALWAYS | {f for f, low in (("bf16", BF16_CAPABILITY), ("fp8", FP8_CAPABILITY)) if cc >= low}

    def lacks(self, feature: str, found: Found) -> str:
        if feature == "bf16":
            return f"needs bf16 tensor cores, {found.name} has none"
        if feature == "fp8":
            return f"needs fp8 tensor cores (compute capability 8.9+), {found.name} has none"
        return super().lacks(feature, found)

    def datasheet_flops(self, name: str, dtype: str) -> float | None:
        for pattern, rates in DATASHEET:
            if re.search(pattern, name):
                return rates.get(dtype)
        return None

    def torch_device(self, local_rank: int | None = None) -> torch.device:
        import torch

        if not torch.cuda.is_available():
            raise UserError("the plan asks for CUDA, but no CUDA device is available")
        if local_rank is None:
            return torch.device("cuda", torch.cuda.current_device())
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}")
        return torch.device("cuda", local_rank)

    def make_current(self, device: torch.device) -> None:
        import torch

        torch.cuda.set_device(device)

    def process_group_options(self, device: torch.device) -> dict[str, Any]:
        return {"device_id": device}  # NCCL binds its communicator to this GPU up front

    def device_name(self, device: torch.device) -> str:
        import torch

        return torch.cuda.get_device_name(device)

    def synchronize(self, device: torch.device) -> None:
        import torch

        torch.cuda.synchronize(device)

    def graph_step_begin(self) -> None:
        import torch

        torch.compiler.cudagraph_mark_step_begin()

    def timer(self, device: torch.device) -> Timer:
        return EventTimer(device)

    def reset_peak_memory(self, device: torch.device) -> None:
        import torch

        torch.cuda.reset_peak_memory_stats(device)

    def peak_memory_bytes(self, device: torch.device) -> int:
        import torch

        return int(torch.cuda.max_memory_allocated(device))

    def empty_cache(self) -> None:
        import torch

        torch.cuda.empty_cache()

    def rng_state(self, device: torch.device) -> Any | None:
        import torch

        return torch.cuda.get_rng_state(device)

    def set_rng_state(self, state: Any, device: torch.device) -> None:
        import torch

        torch.cuda.set_rng_state(state, device)

    def optimizer_kwargs(self) -> dict[str, Any]:
        return {"fused": True}


_MULTIPROCESSORS: dict[int, int] = {}
"""Multiprocessors of each device index, read once (kernels ask on every launch)."""


def _torch_gpus(notes: list[str]) -> list[tuple[int, Any]]:
    """(CUDA ordinal, torch device properties) of each GPU torch can use."""
    import torch

    try:
        if not torch.cuda.is_available():
            return []
        return [(i, torch.cuda.get_device_properties(i)) for i in range(torch.cuda.device_count())]
    except Exception as e:  # a broken CUDA install: report, carry on as a CPU machine
        notes.append(f"CUDA GPUs: unknown, torch cannot query them ({why(e)})")
        return []


def _gpu_info(nv: Any | None, handle: Any | None, index: int, props: Any, notes: list[str]) -> GpuInfo:
    from autotune.devices import _nvml
    from autotune.hardware.profile import GpuInfo

    cc = (props.major, props.minor)
    info = GpuInfo(
        index=index,
        name=props.name,
        uuid=_nvml.torch_uuid(props),
        memory_bytes=props.total_memory,
        capability=f"{props.major}.{props.minor}",
        sm_count=props.multi_processor_count,
        tf32=cc >= BF16_CAPABILITY,  # TF32 came with bf16, in Ampere
        bf16=cc >= BF16_CAPABILITY,
        fp8=cc >= FP8_CAPABILITY,
        max_sm_clock_mhz=None,
        max_memory_clock_mhz=None,
        power_limit_w=None,
        pcie_generation=None,
        pcie_width=None,
        numa_node=None,
        cpu_affinity=None,
    )
    if handle is not None:
        _nvml.fill(info, nv, handle, notes)
    return info


def _runs(notes: list[str], what: str, fn: Callable[[], object]) -> bool:
    try:
        fn()
        return True
    except Exception as e:  # not usable here: say why
        notes.append(f"{what}: not usable ({why(e)})")
        return False


def cudnn_version(v: int | None) -> str | None:
    """cuDNN 9 encodes 9.10.2 as 91002; cuDNN 8 encodes 8.9.7 as 8907."""
    if v is None:
        return None
    if v >= 90000:
        return f"{v // 10000}.{v % 10000 // 100}.{v % 100}"
    return f"{v // 1000}.{v % 1000 // 100}.{v % 100}"


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


def capability(text: str) -> tuple[int, int]:
    """A compute capability as a profile writes it ("9.0") -> (9, 0)."""
    major, minor = (int(x) for x in text.split("."))
    return major, minor


DEVICE = Cuda()
