"""Where the fused loss's time goes, matmul by matmul: kernels/head_matmuls.py (the head's three
matmuls in Triton with the softmax folded in) against the cuBLAS calls and the row kernel of
today's path, per chunk of tokens. bench/fused_loss.py times the whole loss; this says which
part wins or loses when the whole does.

    python3 bench/fused_gemm_probe.py --out $OUT/fused_gemm_probe.jsonl      # on the GPU

A line per (shape, part): Triton's and cuBLAS's medians (ms, triton.testing.do_bench) and their
TFLOP/s, then for the whole chunk today's time (cuBLAS's three matmuls and the row kernel)
against the fused one, projected over the shape's tokens. The kernels' maths is tested in
tests/test_kernels.py (TRITON_INTERPRET=1 on the CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = ((16384, 1024, 151936), (16384, 2048, 128256), (98304, 512, 50304))
"""Issue 28's (tokens, width, vocabulary)."""
CHUNK = 4096
"""Tokens a chunk: about the 1 GiB of logits fused_linear_cross_entropy holds at these vocabularies."""


def probe(tokens: int, d: int, vocab: int) -> list[dict]:
    from triton.testing import do_bench

    from autotune.kernels import head_matmuls as hm
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

    def row_kernel(grad: bool = True) -> None:
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
        "forward: logits and logsumexp (cuBLAS: the logits alone)": (
            lambda: hm.logits_and_lse(h, w, vocab),
            lambda: torch.mm(h, w.T),
        ),
        "d hidden, softmax gradient made on load": (
            lambda: hm.grad_hidden(logits, lse, targets, scale, w, vocab, d_hidden),
            lambda: torch.mm(logits, w, out=d_hidden),
        ),
        "d weight, softmax gradient made on load, fp32 accumulated": (
            lambda: hm.grad_weight_into(d_weight, logits, lse, targets, scale, h, vocab),
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
    rows, fused, today = [], 0.0, do_bench(row_kernel)
    row_kernel_ms, lse_pass_ms = today, do_bench(lambda: row_kernel(grad=False))
    for part, (ours, cublas) in parts.items():
        t_ours, t_cublas = do_bench(ours), do_bench(cublas)
        fused, today = fused + t_ours, today + t_cublas
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
    chunks = tokens / CHUNK
    rows.append(
        {
            **common,
            "part": "whole loss (projected over the chunks)",
            "today_ms": today * chunks,
            "fused_ms": fused * chunks,
            "today_over_fused": today / fused,
            "row_kernel_ms": row_kernel_ms * chunks,
            "logsumexp_pass_ms": lse_pass_ms * chunks,
        }
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="JSON lines, appended")
    args = parser.parse_args()
    for shape in SHAPES:
        for row in probe(*shape):
            print(json.dumps(row))
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
