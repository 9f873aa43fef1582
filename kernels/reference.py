"""Plain-torch references of the Triton kernels in this package: what each kernel must equal
up to floating-point order. The tests and the benchmarks import them from here, so both
compare against the same maths; no triton needed."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """The output head and the mean cross-entropy, unfused: the (tokens x vocab) logits in
    the inputs' dtype, as the model's head writes them, then the loss in fp32.

    hidden: (..., d); weight: (padded vocab, d), the head's (or the tied embedding's);
    targets: hidden's leading shape. Columns at or past ``vocab_size`` (the true vocabulary of a padded
    head) are left out of the softmax. The mean is over targets other than ``ignore_index``;
    0 when there are none.
    """
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T  # (tokens, padded vocab)
    if vocab_size is not None:
        logits = logits[:, :vocab_size]
    targets = targets.reshape(-1)
    loss = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
    return loss / (targets != ignore_index).sum().clamp(min=1)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm block's residual add and the LayerNorm after it, unfused:
    ``(layer_norm(s), s)`` with ``s = x + residual`` in the inputs' dtype (the new residual
    stream). torch's layer_norm computes in fp32 for bf16 inputs and rounds its output once."""
    s = x + residual
    return F.layer_norm(s, (s.shape[-1],), weight, bias, eps), s


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same with an RMSNorm: ``(rms_norm(s), s)``, ``s = x + residual``; torch's rms_norm
    computes in fp32 for bf16 inputs, the weight's product included, and rounds once."""
    s = x + residual
    return F.rms_norm(s, (s.shape[-1],), weight, eps), s
