"""Process groups of multi-process runs: how they are started, joined, reduced over, left.

torchrun starts the processes (``autotune run`` and the trial runner call it for a plan with
``launch.nproc_per_node > 1``) and sets RANK, WORLD_SIZE and LOCAL_RANK in each. The
executor joins the default process group from those: NCCL on CUDA, one GPU per local rank;
gloo on the CPU. Every collective has a timeout, so a rank that hangs ends the group with an
error instead of holding the others forever; a rank that crashes ends it at once (torchrun
stops the other ranks when one exits with an error).
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from autotune import devices
from autotune.errors import UserError

TIMEOUT_ENV = "AUTOTUNE_DIST_TIMEOUT_S"
"""Environment variable overriding the collective timeout (seconds)."""
DEFAULT_TIMEOUT_S = 600.0
"""Longest wait of one collective: room for one rank compiling while the others wait."""

CHILD_ENV = {
    # NVLink SHARP (NVLS) and symmetric-memory multicast are left off: they need fabric
    # support that not every NVLink machine has, and fail at init where it is missing.
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
}
"""Set in every multi-process child unless the caller set them already."""


def env_world_size() -> int:
    """Processes in the run this process was started in (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for the processes of a multi-process run: ``base`` plus CHILD_ENV."""
    env = dict(os.environ if base is None else base)
    for key, value in CHILD_ENV.items():
        env.setdefault(key, value)
    return env


def torchrun_command(nproc: int, module: str, args: list[str], launch: Any = None) -> list[str]:
    """``python -m torch.distributed.run`` starting ``nproc`` processes of ``python -m module
    args`` on this node: standalone for one node, else joining the rendezvous of ``launch``
    (a plan's LaunchSpec): c10d at rdzv_endpoint, or, with a node_rank, the static one whose
    store node 0 serves at that endpoint (ranks then follow the node ranks)."""
    if launch is None or launch.nnodes == 1:
        where = ["--standalone"]
    elif launch.node_rank is None:  # c10d: ranks in the order the nodes arrive
        where = [
            f"--nnodes={launch.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={launch.rdzv_endpoint}",
            f"--rdzv-id={launch.rdzv_id}",
        ]
    else:  # static: node r holds ranks r*nproc.., node 0 serves the store at the endpoint
        host, _, port = launch.rdzv_endpoint.rpartition(":")
        where = [
            f"--nnodes={launch.nnodes}",
            f"--node-rank={launch.node_rank}",
            f"--master-addr={host}",
            f"--master-port={port}",
        ]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={nproc}", "-m", module, *args]


@dataclass(kw_only=True, slots=True)
class Group:
    """This process's place in the run."""

    rank: int
    """Rank in the default process group (0 when alone)."""
    world_size: int
    """Processes in the run."""
    device: torch.device
    """Where this rank trains."""
    owned: bool
    """This Group initialised the process group, so :func:`leave` destroys it."""


def timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))


def join(requested: str, expected_world: int) -> Group:
    """Join the run this process belongs to, on ``requested`` ("auto" or a device's name).

    Alone (no torchrun, no process group) this is rank 0 of 1. Under torchrun the default
    process group is initialised here unless it already is (then it is used as it is and
    left to its owner). ``expected_world`` is the plan's process count; a mismatch is a
    UserError naming how to start the plan.
    """
    world = dist.get_world_size() if dist.is_initialized() else env_world_size()
    if world != expected_world:
        if world == 1:
            raise UserError(
                f"the plan runs {expected_world} processes; "
                "start it with `autotune run`, which launches them with torchrun"
            )
        raise UserError(
            f"the plan runs {expected_world} process{'es' if expected_world > 1 else ''}, but this run has {world}"
        )
    device = pick_device(requested, int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else None)
    if world == 1:
        return Group(rank=0, world_size=1, device=device, owned=False)
    if dist.is_initialized():
        return Group(rank=dist.get_rank(), world_size=world, device=device, owned=False)
    kind = devices.of(device)
    kind.make_current(device)
    dist.init_process_group(kind.backend, timeout=timeout(), **kind.process_group_options(device))
    # Everyone has arrived: what a rank checks before joining (e.g. that the run directory
    # is free) is not yet changed by another rank.
    dist.barrier()
    return Group(rank=dist.get_rank(), world_size=world, device=device, owned=True)


def pick_device(requested: str = "auto", local_rank: int | None = None) -> torch.device:
    """The device of a plan's ``launch.device``: the accelerator asked for, or the one here
    for "auto" (the one of ``local_rank`` in a multi-process run, else the current one), else
    the CPU (``autotune.devices.resolve``)."""
    return devices.resolve(requested).torch_device(local_rank)


def leave(group: Group, *, clean: bool) -> None:
    """Destroy the process group if ``group`` owns it. After a clean run every rank waits for
    the others first (FSDP2 on gloo can abort at exit otherwise); after a failure it does
    not wait: the other ranks may never arrive, and torchrun ends them."""
    if not group.owned or not dist.is_initialized():
        return
    group.owned = False
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def reduce_flush(losses: torch.Tensor, stop: bool, world_size: int) -> tuple[torch.Tensor, bool]:
    """The mean of ``losses`` over the ranks and whether any rank asks to ``stop``, in one
    all-reduce (the executor's only collective of its own, once per log flush)."""
    if world_size == 1:
        return losses, stop
    payload = torch.cat([losses.float(), torch.tensor([float(stop)], device=losses.device)])
    dist.all_reduce(payload, op=dist.ReduceOp.SUM)
    return payload[:-1] / world_size, bool(payload[-1].item() > 0)


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
