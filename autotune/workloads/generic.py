"""The adapter of any ``nn.Module``: its repeated blocks, found without a declaration.

The blocks are the largest ``nn.ModuleList`` whose entries are all of one class (ties: the
first found in module order); that is enough for activation checkpointing, per-block compile
and FSDP2. Everything else (attention, embedding and head, TP, PP, vocab) needs knowledge of
the model this adapter does not have: it raises :class:`NotSupported` with the reason. Its
:meth:`GenericAdapter.shape` for the cost model is read off the blocks, the vocabulary table
and the head, where the module has them.
:class:`StageAdapter` is the same for a pipeline stage, whose block list is known.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autotune.workloads.adapter import Attend, ModelShape, NotSupported, block_matmul_params, params_of


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(FQN, list) of the largest ModuleList of one class with at least two entries, or None."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    return best


class GenericAdapter:
    """A model known only as an ``nn.Module`` with ``forward(idx, targets) -> loss``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._found = find_blocks(model)

    def why_not(self) -> str:
        """Why the blocks-only structure is all there is (for --explain)."""
        if self._found is None:
            return "no nn.ModuleList of two or more blocks of one class was found"
        return (
            f"blocks found at {self._found[0] or '(root)'}; attention, "
            "mlp, embedding, head, TP and PP need a model adapter"
        )

    def supports(self) -> frozenset[str]:
        return frozenset({"blocks"}) if self._found is not None else frozenset()

    def blocks(self) -> nn.ModuleList:
        if self._found is None:
            raise NotSupported(f"{type(self.model).__name__}: {self.why_not()}")
        return self._found[1]

    def _unknown(self, what: str) -> NotSupported:
        return NotSupported(f"{type(self.model).__name__}: the generic adapter does not know its {what}")

    def attention(self, block: nn.Module) -> nn.Module:
        raise self._unknown("attention")

    def mlp(self, block: nn.Module) -> nn.Module:
        raise self._unknown("MLP")

    def attention_implementations(self) -> tuple[str, ...]:
        return ()

    def set_attention(self, implementation: str | None = None, kernel: Attend | None = None) -> None:
        raise self._unknown("attention")

    def attention_dropout(self) -> float:
        raise self._unknown("attention")

    def embedding(self) -> nn.Embedding:
        raise self._unknown("embedding")

    def head(self) -> nn.Module:
        raise self._unknown("output head")

    def pad_vocab(self, multiple: int) -> int:
        raise self._unknown("vocabulary")

    def tp_plan(self, sequence_parallel: bool = False) -> dict[str, Any]:
        raise self._unknown("tensor-parallel plan")

    def pipeline_stage(self, start: int, stop: int, *, first: bool, last: bool) -> nn.Module:
        raise self._unknown("pipeline stages")

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model(ids, targets)

    def logits_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise self._unknown("logits")

    def set_head_loss(self, fn: Any) -> None:
        raise self._unknown("head and loss")

    def shape(self, seq_len: int | None = None) -> ModelShape:
        """The shape of a model trained on ``seq_len`` tokens a sample, from what the module
        holds: the blocks found (their count and parameters), the vocabulary table (the widest
        ``nn.Embedding`` outside them: its rows the vocabulary, its width d_model), the head (an
        ``nn.Linear`` from d_model to the vocabulary, tied or not) and the MLP width (the widest
        side of a block's linears). The attention is not known: no heads, so no attention FLOPs
        or scores are counted (as :meth:`flops_per_token`). NotSupported says what is missing."""
        name = type(self.model).__name__
        if seq_len is None:
            raise NotSupported(f"{name}: the generic adapter's shape needs the workload's sequence length")
        if self._found is None:
            raise NotSupported(f"{name}: {self.why_not()}")
        blocks = self._found[1]
        inside = {id(p) for p in blocks.parameters()}
        tables = [m for m in self.model.modules() if isinstance(m, nn.Embedding) and id(m.weight) not in inside]
        if not tables:
            raise NotSupported(f"{name}: no nn.Embedding of the vocabulary outside the blocks")
        embed = max(tables, key=lambda m: m.num_embeddings)
        vocab, d = embed.num_embeddings, embed.embedding_dim
        heads = [
            m for m in self.model.modules()
            if isinstance(m, nn.Linear) and (m.in_features, m.out_features) == (d, vocab) and id(m.weight) not in inside
        ]  # fmt: skip
        if not heads:
            raise NotSupported(
                f"{name}: no output head (an nn.Linear from {d} to the {vocab} tokens) outside its blocks"
            )
        head = heads[-1]
        widths = [w for m in blocks[0].modules() if isinstance(m, nn.Linear) for w in (m.in_features, m.out_features)]
        tied = head.weight is embed.weight
        held = {id(embed.weight), id(head.weight)} | inside
        block_params = params_of(blocks)
        others = {id(p): p for p in self.model.parameters() if id(p) not in held}
        return ModelShape(
            d_model=d,
            n_layers=len(blocks),
            n_heads=0,
            n_kv_heads=0,
            head_dim=0,
            d_ff=max(widths, default=d),
            vocab_size=vocab,
            seq_len=seq_len,
            matmul_params=block_matmul_params(blocks) + vocab * d,
            block_params=block_params,
            other_params=sum(p.numel() for p in others.values()),
            vocab_tables=1 if tied else 2,
            mlp_matrices=2,
        )

    def flops_per_token(self) -> int:
        """6 x the parameters that are not embedding tables (no attention term: the
        sequence length is not known here)."""
        import math

        from autotune.workloads.gpt import param_shape

        embeds = {id(m.weight) for m in self.model.modules() if isinstance(m, nn.Embedding)}
        return 6 * sum(math.prod(param_shape(p)) for p in self.model.parameters() if id(p) not in embeds)


class StageAdapter(GenericAdapter):
    """A pipeline stage's (``ModelAdapter.pipeline_stage``): its own block list, placeholders
    of the other stages' blocks included (so indices stay the whole model's), and its FLOPs."""

    def __init__(self, stage: nn.Module, blocks: nn.ModuleList) -> None:
        self.model = stage
        self._found = ("blocks", blocks)

    def shape(self, seq_len: int | None = None) -> ModelShape:
        raise self._unknown("shape")  # a stage's shape is its model's (ModelAdapter.pipeline_stage)

    def flops_per_token(self) -> int:
        return self.model.flops_per_token()
