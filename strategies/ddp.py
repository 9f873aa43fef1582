"""Distributed data parallel (torch DDP): one model replica per process, gradients averaged
by all-reduce in buckets that overlap the backward pass. Every replica takes the same step on
the mean gradient of the global batch, so the maths is the single-process model's up to the
order of the floating-point sum: an exact strategy.

It needs two or more processes; over NCCL on GPUs or gloo on the CPU. It excludes the other
data-parallel wrappers (FSDP2, ZeRO): each of them owns the gradients and their reduction.

DDP wraps ``ctx.model`` (whose state dict, with the plain model's keys, is what checkpoints
save) and becomes ``ctx.forward``. With gradient accumulation the gradients are all-reduced
on the last micro-batch of a step only (``no_sync`` on the others), except under
``static_graph``, where PyTorch's no_sync is broken (see ``apply_ddp``). With compile on the whole
model, the DDP module is what gets compiled, ``torch.compile(DDP(model))``: dynamo then sees
DDP and its DDPOptimizer cuts the graph at the gradient-bucket boundaries, so each bucket's
all-reduce overlaps the rest of the backward (torch/_dynamo/backends/distributed.py; the
``optimize_ddp`` setting in torch/_dynamo/config.py). DDP around the compiled module would
see one backward graph whose gradients are all ready at its end: no overlap. Compiling block
by block needs nothing here (torchtitan's ``apply_compile`` per block, then ``apply_ddp``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from autotune import devices
from autotune.contract.strategy import NOTHING_TO_SET, Knob, Needs, Part, Prior, PriorFacts, Strategy
from autotune.errors import UserError

if TYPE_CHECKING:
    from autotune.contract.context import TrainContext

WRAPPER_READS: frozenset[Part] = frozenset(
    {"embedding", "head", "mlp", "linears", "norms", "blocks", "placement", "stages", "loss"}
)
"""What a data-parallel wrapper (ddp, fsdp2) needs final: it holds the final parameters and
modules, so everything that replaces parameters, shards them or wraps blocks comes first
(torchtitan: compile, then FSDP); so does the loss its forward computes (a fused head + loss)."""


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
        if not 1 <= self.bucket_cap_mb <= 4096:
            raise ValueError(f"bucket_cap_mb must be from 1 to 4096, got {self.bucket_cap_mb}")


def apply_ddp(ctx: TrainContext, cfg: DdpConfig) -> None:
    import torch
    from torch.nn.parallel import DistributedDataParallel

    ctx.check_needs(STRATEGY, cfg, "launch the plan with 2+ processes: launch.nproc_per_node")
    if ctx.forward is not ctx.model and ctx.compile_options is None:
        raise UserError("ddp wraps the model itself, but another strategy already wrapped its forward")
    ddp = DistributedDataParallel(
        ctx.model,
        device_ids=[ctx.device.index] if devices.of(ctx.device).accelerator else None,
        bucket_cap_mb=cfg.bucket_cap_mb,
        gradient_as_bucket_view=cfg.gradient_as_bucket_view,
        static_graph=cfg.static_graph,
    )
    # Whole-model compile: compile DDP(model), not DDP(compiled model) (see the docstring).
    ctx.forward = ddp if ctx.compile_options is None else torch.compile(ddp, **ctx.compile_options)
    if not cfg.static_graph:
        # Under accumulation, all-reduce the gradients on a step's last micro-batch only.
        # Not with static_graph: no_sync there fails its first backward, and once past that
        # stops reducing at all (pytorch/pytorch#143580, fix pending in #187732); reducing
        # every micro-batch is correct, it costs a reduction per micro-batch.
        ctx.grad_sync = lambda last: contextlib.nullcontext() if last else ddp.no_sync()
    ctx.notes.append(f"ddp over {ctx.world_size} processes, buckets {cfg.bucket_cap_mb} MiB")


def ddp_prior(facts: PriorFacts) -> Prior:
    """The layout that pays first over several processes at these sizes, at its defaults."""
    return Prior()


STRATEGY = Strategy(
    name="ddp",
    phase="wrap_model",
    summary="data parallel: a replica per process, bucketed gradient all-reduce (torch DDP)",
    exact=True,
    config=DdpConfig,
    apply=apply_ddp,
    mesh_dim="dp",
    reads=WRAPPER_READS,
    needs=Needs(min_devices=2, features=frozenset({"collectives"})),
    conflicts=frozenset({"fsdp2", "zero"}),
    knobs=(
        Knob(name="bucket_cap_mb", low=5, high=200, log=True, integer=True),
        Knob(name="gradient_as_bucket_view", choices=(True, False)),
        Knob(name="static_graph", choices=(True, False)),
    ),
    prior=ddp_prior,
    # Accelerate's default for several processes is DDP (MULTI_GPU / MULTI_CPU); its knobs are the script's.
    exports={"accelerate": NOTHING_TO_SET},
)
