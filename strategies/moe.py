"""Mixture of experts: the MLP of every n-th block becomes ``num_experts`` MLPs and a router
that sends each token to its ``top_k`` best experts, weighting their outputs by the router's
scores. More parameters at about the same FLOPs per token; the model is a different one, so
it learns something else: an approximate strategy, searched only when allowed and then
loss-checked against the exact baseline.

How a converted MLP computes (:class:`MoeMLP`), for N tokens, E experts, k choices each:

- router: ``nn.Linear(d, E, bias=False)``, softmax over the experts in fp32, then the top k
  (Switch/GShard order: softmax first, top-k after). A token's weight for an expert is that
  expert's softmax probability, not renormalised over the k chosen (as Switch for k = 1; it
  keeps the main loss's gradient reaching the router).
- capacity: each expert takes ``C = ceil(capacity_factor * N * k / E)`` tokens. The N x k
  choices are slotted first choices first, then in token order (GShard's priority); a choice
  past its expert's C gets nothing from that expert, the token passes on through the block's
  residual. The dropped fraction of choices is ``MoeMLP.last_dropped`` (a 0-d tensor: reading
  it as a float would sync the device every step).
- experts: no Python loop. The weights are stacked, ``w_fc`` (E, d, d_ff) and ``w_proj``
  (E, d_ff, d); the kept tokens are scattered into a capacity-padded buffer (E, C, d), run
  through ``torch.bmm`` twice (GELU between, tanh form as the GPT's MLP) and gathered back,
  each times its router weight. Every expert weight is one parameter, so each gets a gradient
  every step (DDP finds no unused parameter).
- experts start as copies of the MLP they replace (sparse upcycling, Komatsuzaki et al. 2022):
  the converted model starts near the dense one and the experts part as the router sends
  them different tokens. The router starts as the GPT's weights do, N(0, 0.02).
- load balancing: Switch's auxiliary loss ``E * sum_e f_e * P_e`` (f_e: fraction of the N k
  choices that picked e, before capacity; P_e: e's mean router probability), times
  ``aux_loss_coef``. It reaches the gradients without changing the loss the trainer reports:
  :class:`AuxLossScaler` (Megatron's ``MoEAuxLossAutoScaler``) returns the layer's output
  unchanged and, in the backward, also backpropagates a gradient of 1 into the scaled aux
  loss. The trainer divides its loss by the accumulation steps, so the aux loss is scaled as
  the main one (Megatron's ``set_loss_scale``): times ``MoeMLP.aux_loss_scale()``, which
  :func:`apply_moe` sets to ``1 / ctx.grad_accum``, read at every forward (grad_accum is
  applied after moe). Then s micro-batches of a step weigh as one batch of their rows. The
  last (unscaled) value is ``MoeMLP.last_aux_loss``.

Only MLPs shaped as the built-in GPT's convert (``fc``: d -> d_ff, GELU, ``proj``: d_ff -> d,
no biases), found through the model adapter; others are refused with a UserError. The
state-dict keys of a converted block change (``mlp.w_fc``, ``mlp.w_proj``, ``mlp.router``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autotune.context import TrainContext
from autotune.errors import UserError
from autotune.strategy import Knob, Needs, Strategy
from autotune.workloads.adapter import NotSupported, adapter_for


@dataclass(kw_only=True, slots=True)
class MoeConfig:
    num_experts: int = 8
    """Expert MLPs per converted block, each as wide as the MLP it replaces."""
    top_k: int = 2
    """Experts each token is sent to; FLOPs per token grow with it, not with num_experts."""
    capacity_factor: float = 1.25
    """Tokens one expert takes per step, as a multiple of an even share
    (tokens x top_k / num_experts); tokens over capacity skip the block's MLP."""
    every_n_layers: int = 2
    """Convert blocks 0, n, 2n, ... (1: every block)."""
    aux_loss_coef: float = 0.01
    """Weight of Switch's load-balancing loss in the gradients (0: none); the reported loss
    never includes it."""

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts ({self.num_experts}), got {self.top_k}")
        if not 1 <= self.num_experts <= 256:
            raise ValueError(f"num_experts must be from 1 to 256, got {self.num_experts}")
        if not 0 < self.capacity_factor <= 16:  # NaN fails this too
            raise ValueError(f"capacity_factor must be in (0, 16], got {self.capacity_factor}")
        if not 1 <= self.every_n_layers <= 64:
            raise ValueError(f"every_n_layers must be from 1 to 64, got {self.every_n_layers}")
        if not 0 <= self.aux_loss_coef <= 1:  # NaN fails this too
            raise ValueError(f"aux_loss_coef must be in [0, 1], got {self.aux_loss_coef}")


