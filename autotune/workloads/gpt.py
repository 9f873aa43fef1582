"""A GPT in the nanoGPT mould: pre-norm blocks, causal SDPA attention, GELU MLP, tied head.

Its structure: ``model.blocks`` (the list of transformer blocks), each block's ``attn`` and
``mlp``, ``model.embed`` (token embedding) and ``model.head`` (output projection, tied to the
embedding). Strategies never read these themselves: they ask the model's adapter
(``autotune.workloads.adapter.GPTAdapter``), which knows them. Two hooks serve it:
``attn.attend`` is the attention kernel (``set_attention`` swaps it), and the head may be wider
than the vocabulary (``pad_vocab``): logits past ``cfg.vocab_size`` are masked out of the loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from autotune.workloads.adapter import Attend, HeadLoss
from autotune.workloads.gpt_config import GPTConfig


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """PyTorch's SDPA, backend chosen by PyTorch: the default kernel."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused qkv projection.

    The fused weight's rows are head-major (Megatron's layout): head h's q, k and v rows are
    adjacent. A column split of the weight (tensor parallel) then gives every rank whole
    heads, so the forward reads the head count from the width it gets (``-1`` in the view).
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.attend: Attend = sdpa_causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # (B, T, 3 nh hs) -> 3 x (B, nh, T, hs); nh is n_heads / tensor-parallel degree
        q, k, v = self.qkv(x).view(B, T, -1, 3, self.head_dim).permute(3, 0, 2, 1, 4).unbind(0)
        y = self.attend(q, k, v, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh hs)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, bias=False)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model, bias=False)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, bias=False)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.head_loss: HeadLoss | None = None
        """Replaces head + loss in training (``GPTAdapter.set_head_loss``); None: the model's own."""
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers).
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith("proj.weight") else 0.02
            nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """``idx``, ``targets``: (B, T) token ids. Returns the mean cross-entropy if targets
        are given, else the logits (B, T, vocab)."""
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.embed(idx) + self.pos(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        # The norm's output is a temporary, never bound to a name: autograd keeps the norm's input
        # and the head's (cast) input, not it, so it is freed before the loss (in eager mode a
        # local held it through the loss: 64 MiB more at phase8-small's peak with vocab padding).
        if targets is not None and self.head_loss is not None:
            return self.head_loss(self.norm(x), self.head.weight, targets, self.cfg.vocab_size)
        logits = self.head(self.norm(x))  # (B, T, V), or (B, T, V_padded) with vocab padding
        if targets is None:
            return logits[..., : self.cfg.vocab_size]
        return self.loss(logits, targets)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of ``logits`` (B, T, V or V_padded) against ``targets`` (B, T)."""
        V = self.cfg.vocab_size
        if logits.shape[-1] != V:
            # Padded columns leave the softmax as exp(-inf) = 0: the loss and gradients are the
            # unpadded model's. Masking keeps the aligned row width; slicing to V instead was
            # measured 11% slower under compile (bench/results/padding_probe_h200.jsonl).
            padding = torch.arange(logits.shape[-1], device=logits.device) >= V
            logits = logits.masked_fill(padding, float("-inf"))
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def matmul_params(self) -> int:
        """Weights that take part in a matmul per token: blocks plus the output head (the
        embedding lookup and position table are not matmuls; padded head rows do no work
        of the model)."""
        shapes = [param_shape(p) for b in self.blocks for p in b.parameters()]
        blocks = sum(math.prod(shape) for shape in shapes if len(shape) == 2)
        return blocks + self.cfg.vocab_size * self.cfg.d_model

    def flops_per_token(self) -> int:
        """Training FLOPs per token, PaLM appendix B: 6 N + 12 L d T (forward + backward)."""
        c = self.cfg
        return 6 * self.matmul_params() + 12 * c.n_layers * c.d_model * c.seq_len


def param_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's shape, also after ZeRO stage 3 partitioned it away (DeepSpeed leaves an
    empty tensor in the module and keeps the shape in ``ds_shape``)."""
    return getattr(p, "ds_shape", p.shape)
