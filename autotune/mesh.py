"""The device mesh of a multi-process run: its processes factor as dp × tp × pp.

tp is ``tensor_parallel.degree`` and pp is ``pipeline_parallel.degree`` (1 when the strategy
is off); the processes left over form the data-parallel dimension, dp = world / (tp · pp).
:func:`mesh_shape` checks a plan's degrees on the CPU, before anything is launched (the
executor's ``apply_strategies``, ``autotune run`` before torchrun, and the planner call it),
and names the rule a bad plan breaks in one line. :func:`build_mesh` then makes the torch
DeviceMesh in every process, laid out as torchtitan's ``ParallelDims`` does: dims ("pp", "dp",
"tp") from the outside in, so that the ranks of one tensor-parallel group are neighbours (one
node, NVLink) and pipeline stages, which exchange the least, are farthest apart. Only dims of
size > 1 are made (torchtitan does the same); ``mesh[name]`` is a dim's sub-mesh.

The data loader shards by the dp rank and size, never the global rank: the tp ranks of one
dp group train on the same batch, and so do the stages of one pipeline (the first reads its
inputs, the last its targets).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from autotune.errors import UserError

DATA_PARALLEL = ("ddp", "fsdp2", "zero")
"""Strategies that share the batch over the dp dimension."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelDims:
    """The sizes of the mesh's dims, and this process's place in each."""

    dp: int = 1
    """Data-parallel replicas (or shard groups): processes that train on different batches."""
    tp: int = 1
    """Tensor-parallel degree: processes that split each block's heads and MLP width."""
    pp: int = 1
    """Pipeline stages."""

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp, dp, tp) coordinates of global ``rank`` (tp fastest, as the mesh is laid out)."""
        return rank // (self.dp * self.tp), rank // self.tp % self.dp, rank % self.tp


def _knob(cfg: Any, name: str, default: int) -> Any:
    """A knob of a typed config or of a plain knob dict (as the planner may hold)."""
    if cfg is None:
        return default
    return cfg.get(name, default) if isinstance(cfg, Mapping) else getattr(cfg, name, default)


def mesh_shape(world: int, chosen: Mapping[str, Any], *, workload: Any = None, micro_batch_size: int | None = None) -> tuple[int, int, int]:
    """(dp, tp, pp) of ``world`` processes running the strategies ``chosen`` (name -> typed
    config or knob dict). Raises a one-line UserError naming the broken rule.

    ``workload`` (a Workload, or a model config with n_heads / d_ff / n_layers) adds the checks
    against the model's shape; ``micro_batch_size`` the pipeline's micro-batch split.
    """
    tp = int(_knob(chosen.get("tensor_parallel"), "degree", 2)) if "tensor_parallel" in chosen else 1
    pp = int(_knob(chosen.get("pipeline_parallel"), "degree", 2)) if "pipeline_parallel" in chosen else 1
    if world % (tp * pp):
        raise UserError(f"tp {tp} × pp {pp} = {tp * pp} does not divide {world} processes")
    dp = world // (tp * pp)
    wrappers = [name for name in DATA_PARALLEL if name in chosen]
    if dp > 1 and pp > 1:
        raise UserError(f"pp {pp} × tp {tp} leaves {dp} data-parallel groups of {world} processes: pipeline_parallel takes the whole run (degree {world // tp})")
    if dp > 1 and (tp > 1 or pp > 1) and not wrappers:
        raise UserError(
            f"tp {tp} × pp {pp} leaves {dp} data-parallel groups of {world} processes: add ddp or fsdp2, or make tp × pp = {world}"
        )
    if wrappers and dp == 1 and world > 1:
        raise UserError(f"{wrappers[0]} has a data-parallel group of 1 process: tp {tp} × pp {pp} takes all {world} processes")
    config = getattr(workload, "config", workload)
    if config is not None:
        heads, width, layers = (getattr(config, k, None) for k in ("n_heads", "d_ff", "n_layers"))
        if tp > 1 and heads is not None and heads % tp:
            raise UserError(f"tensor_parallel degree {tp} does not divide the {heads} heads")
        if tp > 1 and width is not None and width % tp:
            raise UserError(f"tensor_parallel degree {tp} does not divide the MLP width {width}")
        if pp > 1 and layers is not None and layers < pp:
            raise UserError(f"pipeline_parallel degree {pp} exceeds the {layers} blocks (a stage needs one at least)")
    micro = int(_knob(chosen.get("pipeline_parallel"), "microbatches", 4))
    if pp > 1 and micro < pp:
        raise UserError(f"pipeline_parallel microbatches {micro} is fewer than its {pp} stages (the pipeline never fills)")
    if pp > 1 and micro_batch_size is not None and micro_batch_size % micro:
        raise UserError(f"pipeline_parallel microbatches {micro} does not divide the micro-batch size {micro_batch_size}")
    return dp, tp, pp


def build_mesh(device_type: str, dims: ParallelDims) -> Any:
    """The DeviceMesh of ``dims`` over the default process group, dims ("pp", "dp", "tp") of
    size > 1 only; None for a run of one process."""
    if dims.world == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    names = tuple(name for name in ("pp", "dp", "tp") if getattr(dims, name) > 1)
    return init_device_mesh(device_type, tuple(getattr(dims, name) for name in names), mesh_dim_names=names)


def sub_mesh(mesh: Any, name: str) -> Any:
    """The sub-mesh of dim ``name``, None when the mesh has no such dim (size 1)."""
    if mesh is None or name not in (mesh.mesh_dim_names or ()):
        return None
    return mesh[name]
