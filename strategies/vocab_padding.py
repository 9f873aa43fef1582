"""Vocab padding: round the rows of the token embedding and the output head up to a multiple
of 64 or 128 (GPT-2's 50257 -> 50304), so the head matmul, the largest in a small model, gets
tile-friendly shapes.

The padded parameter keeps the original rows' exact values; the new rows are zeros. They are
never used: token ids stay below the true vocabulary, so no padded embedding row is looked up,
and the model's loss masks the padded logits out of the cross-entropy, so they get no
gradient either. The loss is the plain model's up to the order of floating-point reductions
in the wider matmul: an exact strategy. A tied head stays tied to the embedding.

The padding itself is the model adapter's (``pad_vocab``: the built-in GPT's parameters,
Hugging Face's ``resize_token_embeddings``); a model whose adapter cannot pad is refused
before launch (``check_workload``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autotune.contract.strategy import NOTHING_TO_SET, Knob, Needs, Prior, PriorFacts, Strategy
from autotune.errors import UserError

if TYPE_CHECKING:
    from autotune.contract.context import TrainContext


@dataclass(kw_only=True, slots=True)
class VocabPaddingConfig:
    multiple: int = 64
    """Embedding and head rows are rounded up to a multiple of this."""

    def __post_init__(self) -> None:
        # Padding pays only in the tile sizes of matmul kernels: powers of two.
        if self.multiple not in (8, 16, 32, 64, 128, 256, 512, 1024):
            raise ValueError(f"multiple must be a power of two from 8 to 1024, got {self.multiple}")


def apply_vocab_padding(ctx: TrainContext, cfg: VocabPaddingConfig) -> None:
    ctx.check_needs(
        STRATEGY, cfg, "the model's adapter must know its embedding and head (the built-in GPT, hf: models)"
    )
    from autotune.workloads.adapter import NotSupported, adapter_for

    adapter = adapter_for(ctx.model)
    try:
        rows = adapter.pad_vocab(cfg.multiple)
    except NotSupported as e:
        raise UserError(f"strategy vocab_padding cannot pad this model: {e}") from None
    ctx.notes.append(f"vocab padded {adapter.shape().vocab_size} -> {rows} rows (multiple of {cfg.multiple})")


def check_workload(cfg: VocabPaddingConfig, workload: Any) -> None:
    """The workload's adapter must pad the vocabulary (``vocab``), not only name embed and head."""
    from autotune.workloads.structure import declared

    if "vocab" not in declared(workload.structure):
        raise UserError(
            f"vocab_padding: workload {workload.name} cannot pad its "
            "vocabulary (its model adapter does not support vocab)"
        )


def vocab_padding_cost(cfg: VocabPaddingConfig, terms: Any) -> None:
    """The cost model's term (``contract.cost.CostTerms``): the embedding and head grow to the
    padded rows, and with them their parameters, the head's FLOPs and the logits."""
    terms.vocab = -(-terms.vocab // cfg.multiple) * cfg.multiple


def vocab_padding_prior(facts: PriorFacts) -> Prior | None:
    """On a GPU rows to a multiple of 64 (tensor-core tiles)."""
    return Prior(knobs={"multiple": 64}) if facts.accelerator else None


MULTIPLES = (64, 128)
"""The row multiples searched."""


def search_knobs(vocab_size: int | None) -> tuple[Knob, ...] | str:
    """The multiples that pad this vocabulary; none where it is a multiple of each already
    (the tiny GPT's 2,048: a plan would carry a padding that pads nothing)."""
    pads = tuple(m for m in MULTIPLES if vocab_size is None or vocab_size % m)
    if not pads:
        return (
            f"the vocabulary ({vocab_size:,}) is already a multiple "
            f"of {' and '.join(map(str, MULTIPLES))}: nothing to pad"
        )
    return (Knob(name="multiple", choices=pads),)


STRATEGY = Strategy(
    name="vocab_padding",
    phase="swap",
    summary="pad the embedding and head rows to a multiple of 64/128 (padded logits dropped)",
    exact=True,
    config=VocabPaddingConfig,
    apply=apply_vocab_padding,
    changes=frozenset({"embedding", "head"}),
    needs=Needs(structure=frozenset({"embed", "head"})),
    check_workload=check_workload,
    cost=vocab_padding_cost,
    knobs=(Knob(name="multiple", choices=MULTIPLES),),
    prior=vocab_padding_prior,
    search_knobs=lambda facts: search_knobs(facts.vocab_size),
    # Padded rows the loss never sees: the same model, no launcher setting.
    exports={"accelerate": NOTHING_TO_SET, "deepspeed": NOTHING_TO_SET},
)
