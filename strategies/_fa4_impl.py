"""FlashAttention-4 (``flash-attn-4``, CuTe DSL: ``flash_attn.cute``) as torch custom ops, imported
by the attention strategy only when it applies backend fa4 (this module imports the package).

FA4's own ``flash_attn_func`` is an ``autograd.Function`` whose forward JIT-compiles CuTe DSL
kernels: dynamo cannot trace into it, so every attention call would break a compiled block's
graph (and ``fullgraph`` would refuse the model). As a custom op with a fake (meta) function and
a registered backward, compile keeps it in the graph as one opaque call. The ops call the two
entry points that torch's own FA4 registration calls (``torch.nn.attention._fa4``, a prototype
that swaps the kernels behind SDPA's flash backend for the whole process, which is why we do not
use it): ``_flash_attn_fwd`` and ``_flash_attn_bwd``, causal, scale 1/sqrt(hs), no dropout.

Layout is FA4's: (B, T, nh, hs), any strides with the last dimension contiguous (it copies
inputs that are not). Grouped kv heads (nkv dividing nh) are FA4's own (``pack_gqa``); our
adapters repeat them before calling any kernel (``autotune.workloads.adapter.Attend``).
"""

import torch
from flash_attn.cute import interface as _fa4


@torch.library.custom_op("autotune::fa4_forward", mutates_args=())
def fa4_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, T, nh, hs), k and v (B, T, nkv, hs) -> out (B, T, nh, hs), logsumexp (B, nh, T) fp32."""
    out, lse = _fa4._flash_attn_fwd(q, k, v, causal=True, return_lse=True)[:2]
    return out, lse.contiguous()


@fa4_forward.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, nh, _ = q.shape  # FA4 allocates both outputs contiguous
    return q.new_empty((B, T, nh, v.shape[-1])), q.new_empty((B, nh, T), dtype=torch.float32)


@torch.library.custom_op("autotune::fa4_backward", mutates_args=())
def fa4_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of q, k and v, each contiguous in its input's shape."""
    dq, dk, dv = _fa4._flash_attn_bwd(q, k, v, out, dout, lse, causal=True)
    # FA4 allocates them like its (made-aligned) inputs; the fake says contiguous, so make it so
    # (free for the layouts our adapters pass: a strided view of a fused qkv gets a fresh tensor).
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@fa4_backward.register_fake
def _(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    q, k, v = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.mark_non_differentiable(lse)


def _backward(ctx: torch.autograd.function.FunctionCtx, dout: torch.Tensor, _dlse: torch.Tensor) -> tuple:
    q, k, v, out, lse = ctx.saved_tensors
    return fa4_backward(dout, q, k, v, out, lse)


fa4_forward.register_autograd(_backward, setup_context=_setup_context)


def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """An ``Attend``: q, k, v and the result (B, nh, T, hs); FA4 takes (B, T, nh, hs), so
    transposed views go in and out. FA4 has no dropout (the strategy refuses a model with it)."""
    if dropout_p:
        raise ValueError(f"attention fa4 has no dropout, got dropout_p {dropout_p}")
    out, _ = fa4_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
