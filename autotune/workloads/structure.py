"""What a workload declares it supports, without torch: the structure tokens, the adapters'
refusal and the arithmetic strategies check a plan with before anything is built.

The model adapters (:mod:`autotune.workloads.adapter`, which imports torch) re-export these,
so a strategy's ``check_workload`` and ``autotune show`` read them without loading torch.
"""

from __future__ import annotations

STRUCTURE = frozenset({"blocks", "attention", "mlp", "embed", "head", "vocab", "tp", "sp", "pp", "loss"})
"""Every token :meth:`ModelAdapter.supports` may return (see ``autotune.workloads``)."""


class NotSupported(Exception):
    """The adapter cannot do what was asked; the message says why (shown by --explain)."""


def declared(structure: frozenset[str]) -> frozenset[str]:
    """What a workload's declared ``structure`` lets strategies ask of its adapter.

    The tokens themselves: the built-in GPT's workloads declare everything its adapter serves
    (``autotune.workloads.GPT_STRUCTURE``), an hf: model's are its adapter's ``supports()``, a
    user's workload declares its own by hand."""
    return frozenset(structure)


def pipeline_split(n_blocks: int, stages: int) -> list[tuple[int, int]]:
    """Block ranges ``[start, stop)`` of ``stages`` pipeline stages, as even as they come."""
    if not 1 <= stages <= n_blocks:
        raise NotSupported(f"{stages} pipeline stages need at least as many blocks, the model has {n_blocks}")
    return [(i * n_blocks // stages, (i + 1) * n_blocks // stages) for i in range(stages)]
