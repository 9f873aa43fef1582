"""The model adapter: everything a strategy may ask of a model, in one small protocol.

A strategy never reads a model's attributes (``model.blocks``, ``model.cfg``,
``block.attn.attend``) itself; it asks the adapter of the model (:func:`adapter_for`). Three
adapters implement the protocol:

- :class:`GPTAdapter`: the built-in :class:`autotune.workloads.gpt.GPT`;
- :class:`autotune.workloads.hf.HFAdapter`: Hugging Face causal LMs (``hf:<model_type>``);
- :class:`autotune.workloads.generic.GenericAdapter`: any ``nn.Module`` (its repeated blocks
  found automatically, nothing else).

What a workload supports is what its adapter can do (:meth:`ModelAdapter.supports`), in the
structure tokens strategies already declare: ``blocks``, ``attention``, ``mlp``, ``embed``,
``head``, plus ``tp`` (a tensor-parallel plan), ``sp`` (that plan also splits the norms along
the sequence), ``pp`` (pipeline stages) and ``vocab`` (vocab padding). An adapter raises
:class:`NotSupported` for what it cannot do, naming the reason, so ``strategies --explain`` can
show it. A pipeline stage made by :meth:`ModelAdapter.pipeline_stage` has an adapter of its
own (its block list), so strategies applied after the cut still find the blocks.

This module imports only torch (no transformers, no torch.distributed at import time).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
"""Causal attention kernel: (q, k, v, dropout_p) -> y, all (B, nh, T, hs); k and v already
have as many heads as q (an adapter repeats grouped kv heads before calling it)."""

STRUCTURE = frozenset({"blocks", "attention", "mlp", "embed", "head", "vocab", "tp", "sp", "pp", "loss"})
"""Every token :meth:`ModelAdapter.supports` may return (see ``autotune.workloads``)."""


class NotSupported(Exception):
    """The adapter cannot do what was asked; the message says why (shown by --explain)."""


@dataclass(kw_only=True, slots=True)
class ModelShape:
    """The numbers the cost model, MFU and the mesh checks need, whatever the model's own
    config calls them."""

    d_model: int
    """Width of the residual stream."""
    n_layers: int
    """Number of repeated blocks."""
    n_heads: int
    """Query heads per block."""
    n_kv_heads: int
    """Key/value heads per block (= n_heads without grouped-query attention)."""
    head_dim: int
    """Width of one head (d_model / n_heads for most models, not all)."""
    d_ff: int
    """Hidden width of the MLP (of each of gate and up for a gated MLP)."""
    vocab_size: int
    """Tokens the model emits (the true vocabulary; padding never changes it)."""
    seq_len: int
    """Tokens per sample the workload trains on."""
    matmul_params: int
    """Weights taking part in a matmul per token: the blocks' matrices plus the output head
    (vocab_size x d_model); embedding lookups are not matmuls. Routed experts count with the
    share a token passes through (top_k / num_experts, see :func:`block_matmul_params`)."""
    block_params: int = 0
    """Every parameter of the blocks (matrices, norm scales, biases, all experts): what the
    weights, gradients and optimizer states are counted over. 0: not known (the cost model then
    takes the blocks' matrices)."""
    other_params: int = 0
    """Parameters outside the blocks and the vocabulary tables: position table, final norm."""
    vocab_tables: int = 1
    """Vocabulary-by-width tables held: 1 when the head shares the embedding's weight, else 2."""
    mlp_matrices: int = 2
    """Matrices of one block's MLP: 2 for fc/proj (GPT), 3 for a gated MLP (gate, up, down:
    SwiGLU); a gated MLP keeps twice the hidden activations (gate, up, act(gate), product)."""

    @property
    def attn_dim(self) -> int:
        """Width of the concatenated query heads: what attention's T x T matmuls run over."""
        return self.n_heads * self.head_dim

    def flops_per_token(self) -> int:
        """Training FLOPs per token, PaLM appendix B: 6 N + 12 L (nh hs) T (forward +
        backward). Grouped kv heads shrink N (smaller k/v projections), not the attention
        term: every query head still attends over T keys."""
        return 6 * self.matmul_params + 12 * self.n_layers * self.attn_dim * self.seq_len


@runtime_checkable
class ModelAdapter(Protocol):
    """How strategies touch one model instance. Methods that the model cannot serve raise
    :class:`NotSupported`; :meth:`supports` says beforehand which those are."""

    model: nn.Module
    """The model the trainer calls: ``forward(idx, targets) -> mean loss``."""

    def supports(self) -> frozenset[str]:
        """Structure tokens (see :data:`STRUCTURE`) this adapter serves for this model."""
        ...

    def blocks(self) -> nn.ModuleList:
        """The repeated blocks, the model's own list: assigning ``blocks()[i] = m`` replaces
        block i in the model (checkpoint wrappers, per-block compile)."""
        ...

    def attention(self, block: nn.Module) -> nn.Module:
        """The attention submodule of ``block``."""
        ...

    def mlp(self, block: nn.Module) -> nn.Module:
        """The MLP submodule of ``block``."""
        ...

    def attention_implementations(self) -> tuple[str, ...]:
        """Attention implementations the model itself can select by name (HF's
        ``attn_implementation``); the first is the default."""
        ...

    def set_attention(self, implementation: str | None = None, kernel: Attend | None = None) -> None:
        """Switch every block's attention: to one of :meth:`attention_implementations`, or to
        ``kernel`` (an :data:`Attend`, e.g. the attention strategy's backends)."""
        ...

    def attention_dropout(self) -> float:
        """Dropout probability the attention applies to its weights in training (what a
        kernel is called with as ``dropout_p``); 0 when off."""
        ...

    def embedding(self) -> nn.Embedding:
        """The token embedding."""
        ...

    def head(self) -> nn.Module:
        """The output projection to the vocabulary (may share its weight with the embedding)."""
        ...

    def pad_vocab(self, multiple: int) -> int:
        """Widen embedding and head to a multiple of ``multiple`` rows; return the new width.
        The padded logits stay out of :meth:`loss` and of the logits the model returns."""
        ...

    def tp_plan(self, sequence_parallel: bool = False) -> dict[str, Any]:
        """Tensor-parallel plan: module FQN (relative to :attr:`model`, ``*`` matching any
        one name) -> a ``torch.distributed.tensor.parallel`` style (Colwise/Rowwise/
        SequenceParallel), for ``parallelize_module(model, mesh, plan)``. With
        ``sequence_parallel`` the norms between the parallel regions also work on a slice of
        the sequence (NotSupported where the adapter does not know them)."""
        ...

    def pipeline_stage(self, start: int, stop: int, *, first: bool, last: bool) -> nn.Module:
        """A module running blocks ``[start, stop)``: it takes token ids if ``first`` (else
        the residual stream (B, T, C)) and returns logits if ``last`` (else the stream)."""
        ...

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the model on ``ids`` against ``targets`` (both (B, T);
        targets are ids shifted by one already: nothing is shifted again)."""
        ...

    def logits_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of ``logits`` (B, T, V or padded V) against ``targets``."""
        ...

    def shape(self) -> ModelShape:
        """The model's shape for the cost model, MFU and the mesh checks."""
        ...

    def flops_per_token(self) -> int:
        """Training FLOPs per token (:meth:`ModelShape.flops_per_token`)."""
        ...


def declared(structure: frozenset[str]) -> frozenset[str]:
    """What a workload's declared ``structure`` lets strategies ask of its adapter.

    The tokens themselves: the built-in GPT's workloads declare everything its adapter serves
    (``autotune.workloads.GPT_STRUCTURE``), an hf: model's are its adapter's ``supports()``, a
    user's workload declares its own by hand."""
    return frozenset(structure)


def pipeline_split(n_blocks: int, stages: int) -> list[tuple[int, int]]:
    """Block ranges ``[start, stop)`` of ``stages`` pipeline stages, as even as they come."""
    if not 1 <= stages <= n_blocks:
        raise NotSupported(f"{stages} pipeline stages need at least as many blocks, the model has {n_blocks}")
    return [(i * n_blocks // stages, (i + 1) * n_blocks // stages) for i in range(stages)]


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (B, T, V') against ``targets`` (B, T), with the
    columns past ``vocab_size`` (vocab padding) left out of the softmax."""
    if logits.shape[-1] != vocab_size:
        # exp(-inf) = 0: loss and gradients are the unpadded model's. Masking keeps the aligned
        # row width; slicing to V was measured 11% slower under compile (see gpt.GPT.loss).
        padding = torch.arange(logits.shape[-1], device=logits.device) >= vocab_size
        logits = logits.masked_fill(padding, float("-inf"))
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def block_matmul_params(blocks: nn.ModuleList) -> int:
    """Parameters of the blocks that take part in a matmul per token: the matrices (norm
    scales and biases do no matmul), and of stacked expert weights (E, d_in, d_out) in a module
    declaring ``active_share`` (strategies/moe.py: top_k / num_experts) that share, since a
    token passes through top_k of the E experts."""
    from autotune.workloads.gpt import param_shape

    total = 0.0
    for block in blocks:
        for module in block.modules():
            share = getattr(module, "active_share", None)
            for p in module.parameters(recurse=False):
                shape = param_shape(p)
                if len(shape) == 2:
                    total += math.prod(shape)
                elif len(shape) == 3 and share is not None:
                    total += math.prod(shape) * share
    return round(total)


def params_of(module: nn.Module) -> int:
    """Parameters of ``module``, each shared one once (ZeRO-3's partitioned ones at full size)."""
    from autotune.workloads.gpt import param_shape

    unique = {id(p): p for p in module.parameters()}
    return sum(math.prod(param_shape(p)) for p in unique.values())


def mlp_matrices(adapter: ModelAdapter) -> int:
    """Matrices of the first block's MLP (2: fc/proj; 3: gated); 2 when the adapter has none."""
    try:
        mlp = adapter.mlp(adapter.blocks()[0])
    except (NotSupported, IndexError, AttributeError):
        return 2
    return sum(1 for p in mlp.parameters() if p.dim() == 2) or 2


def padded_width(vocab_size: int, multiple: int) -> int:
    if multiple < 1:
        raise ValueError(f"vocab padding multiple must be at least 1, got {multiple}")
    return -(-vocab_size // multiple) * multiple


class GPTAdapter:
    """The built-in GPT. Its attention hook is ``block.attn.attend``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def supports(self) -> frozenset[str]:
        return STRUCTURE

    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    def attention(self, block: nn.Module) -> nn.Module:
        return block.attn

    def mlp(self, block: nn.Module) -> nn.Module:
        return block.mlp

    def attention_implementations(self) -> tuple[str, ...]:
        return ("sdpa",)

    def set_attention(self, implementation: str | None = None, kernel: Attend | None = None) -> None:
        from autotune.workloads.gpt import sdpa_causal

        if kernel is None and implementation not in (None, "sdpa"):
            raise NotSupported(f"the built-in GPT has attention implementations sdpa, not {implementation!r}: pass a kernel")
        for block in self.blocks():
            block.attn.attend = kernel or sdpa_causal

    def attention_dropout(self) -> float:
        return self.model.cfg.dropout

    def embedding(self) -> nn.Embedding:
        return self.model.embed

    def head(self) -> nn.Module:
        return self.model.head

    def pad_vocab(self, multiple: int) -> int:
        embed, head = self.model.embed, self.model.head
        rows = padded_width(self.model.cfg.vocab_size, multiple)
        if rows != embed.num_embeddings:
            tied = head.weight is embed.weight
            embed.weight = _padded(embed.weight, rows)
            embed.num_embeddings = rows
            head.weight = embed.weight if tied else _padded(head.weight, rows)
            head.out_features = rows
        return rows

    def tp_plan(self, sequence_parallel: bool = False) -> dict[str, Any]:
        # Megatron's split: the fused qkv and the MLP's first linear by columns (whole heads:
        # the qkv rows are head-major), the projections back by rows.
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel

        col, row = ColwiseParallel, RowwiseParallel
        if not sequence_parallel:
            return {
                "blocks.*.attn.qkv": col(),
                "blocks.*.attn.proj": row(),
                "blocks.*.mlp.fc": col(),
                "blocks.*.mlp.proj": row(),
            }

        def gather() -> PrepareModuleInput:
            return PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True)

        # Between the parallel regions the residual stream is this rank's slice of the
        # sequence (B, T/tp, C): the norms run on it; attention and MLP gather the whole.
        return {
            "blocks.*.norm1": SequenceParallel(),
            "blocks.*.attn": gather(),
            "blocks.*.attn.qkv": col(),
            "blocks.*.attn.proj": row(output_layouts=Shard(1)),  # reduce-scatter
            "blocks.*.norm2": SequenceParallel(),
            "blocks.*.mlp": gather(),
            "blocks.*.mlp.fc": col(),
            "blocks.*.mlp.proj": row(output_layouts=Shard(1)),
            # The whole embedding output enters the first block as this rank's slice (no
            # communication); the last block's slices are gathered for the final norm and head.
            "blocks.0": PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True),
            "norm": gather(),
        }

    def pipeline_stage(self, start: int, stop: int, *, first: bool, last: bool) -> nn.Module:
        return GPTStage(self.model, start, stop, first=first, last=last)

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model(ids, targets)

    def logits_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return masked_cross_entropy(logits, targets, self.model.cfg.vocab_size)

    def shape(self) -> ModelShape:
        c = self.model.cfg
        return ModelShape(
            d_model=c.d_model,
            n_layers=c.n_layers,
            n_heads=c.n_heads,
            n_kv_heads=c.n_heads,
            head_dim=c.head_dim,
            d_ff=c.d_ff,
            vocab_size=c.vocab_size,
            seq_len=c.seq_len,
            matmul_params=block_matmul_params(self.blocks()) + c.vocab_size * c.d_model,
            block_params=sum(params_of(b) for b in self.blocks()),
            other_params=params_of(self.model.pos) + params_of(self.model.norm),
            vocab_tables=1 if self.model.head.weight is self.model.embed.weight else 2,
            mlp_matrices=2,
        )

    def flops_per_token(self) -> int:
        return self.shape().flops_per_token()


class GPTStage(nn.Module):
    """Blocks ``[start, stop)`` of a GPT, with its embedding if first and its head if last,
    under the plain model's parameter names (placeholders keep the blocks' indices)."""

    def __init__(self, model: nn.Module, start: int, stop: int, *, first: bool, last: bool) -> None:
        super().__init__()
        self.first, self.last, self.span = first, last, (start, stop)
        if first:
            self.embed, self.pos = model.embed, model.pos
        self.blocks = nn.ModuleList(block if start <= i < stop else nn.Identity() for i, block in enumerate(model.blocks))
        if last:
            self.norm, self.head = model.norm, model.head
        self._flops = GPTAdapter(model).flops_per_token()

    def flops_per_token(self) -> int:
        """The whole model's (MFU counts every stage's work)."""
        return self._flops

    def adapter(self) -> ModelAdapter:
        """The stage's own: its block list (placeholders included), for the strategies
        applied after the cut (checkpointing, per-block compile)."""
        from autotune.workloads.generic import StageAdapter

        return StageAdapter(self, self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self.embed(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for i in range(*self.span):
            x = self.blocks[i](x)
        return self.head(self.norm(x)) if self.last else x


def _padded(weight: nn.Parameter, rows: int) -> nn.Parameter:
    """``weight`` with zero rows appended up to ``rows`` (never looked up, masked in the loss)."""
    extra = torch.zeros(rows - weight.shape[0], *weight.shape[1:], dtype=weight.dtype, device=weight.device)
    return nn.Parameter(torch.cat([weight.detach(), extra]))


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of ``model``: the GPT's, the model's own (``model.adapter()``, as the
    Hugging Face wrapper has), else the generic one."""
    from autotune.workloads.generic import GenericAdapter
    from autotune.workloads.gpt import GPT

    if isinstance(model, GPT):
        return GPTAdapter(model)
    own = getattr(model, "adapter", None)
    if callable(own):
        return own()
    return GenericAdapter(model)


__all__ = [
    "Attend",
    "STRUCTURE",
    "NotSupported",
    "ModelShape",
    "ModelAdapter",
    "GPTAdapter",
    "GPTStage",
    "adapter_for",
    "declared",
    "pipeline_split",
    "masked_cross_entropy",
    "block_matmul_params",
    "params_of",
    "mlp_matrices",
]
