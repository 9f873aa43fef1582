"""What `autotune plan` prints: a row per trial as it ends, then the summary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table

from autotune.terminal import escape


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
            self.console.print(
                f"{'trial':>5} {'status':<11} {'tokens/s':>12} {'best':>12} "
                f"{'mem GiB':>8} {'pred GiB':>8} {'batch':>10}  strategies"
            )
            self.header_done = True
        f = result.figures if result is not None else None
        tps = f.tokens_per_s if f is not None and f.status == "ok" else None
        if tps is not None and (self.best is None or tps > self.best):
            self.best = tps
        strategies = (
            ", ".join(
                s.name + ("(" + ",".join(f"{v}" for v in s.knobs.values()) + ")" if s.knobs else "")
                for s in plan.strategies
            )
            or "plain"
        )
        why = ""
        if f is not None and f.metrics:  # the strategies' step metrics (moe_dropped...)
            why = "  " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(f.metrics.items()))
        if status != "ok":
            why = "  ← " + str(trial.user_attrs.get("error", ""))
        self.console.print(
            f"{trial.number:>5} {status:<11} {tps or 0:>12,.0f} {self.best or 0:>12,.0f} "
            f"{_gib(f.peak_memory_bytes if f else None):>8} "
            f"{_gib(trial.user_attrs.get('predicted_peak_memory_bytes')):>8} "
            f"{_batch(plan):>10}  {escape(strategies + why)}",
            highlight=False,
        )


class Progress:
    """What runs now, as one live status line with its elapsed seconds and, under a time budget,
    the budget's ("search: trial 3 of 8 running for 31 s, 120 s of the 420 s budget used, about
    300 s left", "confirmation round 2 of 3: the baseline for 5 s"). Only on a terminal: a log
    (CI) gets the table's rows and one line per confirmation round, nothing that refreshes.
    ``started`` (time.monotonic()) is when the budget began counting."""

    def __init__(self, console: Console, *, budget: float | None = None, started: float | None = None) -> None:
        self.budget = budget
        self.started = time.monotonic() if started is None else started
        self.text: str | None = None
        self.since = time.monotonic()
        self.spinner = Spinner("dots", style="status.spinner")
        self.live = Live(console=console, get_renderable=self._render, transient=True) if console.is_terminal else None

    def __call__(self, text: str | None) -> None:
        self.text, self.since = text, time.monotonic()
        if self.live is None:
            return
        if text is None:
            self.live.stop()  # both idempotent
        else:
            self.live.start()

    def line(self) -> str:
        """The status line now (``text`` set)."""
        now = time.monotonic()
        line = f"{self.text} for {now - self.since:.0f} s"
        if self.budget is not None:
            used = now - self.started
            line += (
                f", {used:.0f} s of the {self.budget:.0f} s budget used, "
                f"about {max(0.0, self.budget - used):.0f} s left"
            )
        return line

    def _render(self) -> Any:  # at each refresh, so the seconds count up
        if self.text is None:
            return ""  # the last frame of a stopping display: nothing, not a bare spinner
        self.spinner.update(text=self.line())
        return self.spinner


def _batch(plan: Any) -> str:
    """micro-batch x accumulation, and x processes when there are several."""
    procs = plan.launch.nproc_per_node * plan.launch.nnodes
    return f"{plan.train.micro_batch_size}x{plan.grad_accum()}" + (f"x{procs}p" if procs > 1 else "")


def error_distribution(errors: list[float]) -> str:
    """Median, 90th percentile and worst of |predicted / measured - 1|, and the signed range."""
    absolute = sorted(abs(e) for e in errors)
    p90 = absolute[min(len(absolute) - 1, round(0.9 * (len(absolute) - 1)))]
    return (
        f"median |error| {absolute[len(absolute) // 2]:.1%}, p90 {p90:.1%}, max {absolute[-1]:.1%} "
        f"(signed {min(errors):+.1%} .. {max(errors):+.1%})"
    )


def overhead_line(trials: list[Any]) -> str | None:
    """The search's per-trial overhead, measured by each trial's child: the median start-up
    (Python, torch, the model built), warm-up (compilation) and timed seconds, over the trials
    that recorded them."""
    import statistics

    rows = [
        (t.user_attrs["startup_s"], t.user_attrs["warmup_s"], t.user_attrs["timed_s"])
        for t in trials
        if all(k in t.user_attrs for k in ("startup_s", "warmup_s", "timed_s"))
    ]
    if not rows:
        return None
    startup, warmup, timed = (statistics.median(column) for column in zip(*rows))
    return (
        f"per trial (median of {len(rows)}): start-up {startup:.1f} s, warm-up and compilation {warmup:.1f} s, "
        f"timed {timed:.1f} s"
    )


def print_summary(console: Console, plan: Any, summary: Any, space: Any, path: Path) -> None:
    """The search's top trials (one short run each, so no speed-up there: the baseline trial
    may have been measured hours earlier in a resumed study), then the confirmation, whose
    interleaved medians are the plan's figures and the only speed-up printed."""
    top = sorted(summary.complete, key=lambda t: -t.value)[:5]
    table = Table("trial", "tokens/s", "strategies", title="top trials of the search (one short run each)")
    for t in top:
        names = ", ".join(s["name"] for s in t.user_attrs["plan"]["strategies"]) or "plain"
        role = " (baseline)" if summary.baseline is not None and t.number == summary.baseline.number else ""
        table.add_row(f"{t.number}{role}", f"{t.value:,.0f}", escape(names))
    console.print(table)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.counts.items()))
    console.print(f"trials: {counts}")
    overhead = overhead_line(summary.complete)
    if overhead:
        console.print(overhead, highlight=False)
    for what, errors in (("peak memory", summary.memory_errors), ("step time", summary.time_errors)):
        if errors:
            console.print(
                f"cost model, {what} vs measured over {len(errors)} trials: {error_distribution(errors)}",
                highlight=False,
            )
    excluded = space.graph.excluded() | space.left_out
    if excluded:
        console.print("excluded strategies:")
        for name, reason in sorted(excluded.items()):
            console.print(f"  {name}: {escape(reason)}", highlight=False)
    m, b = plan.measured, plan.baseline
    console.print(
        f"global batch {plan.global_batch()} samples a step: micro-batch {plan.train.micro_batch_size} "
        f"x {plan.grad_accum()} accumulated x {plan.launch.nproc_per_node * plan.launch.nnodes} processes",
        highlight=False,
    )
    for what, f in (("plan", m), ("baseline", b)):
        if f is not None and f.samples:
            console.print(
                f"confirmation, {what}: median {f.tokens_per_s:,.0f} tokens/s ±{f.spread:.1%} (half-range of "
                + ", ".join(f"{x:,.0f}" for x in f.samples)
                + ")",
                highlight=False,
            )
    c = plan.comparison
    if c is not None:
        console.print(c.verdict, highlight=False)
    line = f"plan written: {escape(path)}  measured {m.tokens_per_s or 0:,.0f} tokens/s ({m.status})"
    if c is not None and c.beats_baseline:
        line += f": {c.speedup:.2f}x its baseline (±{c.noise:.1%})"
    elif c is not None:
        line += ": no faster than its baseline"
    console.print(line, highlight=False)
    if plan.loss_check is not None:
        c = plan.loss_check
        console.print(
            f"loss check over {c.steps} steps: {c.loss_end:.4f} vs plain {c.reference_loss_end:.4f} "
            f"({'passed' if c.passed else 'FAILED'}, tolerance {c.tolerance:.0%})",
            highlight=False,
        )
    console.print(f"run it: autotune run {escape(path)}", highlight=False)
