"""sparse_attention's torch side: the mask predicate, the dense mask and the FlexAttention
kernel (``strategies/sparse_attention.py`` imports this inside ``apply``, so that the catalog
loads without torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from autotune import devices
from autotune.errors import UserError


def keeps(q: torch.Tensor, kv: torch.Tensor, window: int, global_tokens: int) -> torch.Tensor:
    """Whether query position ``q`` attends to key position ``kv`` (broadcasting tensors)."""
    return (q >= kv) & ((q - kv < window) | (kv < global_tokens))


def dense_mask(seq_len: int, window: int, global_tokens: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The (T, T) boolean mask of :func:`keeps`, True where attention is kept."""
    i = torch.arange(seq_len, device=device)
    return keeps(i[:, None], i[None, :], window, global_tokens)


@dataclass(kw_only=True, slots=True)
class SparseKernel:
    """The :data:`~autotune.workloads.adapter.Attend` kernel of one setting, with its block
    masks (and dense masks, for the CPU backward) cached per (seq_len, device)."""

    window: int
    """See :class:`~autotune.strategies.sparse_attention.SparseAttentionConfig`."""
    global_tokens: int
    """See :class:`~autotune.strategies.sparse_attention.SparseAttentionConfig`."""
    block_masks: dict[tuple[int, torch.device], BlockMask] = field(default_factory=dict)
    """Block masks built so far."""
    dense_masks: dict[tuple[int, torch.device], torch.Tensor] = field(default_factory=dict)
    """Dense masks built so far (CPU with gradients only)."""
    compiled: Any = None
    """torch.compile(flex_attention), made on the first CUDA call."""

    def block_mask(self, seq_len: int, device: torch.device) -> BlockMask:
        if device.index is None:
            device = devices.of(device).torch_device()  # the current one: the key q.device gives
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

    def compile(self) -> None:
        """Make the compiled flex_attention now (at apply, not while a caller's compile traces)."""
        self.compiled = torch.compile(flex_attention)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        if dropout_p:
            raise UserError(
                "sparse_attention has no attention dropout (the model "
                f"asks for {dropout_p}): set the model's dropout to 0"
            )
        T, device = q.shape[-2], q.device
        if device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense_mask(T, device))
        attend = flex_attention
        if devices.of(device).accelerator:
            if self.compiled is None:
                self.compiled = torch.compile(flex_attention)
            attend = self.compiled
        return attend(q, k, v, block_mask=self.block_mask(T, device))
