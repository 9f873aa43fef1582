"""The executor: one training loop for trials and full runs alike.

``Trainer`` builds everything a plan describes (workload, strategies through the one
ordering function, the step engine with its optimizer, the loader) and runs optimizer steps
through the engine alone (``autotune.engine``: the default loop, a pipeline schedule or
DeepSpeed's). ``run`` adds what a full run needs: a JSONL log, validation, atomic
checkpoints, resume and a progress bar.

The hot path waits for the device once per ``log_interval`` steps: losses stay on the device
until a flush, the learning rate is a Python float, the loader prefetches on a thread.

Started by torchrun (``autotune run`` does that for a plan of several processes), each
process joins the process group (``autotune.distributed``) and trains on its own batches; the
logged losses are the mean over the ranks, reduced once per flush; rank 0 alone writes the
log and, unless the state is sharded, the checkpoints.

A run survives: SIGINT/SIGTERM/SIGHUP set a flag that every rank checks after each step
(agreed over a gloo all-reduce, so all stop at one step), then the step's checkpoint and the
summary are written; the run directory is locked while any process of a run lives; checkpoints carry a sha256
(a sidecar beside a ``.pt``, a manifest inside a sharded directory), so a damaged one is
named and passed over; a resume checks that plan and checkpoint describe the same run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autotune import data as datamod
from autotune import devices, distributed, locks
from autotune.apply import apply_strategies
from autotune.context import TrainContext
from autotune.distributed import pick_device
from autotune.engine import LoopEngine, StepEngine, make_optimizer
from autotune.errors import UserError
from autotune.mesh import ParallelDims, build_mesh, mesh_shape
from autotune.plan import Plan, TrainSpec
from autotune.schema import fsync_dir, write_bytes_atomic
from autotune.workloads import flops_per_token, load_workload

CHECKPOINT_FORMAT = 2
"""2: the GPT's fused qkv rows are head-major (each head's q, k, v together, so tensor
parallel splits whole heads); a format-1 checkpoint holds them q-block, k-block, v-block and
would load without error into a different model, so it is refused."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


__all__ = ["make_optimizer", "pick_device"]  # re-exported for the benchmarks and tests


def lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step
    (``spec.steps - 1``): the final step trains at the floor."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    span = max(1, spec.steps - 1 - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / span)
    floor = spec.lr * spec.min_lr_ratio
    return floor + 0.5 * (spec.lr - floor) * (1.0 + math.cos(math.pi * progress))


MFU_REFERENCE = "bf16"
"""MFU is always against the device's bf16 dense matmul rate, whatever the run computes in:
one yardstick, so an fp32 baseline and a bf16 plan compare (against each dtype's own peak an
fp32 run 9x slower showed the higher MFU)."""


def peak_flops(device: torch.device, profile_path: str | None) -> tuple[float | None, str | None]:
    """The reference peak (MFU_REFERENCE) of one device for MFU, and what it is, e.g.
    "bf16 measured 667 TFLOP/s": measured in a profile of this machine (``profile_path``, else
    the one `autotune profile` saved by default), else the datasheet's for a known GPU, else
    (None, None)."""
    rate, source = _reference_peak(device, profile_path)
    if rate is None:
        return None, None
    return rate, f"{MFU_REFERENCE} {source} {rate / 1e12:.3g} TFLOP/s"


def _reference_peak(device: torch.device, profile_path: str | None) -> tuple[float | None, str | None]:
    from autotune import hardware

    name = MFU_REFERENCE
    path = Path(profile_path) if profile_path else hardware.default_profile_path()
    if path.exists():
        profile = hardware.HardwareProfile.load(path)
        if profile.fingerprint != hardware.current_fingerprint():
            if profile_path:
                raise UserError(f"profile {path} was made on another machine (fingerprint {profile.fingerprint})")
        elif profile.measured is not None and name in profile.measured.matmul:
            return profile.peak_flops(name)
    kind = devices.of(device)
    rate = kind.datasheet_flops(kind.device_name(device), name)
    if rate is not None:
        return rate, "datasheet"
    return None, None


