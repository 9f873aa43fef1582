"""Why is bf16 + compile + padded vocab + forced flash slower than bf16 + compile alone?

Hand loops on phase8-small, micro-batch 48, in one process; each variant changes only how the
logits reach the loss, or how the attention backend is picked:

    python3 bench/padding_probe.py --out bench/results/padding_probe_h200.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from autotune.workloads import load_workload  # noqa: E402


def loss_fn(variant: str, model, idx, targets, V: int):
    x = model.embed(idx) + model.pos(torch.arange(idx.shape[1], device=idx.device))
    for block in model.blocks:
        x = block(x)
    logits = model.head(model.norm(x))  # (B, T, Vp)
    if variant == "slice":
        logits = logits[..., :V]
    elif variant == "mask":
        pad = torch.arange(logits.shape[-1], device=logits.device) >= V
        logits = logits.masked_fill(pad, float("-inf"))
    # "none" (unpadded model) and "nanogpt" (padded columns kept in the softmax) use all columns
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def run(variant: str, padded: bool, flash: bool, mb: int, steps: int) -> dict:
    wl = load_workload("phase8-small")
    torch.manual_seed(0)
    model = wl.build_model()
    V = wl.vocab_size
    if padded:
        rows = -(-V // 64) * 64
        w = torch.zeros(rows, model.embed.weight.shape[1])
        w[:V] = model.embed.weight.data
        model.embed.weight = torch.nn.Parameter(w)
        model.head.weight = model.embed.weight
    model.cuda()
    torch.backends.cuda.matmul.allow_tf32 = True
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, fused=True)
    f = torch.compile(lambda i, t: loss_fn(variant, model, i, t, V))
    data = torch.randint(0, V, (4, mb, wl.seq_len + 1), device="cuda")

    def step(i):
        b = data[i % 4]
        ctx = (
            torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION)
            if flash
            else torch.autocast("cuda", enabled=True, dtype=torch.bfloat16)
        )
        with torch.autocast("cuda", dtype=torch.bfloat16), ctx:
            loss = f(b[:, :-1], b[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(8):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(i)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    out = {
        "variant": variant,
        "padded": padded,
        "flash_forced": flash,
        "micro_batch": mb,
        "tokens_per_s": steps * mb * wl.seq_len / dt,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(),
        "loss": loss.item(),
    }
    model = opt = f = None  # frees them as `del` did; ruff flags a `del` of closure cells as F821 (astral-sh/ruff#9858)
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    variants = [
        ("none", False, False),
        ("slice", True, False),
        ("mask", True, False),
        ("nanogpt", True, False),
        ("none", False, True),
    ]
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv)}
    rows = []
    for mb in (48,):
        for variant, padded, flash in variants:
            row = run(variant, padded, flash, mb, args.steps) | env
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = rows[0]["tokens_per_s"]
    for r in rows:
        print(
            f"{r['variant']:8s} padded={r['padded']!s:5s} flash={r['flash_forced']!s:5s} mb={r['micro_batch']:3d} "
            f"{r['tokens_per_s']:12,.0f} {r['tokens_per_s'] / base:6.3f} {r['peak_memory_bytes'] / 2**30:7.2f} GiB"
        )


if __name__ == "__main__":
    main()
