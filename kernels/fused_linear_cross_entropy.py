"""The output head fused with the mean cross-entropy: Triton kernels, their launchers and one
``autograd.Function``, in the Liger-Kernel layout (the plain-torch reference is
``reference.linear_cross_entropy``).

The (tokens x vocab) logits never exist whole. The forward computes the head's matmul in
(BLOCK_M tokens x BLOCK_N vocab) tiles, each summed over d in BLOCK_K steps with fp32
accumulation, and keeps per token an online logsumexp (running max and sum of exponentials)
and the target's logit; only those two floats per token (and vocab range of the grid) reach
memory. The backward works as
cut-cross-entropy's (Wijmans et al., 2024): each program recomputes one logits tile from the
saved logsumexp, turns it into the gradient of the logits, ``(softmax - onehot) * grad / count``,
and from that same tile adds its share of both gradients, ``d hidden += g @ W`` and
``d W += g.T @ hidden``, with fp32 atomics. So a backward costs three matmuls of the head's size
and no logits; the atomics add in no fixed order: the gradients are exact up to that order.

Inputs in bf16 (or fp16) run the tensor cores with fp32 accumulation; fp32 inputs use TF32 only
where torch's own matmuls would (``torch.set_float32_matmul_precision``). The loss is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_INTERPRET = triton.knobs.runtime.interpret
"""Under ``TRITON_INTERPRET=1`` (the CPU tests) kernels run in numpy, which has no bfloat16:
dot operands go in as fp32 (bf16 products are exact in fp32, as on the tensor cores), and one
small tile keeps the interpreter fast and the shapes' tails tested."""

if _INTERPRET:
    _FORWARD_CONFIGS = _BACKWARD_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16})]
else:
    # Hopper (H100/H200): 128-row tiles for its warp-group MMAs, K steps of 64 bf16 (128 bytes);
    # the forward's wider tile halves the re-reads of the hidden states, the backward holds a
    # logits tile and two gradient tiles, so it stays at 128 x 128 or less.
    _FORWARD_CONFIGS = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    ]
    _BACKWARD_CONFIGS = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    ]
_SPLIT_ALIGN = 256
"""The widest BLOCK_N: the forward's vocab ranges are multiples of it."""

# Shapes: hidden (N, D), weight (V or more rows, D), both row-major; a program's rows of them are
# (BLOCK_M, 1) and (BLOCK_N, 1) blocks of row pointers (int64 offsets: N * D may pass 2**31).
# D and SPLIT_COLS are loop bounds, so constexprs: one compilation per model width, as the
# autotuning key has anyway (Triton 3.6's interpreter cannot loop to a runtime bound under numpy 2.4).


