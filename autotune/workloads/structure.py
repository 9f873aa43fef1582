"""What a workload declares it supports, without torch: the structure tokens, the adapters'
refusal and the arithmetic strategies check a plan with before anything is built.

The model adapters (:mod:`autotune.workloads.adapter`, which imports torch) re-export these,
so a strategy's ``check_workload`` and ``autotune show`` read them without loading torch.
"""

from __future__ import annotations

STRUCTURE = frozenset({"blocks", "attention", "mlp", "embed", "head", "vocab", "tp", "sp", "pp"})
"""Every token :meth:`ModelAdapter.supports` may return."""


class NotSupported(Exception):
    """The adapter cannot do what was asked; the message says why (shown by --explain)."""


def declared(structure: frozenset[str]) -> frozenset[str]:
    """What a workload's declared ``structure`` lets strategies ask of its adapter.

    The built-in GPT's workloads still declare the legacy token ``"gpt"``
    (``autotune.workloads.GPT_STRUCTURE``, which triton_kernels still reads) rather than
    :meth:`GPTAdapter.supports`; it stands for everything the GPT's adapter serves. Other
    workloads' structure is their adapter's ``supports()`` already (hf:) or declared by hand."""
    return structure | STRUCTURE if "gpt" in structure else frozenset(structure)


def pipeline_split(n_blocks: int, stages: int) -> list[tuple[int, int]]:
    """Block ranges ``[start, stop)`` of ``stages`` pipeline stages, as even as they come."""
    if not 1 <= stages <= n_blocks:
        raise NotSupported(f"{stages} pipeline stages need at least as many blocks, the model has {n_blocks}")
    return [(i * n_blocks // stages, (i + 1) * n_blocks // stages) for i in range(stages)]
