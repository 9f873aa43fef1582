"""The output head's three matmuls in Triton, with the cross-entropy folded into them: the
``matmuls="triton"`` path of ``fused_linear_cross_entropy`` (its ``autograd.Function`` and
reference are that module's and ``reference.linear_cross_entropy``).

cuBLAS's matmuls leave the softmax to a separate pass over the logits (today's row kernel reads
each chunk's logits twice and writes the gradient over them). Here the pass is folded into the
matmuls:

1. **forward**, ``logits = hidden @ W.T``: the epilogue writes the tile of logits (bf16) and,
   per row and vocabulary tile, the max and the sum of exponentials of the tile's columns below
   the true vocabulary; a small reduction gives each row's logsumexp;
2. **d hidden** ``= G @ W`` and 3. **d W** ``+= G.T @ hidden``, with ``G = (softmax - onehot) *
   scale`` made from each tile of logits as it is loaded, never written.

The logits make one trip through memory per matmul (written once, read twice) instead of cuBLAS's
three plus the row kernel's three. Exact up to floating-point order, as the cuBLAS path is: the
same bf16 logits, fp32 accumulation, the gradient rounded to bf16 before its matmuls as the
unfused backward rounds it.

Tiles: those that compile for Hopper without spilling (``tests/hopper_compile.py``), but for
the weight gradient's 128 x 128 tiles, which spill 120-200 bytes a thread transposing the
gradient's tile (its 64 x 64 tile spills nothing; the autotuner picks by time). 128 x 256 tiles
spill 1-2 KiB once the gradient is made in registers: left out. Under ``TRITON_INTERPRET=1``
one small tile. bf16/fp16 only: fp32
inputs take the cuBLAS path (Triton's fp32 dot would round to tf32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_INTERPRET = triton.knobs.runtime.interpret
INTERPRET_DOT = tl.constexpr(_INTERPRET)


def _configs(*shapes: tuple[int, int, int, int, int]) -> list[triton.Config]:
    """(BM, BN, BK, warps, stages) each."""
    if _INTERPRET:
        return [triton.Config({"BM": 16, "BN": 16, "BK": 16, "GROUP_M": 2}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


LSE_CONFIGS = _configs((128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (128, 128, 32, 8, 5))
GRAD_CONFIGS = _configs((128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 32, 8, 5), (64, 64, 64, 4, 4))
NARROWEST = min(cfg.kwargs["BN"] for cfg in LSE_CONFIGS)
"""The forward's statistics are sized for its narrowest vocabulary tile; the columns a wider tile
leaves unwritten add nothing (max -inf, sum 0)."""


@triton.jit
def _dot(a, b, acc):
    """acc + a @ b. Triton 3.6's interpreter gets bf16 dots wrong (numpy has no bf16): there the
    tiles, already bf16-valued, are multiplied in fp32, which is exact for them."""
    if INTERPRET_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _to(x, dtype: tl.constexpr):
    """x (fp32) rounded to dtype. Triton 3.6's interpreter truncates fp32 to bf16 where the GPU
    rounds to nearest even: there the rounding is done on the bits first, so the CPU tests see
    the GPU's logits."""
    if INTERPRET_DOT and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)
    return x.to(dtype)


@triton.jit
def _tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering (Triton's matmul tutorial): neighbouring programs share B's columns in L2."""
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * num_n)) % size_m, (pid % (GROUP_M * num_n)) // size_m


@triton.jit
def _grad(x, lse, target, col, scale, V):
    """(softmax - onehot) * scale of a tile of logits, 0 past V; scale is 0 on ignored rows."""
    g = (tl.exp(x.to(tl.float32) - lse) - tl.where(col == target, 1.0, 0.0)) * scale
    return tl.where(col < V, g, 0.0)


@triton.autotune(configs=LSE_CONFIGS, key=["M", "N", "K"], restore_value=["tile_max", "tile_sum"])
@triton.jit
def _logits_lse_kernel(
    h,
    w,
    out,
    tile_max,
    tile_sum,
    M,
    N,
    K: tl.constexpr,
    V,
    n_tiles,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out = h @ w.T (M x N, out's dtype), and per (row, N tile) the max and the sum of exp of its
    columns below V. Autotuning restores the statistics: a narrower tile, tried first, must not
    leave its columns behind."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm, rn, rk = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN), tl.arange(0, BK)
    a = h + rm[:, None].to(tl.int64) * K + rk[None, :]
    b = w + rn[None, :].to(tl.int64) * K + rk[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        in_k = k * BK + rk < K
        acc = _dot(
            tl.load(a, mask=(rm[:, None] < M) & in_k[None, :], other=0.0),
            tl.load(b, mask=(rn[None, :] < N) & in_k[:, None], other=0.0),
            acc,
        )
        a += BK
        b += BK
    logits = _to(acc, out.dtype.element_ty)
    tl.store(out + rm[:, None].to(tl.int64) * N + rn[None, :], logits, mask=(rm[:, None] < M) & (rn[None, :] < N))
    x = tl.where(rn[None, :] < V, logits.to(tl.float32), float("-inf"))
    row_max = tl.max(x, axis=1)
    finite_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # a tile of padding only: sum 0, not NaN
    tl.store(tile_max + rm * n_tiles + pid_n, row_max, mask=rm < M)
    tl.store(tile_sum + rm * n_tiles + pid_n, tl.sum(tl.exp(x - finite_max[:, None]), axis=1), mask=rm < M)


@triton.autotune(configs=GRAD_CONFIGS, key=["M", "N", "K"])
@triton.jit
def _grad_hidden_kernel(
    logits,
    lse,
    targets,
    scale,
    w,
    out,
    M,
    N,
    K: tl.constexpr,
    V,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out (M tokens x N width) = G @ w, G = _grad(logits) made as each tile loads (K: the
    weight's rows, w: K x N)."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm, rn, rk = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN), tl.arange(0, BK)
    row_lse = tl.load(lse + rm, mask=rm < M, other=0.0)[:, None]
    row_target = tl.load(targets + rm, mask=rm < M, other=-1)[:, None]
    row_scale = tl.load(scale + rm, mask=rm < M, other=0.0)[:, None]
    a = logits + rm[:, None].to(tl.int64) * K + rk[None, :]
    b = w + rk[:, None].to(tl.int64) * N + rn[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        col = k * BK + rk
        x = tl.load(a, mask=(rm[:, None] < M) & (col[None, :] < K), other=0.0)
        g = _to(_grad(x, row_lse, row_target, col[None, :], row_scale, V), w.dtype.element_ty)
        acc = _dot(g, tl.load(b, mask=(rn[None, :] < N) & (col[:, None] < K), other=0.0), acc)
        a += BK
        b += BK * N
    tl.store(
        out + rm[:, None].to(tl.int64) * N + rn[None, :],
        _to(acc, out.dtype.element_ty),
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


@triton.autotune(configs=GRAD_CONFIGS, key=["M", "N", "K"], restore_value=["acc_out"])
@triton.jit
def _grad_weight_kernel(
    logits,
    lse,
    targets,
    scale,
    h,
    acc_out,
    M,
    N,
    K: tl.constexpr,
    V,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """acc_out (M weight rows x N width, fp32) += G.T @ h, G = _grad(logits) (K tokens x M),
    each tile loaded as it lies (BK tokens x BM columns) and transposed in registers.
    Autotuning restores acc_out: it accumulates."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm, rn, rk = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN), tl.arange(0, BK)
    a = logits + rk[:, None].to(tl.int64) * M + rm[None, :]
    b = h + rk[:, None].to(tl.int64) * N + rn[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        tok = k * BK + rk
        in_k = tok < K
        x = tl.load(a, mask=(rm[None, :] < M) & in_k[:, None], other=0.0)
        g = _grad(
            x,
            tl.load(lse + tok, mask=in_k, other=0.0)[:, None],
            tl.load(targets + tok, mask=in_k, other=-1)[:, None],
            rm[None, :],
            tl.load(scale + tok, mask=in_k, other=0.0)[:, None],
            V,
        )
        acc = _dot(
            tl.trans(_to(g, h.dtype.element_ty)), tl.load(b, mask=(rn[None, :] < N) & in_k[:, None], other=0.0), acc
        )
        a += BK * M
        b += BK * N
    c = acc_out + rm[:, None].to(tl.int64) * N + rn[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c, tl.load(c, mask=mask, other=0.0) + acc, mask=mask)


def _grid(M: int, N: int):
    return lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)


def logits_and_lse(hidden: torch.Tensor, weight: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``hidden @ weight.T`` (tokens x rows, hidden's dtype) and each row's fp32 logsumexp over
    its first ``vocab`` columns."""
    tokens, d = hidden.shape
    rows = weight.shape[0]
    logits = torch.empty(tokens, rows, dtype=hidden.dtype, device=hidden.device)
    tiles = triton.cdiv(rows, NARROWEST)
    tile_max = torch.full((tokens, tiles), float("-inf"), device=hidden.device)
    tile_sum = torch.zeros(tokens, tiles, device=hidden.device)
    _logits_lse_kernel[_grid(tokens, rows)](hidden, weight, logits, tile_max, tile_sum, tokens, rows, d, vocab, tiles)
    top = tile_max.amax(dim=1, keepdim=True)
    return logits, (top + (tile_sum * torch.exp(tile_max - top)).sum(dim=1, keepdim=True).log()).squeeze(1)


def grad_hidden(
    logits: torch.Tensor,
    lse: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    vocab: int,
    out: torch.Tensor,
) -> None:
    """out = ((softmax(logits[:, :vocab]) - onehot(targets)) * scale[:, None]) @ weight."""
    tokens, rows = logits.shape
    d = weight.shape[1]
    _grad_hidden_kernel[_grid(tokens, d)](logits, lse, targets, scale, weight, out, tokens, d, rows, vocab)


def grad_weight_into(
    acc: torch.Tensor,
    logits: torch.Tensor,
    lse: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor,
    hidden: torch.Tensor,
    vocab: int,
) -> None:
    """acc (rows x d, fp32) += ((softmax(logits[:, :vocab]) - onehot(targets)) * scale[:, None]).T @ hidden."""
    tokens, rows = logits.shape
    d = hidden.shape[1]
    _grad_weight_kernel[_grid(rows, d)](logits, lse, targets, scale, hidden, acc, rows, d, tokens, vocab)
