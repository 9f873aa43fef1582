"""The cost model against measured trials: its error on a study, and measurements to check it by.

    python3 bench/costmodel_check.py check bench/results/plan-phase8-small/studies.db [--profile P]
    python3 bench/costmodel_check.py check bench/results/costmodel-hf/h200.jsonl
    python3 bench/costmodel_check.py measure --out hf.jsonl [--cases qwen3,llama3] [--part 1|2]   (on a GPU)

``check`` prints, for every completed trial of a study (an Optuna SQLite file of ``autotune
plan``) or every ``ok`` line of a ``measure`` file, the measured peak memory and step time and
the current cost model's prediction of both as predicted / measured - 1 (and, for a study, the
prediction stored when the trial ran), then the median |error| of each. Step times are
predicted from the profile beside the study (``profile.json``, or ``--profile``), or from the
rates a ``measure`` file recorded.

``measure`` runs Hugging Face models of each family, shaped as released models are, through
the very trial code the planner launches (``autotune.runtime.measure.measure``, in this process, one
case after another), and writes one JSON line per case: the plan, the measured figures, the
card and the matmul rates and copy bandwidth measured first (what ``autotune profile``
measures). Cases that do not fit the card are recorded as oom.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SEQ = 1024
COMMON = dict(bos_token_id=0, eos_token_id=1, max_position_embeddings=4096, seq_len=SEQ, attn_implementation="sdpa")
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    # The model: Qwen3 shaped, 0.34B, head_dim 128 != 1024 / 16, 8 kv heads, tied.
    "qwen3": (
        "hf:qwen3",
        dict(
            COMMON,
            hidden_size=1024,
            num_hidden_layers=12,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=3072,
            vocab_size=151936,
            tie_word_embeddings=True,
        ),
    ),
    # Llama 3's vocabulary (128,256) on a 125M-wide body, untied: the logits dominate.
    "llama3": (
        "hf:llama",
        dict(
            COMMON,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=4,
            intermediate_size=2048,
            vocab_size=128256,
            tie_word_embeddings=False,
        ),
    ),
    "qwen2": (
        "hf:qwen2",
        dict(
            COMMON,
            hidden_size=896,
            num_hidden_layers=8,
            num_attention_heads=14,
            num_key_value_heads=2,
            intermediate_size=4864,
            vocab_size=151936,
            tie_word_embeddings=True,
        ),
    ),
    "mistral": (
        "hf:mistral",
        dict(
            COMMON,
            hidden_size=1024,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=8,
            intermediate_size=3584,
            vocab_size=32768,
            sliding_window=None,
        ),
    ),
    # Gemma 2: four norms a block, gelu-tanh gated MLP, soft-capped logits, head_dim 128 != 768 / 8.
    "gemma2": (
        "hf:gemma2",
        dict(
            COMMON,
            hidden_size=768,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=128,
            intermediate_size=3072,
            vocab_size=32000,
        ),
    ),
    "gpt2": (
        "hf:gpt2",
        dict(seq_len=SEQ, attn_implementation="sdpa", n_positions=SEQ, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    ),
    # GPT-NeoX: fused qkv, partial RoPE, parallel residual, untied.
    "gpt_neox": (
        "hf:gpt_neox",
        dict(
            COMMON,
            hidden_size=1024,
            num_hidden_layers=8,
            num_attention_heads=16,
            intermediate_size=4096,
            vocab_size=50304,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        ),
    ),
    # Phi-3: fused qkv and gate_up projections.
    "phi3": (
        "hf:phi3",
        dict(
            COMMON,
            hidden_size=1024,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=16,
            intermediate_size=2816,
            vocab_size=32064,
            pad_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attention_dropout=0.0,
        ),
    ),
}
BF16 = {"precision": {"dtype": "bf16", "tf32": True}}
COMPILED = BF16 | {"compile": {"mode": "default", "scope": "model"}}
CASES: list[tuple[str, int, dict[str, Any]]] = [
    # (family, micro-batch, strategies): every family in fp32 and bf16 eager; the issue's
    # model also compiled, checkpointed, in fp16, with accumulation and an attention backend.
    *[(f, 2, {}) for f in FAMILIES],
    *[(f, 8, BF16) for f in FAMILIES],
    ("qwen3", 4, BF16),
    ("qwen3", 16, BF16),
    ("qwen3", 16, {"precision": {"dtype": "fp16", "tf32": True}}),
    ("qwen3", 16, BF16 | {"activation_checkpoint": {"mode": "full"}}),
    ("qwen3", 8, BF16 | {"grad_accum": {"steps": 2}}),
    ("qwen3", 8, BF16 | {"attention": {"backend": "cudnn"}}),
    ("qwen3", 8, COMPILED),
    ("qwen3", 16, COMPILED),
    ("llama3", 16, COMPILED),
    ("gemma2", 16, COMPILED),
]


def case_plan(family: str, micro_batch: int, strategies: dict[str, Any]) -> dict[str, Any]:
    name, overrides = FAMILIES[family]
    return {
        "schema_version": 1,
        "workload": {"name": name, "overrides": overrides},
        "train": {"micro_batch_size": micro_batch, "random_tokens": True, "warmup_steps": 0},
        "strategies": [{"name": n, "knobs": k} for n, k in strategies.items()],
        "launch": {"device": "cuda"},
    }


def rates() -> dict[str, Any]:
    """The card's matmul rates (fp32, tf32, bf16: 8192^3 products) and copy bandwidth, as
    ``autotune profile`` measures them: medians of 10 after 3 warm-ups."""
    import torch

    def median_s(fn: Any) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    n, out = 8192, {}
    for name, dtype, tf32 in (
        ("fp32", torch.float32, False),
        ("tf32", torch.float32, True),
        ("bf16", torch.bfloat16, False),
    ):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
        out[name] = 2 * n**3 / median_s(lambda a=a, b=b: a @ b)
    torch.backends.cuda.matmul.allow_tf32 = False
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    out["copy"] = 2 * src.numel() / median_s(lambda: dst.copy_(src))  # bytes read + written
    return out


def measure(args: argparse.Namespace) -> int:
    import gc

    import torch

    from autotune import plan as planmod
    from autotune.runtime.measure import measure as run
    from autotune.runtime.trial import TrialBudget

    out = Path(args.out)
    card = {
        "gpu": torch.cuda.get_device_name(0),
        "memory_bytes": torch.cuda.get_device_properties(0).total_memory,
        "torch": torch.__version__,
        "rates": rates(),
    }
    print(json.dumps(card), flush=True)
    families = set(args.cases.split(",")) if args.cases else set(FAMILIES)
    budget = TrialBudget(warmup_steps=args.warmup, timed_steps=args.steps, timeout_s=600, target_s=None)
    for family, micro_batch, strategies in CASES:
        if family not in families or (args.part and ("compile" in strategies) != (args.part == 2)):
            continue
        data = case_plan(family, micro_batch, strategies)
        torch.backends.cuda.matmul.allow_tf32 = False  # a plan without precision runs plain fp32
        torch.backends.cudnn.allow_tf32 = True
        start = time.monotonic()
        result = run(planmod.from_dict(data), budget)
        f = result.figures
        line = {
            "family": family,
            "plan": data,
            "status": f.status,
            "step_time_s": f.step_time_s,
            "peak_memory_bytes": f.peak_memory_bytes,
            "tokens_per_s": f.tokens_per_s,
            "error": result.error,
            "wall_s": round(time.monotonic() - start, 1),
            **card,
        }
        print(
            json.dumps(
                {k: v for k, v in line.items() if k not in ("plan", "rates")}
                | {"strategies": strategies, "mb": micro_batch}
            ),
            flush=True,
        )
        with out.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        del result
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    return 0


def _errors(label: str, errors: list[float]) -> str:
    if not errors:
        return f"{label}: no trial"
    return (
        f"{label}: median |error| {statistics.median(abs(e) for e in errors):.1%} "
        f"over {len(errors)} (from {min(errors):+.1%} to {max(errors):+.1%})"
    )


def predict(plan: Any, rates: dict[str, float], bandwidth: float | None) -> Any:
    from autotune import costmodel
    from autotune.workloads import load_workload

    workload = load_workload(plan.workload.name, plan.workload.overrides)
    return costmodel.estimate(
        workload, plan.train.micro_batch_size, plan.strategy_configs(), matmul_flops=rates, memory_bandwidth=bandwidth
    )


def rows_of(source: str, profile: str | None) -> list[dict[str, Any]]:
    """(plan, measured figures, stored predictions, rates) of each measured trial of ``source``."""
    from autotune import plan as planmod

    if source.endswith(".jsonl"):
        rows = []
        for text in Path(source).read_text().splitlines():
            line = json.loads(text)
            if line.get("status") == "ok":
                r = line["rates"]
                rows.append(
                    {
                        "name": f"{line['family']} x{line['plan']['train']['micro_batch_size']}",
                        "plan": planmod.from_dict(line["plan"]),
                        "peak": line["peak_memory_bytes"],
                        "time": line["step_time_s"],
                        "rates": r,
                        "bandwidth": r["copy"],
                    }
                )
        return rows
    import optuna

    from autotune.hardware import HardwareProfile

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    found = Path(profile) if profile else Path(source).parent / "profile.json"
    r, bandwidth = {}, None
    if found.is_file():
        measured = HardwareProfile.load(found).measured
        r = {k: v.median for k, v in measured.matmul.items()} if measured else {}
        bandwidth = measured.copy.median if measured and measured.copy else None
    rows = []
    for summary in optuna.get_all_study_summaries(f"sqlite:///{source}"):
        study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{source}")
        for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
            figures = t.user_attrs.get("figures") or {}
            rows.append(
                {
                    "name": f"trial {t.number}",
                    "plan": planmod.from_dict(t.user_attrs["plan"]),
                    "peak": figures.get("peak_memory_bytes"),
                    "time": figures.get("step_time_s"),
                    "rates": r,
                    "bandwidth": bandwidth,
                    "stored": (
                        t.user_attrs.get("predicted_peak_memory_bytes"),
                        t.user_attrs.get("predicted_step_time_s"),
                    ),
                }
            )
    return rows


def check(args: argparse.Namespace) -> int:
    rows = rows_of(args.source, args.profile)
    memory, times, stored_memory, stored_times = [], [], [], []
    print(
        f"{'trial':<14} {'GiB':>7} {'mem now':>8} {'as run':>7} {'step s':>8} {'time now':>8} {'as run':>7}  strategies"
    )
    for row in rows:
        plan, peak, measured_s = row["plan"], row["peak"], row["time"]
        estimate = predict(plan, row["rates"], row["bandwidth"])
        mem = estimate.peak_memory_bytes / peak - 1 if peak else None
        tim = estimate.step_time_s / measured_s - 1 if estimate.step_time_s and measured_s else None
        then_m, then_t = row.get("stored", (None, None))
        then_m = then_m / peak - 1 if then_m and peak else None
        then_t = then_t / measured_s - 1 if then_t and measured_s else None
        for errors, value in ((memory, mem), (times, tim), (stored_memory, then_m), (stored_times, then_t)):
            if value is not None:
                errors.append(value)

        def pct(v: float | None) -> str:
            return f"{v:+.1%}" if v is not None else "-"

        names = ",".join(s.name for s in plan.strategies) or "-"
        print(
            f"{row['name']:<14} {(peak or 0) / 2**30:>7.2f} {pct(mem):>8} "
            f"{pct(then_m):>7} {measured_s or 0:>8.4f} {pct(tim):>8} {pct(then_t):>7}"
            f"  {plan.train.micro_batch_size}x{plan.grad_accum()} {names}"
        )
    print(_errors("peak memory, now", memory))
    print(_errors("step time, now", times))
    if stored_memory or stored_times:
        print(_errors("peak memory, as run", stored_memory))
        print(_errors("step time, as run", stored_times))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="the cost model's errors on a study (SQLite) or a measure file (.jsonl)")
    c.add_argument("source")
    c.add_argument("--profile", help="the profile the study ran with (default: profile.json beside it)")
    m = sub.add_parser("measure", help="measure HF models of each family on this GPU")
    m.add_argument("--out", required=True)
    m.add_argument("--cases", help="families to run, comma-separated (default: all)")
    m.add_argument(
        "--part",
        type=int,
        choices=(1, 2),
        help="1: the eager cases only, 2: the compiled ones (two calls of a 10-minute limit)",
    )
    m.add_argument("--warmup", type=int, default=2)
    m.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    return check(args) if args.command == "check" else measure(args)


if __name__ == "__main__":
    sys.exit(main())
