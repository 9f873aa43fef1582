"""The output head + cross-entropy, forward and backward, by implementation: inductor's unfused
head and loss ("compile", what a compiled model runs), our kernel ("autotune",
kernels/fused_linear_cross_entropy.py), Liger-Kernel's and Cut Cross-Entropy's fused losses.
Issue 28's shapes; each (shape, implementation) in a process of its own, so that peak memory and
compiled code are its alone.

    python bench/fused_loss.py all --out results.jsonl [--shapes 98304x512x50304,...] [--impls compile,autotune,...]
    python bench/fused_loss.py one --shape 16384x1024x151936 --impl autotune

``autotune@4096x8x1024`` is our kernel launched with another tile (BLOCK_V 4096), warps (8) and
chunk size (1024 MiB of logits): the defaults' sweep. (A fourth field, programs a multiprocessor
looping over rows, was measured at commit 712024d and removed: 3-13% slower.)

A line per run: median, min and max of the timed iterations' milliseconds (CUDA events around
forward + backward, after warm-up), the peak memory above the inputs' (hidden states, weight,
their gradients' buffers not counted: every implementation must return those), and the loss and
both gradients' largest difference from the fp32 reference on the same bf16 inputs (the same
for every implementation: exactness up to floating-point order).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHAPES = ("98304x512x50304", "16384x1024x151936", "16384x2048x128256")
"""(tokens, width, vocabulary): phase8-small at micro-batch 96 (vocab padded to 64), a Qwen3-shaped
model at 16 x 1024 tokens, a Llama-3.2-1B-shaped one at 16 x 1024."""
IMPLS = ("compile", "autotune", "liger", "cce")
FLOOR = "matmuls"
"""Not a loss: the head's three matmuls alone (cuBLAS, bf16, whole, the forward's output taken as
the gradient), no softmax: the time below which no design that runs those matmuls through cuBLAS
can go. ``--impls matmuls`` adds it; it has no error check."""


def _loss_fn(impl: str):
    import torch
    import torch.nn.functional as F

    if impl == FLOOR:

        class Matmuls(torch.autograd.Function):
            @staticmethod
            def forward(ctx, h, w, t):
                logits = h @ w.T
                ctx.save_for_backward(h, w, logits)
                return logits.new_zeros((), dtype=torch.float32)

            @staticmethod
            def backward(ctx, _):
                h, w, logits = ctx.saved_tensors
                return logits @ w, logits.T @ h, None

        return Matmuls.apply
    if impl == "compile":

        @torch.compile
        def unfused(h, w, t):  # the model's head in bf16, the loss on its fp32 upcast
            return F.cross_entropy((h @ w.T).float(), t)

        return unfused
    if impl.startswith("autotune"):
        from autotune.kernels import fused_linear_cross_entropy as flce

        if "@" in impl:  # a variant of the launch: autotune@BLOCK_Vxnum_warpsxchunk_MiB
            block, warps, mib = map(int, impl.split("@")[1].split("x"))
            flce.BLOCK_V, flce.NUM_WARPS, flce.CHUNK_BYTES = block, warps, mib << 20
        return flce.linear_cross_entropy
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy as cce

        return lambda h, w, t: cce(h, w, t, impl="cce")
    raise SystemExit(f"unknown implementation {impl}")


def one(shape: str, impl: str, iters: int, check: bool) -> dict:
    import torch

    from autotune.kernels import reference

    n, d, v = map(int, shape.split("x"))
    gen = torch.Generator("cuda").manual_seed(0)
    hidden = (torch.randn(n, d, device="cuda", generator=gen) * 1.0).bfloat16().requires_grad_()
    weight = (torch.randn(v, d, device="cuda", generator=gen) * d**-0.5).bfloat16().requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    hidden.grad, weight.grad = torch.zeros_like(hidden), torch.zeros_like(weight)
    fn = _loss_fn(impl)
    line = {"shape": shape, "impl": impl, "tokens": n, "d": d, "vocab": v}
    try:
        for _ in range(3):  # compile, autotune, warm the allocator
            fn(hidden, weight, targets).backward()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times = []
        for _ in range(iters):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(hidden, weight, targets).backward()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        peak = torch.cuda.max_memory_allocated() - base
    except Exception as e:  # noqa: BLE001 - a library failing at a shape is a result
        return {**line, "status": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    times.sort()
    line.update(
        status="ok",
        median_ms=times[len(times) // 2],
        min_ms=times[0],
        max_ms=times[-1],
        iters=iters,
        peak_extra_bytes=peak,
    )
    # Against fp32 maths on the same bf16 values, a slice of the tokens (fp32 logits are large).
    if check and impl != FLOOR:
        m = min(n, 4096)
        h, w = hidden.detach()[:m].clone().requires_grad_(), weight.detach().clone().requires_grad_()
        loss = fn(h, w, targets[:m])
        loss.backward()
        h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        exact = reference.linear_cross_entropy(h32, w32, targets[:m])
        exact.backward()
        line.update(
            loss_error=abs(loss.item() - exact.item()),
            d_hidden_error=(h.grad.float() - h32.grad).abs().max().item(),
            d_weight_error=(w.grad.float() - w32.grad).abs().max().item(),
            d_weight_scale=w32.grad.abs().max().item(),
        )
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("all")
    a.add_argument("--out", required=True)
    a.add_argument("--shapes", default=",".join(SHAPES))
    a.add_argument("--impls", default=",".join(IMPLS))
    a.add_argument("--iters", type=int, default=20)
    o = sub.add_parser("one")
    o.add_argument("--shape", required=True)
    o.add_argument("--impl", required=True)
    o.add_argument("--iters", type=int, default=20)
    o.add_argument("--no-check", action="store_true")
    args = parser.parse_args()
    if args.command == "one":
        print(json.dumps(one(args.shape, args.impl, args.iters, not args.no_check)), flush=True)
        return
    import torch
    import triton

    a, b = torch.ones(8, 8, device="cuda", dtype=torch.bfloat16), torch.zeros(8, 8, device="cuda")
    try:  # whether our kernel's fp32 weight gradient takes one cuBLAS call per chunk here
        torch.addmm(b, a, a, out_dtype=torch.float32)
        addmm_out_dtype = True
    except Exception:  # noqa: BLE001
        addmm_out_dtype = False
    env = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "addmm_out_dtype": addmm_out_dtype,
    }
    with Path(args.out).open("a") as out:
        for shape in args.shapes.split(","):
            for impl in args.impls.split(","):
                t0 = time.time()
                proc = subprocess.run(
                    [sys.executable, __file__, "one", "--shape", shape, "--impl", impl, "--iters", str(args.iters)],
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                lines = [text for text in proc.stdout.splitlines() if text.startswith("{")]
                line = (
                    json.loads(lines[-1])
                    if lines
                    else {
                        "shape": shape,
                        "impl": impl,
                        "status": "crashed",
                        "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300],
                    }
                )
                line.update(env, wall_s=round(time.time() - t0, 1))
                out.write(json.dumps(line) + "\n")
                out.flush()
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
