"""The order of application: each strategy's phase, then reads/changes within a phase. Today's
order (``autotune.apply.ORDER`` before the phases, as it stood at 26f7028) is kept here as data:
the phases must give exactly it, for the whole catalog and so for every subset of it."""

from __future__ import annotations

from autotune.apply import ORDER
from autotune.catalog import catalog

BEFORE_PHASES = (
    "tpu",
    "precision",
    "vocab_padding",
    "moe",
    "sparse_attention",
    "attention",
    "int8",
    "fp8",
    "triton_kernels",
    "tensor_parallel",
    "pipeline_parallel",
    "activation_checkpoint",
    "compile",
    "ddp",
    "fsdp2",
    "grad_accum",
    "optimizer",
    "dataloader",
    "cpu_threads",
    "zero",
)


def test_the_order_is_the_one_before_phases():
    assert tuple(name for name in ORDER if name in catalog()) == BEFORE_PHASES
