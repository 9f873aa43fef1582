"""Gradients and parameters over meshes and process groups: what the default loop and the
strategies that own a part of the step (the pipeline's stages, moe's experts, ZeRO's engine)
share. AdamW's parameter groups (:func:`adamw_groups`, one definition for the executor's
optimizer and DeepSpeed's), parameters grouped by DTensor mesh (:func:`by_mesh`) for the
foreach and fused kernels, the global gradient norm over plain tensors, DTensors and process
groups (:func:`grad_norm`) and clipping to it (:func:`clip_grad_norm_`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autotune import devices


def adamw_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's parameter groups for ``model``, the one definition the executor's optimizer
    and ZeRO's engine both use: weight decay on matrices only (nanoGPT: norms, biases and
    other vectors are left alone), each group split once more by DTensor mesh
    (:func:`by_mesh`) for the foreach and fused kernels; an empty group stays."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return [{**g, "params": ps} for g in groups for ps in list(by_mesh(g["params"]).values()) or [[]]]


def by_mesh(tensors: Iterable[torch.Tensor]) -> dict[Any, list[torch.Tensor]]:
    """``tensors`` grouped by DTensor mesh (key None: plain tensors), groups and members in
    first-seen order: a foreach kernel takes plain tensors or DTensors of one mesh, and tensor
    parallel leaves the embedding and head plain beside DTensor blocks."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(getattr(t, "device_mesh", None), []).append(t)
    return groups


def grad_norm(params: list[torch.Tensor], group: Any = None, skip: frozenset[int] = frozenset()) -> torch.Tensor:
    """The global L2 norm of the gradients of ``params``, a plain fp32 scalar on every rank.

    Gradients may be plain tensors and DTensors of several meshes at once (tensor parallel
    leaves the embedding and head whole): DTensors are summed per mesh by DTensor itself
    (a shard counts once, a replica once), plain tensors locally. ``group``: a process group
    over which the squared norms of different parameters are summed too (pipeline stages,
    as torchtitan's ``clip_grad_norm_`` does); ``skip``: ids of parameters left out of the
    sum (a copy of a tied weight counted on another stage).
    """
    grads = by_mesh(p.grad for p in params if p.grad is not None and id(p) not in skip)
    plain = grads.pop(None, [])
    device = next((p.device for p in params), torch.device("cpu"))
    foreach = devices.of(device).foreach
    norms = [torch.nn.utils.get_total_norm(plain, foreach=foreach)] if plain else []
    norms += [torch.nn.utils.get_total_norm(g, foreach=foreach).full_tensor() for g in grads.values()]
    if len(norms) == 1 and group is None:
        return norms[0]  # torch's clip_grad_norm_ exactly
    total = torch.stack([n.float() ** 2 for n in norms]).sum() if norms else torch.zeros((), device=device)
    if group is not None:
        dist.all_reduce(total, group=group)
    return total.sqrt()


def clip_grad_norm_(
    params: list[torch.Tensor], max_norm: float, group: Any = None, skip: frozenset[int] = frozenset()
) -> torch.Tensor:
    """Scale the gradients of ``params`` so that their global norm (:func:`grad_norm`) is at
    most ``max_norm``; returns the norm before clipping. One process, plain tensors: the
    very maths of ``torch.nn.utils.clip_grad_norm_``."""
    from torch.distributed.tensor.experimental import implicit_replication

    norm = grad_norm(params, group, skip)
    foreach = devices.of(next((p.device for p in params), torch.device("cpu"))).foreach
    # One foreach call per mesh (FSDP2 + TP keeps the blocks on the 2D mesh, the embedding on
    # the dp mesh).
    with implicit_replication():  # the plain scalar scales DTensor gradients too
        for group_params in by_mesh(p for p in params if p.grad is not None).values():
            torch.nn.utils.clip_grads_with_norm_(group_params, max_norm, norm, foreach=foreach)
    return norm