class AuxLossScaler(torch.autograd.Function):
    """Identity on ``output`` in the forward; the backward also sends a gradient of 1 into
    ``aux_loss`` (already times its coefficient and loss scale), so the aux loss trains the router without
    being added to the loss anyone reads (Megatron's ``MoEAuxLossAutoScaler``)."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.ones_like(aux_loss)


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits (N, E) -> (probs (N, E) fp32, weights (N, k), experts (N, k)): softmax
    over the experts, then the k most probable, best first, weighted by their probability."""
    probs = logits.float().softmax(dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    return probs, weights, experts


def capacity(tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Tokens one expert takes: ``ceil(capacity_factor * tokens * top_k / num_experts)``."""
    return math.ceil(capacity_factor * tokens * top_k / num_experts)


def slots(experts: torch.Tensor, num_experts: int, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Choices ``experts`` (N, k) -> (slot, keep), both (k N,) in choice-major order (all first
    choices, then all second ones): ``slot`` is the row of the (E C + 1, d) buffer a choice
    goes to (``expert * C + position``, or the spare last row E C if over capacity)."""
    flat = experts.t().reshape(-1)  # (k N,): first choices take the slots first
    position = (F.one_hot(flat, num_experts).cumsum(0) - 1).gather(1, flat[:, None]).squeeze(1)
    keep = position < cap
    return torch.where(keep, flat * cap + position, num_experts * cap), keep


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch's ``E * sum_e f_e * P_e``: f_e the fraction of the choices (N, k) picking e
    (before capacity), P_e the mean of e's probability over the N tokens; 1 when balanced."""
    f = F.one_hot(experts.reshape(-1), num_experts).float().mean(0)
    return num_experts * (f * probs.mean(0)).sum()


class MoeMLP(nn.Module):
    """Routed experts in place of one MLP (fc, GELU, proj); see the module's docstring."""

    def __init__(self, mlp: nn.Module, cfg: MoeConfig) -> None:
        super().__init__()
        fc, proj = mlp.fc, mlp.proj
        E = cfg.num_experts
        self.num_experts, self.top_k, self.capacity_factor = E, cfg.top_k, cfg.capacity_factor
        self.aux_loss_coef = cfg.aux_loss_coef
        d = fc.in_features
        self.router = nn.Linear(d, E, bias=False, device=fc.weight.device, dtype=fc.weight.dtype)
        nn.init.normal_(self.router.weight, mean=0.0, std=0.02)
        with torch.no_grad():  # every expert a copy of the MLP: (E, d, d_ff), (E, d_ff, d)
            self.w_fc = nn.Parameter(fc.weight.t().expand(E, -1, -1).clone())
            self.w_proj = nn.Parameter(proj.weight.t().expand(E, -1, -1).clone())
        self.drop = getattr(mlp, "drop", None) or nn.Identity()
        self.last_dropped = torch.zeros(())
        """Fraction of the last forward's choices over capacity (0-d tensor)."""
        self.last_aux_loss = torch.zeros(())
        """The last forward's load-balancing loss, before its coefficient (0-d tensor)."""
        self.aux_loss_scale: Callable[[], float] | None = None
        """The factor the trainer's loss is divided by, as a function read at every forward
        (``1 / grad_accum``; :func:`apply_moe` sets it); None: 1."""
        self.active_share = cfg.top_k / E
        """Share of the stacked expert weights one token passes through (top_k / num_experts):
        FLOPs count it (``adapter.block_matmul_params``), memory counts every expert."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, d)
        y, probs, experts = self.mix(x, self.router(x))
        aux = load_balancing_loss(probs, experts, self.num_experts)
        self.last_aux_loss = aux.detach()
        if self.aux_loss_coef > 0 and torch.is_grad_enabled():
            scale = 1.0 if self.aux_loss_scale is None else self.aux_loss_scale()
            y = AuxLossScaler.apply(y, aux * (self.aux_loss_coef * scale))
        return self.drop(y.reshape(shape))

    def mix(self, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens ``x`` (N, d) and router logits (N, E) -> (the experts' weighted sum (N, d),
        probs (N, E), experts (N, k))."""
        N, d = x.shape
        E, k = self.num_experts, self.top_k
        probs, weights, experts = route(logits, k)
        C = capacity(N, E, k, self.capacity_factor)
        slot, keep = slots(experts, E, C)
        token = torch.arange(N, device=x.device).repeat(k)  # (k N,) choice -> its token
        self.last_dropped = 1.0 - keep.float().mean().detach()
        # Scatter: kept choices have slots of their own; dropped ones add zeros to the spare row.
        buf = x.new_zeros(E * C + 1, d).index_add(0, slot, x[token] * keep[:, None].to(x.dtype))
        h = F.gelu(torch.bmm(buf[:-1].view(E, C, d), self.w_fc), approximate="tanh")  # (E, C, d_ff)
        out = torch.bmm(h, self.w_proj).view(E * C, d)  # (E C, d)
        out = torch.cat([out, out.new_zeros(1, d)])  # the spare row gives dropped choices zero
        # (k N, 1), choice-major as slot; in the experts' dtype, so bf16 autocast stays bf16
        gate = (weights.t().reshape(-1) * keep)[:, None].to(out.dtype)
        picked = out[slot] * gate
        return picked.new_zeros(N, d).index_add(0, token, picked), probs, experts


def apply_moe(ctx: TrainContext, cfg: MoeConfig) -> None:
    ctx.check_needs(STRATEGY, cfg, "declare the model's blocks and MLPs in Workload.structure")
    adapter = adapter_for(ctx.model)
    blocks = adapter.blocks()
    converted = range(0, len(blocks), cfg.every_n_layers)
    for i in converted:
        block = blocks[i]
        try:
            mlp = adapter.mlp(block)
        except NotSupported as e:
            raise UserError(f"strategy moe cannot find block {i}'s MLP: {e}") from None
        if not _gpt_shaped(mlp):
            raise UserError(f"strategy moe converts MLPs of fc, GELU, proj without biases (the built-in GPT's); block {i}'s is {type(mlp).__name__}")
        name = next((n for n, child in block.named_children() if child is mlp), None)
        if name is None:
            raise UserError(f"strategy moe cannot replace block {i}'s MLP: it is not a direct child of the block")
        layer = MoeMLP(mlp, cfg)
        layer.aux_loss_scale = _loss_scale(ctx)
        setattr(block, name, layer)
    ctx.notes.append(
        f"moe: MLPs of {len(converted)} of {len(blocks)} blocks -> {cfg.num_experts} experts, top {cfg.top_k}, "
        f"capacity factor {cfg.capacity_factor} (choices over it skip the MLP), aux loss coef {cfg.aux_loss_coef}"
    )


def _loss_scale(ctx: TrainContext) -> Callable[[], float]:
    """The aux loss's scale as the loop scales the main loss, read when called: grad_accum is
    set after moe is applied. (A closure, not an object holding ctx: copying the model copies
    it by reference.)"""

    def scale() -> float:
        return 1.0 / ctx.grad_accum

    return scale


def _gpt_shaped(mlp: nn.Module) -> bool:
    fc, proj = getattr(mlp, "fc", None), getattr(mlp, "proj", None)
    return (
        isinstance(fc, nn.Linear)
        and isinstance(proj, nn.Linear)
        and fc.bias is None
        and proj.bias is None
        and (fc.out_features, proj.out_features) == (proj.in_features, fc.in_features)
    )


def moe_cost(cfg: MoeConfig, terms: Any) -> None:
    """The cost model's term (``costmodel.CostTerms``): each converted block holds E copies of
    its MLP's matrices and a d x E router, and a token runs through top_k of them and the
    router. Memory counts every expert, FLOPs the active ones (6 per weight and token, PaLM);
    the capacity buffers' activations are not counted."""
    shape = terms.shape
    converted = len(range(0, shape.n_layers, cfg.every_n_layers))
    mlp = shape.mlp_matrices * shape.d_model * shape.d_ff
    router = shape.d_model * cfg.num_experts
    terms.block_params += converted * ((cfg.num_experts - 1) * mlp + router)
    terms.flops += 6 * terms.tokens_per_step * converted * ((cfg.top_k - 1) * mlp + router)


STRATEGY = Strategy(
    name="moe",
    summary="mixture of experts: routed expert MLPs in every n-th block (approximate)",
    exact=False,
    config=MoeConfig,
    apply=apply_moe,
    changes=frozenset({"mlp"}),
    needs=Needs(structure=frozenset({"mlp", "blocks"})),
    # Tensor parallel's plan shards the dense MLP's linears, which converted blocks no longer
    # have (expert parallelism is not built yet).
    conflicts=frozenset({"tensor_parallel"}),
    knobs=(
        Knob(name="num_experts", choices=(4, 8, 16, 32)),
        Knob(name="top_k", choices=(1, 2)),
        Knob(name="capacity_factor", low=1.0, high=2.0),
        Knob(name="every_n_layers", low=1, high=4, integer=True),
    ),
    cost=moe_cost,
)
