"""The pre-norm block's residual add + norm, forward and backward, by implementation: eager
torch ("eager": the add, then torch's fused layer_norm / rms_norm kernel), inductor's fusion of
the same reference ("compile": what a compiled model runs) and our kernels ("autotune",
kernels/fused_add_norm.py). Issue 28's shapes; each (shape, implementation) in a process of its
own, so that peak memory and compiled code are its alone.

    python bench/fused_norm.py all --out results.jsonl [--shapes 98304x512xlayer,...] [--impls eager,compile,...]
    python bench/fused_norm.py one --shape 16384x1024xrms --impl autotune

``autotune@8192x2`` is our kernel launched with another tile (TILE elements: rows x the row's
power-of-two width) and backward programs per multiprocessor (PROGRAMS_PER_SM): the defaults' sweep.

What is timed: ``y, s = f(x, residual, weight)`` (s = x + residual, y = norm(s); bf16; the GPT's
LayerNorm has no bias), then ``torch.autograd.grad((y, s), (x, residual, weight), (dy, ds))``:
the gradient comes back along both outputs, as in a pre-norm block. Before each iteration the
L2 cache is flushed and the GPU is given a 10 ms sleep to run, so the CPU queues the whole
iteration behind it and the CUDA events time the GPU's work only (launch overhead hidden, as in
a GPU-bound training step); the forward and backward are timed apart, with another flush between
them (in a model, other layers' work comes between). A line per run: median, min and max of the
timed iterations' milliseconds (forward + backward, and each), the peak memory above the
inputs', and the outputs' and gradients' largest difference from the fp32 reference on the same
bf16 inputs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SHAPES = ("98304x512xlayer", "16384x1024xrms", "16384x2048xrms")
"""(tokens, width, norm): phase8-small at micro-batch 96 (LayerNorm), a Qwen3-shaped model and
a Llama-3.2-1B-shaped one at 16 x 1024 tokens (RMSNorm)."""
IMPLS = ("eager", "compile", "autotune")
SWEEP = ("autotune@4096x2", "autotune@2048x4", "autotune@8192x4")


def _norm_fn(impl: str, norm: str):
    import torch

    from autotune.kernels import reference

    ref = reference.add_layer_norm if norm == "layer" else reference.add_rms_norm
    if impl == "eager":
        return ref
    if impl == "compile":
        return torch.compile(ref)
    if impl.startswith("autotune"):
        from autotune.kernels import fused_add_norm as fan

        if "@" in impl:  # a variant of the launch: autotune@TILExPROGRAMS_PER_SM
            fan.TILE, fan.PROGRAMS_PER_SM = map(int, impl.split("@")[1].split("x"))
        return fan.add_layer_norm if norm == "layer" else fan.add_rms_norm
    raise SystemExit(f"unknown implementation {impl}")


def one(shape: str, impl: str, iters: int, device: str) -> dict:
    import torch

    from autotune.kernels import reference

    n, d, norm = shape.split("x")
    n, d = int(n), int(d)
    cuda = device == "cuda"
    gen = torch.Generator(device).manual_seed(0)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, device=device, generator=gen) * scale).bfloat16()

    x, residual = randn(n, d).requires_grad_(), randn(n, d, scale=4.0).requires_grad_()
    weight = (1 + randn(d, scale=0.1)).requires_grad_()
    dy, ds = randn(n, d), randn(n, d)
    fn = _norm_fn(impl, norm)
    line = {"shape": shape, "impl": impl, "tokens": n, "d": d, "norm": norm}
    # 256 MiB written between timings: more than an H100's or H200's 50 MiB of L2
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if cuda else None

    def step(marks):
        marks[0]()
        y, s = fn(x, residual, weight)
        marks[1]()
        if cuda:
            flush.zero_()
        marks[2]()
        grads = torch.autograd.grad((y, s), (x, residual, weight), (dy, ds))
        marks[3]()
        return y, s, grads

    try:
        for _ in range(3):  # compile, warm the allocator
            step([lambda: None] * 4)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        forward, backward = [], []
        for _ in range(iters):
            if cuda:
                flush.zero_()
                torch.cuda._sleep(20_000_000)  # about 10 ms: the CPU queues the iteration meanwhile
                events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
                step([e.record for e in events])
                events[3].synchronize()
                forward.append(events[0].elapsed_time(events[1]))
                backward.append(events[2].elapsed_time(events[3]))
            else:  # a smoke test of this script without a GPU (interpreter kernels)
                clock = []
                step([lambda: clock.append(time.perf_counter())] * 4)
                forward.append((clock[1] - clock[0]) * 1e3)
                backward.append((clock[3] - clock[2]) * 1e3)
        peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    except Exception as e:  # noqa: BLE001 - an implementation failing at a shape is a result
        return {**line, "status": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    total = sorted(f + b for f, b in zip(forward, backward))
    forward.sort()
    backward.sort()
    line.update(
        status="ok",
        median_ms=total[iters // 2],
        min_ms=total[0],
        max_ms=total[-1],
        forward_median_ms=forward[iters // 2],
        backward_median_ms=backward[iters // 2],
        iters=iters,
        peak_extra_bytes=peak,
    )
    # Against fp32 maths on the same bf16 values, a slice of the tokens.
    m = min(n, 4096)
    ours = step([lambda: None] * 4)
    inputs32 = [t.detach()[:m].float().requires_grad_() for t in (x, residual)] + [weight.detach().float()]
    inputs32[2].requires_grad_()
    ref = reference.add_layer_norm if norm == "layer" else reference.add_rms_norm
    y32, s32 = ref(*inputs32)
    grads32 = torch.autograd.grad((y32, s32), inputs32, (dy[:m].float(), ds[:m].float()))
    line.update(
        y_error=(ours[0][:m].float() - y32).abs().max().item(),
        s_error=(ours[1][:m].float() - s32).abs().max().item(),
        dx_error=(ours[2][0][:m].float() - grads32[0]).abs().max().item(),
        d_residual_error=(ours[2][1][:m].float() - grads32[1]).abs().max().item(),
        d_weight_scale=grads32[2].abs().max().item(),  # of the slice's; ours is of all tokens
    )
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("all")
    a.add_argument("--out", required=True)
    a.add_argument("--shapes", default=",".join(SHAPES))
    a.add_argument("--impls", default=",".join(IMPLS))
    a.add_argument("--sweep", default=",".join(SWEEP), help="launch variants, run after every shape's impls")
    a.add_argument("--iters", type=int, default=25)
    a.add_argument("--device", default="cuda")
    o = sub.add_parser("one")
    o.add_argument("--shape", required=True)
    o.add_argument("--impl", required=True)
    o.add_argument("--iters", type=int, default=25)
    o.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.command == "one":
        print(json.dumps(one(args.shape, args.impl, args.iters, args.device)), flush=True)
        return
    import torch
    import triton

    env = {
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    shapes = args.shapes.split(",")
    runs = [(s, i) for s in shapes for i in args.impls.split(",")]
    runs += [(s, i) for s in shapes for i in filter(None, args.sweep.split(","))]
    with Path(args.out).open("a") as out:
        for shape, impl in runs:
            t0 = time.time()
            cmd = [sys.executable, __file__, "one", "--shape", shape, "--impl", impl, "--iters", str(args.iters)]
            proc = subprocess.run([*cmd, "--device", args.device], capture_output=True, text=True, timeout=600)
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
