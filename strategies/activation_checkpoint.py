"""Activation checkpointing: keep only each checkpointed block's input in the forward pass and
recompute its activations in the backward, trading about one extra block forward for the
memory of its activations (torchtitan's ``apply_ac``). "full" checkpoints every block,
"selective" every n-th. The recomputation runs the same kernels on the same inputs, with the
RNG state restored for dropout, so the gradients are the plain model's: an exact strategy.

Blocks are wrapped with PyTorch's ``checkpoint_wrapper`` (non-reentrant
``torch.utils.checkpoint``), whose state-dict hooks strip the wrapper's prefix: checkpoints
keep the plain model's keys and load either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from autotune import devices
from autotune.contract.strategy import NOTHING_TO_SET, Knob, Needs, Strategy

if TYPE_CHECKING:
    from autotune.contract.context import TrainContext


@dataclass(kw_only=True, slots=True)
class ActivationCheckpointConfig:
    mode: Literal["full", "selective"] = "full"
    """full: checkpoint every block; selective: every ``every``-th block only."""
    every: int = 2
    """In selective mode, checkpoint blocks 0, every, 2 * every, ...; full ignores it."""

    def __post_init__(self) -> None:
        if not 1 <= self.every <= 64:
            raise ValueError(f"every must be from 1 to 64, got {self.every}")


def apply_activation_checkpoint(ctx: TrainContext, cfg: ActivationCheckpointConfig) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    from autotune.workloads.adapter import adapter_for

    ctx.check_needs(STRATEGY, cfg, "declare the model's blocks in Workload.structure")
    blocks = adapter_for(ctx.model).blocks()
    stride = 1 if cfg.mode == "full" else cfg.every
    # The device's own checkpoint where it has one (XLA's: its RNG, an optimization barrier; it
    # is the reentrant kind only), else torch's non-reentrant one.
    function = devices.of(ctx.device).checkpoint_function()
    impl = CheckpointImpl.NO_REENTRANT if function is None else CheckpointImpl.REENTRANT
    own = {} if function is None else {"checkpoint_fn": function, "use_reentrant": True}
    for i in range(0, len(blocks), stride):
        blocks[i] = checkpoint_wrapper(blocks[i], checkpoint_impl=impl, **own)
    ctx.notes.append(
        f"activation checkpointing ({cfg.mode}): {len(range(0, len(blocks), stride))} of {len(blocks)} blocks"
    )


def activation_checkpoint_cost(cfg: ActivationCheckpointConfig, terms: Any) -> None:
    """The cost model's term (``contract.cost.CostTerms``): the checkpointed blocks keep their input
    only (what the core counts of them), and each replays its forward in the backward, which
    stops early once every saved tensor is back (torch.utils.checkpoint's early stop): all its
    matmuls but the MLP's output projection (2 FLOPs a weight and token), and the attention's
    4 (nh hs) s a token."""
    from autotune.contract.cost import block_matmuls

    shape = terms.shape
    terms.checkpointed = len(range(0, shape.n_layers, 1 if cfg.mode == "full" else cfg.every))
    matmuls = 2 * block_matmuls(shape) / shape.n_layers - 2 * shape.d_model * shape.d_ff
    attention = 4 * shape.attn_dim * shape.seq_len
    terms.block_flops += terms.checkpointed * (matmuls + attention)
    terms.attention_flops += terms.checkpointed * attention


STRATEGY = Strategy(
    name="activation_checkpoint",
    phase="wrap_block",
    summary="recompute block activations in the backward pass (all blocks or every n-th)",
    exact=True,
    config=ActivationCheckpointConfig,
    apply=apply_activation_checkpoint,
    changes=frozenset({"blocks"}),
    needs=Needs(structure=frozenset({"blocks"})),
    cost=activation_checkpoint_cost,
    knobs=(Knob(name="mode", choices=("full", "selective")), Knob(name="every", low=2, high=6, integer=True)),
    # Neither config states it on its own (fsdp2's Accelerate plugin does); the run wraps the blocks.
    exports={"accelerate": NOTHING_TO_SET, "deepspeed": NOTHING_TO_SET},
)