def global_tokens_per_step(micro_batch: int, seq_len: int, grad_accum: int, dp: int) -> int:
    """Tokens of the global batch per optimizer step, the one definition (trials, runs and
    ``--tokens`` all count with it): micro-batch x sequence x accumulation x data-parallel
    groups. Tensor-parallel ranks and pipeline stages share their group's batch, so they do
    not multiply it (nanoGPT's "12 batch * 1024 block * 5 accum * 8 GPUs")."""
    return micro_batch * seq_len * grad_accum * dp


def model_flops_utilization(
    flops_per_token: float, tokens_per_s: float | None, peak_flops: float | None, processes: int
) -> float | None:
    """MFU, the one definition (trials and runs both report it): the model's training FLOPs
    at ``tokens_per_s`` (the global batch's rate) over the reference peak of every one of
    ``processes`` devices, since each holds one (PaLM appendix B). Under tensor or pipeline
    parallel the denominator is still every process, not the data-parallel groups: dividing
    by dp would credit tp x pp devices' work to one. None without a rate or a peak."""
    if tokens_per_s is None or not peak_flops:
        return None
    return flops_per_token * tokens_per_s / (peak_flops * processes)


def tokens_per_step(plan: Plan) -> int:
    """Tokens of the global batch per optimizer step, computed from the plan alone."""
    dp, _, _ = mesh_shape(plan.launch.nproc_per_node * plan.launch.nnodes, plan.strategy_configs())
    seq_len = load_workload(plan.workload.name, plan.workload.overrides).seq_len
    return global_tokens_per_step(plan.train.micro_batch_size, seq_len, plan.grad_accum(), dp)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory since the last reset: allocated on an accelerator, resident on the host."""
    return devices.of(device).peak_memory_bytes(device)


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
        rank, world_size = self.group.rank, self.group.world_size
        workload = load_workload(plan.workload.name, plan.workload.overrides)
        configs = plan.strategy_configs()

        seed_everything(self.spec.seed)
        # PyTorch's own defaults, so the plain baseline is plain whatever ran before.
        devices.of(device).allow_tf32(False)
        # The mesh is checked before a tensor is made; the loader shards by the dp rank.
        dp, tp, pp = mesh_shape(world_size, configs, workload=workload, micro_batch_size=self.spec.micro_batch_size)
        dims = ParallelDims(dp=dp, tp=tp, pp=pp)
        model = workload.build_model().to(self.device)
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
        _check_format(state)
        self.engine.load_state_dict(state)
        return self.load_extra_state(state)

    def extra_state(self, step: int) -> dict[str, Any]:
        """Everything but the model and optimizer: the step, the loss scaler, the RNGs (the
        same on every rank: each seeds alike and draws alike)."""
        rng = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state()}
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
        _check_format(state)
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(_numpy_state_from(rng["numpy"]))
        random.setstate(_python_state_from(rng["python"]))
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


def _check_format(state: dict[str, Any]) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT} "
            "(written by another autotune version; its model layout differs)"
        )


# -- RNG state in weights_only-loadable form ----------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_state_from(s: dict[str, Any]) -> tuple:
    return (s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"])


def _python_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _python_state_from(s: list[Any]) -> tuple:
    return (s[0], tuple(s[1]), s[2])


# -- a full run -----------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Signals that stop a run after its current step, with a checkpoint and the summary (Slurm
sends SIGTERM, a terminal SIGINT, a dropped SSH session SIGHUP); the command then exits 128 +
the signal's number."""

LAUNCHER_ENV = "AUTOTUNE_RUN_LAUNCHER"
"""Set to its pid by the `autotune run` that starts a run's processes under torchrun: it
takes the run directory's lock and shares it with them."""


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


def notify(message: str) -> None:
    """One line on stderr from rank 0 (every rank reaches the same conclusion)."""
    if distributed.env_rank() == 0:
        print(f"autotune: {message}", file=sys.stderr, flush=True)


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
    with _Stop() as stop:  # from the start: a signal while building still stops cleanly
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


