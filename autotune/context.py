"""The state that strategies transform before training starts.

Strategies never reach into the training loop; they change this context (wrap the model,
set the autocast dtype, the accumulation count, optimizer options), and the loop in
``autotune.train`` reads it. Fields default to the plain baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autotune.workloads import Workload


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
    """This process's rank in the data-parallel group."""
    world_size: int = 1
    """Processes that share the global batch."""
    notes: list[str] = field(default_factory=list)
    """What the strategies did, for the run log."""

    def __post_init__(self) -> None:
        if self.forward is None:
            self.forward = self.model

    def autocast(self) -> Any:
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)
