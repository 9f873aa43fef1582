"""The built-in GPT's config, without torch: a plan's workload is checked from it (the mesh's
divisibility, a strategy's ``check_workload``) before any model is built
(:mod:`autotune.workloads.gpt` builds the model and re-exports it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, slots=True)
class GPTConfig:
    vocab_size: int
    """Tokens the model can emit; data ids are below it. Vocab padding widens the embedding
    and head beyond it, never this."""
    seq_len: int
    """Context length: positions in the learned position embedding."""
    d_model: int
    """Width of the residual stream."""
    n_layers: int
    """Number of transformer blocks."""
    n_heads: int
    """Attention heads; d_model must divide by it."""
    d_ff: int = 0
    """MLP hidden width; 0 means 4 * d_model."""
    dropout: float = 0.0
    """Dropout on attention output and MLP output (0 for speed benchmarks)."""
    tie_embeddings: bool = True
    """Share the token-embedding matrix with the output head."""

    def __post_init__(self) -> None:
        # Overrides come from plan files untyped: a bad one is a one-line error, not a traceback.
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "d_ff"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not (0 if name == "d_ff" else 1) <= value <= 2**24
            ):
                raise ValueError(
                    f"{name} must be an integer from {0 if name == 'd_ff' else 1} to {2**24}, got {value!r}"
                )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} must divide by n_heads {self.n_heads}")
        if self.d_ff == 0:
            self.d_ff = 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads
