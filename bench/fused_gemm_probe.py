"""Can the fused loss beat compile at a large vocabulary? A probe for issue 28's next step.

Today's fused loss (kernels/fused_linear_cross_entropy.py) runs cuBLAS for the head's three
matmuls and, between them, a row kernel that reads each chunk's logits twice and writes the
gradient over them: three trips through (chunk x vocab) bf16, about 5 of 28.5 ms at the
Qwen3-shaped (16,384, 1,024, 151,936) on an H100, where it runs at compile's speed (0.99x). The
way past compile is to drop those trips: the logsumexp in the forward matmul's epilogue (per row
and vocab tile: running max and sum of exponentials), and the softmax gradient computed in the
prologue of the two gradient matmuls, as each tile of logits is loaded. That needs Triton matmuls
about as fast as cuBLAS at these shapes; this probe measures, per chunk of tokens, each of the
three fused Triton matmuls against the cuBLAS call it would replace, and today's row kernel:

    python3 bench/fused_gemm_probe.py --out $OUT/fused_gemm_probe.jsonl      # on the GPU
    TRITON_INTERPRET=1 python3 bench/fused_gemm_probe.py --check              # maths, on the CPU

A line per (shape, part): Triton's and cuBLAS's medians (ms, triton.testing.do_bench), and for the
whole chunk today's time (three cuBLAS calls + the row kernel) against the fused one (three Triton
matmuls + the logsumexp's reduction). ``--check`` compares the three kernels' results with plain
torch in fp32 on small shapes (a padded vocabulary, ignored targets). Nothing here is used by
autotune: the kernel joins kernels/ only if this says it can win.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
INTERPRET_DOT = tl.constexpr(INTERPRET)


def _configs(*shapes):
    """(BM, BN, BK, warps, stages) each: those that compile for Hopper without spilling registers
    in the main loop (checked with tests/hopper_compile.py's compiler: 128 x 256 tiles spill
    1-2 KiB a thread once the softmax gradient is made in registers)."""
    if INTERPRET:
        return [triton.Config({"BM": 16, "BN": 16, "BK": 16, "GROUP_M": 2}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


LSE_CONFIGS = _configs(
    (128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (128, 256, 64, 8, 3), (128, 128, 32, 8, 5)
)
GRAD_CONFIGS = _configs((128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 32, 8, 5), (128, 64, 64, 4, 4))
SHAPES = ((16384, 1024, 151936), (16384, 2048, 128256), (98304, 512, 50304))
"""Issue 28's (tokens, width, vocabulary)."""
FORWARD, D_HIDDEN = "forward (logits + logsumexp tiles)", "d hidden (softmax gradient on load)"
D_WEIGHT = "d weight (softmax gradient on load, fp32 accumulate)"
D_WEIGHT_T = "d weight, tile loaded as it lies and transposed"
CHUNK = 4096
"""Tokens a chunk (a multiple of every BK above: the weight gradient's inner dimension)."""


@triton.jit
def _dot(a, b, acc):
    """acc + a @ b. Triton 3.6's interpreter gets bf16 dots wrong (numpy has no bf16): there the
    tiles, already bf16-valued, are multiplied in fp32, which is exact for them."""
    if INTERPRET_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering (Triton's matmul tutorial): neighbouring programs share B's columns in L2."""
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % (GROUP_M * num_n)) % size_m, (pid % (GROUP_M * num_n)) // size_m


@triton.autotune(configs=LSE_CONFIGS, key=["M", "N", "K"], restore_value=["tile_max", "tile_sum"])
# restored: a config with narrower tiles, benchmarked first, must not leave its statistics behind
@triton.jit
def logits_lse_kernel(
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
    """out = h @ w.T in bf16 (M x N), and per (row, N tile) the max and sum of exp of its columns < V."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm, rn, rk = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN), tl.arange(0, BK)
    a = h + rm[:, None].to(tl.int64) * K + rk[None, :]
    b = w + rn[None, :].to(tl.int64) * K + rk[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for _ in range(0, tl.cdiv(K, BK)):
        acc = _dot(tl.load(a, mask=rm[:, None] < M, other=0.0), tl.load(b, mask=rn[None, :] < N, other=0.0), acc)
        a += BK
        b += BK
    logits = acc.to(out.dtype.element_ty)
    x = tl.where(rn[None, :] < V, logits.to(tl.float32), float("-inf"))
    row_max = tl.max(x, axis=1)
    finite_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # a tile of padding only: sum 0, not NaN
    tl.store(tile_max + rm * n_tiles + pid_n, row_max, mask=rm < M)
    tl.store(tile_sum + rm * n_tiles + pid_n, tl.sum(tl.exp(x - finite_max[:, None]), axis=1), mask=rm < M)
    tl.store(out + rm[:, None].to(tl.int64) * N + rn[None, :], logits, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _grad(x, lse, target, col, scale, V):
    """(softmax - onehot) * scale of a tile of logits, 0 past V; scale is 0 on ignored rows."""
    g = (tl.exp(x.to(tl.float32) - lse) - tl.where(col == target, 1.0, 0.0)) * scale
    return tl.where(col < V, g, 0.0)


@triton.autotune(configs=GRAD_CONFIGS, key=["M", "N", "K"])
@triton.jit
def grad_hidden_kernel(
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
    """out (M x N, the hidden states' gradient) = G @ w, G = _grad(logits) made as each tile loads
    (K: the padded vocabulary, w: K x N)."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm, rn, rk = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN), tl.arange(0, BK)
    row_lse = tl.load(lse + rm, mask=rm < M, other=0.0)[:, None]
    row_target = tl.load(targets + rm, mask=rm < M, other=-1)[:, None]
    row_scale = tl.load(scale + rm, mask=rm < M, other=0.0)[:, None]
    a = logits + rm[:, None].to(tl.int64) * K + rk[None, :]
    b = w + rk[:, None].to(tl.int64) * N + rn[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        x = tl.load(a, mask=rm[:, None] < M, other=0.0)
        g = _grad(x, row_lse, row_target, k * BK + rk[None, :], row_scale, V).to(w.dtype.element_ty)
        acc = _dot(g, tl.load(b, mask=rn[None, :] < N, other=0.0), acc)
        a += BK
        b += BK * N
    tl.store(
        out + rm[:, None].to(tl.int64) * N + rn[None, :],
        acc.to(out.dtype.element_ty),
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


@triton.autotune(configs=GRAD_CONFIGS, key=["M", "N", "K"], restore_value=["acc_out"])
@triton.jit
def grad_weight_kernel(
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
    """acc_out (M x N fp32, M the padded vocabulary) += G.T @ h, G = _grad(logits) (K x M, K the
    chunk's tokens) made as each transposed tile loads."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm, rn, rk = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN), tl.arange(0, BK)
    a = logits + rk[None, :].to(tl.int64) * M + rm[:, None]  # (BM vocab, BK tokens) of G.T
    b = h + rk[:, None].to(tl.int64) * N + rn[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        tok = k * BK + rk
        tok_lse = tl.load(lse + tok)[None, :]
        tok_target = tl.load(targets + tok)[None, :]
        tok_scale = tl.load(scale + tok)[None, :]
        x = tl.load(a, mask=rm[:, None] < M, other=0.0)
        g = _grad(x, tok_lse, tok_target, rm[:, None], tok_scale, V).to(h.dtype.element_ty)
        acc = _dot(g, tl.load(b, mask=rn[None, :] < N, other=0.0), acc)
        a += BK * M
        b += BK * N
    c = acc_out + rm[:, None].to(tl.int64) * N + rn[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c, tl.load(c, mask=mask, other=0.0) + acc, mask=mask)


@triton.autotune(configs=GRAD_CONFIGS, key=["M", "N", "K"], restore_value=["acc_out"])
@triton.jit
def grad_weight_t_kernel(
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
    """grad_weight_kernel with the logits' tile loaded as it lies (BK tokens x BM vocab, rows
    contiguous) and its gradient transposed in registers for the dot."""
    pid_m, pid_n = _tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm, rn, rk = pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN), tl.arange(0, BK)
    a = logits + rk[:, None].to(tl.int64) * M + rm[None, :]
    b = h + rk[:, None].to(tl.int64) * N + rn[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        tok = k * BK + rk
        x = tl.load(a, mask=rm[None, :] < M, other=0.0)
        g = _grad(
            x,
            tl.load(lse + tok)[:, None],
            tl.load(targets + tok)[:, None],
            rm[None, :],
            tl.load(scale + tok)[:, None],
            V,
        )
        acc = _dot(tl.trans(g.to(h.dtype.element_ty)), tl.load(b, mask=rn[None, :] < N, other=0.0), acc)
        a += BK * M
        b += BK * N
    c = acc_out + rm[:, None].to(tl.int64) * N + rn[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c, tl.load(c, mask=mask, other=0.0) + acc, mask=mask)


def grid(M: int, N: int):
    return lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)


def tile_stats(tokens: int, rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's per (row, vocab tile) max and sum, sized for the narrowest tile any config
    has; the tiles a wider config leaves unwritten add nothing (max -inf, sum 0)."""
    tiles = triton.cdiv(rows, min(cfg.kwargs["BN"] for cfg in LSE_CONFIGS))
    return torch.full((tokens, tiles), float("-inf"), device=device), torch.zeros(tokens, tiles, device=device)


def fused(h, w, targets, vocab, ignore_index=-100, weight_kernel=None):
    """One chunk through the three fused kernels: (per-token loss, d hidden, fp32 d weight), the
    mean's scale taken over this chunk's counted tokens."""
    c, d = h.shape
    rows = w.shape[0]
    logits = torch.empty(c, rows, dtype=h.dtype, device=h.device)
    tile_max, tile_sum = tile_stats(c, rows, h.device)
    logits_lse_kernel[grid(c, rows)](h, w, logits, tile_max, tile_sum, c, rows, d, vocab, tile_max.shape[1])
    top = tile_max.max(dim=1, keepdim=True).values
    lse = (top + (tile_sum * torch.exp(tile_max - top)).sum(dim=1, keepdim=True).log()).squeeze(1)
    counted = targets != ignore_index
    scale = counted.float() / counted.sum().clamp(min=1)
    safe = torch.where(counted, targets, 0)
    loss = torch.where(counted, lse - logits.gather(1, safe[:, None]).squeeze(1).float(), 0.0)
    d_hidden = torch.empty_like(h)
    grad_hidden_kernel[grid(c, d)](logits, lse, targets, scale, w, d_hidden, c, d, rows, vocab)
    d_weight = torch.zeros(rows, d, dtype=torch.float32, device=h.device)
    (weight_kernel or grad_weight_kernel)[grid(rows, d)](logits, lse, targets, scale, h, d_weight, rows, d, c, vocab)
    return loss, d_hidden, d_weight


def reference(h, w, targets, vocab, ignore_index=-100):
    h32, w32 = h.float().requires_grad_(), w.float().requires_grad_()
    logits = (h32 @ w32.T)[:, :vocab]
    per_token = torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    per_token.sum().div((targets != ignore_index).sum().clamp(min=1)).backward()
    return per_token.detach(), h32.grad, w32.grad


def check() -> None:
    torch.manual_seed(0)
    for c, d, rows, vocab in ((32, 32, 64, 50), (48, 16, 96, 96), (32, 32, 64, 30)):  # the last: tiles of padding only
        h = (torch.randn(c, d) * 0.5).to(torch.bfloat16)
        w = (torch.randn(rows, d) * 0.5).to(torch.bfloat16)
        targets = torch.randint(0, vocab, (c,))
        targets[::5] = -100
        got, want = fused(h, w, targets, vocab), reference(h, w, targets, vocab)
        got = (*got, fused(h, w, targets, vocab, weight_kernel=grad_weight_t_kernel)[2])
        want = (*want, want[2])
        errors = {}
        for name, a, b in zip(("loss", "d hidden", "d weight", "d weight (as it lies)"), got, want, strict=True):
            errors[name] = ((a.float() - b).abs().max() / b.abs().max()).item()
            # bf16 logits and gradient tiles (8 mantissa bits): 2e-3 to 1e-2 of the largest entry
            # measured; a wrong target, scale or logsumexp is off by its whole size
            assert errors[name] < 3e-2, (name, errors[name])
        assert not got[2][vocab:].any() and not got[3][vocab:].any()  # padded rows: no gradient
        print(f"check (tokens {c}, d {d}, rows {rows}, vocab {vocab}): largest error / largest entry", errors)


def probe(tokens: int, d: int, vocab: int) -> list[dict]:
    from triton.testing import do_bench

    from autotune.kernels.fused_linear_cross_entropy import BLOCK_V, NUM_WARPS, _loss_and_grad_kernel

    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    h = torch.randn(CHUNK, d, device=dev, dtype=bf) * 0.5
    w = torch.randn(vocab, d, device=dev, dtype=bf) * 0.02
    targets = torch.randint(0, vocab, (CHUNK,), device=dev)
    logits = h @ w.T
    lse = torch.logsumexp(logits.float(), dim=1)
    scale = torch.full((CHUNK,), 1.0 / CHUNK, device=dev)
    loss_rows, d_hidden = torch.empty(CHUNK, device=dev), torch.empty_like(h)
    d_weight = torch.zeros(vocab, d, device=dev)
    tmax, tsum = tile_stats(CHUNK, vocab, dev)
    out = torch.empty_like(logits)

    def row_kernel(grad=True):
        _loss_and_grad_kernel[(CHUNK,)](
            logits,
            logits.stride(0),
            targets,
            scale[:1],
            loss_rows,
            V=vocab,
            WIDTH=vocab,
            IGNORE_INDEX=-100,
            GRAD=grad,
            BLOCK_V=BLOCK_V,
            num_warps=NUM_WARPS,
        )

    parts = {
        FORWARD: (
            lambda: logits_lse_kernel[grid(CHUNK, vocab)](h, w, out, tmax, tsum, CHUNK, vocab, d, vocab, tmax.shape[1]),
            lambda: torch.mm(h, w.T, out=out),
        ),
        D_HIDDEN: (
            lambda: grad_hidden_kernel[grid(CHUNK, d)](
                logits, lse, targets, scale, w, d_hidden, CHUNK, d, vocab, vocab
            ),
            lambda: torch.mm(logits, w, out=d_hidden),
        ),
        D_WEIGHT: (
            lambda: grad_weight_kernel[grid(vocab, d)](
                logits, lse, targets, scale, h, d_weight, vocab, d, CHUNK, vocab
            ),
            lambda: torch.addmm(d_weight, logits.T, h, out_dtype=torch.float32, out=d_weight),
        ),
        D_WEIGHT_T: (
            lambda: grad_weight_t_kernel[grid(vocab, d)](
                logits, lse, targets, scale, h, d_weight, vocab, d, CHUNK, vocab
            ),
            lambda: torch.addmm(d_weight, logits.T, h, out_dtype=torch.float32, out=d_weight),
        ),
    }
    common = {
        "tokens": tokens,
        "d": d,
        "vocab": vocab,
        "chunk": CHUNK,
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }

    def reduce_lse():  # the tiles' maxima and sums into each row's logsumexp (torch, a few small kernels)
        top = tmax.max(dim=1, keepdim=True).values
        return top + (tsum * torch.exp(tmax - top)).sum(dim=1, keepdim=True).log()

    row_kernel_ms = do_bench(row_kernel)
    lse_only_ms = do_bench(lambda: row_kernel(grad=False))
    rows, times = [], {}
    for part, (ours, cublas) in parts.items():
        t_ours, t_cublas = do_bench(ours), do_bench(cublas)
        times[part] = (t_ours, t_cublas)
        flops = 2 * CHUNK * d * vocab
        rows.append(
            {
                **common,
                "part": part,
                "triton_ms": t_ours,
                "cublas_ms": t_cublas,
                "triton_over_cublas": t_ours / t_cublas,
                "triton_tflops": flops / t_ours / 1e9,
                "cublas_tflops": flops / t_cublas / 1e9,
            }
        )
    (fwd, fwd_cublas), (dh, dh_cublas) = times[FORWARD], times[D_HIDDEN]
    dw, dw_cublas = min(times[D_WEIGHT][0], times[D_WEIGHT_T][0]), times[D_WEIGHT][1]
    today = fwd_cublas + row_kernel_ms + dh_cublas + dw_cublas
    fused_all = fwd + do_bench(reduce_lse) + dh + dw
    mixed = fwd_cublas + lse_only_ms + dh + dw  # cuBLAS's forward, a logsumexp pass, the gradients fused
    chunks = tokens / CHUNK
    rows.append(
        {
            **common,
            "part": "whole loss (projected over the chunks)",
            "today_ms": today * chunks,
            "fused_ms": fused_all * chunks,
            "mixed_ms": mixed * chunks,
            "today_over_fused": today / fused_all,
            "today_over_mixed": today / mixed,
            "row_kernel_ms": row_kernel_ms * chunks,
            "lse_pass_ms": lse_only_ms * chunks,
        }
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="the kernels' maths against fp32 torch, small shapes")
    parser.add_argument("--out", type=Path, help="JSON lines, appended")
    args = parser.parse_args()
    if args.check:
        check()
        return
    for shape in SHAPES:
        for row in probe(*shape):
            print(json.dumps(row))
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
