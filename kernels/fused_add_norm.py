"""The residual add fused with the norm that follows it, LayerNorm or RMSNorm: Triton kernels,
their launchers and one ``autograd.Function``, in the Liger-Kernel layout (the plain-torch
references are ``reference.add_layer_norm`` and ``reference.add_rms_norm``).

The pre-norm block's pattern: ``s = x + residual`` is the new residual stream and
``y = norm(s)`` the next sublayer's input; both are returned. Rows of width d (any d: the tile
is the next power of two, masked), bf16 or fp32, all arithmetic in fp32.

Forward, one program per tile of rows (``BLOCK_M`` rows x the whole row): reads x and residual
once, writes s (rounded to the inputs' dtype: the norm is taken of the stored s, as the unfused
ops do), y, and per row the fp32 mean (LayerNorm) and 1/std; two reads and two writes of the
(tokens, d) size, the least any implementation can do.

Backward, a fixed grid of programs (a few per multiprocessor) each looping over tiles of rows:
reads dy, s and the gradient that came back along the residual stream (``ds``), writes
``dx = ds + norm'(dy)``, which is the gradient of both x and residual; the weight's (and bias's)
gradient is summed over the program's rows in fp32 registers and written once a program, then
the (programs, d) partial sums are added by torch. Three reads and one write of the (tokens, d)
size. The same maths as the references up to the order of floating-point sums: an exact kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from autotune import devices

_INTERPRET = triton.knobs.runtime.interpret
"""Under ``TRITON_INTERPRET=1`` (the CPU tests) the kernels run in numpy: small tiles and two
backward programs keep the interpreter fast and send every program round its loop."""

TILE = 64 if _INTERPRET else 4096
"""Elements of a tile: BLOCK_M rows of the row's power-of-two width (rows are never split)."""
PROGRAMS_PER_SM = 4
"""Backward programs a multiprocessor: each holds its partial weight gradient (the bench sweeps it)."""

