"""Distributed data parallel (torch DDP): one model replica per process, gradients averaged
by all-reduce in buckets that overlap the backward pass. Every replica takes the same step on
the mean gradient of the global batch, so the maths is the single-process model's up to the
order of the floating-point sum: an exact strategy.

Declared, not implemented yet (issue 6). It needs two or more processes; over NCCL on GPUs
or gloo on the CPU. It excludes the other data-parallel wrappers (FSDP2, ZeRO): each of them
owns the gradients and their reduction.
"""

from __future__ import annotations

from dataclasses import dataclass

from autotune.strategy import Knob, Needs, Strategy

WRAP_AFTER = frozenset(
    {
        # Data-parallel wrappers hold the final parameters and modules, so everything that
        # replaces parameters or wraps blocks comes first (torchtitan: compile, then FSDP).
        "vocab_padding",
        "moe",
        "int8",
        "fp8",
        "triton_kernels",
        "tensor_parallel",
        "pipeline_parallel",
        "activation_checkpoint",
        "compile",
    }
)
"""Strategies every data-parallel wrapper (ddp, fsdp2, zero) is applied after."""


@dataclass(kw_only=True, slots=True)
class DdpConfig:
    bucket_cap_mb: int = 25
    """Gradient bucket size in MiB: a full bucket is all-reduced while the backward goes on."""
    gradient_as_bucket_view: bool = True
    """Gradients are views into the all-reduce buckets, saving one copy of the gradients."""
    static_graph: bool = False
    """Promise that the set of parameters used never changes between steps, which lets DDP
    skip searching for unused ones and reorder buckets after the first step."""

    def __post_init__(self) -> None:
        if self.bucket_cap_mb < 1:
            raise ValueError(f"bucket_cap_mb must be at least 1, got {self.bucket_cap_mb}")


STRATEGY = Strategy(
    name="ddp",
    summary="data parallel: a replica per process, bucketed gradient all-reduce (torch DDP)",
    exact=True,
    config=DdpConfig,
    apply=None,
    needs=Needs(min_devices=2),
    conflicts=frozenset({"fsdp2", "zero"}),
    after=WRAP_AFTER,
    knobs=(
        Knob(name="bucket_cap_mb", low=5, high=200, log=True, integer=True),
        Knob(name="gradient_as_bucket_view", choices=(True, False)),
        Knob(name="static_graph", choices=(True, False)),
    ),
    issue="issue 6 (multi-process strategies)",
)
