"""The strategy contract: what every module in ``strategies/`` declares.

A strategy is a typed config (a dataclass whose fields are its knobs), a declaration of what
it needs and how it relates to other strategies, and a plain ``apply(ctx, cfg)`` function in
the style of torchtitan's ``apply_ac`` / ``apply_compile``. The graph reads the declarations,
the executor calls ``apply`` through one ordering function, so the planner and the executor
cannot disagree.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from autotune import schema
from autotune.contract.order import Phase
from autotune.errors import UserError

if TYPE_CHECKING:
    from autotune.contract.context import TrainContext
    from autotune.contract.mesh import ParallelDims
    from autotune.plan import Plan

MeshDim = Literal["dp", "tp", "pp", "ep"]
"""A dimension of the device mesh (autotune.contract.mesh): data, tensor or pipeline parallel."""

Part = Literal[
    "embedding", "head", "mlp", "linears", "norms", "loss", "attention", "blocks", "placement", "stages", "accumulation"
]
"""What a strategy may change or need final: a part of the model (the embedding, the head, each
block's MLP, the linears, the norms, the loss, the attention, the blocks themselves), where its
parameters live (``placement``: sharded over processes; ``stages``: cut into pipeline stages),
or the loop's ``accumulation`` (micro-batches per step)."""
PARTS: frozenset[str] = frozenset(get_args(Part))

DeviceName = str
"""A kind of device by its name in ``autotune.devices`` ("cpu", or an accelerator's)."""
ACCELERATOR = "accelerator"
"""A ``Strategy.left_out`` key standing for every kind of device but the CPU."""

ExportTarget = Literal["accelerate", "deepspeed"]
"""The launchers' configs that state a plan's strategies (``autotune export --to``). The other
targets, torchrun and Slurm, launch ``autotune run PLAN``, which applies the strategies itself:
no strategy is written into them."""
EXPORT_TARGETS: frozenset[str] = frozenset(get_args(ExportTarget))


class _Nothing(enum.Enum):
    """A one-member enum: the sentinel's type, which a type checker tells apart from an Exporter."""

    NOTHING_TO_SET = "nothing to set"


NOTHING_TO_SET = _Nothing.NOTHING_TO_SET
"""A strategy's export to a target whose config has nothing to say about it (``Strategy.exports``)."""

Exporter = Callable[[Any, "Plan"], dict[str, Any]]
"""A strategy's export to one target: (its typed config, the plan) -> the keys it sets in that
target's config (a fragment the export merges with the others'), or UserError for settings of
its own that the config cannot state (fp8's rowwise scales in an Accelerate config)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Knob:
    """One searchable setting of a strategy: a field of its config with a search range."""

    name: str
    """Field name in the strategy's config dataclass."""
    choices: tuple[Any, ...] = ()
    """Categorical values; empty for a numeric range."""
    low: float | None = None
    """Lower bound of a numeric range (inclusive)."""
    high: float | None = None
    """Upper bound of a numeric range (inclusive)."""
    log: bool = False
    """Sample the numeric range on a log scale."""
    integer: bool = False
    """The numeric range holds integers."""
    refine_only: tuple[Any, ...] = ()
    """Choices the main search never samples, too slow to try blind (compile's
    max-autotune-no-cudagraphs benchmarks every kernel for minutes): ``autotune.planning.refine.refine``
    tries them on the best trials only, each trial under a longer limit."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PriorFacts:
    """What a strategy's expert prior is chosen from (``Strategy.prior``)."""

    device: DeviceName
    """Where the search runs."""
    cores: int
    """Usable cores of this machine."""
    processes: int
    """Processes the prior's trial runs over."""
    excluded: dict[str, dict[Any, str]] = dataclasses.field(default_factory=dict)
    """Choices of the strategy's categorical knobs that cannot run here: knob -> {value: reason}
    (``StrategyGraph.excluded_choices``)."""
    d_model: int | None = None
    """Width of the model's residual stream (None: the workload has no shape)."""
    seq_len: int | None = None
    """Tokens per sample the workload trains on."""

    @property
    def accelerator(self) -> bool:
        """Whether the search runs on an accelerator (any kind but the CPU)."""
        return on_accelerator(self.device)


@dataclass(frozen=True, kw_only=True, slots=True)
class SearchFacts:
    """What a strategy's searched knobs are narrowed by (``Strategy.search_knobs``)."""

    cores: int
    """Usable cores of this machine."""
    seq_len: int
    """The workload's sequence length."""
    device: DeviceName = "cpu"
    """Where the search runs."""
    vocab_size: int | None = None
    """The workload's vocabulary (None: it has no shape)."""

    @property
    def accelerator(self) -> bool:
        """Whether the search runs on an accelerator (any kind but the CPU)."""
        return on_accelerator(self.device)


def on_accelerator(device: DeviceName) -> bool:
    """Whether ``device`` names an accelerator (any kind but the CPU)."""
    from autotune import devices

    return devices.get(device).accelerator


@dataclass(frozen=True, kw_only=True, slots=True)
class Prior:
    """How the expert prior (``autotune.planning.first_trials.expert_priors``) turns a strategy on."""

    knobs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Settings of its knobs by field name; the knobs not named take their defaults."""
    own_trial: bool = False
    """A trial of its own (with the other priors' settings, at the baseline micro-batch), enqueued
    before the trial of all the others, instead of a part of that trial. An approximate
    strategy's prior (``Strategy.exact`` False) is always apart from the exact ones: it is
    enqueued as the first exact trial of all the others plus itself, right after that trial,
    so that the study holds the exact configuration it is judged against (the quality guard)."""
    race: bool = False
    """A trial of its own: the first exact prior with this strategy's settings added, enqueued
    right after it, so that the study measures one implementation against the other on the same
    settings (triton_kernels' fused loss against compile's head and loss)."""
    races: tuple[dict[str, Any], ...] = ()
    """Other settings of its knobs, each raced against ``knobs``: a trial of the first exact prior
    with these settings instead, enqueued right after it (attention's FA4 against cuDNN's SDPA)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Needs:
    """What a strategy needs from the hardware and the workload."""

    accelerator: bool = False
    """Needs a device beside the host's CPU."""
    features: frozenset[str] = frozenset()
    """What the device must be able to do (names of ``autotune.devices.FEATURES``): "bf16" (bf16
    units on an accelerator; any CPU runs bf16 autocast), "fp8" (fp8 units on an accelerator; a
    CPU runs float8 matmuls in software), "graphs", "triton", ..."""
    min_compute_capability: tuple[int, int] | None = None
    """Lowest compute capability of the accelerator, e.g. (8, 0) for bf16 tensor cores."""
    compute_capability_majors: frozenset[int] = frozenset()
    """The compute-capability majors its kernels are built for, where not every later one is
    (FlashAttention-4: 9 and 10, Hopper and datacenter Blackwell); empty: any."""
    min_devices: int = 1
    """Fewest processes/devices the strategy makes sense with."""
    structure: frozenset[str] = frozenset()
    """Workload structure it relies on (see autotune.workloads)."""
    modules: tuple[str, ...] = ()
    """Python packages that must import (e.g. "deepspeed")."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Strategy:
    """The declaration of one optimization. Instances live in ``strategies/<name>.py``."""

    name: str
    """Unique name, as written in plans."""
    summary: str
    """One line for listings."""
    exact: bool
    """True if the model learns the same function up to precision; False if it changes what
    is learned (INT8/FP8, MoE, sparse attention): then it is opt-in and loss-checked."""
    config: type
    """Dataclass of the knobs; its defaults are the strategy's default settings."""
    apply: Callable[[TrainContext, Any], None] | None
    """Applies the strategy to the training context; None while not yet implemented."""
    phase: Phase
    """When it is applied (``autotune.contract.order``): phases run in their order, and within
    one, a strategy comes after those that change a part it ``reads``."""
    needs: Needs = Needs()
    """Hardware and workload requirements."""
    requires: frozenset[str] = frozenset()
    """Strategies that must be on too."""
    conflicts: frozenset[str] = frozenset()
    """Strategies that cannot be on together with this one."""
    changes: frozenset[Part] = frozenset()
    """Parts this strategy replaces, wraps or re-places (vocab padding: embedding and head)."""
    reads: frozenset[Part] = frozenset()
    """Parts this strategy needs in their final form: it is applied after every strategy that
    changes one of them, in its own phase or an earlier one (``autotune.contract.order``; the
    graph's "after" edges are derived from these two declarations and that order)."""
    takes_model: bool = False
    """Takes the model module itself (to cut it into stages, shard it, hand it to an engine),
    not its forward: a whole-model compile cannot run with it, whichever is applied first
    (compile's ``check_with`` reads this)."""
    compiles: bool = False
    """Applying it compiles the model's code (torch.compile: a minute or more on the first run of
    a shape, seconds once its kernels are in the cache), which decides how long a trial takes:
    the planner predicts a trial's and a confirmation's time from trials that compile as it does
    (``planning.summary.shortest_like``, ``planning.confirm.confirmation_seconds``)."""
    mesh_dim: MeshDim | None = None
    """The mesh dimension this strategy splits the run over (None: it runs in every process
    alike). A run of several processes needs one such strategy; tp and pp take their size
    from the config, dp takes the processes left over (autotune.contract.mesh.mesh_shape)."""
    degree_knobs: tuple[str, ...] = ("degree",)
    """For a tp or pp strategy: the config field holding its degree, then any field a search
    layout must set to the degree too for the layout to be legal (a pipeline's microbatches)."""
    check_mesh: Callable[[Any, ParallelDims, int | None], None] | None = None
    """Refuses (UserError) this strategy's settings that the mesh cannot take, given its config
    (typed, or a knob dict as the planner holds), the mesh's dims and the micro-batch size
    (None: not known yet)."""
    knobs: tuple[Knob, ...] = ()
    """Search ranges of the config's fields."""
    issue: str = ""
    """For a strategy not yet implemented: where its implementation is tracked."""
    check_with: Callable[[Chosen], None] | None = None
    """Refuses (UserError naming the rule) settings of other strategies that this one's
    settings cannot run with, given every chosen strategy's typed config by name and their
    declarations (:class:`Chosen`). Whole strategies that conflict are ``conflicts`` instead."""
    check_workload: Callable[[Any, Any], None] | None = None
    """Refuses (UserError) this strategy's settings that the workload cannot take, given its
    typed config and the Workload (a sliding window longer than the sequence)."""
    cost: Callable[[Any, Any], None] | None = None
    """The strategy's cost-model term: (its typed config, ``contract.cost.CostTerms``) -> None,
    changing what the core counts the step from (autocast, checkpointed blocks, a compiled
    model) and what it counted (experts added, state sharded); None: it changes nothing the
    cost model counts."""
    left_out: dict[DeviceName, str] = dataclasses.field(default_factory=dict, hash=False)
    """Searches on these kinds of device (``ACCELERATOR``: on any but the CPU) leave the strategy
    out, for the reason given: it runs there but never pays a trial (fp8 on a CPU is emulated)."""
    prior: Callable[[PriorFacts], Prior | None] | None = None
    """How the expert prior, the first trials after the baseline, turns the strategy on here
    (None from it, or no function: the prior leaves it off). A data-parallel strategy (``mesh_dim``
    "dp") with a prior is the layout the prior over several processes takes."""
    exports: dict[ExportTarget, Exporter | Literal[_Nothing.NOTHING_TO_SET]] = dataclasses.field(
        default_factory=dict, hash=False
    )
    """How the strategy is written into each launcher config that states a plan's strategies
    (``ExportTarget``): a function giving the keys it sets there, or NOTHING_TO_SET where that
    config has nothing to say about it and, without it, still describes the plan's training (an
    exact choice inside the step: a kernel, an implementation, a loader setting). A target it does
    not name cannot express it: ``autotune export`` refuses the plan, never drops the strategy.
    An approximate strategy is never NOTHING_TO_SET: a config without it trains another model."""
    search_knobs: Callable[[SearchFacts], tuple[Knob, ...] | str] | None = None
    """The knobs a search here samples, narrowed from ``knobs`` (any machine's, any workload's)
    to this machine and workload: threads up to its cores, windows below its sequence, no TF32
    on a CPU; or, where no setting would change anything here, the reason the search leaves
    the strategy out (a vocabulary already a multiple of every padding); None: ``knobs`` as
    declared."""

    @property
    def implemented(self) -> bool:
        return self.apply is not None

    def left_out_on(self, device: DeviceName) -> str | None:
        """Why a search on ``device`` leaves this strategy out (``left_out``); None: it does not."""
        if device in self.left_out:
            return self.left_out[device]
        return self.left_out.get(ACCELERATOR) if on_accelerator(device) else None

    def parse(self, knobs: dict[str, Any], where: str = "") -> Any:
        """Typed config from a plan's knob dict; unknown or ill-typed knobs name the field."""
        return schema.from_dict(self.config, knobs, where or f"{self.name}.knobs")

    def dump(self, cfg: Any) -> dict[str, Any]:
        return schema.to_dict(cfg)

    def default(self) -> Any:
        return self.config()


class Chosen(dict[str, Any]):
    """What ``Strategy.check_with`` is given: the chosen strategies' typed configs by name, and
    (:attr:`declared`) their declarations, so that a rule about the others reads what they
    declare, never their names (compile's whole-model scope refuses any strategy that
    ``takes_model``)."""

    def __init__(self, configs: Mapping[str, Any], declared: Mapping[str, Strategy]) -> None:
        super().__init__(configs)
        self.declared: Mapping[str, Strategy] = declared
        """Each chosen strategy's declaration, by name (the catalog's, or those being checked)."""


def check_knob_fields(strategy: Strategy) -> None:
    """Every knob names a config field, and a tp or pp strategy's degree knobs too (a
    catalog-load check)."""
    fields = {f.name for f in dataclasses.fields(strategy.config)}
    for knob in strategy.knobs:
        if knob.name not in fields:
            raise UserError(
                f"strategy {strategy.name}: knob {knob.name!r} is not a field of {strategy.config.__name__}"
            )
    for knob in strategy.knobs:
        for value in knob.refine_only:
            if value not in knob.choices:
                raise UserError(f"strategy {strategy.name}: refine-only {value!r} is not a choice of knob {knob.name}")
    if strategy.mesh_dim in ("tp", "pp"):
        for name in strategy.degree_knobs or ("",):
            if name not in fields:
                raise UserError(
                    f"strategy {strategy.name}: degree knob {name!r} is not a field of {strategy.config.__name__}"
                )


def check_exports(strategy: Strategy) -> None:
    """Every export names a target, and an approximate strategy has something to set wherever it
    exports (a catalog-load check)."""
    for target, how in strategy.exports.items():
        if target not in EXPORT_TARGETS:
            raise UserError(
                f"strategy {strategy.name}: export target {target!r} is not one of {', '.join(sorted(EXPORT_TARGETS))}"
            )
        if how is NOTHING_TO_SET and not strategy.exact:
            raise UserError(
                f"strategy {strategy.name} is approximate: {target} without it trains "
                f"another model; declare what it sets there, or no {target} export"
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class Facts:
    """What the needs of a strategy are checked against: the machine and the workload."""

    device: DeviceName = "cpu"
    """The kind of device the run trains on (``autotune.devices``): the CPU, or the accelerator found."""
    accelerators: int = 0
    """Devices of that kind the run can use (0 on the CPU)."""
    compute_capability: tuple[int, int] | None = None
    """Lowest compute capability among them."""
    gpu_name: str | None = None
    """Name of the first of them, for messages."""
    tpu_devices: int = 0
    """XLA devices through torch_xla (TPUs, or XLA's CPU backend)."""
    processes: int = 1
    """Processes the run may use (GPUs, or CPU processes when asked for)."""
    modules: frozenset[str] = frozenset()
    """The packages the strategies declare (:func:`declared_modules`) that import here."""
    structure: frozenset[str] = frozenset()
    """Structure the workload declares."""

    @classmethod
    def of(
        cls,
        profile: Any | None,
        workload: Any,
        *,
        processes: int | None = None,
        strategies: Iterable[Strategy] | None = None,
    ) -> Facts:
        """Facts from a HardwareProfile (None: a machine with no accelerator) and a Workload;
        the packages probed are those ``strategies`` (default: the catalog's) declare."""
        if strategies is None:
            from autotune.catalog import catalog

            strategies = catalog().values()
        from autotune import devices

        kind, found = devices.in_profile(profile)
        accelerators = found.count if kind.accelerator else 0
        tpu = profile.tpu.count if profile is not None and profile.tpu.present else 0
        return cls(
            device=kind.name,
            accelerators=accelerators,
            compute_capability=found.compute_capability,
            gpu_name=found.name if kind.accelerator else None,
            tpu_devices=tpu,
            processes=processes if processes is not None else max(1, accelerators, tpu),
            modules=frozenset(m for m in declared_modules(strategies) if _importable(m)),
            structure=frozenset(workload.structure),
        )


def declared_modules(strategies: Iterable[Strategy]) -> frozenset[str]:
    """Every package ``strategies`` may need: each one's ``needs.modules``, and those its
    config's ``needs()`` asks for at each choice of its categorical knobs, judged as
    ``StrategyGraph.excluded_choices`` judges them (the default config with that one knob
    set): triton_kernels' liger needs liger_kernel, its strategy only triton. A strategy
    bringing a new package needs no edit here."""
    out: set[str] = set()
    for strategy in strategies:
        out.update(strategy.needs.modules)
        if not hasattr(strategy.config, "needs"):
            continue
        default = strategy.default()
        out.update(default.needs().modules)
        for knob in strategy.knobs:
            for value in knob.choices:
                out.update(dataclasses.replace(default, **{knob.name: value}).needs().modules)
    return frozenset(out)


def _importable(module: str) -> bool:
    """Whether ``module`` would import, found without importing it (deepspeed takes seconds)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def unmet_needs(strategy: Strategy, facts: Facts) -> list[str]:
    """Why ``strategy`` cannot run here: one short reason per unmet need (empty: it can)."""
    from autotune import devices

    needs, why = strategy.needs, []
    kind = devices.get(facts.device)
    if kind.accelerator and not facts.accelerators:
        kind = devices.get(devices.CPU)
    found = devices.Found(count=facts.accelerators, name=facts.gpu_name, compute_capability=facts.compute_capability)
    have = kind.features(facts.compute_capability)
    if needs.accelerator and not kind.accelerator:
        why.append(_none_found(None))
    if needs.min_compute_capability and facts.compute_capability is not None:
        if facts.compute_capability < needs.min_compute_capability:
            want = ".".join(map(str, needs.min_compute_capability))
            have_cc = ".".join(map(str, facts.compute_capability))
            why.append(f"needs compute capability {want}+, {facts.gpu_name} has {have_cc}")
    majors = sorted(needs.compute_capability_majors)
    if majors and facts.compute_capability is not None and facts.compute_capability[0] not in majors:
        want = " or ".join(f"{m}.x" for m in majors)
        have_cc = ".".join(map(str, facts.compute_capability))
        why.append(f"needs compute capability {want}, {facts.gpu_name} has {have_cc}")
    for feature in sorted(needs.features - have):
        reason = kind.lacks(feature, found) if kind.accelerator else _none_found(feature)
        if reason not in why:  # "needs CUDA, none found" once, for all the features only CUDA has
            why.append(reason)
    if facts.processes < needs.min_devices:
        why.append(f"needs {needs.min_devices}+ processes, this run has {facts.processes}")
    missing = sorted(needs.structure - facts.structure)
    if missing:
        why.append(f"needs the workload to declare {', '.join(missing)}")
    for module in needs.modules:
        if module not in facts.modules:
            why.append(f"needs the {module} package, which does not import here")
    return why


def _none_found(feature: str | None) -> str:
    """Why a need of ``feature`` (None: of any accelerator) is unmet on the CPU: the kinds that
    have it, in their words ("needs CUDA, none found")."""
    from autotune import devices

    kinds = devices.needing(feature)
    if not kinds:
        return f"needs {devices.FEATURES.get(feature or '', feature)}, which no kind of device here has"
    return f"needs {' or '.join(d.words for d in kinds)}, none found"
