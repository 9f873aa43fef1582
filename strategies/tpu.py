"""Training on a TPU through torch_xla: the model and batches go to the XLA device, steps are
traced lazily and compiled by XLA. fp32 matmuls run at the precision ``matmul_precision``
sets (like TF32 on a GPU), so the maths is the plain model's up to precision: an exact
strategy.

Declared, not implemented yet (roadmap item "TPU support", no issue filed). It needs a TPU
and the torch_xla package. It excludes what only runs on CUDA or replaces what torch_xla does
itself: inductor (compile; XLA compiles the step), torch's and DeepSpeed's data-parallel
wrappers over NCCL or gloo (ddp, fsdp2, zero; torch_xla brings its own), torchao's int8 and
fp8 training, and Triton kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from autotune.contract.strategy import Knob, Needs, Strategy


@dataclass(kw_only=True, slots=True)
class TpuConfig:
    matmul_precision: Literal["default", "high", "highest"] = "default"
    """``torch_xla.backends.set_mat_mul_precision``: fp32 matmuls in one bf16 pass (default),
    three (high, bf16_3x) or six (highest, about full fp32)."""


STRATEGY = Strategy(
    name="tpu",
    phase="device",
    summary="train on a TPU through torch_xla (XLA-compiled steps)",
    exact=True,
    config=TpuConfig,
    apply=None,
    needs=Needs(tpu=True, modules=("torch_xla",)),
    conflicts=frozenset({"compile", "ddp", "fsdp2", "zero", "int8", "fp8", "triton_kernels"}),
    knobs=(Knob(name="matmul_precision", choices=("default", "high", "highest")),),
    issue="roadmap item TPU support, no issue filed yet",
)
