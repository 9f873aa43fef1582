"""The order in which strategies are applied: by phase, then by what they read and change.

Each strategy declares its phase (``Strategy.phase``). Phases run in the order of ``PHASES``.
Within a phase, a strategy that reads a part of the model that another one changes comes after
it (``Strategy.reads`` / ``Strategy.changes``, the graph's "after" edges). Strategies that
neither of those orders keep the order ``TIES`` lists. A strategy that ``TIES`` does not list
(a new one) comes after those it lists, by name: adding a strategy edits nothing here.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from autotune.contract.strategy import Strategy

Phase = Literal[
    # Where the model lives, before every other phase places things on it. No strategy has it
    # since a TPU became a device (devices/xla.py) rather than a strategy; kept for one that must.
    "device",
    # Autocast and TF32: everything traced or measured later must see them.
    "precision",
    # Modules swapped for others that change the model's maths or shape (a padded vocabulary,
    # experts for MLPs, a sparse attention pattern), before anything holds a reference to them.
    "swap",
    # How the final modules compute: the attention backend, low-precision linears (torchtitan
    # converts float8 before TP and FSDP) and fused Triton kernels for norms and the loss.
    "kernels",
    # Parameters split over processes: tensor parallel shards the linears, pipeline parallel cuts
    # the blocks into stages.
    "shard",
    # Each (sharded) block wrapped: activation checkpointing.
    "wrap_block",
    # torch.compile per block, after the block wrappers and before FSDP (torchtitan's order).
    "compile",
    # Data-parallel wrappers of the whole model: they hold the final parameters.
    "wrap_model",
    # Loop, optimizer, loader and thread settings; they touch no module, but an engine built from
    # the model and the accumulation count (DeepSpeed's) reads the accumulation, so comes after it.
    "loop",
]
"""A stage of application (``Strategy.phase``); ``PHASES`` is their order."""
PHASES: tuple[Phase, ...] = get_args(Phase)

TIES: dict[Phase, tuple[str, ...]] = {
    # The order these were applied in before phases (apply.ORDER), where neither the phase nor
    # reads/changes decides it and the names' order differs. Their maths does not depend on it,
    # but plans, listings and messages ("int8 conflicts with fp8") keep it.
    "swap": ("vocab_padding", "moe", "sparse_attention"),
    "kernels": ("attention", "int8", "fp8"),
    "shard": ("tensor_parallel", "pipeline_parallel"),
    "loop": ("grad_accum", "optimizer", "dataloader", "cpu_threads"),
}

ACCUMULATION = "grad_accum"
"""The strategy whose ``steps`` knob is the accumulation count, the one strategy the core's
arithmetic names (``autotune.plan.ACCUMULATION``): the global batch is split as micro-batch x
accumulation x dp, which a plan's arithmetic and a search under a fixed global batch derive,
not a strategy's own effect. Named here, with the ties, since this is the one module of the core
that names strategies (tests/test_contract.py); it is the strategy that changes the loop's
``accumulation`` (tests/test_order.py holds the two together)."""


class OrderError(RuntimeError):
    """The declared phases contradict what the strategies read and change."""


def application_order(strategies: Mapping[str, Strategy]) -> tuple[str, ...]:
    """The names of ``strategies`` in the order they are applied: by phase, then after every
    strategy of the phase that changes a part they read, then as ``TIES`` lists them, then by
    name. OrderError for an unknown phase, a strategy that reads a part a later phase changes,
    or strategies of one phase each reading what the other changes."""
    by_phase: dict[Phase, list[str]] = {phase: [] for phase in PHASES}
    for name, strategy in strategies.items():
        if strategy.phase not in by_phase:
            raise OrderError(f"strategy {name}: unknown phase {strategy.phase!r} (phases: {', '.join(PHASES)})")
        by_phase[strategy.phase].append(name)
    _check_later_phases(strategies)
    out: list[str] = []
    for phase in PHASES:
        out.extend(_within(phase, by_phase[phase], strategies))
    return tuple(out)


def _check_later_phases(strategies: Mapping[str, Strategy]) -> None:
    for name, strategy in sorted(strategies.items()):
        for other, changer in sorted(strategies.items()):
            later = PHASES.index(changer.phase) > PHASES.index(strategy.phase)
            if later and strategy.reads & changer.changes:
                parts = ", ".join(sorted(strategy.reads & changer.changes))
                raise OrderError(
                    f"strategy {name} ({strategy.phase}) reads {parts}, which {other} changes in a later phase "
                    f"({changer.phase})"
                )


def _within(phase: Phase, names: list[str], strategies: Mapping[str, Strategy]) -> list[str]:
    """``names`` (one phase's) ordered by reads/changes, ties by ``TIES`` then by name (Kahn's
    algorithm, always taking the first of those ready by that key)."""
    listed = TIES.get(phase, ())

    def key(name: str) -> tuple[int, str]:
        return (listed.index(name) if name in listed else len(listed), name)

    before = {n: {e for e in names if e != n and strategies[n].reads & strategies[e].changes} for n in names}
    ready = [key(n) for n in names if not before[n]]
    heapq.heapify(ready)
    out: list[str] = []
    while ready:
        _, name = heapq.heappop(ready)
        out.append(name)
        for n in names:
            if name in before[n]:
                before[n].discard(name)
                if not before[n]:
                    heapq.heappush(ready, key(n))
    if len(out) < len(names):
        stuck = sorted(set(names) - set(out))
        raise OrderError(f"strategies {', '.join(stuck)} ({phase}) each read a part another of them changes")
    return out
