"""Fully sharded data parallel, FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters,
gradients and optimizer state are sharded across processes; each block's parameters are
all-gathered just before use and gradients reduce-scattered after. Every process takes the
step of the global batch's mean gradient, with parameters gathered in ``param_dtype`` (mixed
precision, like autocast) and gradients reduced in fp32: an exact strategy.

It shards block by block, then the root (embedding, position table, final norm, tied head),
as torchtitan's ``apply_fsdp`` does, so the workload must declare its blocks; it needs two or
more processes and excludes the other data-parallel wrappers (DDP, ZeRO). ``fully_shard``
changes ``ctx.model`` in place (its parameters become DTensor shards under the same names), so
the model is still what the loop calls. Checkpoints hold the shards: every rank writes and
reads its own through torch.distributed.checkpoint (``ctx.sharded_state``).

Compile composes block by block (compile scope blocks: each block compiled, then sharded,
torchtitan's order); a whole-model compile around the sharded model is refused. Gradients are
reduce-scattered after every micro-batch, also under accumulation (least memory).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from autotune.contract.mesh import sub_mesh
from autotune.contract.strategy import Knob, Needs, Strategy
from autotune.strategies.ddp import WRAPPER_READS

if TYPE_CHECKING:
    from autotune.contract.context import TrainContext
    from autotune.plan import Plan

_NEEDS = Needs(min_devices=2, features=frozenset({"collectives"}), structure=frozenset({"blocks"}))
_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
"""param_dtype -> the name of its torch dtype."""


@dataclass(kw_only=True, slots=True)
class Fsdp2Config:
    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward and gather them again for the
    backward (least memory); False keeps them until the backward (one all-gather fewer)."""
    param_dtype: Literal["bf16", "fp32"] = "bf16"
    """dtype parameters are gathered and computed in (MixedPrecisionPolicy); gradients are
    reduced in fp32 either way."""

    def needs(self) -> Needs:
        """bf16 parameters need bf16 tensor cores on a GPU."""
        bf16 = frozenset({"bf16"}) if self.param_dtype == "bf16" else frozenset()
        return dataclasses.replace(_NEEDS, features=_NEEDS.features | bf16)


def apply_fsdp2(ctx: TrainContext, cfg: Fsdp2Config) -> None:
    ctx.check_needs(
        STRATEGY, cfg, "launch the plan with 2+ processes (launch.nproc_per_node) and declare the model's blocks"
    )
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from autotune.workloads.adapter import adapter_for

    # Over the dp dim of the run's mesh: beside tensor parallel that is the 2D layout (FSDP
    # across pairs, TP within one, torchtitan's); alone, the whole run.
    mesh = sub_mesh(ctx.mesh, "dp") or init_device_mesh(ctx.device.type, (ctx.world_size,), mesh_dim_names=("dp",))
    policy = MixedPrecisionPolicy(param_dtype=getattr(torch, _DTYPES[cfg.param_dtype]), reduce_dtype=torch.float32)
    blocks = adapter_for(ctx.model).blocks()
    for i, block in enumerate(blocks):
        # The backward starts with the last block: resharding it after the forward would
        # only gather it again at once (torchtitan's default policy).
        reshard = cfg.reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    # The root keeps its parameters gathered between forward and backward (FSDP2 does so for
    # the root whatever is asked: the head is the first thing the backward needs).
    fully_shard(ctx.model, mesh=mesh, mp_policy=policy)
    ctx.sharded_state = True
    ctx.notes.append(
        f"fsdp2 over {ctx.world_size} processes, {cfg.param_dtype} gathers, "
        f"reshard after forward {cfg.reshard_after_forward}"
    )


def export_accelerate(cfg: Fsdp2Config, plan: Plan) -> dict[str, Any]:
    """Accelerate's FSDP plugin, version 2, wrapping each block (``param_dtype`` is not among its
    settings). An Accelerate config states activation checkpointing only as this plugin's option."""
    return {
        "distributed_type": "FSDP",
        "fsdp_config": {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_reshard_after_forward": cfg.reshard_after_forward,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_activation_checkpointing": "activation_checkpoint" in plan.strategy_configs(),
            "fsdp_offload_params": False,
            "fsdp_cpu_ram_efficient_loading": False,
        },
    }


def fsdp2_cost(cfg: Fsdp2Config, terms: Any) -> None:
    """The cost model's term (``contract.cost.CostTerms``): weights, gradients and moments sharded
    over dp (one block gathered at a time, ignored)."""
    terms.shard(3)


STRATEGY = Strategy(
    name="fsdp2",
    phase="wrap_model",
    summary="fully sharded data parallel per block (FSDP2 fully_shard), bf16 or fp32 gathers",
    exact=True,
    config=Fsdp2Config,
    apply=apply_fsdp2,
    mesh_dim="dp",
    takes_model=True,
    reads=WRAPPER_READS,
    needs=_NEEDS,
    conflicts=frozenset({"ddp", "zero"}),
    cost=fsdp2_cost,
    exports={"accelerate": export_accelerate},
    knobs=(
        Knob(name="reshard_after_forward", choices=(True, False)),
        Knob(name="param_dtype", choices=("bf16", "fp32")),
    ),
)
