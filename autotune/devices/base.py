"""The device contract: everything the core and the strategies ask of a kind of device.

One kind is one module of this package (``cpu.py``, ``cuda.py``) holding one ``DEVICE``, an
instance of a :class:`Device` subclass; ``autotune.devices`` finds them by discovery, so a new
kind (``xla.py``: TPUs through torch-xla, issue 30) is its module and its test. A Device's ``name`` is the
``torch.device`` type it drives, and the word plans, checkpoints and profiles store.

The base class is the host: every method has the CPU's answer (perf_counter, no sync, resident
set, no device RNG), so a kind overrides only what differs. Nothing here imports torch at module
import: plans are checked, and ``autotune show`` runs, without torch (tests/test_layering.py).

A lazily synced device (XLA: a step is traced, then compiled and run when it is synced) needs
what the eager ones do not: :meth:`Device.mark_step` after each optimizer step (the loop calls
it; a no-op here), a :meth:`Device.timer` that syncs, since its events are not kernels, and
:meth:`Device.place` (tied parameters kept tied), :meth:`Device.prepare_optimizer` (one graph
for every step), :meth:`Device.compilations` and :meth:`Device.checkpoint_function`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

if TYPE_CHECKING:
    import torch

    from autotune.hardware.profile import GpuInfo, GpuLink

T = TypeVar("T")

FEATURES: dict[str, str] = {
    "bf16": "bf16 units (autocast to bfloat16 at full speed)",
    "fp8": "float8 matmuls (in hardware, or emulated where the device says so)",
    "fp16": "fp16 autocast with a dynamic loss scaler",
    "tf32": "TF32 matmuls for fp32 tensors",
    "graphs": "a step captured and replayed as one graph (torch.compile mode reduce-overhead)",
    "pinned_memory": "page-locked host buffers, copied to the device asynchronously",
    "triton": "Triton kernels",
    "fused_attention": "torch SDPA's fused backends (efficient, flash, cuDNN) and FlashAttention",
    "fused_optimizer": "a fused AdamW step (one kernel for all parameters)",
    "inductor": "torch.compile's inductor backend (kernels it generates for the device)",
    "collectives": "torch.distributed's process groups (NCCL or gloo), which DDP, FSDP2, DeepSpeed, tensor and "
    "pipeline parallelism run on",
    "torchao": "torchao's float8 and int8 training tensors",
    "foreach": "torch's multi-tensor kernels (foreach, fused AdamW)",
    "gspmd": "XLA's GSPMD partitioner (torch-xla's SPMD: a mesh of XLA devices, sharding annotations)",
}
"""What a strategy may need of a device (``Needs.features``), with what it means."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Found:
    """Devices of one kind on a machine, as a hardware profile (or torch) reports them."""

    count: int
    """How many (0: none)."""
    name: str | None = None
    """The first one's name, for messages ("NVIDIA H200")."""
    compute_capability: tuple[int, int] | None = None
    """The lowest compute capability among them, where the kind has one."""


@dataclass(kw_only=True, slots=True)
class Inventory:
    """What :meth:`Device.detect_devices` finds of its kind here, as the hardware profile records it."""

    gpus: list[GpuInfo] = field(default_factory=list)
    """One record per device this process can use, by the kind's ordinal."""
    links: list[GpuLink] = field(default_factory=list)
    """One record per pair of them: how they reach each other."""
    driver_version: str | None = None
    """The kind's driver version."""
    runtime_version: str | None = None
    """The highest runtime version the driver supports (the profile's ``cuda_driver_version``)."""


@dataclass(kw_only=True, slots=True)
class Stack:
    """The kind's libraries as torch loads them, and which fused attention paths ran here: the
    profile's ``SoftwareInfo`` fields that belong to a kind of device."""

    runtime: str | None = None
    """The runtime torch was built with (``SoftwareInfo.cuda``)."""
    dnn: str | None = None
    """The deep-learning primitives library torch loads (``SoftwareInfo.cudnn``)."""
    collectives: str | None = None
    """The collectives library torch loads (``SoftwareInfo.nccl``)."""
    sdpa_flash: bool = False
    """torch's FlashAttention SDPA backend ran a small causal bf16 attention on device 0."""
    sdpa_cudnn: bool = False
    """torch's cuDNN SDPA backend ran a small causal bf16 attention on device 0."""
    flash_attn_3: bool = False
    """FlashAttention-3 (flash_attn_interface) imported and ran a small causal bf16 attention on device 0."""


