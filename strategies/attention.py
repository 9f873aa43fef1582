"""The attention kernel of a model's blocks, set through its adapter (``set_attention``): the
built-in GPT's ``attn.attend`` hook, or a Hugging Face model's attention interface.

- "naive": QK^T, causal mask, softmax, @V, with the (T, T) score matrix in memory: the
  roadmap's unoptimized starting point.
- "math", "efficient", "flash", "cudnn": PyTorch's SDPA pinned to one backend (its C++ math
  reference, memory-efficient, FlashAttention-2, cuDNN). The backend is entered with
  ``sdpa_kernel`` inside each attention call, which torch.compile traces (torch 2.5+), so
  the choice is per model, not process-wide.
- "fa3": FlashAttention-3 (Hopper) from the ``flash_attn_interface`` package, built from the
  flash-attention repository's ``hopper/`` folder (we know of no wheel of it on PyPI): offered
  only where someone built it.
- "fa4": FlashAttention-4 (Hopper 9.x and datacenter Blackwell 10.x), the ``flash-attn-4`` wheel
  (``pip install autotune[fa4]``; CuTe DSL, ``flash_attn.cute``), run as a torch custom op so that
  torch.compile keeps it in its graph (``_fa4_impl``). Its head widths: multiples of 8 up to 256 on
  Hopper, up to 128 or 256 on Blackwell (:func:`fa4_head_dim_refusal`).

Every backend computes softmax(QK^T / sqrt(d) + causal mask) V exactly, differing only in
the order of floating-point operations (flash kernels never form the score matrix): an exact
strategy. flash, cudnn, fa3 and fa4 run in bf16/fp16 only (precision, applied earlier, sets that).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from autotune.contract.strategy import NOTHING_TO_SET, Knob, Needs, Prior, PriorFacts, Strategy
from autotune.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch.nn.attention import SDPBackend

    from autotune.contract.context import TrainContext

_STRUCTURE = frozenset({"attention"})
_SDPA_BACKENDS = {
    "math": "MATH",
    "efficient": "EFFICIENT_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
}
"""Backend knob -> the name of its ``torch.nn.attention.SDPBackend`` member."""
_HALF_ONLY = frozenset({"flash", "cudnn", "fa3", "fa4"})
"""Backends whose kernels take bf16/fp16 inputs only."""


@dataclass(kw_only=True, slots=True)
class AttentionConfig:
    backend: Literal["naive", "math", "efficient", "flash", "cudnn", "fa3", "fa4"] = "flash"
    """Attention kernel (see the module docstring)."""

    def needs(self) -> Needs:
        """The fused kernels need a device that has them; flash and cuDNN attention need Ampere
        (8.0+), FA3 Hopper, FA4 Hopper or datacenter Blackwell (its kernels are built for sm90 and
        sm100 only)."""
        fused = self.backend in ("efficient", "flash", "cudnn", "fa3", "fa4")
        capability = {"flash": (8, 0), "cudnn": (8, 0), "fa3": (9, 0)}.get(self.backend)
        majors = frozenset({9, 10}) if self.backend == "fa4" else frozenset()
        features = frozenset({"fused_attention"}) if fused else frozenset()
        return Needs(
            features=features,
            min_compute_capability=capability,
            compute_capability_majors=majors,
            modules=_MODULES.get(self.backend, ()),
            structure=_STRUCTURE,
        )


_MODULES = {"fa3": ("flash_attn_interface",), "fa4": ("flash_attn.cute",)}
"""Backend knob -> the packages it imports."""


def fa4_head_dim_refusal(head_dim: int, capability: tuple[int, int] | None) -> str | None:
    """Why FA4 cannot take heads ``head_dim`` wide (bf16/fp16: 8-element, 16-byte aligned) on a GPU
    of ``capability`` (None: on either of its architectures), or None. Its own checks, read from
    ``flash_attn/cute/interface.py`` (``_validate_head_dims``) of flash-attn-4 4.0.0b36; 0: not known."""
    if head_dim == 0:
        return None
    hopper = 8 <= head_dim <= 256 and head_dim % 8 == 0
    blackwell = (8 <= head_dim <= 128 and head_dim % 8 == 0) or head_dim == 256
    ok = {9: hopper, 10: blackwell}.get(capability[0]) if capability else hopper or blackwell
    if ok:
        return None
    where = {9: "on Hopper", 10: "on Blackwell"}.get(capability[0], "") if capability else "on Hopper or Blackwell"
    return (
        f"attention fa4 cannot take this model's heads of width {head_dim} {where} (it takes multiples of 8 up "
        f"to 256 on Hopper, up to 128 and 256 on Blackwell): use cudnn or flash"
    )


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Causal attention written out; q, k, v and the result are (B, nh, T, hs)."""
    import torch
    import torch.nn.functional as F

    T = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    if dropout_p:
        weights = F.dropout(weights, dropout_p)
    return weights @ v


