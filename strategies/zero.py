"""ZeRO through DeepSpeed's own engine: optimizer state (stage 1), gradients too (stage 2) or
parameters too (stage 3) sharded across processes, the optimizer state and step optionally
offloaded to the CPU (ZeRO-Offload), and the parameters too under stage 3 (ZeRO-Infinity's
CPU tier). Each process still takes the step of the global batch's mean gradient, clipped by
its global norm, with the plan's AdamW: an exact strategy.

What runs where. ``apply_zero`` generates DeepSpeed's JSON config from the plan
(:func:`ds_config`: micro-batch, accumulation, clipping, the ZeRO section, AdamW with the
plan's betas and weight decay) and builds the engine with ``deepspeed.initialize`` inside the
process group that ``autotune.distributed.join`` made (DeepSpeed wraps it: NCCL on CUDA, gloo
on DeepSpeed's CPU accelerator, chosen with ``DS_ACCELERATOR=cpu`` for a CPU run only). The
config is kept in ``ctx.notes`` and written into every checkpoint as ``deepspeed_config.json``.
The engine owns backward and the optimizer step, so the strategy hands the executor its own
step engine (``ctx.engine``: ``_zero_impl.DeepSpeedStep``): per micro-batch the forward under
the loop's autocast,
``engine.backward(loss)`` (which divides by the accumulation count) and ``engine.step()``
(which reduces, clips, steps and zeroes the gradients at the accumulation boundary only); the
schedule's learning rate is set on the engine's optimizer's param groups before each step.

Precision. DeepSpeed keeps fp32 weights and the forward runs under the loop's
``torch.autocast`` exactly as the plain run's does, so bf16 here is the plain bf16 run's maths.
DeepSpeed's own ``bf16`` mode was not taken: it casts the whole model to bf16 (norms, softmax
and the loss included, not only matmul inputs), and its ``torch_autocast`` mode reduces
gradients in bf16, both further from the baseline than rounding of the matmul inputs. The
price: gradients are reduced and stage-3 parameters gathered in fp32, twice bf16's bytes.
fp16 is refused: it needs a loss scaler, and DeepSpeed's own dynamic scaler is another
scaler than the plain run's GradScaler.

The optimizer. AdamW groups as the executor's (weight decay on matrices only) go to
DeepSpeed as ``model_parameters``; the config's optimizer is ``AdamW`` with ``torch_adam``
(torch.optim.AdamW, foreach: no extension to build) or, under optimizer offload,
DeepSpeedCPUAdam (the C++ CPU Adam that ZeRO-Offload is made for, built on first use). So the
``optimizer`` strategy (which picks torch's implementation) conflicts.

Checkpoints are DeepSpeed's own ``save_checkpoint`` / ``load_checkpoint`` (every rank writes
its partition) in the executor's ``step_XXXXXXXX/`` directories (``ctx.sharded_state``, through
the step engine's ``save``), beside ``meta.pt`` with the step and RNG state; DeepSpeed's
``zero_to_fp32.py``, copied there, makes one fp32 state dict of them.

It needs the deepspeed package and two or more processes (CUDA or the CPU). DeepSpeed's
engine owns the model, the gradients and the optimizer step, so it excludes the torch
data-parallel wrappers (DDP, FSDP2) and combines with neither torch's DTensor tensor
parallelism nor ``torch.distributed.pipelining`` (DeepSpeed's own pipeline engine takes
stage 1 at most); a whole-model compile is refused by compile's ``check_with`` (zero
``takes_model``). It is applied last: the engine is built from the accumulation count.

On the CPU, DeepSpeed's CPU accelerator builds a C++ shared-memory op at its first start
(about 20 s on 2 cores, cached afterwards in ~/.cache/torch_extensions), and optimizer offload
builds DeepSpeedCPUAdam the same way (about 30 s).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from autotune.contract.strategy import Knob, Needs, Strategy
from autotune.errors import UserError

if TYPE_CHECKING:
    import torch

    from autotune.contract.context import TrainContext
    from autotune.plan import Plan

TAG = "deepspeed"
"""Sub-directory of a checkpoint directory that DeepSpeed's files go into."""


