"""The executor's figures, one definition each: tokens per optimizer step, MFU against one
reference peak, and peak memory. Trials and runs both report through these."""

from __future__ import annotations

from pathlib import Path

import torch

from autotune import devices
from autotune.contract.mesh import mesh_shape
from autotune.errors import UserError
from autotune.plan import Plan
from autotune.workloads import load_workload

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