def _train(plan: Plan, options: RunOptions, total_steps: int, ckpt_dir: Path | None, stop: _Stop) -> RunSummary:
    trainer = Trainer(plan, data_dir=options.data_dir, profile_path=options.profile_path)
    clean = False
    try:
        check_val_data(trainer)
        stop.control = _control_group(trainer)
        start = 0
        if ckpt_dir is not None and options.resume:
            start = _resume(trainer, ckpt_dir, stop.control)
        if start >= total_steps:
            notify(f"the run in {options.out_dir} already reached step {start}: nothing to do")
            summary = _nothing_done(start)
        else:
            if options.out_dir is not None and options.resume and trainer.rank == 0:
                _truncate_log(options.out_dir / "log.jsonl", start)
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


def lock_out_dir(out: Path | None) -> locks.HeldLock | None:
    """Hold ``out/.lock`` for this run, so that two runs never share a run directory: the
    single process holds it; each rank of a launched run holds it shared with its launching
    `autotune run` (which shared it with them), so that it stays held while any rank lives,
    even after the launcher is gone; other ranks (a process group not launched by autotune)
    leave it to rank 0."""
    launched = os.environ.get(LAUNCHER_ENV) is not None
    if out is None or (distributed.env_rank() != 0 and not launched):
        return None
    try:
        return locks.acquire(out / ".lock", f"run directory {out}", shared=launched)
    except OSError as e:
        raise UserError(f"cannot write to {out} ({e.strerror})") from None


def remove_if_unused(out: Path) -> None:
    """Remove the run directory ``out``, which this run created, if it holds nothing but its
    lock: a run refused before its first step leaves no folder behind. Under the lock."""
    if {p.name for p in out.iterdir()} <= {".lock"}:
        (out / ".lock").unlink(missing_ok=True)
        out.rmdir()