@dataclass(kw_only=True, slots=True)
class ZeroConfig:
    stage: Literal[1, 2, 3] = 2
    """What is sharded: 1 optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """Keep the optimizer state and run the optimizer step on the CPU (ZeRO-Offload)."""
    offload_params: bool = False
    """Keep parameters in CPU memory between uses (ZeRO-Infinity); stage 3 only."""

    def __post_init__(self) -> None:
        if self.offload_params and self.stage != 3:
            raise ValueError(f"offload_params needs stage 3 (only stage 3 shards parameters), got stage {self.stage}")


def ds_config(cfg: ZeroConfig, spec: Any, grad_accum: int) -> dict[str, Any]:
    """DeepSpeed's JSON config for ``cfg`` under the plan's TrainSpec ``spec``."""
    zero: dict[str, Any] = {"stage": cfg.stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    adamw: dict[str, Any] = {
        "lr": spec.lr,
        "betas": [spec.beta1, spec.beta2],
        "eps": 1e-8,
        "weight_decay": spec.weight_decay,
    }
    if not cfg.offload_optimizer:
        adamw.update(torch_adam=True, foreach=True)
    return {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": spec.grad_clip,
        # fp32 weights, gradients and reductions; autocast is the loop's (see the docstring).
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": adamw},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def export_deepspeed(cfg: ZeroConfig, plan: Plan) -> dict[str, Any]:
    """The whole DeepSpeed config: the one ``apply_zero`` hands ``deepspeed.initialize``."""
    return ds_config(cfg, plan.train, plan.grad_accum())


def export_accelerate(cfg: ZeroConfig, plan: Plan) -> dict[str, Any]:
    """Accelerate's DeepSpeed plugin: the stage, the offloads and the plan's accumulation and
    clipping, as ``ds_config`` gives them to the engine."""
    return {
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {
            "zero_stage": cfg.stage,
            "offload_optimizer_device": "cpu" if cfg.offload_optimizer else "none",
            "offload_param_device": "cpu" if cfg.offload_params else "none",
            "gradient_accumulation_steps": plan.grad_accum(),
            "gradient_clipping": plan.train.grad_clip,
            "zero3_init_flag": False,
        },
    }


def apply_zero(ctx: TrainContext, cfg: ZeroConfig) -> None:
    ctx.check_needs(STRATEGY, cfg, "launch the plan with 2+ processes (launch.nproc_per_node) and install deepspeed")
    if ctx.grad_scaler:
        raise UserError(
            "zero with precision fp16 is not supported: DeepSpeed would "
            "scale the loss with its own scaler, not the plain run's; use bf16"
        )
    if ctx.spec is None:
        raise UserError("zero builds DeepSpeed's engine from the plan's training settings, which this context lacks")
    from autotune.contract.grads import adamw_groups
    from autotune.strategies._zero_impl import DeepSpeedStep

    deepspeed = _import_deepspeed(ctx.device)
    model, spec = ctx.model, ctx.spec
    # The executor's AdamW groups: weight decay on matrices only.
    groups = adamw_groups(model, spec.weight_decay)
    config = ds_config(cfg, spec, ctx.grad_accum)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints; stdout is autotune's
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, config=config, dist_init_required=False
        )
    ctx.forward = engine
    ctx.engine = lambda ctx: DeepSpeedStep(ctx, engine, optimizer, config, tag=TAG)
    ctx.sharded_state = True
    ctx.notes.append(
        f"zero stage {cfg.stage} over {ctx.world_size} processes through "
        f"DeepSpeed {deepspeed.__version__}, config {json.dumps(config)}"
    )


def _import_deepspeed(device: torch.device) -> Any:
    """deepspeed, its accelerator matching ``device`` and its log on stderr at warnings."""
    if device.type == "cpu":
        # This process only: DeepSpeed picks CUDA wherever it finds it, also for a CPU run.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with contextlib.redirect_stdout(sys.stderr):  # its logger's handler takes sys.stdout
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from deepspeed.utils import logger

        name = get_accelerator().device_name()
    logger.setLevel(logging.WARNING)
    if name != device.type:
        raise UserError(
            f"DeepSpeed's accelerator is {name}, but the plan trains "
            f"on {device.type} (set DS_ACCELERATOR={device.type})"
        )
    return deepspeed


def zero_cost(cfg: Any, terms: Any) -> None:
    """The cost model's term (``contract.cost.CostTerms``): ZeRO-1 shards the moments over dp,
    ZeRO-2 also the gradients, ZeRO-3 also the weights; offload keeps the moments (and, ZeRO-3,
    the weights) on the host."""
    terms.shard(getattr(cfg, "stage", 0))
    terms.optimizer_on_host |= bool(getattr(cfg, "offload_optimizer", False))
    terms.weights_on_host |= bool(getattr(cfg, "offload_params", False))


STRATEGY = Strategy(
    name="zero",
    phase="loop",
    summary="ZeRO stage 1/2/3 sharding through DeepSpeed's engine, optional CPU offload",
    exact=True,
    config=ZeroConfig,
    apply=apply_zero,
    needs=Needs(min_devices=2, features=frozenset({"collectives"}), modules=("deepspeed",)),
    conflicts=frozenset({"ddp", "fsdp2", "tensor_parallel", "pipeline_parallel", "optimizer"}),
    mesh_dim="dp",
    takes_model=True,
    # Last of all: DeepSpeed's engine holds the final modules (no TP or PP shards: those
    # conflict) and is built from the accumulation count.
    reads=frozenset({"embedding", "head", "mlp", "linears", "norms", "blocks", "accumulation", "loss"}),
    cost=zero_cost,
    exports={"accelerate": export_accelerate, "deepspeed": export_deepspeed},
    knobs=(
        Knob(name="stage", choices=(1, 2, 3)),
        Knob(name="offload_optimizer", choices=(True, False)),
        Knob(name="offload_params", choices=(True, False)),
    ),
)
