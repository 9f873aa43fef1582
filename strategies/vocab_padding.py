"""Vocab padding: round the rows of the token embedding and the output head up to a multiple
of 64 or 128 (GPT-2's 50257 -> 50304), so the head matmul, the largest in a small model, gets
tile-friendly shapes.

The padded parameter keeps the original rows' exact values; the new rows are zeros. They are
never used: token ids stay below the true vocabulary, so no padded embedding row is looked up,
and the GPT drops the padded logits before the cross-entropy, so they get no gradient either.
The loss is the plain model's up to the order of floating-point reductions in the wider
matmul: an exact strategy. A tied head stays tied to the embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from autotune.context import TrainContext
from autotune.strategy import Knob, Needs, Strategy


@dataclass(kw_only=True, slots=True)
class VocabPaddingConfig:
    multiple: int = 64
    """Embedding and head rows are rounded up to a multiple of this."""

    def __post_init__(self) -> None:
        # Padding pays only in the tile sizes of matmul kernels: powers of two.
        if self.multiple not in (8, 16, 32, 64, 128, 256, 512, 1024):
            raise ValueError(f"multiple must be a power of two from 8 to 1024, got {self.multiple}")


def _padded(weight: nn.Parameter, rows: int) -> nn.Parameter:
    """``weight`` (V, d) grown to (rows, d): the same first V rows, zeros after."""
    out = torch.zeros(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    out[: weight.shape[0]] = weight.detach()
    return nn.Parameter(out, requires_grad=weight.requires_grad)


def apply_vocab_padding(ctx: TrainContext, cfg: VocabPaddingConfig) -> None:
    ctx.check_needs(STRATEGY, cfg, "the model must be the built-in GPT")
    model = ctx.model
    vocab = model.cfg.vocab_size
    rows = -(-vocab // cfg.multiple) * cfg.multiple
    if rows != model.embed.num_embeddings:
        tied = model.head.weight is model.embed.weight
        model.embed.weight = _padded(model.embed.weight, rows)
        model.embed.num_embeddings = rows
        model.head.weight = model.embed.weight if tied else _padded(model.head.weight, rows)
        model.head.out_features = rows
    ctx.notes.append(f"vocab padded {vocab} -> {rows} rows (multiple of {cfg.multiple})")


STRATEGY = Strategy(
    name="vocab_padding",
    summary="pad the embedding and head rows to a multiple of 64/128 (padded logits dropped)",
    exact=True,
    config=VocabPaddingConfig,
    apply=apply_vocab_padding,
    needs=Needs(structure=frozenset({"embed", "head", "gpt"})),
    knobs=(Knob(name="multiple", choices=(64, 128)),),
)
