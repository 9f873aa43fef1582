"""What a strategy's cost-model term changes (``Strategy.cost``): the :class:`CostTerms` of one
process's share of a training step, which ``autotune.costmodel`` fills in for the plain model,
passes through each chosen strategy's term in apply order, and counts memory and step time
from; the blocks' attention kernel (:class:`AttentionKernel`); and the core's count of the
blocks' matmul weights (:func:`block_matmuls`) that a term replaying a block reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autotune.workloads.structure import ModelShape


@dataclass(frozen=True, kw_only=True, slots=True)
class AttentionKernel:
    """What the cost model counts of the blocks' attention kernel."""

    keeps_scores: bool
    """It writes the (b, heads, s, s) scores and keeps them for the backward (attention written
    out, SDPA's math backend). The others compute them tile by tile and, in half precision,
    skip the tiles above the causal diagonal."""
    repeated_kv: bool
    """It gets k and v repeated to every query head, and keeps them that wide."""


@dataclass(kw_only=True, slots=True)
class CostTerms:
    """One process's share of a training step. :func:`autotune.costmodel.plain_terms` fills it in for the plain
    model; each chosen strategy's declared term (``Strategy.cost``, see ``costmodel.strategy_terms``)
    then changes it in place, in apply order; ``costmodel.estimate`` counts memory and step time
    from what it holds at the end. A term may read what the terms before it set."""

    shape: ModelShape
    """The model's shape before any strategy (the workload's)."""
    dp: int
    """Data-parallel groups of the mesh."""
    tp: int
    """Tensor-parallel degree."""
    pp: int
    """Pipeline stages."""
    micro_batch: int
    """Sequences of one micro-batch."""
    micro_batches: int = 1
    """Micro-batches one optimizer step accumulates: their tokens, FLOPs and kernel launches,
    at one micro-batch's memory."""
    autocast: bool = False
    """Matmuls and activations in bf16/fp16 under autocast: 2 bytes an activation (norms and
    the residual stay fp32), a half copy of a matmul's input for each linear reading it and of
    each weight, kept for the backward; the default attention kernel is then flash's."""
    matmul_dtype: str = "fp32"
    """The measured matmul rate the step's matmuls run at: fp32 (PyTorch's default), tf32 or bf16."""
    vocab: int
    """Rows of the embedding and the head: the vocabulary tables' parameters, the head's FLOPs,
    the logits' columns."""
    attention: AttentionKernel | None = None
    """The blocks' attention kernel; None: SDPA's own choice (``costmodel.sdpa_default``, read once
    every term has set :attr:`autocast`)."""
    checkpointed: int = 0
    """Blocks whose activations are recomputed in the backward: each keeps its fp32 input only,
    and is live again while it is recomputed."""
    compiled: bool = False
    """Inductor compiles the blocks: its partitioner recomputes their pointwise work, fused
    (what a block keeps: ``costmodel.block_bytes``; fewer bytes moved and kernels launched)."""
    loss_compiled: bool = False
    """... and the head and the loss with them (``costmodel.Coefficients.logits_compiled_*``)."""
    head_loss_bytes: float | None = None
    """Bytes a fused head + loss holds at its peak in place of the logits (None: the model's
    own head and loss, whose logits the core counts)."""
    block_params: float
    """Parameters of all blocks of the whole model (a term adding experts adds here)."""
    block_flops: float
    """Training FLOPs per token of all blocks of the whole model (PaLM: 6 per matmul weight and
    12 L (nh hs) s for the attention; a term replaying or skipping work changes it); the core
    adds the head's, 6 per weight of its :attr:`vocab` rows."""
    attention_flops: float
    """The attention's part of :attr:`block_flops` (a causal half-precision kernel skips half)."""
    activation_share: float = 1.0
    """Share of the counted activations this process keeps (a block split over processes
    keeps its part)."""
    model_shards: int = 1
    """Ways the blocks (their parameters, scores and FLOPs) are split: tp x pp."""
    weight_shards: float = 1.0
    """Data-parallel processes sharing one copy of the weights (ZeRO-3, FSDP2)."""
    gradient_shards: float = 1.0
    """... of the gradients (ZeRO-2 and up, FSDP2)."""
    optimizer_shards: float = 1.0
    """... of AdamW's moments (ZeRO-1 and up, FSDP2)."""
    weights_on_host: bool = False
    """The weights live in host memory (ZeRO-3 offload)."""
    optimizer_on_host: bool = False
    """AdamW's moments live in host memory (ZeRO offload)."""

    @property
    def tokens(self) -> int:
        """Tokens of one micro-batch."""
        return self.micro_batch * self.shape.seq_len

    def shard(self, stage: int) -> None:
        """Shard over dp as ZeRO's ``stage`` does: 1 the moments, 2 also the gradients, 3 also the weights."""
        if stage >= 1:
            self.optimizer_shards = self.dp
        if stage >= 2:
            self.gradient_shards = self.dp
        if stage >= 3:
            self.weight_shards = self.dp


CostTerm = Callable[[Any, CostTerms], None]
"""A strategy's cost term: (its typed config, the terms) -> None, changing the terms."""


def block_matmuls(shape: ModelShape) -> int:
    """Matmul weights of all blocks: the model's minus the output head's."""
    return shape.matmul_params - shape.vocab_size * shape.d_model
