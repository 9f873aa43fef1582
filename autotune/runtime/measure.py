"""The child side of a trial: what ``python -m autotune.runtime.measure PLAN RESULT`` runs
(under torchrun when the plan uses several processes), started by ``run_trial``
(``autotune.runtime.trial``). It builds the executor's own ``Trainer``, warms up (compilation
included), times a fixed number of steps with device events and writes one JSON result; a
failure is classified (oom, nan, unsupported, crash), never raised.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from autotune import devices, schema
from autotune.errors import UserError, first_line
from autotune.plan import Figures, Plan
from autotune.runtime.process import die_with_parent
from autotune.runtime.trial import TrialBudget, TrialResult, optimizer_steps, steps_for_target


def measure(plan: Plan, budget: TrialBudget, *, progress: Path | None = None) -> TrialResult:
    """Build the executor's Trainer for ``plan``, warm up, time steps; classify failures.

    With ``progress``, each timed step's tokens/s is appended to it as it is known (a JSON
    line), so the parent can prune a clearly slower trial before it ends."""
    import torch

    from autotune.distributed import reduce_flush
    from autotune.runtime.metrics import peak_memory_bytes
    from autotune.runtime.trainer import NonFiniteLoss, Trainer

    trainer, clean = None, False
    try:
        _say(
            f"building {plan.workload.name} with {', '.join(c.name for c in plan.strategies) or 'no strategy'}, "
            f"micro-batch {plan.train.micro_batch_size}"
        )
        trainer = Trainer(plan)
        device = trainer.device
        built = time.monotonic()
        # Budgets count micro-batch steps, so a trial with accumulation trains as many tokens
        # as one without; the first micro-batch compiles, so one warm-up step is enough then.
        warmup, steps = optimizer_steps(budget, trainer.ctx.grad_accum)
        _say(f"built on {device} in {built - _process_start():.1f} s since start; {warmup} warm-up step(s)")
        losses = [trainer.train_step(step) for step in range(warmup)]
        _sync(device)
        warmed = time.monotonic()
        compiled = devices.of(device).compilations()
        compiling = f" ({compiled[0]} graph(s) compiled in {compiled[1]:.1f} s)" if compiled else ""
        _say(f"warmed up in {warmed - built:.1f} s{compiling}; timing {steps} step(s)")
        devices.of(device).reset_peak_memory(device)
        trainer.metrics()  # the warm-up's step metrics are left out
        times, timed = [], []
        reporter = _Progress(progress, trainer.tokens_per_step) if progress is not None else None
        step = warmup
        while step < warmup + steps:
            with step_timer(device) as t:
                timed.append(trainer.train_step(step))
            times.append(t)
            if step == warmup and budget.target_s is not None:
                # The first timed step says how many fit the target (one sync, after its end
                # event: its own time is unchanged). Every rank takes the slowest rank's count.
                _sync(device)
                steps = steps_for_target(budget.target_s, _slowest(t.seconds(), trainer.world_size, device), steps)
            step += 1
            if reporter is not None:
                reporter.report(times)
        _sync(device)
        step_times = [t.seconds() for t in times]
        again = devices.of(device).compilations()
        if compiled and again and again[0] > compiled[0]:
            _say(f"{again[0] - compiled[0]} graph(s) compiled during the timed steps: a step's graph changed")
        # The losses' mean over the ranks (one all-reduce; all of them when alone).
        values = reduce_flush(torch.stack(losses + timed), False, trainer.world_size)[0].float().tolist()
        if not all(v == v and abs(v) != float("inf") for v in values):
            raise NonFiniteLoss("loss became non-finite during the trial")
        # The median step: robust to a stray slow step (a page fault, a noisy neighbour).
        step_time = statistics.median(step_times)
        tokens_per_s = trainer.tokens_per_step / step_time
        mfu = trainer.mfu(tokens_per_s)
        _say(f"{len(step_times)} timed step(s), median {step_time:.4f} s: {tokens_per_s:,.0f} tokens/s")
        clean = True
        return TrialResult(
            figures=Figures(
                status="ok",
                tokens_per_s=tokens_per_s,
                step_time_s=step_time,
                mfu=mfu,
                mfu_peak_source=trainer.peak_source,
                peak_memory_bytes=peak_memory_bytes(device),
                loss_start=values[0],
                loss_end=values[-1],
                losses=values,
                step_times=step_times,
                metrics=trainer.metrics() or None,
                compile_s=compiled[1] if compiled else None,
            ),
            startup_s=built - _process_start(),
            warmup_s=warmed - built,
            timed_s=sum(step_times),
        )
    except NonFiniteLoss as e:
        return TrialResult(figures=Figures(status="nan"), error=str(e))
    except torch.OutOfMemoryError as e:
        return TrialResult(figures=Figures(status="oom"), error=first_line(e))
    except (UserError, NotImplementedError) as e:
        return TrialResult(figures=Figures(status="unsupported"), error=first_line(e))
    except Exception as e:  # anything else is a crash of this trial, reported with its origin
        frame = traceback.extract_tb(e.__traceback__)[-1]
        return TrialResult(
            figures=Figures(status="crash"),
            error=f"{type(e).__name__}: {first_line(e)} ({Path(frame.filename).name}:{frame.lineno})",
        )
    finally:
        if trainer is not None:
            trainer.close(clean=clean)


def _say(line: str) -> None:
    """One line of the trial's log (its stdout), from rank 0."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trial: {line}", flush=True)