_NUMPY_TRUNCATES: tl.constexpr = tl.constexpr(bool(_INTERPRET))
"""Triton 3.6's interpreter casts fp32 to bf16 by truncation (rounding modes ignored); GPUs
round to nearest even. The interpreter rounds by hand (``_rounded``), so the CPU tests see the
GPU's numbers."""


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """fp32 x in dtype, rounded to nearest even (NaN aside)."""
    if _NUMPY_TRUNCATES and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _forward_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    s_ptr,
    mean_ptr,
    rstd_ptr,
    n_rows,
    eps,
    D: tl.constexpr,
    RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Rows [pid * BLOCK_M, +BLOCK_M) of the (n_rows, D) inputs."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_in = rows < n_rows
    col_in = cols < D
    mask = row_in[:, None] & col_in[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = _rounded(x + r, s_ptr.dtype.element_ty)  # the residual stream, in its dtype
    tl.store(s_ptr + offs, s, mask=mask)
    s = s.to(tl.float32)
    if RMS:
        centred = s
    else:
        mean = tl.sum(s, axis=1) / D
        tl.store(mean_ptr + rows, mean, mask=row_in)
        centred = tl.where(mask, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / D + eps)
    tl.store(rstd_ptr + rows, rstd, mask=row_in)
    y = centred * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, _rounded(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    dy_ptr,
    ds_ptr,
    s_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    dw_ptr,
    db_ptr,
    n_rows,
    D: tl.constexpr,
    RMS: tl.constexpr,
    HAS_DS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    TILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Rows [pid * TILES * BLOCK_M, +TILES * BLOCK_M), a tile of BLOCK_M rows at a time; row pid
    of the (programs, D) dw and db gets this program's partial sums. TILES is a constexpr (a
    power of two: few compilations) because Triton 3.6's interpreter cannot loop to a runtime
    bound under numpy 2.4; the rows past n_rows are masked."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_in = cols < D
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(TILES):
        rows = (pid * TILES + tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_in = rows < n_rows
        mask = row_in[:, None] & col_in[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_in, other=0.0)[:, None]
        if RMS:
            xhat = s * rstd
        else:
            mean = tl.load(mean_ptr + rows, mask=row_in, other=0.0)[:, None]
            xhat = tl.where(mask, (s - mean) * rstd, 0.0)
        if HAS_WEIGHT:
            wdy = dy * w
        else:
            wdy = dy
        # d/ds of (s - mean) * rstd against wdy: rstd * (wdy - xhat * mean(wdy * xhat) - mean(wdy))
        dx = wdy - xhat * (tl.sum(wdy * xhat, axis=1) / D)[:, None]
        if not RMS:
            dx = dx - (tl.sum(wdy, axis=1) / D)[:, None]
        dx = dx * rstd
        if HAS_DS:
            dx = dx + tl.load(ds_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, _rounded(dx, dx_ptr.dtype.element_ty), mask=mask)
        if WEIGHT_GRAD:
            dw += dy * xhat
        if BIAS_GRAD:
            db += dy
    if WEIGHT_GRAD:
        tl.store(dw_ptr + pid * D + cols, tl.sum(dw, axis=0), mask=col_in)
    if BIAS_GRAD:
        tl.store(db_ptr + pid * D + cols, tl.sum(db, axis=0), mask=col_in)


def _tile(d: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_N columns, warps) of a tile of rows of width d."""
    block_n = triton.next_power_of_2(d)
    block_m = max(1, TILE // block_n)
    warps = 1 if _INTERPRET else min(16, max(1, block_m * block_n // 512))  # 16 fp32 a thread a tensor
    return block_m, block_n, warps


def _tiles_per_program(n_tiles: int, device: torch.device) -> int:
    """A power of two such that the backward's programs number about PROGRAMS_PER_SM a
    multiprocessor (between half that and that); two programs or fewer in the interpreter."""
    units = None if _INTERPRET else devices.of(device).multiprocessors(device)
    target = 2 if units is None else units * PROGRAMS_PER_SM
    return triton.next_power_of_2(triton.cdiv(max(n_tiles, 1), target))


class AddNormFunction(torch.autograd.Function):
    """(norm(x + residual), x + residual) over the last dimension: LayerNorm, or RMSNorm with ``rms``."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps: float, rms: bool):
        d = x.shape[-1]
        x2, r2 = x.reshape(-1, d).contiguous(), residual.reshape(-1, d).contiguous()
        n = x2.shape[0]
        y, s = torch.empty_like(x2), torch.empty_like(x2)
        rstd = torch.empty(n, dtype=torch.float32, device=x.device)
        mean = rstd if rms else torch.empty(n, dtype=torch.float32, device=x.device)
        block_m, block_n, warps = _tile(d)
        if n:
            _forward_kernel[(triton.cdiv(n, block_m),)](
                x2,
                r2,
                weight,
                bias,
                y,
                s,
                mean,
                rstd,
                n,
                eps,
                D=d,
                RMS=rms,
                HAS_WEIGHT=weight is not None,
                HAS_BIAS=bias is not None,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                num_warps=warps,
            )
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.rms, ctx.has_bias = rms, bias is not None
        ctx.set_materialize_grads(False)
        return y.view(x.shape), s.view(x.shape)

    @staticmethod
    def backward(ctx, dy, ds):
        s, weight, mean, rstd = ctx.saved_tensors
        shape, (n, d) = dy.shape if dy is not None else ds.shape, s.shape
        weight_grad = weight is not None and ctx.needs_input_grad[2]
        bias_grad = ctx.has_bias and ctx.needs_input_grad[3]
        if dy is None:  # y unused: only the residual stream's gradient passes
            dw = torch.zeros_like(weight) if weight_grad else None
            db = torch.zeros_like(weight) if bias_grad else None
            return ds, ds, dw, db, None, None
        dy = dy.reshape(n, d).contiguous()
        ds = ds.reshape(n, d).contiguous() if ds is not None else None
        dx = torch.empty_like(s)
        block_m, block_n, warps = _tile(d)
        n_tiles = triton.cdiv(n, block_m)
        tiles = _tiles_per_program(n_tiles, s.device)
        programs = max(1, triton.cdiv(n_tiles, tiles))
        partial = torch.zeros(programs, d, dtype=torch.float32, device=s.device)
        dw_partial = partial if weight_grad else None
        db_partial = torch.zeros_like(partial) if bias_grad else None
        if n:
            _backward_kernel[(programs,)](
                dy,
                ds,
                s,
                weight,
                mean,
                rstd,
                dx,
                dw_partial,
                db_partial,
                n,
                D=d,
                RMS=ctx.rms,
                HAS_DS=ds is not None,
                HAS_WEIGHT=weight is not None,
                WEIGHT_GRAD=weight_grad,
                BIAS_GRAD=bias_grad,
                TILES=tiles,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                num_warps=warps,
            )
        dw = dw_partial.sum(0).to(weight.dtype) if weight_grad else None
        db = db_partial.sum(0).to(weight.dtype) if bias_grad else None
        dx = dx.view(shape)
        return dx, dx, dw, db, None, None


def _check(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} is not x's {tuple(x.shape)} {x.dtype}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != x.shape[-1:]:
            raise ValueError(f"{name} {tuple(p.shape)} is not ({x.shape[-1]},), x's last dimension")


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layer_norm(x + residual), x + residual)`` over the last dimension, fused: the maths of
    ``reference.add_layer_norm``. x and residual: the same shape and dtype; weight and bias: (d,)
    in any dtype (their gradients come back in it), or None."""
    _check(x, residual, weight, bias)
    return AddNormFunction.apply(x, residual, weight, bias, eps, False)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)`` over the last dimension, fused: the maths of
    ``reference.add_rms_norm``."""
    _check(x, residual, weight, None)
    return AddNormFunction.apply(x, residual, weight, None, eps, True)
