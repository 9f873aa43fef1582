"""The executor: one training loop for trials and full runs alike.

``Trainer`` builds everything a plan describes (workload, strategies through the one
ordering function, the step engine with its optimizer, the loader) and runs optimizer steps
through the engine alone (``autotune.contract.engine``: the default loop, a pipeline schedule or
DeepSpeed's). ``run`` adds what a full run needs: a JSONL log, validation, atomic
checkpoints, resume and a progress bar.

The hot path waits for the device once per ``log_interval`` steps: losses stay on the device
until a flush, the learning rate is a Python float, the loader prefetches on a thread.

Started by torchrun (``autotune run`` does that for a plan of several processes), each
process joins the process group (``autotune.distributed``) and trains on its own batches; the
logged losses are the mean over the ranks, reduced once per flush; rank 0 alone writes the
log and, unless the state is sharded, the checkpoints.

A run survives: SIGINT/SIGTERM/SIGHUP set a flag that every rank checks after each step
(``autotune.runtime.process.Stop``: agreed over a gloo all-reduce, so all stop at one step),
then the step's checkpoint and the summary are written; the run directory is locked while any
process of a run lives (``autotune.runtime.rundir``); checkpoints carry a sha256, so a damaged
one is named and passed over, and a resume checks that plan and checkpoint describe the same
run (``autotune.runtime.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autotune import data as datamod
from autotune import devices, distributed, validate
from autotune.apply import apply_strategies
from autotune.contract.context import TrainContext
from autotune.contract.engine import LoopEngine, StepEngine
from autotune.contract.mesh import ParallelDims, build_mesh
from autotune.errors import UserError
from autotune.plan import Plan, TrainSpec
from autotune.runtime.checkpoint import (
    CHECKPOINT_FORMAT,
    check_format,
    numpy_state,
    numpy_state_from,
    python_state,
    python_state_from,
    resume,
    save_checkpoint,
)
from autotune.runtime.metrics import global_tokens_per_step, model_flops_utilization, peak_flops, peak_memory_bytes
from autotune.runtime.process import Stop
from autotune.runtime.rundir import (
    Log,
    check_out_dir,
    clean_stale_files,
    finished_step,
    lock_out_dir,
    notify,
    remove_if_unused,
    truncate_log,
)
from autotune.workloads import flops_per_token, load_workload


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


def lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step
    (``spec.steps - 1``): the final step trains at the floor."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    span = max(1, spec.steps - 1 - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / span)
    floor = spec.lr * spec.min_lr_ratio
    return floor + 0.5 * (spec.lr - floor) * (1.0 + math.cos(math.pi * progress))


class Trainer:
    """Everything one process needs to train the plan: model, strategies, optimizer, data.

    Under torchrun it joins the process group first (and leaves it in :meth:`close` if it
    initialised it); alone it is rank 0 of 1.
    """

    def __init__(
        self,
        plan: Plan,
        *,
        device: torch.device | None = None,
        data_dir: str | None = None,
        profile_path: str | None = None,
    ) -> None:
        self.plan = plan
        self.spec = plan.train
        self.group = distributed.join(plan.launch.device, plan.launch.nproc_per_node * plan.launch.nnodes)
        try:
            self._build(device or self.group.device, data_dir, profile_path)
        except BaseException:
            distributed.leave(self.group, clean=False)
            raise

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def world_size(self) -> int:
        return self.group.world_size

    def _build(self, device: torch.device, data_dir: str | None, profile_path: str | None) -> None:
        plan = self.plan
        self.device = device
        rank = self.group.rank
        workload = load_workload(plan.workload.name, plan.workload.overrides)
        # The whole plan is checked before a tensor is made (the trial child's and every rank's
        # copy of the checks its launcher made); the loader shards by the dp rank.
        dp, tp, pp = validate.plan(plan, machine=False, workload=workload).mesh
        configs = plan.strategy_configs()

        seed_everything(self.spec.seed)
        # PyTorch's own defaults, so the plain baseline is plain whatever ran before.
        devices.of(device).allow_tf32(False)
        dims = ParallelDims(dp=dp, tp=tp, pp=pp)
        model = devices.of(device).place(workload.build_model(), self.device)
        self.ctx = TrainContext(
            workload=workload,
            device=self.device,
            model=model,
            rank=dims.coords(rank)[1],
            world_size=dp,
            dims=dims,
            mesh=build_mesh(self.device.type, dims),
            spec=self.spec,
        )
        apply_strategies(self.ctx, configs)

        # The step engine, once every strategy is applied: the one that owns the step, or the default loop.
        self.engine: StepEngine = (self.ctx.engine or LoopEngine)(self.ctx)
        self.optimizer = self.engine.optimizer
        devices.of(device).prepare_optimizer(self.optimizer)
        self.scaler = self.engine.scaler
        self.batches = self._make_batches(data_dir)
        # The global batch: dp groups of micro-batches (tp ranks and pp stages share theirs).
        self.tokens_per_step = global_tokens_per_step(
            self.spec.micro_batch_size, workload.seq_len, self.ctx.grad_accum, dp
        )
        self.flops_per_token = flops_per_token(self.ctx.model, workload)
        self.peak_flops, self.peak_source = peak_flops(self.device, profile_path)
        self._val: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_steps = 0
        self._data_dir = data_dir

    def _make_batches(self, data_dir: str | None) -> Any:
        spec, wl, ctx = self.spec, self.ctx.workload, self.ctx
        common = dict(
            batch_size=spec.micro_batch_size,
            seq_len=wl.seq_len,
            seed=spec.seed,
            device=self.device,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
        if spec.random_tokens:  # made on the device: no host loader to set up
            return datamod.RandomBatches(wl.vocab_size, **common)
        train = datamod.read_tokens(self.data_dir(data_dir) / "train.bin")
        if train.vocab_size > wl.vocab_size:
            raise UserError(f"data vocab {train.vocab_size} exceeds the model's vocab {wl.vocab_size}")
        return datamod.Batches(train.tokens, micro_batches=ctx.grad_accum, **common, **ctx.loader_options)

    def mfu(self, tokens_per_s: float | None) -> float | None:
        """Model FLOPs utilisation at ``tokens_per_s`` (the global batch's rate): against the
        reference peak (``peak_source``) of every process's device, since each holds one."""
        return model_flops_utilization(self.flops_per_token, tokens_per_s, self.peak_flops, self.world_size)

    def identity(self) -> dict[str, Any]:
        """What defines this run, stored in its checkpoints: a resume under another plan
        would silently train something else (or fail deep inside a load)."""
        t, plan = self.spec, self.plan
        return {
            "workload": plan.workload.name,
            "overrides": dict(plan.workload.overrides),
            "strategies": [[s.name, dict(s.knobs)] for s in plan.strategies],
            "processes": self.world_size,
            "micro_batch_size": t.micro_batch_size,
            **{
                k: getattr(t, k)
                for k in (
                    "lr",
                    "beta1",
                    "beta2",
                    "weight_decay",
                    "grad_clip",
                    "steps",
                    "warmup_steps",
                    "min_lr_ratio",
                    "seed",
                    "random_tokens",
                )
            },
            "data": self._data_dir or t.data,
        }

    def data_dir(self, override: str | None = None) -> Path:
        source = override or self.spec.data
        if source == "default":
            return datamod.default_dataset(self.ctx.workload.vocab_size)
        path = Path(source)
        if not (path / "train.bin").exists():
            raise UserError(f"data {path}: no train.bin there (make one with `autotune data prepare`)")
        return path

    # -- the hot path -------------------------------------------------------------------

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step (all micro-batches). Returns the mean loss, still on the device."""
        loss = self.engine.train_step(lambda micro: self.batches.get(step, micro), lr_at(step, self.spec))
        devices.of(self.device).mark_step(self.device)  # a lazily synced device runs the step here
        if self.ctx.metrics:  # summed on the device: no sync here
            for name, read in self.ctx.metrics.items():
                value = read().detach().float()
                self._metric_sums[name] = self._metric_sums[name] + value if name in self._metric_sums else value
            self._metric_steps += 1
        return loss

    def metrics(self) -> dict[str, float]:
        """The strategies' step metrics (``TrainContext.metrics``), each its mean over the steps
        since the last call, and start again; {} when none is reported or no step ran."""
        sums, steps = self._metric_sums, self._metric_steps
        self._metric_sums, self._metric_steps = {}, 0
        return {name: total.item() / steps for name, total in sums.items()} if steps else {}

    @torch.no_grad()
    def evaluate(self) -> float:
        if self._val is None:
            val = datamod.read_tokens(self.data_dir(self._data_dir) / "val.bin")
            self._val = datamod.val_batches(
                val.tokens,
                batch_size=self.spec.micro_batch_size,
                seq_len=self.ctx.workload.seq_len,
                n_batches=self.spec.eval_batches,
                device=self.device,
            )
        self.ctx.model.eval()
        losses = []
        for x, y in self._val:
            with self.ctx.autocast():
                losses.append(self.ctx.forward(x, y).float())
        self.ctx.model.train()
        return torch.stack(losses).mean().item()

    # -- checkpoint state ---------------------------------------------------------------

    def state_dict(self, step: int) -> dict[str, Any]:
        """The whole state of a process whose model is whole (one process, or DDP replicas)."""
        return {**self.extra_state(step), **self.engine.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> int:
        check_format(state)
        self.engine.load_state_dict(state)
        return self.load_extra_state(state)

    def extra_state(self, step: int) -> dict[str, Any]:
        """Everything but the model and optimizer: the step, the loss scaler, the RNGs (the
        same on every rank: each seeds alike and draws alike)."""
        rng = {"torch": torch.get_rng_state(), "numpy": numpy_state(), "python": python_state()}
        kind = devices.of(self.device)
        state = kind.rng_state(self.device)
        if state is not None:
            rng[kind.name] = state  # keyed by the device's name: "cuda" in checkpoints so far
        return {
            "format": CHECKPOINT_FORMAT,
            "step": step,  # the next step to run; the data order is a function of it
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "run": self.identity(),
        }

    def load_extra_state(self, state: dict[str, Any]) -> int:
        """Restore what :meth:`extra_state` saved; returns the step to continue from."""
        check_format(state)
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(numpy_state_from(rng["numpy"]))
        random.setstate(python_state_from(rng["python"]))
        kind = devices.of(self.device)
        if kind.accelerator and kind.name in rng:
            kind.set_rng_state(rng[kind.name], self.device)
        return int(state["step"])

    def close(self, *, clean: bool = True) -> None:
        """Stop the loader; leave the process group if this trainer joined it (waiting for
        the other ranks only after a ``clean`` run: after a failure they may never come)."""
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()
        distributed.leave(self.group, clean=clean)


# -- RNG ------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- a full run -----------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class RunSummary:
    steps_done: int
    """Optimizer steps completed in total (the resumed-from ones included)."""
    tokens_per_s: float | None
    """Tokens trained per second over this invocation, warm-up steps excluded."""
    mfu: float | None
    """Model FLOPs utilisation at that rate, against the peak named in mfu_peak_source."""
    mfu_peak_source: str | None
    """The one reference peak MFU is against, e.g. "bf16 measured 667 TFLOP/s"; None: unknown."""
    peak_memory_bytes: int
    """Peak device memory (CPU: peak resident set)."""
    loss_start: float | None
    """First logged training loss of this invocation."""
    loss_end: float | None
    """Last logged training loss."""
    val_loss: float | None
    """Last validation loss."""
    stopped: str
    """Why the loop ended: "steps", "time", "stop_at", "SIGINT", "SIGTERM", or "finished" (the run had
    reached its steps before this invocation: nothing was trained or written)."""
    checkpoint: str | None = None
    """The newest checkpoint this invocation wrote."""
    losses: list[float] = field(default_factory=list)
    """Every training loss of this invocation, in step order."""
    data_identity: str | None = None
    """"sha256:<hex>" of the data trained on (``autotune.data.data_identity``); None: random tokens."""


@dataclass(kw_only=True, slots=True)
class RunOptions:
    steps: int | None = None
    """Optimizer steps to reach, and the length of the lr schedule; None: the plan's train.steps."""
    minutes: float | None = None
    """Stop after this much wall time (checked at each log flush)."""
    stop_at: int | None = None
    """Stop once this step is done, with a checkpoint, leaving the schedule ``steps`` long (a
    run cut short on purpose, to be resumed)."""
    out_dir: Path | None = None
    """Where the log and checkpoints go; None: no files."""
    resume: bool = False
    """Continue from the newest complete checkpoint in out_dir (from step 0 when there is none)."""
    data_dir: str | None = None
    """Override the plan's data source."""
    profile_path: str | None = None
    """Hardware profile for measured MFU."""
    timing_warmup: int | None = None
    """Steps left out of tokens/s (compilation); None: one log interval."""
    on_flush: Callable[[dict[str, Any]], None] | None = None
    """Called after every log flush with the newest log record (progress display)."""


def with_steps(plan: Plan, steps: int) -> Plan:
    """``plan`` training ``steps`` steps: the cosine schedule's length follows --steps/--tokens."""
    if steps == plan.train.steps:
        return plan
    return dataclasses.replace(plan, train=dataclasses.replace(plan.train, steps=steps))


def run(plan: Plan, options: RunOptions) -> RunSummary:
    """Train ``plan`` to ``options.steps`` with logging, evaluation and checkpoints."""
    out = options.out_dir
    total_steps = options.steps or plan.train.steps
    plan = with_steps(plan, total_steps)
    ckpt_dir = out / "checkpoints" if out else None
    created = out is not None and not out.exists()
    with Stop() as stop:  # from the start: a signal while building still stops cleanly
        lock = lock_out_dir(out)
        try:
            # Before the Trainer: every rank checks before rank 0 can start a log there.
            check_out_dir(out, options.resume)
            done = finished_step(out, total_steps) if options.resume else None
            if done is not None:
                notify(f"the run in {out} already reached step {done}: nothing to do")
                return _nothing_done(done)
            if out is not None and distributed.env_rank() == 0:
                clean_stale_files(out)
            return _train(plan, options, total_steps, ckpt_dir, stop)
        finally:
            if lock is not None:
                if created:
                    remove_if_unused(out)
                lock.release()


def _train(plan: Plan, options: RunOptions, total_steps: int, ckpt_dir: Path | None, stop: Stop) -> RunSummary:
    trainer = Trainer(plan, data_dir=options.data_dir, profile_path=options.profile_path)
    clean = False
    try:
        check_val_data(trainer)
        stop.control = _control_group(trainer)
        start = 0
        if ckpt_dir is not None and options.resume:
            start = resume(trainer, ckpt_dir, stop.control)
        if start >= total_steps:
            notify(f"the run in {options.out_dir} already reached step {start}: nothing to do")
            summary = _nothing_done(start)
        else:
            if options.out_dir is not None and options.resume and trainer.rank == 0:
                truncate_log(options.out_dir / "log.jsonl", start)
            summary = _loop(trainer, start, total_steps, options, ckpt_dir, stop)
        clean = True
        return summary
    finally:
        trainer.close(clean=clean)


def _nothing_done(step: int) -> RunSummary:
    return RunSummary(
        steps_done=step,
        tokens_per_s=None,
        mfu=None,
        mfu_peak_source=None,
        peak_memory_bytes=0,
        loss_start=None,
        loss_end=None,
        val_loss=None,
        stopped="finished",
    )


def check_val_data(trainer: Trainer) -> None:
    """A run that evaluates needs val.bin: found now, not at the first evaluation."""
    spec = trainer.spec
    if spec.eval_interval > 0 and not spec.random_tokens:
        path = trainer.data_dir(trainer._data_dir) / "val.bin"
        if not path.is_file():
            raise UserError(
                f"data {path.parent}: no val.bin there, and the plan evaluates (train.eval_interval "
                f"{spec.eval_interval}; set it to 0, or make one with `autotune data prepare`)"
            )


def _control_group(trainer: Trainer) -> Any:
    """A gloo group over all ranks for the executor's own CPU-side agreements (stop signals,
    which checkpoint to resume from); None when alone."""
    if trainer.world_size == 1:
        return None
    import torch.distributed as dist

    return dist.new_group(backend="gloo")


def _loop(
    trainer: Trainer, start: int, total_steps: int, options: RunOptions, ckpt_dir: Path | None, stop: Stop
) -> RunSummary:
    spec = trainer.spec
    main = trainer.rank == 0
    log = Log(options.out_dir / "log.jsonl") if options.out_dir and main else None
    warmup = options.timing_warmup if options.timing_warmup is not None else spec.log_interval
    began = time.perf_counter()
    timed_tokens, timed_s = 0, 0.0
    losses: list[float] = []
    val_loss = None
    checkpoint = None
    pending: list[torch.Tensor] = []
    last_flush, last_flush_step = began, start
    stopped = "steps"
    step = start
    end = min(total_steps, options.stop_at or total_steps)
    try:
        while step < end:
            pending.append(trainer.train_step(step))
            step += 1
            at_end = step == end
            signum = 0 if at_end else stop.agreed()
            if (
                not signum
                and len(pending) < spec.log_interval
                and not at_end
                and not _due(step, spec.eval_interval)
                and not _due(step, spec.checkpoint_interval)
            ):
                continue
            # Flush: the one wait for the device per interval (and the one all-reduce: the
            # losses' mean over the ranks, and whether any rank ran out of time).
            out_of_time = options.minutes is not None and time.perf_counter() - began > options.minutes * 60
            mean, out_of_time = distributed.reduce_flush(torch.stack(pending), out_of_time, trainer.world_size)
            values = mean.float().tolist()
            pending.clear()
            now = time.perf_counter()
            n = step - last_flush_step
            tok_s = n * trainer.tokens_per_step / (now - last_flush)
            if last_flush_step - start >= warmup:
                timed_tokens += n * trainer.tokens_per_step
                timed_s += now - last_flush
            last_flush, last_flush_step = now, step
            if not all(math.isfinite(v) for v in values):
                raise NonFiniteLoss(
                    "loss became non-finite at step "
                    f"{step - n + next(i for i, v in enumerate(values) if not math.isfinite(v))}"
                )
            losses.extend(values)
            mem = peak_memory_bytes(trainer.device)
            mfu = trainer.mfu(tok_s)
            records = [
                {
                    "step": step - n + i,
                    "loss": v,
                    "lr": lr_at(step - n + i, spec),
                    "tokens_per_s": tok_s,
                    "mfu": mfu,
                    "peak_memory_bytes": mem,
                }
                for i, v in enumerate(values)
            ]
            records[-1].update(trainer.metrics())  # the interval's means (moe_dropped...)
            if _due(step, spec.eval_interval) or (at_end and spec.eval_interval and not spec.random_tokens):
                if not spec.random_tokens:
                    val_loss = trainer.evaluate()
                    records[-1]["val_loss"] = val_loss
                last_flush = time.perf_counter()  # evaluation is not training time
            if log:
                log.write(records)
            if ckpt_dir is not None and (_due(step, spec.checkpoint_interval) or at_end or out_of_time or signum):
                checkpoint = str(save_checkpoint(trainer, step, ckpt_dir))
                last_flush = time.perf_counter()
            if options.on_flush and main:
                options.on_flush(records[-1] | {"total_steps": total_steps})
            if signum or out_of_time:
                stopped = signal.Signals(signum).name if signum else "time"
                break
    finally:
        if log:
            log.close()
    if step < total_steps and stopped == "steps":
        stopped = "stop_at"
    tokens_per_s = timed_tokens / timed_s if timed_s > 0 else None
    return RunSummary(
        steps_done=step,
        tokens_per_s=tokens_per_s,
        mfu=trainer.mfu(tokens_per_s),
        mfu_peak_source=trainer.peak_source,
        peak_memory_bytes=peak_memory_bytes(trainer.device),
        loss_start=losses[0] if losses else None,
        loss_end=losses[-1] if losses else None,
        val_loss=val_loss,
        stopped=stopped,
        checkpoint=checkpoint,
        losses=losses,
        data_identity=None
        if trainer.spec.random_tokens
        else datamod.data_identity(trainer.data_dir(trainer._data_dir)),
    )


def _due(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0