def check_out_dir(out: Path | None, resume: bool) -> None:
    """Refuse to resume without a run directory, to start a run over another one, or to
    start where nothing can be written (before training, not at the first checkpoint)."""
    if resume and out is None:
        raise UserError("--resume needs --out DIR, where the checkpoints are")
    if out is None:
        return
    if not resume and (out / "log.jsonl").exists():
        raise UserError(f"{out} already holds a run: continue it with --resume, or use another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UserError(f"cannot write to {out} ({e.strerror})") from None


def finished_step(out: Path | None, total_steps: int) -> int | None:
    """The step a finished run in ``out`` reached (its summary says it trained to the end and
    that is at least ``total_steps``), else None."""
    path = out / "summary.json" if out else None
    if path is None or not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    done = summary.get("steps_done") if isinstance(summary, dict) else None
    if summary.get("stopped") == "steps" and isinstance(done, int) and done >= total_steps:
        return done
    return None


def clean_stale_files(out: Path) -> None:
    """Remove what a run killed while writing left behind (temporary files, a checksum whose
    checkpoint never landed). Only under the run directory's lock: nobody else writes there."""
    ckpt_dir = out / "checkpoints"
    stale = [*out.glob(".*.tmp"), *ckpt_dir.glob(".step_*.tmp"), *ckpt_dir.glob(".step_*.pt.*.tmp")]
    stale += [p for p in ckpt_dir.glob("step_*.pt.sha256") if not p.with_suffix("").exists()]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


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


class _Stop:
    """A stop signal (STOP_SIGNALS) while training: remember it; the loop finishes its step, then
    stops. With several processes the ranks agree on the step: after each one, an all-reduce
    (max) of the signal number on a CPU gloo group (no device sync), so a rank signalled a
    moment later stops at the same step as the others."""

    def __init__(self) -> None:
        self.signum = 0
        self.control: Any = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._set)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _set(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum

    def agreed(self) -> int:
        """The signal this step stops for (0: none), the same on every rank."""
        if self.control is None:
            return self.signum
        import torch.distributed as dist

        flag = torch.tensor([self.signum], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        return int(flag.item())


def _control_group(trainer: Trainer) -> Any:
    """A gloo group over all ranks for the executor's own CPU-side agreements (stop signals,
    which checkpoint to resume from); None when alone."""
    if trainer.world_size == 1:
        return None
    import torch.distributed as dist

    return dist.new_group(backend="gloo")


def _loop(
    trainer: Trainer, start: int, total_steps: int, options: RunOptions, ckpt_dir: Path | None, stop: _Stop
) -> RunSummary:
    spec = trainer.spec
    main = trainer.rank == 0
    log = _Log(options.out_dir / "log.jsonl") if options.out_dir and main else None
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


class _Log:
    """Append-only JSONL, flushed at every write so a killed run keeps what it logged."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("a")

    def write(self, records: list[dict[str, Any]]) -> None:
        self._f.write("".join(json.dumps(r) + "\n" for r in records))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# -- checkpoints ----------------------------------------------------------------------------

KEEP_CHECKPOINTS = 2
MANIFEST = "manifest.sha256.json"
"""In a sharded checkpoint directory: every other file's sha256, by path relative to it."""


def save_checkpoint(trainer: Trainer, step: int, ckpt_dir: Path) -> Path:
    """Atomically write the checkpoint of ``step``; keep the newest KEEP_CHECKPOINTS.

    A whole model (one process, or DDP's identical replicas) goes into ``step_XXXXXXXX.pt``,
    written by rank 0 (temporary file, fsync, rename), then its sha256 beside it in
    ``step_XXXXXXXX.pt.sha256`` (sha256sum's format), the same way: a failure (a full disk)
    leaves neither file, a kill between them a ``.pt`` that a resume passes over as having no
    checksum, never a checksum of a missing checkpoint. Sharded state (FSDP2, tp, pp, ZeRO) goes into a directory
    ``step_XXXXXXXX/`` that every rank writes through the step engine (``StepEngine.save``:
    torch.distributed.checkpoint, or DeepSpeed's own), with a MANIFEST of its files' sha256.
    Every rank calls this, and returns once the checkpoint is complete.
    """
    if trainer.ctx.sharded_state:
        path = _save_sharded(trainer, step, ckpt_dir)
    else:
        path = ckpt_dir / f"step_{step:08d}.pt"
        if trainer.rank == 0:
            buf = io.BytesIO()
            torch.save(trainer.state_dict(step), buf)
            payload = buf.getvalue()
            write_bytes_atomic(path, payload)
            try:
                write_bytes_atomic(_sidecar(path), f"{hashlib.sha256(payload).hexdigest()}  {path.name}\n".encode())
            except OSError:
                path.unlink(missing_ok=True)
                raise
            for old in _checkpoints(ckpt_dir, sharded=False)[:-KEEP_CHECKPOINTS]:
                old.unlink(missing_ok=True)
                _sidecar(old).unlink(missing_ok=True)
    if trainer.world_size > 1:
        import torch.distributed as dist

        dist.barrier()  # no rank looks for the checkpoint before rank 0 has put it in place
    return path


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): _sha256(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def checksum_problem(path: Path) -> str | None:
    """Why ``path`` is not the checkpoint that was written (None: every checksum matches)."""
    if path.is_dir():
        try:
            expected = json.loads((path / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            return "no readable checksum manifest"
        actual = _digests(path)
        for name, digest in expected.items():
            if name not in actual:
                return f"{name} is missing"
            if actual[name] != digest:
                return f"checksum mismatch in {name}"
        return None
    try:
        expected = _sidecar(path).read_text().split()[0]
    except (OSError, IndexError):
        return "no checksum file"
    return None if _sha256(path) == expected else "checksum mismatch"


def _save_sharded(trainer: Trainer, step: int, ckpt_dir: Path) -> Path:
    """The step engine's save of the model and optimizer shards (torch.distributed.checkpoint,
    or DeepSpeed's own) into a temporary directory, then rank 0 adds ``meta.pt`` (step, scaler,
    RNG) and the checksum manifest and renames it into place: a ``step_XXXXXXXX/`` directory is
    complete or absent."""
    import torch.distributed as dist

    final, tmp = ckpt_dir / f"step_{step:08d}", ckpt_dir / f".step_{step:08d}.tmp"
    main = trainer.rank == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing
        tmp.mkdir(parents=True)
    dist.barrier()  # no rank writes into tmp before it is fresh
    trainer.engine.save(tmp)  # returns on every rank once all is written
    if main:
        buf = io.BytesIO()
        torch.save(trainer.extra_state(step), buf)
        write_bytes_atomic(tmp / "meta.pt", buf.getvalue())
        write_bytes_atomic(tmp / MANIFEST, (json.dumps(_digests(tmp), indent=1) + "\n").encode())
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        fsync_dir(ckpt_dir)
        for old in _checkpoints(ckpt_dir, sharded=True)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoints(ckpt_dir: Path, *, sharded: bool) -> list[Path]:
    """Complete checkpoints of one kind in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.exists():
        return []
    if sharded:
        return sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and (p / "meta.pt").is_file())
    return sorted(ckpt_dir.glob("step_*.pt"))


def _pick_checkpoint(trainer: Trainer, ckpt_dir: Path, control: Any) -> Path | None:
    """The newest checkpoint whose checksums match, chosen by rank 0 (one reader of the
    files) and sent to the others; each one passed over is named on stderr."""
    chosen = None
    if trainer.rank == 0:
        passed: list[tuple[Path, str]] = []
        for path in reversed(_checkpoints(ckpt_dir, sharded=trainer.ctx.sharded_state)):
            problem = checksum_problem(path)
            if problem is None:
                chosen = path
                break
            passed.append((path, problem))
        for path, problem in passed:
            then = f"resuming from {chosen.name}" if chosen else "no older complete checkpoint"
            notify(f"checkpoint {path} is corrupt ({problem}): {then}")
    if control is not None:
        import torch.distributed as dist

        box = [str(chosen) if chosen else None]
        dist.broadcast_object_list(box, src=0, group=control)
        chosen = Path(box[0]) if box[0] else None
    return chosen


def _resume(trainer: Trainer, ckpt_dir: Path, control: Any) -> int:
    """Load the newest complete checkpoint (one made by this very run: plan and checkpoint
    must agree); returns its step, 0 when there is none yet."""
    path = _pick_checkpoint(trainer, ckpt_dir, control)
    if path is None:
        notify(f"no complete checkpoint in {ckpt_dir}: starting from step 0")
        return 0
    if trainer.ctx.sharded_state:
        step = _load_sharded(trainer, path)
    else:
        state = torch.load(path, map_location=trainer.device, weights_only=True)
        check_same_run(state, trainer, path)
        step = trainer.load_state_dict(state)
    notify(f"resuming from step {step} ({path})")
    return step


def check_same_run(state: dict[str, Any], trainer: Trainer, path: Path) -> None:
    """Refuse a checkpoint made under another plan, naming every difference in one line."""
    _check_format(state)
    saved, current = state.get("run"), trainer.identity()
    if not isinstance(saved, dict):
        return  # made before checkpoints recorded their run: nothing to compare
    diffs = [
        f"{k} {saved.get(k)!r} (checkpoint) vs {current.get(k)!r} (plan)"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise UserError(
            f"checkpoint {path} is of another run: {'; '.join(diffs)} "
            "(resume with the plan and --steps it was made with, or use another --out)"
        )


def _load_sharded(trainer: Trainer, path: Path) -> int:
    """Every rank reads its shards of ``path`` in place, through the step engine."""
    meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    check_same_run(meta, trainer, path)
    trainer.engine.load(path)
    return trainer.load_extra_state(meta)


def _truncate_log(log_path: Path, step: int) -> None:
    if not log_path.exists():
        return
    kept = []
    for line in _lines(log_path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the half-written last line of a killed run
            continue
        if record["step"] < step:
            kept.append(line)
    write_bytes_atomic(log_path, "".join(kept).encode())


def _lines(path: Path) -> Iterator[str]:
    with path.open() as f:
        for line in f:
            if line.strip():
                yield line if line.endswith("\n") else line + "\n"


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _lines(Path(path))]
