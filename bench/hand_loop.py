"""A hand-tuned training loop of a plan's Hugging Face model, timed as autotune's trials are.

What a careful engineer writes without autotune: the same model built with transformers
(``AutoModelForCausalLM.from_config``, attention "sdpa"), fp32 weights under bf16 autocast
(fp32 on a CPU), ``torch.compile`` of the model and its loss together (no KV cache), fused
AdamW (the plan's lr, betas, weight decay on matrices only, gradient clipping at the plan's
norm), the plan's global batch split into micro-batches with gradient accumulation, and the
plan's data: windows of the same default corpus (held on the device, sampled there), or random
tokens where the plan trains on them.

Timed as ``autotune/runtime/measure.py`` times a plan: ``--warmup`` and ``--steps`` count micro-batch
steps, divided by the accumulation (at least one optimizer step each); warm-up steps first
(compilation included), then each timed optimizer step between two CUDA events (no sync per
step; the host clock on a CPU), tokens/s = global batch x seq_len / the median step.

    python3 bench/hand_loop.py run PLAN --micro-batches 8,16,32,64 --out hand.jsonl [--label sweep]
    python3 bench/hand_loop.py best hand.jsonl                        # the fastest micro-batch
    python3 bench/hand_loop.py compare ab.jsonl --out summary.jsonl   # plan vs hand, A B rounds

``run`` writes one JSON line per micro-batch (status ok or oom, tokens/s, step times, losses).
``compare`` reads the A B rounds' lines ({"loop": "plan"|"hand", "tokens_per_s": ...}) and
prints the ratio of the medians (plan / hand) and each side's spread.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

OURS = ("seq_len", "attn_implementation", "weights")
"""Workload override keys that are autotune's, not the model config's."""
DEFAULT_SEQ_LEN = 1024
"""autotune.workloads.hf_config's default training length, where the plan's overrides name none."""


def build_model(overrides: dict[str, Any], device: Any, model_type: str = "llama") -> Any:
    """The plan's HF model (``hf:<model_type>``), as plain transformers builds it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in overrides.items() if k not in OURS}
    config = AutoConfig.for_model(fields.pop("model_type", model_type), **fields)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.to(device=device, dtype=torch.float32)


def optimizer(model: Any, train: dict[str, Any], device: Any) -> Any:
    """Fused AdamW; weight decay on matrices only (as the executor: not norms or biases)."""
    import torch

    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": train["weight_decay"]}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train["lr"], betas=(train["beta1"], train["beta2"]), fused=True)


class Windows:
    """Batches (x, y) of ``seq_len`` + 1 token windows, sampled on the device."""

    def __init__(self, train: dict[str, Any], vocab_size: int, seq_len: int, device: Any) -> None:
        import numpy as np
        import torch

        self.seq_len, self.vocab, self.device = seq_len, vocab_size, device
        self.gen = torch.Generator(device=device).manual_seed(train["seed"])
        self.tokens = None
        if not train["random_tokens"]:
            from autotune.data import default_dataset, open_dataset

            path = default_dataset(vocab_size) if train["data"] == "default" else train["data"]
            tokens = np.asarray(open_dataset(path).train.tokens, dtype=np.int64)
            self.tokens = torch.from_numpy(tokens).to(device)
            self.offsets = torch.arange(seq_len + 1, device=device)

    def get(self, batch: int) -> tuple[Any, Any]:
        import torch

        if self.tokens is None:
            seq = torch.randint(0, self.vocab, (batch, self.seq_len + 1), device=self.device, generator=self.gen)
        else:
            starts = torch.randint(
                0, self.tokens.numel() - self.seq_len - 1, (batch, 1), device=self.device, generator=self.gen
            )
            seq = self.tokens[starts + self.offsets]  # (B, T + 1)
        return seq[:, :-1], seq[:, 1:]


