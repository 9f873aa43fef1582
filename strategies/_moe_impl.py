"""The torch half of the moe strategy (strategies/moe.py says what it computes): the routed
expert layer, its autograd functions and the conversion of a model's MLPs. Imported by
``apply_moe`` only, so that the catalog loads without torch."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from autotune.contract.context import TrainContext
from autotune.contract.mesh import expert_groups
from autotune.errors import UserError
from autotune.workloads.adapter import NotSupported, adapter_for

if TYPE_CHECKING:
    from autotune.strategies.moe import MoeConfig


def capacity(tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Tokens one expert takes: ``ceil(capacity_factor * tokens * top_k / num_experts)``."""
    return math.ceil(capacity_factor * tokens * top_k / num_experts)


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


class AllToAll(torch.autograd.Function):
    """``torch.distributed.all_to_all_single`` over ``group`` in equal chunks of dim 0 (chunk
    i goes to group rank i, and comes back from it in place i); its backward is the same
    exchange of the gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad.contiguous(), group=ctx.group)
        return out, None


@dataclass(frozen=True, kw_only=True, slots=True)
class ExpertGroup:
    """The ep processes that share their tokens with each other's experts."""

    group: Any
    """Their process group."""
    rank: int
    """This process's rank in it: it holds experts ``rank * E/size`` to ``(rank + 1) * E/size - 1``."""
    size: int
    """The ep degree."""


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits (N, E) -> (probs (N, E) fp32, weights (N, k), experts (N, k)): softmax
    over the experts, then the k most probable, best first, weighted by their probability."""
    probs = logits.float().softmax(dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    return probs, weights, experts


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

    def __init__(self, mlp: nn.Module, cfg: MoeConfig, expert_group: ExpertGroup | None = None) -> None:
        super().__init__()
        fc, proj = mlp.fc, mlp.proj
        E = cfg.num_experts
        self.expert_group = expert_group
        """None: every expert here; else this process holds E / ep of them (expert parallel)."""
        local = E if expert_group is None else E // expert_group.size
        self.num_experts, self.top_k, self.capacity_factor = E, cfg.top_k, cfg.capacity_factor
        self.aux_loss_coef = cfg.aux_loss_coef
        d = fc.in_features
        self.router = nn.Linear(d, E, bias=False, device=fc.weight.device, dtype=fc.weight.dtype)
        nn.init.normal_(self.router.weight, mean=0.0, std=0.02)
        with torch.no_grad():  # every expert a copy of the MLP: (E, d, d_ff), (E, d_ff, d)
            self.w_fc = nn.Parameter(fc.weight.t().expand(local, -1, -1).clone())
            self.w_proj = nn.Parameter(proj.weight.t().expand(local, -1, -1).clone())
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
        y, probs, experts, f = self._mix(x, self.router(x))
        # Switch's loss (load_balancing_loss); f over the ep group's tokens, P this process's
        # own: averaged over the ranks (DDP) that is the loss of the group's tokens.
        aux = self.num_experts * (f * probs.mean(0)).sum()
        self.last_aux_loss = aux.detach()
        if self.aux_loss_coef > 0 and torch.is_grad_enabled():
            scale = 1.0 if self.aux_loss_scale is None else self.aux_loss_scale()
            y = AuxLossScaler.apply(y, aux * (self.aux_loss_coef * scale))
        return self.drop(y.reshape(shape))

    def mix(self, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens ``x`` (N, d) and router logits (N, E) -> (the experts' weighted sum (N, d),
        probs (N, E), experts (N, k))."""
        return self._mix(x, logits)[:3]

    def _mix(
        self, x: torch.Tensor, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`mix`, and f (E,): each expert's share of the choices, before capacity."""
        N, d = x.shape
        E, k = self.num_experts, self.top_k
        probs, weights, experts = route(logits, k)
        if self.expert_group is None:
            C = capacity(N, E, k, self.capacity_factor)
            slot, keep = slots(experts, E, C)
            f = F.one_hot(experts.reshape(-1), E).float().mean(0)
        else:
            slot, keep, C, f = self._group_slots(experts)
        token = torch.arange(N, device=x.device).repeat(k)  # (k N,) choice -> its token
        self.last_dropped = 1.0 - keep.float().mean().detach()
        # Scatter: kept choices have slots of their own; dropped ones add zeros to the spare row.
        buf = x.new_zeros(E * C + 1, d).index_add(0, slot, x[token] * keep[:, None].to(x.dtype))
        out = self._experts(buf[:-1])  # (E C, d)
        out = torch.cat([out, out.new_zeros(1, d)])  # the spare row gives dropped choices zero
        # (k N, 1), choice-major as slot; in the experts' dtype, so bf16 autocast stays bf16
        gate = (weights.t().reshape(-1) * keep)[:, None].to(out.dtype)
        picked = out[slot] * gate
        return picked.new_zeros(N, d).index_add(0, token, picked), probs, experts, f

    def _experts(self, buf: torch.Tensor) -> torch.Tensor:
        """The capacity buffer of every expert (E C, d) -> their outputs (E C, d). Expert
        parallel: each process's buffer goes, expert by expert, to the process holding the
        expert; the buffers of one expert are disjoint (each choice has a slot of the group's
        own), so their sum is its whole buffer; the outputs go back to every process."""
        d = buf.shape[-1]
        group = self.expert_group
        local = self.w_fc.shape[0]
        if group is not None:  # (size, local, C, d) from every rank -> my experts' (local, C, d)
            buf = AllToAll.apply(buf, group.group).view(group.size, local, -1, d).sum(0)
        h = F.gelu(torch.bmm(buf.reshape(local, -1, d), self.w_fc), approximate="tanh")  # (local, C, d_ff)
        out = torch.bmm(h, self.w_proj).reshape(-1, d)  # (local C, d)
        if group is not None:  # the same outputs to every rank; back come all E experts' in order
            out = AllToAll.apply(out.repeat(group.size, 1), group.group)
        return out

    def _group_slots(self, experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """:func:`slots` over the ep group's tokens, in rank order then token order, as one
        process holding them all would slot them (first choices first); the capacity counts
        them all. Every rank has the same N tokens (the loader's equal shares). Returns
        (slot, keep, C, f)."""
        group = self.expert_group
        assert group is not None
        E, k = self.num_experts, self.top_k
        N = experts.shape[0]
        C = capacity(N * group.size, E, k, self.capacity_factor)
        onehot = F.one_hot(experts.t(), E)  # (k, N, E)
        counts = onehot.new_zeros(group.size, k, E)
        counts[group.rank] = onehot.sum(1)
        dist.all_reduce(counts, group=group.group)  # (size, k, E): each rank's choices per level
        total = counts.sum(0)  # (k, E)
        # Slots taken before this rank's level-j choices: all ranks' earlier levels, and the
        # earlier ranks' level j.
        before = total.cumsum(0) - total + counts[: group.rank].sum(0)
        position = (onehot.cumsum(1) - 1 + before[:, None, :]).gather(2, experts.t()[..., None]).reshape(-1)
        keep = position < C
        flat = experts.t().reshape(-1)
        f = total.sum(0).float() / (N * group.size * k)
        return torch.where(keep, flat * C + position, E * C), keep, C, f


def apply_moe(ctx: TrainContext, cfg: MoeConfig) -> None:
    """moe's apply (strategies/moe.py): convert every n-th block's MLP; with ep > 1, each
    process keeps its share of the experts (see :func:`expert_parallel`); what it needs of the
    device and the model is checked before (strategies/moe.py's apply)."""
    adapter = adapter_for(ctx.model)
    blocks = adapter.blocks()
    converted = range(0, len(blocks), cfg.every_n_layers)
    group = _expert_group(ctx, cfg.ep) if cfg.ep > 1 else None
    layers: list[MoeMLP] = []
    for i in converted:
        block = blocks[i]
        try:
            mlp = adapter.mlp(block)
        except NotSupported as e:
            raise UserError(f"strategy moe cannot find block {i}'s MLP: {e}") from None
        if not _gpt_shaped(mlp):
            raise UserError(
                "strategy moe converts MLPs of fc, GELU, proj without biases "
                f"(the built-in GPT's); block {i}'s is {type(mlp).__name__}"
            )
        name = next((n for n, child in block.named_children() if child is mlp), None)
        if name is None:
            raise UserError(f"strategy moe cannot replace block {i}'s MLP: it is not a direct child of the block")
        layer = MoeMLP(mlp, cfg, group)
        layer.aux_loss_scale = _loss_scale(ctx)
        setattr(block, name, layer)
        layers.append(layer)
    if group is not None:
        expert_parallel(ctx, group)
    # The fraction of routed choices over capacity in the step's last micro-batch, over the layers.
    ctx.metrics["moe_dropped"] = lambda: torch.stack(
        [torch.as_tensor(m.last_dropped, dtype=torch.float32) for m in layers]
    ).mean()
    ctx.notes.append(
        f"moe: MLPs of {len(converted)} of {len(blocks)} blocks -> {cfg.num_experts} experts, top {cfg.top_k}, "
        f"capacity factor {cfg.capacity_factor} (choices over it skip the MLP), aux loss coef {cfg.aux_loss_coef}"
        + (f", expert parallel over {cfg.ep} processes ({cfg.num_experts // cfg.ep} experts each)" if group else "")
    )


def _expert_group(ctx: TrainContext, ep: int) -> ExpertGroup:
    """This process's ep group: consecutive dp ranks (``autotune.contract.mesh.expert_groups``); every
    rank makes every group, as ``new_group`` asks."""
    if ctx.dims.tp > 1 or ctx.dims.pp > 1 or ctx.world_size % ep or not dist.is_initialized():
        raise UserError(
            f"moe ep {ep} needs a multiple of {ep} data-parallel processes and no tp or pp; "
            f"this run has dp {ctx.world_size}, tp {ctx.dims.tp}, pp {ctx.dims.pp}"
        )
    me = dist.get_rank()
    mine = None
    for ranks in expert_groups(ctx.world_size, ep)[0]:
        pg = dist.new_group(ranks)
        if me in ranks:
            mine = ExpertGroup(group=pg, rank=ranks.index(me), size=ep)
    assert mine is not None
    return mine


def expert_parallel(ctx: TrainContext, group: ExpertGroup) -> None:
    """The data-parallel side of ep: the expert weights differ by ep rank, so the dp wrapper
    (ddp) leaves them alone; their gradient (the group's tokens' part of the loss, through
    the all-to-all's backward) is summed over the replicas of the same experts (dp / ep of
    them) and divided by dp, as DDP averages the rest. Gradient clipping takes the norm over
    every expert of the group (``ctx.clip_grads``)."""
    from torch.nn.parallel import DistributedDataParallel

    from autotune.contract import grads

    dp, ep = ctx.world_size, group.size
    me = dist.get_rank()
    replicas = None
    if dp > ep:
        for ranks in expert_groups(dp, ep)[1]:
            pg = dist.new_group(ranks)
            if me in ranks:
                replicas = pg
    names = [n for n, m in ctx.model.named_modules() if isinstance(m, MoeMLP) for n in (f"{n}.w_fc", f"{n}.w_proj")]
    experts = [p for n, p in ctx.model.named_parameters() if n in names]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(ctx.model, names)
    for p in experts:
        p.register_hook(_expert_grad(dp, replicas))
    expert_ids = frozenset(id(p) for p in experts)
    for layer in ctx.model.modules():
        if isinstance(layer, MoeMLP):
            layer._register_load_state_dict_pre_hook(_refuse_load)

    def clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        dense = grads.grad_norm(params, skip=expert_ids)
        local = grads.grad_norm([p for p in params if id(p) in expert_ids], group=group.group)
        norm = (dense.float() ** 2 + local**2).sqrt()
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm, foreach=True)
        return norm

    ctx.clip_grads = clip


def _refuse_load(*args: Any) -> None:
    # The checkpoint writer saves rank 0's model: rank 0's experts only. Loading that into
    # rank 1 would train on the wrong experts; refuse rather than resume wrong.
    raise UserError(
        "moe with ep > 1 cannot load a checkpoint yet (its "
        "checkpoints hold rank 0's experts only): start the run afresh"
    )


def _expert_grad(dp: int, replicas: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        if replicas is not None:
            grad = grad.clone()
            dist.all_reduce(grad, group=replicas)
        return grad / dp

    return hook


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