def why(e: BaseException) -> str:
    """An exception in one line: its type and the last line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1]}" if text else type(e).__name__


def ask(notes: list[str], what: str, fn: Callable[[], T]) -> T | None:
    """``fn()``, or None with the reason noted when it raises: one failed probe never stops the profile."""
    try:
        return fn()
    except Exception as e:  # any failure of a probe is reported, not raised
        notes.append(f"{what}: unknown ({why(e)})")
        return None


class Timer:
    """Times one step on the host clock: the work is finished when the call returns."""

    def __init__(self, device: Any) -> None:
        self.device = device

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.t1 = time.perf_counter()

    def finished(self) -> bool:
        """Whether the timed work is done (reading :meth:`seconds` does not wait)."""
        return True

    def seconds(self) -> float:
        return self.t1 - self.t0


class Device:
    """A kind of device, with the host's (CPU's) answers; subclasses override what differs."""

    name: ClassVar[str] = ""
    """The ``torch.device`` type, as plans, checkpoints and profiles write it."""
    title: ClassVar[str] = ""
    """The kind in messages ("CUDA"); the name where empty."""
    accelerator: ClassVar[bool] = True
    """A device beside the host's CPU: the CPU's is the one kind that is not."""
    backend: ClassVar[str] = "gloo"
    """The torch.distributed backend between processes on this kind."""
    measure_lock: ClassVar[str] = ""
    """The name of the lock its trials measure under (``trial.measuring``); the name where empty."""
    startup_floor_s: ClassVar[float] = 3.0
    """The least a run's child takes before its first step on this kind (Python, torch, the model
    built, the device's context): what ``planning.clock.minimum_budget`` counts for each run it cannot
    predict otherwise. Measured: tiny on the 2-core dev CPU 2.4 s; the presets on one H200
    8-15 s; a Qwen3-style HF model of 0.33B parameters on one H100, 23.7 s
    (bench/results/issue26-h100-200s)."""
    foreach: ClassVar[bool] = True
    """torch's multi-tensor (foreach) kernels run on this kind: AdamW, clipping and norms use them."""
    compile_floor_s: ClassVar[float] = 0.0
    """The least the expert prior's first compilation adds on this kind (a CPU search does not
    compile); its confirmation runs pay ``planning.clock.CACHED_WARMUP`` of it."""

    @property
    def words(self) -> str:
        return self.title or self.name

    # ------------------------------------------------------------------ what is here

    def is_available(self) -> bool:
        """Whether this process can use a device of this kind."""
        return False

    def count(self) -> int:
        """Devices of this kind this process can use."""
        return 0

    def surely_absent(self) -> bool:
        """True where this machine certainly has none of this kind, found without importing
        torch (False: ask :meth:`is_available`)."""
        return False

    def found_in(self, profile: Any | None) -> Found:
        """This kind's devices in a HardwareProfile (None: a machine with none)."""
        return Found(count=0)

    def found_here(self, device: torch.device) -> Found:
        """This kind's devices as torch sees them, ``device`` the one this process uses."""
        return Found(count=self.count())

    def memories(self) -> list[tuple[str, int]]:
        """(name, bytes) of each device of this kind here; empty where they share the host's RAM."""
        return []

    def multiprocessors(self, device: torch.device) -> int | None:
        """How many programs of a kernel ``device`` runs at once, one a unit (a GPU's
        multiprocessors), for kernels that size their launch by it; None where it has none."""
        return None

    def detect_devices(self, notes: list[str]) -> Inventory:
        """This kind's devices here, the links between them and the driver, for ``autotune
        profile``; what cannot be found out is left unknown with the reason in ``notes``."""
        return Inventory()

    def probe_software(self, gpus: list[GpuInfo], notes: list[str]) -> Stack:
        """This kind's libraries, and which fused attention paths run on its device 0 (``gpus``:
        what :meth:`detect_devices` found, empty: none to run on), for ``autotune profile``."""
        return Stack()

    # ------------------------------------------------------------------ capabilities

    def features(self, compute_capability: tuple[int, int] | None) -> frozenset[str]:
        """What this kind can do (names of :data:`FEATURES`), at ``compute_capability`` where it has one."""
        return frozenset()

    def lacks(self, feature: str, found: Found) -> str:
        """Why ``found`` cannot give ``feature``: a short reason for ``autotune strategies --explain``."""
        return f"needs {FEATURES.get(feature, feature)}, {found.name or self.words} has none"

    def datasheet_flops(self, name: str, dtype: str) -> float | None:
        """The vendor's dense matmul rate of the device ``name`` for ``dtype``; None when not known."""
        return None

    # ------------------------------------------------------------------ running

    def torch_device(self, local_rank: int | None = None) -> torch.device:
        """The device a process trains on: ``local_rank``'s under torchrun, else the current one;
        made current where the kind has one. A UserError where it is missing."""
        import torch

        return torch.device(self.name)

    def device_name(self, device: torch.device) -> str:
        """The model name of ``device``, as the datasheet table knows it."""
        return self.words

    def synchronize(self, device: torch.device) -> None:
        """Wait until the work queued on ``device`` is done (a lazily synced kind: run it)."""

    def mark_step(self, device: torch.device) -> None:
        """The end of an optimizer step: a lazily synced kind compiles and launches it here."""

    def graph_step_begin(self) -> None:
        """A new step of a captured graph begins (its outputs of the last replay may be overwritten)."""

    def timer(self, device: torch.device) -> Timer:
        """Times one step without a sync per step where the kind can (events), else the host clock."""
        return Timer(device)

    def reset_peak_memory(self, device: torch.device) -> None:
        """Start counting peak memory afresh (the host's resident set cannot be reset)."""

    def peak_memory_bytes(self, device: torch.device) -> int:
        """The most memory allocated on ``device`` since the last reset; the process's peak
        resident set on the host."""
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB

    def place(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``model`` moved to ``device``, its tied parameters still tied (the head and the embedding)."""
        return model.to(device)

    def checkpoint_function(self) -> Callable[..., Any] | None:
        """The activation-checkpoint function for this kind, taking torch.utils.checkpoint's
        arguments; None: torch's own."""
        return None

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once the optimizer is built, before the first step (a lazily traced kind makes
        its state here, so that the first step traces the graph every step runs)."""

    def compilations(self) -> tuple[int, float] | None:
        """(graphs compiled, seconds spent compiling them) in this process so far, where the kind
        compiles its steps itself (XLA); None where it does not."""
        return None

    def empty_cache(self) -> None:
        """Give cached, unused device memory back (to other processes)."""

    def rng_state(self, device: torch.device) -> Any | None:
        """This kind's own random generator state for a checkpoint (None: it draws from torch's)."""
        return None

    def set_rng_state(self, state: Any, device: torch.device) -> None:
        """Restore what :meth:`rng_state` saved."""

    def autocast(self, device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
        """Autocast of matmuls and activations to ``dtype`` on ``device``; None: autocast off
        (inside an outer autocast too)."""
        import torch

        if dtype is None:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=dtype)

    def allow_tf32(self, on: bool) -> None:
        """Let fp32 matmuls and convolutions use TF32 units. torch's two switches are
        process-wide and change nothing on a kind without TF32 units: they are set on every
        kind, so that a process's plain baseline is plain whatever ran before it."""
        import torch

        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on

    def process_group_options(self, device: torch.device) -> dict[str, Any]:
        """Keyword arguments of ``torch.distributed.init_process_group`` beside the backend."""
        return {}

    def make_current(self, device: torch.device) -> None:
        """Make ``device`` this process's current one, where the kind has a current device."""

    def optimizer_kwargs(self) -> dict[str, Any]:
        """AdamW's implementation: fused where the kind has it, else foreach."""
        return {"foreach": self.foreach}
