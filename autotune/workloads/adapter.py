"""The model adapter: everything a strategy may ask of a model, in one small protocol.

A strategy never reads a model's attributes (``model.blocks``, ``model.cfg``,
``block.attn.attend``) itself; it asks the adapter of the model (:func:`adapter_for`). Three
adapters implement the protocol:

- :class:`GPTAdapter`: the built-in :class:`autotune.workloads.gpt.GPT`;
- :class:`autotune.workloads.hf_adapter.HFAdapter`: Hugging Face causal LMs (``hf:<model_type>``);
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
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from autotune.workloads.structure import STRUCTURE, ModelShape, NotSupported, declared, pipeline_split

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
"""Causal attention kernel: (q, k, v, dropout_p) -> y, all (B, nh, T, hs); k and v already
have as many heads as q (an adapter repeats grouped kv heads before calling it)."""

HeadLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""The output head and the loss in one function (a fused kernel):
``(hidden, weight, targets, vocab_size) -> mean cross-entropy``, where ``hidden`` is the final
norm's output (B, T, C), ``weight`` the head's (padded vocab rows, C; a tied embedding's own),
``targets`` (B, T) and ``vocab_size`` the true vocabulary (columns past it are padding)."""


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

    def set_head_loss(self, fn: HeadLoss | None) -> None:
        """Compute the training loss as ``fn`` of the final hidden states, the head's weight and
        the targets, instead of the head's logits then the cross-entropy (``loss``); None
        restores the model's own. The logits the model returns without targets are unchanged."""
        ...

    def shape(self) -> ModelShape:
        """The model's shape for the cost model, MFU and the mesh checks."""
        ...

    def flops_per_token(self) -> int:
        """Training FLOPs per token (:meth:`ModelShape.flops_per_token`)."""
        ...


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
    """Matrices of the first block's MLP in units of its smallest (2: fc/proj; 3: gated, a
    fused gate_up counting as two); 2 when the adapter has none."""
    try:
        mlp = adapter.mlp(adapter.blocks()[0])
    except (NotSupported, IndexError, AttributeError):
        return 2
    sizes = [p.numel() for p in mlp.parameters() if p.dim() == 2]
    return round(sum(sizes) / min(sizes)) if sizes else 2


_NATIVE_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)
"""Norms of one fused kernel: they keep their input and statistics, not their normalised value."""


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NATIVE_NORMS) or type(module).__name__.endswith("Norm")


def _linears(module: nn.Module) -> list[nn.Module]:
    """Submodules holding a matrix (nn.Linear, GPT-2's Conv1D, ...), in order."""
    return [m for m in module.modules() if any(p.dim() == 2 for p in m.parameters(recurse=False))]


def activation_saves(module: nn.Module | None) -> int:
    """Tensors the activation function ``module`` keeps for its backward, counted by running it
    on a small tensor: 1 for a built-in one (SiLU, GELU), more for one written in Python
    (GPT-2's gelu_new: 4); 1 when there is none to run (a functional call, a meta module)."""
    if module is None:
        return 1
    kept: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim():
            kept.add(t.untyped_storage().data_ptr())
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(torch.randn(2, 8, requires_grad=True))
    except (RuntimeError, TypeError, ValueError, NotImplementedError):  # one with meta parameters of its own, or such
        return 1
    return max(1, len(kept))


def _activation(mlp: nn.Module) -> nn.Module | None:
    """The MLP's activation module: its first child holding no parameters that is no dropout."""
    for child in mlp.children():
        if not any(True for _ in child.parameters()) and not isinstance(child, nn.Dropout):
            return child
    return None


def saved_layout(adapter: ModelAdapter, config: Any = None) -> dict[str, Any]:
    """The :class:`ModelShape` fields that say what a block keeps for its backward (all but
    ``mlp_matrices``, :func:`mlp_matrices`), read off the first block: its norms (outside
    attention and MLP; native or written in Python), the linears reading the attention's and the
    MLP's input, the MLP's matrices and its activation (run once: :func:`activation_saves`),
    per-head q/k norms, and whether q and k are rotated out of a fused qkv. ``config`` (a Hugging
    Face config) tells a parallel residual (``use_parallel_residual``) and soft-capped logits
    (``final_logit_softcapping``). Parts the adapter does not know keep the GPT's values."""
    out: dict[str, Any] = {}
    try:
        block = adapter.blocks()[0]
    except (NotSupported, IndexError, AttributeError):
        return out
    parts = {}
    for name in ("attention", "mlp"):
        try:
            parts[name] = getattr(adapter, name)(block)
        except (NotSupported, AttributeError):
            pass
    inner = {id(m) for part in parts.values() for m in part.modules()}
    norms = [m for m in block.modules() if id(m) not in inner and _is_norm(m)]
    if norms:
        shared = 1 if getattr(config, "use_parallel_residual", False) and len(norms) >= 2 else 0
        python = sum(1 for m in norms if not isinstance(m, _NATIVE_NORMS))
        out |= {"norm_saved": len(norms) - shared + python, "norm_inputs": len(norms) - shared}
    attention = parts.get("attention")
    if attention is not None:
        readers = max(1, len(_linears(attention)) - 1)  # all but the output projection
        rotary = any("Rotary" in type(m).__name__ for m in adapter.model.modules())
        out |= {
            "attn_in_linears": readers,
            "qk_norm": any(_is_norm(m) for m in attention.modules()),
            "rope_copies": rotary and readers == 1,
        }
    mlp = parts.get("mlp")
    if mlp is not None:
        gated = mlp_matrices(adapter) >= 3
        act = activation_saves(_activation(mlp))
        out |= {"mlp_in_linears": max(1, len(_linears(mlp)) - 1), "mlp_saved": act + (3 if gated else 1)}
    out["logit_softcap"] = bool(getattr(config, "final_logit_softcapping", None))
    return out


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
            raise NotSupported(
                f"the built-in GPT has attention implementations sdpa, not {implementation!r}: pass a kernel"
            )
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
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            PrepareModuleInput,
            RowwiseParallel,
            SequenceParallel,
        )

        col, row = ColwiseParallel, RowwiseParallel
        if not sequence_parallel:
            return {
                "blocks.*.attn.qkv": col(),
                "blocks.*.attn.proj": row(),
                "blocks.*.mlp.fc": col(),
                "blocks.*.mlp.proj": row(),
            }

        def gather() -> PrepareModuleInput:
            return PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
            )

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
            "blocks.0": PrepareModuleInput(
                input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True
            ),
            "norm": gather(),
        }

    def pipeline_stage(self, start: int, stop: int, *, first: bool, last: bool) -> nn.Module:
        return GPTStage(self.model, start, stop, first=first, last=last)

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model(ids, targets)

    def logits_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return masked_cross_entropy(logits, targets, self.model.cfg.vocab_size)

    def set_head_loss(self, fn: HeadLoss | None) -> None:
        self.model.head_loss = fn

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
        self.blocks = nn.ModuleList(
            block if start <= i < stop else nn.Identity() for i, block in enumerate(model.blocks)
        )
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
    "saved_layout",
    "activation_saves",
]
