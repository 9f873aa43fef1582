"""Sparse attention: each token attends to a sliding window of the tokens before it plus a
few global tokens at the start of the sequence (Longformer's pattern), instead of every
earlier token: work grows with T x window rather than T^2. The model sees less context, so
it learns something else: an approximate strategy, searched only when allowed and then
loss-checked against the exact baseline.

The kernel is FlexAttention (``torch.nn.attention.flex_attention``) with a block mask built
from :func:`keeps` (causal, and within the window or on a global token) once per sequence
length and device: the kernel skips the (q, kv) tiles the mask drops entirely. On CUDA
flex_attention runs compiled, as PyTorch asks (eager flex is a slow reference). PyTorch's
FlexAttention has no backward on the CPU (torch 2.13 refuses inputs that require grad,
compiled or not), so there the kernel computes the same masked softmax with SDPA and a dense
boolean mask when gradients are needed, and with eager flex_attention otherwise.

Any model whose adapter can swap its attention kernel takes it (``set_attention(kernel=...)``);
it excludes the attention strategy, whose backends compute dense causal attention in that
same place. The attention has no dropout: a model with attention dropout is refused when it
trains. :func:`unmasked_fraction` says how much of the causal attention work is left, for
the cost model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autotune import devices
from autotune.contract.strategy import Knob, Needs, Prior, PriorFacts, Strategy
from autotune.errors import UserError

if TYPE_CHECKING:
    from autotune.contract.context import TrainContext

BLOCK = 128
"""FlexAttention's default tile: the block mask keeps or drops (q, kv) tiles of this size."""
WINDOWS = (32, 1024)
"""The window knob's searched range (log scale), narrowed below the sequence length by
:func:`knobs_for`: a window as long as the sequence is dense attention."""
_IMPL = ("keeps", "dense_mask", "SparseKernel")
"""Names of the torch side (``_sparse_attention_impl``), importable from here too."""


def __getattr__(name: str) -> Any:
    if name in _IMPL:
        from autotune.strategies import _sparse_attention_impl

        return getattr(_sparse_attention_impl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def unmasked_fraction(seq_len: int, window: int, global_tokens: int, block: int = BLOCK) -> float:
    """Fraction of the causal (q, kv) tiles of ``block`` x ``block`` (those on or below the
    diagonal) that the mask keeps at least one entry of: the share of dense causal attention's
    tile work that FlexAttention still does."""
    if seq_len < 1 or block < 1:
        raise ValueError(f"seq_len and block must be at least 1, got {seq_len} and {block}")
    n = -(-seq_len // block)
    kept = 0
    for qb in range(n):
        q_lo = qb * block
        for kb in range(qb + 1):
            kv_lo, kv_hi = kb * block, min((kb + 1) * block, seq_len) - 1
            # The nearest pair with q >= kv is q_lo and kv_hi (or a diagonal pair: distance 0).
            kept += max(0, q_lo - kv_hi) < window or kv_lo < global_tokens
    return kept / (n * (n + 1) // 2)


def _check_window(window: int, seq_len: int) -> None:
    if window > seq_len:
        raise UserError(
            f"sparse_attention window {window} is longer than the sequence "
            f"(seq_len {seq_len}): use a window of at most {seq_len}"
        )


def check_workload(cfg: SparseAttentionConfig, workload: Any) -> None:
    """Before anything starts (run, show, a trial before launch): the window fits the sequence."""
    _check_window(cfg.window, workload.seq_len)


def knobs_for(seq_len: int) -> tuple[Knob, ...]:
    """The knobs searched on sequences of ``seq_len`` tokens: windows shorter than the
    sequence only (one as long is dense attention, a longer one is refused)."""
    high = min(WINDOWS[1], seq_len - 1)
    if high < 1:
        return STRATEGY.knobs  # a one-token sequence: nothing to narrow to
    return (Knob(name="window", low=min(WINDOWS[0], high), high=high, log=True, integer=True), STRATEGY.knobs[1])


def sparse_attention_cost(cfg: SparseAttentionConfig, terms: Any) -> None:
    """The cost model's term (``contract.cost.CostTerms``): FlexAttention computes only the tiles
    the block mask keeps, so the attention FLOPs (PaLM's 12 L (nh hs) s per token) scale by
    :func:`unmasked_fraction` (the recomputed forward of checkpointed blocks, added after, is
    counted dense)."""
    shape = terms.shape
    skipped = terms.attention_flops * (1.0 - unmasked_fraction(shape.seq_len, cfg.window, cfg.global_tokens))
    terms.block_flops -= skipped
    terms.attention_flops -= skipped


def apply_sparse_attention(ctx: TrainContext, cfg: SparseAttentionConfig) -> None:
    from autotune.strategies._sparse_attention_impl import SparseKernel
    from autotune.workloads.adapter import adapter_for

    ctx.check_needs(STRATEGY, cfg, "declare the model's attention in Workload.structure")
    adapter = adapter_for(ctx.model)
    seq_len = adapter.shape().seq_len
    _check_window(cfg.window, seq_len)
    kernel = SparseKernel(window=cfg.window, global_tokens=cfg.global_tokens)
    kernel.block_mask(seq_len, ctx.device)  # built once, outside any compiled region
    if devices.of(ctx.device).accelerator:
        kernel.compile()  # made here, not while a caller's compile traces
    if ctx.device.type == "cpu":
        kernel.dense_mask(seq_len, ctx.device)
    adapter.set_attention(kernel=kernel)
    kept = unmasked_fraction(seq_len, cfg.window, cfg.global_tokens)
    ctx.notes.append(
        f"sparse attention: window {cfg.window}, {cfg.global_tokens} global tokens, {kept:.0%} of causal tiles kept"
    )


SPARSE_PRIOR_MIN_SEQ = 4096
"""Shortest sequence the sparse-attention prior turns it on for. Measured on one H200 (torch
2.11, compiled FlexAttention, window 1024 + 64 global tokens, against flash SDPA): 1.55x at
phase8-long's seq 8192 (bench/results/approx/sparse_phase8-long_h200.jsonl), 0.98x at seq 1024,
where the window keeps most of the causal tiles anyway."""
PRIOR_WINDOW, PRIOR_GLOBAL_TOKENS = 1024, 64
"""The prior's window and global tokens: the measured setting above."""


def sparse_attention_prior(facts: PriorFacts) -> Prior | None:
    """On a GPU, for sequences of SPARSE_PRIOR_MIN_SEQ tokens and more: a 1024-token window and
    64 global tokens (the settings measured above)."""
    if not facts.accelerator or facts.seq_len is None or facts.seq_len < SPARSE_PRIOR_MIN_SEQ:
        return None
    return Prior(knobs={"window": PRIOR_WINDOW, "global_tokens": PRIOR_GLOBAL_TOKENS})


STRATEGY = Strategy(
    name="sparse_attention",
    phase="swap",
    summary="sliding-window attention with global tokens (approximate)",
    exact=False,
    config=SparseAttentionConfig,
    apply=apply_sparse_attention,
    changes=frozenset({"attention"}),
    check_workload=check_workload,
    needs=Needs(structure=frozenset({"attention"})),
    conflicts=frozenset({"attention"}),
    knobs=(
        Knob(name="window", low=WINDOWS[0], high=WINDOWS[1], log=True, integer=True),
        Knob(name="global_tokens", low=0, high=64, integer=True),
    ),
    cost=sparse_attention_cost,
    # A window as long as the sequence is dense attention: a search samples shorter ones.
    search_knobs=lambda facts: knobs_for(facts.seq_len),
    prior=sparse_attention_prior,
)
