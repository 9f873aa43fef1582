"""Bring your own model: `autotune run` / `autotune plan --workload examples.custom_workload:build`.

The factory returns an ``autotune.workloads.Workload``. The model's forward takes (B, T)
token ids and targets and returns the mean loss. This one declares no structure, so
strategies that need transformer blocks (activation checkpointing, FSDP per block...) are
left out for it, with the reason shown by `autotune strategies --explain`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from autotune.workloads import Workload

VOCAB = 2048
SEQ_LEN = 64


class ConvLM(nn.Module):
    """A small causal convolutional language model."""

    def __init__(self, vocab: int = VOCAB, width: int = 128, kernel: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.conv = nn.Conv1d(width, width, kernel, padding=kernel - 1)
        self.out = nn.Linear(width, vocab)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.embed(idx).transpose(1, 2)  # (B, C, T)
        x = F.gelu(self.conv(x)[..., :T]).transpose(1, 2)  # causal: drop the look-ahead
        logits = self.out(x)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def build() -> Workload:
    return Workload(name="examples.custom_workload:build", build_model=ConvLM, vocab_size=VOCAB, seq_len=SEQ_LEN)
