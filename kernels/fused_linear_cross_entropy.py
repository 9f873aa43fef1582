"""The output head fused with the mean cross-entropy: a Triton kernel, its launcher and one
``autograd.Function``, in the Liger-Kernel layout (the plain-torch reference is
``reference.linear_cross_entropy``).

The (tokens x vocab) logits never exist whole. The tokens go through the head in chunks of a
bounded size (``chunk_tokens``: about 1 GiB of logits each). For each chunk:

1. the head's matmul writes the chunk's logits (cuBLAS, fp32 accumulation, in the inputs'
   dtype, as the unfused head's ``nn.Linear`` does);
2. one Triton program per token reads its row of logits twice, in vocab tiles: the first pass
   keeps an online logsumexp (running max and sum of exponentials) and picks the target's
   logit, which give the token's loss; the second overwrites the row, in place, with the
   gradient of the mean loss, ``(softmax - onehot) / count`` (0 on ignored tokens and on the
   columns of a padded vocabulary);
3. both gradients are taken from that chunk in the same pass: ``d hidden = g @ W`` into its
   rows of the result, and ``d W += g.T @ hidden``, accumulated over the chunks in fp32.

So the forward does the three matmuls of the head's size that the unfused forward and backward
do, and the logits make three trips through memory (written, read twice, the second time while
written over) instead of the six or more of an unfused log-softmax and its backward; peak memory
holds one chunk of logits and the fp32 weight gradient, never all the logits. The backward only
scales the two saved gradients by the loss's gradient. The same maths as the reference up to
the order of floating-point sums: an exact kernel. Under ``torch.no_grad`` (evaluation) the
second pass and the gradient matmuls are skipped.

Liger-Kernel's ``fused_linear_cross_entropy`` is built the same way (chunks of tokens, the
gradient in the forward); here the weight's gradient accumulates in fp32 rather than in the
weight's dtype, the row kernel reads each tile once per pass, and the chunks are sized from
memory rather than from the ratio of vocabulary to width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from autotune.kernels import chunking

_INTERPRET = triton.knobs.runtime.interpret
"""Under ``TRITON_INTERPRET=1`` (the CPU tests) the kernel runs in numpy: a small tile keeps the
interpreter fast and the rows' tails tested."""

BLOCK_V = 64 if _INTERPRET else 4096
"""Vocabulary columns a program handles at once: 4096 bf16 is 8 KiB a load, 16 per thread."""
NUM_WARPS = 8
"""Warps of a program: 16 bf16 columns a thread a load at BLOCK_V 4096."""
CHUNK_BYTES = chunking.CHUNK_BYTES
"""The logits of one chunk of tokens take at most about this much memory (the bench sweeps it)."""


