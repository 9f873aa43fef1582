"""What `autotune plan` prints: a row per trial as it ends, then the summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


class TrialTable:
    """A live table: one row per trial, printed as the trial ends, with the best so far."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.best: float | None = None
        self.header_done = False

    def row(self, trial: Any, plan: Any, result: Any, status: str) -> None:
        if not self.header_done:
            self.console.print(f"{'trial':>5} {'status':<11} {'tokens/s':>12} {'best':>12} {'mem GiB':>8} {'pred GiB':>8} {'batch':>10}  strategies")
            self.header_done = True
        f = result.figures if result is not None else None
        tps = f.tokens_per_s if f is not None and f.status == "ok" else None
        if tps is not None and (self.best is None or tps > self.best):
            self.best = tps
        strategies = ", ".join(s.name + ("(" + ",".join(f"{v}" for v in s.knobs.values()) + ")" if s.knobs else "") for s in plan.strategies) or "plain"
        why = ""
        if status != "ok":
            why = "  ← " + str(trial.user_attrs.get("error", ""))[:90]
        self.console.print(
            f"{trial.number:>5} {status:<11} {tps or 0:>12,.0f} {self.best or 0:>12,.0f} "
            f"{_gib(f.peak_memory_bytes if f else None):>8} {_gib(trial.user_attrs.get('predicted_peak_memory_bytes')):>8} "
            f"{_batch(plan):>10}  {strategies}{why}",
            highlight=False,
        )


def _batch(plan: Any) -> str:
    """micro-batch x accumulation, and x processes when there are several."""
    procs = plan.launch.nproc_per_node * plan.launch.nnodes
    return f"{plan.train.micro_batch_size}x{plan.grad_accum()}" + (f"x{procs}p" if procs > 1 else "")


def error_distribution(errors: list[float]) -> str:
    """Median, 90th percentile and worst of |predicted / measured - 1|, and the signed range."""
    absolute = sorted(abs(e) for e in errors)
    p90 = absolute[min(len(absolute) - 1, round(0.9 * (len(absolute) - 1)))]
    return (f"median |error| {absolute[len(absolute) // 2]:.1%}, p90 {p90:.1%}, max {absolute[-1]:.1%} "
            f"(signed {min(errors):+.1%} .. {max(errors):+.1%})")


def print_summary(console: Console, plan: Any, summary: Any, space: Any, path: Path) -> None:
    import optuna

    top = sorted(summary.complete, key=lambda t: -t.value)[:5]
    table = Table("trial", "tokens/s", "× baseline", "strategies", title="top trials")
    base = summary.baseline.value if summary.baseline is not None and summary.baseline.state == optuna.trial.TrialState.COMPLETE else None
    for t in top:
        names = ", ".join(s["name"] for s in t.user_attrs["plan"]["strategies"]) or "plain"
        table.add_row(str(t.number), f"{t.value:,.0f}", f"{t.value / base:.2f}" if base else "-", names)
    console.print(table)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.counts.items()))
    console.print(f"trials: {counts}")
    for what, errors in (("peak memory", summary.memory_errors), ("step time", summary.time_errors)):
        if errors:
            console.print(f"cost model, {what} vs measured over {len(errors)} trials: {error_distribution(errors)}", highlight=False)
    excluded = space.graph.excluded() | space.left_out
    if excluded:
        console.print("excluded strategies:")
        for name, reason in sorted(excluded.items()):
            console.print(f"  {name}: {reason}", highlight=False)
    m, b = plan.measured, plan.baseline
    console.print(f"global batch {plan.global_batch()} samples a step: micro-batch {plan.train.micro_batch_size} x {plan.grad_accum()} accumulated x {plan.launch.nproc_per_node * plan.launch.nnodes} processes", highlight=False)
    line = f"plan written: {path}  measured {m.tokens_per_s or 0:,.0f} tokens/s ({m.status})"
    if b is not None and b.tokens_per_s and m.tokens_per_s:
        line += f", baseline {b.tokens_per_s:,.0f} tokens/s: {m.tokens_per_s / b.tokens_per_s:.2f}x"
    console.print(line, highlight=False)
    if plan.loss_check is not None:
        c = plan.loss_check
        console.print(f"loss check over {c.steps} steps: {c.loss_end:.4f} vs plain {c.reference_loss_end:.4f} "
                      f"({'passed' if c.passed else 'FAILED'}, tolerance {c.tolerance:.0%})", highlight=False)
    console.print(f"run it: autotune run {path}", highlight=False)

