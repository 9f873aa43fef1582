"""Sparse attention: each token attends to a sliding window of the tokens before it plus a
few global tokens at the start of the sequence (Longformer's pattern), instead of every
earlier token: work grows with T x window rather than T^2. The model sees less context, so
it learns something else: an approximate strategy, searched only when allowed and then
loss-checked against the exact baseline.

Declared, not implemented yet (roadmap item "sparse attention", no issue filed). It replaces
the attention kernel of the GPT's blocks, so it needs the built-in GPT, and it excludes the
attention strategy, whose backends all compute dense causal attention in that same place.
"""

from __future__ import annotations

from dataclasses import dataclass

from autotune.strategy import Knob, Needs, Strategy


@dataclass(kw_only=True, slots=True)
class SparseAttentionConfig:
    window: int = 256
    """Earlier tokens each token attends to, itself included."""
    global_tokens: int = 0
    """Tokens at the start of the sequence that every token also attends to (attention sinks)."""

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        if not 0 <= self.global_tokens <= 4096:
            raise ValueError(f"global_tokens must be from 0 to 4096, got {self.global_tokens}")


STRATEGY = Strategy(
    name="sparse_attention",
    summary="sliding-window attention with global tokens (approximate)",
    exact=False,
    config=SparseAttentionConfig,
    apply=None,
    needs=Needs(structure=frozenset({"attention", "gpt"})),
    conflicts=frozenset({"attention"}),
    knobs=(
        Knob(name="window", low=32, high=1024, log=True, integer=True),
        Knob(name="global_tokens", low=0, high=64, integer=True),
    ),
    issue="roadmap item sparse attention, no issue filed yet",
)