@triton.jit
def _loss_and_grad_kernel(
    logits_ptr,
    stride,
    targets_ptr,
    scale_ptr,
    loss_ptr,
    V: tl.constexpr,
    WIDTH: tl.constexpr,
    IGNORE_INDEX: tl.constexpr,
    GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Program i: row i of the (chunk, WIDTH) logits. Writes the row's loss (0 if ignored) and,
    with GRAD, the gradient of the mean loss over the row itself (columns past V get 0).

    V and WIDTH are loop bounds, so constexprs: one compilation per vocabulary (Triton 3.6's
    interpreter cannot loop to a runtime bound under numpy 2.4). Programs looping over several
    rows, to keep a wave's rows in L2 between the two passes, measured 3-13% slower on an H100
    (bench/README.md, "Fused head + cross-entropy")."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride
    target = tl.load(targets_ptr + row)
    counted = target != IGNORE_INDEX

    running_max = float("-inf")
    sum_exp = 0.0  # of logits - running_max
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))  # finite: the tile has a column < V
        sum_exp = sum_exp * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(sum_exp)
    in_vocab = counted & (target >= 0) & (target < V)
    target_logit = tl.load(row_ptr + tl.where(in_vocab, target, 0), mask=in_vocab, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(counted, lse - target_logit, 0.0))

    if GRAD:
        scale = tl.where(counted, tl.load(scale_ptr), 0.0)
        for v0 in range(0, WIDTH, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            # exp(-inf) = 0 past V
            x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            grad = (tl.exp(x - lse) - tl.where(offs == target, 1.0, 0.0)) * scale
            tl.store(row_ptr + offs, grad.to(logits_ptr.dtype.element_ty), mask=offs < WIDTH)


def chunk_tokens(n_tokens: int, width: int, element_size: int) -> int:
    """Tokens per chunk (``chunking.chunk_tokens`` at this module's CHUNK_BYTES)."""
    return chunking.chunk_tokens(n_tokens, width, element_size, CHUNK_BYTES)


_ACCUMULATE_OUT: bool | None = None
"""Whether this torch's ``addmm`` takes ``out_dtype`` with ``out`` (the fp32 accumulation in
place); found by the first call on CUDA, then never asked again."""


def _weight_grad_into(acc: torch.Tensor | None, grad: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``acc + grad.T @ hidden`` in fp32 (``grad.T @ hidden`` where acc is None): on CUDA one
    cuBLAS call with fp32 output (``out_dtype``, torch 2.9+), in place where this torch takes
    ``out``; elsewhere (the CPU's interpreter tests) the product is upcast."""
    global _ACCUMULATE_OUT
    if grad.dtype == torch.float32:
        return grad.T @ hidden if acc is None else acc.addmm_(grad.T, hidden)
    if grad.device.type == "cpu":
        product = (grad.T @ hidden).float()
        return product if acc is None else acc.add_(product)
    if acc is None:
        return torch.mm(grad.T, hidden, out_dtype=torch.float32)
    if _ACCUMULATE_OUT is None:
        try:
            torch.addmm(acc, grad.T, hidden, out_dtype=torch.float32, out=acc)
            _ACCUMULATE_OUT = True
            return acc
        except (TypeError, RuntimeError):
            _ACCUMULATE_OUT = False
    if _ACCUMULATE_OUT:
        return torch.addmm(acc, grad.T, hidden, out_dtype=torch.float32, out=acc)
    return torch.addmm(acc, grad.T, hidden, out_dtype=torch.float32)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """loss = mean over targets != ignore_index of cross_entropy(hidden @ weight[:vocab].T, targets)."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
        vocab_size: int,
        chunk: int,
    ) -> torch.Tensor:
        """hidden (N, d) in the matmuls' dtype; weight (rows, d) in its own (an fp32 master
        weight under autocast: cast here, its fp32 gradient returned without a bf16 round trip)."""
        n_tokens, width = hidden.shape[0], weight.shape[0]
        grad = any(ctx.needs_input_grad[:2])
        w = weight.to(hidden.dtype)
        counted = (targets != ignore_index).sum()
        scale = (1.0 / counted.clamp(min=1).float()).reshape(1)  # a tensor: no host sync
        losses = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        d_hidden = torch.empty_like(hidden) if grad else None
        d_weight = None
        for start in range(0, n_tokens, chunk):
            stop = min(start + chunk, n_tokens)
            h = hidden[start:stop]
            logits = h @ w.T  # (chunk, width), the inputs' dtype
            _loss_and_grad_kernel[(stop - start,)](
                logits,
                logits.stride(0),
                targets[start:stop],
                scale,
                losses[start:stop],
                V=vocab_size,
                WIDTH=width,
                IGNORE_INDEX=ignore_index,
                GRAD=grad,
                BLOCK_V=BLOCK_V,
                num_warps=NUM_WARPS,
            )
            if grad:  # logits now hold the gradient of the loss in them
                torch.mm(logits, w, out=d_hidden[start:stop])
                d_weight = _weight_grad_into(d_weight, logits, h)
            del logits
        if grad and d_weight is None:  # no tokens
            d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.weight_dtype = weight.dtype
        return losses.sum() * scale[0]

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        d_hidden, d_weight = ctx.saved_tensors
        return (
            d_hidden * grad_loss.to(d_hidden.dtype),
            d_weight.mul_(grad_loss).to(ctx.weight_dtype),
            None,
            None,
            None,
            None,
        )


@torch.compiler.disable  # a graph break: the model compiles up to the hidden states; the loss runs its own kernels
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """The mean cross-entropy of ``hidden @ weight.T`` against ``targets``, fused: the maths of
    ``reference.linear_cross_entropy`` without its whole logits.

    hidden: (..., d); weight: (padded vocab, d), the head's or a tied embedding's (its gradient
    then accumulates into the embedding through autograd); targets: hidden's leading shape.
    Columns at or past ``vocab_size`` (default: all) are left out of the softmax; targets must
    be below it or ``ignore_index``. The mean is over the other targets, 0 when there are none.
    ``chunk``: tokens per chunk (default :func:`chunk_tokens`). Under autocast the matmuls run in
    the autocast dtype, as the head's ``nn.Linear`` would.
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    if not 0 < vocab_size <= weight.shape[0]:
        raise ValueError(f"vocab_size {vocab_size} is not in 1..{weight.shape[0]} (the weight's rows)")
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(dtype).contiguous()
    if chunk is None:
        chunk = chunk_tokens(hidden.shape[0], weight.shape[0], hidden.element_size())
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 token, got {chunk}")
    with torch.autocast(device, enabled=False):
        return LinearCrossEntropyFunction.apply(
            hidden, weight.contiguous(), targets.reshape(-1).contiguous(), ignore_index, vocab_size, chunk
        )