def measure(plan: dict[str, Any], micro: int, args: argparse.Namespace) -> dict[str, Any]:
    """One micro-batch size: build, compile, warm up, time; a record (status ok or oom)."""
    import torch
    import torch.nn.functional as F

    from autotune.runtime.measure import step_timer

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    train, overrides = plan["train"], plan["workload"]["overrides"]
    seq_len, global_batch = int(overrides.get("seq_len") or DEFAULT_SEQ_LEN), global_batch_of(plan)
    accum = global_batch // micro
    warmup, steps = max(1, args.warmup // accum), max(1, args.steps // accum)
    torch.manual_seed(train["seed"])
    model = build_model(overrides, device, plan["workload"]["name"].removeprefix("hf:"))
    vocab = model.config.vocab_size
    opt = optimizer(model, train, device)
    data = Windows(train, vocab, seq_len, device)
    dtype = torch.bfloat16 if cuda else None  # bf16 autocast on the GPU; fp32 on a CPU (as its plans)

    def loss_of(x: Any, y: Any) -> Any:
        # The loss inside the compiled graph (as nanoGPT's forward computes it), so inductor
        # fuses the cross-entropy over the (B, T, V) logits instead of materialising them in
        # fp32 three times; no KV cache in training.
        logits = model(input_ids=x, use_cache=False).logits  # (B, T, V); y is x shifted already
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    compiled = torch.compile(loss_of, dynamic=False) if args.compile else loss_of

    def step() -> Any:
        total = torch.zeros((), device=device)
        for _ in range(accum):
            x, y = data.get(micro)
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = compiled(x, y)
            (loss / accum).backward()
            total += loss.detach() / accum
        if train["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train["grad_clip"], foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    record: dict[str, Any] = {
        "loop": "hand",
        "label": args.label,
        "micro_batch": micro,
        "grad_accum": accum,
        "global_batch": global_batch,
        "seq_len": seq_len,
        "params": sum(p.numel() for p in model.parameters()),
        "compile": args.compile,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "torch": torch.__version__,
    }
    start = time.monotonic()
    try:
        losses = [step() for _ in range(warmup)]
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        timers = []
        for _ in range(steps):
            with step_timer(device) as t:  # the very timer of autotune's trials
                losses.append(step())
            timers.append(t)
        if cuda:
            torch.cuda.synchronize(device)
    except torch.OutOfMemoryError as e:
        return {**record, "status": "oom", "error": str(e).splitlines()[0], "wall_s": time.monotonic() - start}
    times = [t.seconds() for t in timers]
    values = torch.stack(losses).float().tolist()
    step_time = statistics.median(times)
    status = "ok" if all(math.isfinite(v) for v in values) else "nan"
    return {
        **record,
        "status": status,
        "tokens_per_s": global_batch * seq_len / step_time,
        "step_time_s": step_time,
        "step_times": times,
        "loss_start": values[0],
        "loss_end": values[-1],
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "wall_s": time.monotonic() - start,
    }


def global_batch_of(plan: dict[str, Any]) -> int:
    """Samples per optimizer step of a one-process plan: micro-batch x accumulation."""
    if plan["launch"]["nproc_per_node"] * plan["launch"]["nnodes"] != 1:
        sys.exit("hand_loop: the plan uses several processes; this loop is for one device")
    accum = next((s["knobs"].get("steps", 1) for s in plan["strategies"] if s["name"] == "grad_accum"), 1)
    return int(plan["train"]["micro_batch_size"]) * int(accum)


def run(args: argparse.Namespace) -> int:
    import gc

    import torch

    plan = json.loads(args.plan.read_text())
    global_batch = global_batch_of(plan)
    # Largest first: the likeliest fastest is measured before a deadline cuts the sweep short.
    micros = sorted((m for m in args.micro_batches if global_batch % m == 0 and m <= global_batch), reverse=True)
    if not micros:
        sys.exit(
            f"hand_loop: none of the micro-batches {args.micro_batches} divides the plan's global batch {global_batch}"
        )
    for micro in micros:
        if args.until is not None and time.time() > args.until:
            record = {
                "loop": "hand",
                "label": args.label,
                "micro_batch": micro,
                "status": "skipped",
                "error": "past --until",
            }
        else:
            record = measure(plan, micro, args)
        print(json.dumps({k: v for k, v in record.items() if k != "step_times"}), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        torch._dynamo.reset()  # the next size compiles afresh, as a new run would
    return 0


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def best(args: argparse.Namespace) -> int:
    ok = [r for r in read_lines(args.results) if r.get("status") == "ok"] if args.results.is_file() else []
    if not ok:
        sys.exit(f"hand_loop: no micro-batch of {args.results} ran")
    print(max(ok, key=lambda r: r["tokens_per_s"])["micro_batch"])
    return 0


def compare(args: argparse.Namespace) -> int:
    """Ratio of medians, plan over hand, of the interleaved rounds; spread = (max - min) / 2 / median."""
    rounds = read_lines(args.results)
    runs = {
        side: [r["tokens_per_s"] for r in rounds if r["loop"] == side and r.get("status") == "ok"]
        for side in ("plan", "hand")
    }
    summary: dict[str, Any] = {"rounds": {k: len(v) for k, v in runs.items()}}
    for side, values in runs.items():
        median = statistics.median(values) if values else None
        summary[side] = {
            "median_tokens_per_s": median,
            "runs": values,
            "spread": (max(values) - min(values)) / 2 / median if median else None,
        }
        print(
            f"{side:<5} median {median or 0:>12,.0f} tokens/s  spread "
            f"±{100 * (summary[side]['spread'] or 0):.1f}%  runs {[round(v) for v in values]}"
        )
    p, h = summary["plan"]["median_tokens_per_s"], summary["hand"]["median_tokens_per_s"]
    summary["ratio_plan_over_hand"] = p / h if p and h else None
    print(f"plan / hand = {summary['ratio_plan_over_hand'] or float('nan'):.3f}")
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(summary) + "\n")
    return 0 if summary["ratio_plan_over_hand"] else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="time the hand loop at each micro-batch that divides the plan's global batch")
    r.add_argument("plan", type=Path)
    r.add_argument("--micro-batches", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32, 64])
    r.add_argument(
        "--warmup", type=int, default=5, help="micro-batch steps before timing (as autotune.runtime.measure --warmup)"
    )
    r.add_argument(
        "--steps", type=int, default=20, help="micro-batch steps timed (as autotune.runtime.measure --steps)"
    )
    r.add_argument("--device", default="cuda")
    r.add_argument("--no-compile", dest="compile", action="store_false")
    r.add_argument("--label", default="sweep")
    r.add_argument("--until", type=float, default=None, help="start no further micro-batch after this Unix time")
    r.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("best", help="print the fastest micro-batch of a run's lines")
    b.add_argument("results", type=Path)
    c = sub.add_parser("compare", help="ratio of medians of interleaved plan and hand rounds")
    c.add_argument("results", type=Path)
    c.add_argument("--out", type=Path)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # autotune.data for the corpus
    return {"run": run, "best": best, "compare": compare}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
