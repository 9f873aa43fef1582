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

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from autotune.context import TrainContext
from autotune.errors import UserError
from autotune.strategy import Knob, Needs, Strategy
from autotune.workloads.adapter import adapter_for

BLOCK = 128
"""FlexAttention's default tile: the block mask keeps or drops (q, kv) tiles of this size."""


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


def keeps(q: torch.Tensor, kv: torch.Tensor, window: int, global_tokens: int) -> torch.Tensor:
    """Whether query position ``q`` attends to key position ``kv`` (broadcasting tensors)."""
    return (q >= kv) & ((q - kv < window) | (kv < global_tokens))


def dense_mask(seq_len: int, window: int, global_tokens: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The (T, T) boolean mask of :func:`keeps`, True where attention is kept."""
    i = torch.arange(seq_len, device=device)
    return keeps(i[:, None], i[None, :], window, global_tokens)


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


@dataclass(kw_only=True, slots=True)
class SparseKernel:
    """The :data:`~autotune.workloads.adapter.Attend` kernel of one setting, with its block
    masks (and dense masks, for the CPU backward) cached per (seq_len, device)."""

    window: int
    """See :class:`SparseAttentionConfig`."""
    global_tokens: int
    """See :class:`SparseAttentionConfig`."""
    block_masks: dict[tuple[int, torch.device], BlockMask] = field(default_factory=dict)
    """Block masks built so far."""
    dense_masks: dict[tuple[int, torch.device], torch.Tensor] = field(default_factory=dict)
    """Dense masks built so far (CPU with gradients only)."""
    compiled: Any = None
    """torch.compile(flex_attention), made on the first CUDA call."""

    def block_mask(self, seq_len: int, device: torch.device) -> BlockMask:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # the key q.device gives
        key = (seq_len, device)
        if key not in self.block_masks:
            window, global_tokens = self.window, self.global_tokens

            def mask_mod(b: Any, h: Any, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
                return keeps(q, kv, window, global_tokens)

            self.block_masks[key] = create_block_mask(mask_mod, None, None, seq_len, seq_len, device=device)
        return self.block_masks[key]

    def dense_mask(self, seq_len: int, device: torch.device) -> torch.Tensor:
        key = (seq_len, device)
        if key not in self.dense_masks:
            self.dense_masks[key] = dense_mask(seq_len, self.window, self.global_tokens, device)
        return self.dense_masks[key]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        if dropout_p:
            raise UserError(f"sparse_attention has no attention dropout (the model asks for {dropout_p}): set the model's dropout to 0")
        T, device = q.shape[-2], q.device
        if device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense_mask(T, device))
        attend = flex_attention
        if device.type == "cuda":
            if self.compiled is None:
                self.compiled = torch.compile(flex_attention)
            attend = self.compiled
        return attend(q, k, v, block_mask=self.block_mask(T, device))


def _check_window(window: int, seq_len: int) -> None:
    if window > seq_len:
        raise UserError(f"sparse_attention window {window} is longer than the sequence (seq_len {seq_len}): use a window of at most {seq_len}")


def check_workload(cfg: SparseAttentionConfig, workload: Any) -> None:
    """Before anything starts (run, show, a trial before launch): the window fits the sequence."""
    _check_window(cfg.window, workload.seq_len)


def apply_sparse_attention(ctx: TrainContext, cfg: SparseAttentionConfig) -> None:
    ctx.check_needs(STRATEGY, cfg, "declare the model's attention in Workload.structure")
    adapter = adapter_for(ctx.model)
    seq_len = adapter.shape().seq_len
    _check_window(cfg.window, seq_len)
    kernel = SparseKernel(window=cfg.window, global_tokens=cfg.global_tokens)
    kernel.block_mask(seq_len, ctx.device)  # built once, outside any compiled region
    if ctx.device.type == "cuda":
        kernel.compiled = torch.compile(flex_attention)  # made here, not while a caller's compile traces
    if ctx.device.type == "cpu":
        kernel.dense_mask(seq_len, ctx.device)
    adapter.set_attention(kernel=kernel)
    kept = unmasked_fraction(seq_len, cfg.window, cfg.global_tokens)
    ctx.notes.append(f"sparse attention: window {cfg.window}, {cfg.global_tokens} global tokens, {kept:.0%} of causal tiles kept")


STRATEGY = Strategy(
    name="sparse_attention",
    summary="sliding-window attention with global tokens (approximate)",
    exact=False,
    config=SparseAttentionConfig,
    apply=apply_sparse_attention,
    changes=frozenset({"attention"}),
    check_workload=check_workload,
    needs=Needs(structure=frozenset({"attention"})),
    conflicts=frozenset({"attention"}),
    knobs=(
        Knob(name="window", low=32, high=1024, log=True, integer=True),
        Knob(name="global_tokens", low=0, high=64, integer=True),
    ),
)
