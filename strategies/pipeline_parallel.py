"""Pipeline parallelism (``torch.distributed.pipelining``): the blocks are cut into ``degree``
stages on different processes (the embedding with the first, the head with the last), and
each batch is split into micro-batches that flow through the stages on a schedule. Gradients
of the micro-batches are summed before one optimizer step, so the update is the plain
model's on the same batch: an exact strategy.

Declared, not implemented yet (issue 6). It needs two or more processes and a workload that
declares its blocks, embedding and head (what is put on the first and last stages).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from autotune.strategy import Knob, Needs, Strategy


@dataclass(kw_only=True, slots=True)
class PipelineParallelConfig:
    degree: int = 2
    """Pipeline stages, one per process group; at most the number of blocks."""
    schedule: Literal["gpipe", "1f1b"] = "1f1b"
    """gpipe: all forwards, then all backwards (activations of every micro-batch live at once);
    1f1b: one forward, one backward in turn (activations of at most ``degree`` micro-batches)."""
    microbatches: int = 4
    """Micro-batches per step; the idle share of each stage (the bubble) is about
    (degree - 1) / (microbatches + degree - 1)."""

    def __post_init__(self) -> None:
        if self.degree < 2:
            raise ValueError(f"degree must be at least 2, got {self.degree}")
        if self.microbatches < self.degree:
            raise ValueError(f"microbatches ({self.microbatches}) must be at least degree ({self.degree}) to fill the pipeline")


STRATEGY = Strategy(
    name="pipeline_parallel",
    summary="cut the blocks into stages over processes, micro-batches on a GPipe or 1F1B schedule",
    exact=True,
    config=PipelineParallelConfig,
    apply=None,
    needs=Needs(min_devices=2, structure=frozenset({"blocks", "embed", "head"})),
    # The first and last stages hold the embedding and head: vocab padding replaces them first.
    after=frozenset({"vocab_padding"}),
    knobs=(
        Knob(name="degree", choices=(2, 4, 8)),
        Knob(name="schedule", choices=("gpipe", "1f1b")),
        Knob(name="microbatches", low=2, high=32, log=True, integer=True),
    ),
    issue="issue 6 (multi-process strategies)",
)
