"""Single-device strategies on one GPU, each measured against baselines in the same process.

Every variant is a plan trained by the real Trainer (what `autotune run` uses): the roadmap's
starting point (fp32, naive attention), plain fp32 SDPA, a sensible base (bf16 autocast + TF32,
PyTorch's SDPA, fused AdamW), each single-device strategy alone on that base, torch.compile,
and the obvious combination at micro-batch 32 and 48. Random tokens (throughput only), except
the two loader variants, which read the default corpus.

Per variant: ``--warmup`` steps (compilation included), then ``--steps`` timed steps between
two device synchronisations; tokens/s, the ratio to the roadmap baseline and to the variant it
is compared with, and peak memory (reset before each variant). A variant that cannot run here
is recorded as "unsupported", an OOM as "oom"; the run goes on. One JSON row per variant is
appended to ``--out`` as soon as it is measured, then a table is printed.

    python3 bench/single_device.py --out bench/results/single_device_h200.jsonl
    # smoke test
    python3 bench/single_device.py --device cpu --workload tiny --steps 3 --warmup 2 --out /tmp/smoke.jsonl
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autotune import plan as planmod  # noqa: E402
from autotune.distributed import pick_device  # noqa: E402
from autotune.errors import UserError  # noqa: E402
from autotune.runtime.metrics import peak_memory_bytes  # noqa: E402
from autotune.runtime.trainer import Trainer  # noqa: E402

BASELINE = "fp32, naive attention (roadmap baseline)"
BASE = "bf16 + SDPA (base)"

FP32 = {"precision": {"dtype": "fp32", "tf32": False}}
BF16 = {"precision": {"dtype": "bf16", "tf32": True}}
COMPILE = {"compile": {"mode": "default"}}
COMBINATION = {
    **BF16,
    "attention": {"backend": "flash"},
    "compile": {"mode": "default"},
    "vocab_padding": {"multiple": 64},
    "optimizer": {"implementation": "fused"},
}


@dataclass(frozen=True, kw_only=True)
class Variant:
    name: str
    """Row label."""
    strategies: dict[str, dict[str, Any]]
    """The plan's strategies and knobs."""
    vs: str
    """The variant this one is compared with (ratio_to_vs)."""
    micro_batch: int | None = None
    """Micro-batch size; None: --micro-batch."""
    real_text: bool = False
    """Read the default corpus through the loader instead of random tokens."""
    comparison: str = ""
    """What the comparison shows, where the name does not say."""


def variants(micro_batch: int) -> list[Variant]:
    half = micro_batch // 2
    return [
        Variant(name=BASELINE, strategies={**FP32, "attention": {"backend": "naive"}}, vs=BASELINE),
        Variant(name="fp32, SDPA", strategies=FP32, vs=BASELINE),
        Variant(name=BASE, strategies=BF16, vs="fp32, SDPA", comparison="precision alone"),
        Variant(
            name="fp16 + loss scaling, SDPA", strategies={"precision": {"dtype": "fp16", "tf32": True}}, vs="fp32, SDPA"
        ),
        *(
            Variant(name=f"bf16, attention {b}", strategies={**BF16, "attention": {"backend": b}}, vs=BASE)
            for b in ("naive", "efficient", "flash", "cudnn", "fa3")
        ),
        Variant(name="bf16, vocab padding 64", strategies={**BF16, "vocab_padding": {"multiple": 64}}, vs=BASE),
        *(
            Variant(
                name=f"bf16, AdamW {impl}",
                strategies={**BF16, "optimizer": {"implementation": impl}},
                vs=BASE,
                comparison="base is fused",
            )
            for impl in ("foreach", "forloop")
        ),
        Variant(
            name="bf16, checkpoint every block", strategies={**BF16, "activation_checkpoint": {"mode": "full"}}, vs=BASE
        ),
        Variant(
            name="bf16, checkpoint every 2nd block",
            strategies={**BF16, "activation_checkpoint": {"mode": "selective", "every": 2}},
            vs=BASE,
        ),
        Variant(
            name=f"bf16, grad accum 2 x micro-batch {half}",
            strategies={**BF16, "grad_accum": {"steps": 2}},
            micro_batch=half,
            vs=BASE,
            comparison="same global batch as base",
        ),
        Variant(name="bf16, real-text loader (pinned, prefetch 2)", strategies=BF16, real_text=True, vs=BASE),
        Variant(
            name="bf16, real-text loader (unpinned, no prefetch)",
            strategies={**BF16, "dataloader": {"pin_memory": False, "prefetch": 0}},
            real_text=True,
            vs="bf16, real-text loader (pinned, prefetch 2)",
        ),
        Variant(name="bf16 + compile", strategies={**BF16, **COMPILE}, vs=BASE),
        Variant(
            name="bf16 + compile reduce-overhead",
            strategies={**BF16, "compile": {"mode": "reduce-overhead"}},
            vs="bf16 + compile",
        ),
        Variant(name=f"combination, micro-batch {micro_batch}", strategies=COMBINATION, vs="bf16 + compile"),
        Variant(name="combination, micro-batch 48", strategies=COMBINATION, micro_batch=48, vs="bf16 + compile"),
    ]


