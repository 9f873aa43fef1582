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
