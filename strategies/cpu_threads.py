"""Intra-op threads of a CPU run (``torch.set_num_threads``): on a CPU the matmuls of one
process are as fast as the threads they get, and the default (one per physical core) is not
always the best (a process that shares its cores with others, or with the data loader, may
do better with fewer). The maths is the plain run's up to the order of summation inside a
matmul: an exact strategy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from autotune import devices
from autotune.contract.strategy import ACCELERATOR, NOTHING_TO_SET, Knob, Prior, PriorFacts, Strategy

if TYPE_CHECKING:
    from autotune.contract.context import TrainContext

MAX_THREADS = 256
"""The catalog's range; the planner narrows it to the cores of the machine it searches on."""


@dataclass(kw_only=True, slots=True)
class CpuThreadsConfig:
    threads: int = 1
    """Intra-op threads of each process."""

    def __post_init__(self) -> None:
        if not 1 <= self.threads <= MAX_THREADS:
            raise ValueError(f"threads must be in 1..{MAX_THREADS}, got {self.threads}")


def apply_cpu_threads(ctx: TrainContext, cfg: CpuThreadsConfig) -> None:
    import torch

    # Never more threads than the cores this process may run on now (taskset, a cpuset, a
    # smaller machine than the plan's): OpenMP threads past them wait on each other's cores,
    # several times slower than fewer threads.
    threads = min(cfg.threads, devices.usable_cores())
    # Process-wide, like precision's TF32 switch; set before anything is traced or timed.
    torch.set_num_threads(threads)
    ctx.notes.append(
        f"cpu threads {threads}"
        + (f" (the plan's {cfg.threads}: this process may use only {threads})" if threads < cfg.threads else "")
    )


def cpu_threads_prior(facts: PriorFacts) -> Prior | None:
    """Every core shared out between the processes (a child may start with fewer threads)."""
    return Prior(knobs={"threads": max(1, facts.cores // facts.processes)}) if facts.device == "cpu" else None


STRATEGY = Strategy(
    name="cpu_threads",
    phase="loop",
    summary="intra-op threads of each CPU process (torch.set_num_threads)",
    exact=True,
    config=CpuThreadsConfig,
    apply=apply_cpu_threads,
    knobs=(Knob(name="threads", low=1, high=MAX_THREADS, integer=True),),
    # On a GPU the thread count of the host process does not decide the speed: CPU runs only.
    left_out={ACCELERATOR: "searched on CPU runs only"},
    prior=cpu_threads_prior,
    # The catalog's range is any machine's; a search samples this one's cores.
    search_knobs=lambda facts: (Knob(name="threads", low=1, high=facts.cores, integer=True),),
    # A setting of each process, which the run makes itself.
    exports={"accelerate": NOTHING_TO_SET, "deepspeed": NOTHING_TO_SET},
)
