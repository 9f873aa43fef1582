"""Data parallel over several XLA devices (TPU chips) in one process, through torch-xla's SPMD
partitioner: a mesh of every device with a data axis ``fsdp`` (and a ``model`` axis of 1), the
batch sharded over it, and the parameters either sharded over it too (FSDPv2,
``SpmdFullyShardedDataParallel``: each parameter's first dimension split across the devices, as
ZeRO-3 does) or replicated (plain data parallel). XLA's partitioner inserts the collectives;
the maths is the plain model's on the whole batch: an exact strategy.

The micro-batch is the global one, split over the devices: it must divide by their count.

Needs 2+ XLA devices (a TPU VM). XLA's CPU backend has one (pytorch/xla#8063), so this is built
and tested for its sharding annotations (the specs below, and a step on a one-device mesh in
tests/xla/) but has not run over several devices yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autotune import devices
from autotune.contract.strategy import Knob, Needs, Strategy
from autotune.errors import UserError

if TYPE_CHECKING:
    from autotune.contract.context import TrainContext

AXES = ("fsdp", "model")
"""The mesh's axes: data (and parameter shards) over every device, a model axis of one."""
BATCH_SPEC = ("fsdp", None)
"""Inputs and targets (B, T): the batch split over the data axis."""


@dataclass(kw_only=True, slots=True)
class SpmdConfig:
    shard_params: bool = True
    """FSDPv2: each parameter's first dimension split over the devices (gathered where used);
    False: parameters replicated on every device (plain data parallel)."""


def mesh_shape(count: int) -> tuple[int, int]:
    """The mesh of ``count`` devices over :data:`AXES`."""
    return (count, 1)


def param_spec(shape: tuple[int, ...], shard: bool) -> tuple[str | None, ...]:
    """The partition spec of a parameter of ``shape``: FSDPv2's (its first dimension over
    ``fsdp``; a scalar replicated), or every dimension replicated."""
    spec: list[str | None] = [None] * len(shape)
    if shard and spec:
        spec[0] = "fsdp"
    return tuple(spec)


def check_batch(micro_batch: int, count: int) -> None:
    """The micro-batch splits evenly over the devices (static shapes on every one)."""
    if micro_batch % count:
        raise UserError(f"spmd splits the micro-batch over {count} XLA devices: {micro_batch} does not divide by it")


class ShardedInputs:
    """The forward with its inputs and targets marked as split over the data axis."""

    def __init__(self, forward: Any, mesh: Any) -> None:
        self.forward, self.mesh = forward, mesh

    def __call__(self, x: Any, y: Any) -> Any:
        import torch_xla.distributed.spmd as xs

        xs.mark_sharding(x, self.mesh, BATCH_SPEC)
        xs.mark_sharding(y, self.mesh, BATCH_SPEC)
        return self.forward(x, y)


def shard(ctx: TrainContext, cfg: SpmdConfig, count: int) -> Any:
    """Annotate ``ctx``'s model and batches for a mesh of ``count`` devices; returns the mesh.
    SPMD mode (``xr.use_spmd``) must be on before any XLA tensor is made."""
    import numpy as np
    import torch_xla.distributed.spmd as xs

    mesh = xs.Mesh(np.arange(count), mesh_shape(count), AXES)
    xs.set_global_mesh(mesh)
    if cfg.shard_params:
        from torch_xla.experimental.spmd_fully_sharded_data_parallel import SpmdFullyShardedDataParallel

        # The forward returns the loss, a scalar: nothing of it to shard.
        ctx.forward = SpmdFullyShardedDataParallel(ctx.forward, mesh=mesh, shard_output=lambda output, mesh: None)
    else:
        for p in ctx.model.parameters():
            xs.mark_sharding(p, mesh, param_spec(tuple(p.shape), shard=False))
    ctx.forward = ShardedInputs(ctx.forward, mesh)
    return mesh


def apply_spmd(ctx: TrainContext, cfg: SpmdConfig) -> None:
    kind = devices.of(ctx.device)
    if "gspmd" not in kind.features(None):
        raise UserError(f"strategy spmd needs an XLA device (launch.device xla), this run trains on {kind.words}")
    count = kind.count()
    if count < 2:
        raise UserError(f"strategy spmd shards over 2+ XLA devices, here there is {count} (XLA's CPU backend has one)")
    assert ctx.spec is not None
    check_batch(ctx.spec.micro_batch_size, count)
    import torch_xla.runtime as xr

    xr.use_spmd()
    shard(ctx, cfg, count)
    ctx.notes.append(f"spmd over {count} XLA devices, parameters {'sharded' if cfg.shard_params else 'replicated'}")


STRATEGY = Strategy(
    name="spmd",
    phase="wrap_model",
    summary="data parallel over XLA devices through torch-xla's SPMD (FSDPv2 or replicated parameters)",
    exact=True,
    config=SpmdConfig,
    apply=apply_spmd,
    needs=Needs(min_devices=2, features=frozenset({"gspmd"})),
    takes_model=True,
    knobs=(Knob(name="shard_params", choices=(True, False)),),
)
