"""The device mesh of a multi-process run: its processes factor as dp × tp × pp.

Each strategy declares the dim it splits (``Strategy.mesh_dim``): tp and pp are the degrees
of the chosen strategies of those dims (``tensor_parallel.degree``, ``pipeline_parallel.degree``;
1 when none is on); the processes left over form the data-parallel dimension, dp = world /
(tp · pp), shared by the chosen dp strategy (ddp, fsdp2, zero).
:func:`mesh_shape` checks a plan's degrees on the CPU, before anything is launched
(``autotune.validate.plan`` calls it for ``autotune run``, the planner and the executor; the
planner's space and the cost model take the mesh's shape from it), and names the rule a bad
plan breaks in one line. :func:`build_mesh` then makes the torch
DeviceMesh in every process, laid out as torchtitan's ``ParallelDims`` does: dims ("pp", "dp",
"tp") from the outside in, so that the ranks of one tensor-parallel group are neighbours (one
node, NVLink) and pipeline stages, which exchange the least, are farthest apart. Only dims of
size > 1 are made (torchtitan does the same); ``mesh[name]`` is a dim's sub-mesh.

Expert parallelism (``ep``, moe's ``ep`` knob) is a sub-dimension of dp, not a dim of its own:
the ep processes of one group are consecutive dp ranks, each with its own batch, splitting
each MoE layer's experts between them (:func:`expert_groups`); what ep needs of the other dims
(it divides dp, no tp or pp, ddp's replicas) is moe's ``check_mesh``.

The data loader shards by the dp rank and size, never the global rank: the tp ranks of one
dp group train on the same batch, and so do the stages of one pipeline (the first reads its
inputs, the last its targets).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autotune.errors import UserError

if TYPE_CHECKING:
    from autotune.contract.strategy import Strategy


def _catalog(strategies: Mapping[str, Strategy] | None) -> Mapping[str, Strategy]:
    from autotune.catalog import catalog

    return catalog() if strategies is None else strategies


def data_parallel(strategies: Mapping[str, Strategy] | None = None) -> tuple[str, ...]:
    """Strategies that share the batch over the dp dimension (``mesh_dim`` "dp"), by name."""
    return tuple(name for name, s in sorted(_catalog(strategies).items()) if s.mesh_dim == "dp")


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelDims:
    """The sizes of the mesh's dims, and this process's place in each."""

    dp: int = 1
    """Data-parallel replicas (or shard groups): processes that train on different batches."""
    tp: int = 1
    """Tensor-parallel degree: processes that split each block's heads and MLP width."""
    pp: int = 1
    """Pipeline stages."""
    ep: int = 1
    """Expert-parallel degree, inside dp: consecutive dp ranks that split the experts."""
    dp_strategy: str = ""
    """The chosen strategy sharing the batch over dp (ddp, fsdp2, zero; "" for none), for the
    strategies' ``check_mesh`` (moe's experts need ddp's replicas)."""

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp, dp, tp) coordinates of global ``rank`` (tp fastest, as the mesh is laid out)."""
        return rank // (self.dp * self.tp), rank // self.tp % self.dp, rank % self.tp


def expert_groups(dp: int, ep: int) -> tuple[list[list[int]], list[list[int]]]:
    """(ep groups, replica groups) of ``dp`` data-parallel ranks: ep groups are consecutive
    ranks (group g: g·ep .. g·ep + ep - 1, which share their tokens with each other's experts);
    a replica group holds the ranks of one ep index, which hold the same experts."""
    if ep < 1 or dp % ep:
        raise UserError(f"ep {ep} does not divide the {dp} data-parallel processes")
    return [list(range(g * ep, (g + 1) * ep)) for g in range(dp // ep)], [list(range(i, dp, ep)) for i in range(ep)]


def _expert_degree(chosen: Mapping[str, Any], strategies: Mapping[str, Strategy]) -> int:
    """The ``ep`` setting of the chosen strategy that has one (moe); 1 for none."""
    import dataclasses

    for name in sorted(chosen):
        strategy = strategies.get(name)
        if strategy is not None and "ep" in {f.name for f in dataclasses.fields(strategy.config)}:
            return int(setting(chosen[name], "ep", getattr(strategy.default(), "ep")))
    return 1


def setting(cfg: Any, name: str, default: Any) -> Any:
    """A knob of a typed config or of a plain knob dict (as the planner may hold)."""
    if cfg is None:
        return default
    return cfg.get(name, default) if isinstance(cfg, Mapping) else getattr(cfg, name, default)


def _conflict(a: Strategy, b: Strategy) -> bool:
    return a.name in b.conflicts or b.name in a.conflicts


def _splitter(dim: str, chosen: Mapping[str, Any], strategies: Mapping[str, Strategy]) -> tuple[str, int]:
    """The chosen strategy splitting ``dim`` (tp or pp) and its degree; ("", 1) for none."""
    names = [name for name, s in sorted(strategies.items()) if s.mesh_dim == dim and name in chosen]
    if len(names) > 1:
        raise UserError(f"{names[0]} and {names[1]} both split the {dim} dimension of the mesh: choose one")
    if not names:
        return "", 1
    strategy = strategies[names[0]]
    knob = strategy.degree_knobs[0]
    return names[0], int(setting(chosen[names[0]], knob, getattr(strategy.default(), knob)))


def mesh_shape(
    world: int,
    chosen: Mapping[str, Any],
    *,
    workload: Any = None,
    micro_batch_size: int | None = None,
    strategies: Mapping[str, Strategy] | None = None,
) -> tuple[int, int, int]:
    """(dp, tp, pp) of ``world`` processes running the strategies ``chosen`` (name -> typed
    config or knob dict). Raises a one-line UserError naming the broken rule.

    ``workload`` (a Workload, or its ModelShape) adds the checks against the model's shape,
    whatever the model (a GPT preset, hf:, a user's model whose shape was read; none where its
    ``shape`` is None); ``micro_batch_size`` the chosen strategies' own mesh checks
    (``Strategy.check_mesh``: the pipeline's micro-batch split, moe's expert parallelism).
    ``strategies`` defaults to the catalog: who splits which dim is each strategy's ``mesh_dim``.
    """
    strategies = _catalog(strategies)
    tp_name, tp = _splitter("tp", chosen, strategies)
    pp_name, pp = _splitter("pp", chosen, strategies)
    if world % (tp * pp):
        raise UserError(f"tp {tp} × pp {pp} = {tp * pp} does not divide {world} processes")
    dp = world // (tp * pp)
    wrappers = [name for name in data_parallel(strategies) if name in chosen]
    if dp > 1 and pp > 1:
        raise UserError(
            f"pp {pp} × tp {tp} leaves {dp} data-parallel groups of {world} processes: "
            f"{pp_name} takes the whole run (degree {world // tp})"
        )
    if dp > 1 and (tp > 1 or pp > 1) and not wrappers:
        # The dp strategies that conflict with none chosen (fsdp2 next to tensor parallel).
        others = [strategies[name] for name in (tp_name, pp_name) if name]
        fits = [
            name for name in data_parallel(strategies) if not any(_conflict(strategies[name], o) for o in others)
        ] or list(data_parallel(strategies))
        raise UserError(
            f"tp {tp} × pp {pp} leaves {dp} data-parallel groups of {world} processes: "
            f"add {' or '.join(fits)}, or make tp × pp = {world}"
        )
    if wrappers and dp == 1 and world > 1:
        raise UserError(
            f"{wrappers[0]} has a data-parallel group of 1 process: tp {tp} × pp {pp} takes all {world} processes"
        )
    shape = getattr(workload, "shape", workload)
    if shape is not None:
        # A shape read off a model without heads (a user's, found by the generic adapter) has 0.
        if tp > 1 and shape.n_heads % tp:
            raise UserError(f"{tp_name} degree {tp} does not divide the {shape.n_heads} heads")
        if tp > 1 and shape.n_kv_heads % tp:
            raise UserError(f"{tp_name} degree {tp} does not divide the {shape.n_kv_heads} kv heads")
        if tp > 1 and shape.d_ff % tp:
            raise UserError(f"{tp_name} degree {tp} does not divide the MLP width {shape.d_ff}")
        if pp > 1 and shape.n_layers < pp:
            raise UserError(f"{pp_name} degree {pp} exceeds the {shape.n_layers} blocks (a stage needs one at least)")
    dims = ParallelDims(
        dp=dp, tp=tp, pp=pp, ep=_expert_degree(chosen, strategies), dp_strategy=wrappers[0] if wrappers else ""
    )
    for name, strategy in sorted(strategies.items()):
        if name in chosen and strategy.check_mesh is not None:
            strategy.check_mesh(chosen[name], dims, micro_batch_size)
    return dp, tp, pp


def build_mesh(device_type: str, dims: ParallelDims) -> Any:
    """The DeviceMesh of ``dims`` over the default process group, dims ("pp", "dp", "tp") of
    size > 1 only; None for a run of one process."""
    if dims.world == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    names = tuple(name for name in ("pp", "dp", "tp") if getattr(dims, name) > 1)
    return init_device_mesh(device_type, tuple(getattr(dims, name) for name in names), mesh_dim_names=names)


def sub_mesh(mesh: Any, name: str) -> Any:
    """The sub-mesh of dim ``name``, None when the mesh has no such dim (size 1)."""
    if mesh is None or name not in (mesh.mesh_dim_names or ()):
        return None
    return mesh[name]