@triton.jit
def _logits_tile(h_rows, w_rows, rows, cols, D: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """hidden[rows] @ weight[cols].T in fp32: (BLOCK_M, BLOCK_N), 0 outside rows x cols."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ks = offs_k < D
        h = tl.load(h_rows + offs_k[None, :], mask=rows[:, None] & ks[None, :], other=0.0)
        w = tl.load(w_rows + offs_k[None, :], mask=cols[:, None] & ks[None, :], other=0.0)
        acc = tl.dot(h.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.autotune(configs=_FORWARD_CONFIGS, key=["D", "V"])
@triton.jit
def _forward_kernel(h_ptr, w_ptr, targets_ptr, lse_ptr, target_logit_ptr, N, V, D: tl.constexpr,
                    SPLIT_COLS: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (i, s): tokens i*BLOCK_M.. over vocab columns s*SPLIT_COLS..; writes into row s of
    lse and target_logit (splits, N) their logsumexp over those columns, and the target's logit
    where it lies there (else 0)."""
    split = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m < N
    h_rows = h_ptr + offs_m.to(tl.int64)[:, None] * D
    target = tl.load(targets_ptr + offs_m, mask=rows, other=-1)

    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    sum_exp = tl.zeros((BLOCK_M,), tl.float32)  # of logits - running_max
    target_logit = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, SPLIT_COLS, BLOCK_N):
        if split * SPLIT_COLS + n0 < V:  # not past the last range's end
            offs_n = split * SPLIT_COLS + n0 + tl.arange(0, BLOCK_N)
            cols = offs_n < V  # the true vocabulary: a padded head's extra rows are never read
            logits = _logits_tile(h_rows, w_ptr + offs_n.to(tl.int64)[:, None] * D, rows, cols, D, DOT_DTYPE,
                                  INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
            logits = tl.where(cols[None, :], logits, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(logits, axis=1))  # finite: the tile has a column < V
            sum_exp = sum_exp * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
            running_max = new_max
            target_logit += tl.sum(tl.where(offs_n[None, :] == target[:, None], logits, 0.0), axis=1)
    tl.store(lse_ptr + split * N + offs_m, running_max + tl.log(sum_exp), mask=rows)
    tl.store(target_logit_ptr + split * N + offs_m, target_logit, mask=rows)


@triton.autotune(configs=_BACKWARD_CONFIGS, key=["D", "V"], reset_to_zero=["dh_ptr", "dw_ptr"])
@triton.jit
def _backward_kernel(h_ptr, w_ptr, targets_ptr, lse_ptr, scale_ptr, dh_ptr, dw_ptr, N, V, D: tl.constexpr,
                     IGNORE_INDEX: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Program p: one (BLOCK_M, BLOCK_N) logits tile, recomputed; adds its products with the
    weight's and the hidden states' rows into the fp32 gradients dh (N, D) and dw (V rows, D)."""
    m_tiles = tl.cdiv(N, BLOCK_M)
    n_tiles = tl.cdiv(V, BLOCK_N)
    # Grouped order (Triton's matmul tutorial): programs running together share tiles in L2.
    pid_m, pid_n = tl.swizzle2d(tl.program_id(0) // n_tiles, tl.program_id(0) % n_tiles, m_tiles, n_tiles, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m < N
    cols = offs_n < V
    h_rows = h_ptr + offs_m.to(tl.int64)[:, None] * D
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * D
    target = tl.load(targets_ptr + offs_m, mask=rows, other=IGNORE_INDEX)
    lse = tl.load(lse_ptr + offs_m, mask=rows, other=0.0)

    logits = _logits_tile(h_rows, w_rows, rows, cols, D, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    grad = tl.exp(logits - lse[:, None]) - tl.where(offs_n[None, :] == target[:, None], 1.0, 0.0)
    keep = (target != IGNORE_INDEX)[:, None] & cols[None, :]
    # Rounded to the inputs' dtype for the tensor cores, as the unfused head's backward does.
    grad = tl.where(keep, grad * tl.load(scale_ptr), 0.0).to(h_ptr.dtype.element_ty).to(DOT_DTYPE)

    dh_rows = dh_ptr + offs_m.to(tl.int64)[:, None] * D
    dw_rows = dw_ptr + offs_n.to(tl.int64)[:, None] * D
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ks = offs_k < D
        h = tl.load(h_rows + offs_k[None, :], mask=rows[:, None] & ks[None, :], other=0.0)
        w = tl.load(w_rows + offs_k[None, :], mask=cols[:, None] & ks[None, :], other=0.0)
        dh = tl.dot(grad, w.to(DOT_DTYPE), input_precision=INPUT_PRECISION)  # (BLOCK_M, BLOCK_K)
        tl.atomic_add(dh_rows + offs_k[None, :], dh, mask=rows[:, None] & ks[None, :], sem="relaxed")
        dw = tl.dot(tl.trans(grad), h.to(DOT_DTYPE), input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_K)
        tl.atomic_add(dw_rows + offs_k[None, :], dw, mask=cols[:, None] & ks[None, :], sem="relaxed")


def _dot_options(dtype: torch.dtype) -> dict:
    """The kernels' dot settings for inputs of ``dtype``: its operands' dtype (fp32 in the
    interpreter, see ``_INTERPRET``), and TF32 for fp32 inputs only where torch's own matmuls
    use it (``torch.set_float32_matmul_precision``; bf16 and fp16 ignore it)."""
    half = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    dot_dtype = tl.float32 if _INTERPRET else half.get(dtype, tl.float32)
    tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return {"DOT_DTYPE": dot_dtype, "INPUT_PRECISION": "tf32" if tf32 else "ieee"}


def _split_cols(n_tokens: int, vocab: int, device: torch.device) -> int:
    """The vocab columns of each program of the forward's grid: so many that the programs fill
    every SM twice at 128 tokens a tile (two on a CPU), at least 512, a multiple of _SPLIT_ALIGN."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    splits = max(1, min(triton.cdiv(2 * sms, triton.cdiv(max(n_tokens, 1), 128)), vocab // 512))
    return triton.cdiv(triton.cdiv(vocab, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN


class LinearCrossEntropyFunction(torch.autograd.Function):
    """loss = mean over targets != ignore_index of cross_entropy(hidden @ weight[:vocab].T, targets)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                vocab_size: int) -> torch.Tensor:
        n_tokens, d = hidden.shape
        split_cols = _split_cols(n_tokens, vocab_size, hidden.device)
        splits = triton.cdiv(vocab_size, split_cols)
        lse_parts = torch.empty((splits, n_tokens), dtype=torch.float32, device=hidden.device)
        target_parts = torch.empty_like(lse_parts)

        def grid(meta):  # one program a token tile and vocab range
            return (triton.cdiv(n_tokens, meta["BLOCK_M"]), splits)

        _forward_kernel[grid](hidden, weight, targets, lse_parts, target_parts, n_tokens, vocab_size, D=d,
                              SPLIT_COLS=split_cols, **_dot_options(hidden.dtype))
        lse = torch.logsumexp(lse_parts, dim=0)  # (N,)
        valid = targets != ignore_index
        count = valid.sum().clamp(min=1)
        loss = torch.where(valid, lse - target_parts.sum(dim=0), 0.0).sum() / count
        ctx.save_for_backward(hidden, weight, targets, lse, count)
        ctx.ignore_index, ctx.vocab_size = ignore_index, vocab_size
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        hidden, weight, targets, lse, count = ctx.saved_tensors
        n_tokens, d = hidden.shape
        scale = (grad_loss.float() / count).reshape(1)  # a tensor: no host sync
        dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        vocab_size = ctx.vocab_size

        def grid(meta):  # one program a logits tile
            return (triton.cdiv(n_tokens, meta["BLOCK_M"]) * triton.cdiv(vocab_size, meta["BLOCK_N"]),)

        _backward_kernel[grid](hidden, weight, targets, lse, scale, dh, dw, n_tokens, vocab_size, D=d,
                               IGNORE_INDEX=ctx.ignore_index, GROUP_M=8, **_dot_options(hidden.dtype))
        return dh.to(hidden.dtype), dw.to(weight.dtype), None, None, None


@torch.compiler.disable  # a graph break: the model compiles up to the hidden states; the loss runs its own kernels
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """The mean cross-entropy of ``hidden @ weight.T`` against ``targets``, fused: the maths of
    ``reference.linear_cross_entropy`` without its logits.

    hidden: (..., d); weight: (padded vocab, d), the head's or a tied embedding's (its gradient
    then accumulates into the embedding through autograd); targets: hidden's leading shape.
    Columns at or past ``vocab_size`` (default: all) are left out of the softmax; targets must
    be below it or ``ignore_index``. The mean is over the other targets, 0 when there are none.
    Under autocast the matmul runs in the autocast dtype, as the head's ``nn.Linear`` would.
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    if not 0 < vocab_size <= weight.shape[0]:
        raise ValueError(f"vocab_size {vocab_size} is not in 1..{weight.shape[0]} (the weight's rows)")
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(dtype).contiguous()
    return LinearCrossEntropyFunction.apply(hidden, weight.to(dtype).contiguous(), targets.reshape(-1).contiguous(),
                                            ignore_index, vocab_size)