def sdpa_with(backend: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """SDPA restricted to ``backend``: an unsupported input raises instead of falling back."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)


def fa3_with(
    flash_attn_func: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float
) -> torch.Tensor:
    """FlashAttention-3, which takes (B, T, nh, hs): transposed views in and out."""
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    out = out[0] if isinstance(out, tuple) else out  # some releases also return the LSE
    return out.transpose(1, 2)


def _kernel(cfg: AttentionConfig, dropout: float) -> Callable:
    if cfg.backend == "naive":
        return naive_attention
    if cfg.backend == "fa4":
        if dropout:
            raise UserError("attention fa4 has no dropout: set the model's dropout to 0 or use flash")
        try:
            from autotune.strategies._fa4_impl import fa4_attention
        except (ImportError, RuntimeError, OSError) as e:  # found, but the CuTe DSL or its CUDA flavor fails
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(
                f"attention fa4: flash_attn.cute does not import here: {why} (use cudnn or flash)"
            ) from None
        return fa4_attention
    if cfg.backend == "fa3":
        if dropout:
            raise UserError("attention fa3 has no dropout: set the model's dropout to 0 or use flash")
        from flash_attn_interface import flash_attn_func

        return functools.partial(fa3_with, flash_attn_func)
    from torch.nn.attention import SDPBackend

    return functools.partial(sdpa_with, getattr(SDPBackend, _SDPA_BACKENDS[cfg.backend]))


def apply_attention(ctx: TrainContext, cfg: AttentionConfig) -> None:
    import torch

    from autotune.workloads.adapter import NotSupported, adapter_for

    ctx.check_needs(STRATEGY, cfg, "backends math and naive run anywhere")
    if cfg.backend in _HALF_ONLY and ctx.autocast_dtype not in (torch.bfloat16, torch.float16):
        raise UserError(
            f"attention {cfg.backend} runs in bf16 or fp16 only: add precision with dtype bf16, or use efficient"
        )
    adapter = adapter_for(ctx.model)
    if cfg.backend == "fa4" and (why := fa4_head_dim_refusal(adapter.shape().head_dim, ctx.facts().compute_capability)):
        raise UserError(why)
    try:
        adapter.set_attention(kernel=_kernel(cfg, adapter.attention_dropout()))
    except NotSupported as e:
        raise UserError(f"strategy attention cannot set this model's attention kernel: {e}") from None
    ctx.notes.append(f"attention {cfg.backend}")


_KEEPS_SCORES = frozenset({"naive", "math"})
"""Backends that keep the (b, heads, s, s) score matrix for the backward pass."""


def attention_cost(cfg: AttentionConfig, terms: Any) -> None:
    """The cost model's term (``contract.cost.CostTerms``): the kernel the blocks run instead of
    SDPA's own choice. Naive and math keep the scores; every backend gets k and v repeated to
    each query head (the adapter repeats grouped kv heads before calling it)."""
    from autotune.contract.cost import AttentionKernel

    terms.attention = AttentionKernel(keeps_scores=cfg.backend in _KEEPS_SCORES, repeated_kv=True)


def check_workload(cfg: AttentionConfig, workload: Any) -> None:
    """Before anything starts: fa4 refuses heads that neither of its architectures takes (the
    one the run finds is checked again when it applies). The width is the shape's, else the
    config's (a plan's check reads a preset's config, no shape); 0 where neither says."""
    if cfg.backend != "fa4":
        return
    head_dim = workload.shape.head_dim if workload.shape is not None else getattr(workload.config, "head_dim", 0)
    if why := fa4_head_dim_refusal(int(head_dim or 0), None):
        raise UserError(why)


def attention_prior(facts: PriorFacts) -> Prior | None:
    """On a GPU, cuDNN's SDPA: it measured 1.049x flash's on phase8-small at micro-batch 96 on an
    H200 (bench/results/ab/attention_ab_h200.jsonl); flash where cuDNN's is excluded. FA4 races it
    where it can run (a trial of the first prior with fa4 instead): the planner keeps it only where
    it measures faster."""
    if not facts.accelerator:
        return None
    excluded = facts.excluded.get("backend", {})
    backend = next((b for b in ("cudnn", "flash") if b not in excluded), None)
    if backend is None:  # an accelerator without fused attention (XLA): SDPA as the model has it
        return None
    races = () if "fa4" in excluded else ({"backend": "fa4"},)
    return Prior(knobs={"backend": backend}, races=races)


STRATEGY = Strategy(
    name="attention",
    phase="kernels",
    summary="attention kernel: naive, SDPA math / efficient / flash / cuDNN, FlashAttention-3 / 4",
    exact=True,
    config=AttentionConfig,
    apply=apply_attention,
    changes=frozenset({"attention"}),
    needs=Needs(structure=_STRUCTURE),
    cost=attention_cost,
    knobs=(Knob(name="backend", choices=("naive", "math", "efficient", "flash", "cudnn", "fa3", "fa4")),),
    check_workload=check_workload,
    prior=attention_prior,
    # No launcher config names an attention kernel: the run picks it, the maths is the same.
    exports={"accelerate": NOTHING_TO_SET, "deepspeed": NOTHING_TO_SET},
)