def make_plan(v: Variant, args: argparse.Namespace) -> planmod.Plan:
    train = planmod.TrainSpec(
        micro_batch_size=v.micro_batch or args.micro_batch,
        steps=args.warmup + args.steps,
        random_tokens=not v.real_text,
        eval_interval=0,
        checkpoint_interval=0,
    )
    return planmod.new(args.workload, train=train, strategies=v.strategies, command=" ".join(sys.argv))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Free the previous variant: its compiled graphs (and CUDA-graph pools), its memory."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(v: Variant, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Build the variant's Trainer, warm up, time ``args.steps`` steps; never raises."""
    release(device)  # the previous variant's; inductor's on-disk cache stays for the next compile
    began = time.perf_counter()
    trainer = None
    try:
        trainer = Trainer(make_plan(v, args), device=device)
        for step in range(args.warmup):
            trainer.train_step(step)
        sync(device)
        start = time.perf_counter()
        for step in range(args.warmup, args.warmup + args.steps):
            loss = trainer.train_step(step)
        sync(device)
        seconds = time.perf_counter() - start
        return {
            "status": "ok",
            "tokens_per_s": args.steps * trainer.tokens_per_step / seconds,
            "step_time_s": seconds / args.steps,
            "peak_memory_bytes": peak_memory_bytes(device),
            "final_loss": loss.item(),
            "notes": trainer.ctx.notes,
            "wall_s": time.perf_counter() - began,
        }
    except UserError as e:  # a setting this machine cannot run (e.g. fa3 without its package)
        return {"status": "unsupported", "error": str(e)}
    except torch.cuda.OutOfMemoryError as e:
        return {"status": "oom", "error": str(e).splitlines()[0]}
    except Exception as e:  # a crash costs this variant, not the benchmark
        traceback.print_exc()
        return {"status": "crash", "error": f"{type(e).__name__}: {e}"[:500]}
    finally:
        if trainer is not None:
            trainer.close()


def environment(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "workload": args.workload,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'variant':48s} {'status':>11s} {'tokens/s':>12s} {'x baseline':>10s} {'x vs':>6s} {'peak GiB':>9s}  vs")
    for r in rows:
        tok = f"{r['tokens_per_s']:12,.0f}" if r.get("tokens_per_s") else f"{'-':>12s}"
        base = f"{r['ratio_to_baseline']:10.2f}" if r.get("ratio_to_baseline") else f"{'-':>10s}"
        vs = f"{r['ratio_to_vs']:6.2f}" if r.get("ratio_to_vs") else f"{'-':>6s}"
        mem = f"{r['peak_memory_bytes'] / 2**30:9.2f}" if r.get("peak_memory_bytes") else f"{'-':>9s}"
        print(f"{r['variant']:48s} {r['status']:>11s} {tok} {base} {vs} {mem}  {r['vs']}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['variant']}: {r['error']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSONL file the rows are appended to")
    ap.add_argument("--workload", default="phase8-small")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=15, help="untimed steps first (compilation included)")
    ap.add_argument("--steps", type=int, default=40, help="timed steps")
    ap.add_argument("--only", default=None, help="run only the variants whose name matches this regex")
    args = ap.parse_args()

    device = pick_device(args.device)
    began = time.perf_counter()
    env = environment(args, device)
    print(json.dumps(env))
    chosen = [v for v in variants(args.micro_batch) if args.only is None or re.search(args.only, v.name)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    by_name: dict[str, dict[str, Any]] = {}
    for v in chosen:
        result = measure(v, args, device)
        row = {
            "variant": v.name,
            "vs": v.vs,
            "strategies": v.strategies,
            "micro_batch": v.micro_batch or args.micro_batch,
            **result,
        }
        if v.comparison:
            row["comparison"] = v.comparison
        by_name[v.name] = row
        for key, ref in (("ratio_to_baseline", BASELINE), ("ratio_to_vs", v.vs)):
            other = by_name.get(ref, {}).get("tokens_per_s")
            if row.get("tokens_per_s") and other:
                row[key] = row["tokens_per_s"] / other
        row.update(env)
        rows.append(row)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        tok = f"{row['tokens_per_s']:,.0f} tok/s" if row.get("tokens_per_s") else row.get("error", "")
        print(f"[{v.name}] {row['status']} {tok} ({result.get('wall_s', 0):.0f} s)", flush=True)
    print_table(rows)
    print(f"\n{len(rows)} variants in {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
