"""The state that strategies transform before training starts.

Strategies never reach into the training loop; they change this context (wrap the model,
set the autocast dtype, the accumulation count, optimizer options), and the step engine that
``autotune.runtime.trainer`` trains through (``autotune.contract.engine``) reads it. Fields default to the plain
baseline. A strategy that owns backward and the optimizer step (DeepSpeed's ZeRO; a pipeline
schedule) sets ``engine``, the builder of its own step engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autotune import devices, schema
from autotune.contract.mesh import ParallelDims
from autotune.contract.strategy import Facts, Strategy, unmet_needs
from autotune.errors import UserError
from autotune.workloads import Workload

if TYPE_CHECKING:
    from autotune.contract.engine import StepEngine
    from autotune.plan import TrainSpec

MicroBatch = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
"""The current step's micro-batch ``i`` as (inputs, targets), on the device."""


@dataclass(kw_only=True, slots=True)
class TrainContext:
    workload: Workload
    """What is being trained."""
    device: torch.device
    """Where this process trains."""
    model: nn.Module
    """The module whose state is trained and saved (never a compiled wrapper)."""
    forward: nn.Module | Any = None
    """What the loop calls: ``model`` itself or a wrapper (compiled, DDP...). Defaults to model."""
    autocast_dtype: torch.dtype | None = None
    """Autocast dtype for the forward pass; None for full precision."""
    grad_scaler: bool = False
    """Scale the loss (fp16 needs it to keep small gradients)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for AdamW (fused=..., foreach=...)."""
    loader_options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the batch loader (prefetch, pin_memory...)."""
    rank: int = 0
    """This process's rank in the data-parallel dimension (what the loader shards by)."""
    world_size: int = 1
    """Data-parallel size: groups that train on different parts of the global batch."""
    dims: ParallelDims = field(default_factory=ParallelDims)
    """The run's dp × tp × pp factorisation (autotune.contract.mesh); dims.dp is ``world_size``."""
    mesh: Any = None
    """The DeviceMesh of ``dims`` (None for one process); ``autotune.contract.mesh.sub_mesh(mesh,
    "dp")`` is the data-parallel sub-mesh that ddp / fsdp2 take next to tensor parallel."""
    compile_options: dict[str, Any] | None = None
    """torch.compile's keyword arguments when the whole forward was compiled: a wrapper
    applied later (DDP) compiles around itself with them instead."""
    grad_sync: Callable[[bool], AbstractContextManager[Any]] | None = None
    """Context of one micro-batch's forward and backward, given whether it is the step's
    last: a data-parallel wrapper reduces gradients on the last one only (DDP's no_sync).
    None: always reduce."""
    clip_grads: Callable[[list[torch.Tensor], float], torch.Tensor] | None = None
    """Clips the gradients of the given parameters to a global norm and returns the norm, for
    the default loop (``engine.LoopEngine``), where the norm spans parameters spread over
    other groups (expert parallel: each rank holds other experts); None:
    ``autotune.contract.grads.clip_grad_norm_``."""
    sharded_state: bool = False
    """Model and optimizer state are sharded over the ranks (FSDP2, tp, pp, ZeRO): checkpoints
    are written and read by every rank, through the step engine's ``save`` / ``load``."""
    spec: TrainSpec | None = None
    """The plan's training settings (micro-batch, AdamW, clipping), which the step engine is
    built from; the Trainer sets it."""
    engine: Callable[[TrainContext], StepEngine] | None = None
    """A strategy that owns forward, backward and the optimizer step (a pipeline schedule,
    DeepSpeed) sets the builder of its step engine, which the Trainer calls once every strategy
    is applied; None: the default loop (``autotune.contract.engine.LoopEngine``)."""
    notes: list[str] = field(default_factory=list)
    """What the strategies did, for the run log."""
    metrics: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)
    """Step metrics a strategy reports (moe: ``moe_dropped``): name -> a reader of the last
    step's value as a 0-d tensor on the device. The Trainer sums them without a sync and
    averages them where it already waits (a trial's end, a run's log flush)."""

    def __post_init__(self) -> None:
        if self.forward is None:
            self.forward = self.model

    @property
    def processes(self) -> int:
        """Processes in the run: dp × tp × pp."""
        return self.world_size * self.dims.tp * self.dims.pp

    def facts(self) -> Facts:
        """This process's device and workload, as a strategy's needs are checked against."""
        facts = Facts.of(None, self.workload, processes=self.processes)
        kind = devices.of(self.device)
        if not kind.accelerator:
            return facts
        found = kind.found_here(self.device)
        return dataclasses.replace(
            facts,
            device=kind.name,
            accelerators=found.count,
            compute_capability=found.compute_capability,
            gpu_name=found.name,
        )

    def check_needs(self, strategy: Strategy, cfg: Any, workaround: str) -> None:
        """Refuse setting ``cfg`` of ``strategy`` with a one-line UserError when this device
        or workload lacks what the setting needs; ``workaround`` says what to do instead.

        A config whose settings need more than ``strategy.needs`` (fp16 needs CUDA) says so
        in a ``needs()`` method returning the needs of those settings, its strategy's included.
        """
        needs = cfg.needs() if hasattr(cfg, "needs") else strategy.needs
        why = unmet_needs(dataclasses.replace(strategy, needs=needs), self.facts())
        if why:
            raise UserError(
                f"strategy {strategy.name} {schema.to_dict(cfg)} cannot run here: {'; '.join(why)} ({workaround})"
            )

    def sync_context(self, last_micro: bool) -> AbstractContextManager[Any]:
        """Enter around each micro-batch's forward and backward (see ``grad_sync``)."""
        return contextlib.nullcontext() if self.grad_sync is None else self.grad_sync(last_micro)

    def autocast(self) -> Any:
        return devices.of(self.device).autocast(self.device, self.autocast_dtype)
