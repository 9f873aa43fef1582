"""Trials: one short real training run of a plan, in its own process.

``run_trial`` starts ``python -m autotune.trial PLAN RESULT`` (torchrun when the plan uses
several processes) in a new process session, under a wall-clock limit. The child builds the
executor's own ``Trainer`` (what the planner measures is what ``autotune run`` does), warms
up (compilation included), times a fixed number of steps with device events and writes one
JSON result. An out-of-memory error, a NaN, a hang, a crash or a kill costs one trial: the
parent reads the status from the result file, or from how the child ended, and the whole
process group of a hung child is killed.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from autotune import schema
from autotune.errors import UserError
from autotune.plan import Figures, Plan

Status = Literal["ok", "oom", "nan", "timeout", "crash", "unsupported"]


@dataclass(kw_only=True, slots=True)
class TrialBudget:
    warmup_steps: int = 5
    """Steps run before timing (the first one compiles)."""
    timed_steps: int = 20
    """Steps timed with device events (micro-batch steps: divided by the accumulation)."""
    timeout_s: float = 300.0
    """Wall-clock limit of the whole child, start-up and compilation included."""


@dataclass(kw_only=True, slots=True)
class TrialResult:
    figures: Figures
    """Status and measured figures (DESIGN.md "Trial")."""
    error: str | None = None
    """The error text when the trial failed."""
    wall_s: float = 0.0
    """Wall time of the child, start-up included."""


def optimizer_steps(budget: TrialBudget, grad_accum: int) -> tuple[int, int]:
    """Warm-up and timed optimizer steps of a trial with ``grad_accum`` micro-batches a step."""
    return max(1, budget.warmup_steps // grad_accum), max(3, budget.timed_steps // grad_accum)


# -- the parent side -----------------------------------------------------------------------


def compile_cache_env() -> dict[str, str]:
    """One persistent inductor cache for every trial, so a repeated shape compiles once."""
    root = Path(os.environ.get("AUTOTUNE_CACHE", Path.home() / ".cache" / "autotune"))
    return {"TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))}


def trial_command(plan: Plan, plan_path: Path, result_path: Path, budget: TrialBudget) -> list[str]:
    from autotune.distributed import torchrun_command

    args = [str(plan_path), str(result_path), "--warmup", str(budget.warmup_steps), "--steps", str(budget.timed_steps)]
    nproc = plan.launch.nproc_per_node
    if nproc * plan.launch.nnodes == 1:
        return [sys.executable, "-m", "autotune.trial", *args]
    return torchrun_command(nproc, "autotune.trial", args, plan.launch)


def run_trial(plan: Plan, budget: TrialBudget, *, workdir: Path | None = None, env: dict[str, str] | None = None) -> TrialResult:
    """Run ``plan`` as one isolated trial; never raises for what happens inside the child."""
    with tempfile.TemporaryDirectory(prefix="autotune-trial-", dir=workdir) as tmp:
        plan_path, result_path = Path(tmp) / "plan.json", Path(tmp) / "result.json"
        plan.save(plan_path)
        from autotune.distributed import child_env as multiprocess_env

        child_env = multiprocess_env({**os.environ, **compile_cache_env(), **(env or {})})
        start = time.monotonic()
        proc = subprocess.Popen(
            trial_command(plan, plan_path, result_path, budget),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=child_env,
            start_new_session=True,  # its own process group: a timeout kills all of it
        )
        try:
            _, stderr = proc.communicate(timeout=budget.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return TrialResult(figures=Figures(status="timeout"), error=f"no result within {budget.timeout_s:.0f} s", wall_s=time.monotonic() - start)
        wall = time.monotonic() - start
        results = _results(result_path)
        if results:
            results[0].wall_s = wall
            return results[0]
        return TrialResult(figures=Figures(status="crash"), error=_how_it_ended(proc.returncode, stderr), wall_s=wall)


def _results(result_path: Path) -> list[TrialResult]:
    """Rank 0's result if it is ok, else every written failure, the first written first.

    Ranks other than 0 write a failure beside rank 0's file; when one rank fails, the others
    fail after it (a peer closed the connection) or are ended by torchrun, so the first
    failure written is the cause."""
    paths = [p for p in [result_path, *result_path.parent.glob(f"{result_path.name}.rank*")] if p.exists()]
    results = {p: schema.from_dict(TrialResult, json.loads(p.read_text())) for p in paths}
    if result_path in results and results[result_path].figures.status == "ok":
        return [results[result_path]]
    return [results[p] for p in sorted(results, key=lambda p: (p.stat().st_mtime_ns, p == result_path))]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def _how_it_ended(returncode: int, stderr: bytes) -> str:
    tail = stderr.decode(errors="replace").strip().splitlines()[-5:]
    if returncode < 0:
        how = f"killed by {signal.Signals(-returncode).name}"
    else:
        how = f"exited with status {returncode} and no result"
    return how + (": " + " | ".join(tail) if tail else "")


# -- the child side -------------------------------------------------------------------------


def measure(plan: Plan, budget: TrialBudget) -> TrialResult:
    """Build the executor's Trainer for ``plan``, warm up, time steps; classify failures."""
    import torch

    from autotune.distributed import reduce_flush
    from autotune.train import NonFiniteLoss, Trainer, peak_memory_bytes

    trainer, clean = None, False
    try:
        trainer = Trainer(plan)
        device = trainer.device
        # Budgets count micro-batch steps, so a trial with accumulation trains as many tokens
        # as one without; the first micro-batch compiles, so one warm-up step is enough then.
        warmup, steps = optimizer_steps(budget, trainer.ctx.grad_accum)
        losses = [trainer.train_step(step) for step in range(warmup)]
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, timed = [], []
        for step in range(warmup, warmup + steps):
            with _StepTimer(device) as t:
                timed.append(trainer.train_step(step))
            times.append(t)
        _sync(device)
        step_times = [t.seconds() for t in times]
        # The losses' mean over the ranks (one all-reduce; all of them when alone).
        values = reduce_flush(torch.stack(losses + timed), False, trainer.world_size)[0].float().tolist()
        if not all(v == v and abs(v) != float("inf") for v in values):
            raise NonFiniteLoss("loss became non-finite during the trial")
        # The median step: robust to a stray slow step (a page fault, a noisy neighbour).
        step_time = statistics.median(step_times)
        tokens_per_s = trainer.tokens_per_step / step_time
        mfu = trainer.mfu(tokens_per_s)
        clean = True
        return TrialResult(figures=Figures(
            status="ok",
            tokens_per_s=tokens_per_s,
            step_time_s=step_time,
            mfu=mfu,
            mfu_peak_source=trainer.peak_source,
            peak_memory_bytes=peak_memory_bytes(device),
            loss_start=values[0],
            loss_end=values[-1],
        ))
    except NonFiniteLoss as e:
        return TrialResult(figures=Figures(status="nan"), error=str(e))
    except torch.OutOfMemoryError as e:
        return TrialResult(figures=Figures(status="oom"), error=_first_line(e))
    except (UserError, NotImplementedError) as e:
        return TrialResult(figures=Figures(status="unsupported"), error=_first_line(e))
    except Exception as e:  # anything else is a crash of this trial, reported with its origin
        frame = traceback.extract_tb(e.__traceback__)[-1]
        return TrialResult(figures=Figures(status="crash"), error=f"{type(e).__name__}: {_first_line(e)} ({Path(frame.filename).name}:{frame.lineno})")
    finally:
        if trainer is not None:
            trainer.close(clean=clean)