def _process_start() -> float:
    """When this process started, on time.monotonic()'s clock."""
    import psutil

    return time.monotonic() - (time.time() - psutil.Process().create_time())


def _slowest(seconds: float, world_size: int, device: Any) -> float:
    """The largest of every rank's ``seconds`` (one all-reduce; itself when alone)."""
    if world_size == 1:
        return seconds
    import torch
    import torch.distributed as dist

    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value.item())


class _Progress:
    """Appends a line per finished timed step; on a GPU only steps whose end event has
    completed (``query``, no synchronisation), so reporting does not change the timing."""

    def __init__(self, path: Path, tokens_per_step: int) -> None:
        self.path, self.tokens_per_step, self.done = path, tokens_per_step, 0

    def report(self, times: list[devices.Timer]) -> None:
        lines = []
        while self.done < len(times) and times[self.done].finished():
            seconds = times[self.done].seconds()
            self.done += 1
            lines.append(
                json.dumps({"step": self.done, "tokens_per_s": self.tokens_per_step / seconds if seconds > 0 else 0.0})
            )
        if lines:
            with open(self.path, "a") as f:
                f.write("".join(line + "\n" for line in lines))


def step_timer(device: Any) -> devices.Timer:
    """Times one step: events on an accelerator (no sync per step), the host clock on a CPU."""
    return devices.of(device).timer(device)


def _sync(device: Any) -> None:
    devices.of(device).synchronize(device)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from autotune import plan as planmod

    ap = argparse.ArgumentParser(
        prog="python -m autotune.runtime.measure", description="Run one trial of a plan; write its result as JSON."
    )
    ap.add_argument("plan", type=Path)
    ap.add_argument("result", type=Path)
    ap.add_argument("--warmup", type=int, default=TrialBudget.warmup_steps)
    ap.add_argument("--steps", type=int, default=TrialBudget.timed_steps)
    ap.add_argument("--seconds", type=float, default=None, help="timed seconds to aim for (TrialBudget.target_s)")
    ap.add_argument("--progress", type=Path, default=None, help="append each timed step's tokens/s here (rank 0)")
    args = ap.parse_args(argv)
    die_with_parent()  # a rank under torchrun: dies with torchrun, which dies with the planner
    budget = TrialBudget(warmup_steps=args.warmup, timed_steps=args.steps, target_s=args.seconds)
    try:
        plan = planmod.load(args.plan)
    except UserError as e:
        result = TrialResult(figures=Figures(status="unsupported"), error=str(e))
    else:
        rank = int(os.environ.get("RANK", "0"))
        result = measure(plan, budget, progress=args.progress if rank == 0 else None)
    rank = int(os.environ.get("RANK", "0"))
    if result.figures.status != "ok":
        print(f"trial: rank {rank}: {result.figures.status}: {result.error}", flush=True)
    if rank == 0:
        schema.write_json_atomic(args.result, schema.to_dict(result))
    elif result.figures.status != "ok":
        result.error = f"rank {rank}: {result.error}"
        schema.write_json_atomic(args.result.with_name(f"{args.result.name}.rank{rank}"), schema.to_dict(result))
    # A failed rank of several exits with an error, so that torchrun ends the others at once.
    return 1 if result.figures.status != "ok" and int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


if __name__ == "__main__":
    sys.exit(main())
