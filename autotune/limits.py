"""A plan's size against this machine, checked before anything is built.

Each setting of a plan is bounded on load (``autotune.plan``); their product is not: a model of
16 million layers, a validation pass of a million micro-batches, or more processes than the
node has cores or GPUs pass every bound and then exhaust the machine. ``autotune show`` and
``autotune run`` call :func:`check_machine` after the plan's own checks: the model's size is
counted arithmetically (the cost model's estimate, :func:`autotune.costmodel.estimate`, over
the shape read off a model built on the meta device, deep ones from their first blocks) and
compared with the memory of the device the plan trains on, its processes with the cores and
GPUs here. A refusal is one line that says the numbers.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from autotune.errors import UserError

MAX_OVERSUBSCRIPTION = 4
"""CPU processes a core at most. More than one a core is allowed with a warning (each process
then runs slower than alone: the planner's trials measured that, a hand-written plan may not)."""
EVAL_BYTES_PER_TOKEN = 20
"""What the validation batches hold a token, all evaluations long (``data.val_batches``): its
int32 window on the host, its int64 input and target on the device."""


@dataclass(kw_only=True, slots=True)
class Fit:
    """What :func:`check_machine` counted: the figures ``autotune show`` prints."""

    parameters: int
    """Parameters of the model (all of them, counted from its shape)."""
    peak_memory_bytes: float
    """Predicted peak memory of one process: the cost model's, plus the validation batches."""
    memory_bytes: int | None
    """Memory of the device each process trains on here (host RAM shared by the CPU processes);
    None where the plan trains on a device this machine lacks (its memory is not checked)."""
    where: str
    """That memory, in words ("RAM")."""

    def line(self) -> str:
        """One line: the estimate, and what it was checked against."""
        against = (
            f"; this machine has {size(self.memory_bytes)} of {self.where}"
            if self.memory_bytes is not None
            else f" ({self.where}: no GPU here to check it against)"
        )
        return (
            f"{count(self.parameters)} parameters, peak memory about {size(self.peak_memory_bytes)} a process{against}"
        )


def check_machine(plan: Any, workload: Any) -> Fit | None:
    """Refuse ``plan`` (a UserError naming the numbers) if its processes or its memory exceed
    this machine. ``workload`` is the plan's (``apply.check_plan``'s). Returns what was
    counted; None for a user's model whose shape is not known."""
    from autotune import costmodel
    from autotune.workloads import shaped

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a rank of a run: its launching command checked the plan
        return None
    launch, train = plan.launch, plan.train
    on_accelerator, devices, where, memory = _device(launch.device)
    nproc = launch.nproc_per_node
    if on_accelerator and devices is not None and nproc > devices:
        raise UserError(f"the plan runs {nproc:,} processes a node, one per GPU, but this machine has {devices} GPU(s)")
    if not on_accelerator:
        cores = usable_cores()
        if nproc > cores * MAX_OVERSUBSCRIPTION:
            raise UserError(
                f"the plan runs {nproc:,} processes a node on the CPU, but this machine has {cores} core(s) "
                f"(at most {MAX_OVERSUBSCRIPTION} processes a core)"
            )
    workload = shaped(workload) if workload.shape is None else workload
    if workload.shape is None:
        return None
    shape = workload.shape
    configs = plan.strategy_configs()
    estimate = costmodel.estimate(workload, train.micro_batch_size, configs, processes=nproc * launch.nnodes)
    eval_tokens = train.eval_batches * train.micro_batch_size * (shape.seq_len + 1) if train.eval_interval else 0
    peak = estimate.peak_memory_bytes + EVAL_BYTES_PER_TOKEN * eval_tokens
    fit = Fit(parameters=costmodel.parameters(shape), peak_memory_bytes=peak, memory_bytes=memory, where=where)
    need = peak * (1 if on_accelerator else nproc)  # the CPU processes share the host's memory
    if memory is not None and need > memory:
        parts = estimate.breakdown
        state = parts["weights"] + parts["optimizer"] + parts["gradients"]
        evals = (
            f", {size(EVAL_BYTES_PER_TOKEN * eval_tokens)} for {train.eval_batches:,} validation micro-batches"
            if eval_tokens
            else ""
        )
        shared = (
            f"its {nproc} processes share this machine's {size(memory)} of {where}"
            if need != peak
            else f"this machine has {size(memory)} of {where}"
        )
        raise UserError(
            f"the plan needs about {size(peak)} a process: {size(state)} for the training state "
            f"({count(fit.parameters)} parameters in {shape.n_layers:,} layers), "
            f"{size(parts['activations'] + parts['logits'])} for activations at micro-batch "
            f"{train.micro_batch_size:,}{evals}; {shared}"
        )
    return fit


def warn_if_oversubscribed(launch: Any) -> None:
    """One line on stderr where the plan's CPU processes outnumber the cores (the command goes
    on: :func:`check_machine` refused more than MAX_OVERSUBSCRIPTION a core). Said once the
    plan is accepted, so that a refusal stays the command's one line."""
    cores = usable_cores()
    if not _device(launch.device)[0] and launch.nproc_per_node > cores:
        print(
            f"autotune: warning: {launch.nproc_per_node} processes on {cores} core(s): each runs slower than alone",
            file=sys.stderr,
        )


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _here(kind: Any) -> bool:
    """Whether this machine has ``kind``: without importing torch where the kind can tell it
    is absent (then ``show`` checks a plan without torch: the layering contract,
    tests/test_layering.py), else by asking torch."""
    if "torch" not in sys.modules and kind.surely_absent():
        return False
    return bool(kind.is_available())


def _device(requested: str) -> tuple[bool, int | None, str, int | None]:
    """(trains on an accelerator, how many here, the device in words, its memory) for a plan's
    ``launch.device``: a plan for an accelerator this machine lacks has neither devices nor
    memory to check against."""
    import psutil

    from autotune import devices

    if requested == devices.AUTO:
        kind = next((k for k in devices.accelerators() if _here(k)), devices.get(devices.CPU))
    else:
        kind = devices.get(requested)
    if not kind.accelerator:
        return False, None, "RAM", psutil.virtual_memory().total
    if not _here(kind):
        return True, None, f"a {kind.words} plan", None
    memories = kind.memories()
    if not memories:  # devices that share the host's RAM (XLA's CPU backend)
        return True, kind.count(), "RAM", psutil.virtual_memory().total
    name, memory = min(memories, key=lambda m: m[1])
    return True, len(memories), f"memory on each {name}", memory


def size(n: float) -> str:
    """Bytes, readably: 1.5 GiB, 2.1 TiB."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:,.1f} {units[i]}" if i else f"{n:,.0f} B"


def count(n: float) -> str:
    """A count, readably: 124.4M, 13.2T."""
    units = ("", "K", "M", "B", "T")
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:,.1f}{units[i]}" if i else f"{n:,.0f}"