class _StepTimer:
    """Times one step: CUDA events on a GPU (no sync per step), the host clock on a CPU."""

    def __init__(self, device: Any) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> _StepTimer:
        if self.cuda:
            import torch

            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.end.record()
        else:
            self.t1 = time.perf_counter()

    def seconds(self) -> float:
        return self.start.elapsed_time(self.end) / 1e3 if self.cuda else self.t1 - self.t0


def _sync(device: Any) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    import argparse

    from autotune import plan as planmod

    ap = argparse.ArgumentParser(prog="python -m autotune.trial", description="Run one trial of a plan; write its result as JSON.")
    ap.add_argument("plan", type=Path)
    ap.add_argument("result", type=Path)
    ap.add_argument("--warmup", type=int, default=TrialBudget.warmup_steps)
    ap.add_argument("--steps", type=int, default=TrialBudget.timed_steps)
    args = ap.parse_args(argv)
    budget = TrialBudget(warmup_steps=args.warmup, timed_steps=args.steps)
    try:
        plan = planmod.load(args.plan)
    except UserError as e:
        result = TrialResult(figures=Figures(status="unsupported"), error=str(e))
    else:
        result = measure(plan, budget)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        schema.write_json_atomic(args.result, schema.to_dict(result))
    elif result.figures.status != "ok":
        result.error = f"rank {rank}: {result.error}"
        schema.write_json_atomic(args.result.with_name(f"{args.result.name}.rank{rank}"), schema.to_dict(result))
    # A failed rank of several exits with an error, so that torchrun ends the others at once.
    return 1 if result.figures.status != "ok" and int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


if __name__ == "__main__":
    sys.exit(main())
