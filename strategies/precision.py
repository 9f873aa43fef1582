"""Numeric precision of training: fp32, bf16 autocast, fp16 autocast with a gradient scaler,
and TF32 matmuls. Weights and optimizer state stay fp32 (mixed precision), so the maths is
the plain model's up to rounding: an exact strategy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from autotune import devices
from autotune.contract.strategy import NOTHING_TO_SET, Knob, Needs, Prior, PriorFacts, Strategy, on_accelerator

if TYPE_CHECKING:
    from autotune.contract.context import TrainContext
    from autotune.plan import Plan


@dataclass(kw_only=True, slots=True)
class PrecisionConfig:
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Autocast dtype of matmuls and activations; fp16 adds a dynamic loss scaler."""
    tf32: bool = True
    """Let fp32 matmuls and convolutions use TF32 tensor cores (Ampere and newer)."""

    def needs(self) -> Needs:
        """fp16 autocast with loss scaling is a CUDA feature; bf16 on a GPU needs bf16 tensor
        cores (any CPU runs bf16 autocast)."""
        features = {"fp32": (), "bf16": ("bf16",), "fp16": ("fp16",)}[self.dtype]
        return Needs(features=frozenset(features))


_DTYPES = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}
"""dtype -> the name of its torch autocast dtype (None: no autocast)."""


def apply_precision(ctx: TrainContext, cfg: PrecisionConfig) -> None:
    import torch

    ctx.check_needs(STRATEGY, cfg, "use bf16 or fp32 on this device")
    dtype = _DTYPES[cfg.dtype]
    ctx.autocast_dtype = None if dtype is None else getattr(torch, dtype)
    ctx.grad_scaler = cfg.dtype == "fp16"
    # Process-wide switches; the plain baseline leaves TF32 off (PyTorch's own default).
    devices.of(ctx.device).allow_tf32(cfg.tf32)
    ctx.notes.append(f"precision {cfg.dtype}, tf32 {'on' if cfg.tf32 else 'off'}")


_ACCELERATE = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}
"""dtype -> Accelerate's name of its mixed precision (accelerate.utils.PrecisionType)."""


def export_accelerate(cfg: PrecisionConfig, plan: Plan) -> dict[str, Any]:
    """Accelerate's mixed precision: autocast to the dtype, fp16 with its loss scaler. TF32 is a
    process-wide switch of the script's, which Accelerate's config does not hold."""
    return {"mixed_precision": _ACCELERATE[cfg.dtype]}


def precision_cost(cfg: PrecisionConfig, terms: Any) -> None:
    """The cost model's term (``contract.cost.CostTerms``): bf16 and fp16 autocast halve the
    activations and run the matmuls at the bf16 rate; fp32 matmuls run at TF32's where allowed,
    else at fp32's (the plain baseline's)."""
    terms.autocast = cfg.dtype != "fp32"
    terms.matmul_dtype = "bf16" if terms.autocast else ("tf32" if cfg.tf32 else "fp32")


def precision_prior(facts: PriorFacts) -> Prior:
    """bf16 first: on a CPU bf16 autocast alone, a trial of its own (1.24x the fp32 baseline on
    tiny on the 2-core dev machine, trial 1 against trial 0 in bench/results/cpu-procs/plan-2procs.log);
    on a GPU with TF32 for the matmuls left in fp32."""
    return Prior(knobs={"dtype": "bf16", "tf32": facts.accelerator}, own_trial=not facts.accelerator)


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU runs bf16 matmuls natively (AMX or AVX512-BF16): elsewhere oneDNN
    emulates them, slower than fp32."""
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def search_knobs(device: str, cpuinfo: str = "/proc/cpuinfo") -> tuple[Knob, ...] | str:
    """A CPU search samples neither fp16 (its loss scaler is CUDA's) nor TF32 (a GPU's tensor
    cores: on a CPU the switch changes nothing, and a plan would carry it); on a CPU without
    bf16 units it leaves precision out (fp32 is all that pays there, and is the baseline)."""
    if on_accelerator(device):
        return STRATEGY.knobs
    if not cpu_has_bf16(cpuinfo):
        return f"this CPU has no AMX or AVX512-BF16 ({cpuinfo}): bf16 autocast would be emulated, slower than fp32"
    return (Knob(name="dtype", choices=("fp32", "bf16")), Knob(name="tf32", choices=(False,)))


STRATEGY = Strategy(
    name="precision",
    phase="precision",
    summary="mixed precision (bf16 / fp16 + loss scaling) and TF32 matmuls",
    exact=True,
    config=PrecisionConfig,
    apply=apply_precision,
    knobs=(Knob(name="dtype", choices=("fp32", "bf16", "fp16")), Knob(name="tf32", choices=(True, False))),
    cost=precision_cost,
    prior=precision_prior,
    # The DeepSpeed config that autotune run hands the engine keeps DeepSpeed's own bf16 and fp16
    # modes off: the precision is the loop's autocast (strategies/zero.py says why).
    exports={"accelerate": export_accelerate, "deepspeed": NOTHING_TO_SET},
    search_knobs=lambda facts: search_knobs(facts.device),
)
