"""FA4 (attention backend fa4) against cuDNN's SDPA, both against an fp32 reference: the output's
and the gradients' largest error, at the shapes the GPT presets run and with grouped kv heads (FA4's
own), eager and compiled with fullgraph (the custom op must not break the graph). One JSON line per
shape to --out. On the GPU machine, package and flash-attn-4 installed:

    python3 bench/fa4_check.py --out bench/results/fa4-h100/check.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from autotune.strategies._fa4_impl import fa4_attention, fa4_forward  # noqa: E402

SHAPES = [  # (batch, heads, kv heads, seq, head width)
    (8, 8, 8, 1024, 64),  # phase8-small's attention
    (1, 8, 8, 8192, 64),  # phase8-long's
    (4, 16, 4, 1024, 64),  # grouped kv heads (4 query heads each), given to FA4 ungrouped
]


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention in fp32 with k, v repeated to q's heads; all (B, nh, T, hs)."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(groups, dim=1) for t in (k, v))
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q.float(), k, v, is_causal=True)


def cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def fa4_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FA4 given the kv heads ungrouped (its own GQA); fa4_attention where they are as many."""
    if k.shape[1] == q.shape[1]:
        return fa4_attention(q, k, v, 0.0)
    return fa4_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))[0].transpose(1, 2)


def errors(fn, q, k, v, dout, ref_out, ref_grads) -> dict[str, float]:
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    torch.cuda.synchronize()
    err = {"out": (out.float() - ref_out).abs().max().item()}
    for name, t, r in zip(("dq", "dk", "dv"), (q, k, v), ref_grads):
        err[name] = (t.grad.float() - r).abs().max().item()
    return err


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    compiled = torch.compile(fa4_grouped, fullgraph=True)
    for B, H, KV, T, D in SHAPES:
        q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, KV, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        dout = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
        q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
        ref_out = reference(q32, k32, v32)
        ref_out.backward(dout.float())
        ref_grads = (q32.grad, k32.grad, v32.grad)
        t0 = time.perf_counter()
        row = {"shape": {"batch": B, "heads": H, "kv_heads": KV, "seq": T, "head_dim": D}}
        row["fa4"] = errors(fa4_grouped, q, k, v, dout, ref_out.detach(), ref_grads)
        row["first_call_s"] = time.perf_counter() - t0  # FA4 JIT-compiles its kernels (cached on disk)
        row["fa4_compiled"] = errors(compiled, q, k, v, dout, ref_out.detach(), ref_grads)
        row["cudnn"] = errors(cudnn, q, k, v, dout, ref_out.detach(), ref_grads)
        row["gpu"] = torch.cuda.get_device_name()
        row["torch"] = torch.__version__
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
