"""Plan files: a versioned JSON document saying how to train a workload on a machine.

A plan is data. It is validated completely on load (unknown keys, wrong types, unknown
strategies, knobs and workloads are errors that name the field) and saved atomically.

Format, version 1::

    {
      "schema_version": 1,
      "workload":   {"name": "phase8-small", "overrides": {}},
      "hardware":   {"fingerprint": "…", "summary": {…}},
      "strategies": [{"name": "precision", "knobs": {"dtype": "bf16"}}, …],
      "launch":     {"nproc_per_node": 1, "nnodes": 1, …},
      "train":      {"micro_batch_size": 32, "steps": 1000, "lr": 0.0006, …},
      "measured":   {"tokens_per_s": …, "step_time_s": …, "mfu": …, "peak_memory_bytes": …,
                     "loss_start": …, "loss_end": …, "status": "ok"} | null,
      "baseline":   {… the plain run measured in the same search …} | null,
      "loss_check": {"steps": …, "loss_end": …, "reference_loss_end": …, "passed": …} | null,
      "comparison": {"rounds": …, "speedup": …, "noise": …, "beats_baseline": …, "verdict": …} | null,
      "quality_guard": {"reference_trial": …, "steps": …, "candidate": {…}, "exact": {…}, "passed": …, …} | null,
      "provenance": {"autotune_version": …, "torch_version": …, "study": …, "trial": …,
                     "created_at": …, "command": …},
      "data_identity": "sha256:…" | null,        (optional)
      "adapted_from": {"plan": …, "how": …, "hardware": …, "measured": …} | null   (optional)
    }
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from autotune import __version__, catalog, devices, schema
from autotune.contract import order
from autotune.errors import SchemaError, UserError

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = (1,)
ACCUMULATION = order.ACCUMULATION
"""The strategy whose ``steps`` knob is the accumulation count (``autotune.contract.order``
names it, the one module that names strategies)."""


@dataclass(kw_only=True, slots=True)
class WorkloadSpec:
    name: str
    """A preset (tiny, phase8-small, gpt2-124m, gpt-1b) or ``package.module:factory``."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Preset config fields to change (e.g. {"n_layers": 4})."""


@dataclass(kw_only=True, slots=True)
class HardwareSpec:
    fingerprint: str | None = None
    """Fingerprint of the machine the plan was made on (autotune profile); None: any."""
    summary: dict[str, Any] = field(default_factory=dict)
    """Readable summary of that machine (GPU name and count, CPU)."""


@dataclass(kw_only=True, slots=True)
class StrategySpec:
    name: str
    """A strategy of the catalog."""
    knobs: dict[str, Any] = field(default_factory=dict)
    """Its settings; missing ones take the strategy's defaults."""


MAX_PROCESSES_PER_NODE = 1024
"""Processes on one node no machine runs more of (a GPU each, or a few a CPU core)."""
MAX_NODES = 65536
"""Nodes beyond any cluster."""


DeviceChoice = Literal[(devices.AUTO, *devices.names())]  # type: ignore[valid-type]
"""A plan's ``launch.device``: "auto" or the name of a kind of device (the registry's, so a new
kind is a plan's choice without an edit here)."""


@dataclass(kw_only=True, slots=True)
class LaunchSpec:
    nproc_per_node: int = 1
    """Processes per node (one per GPU)."""
    nnodes: int = 1
    """Nodes (machines) in the run."""
    device: DeviceChoice = "auto"
    """Where to train: a device's name (``autotune.devices``), or auto: the accelerator present, else the CPU."""
    rdzv_endpoint: str | None = None
    """host:port of torchrun's c10d rendezvous, reachable from every node (one of them runs
    it); needed when nnodes > 1."""
    rdzv_id: str = "autotune"
    """Rendezvous id: the nodes of one run share it (another run needs another id)."""
    node_rank: int | None = None
    """This node's rank, 0..nnodes-1 (`autotune run --node-rank` sets it per node): a static
    rendezvous whose store node 0 serves at rdzv_endpoint. None: the c10d rendezvous at
    rdzv_endpoint ranks the nodes as they arrive."""

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ValueError("nproc_per_node and nnodes must be at least 1")
        # Bounds a plan can mean (this machine's cores and GPUs are checked before a run: autotune.limits).
        if self.nproc_per_node > MAX_PROCESSES_PER_NODE or self.nnodes > MAX_NODES:
            raise ValueError(
                f"nproc_per_node must be at most {MAX_PROCESSES_PER_NODE} and nnodes at most {MAX_NODES}, "
                f"got {self.nproc_per_node} and {self.nnodes}"
            )
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"a run of {self.nnodes} nodes needs rdzv_endpoint (host:port of the rendezvous)")
        if self.rdzv_endpoint is not None:
            host_port(self.rdzv_endpoint)
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} is not in 0..{self.nnodes - 1}")


_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
"""A DNS name (RFC 1123 labels), which an IPv4 address also is."""


def host_port(endpoint: str) -> tuple[str, int]:
    """(host, port) of ``host:port``, the host a DNS name, an IPv4 address or a bracketed IPv6
    one (``[::1]:29500``, returned without its brackets), the port in 1..65535; ValueError
    otherwise. Launchers and batch scripts take the endpoint as it is, so nothing else gets by."""
    host, _, port = endpoint.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        try:
            host = str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            host = ""
    elif not (len(host) <= 253 and _HOSTNAME.fullmatch(host)):
        host = ""
    if not host or not (len(port) <= 5 and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(
            f"rdzv_endpoint must be host:port (a DNS name, IPv4 or [IPv6] address, port 1-65535), got {endpoint!r}"
        )
    return host, int(port)


MAX_MICRO_BATCH = 65536
"""Samples per micro-batch no device holds more of (a larger one is a typo, not a plan)."""
MAX_STEPS = 10**9
"""Optimizer steps beyond any run's horizon."""
MAX_EVAL_BATCHES = 65536
"""Validation micro-batches an evaluation no run needs more of (all of them stay in memory for
the whole run: ``autotune.limits`` counts them against the device's)."""
_TRAIN_FLOATS = (
    # name, low, high, low open, high open: the legal interval of each float setting.
    ("lr", 0.0, 1.0, True, False),
    ("min_lr_ratio", 0.0, 1.0, False, False),
    ("weight_decay", 0.0, 10.0, False, False),
    ("beta1", 0.0, 1.0, False, True),
    ("beta2", 0.0, 1.0, False, True),
    ("grad_clip", 0.0, 1e6, False, False),
)


@dataclass(kw_only=True, slots=True)
class TrainSpec:
    micro_batch_size: int
    """Samples per micro-batch per process."""
    steps: int = 1000
    """Optimizer steps of a full run; also the horizon of the cosine schedule."""
    lr: float = 6e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW weight decay, on matrices only (not norms or biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""
    seed: int = 0
    """Seeds the initialisation and the data order."""
    data: str = "default"
    """"default" (corpus built from text on this machine) or a directory from `autotune data prepare`."""
    random_tokens: bool = False
    """Train on random tokens (throughput-only runs; the loss means nothing)."""
    eval_interval: int = 100
    """Steps between validation-loss evaluations; 0 turns them off."""
    eval_batches: int = 8
    """Validation micro-batches per evaluation."""
    checkpoint_interval: int = 100
    """Steps between checkpoints; 0 turns them off."""
    log_interval: int = 10
    """Steps between log flushes (each flush waits for the device once)."""

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "steps", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("warmup_steps", "eval_interval", "eval_batches", "checkpoint_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.eval_interval > 0 and self.eval_batches < 1:
            raise ValueError("eval_batches must be at least 1 when eval_interval is on")
        # Bounds a plan can mean: beyond them the run hangs, overflows or trains nothing.
        if self.micro_batch_size > MAX_MICRO_BATCH:
            raise ValueError(f"micro_batch_size must be at most {MAX_MICRO_BATCH}, got {self.micro_batch_size}")
        if self.steps > MAX_STEPS:
            raise ValueError(f"steps must be at most {MAX_STEPS}, got {self.steps}")
        if self.eval_batches > MAX_EVAL_BATCHES:
            raise ValueError(f"eval_batches must be at most {MAX_EVAL_BATCHES}, got {self.eval_batches}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in 0..2**32-1, got {self.seed}")
        for name, low, high, low_open, high_open in _TRAIN_FLOATS:
            value = getattr(self, name)
            if not (
                math.isfinite(value)
                and (low < value if low_open else low <= value)
                and (value < high if high_open else value <= high)
            ):
                raise ValueError(
                    f"{name} must be in {'(' if low_open else '['}{low:g}, "
                    f"{high:g}{')' if high_open else ']'}, got {value!r}"
                )


@dataclass(kw_only=True, slots=True)
class Figures:
    status: Literal["ok", "oom", "nan", "timeout", "crash", "unsupported", "pruned"]
    """How the measured run ended."""
    tokens_per_s: float | None = None
    """Tokens of the global batch trained on per second, after warm-up."""
    step_time_s: float | None = None
    """Median optimizer-step time."""
    mfu: float | None = None
    """Model FLOPs utilisation against the peak named in mfu_peak_source."""
    mfu_peak_source: str | None = None
    """Where the peak FLOP/s came from: "measured" (profile) or "datasheet"."""
    peak_memory_bytes: int | None = None
    """Peak allocated device memory per process."""
    loss_start: float | None = None
    """Training loss at the first step."""
    loss_end: float | None = None
    """Training loss at the last step."""
    losses: list[float] | None = None
    """Training loss of every optimizer step, warm-up included (None: not recorded), so that
    two runs of one recipe compare at equal steps whatever their lengths."""
    samples: list[float] | None = None
    """Tokens/s of each confirmation run (tokens_per_s is their median); None: one run."""
    spread: float | None = None
    """Relative half-range of the samples, (max - min) / 2 / median; None: one run."""
    step_times: list[float] | None = None
    """Wall seconds of each timed optimizer step, in order (the last ``len(step_times)`` of
    ``losses``: the warm-up's steps are not timed); None: not recorded."""
    metrics: dict[str, float] | None = None
    """The strategies' step metrics, means over the timed steps (``moe_dropped``: the fraction
    of routed choices over an expert's capacity); None: no strategy reports one."""
    compile_s: float | None = None
    """Seconds the device's own compiler took before the timed steps (XLA: the step's graph);
    None where the device does not compile its steps (``Device.compilations``)."""


@dataclass(kw_only=True, slots=True)
class LossCheck:
    """The plan's loss against a plain run (no strategies) on the same batches."""

    steps: int
    """Optimizer steps compared: both runs trained at least these, on the same batches."""
    loss_start: float
    """The plan's first training loss."""
    loss_end: float
    """The plan's training loss at step ``steps``."""
    reference_loss_start: float
    """The plain run's first training loss."""
    reference_loss_end: float
    """The plain run's training loss at step ``steps``."""
    tolerance: float
    """Largest relative difference of the losses at step ``steps`` that passes."""
    passed: bool
    """|loss_end / reference_loss_end - 1| <= tolerance (exact plans); loss_end /
    reference_loss_end - 1 <= tolerance (approximate ones: learning better always passes)."""


@dataclass(kw_only=True, slots=True)
class LossCurve:
    """One run of the quality guard: its training loss, summarised, and its time-to-loss."""

    start: float
    """Loss at the first step."""
    end: float
    """Loss at the last step compared."""
    tail_mean: float
    """Mean loss over the last 10% of the steps compared (at least one step)."""
    at_fractions: list[float]
    """Smoothed loss (trailing mean over the tail's length) at 25%, 50% and 75% of the steps."""
    wall_s: float
    """Wall seconds of the timed steps compared (the warm-up, compilation included, is not)."""
    time_to_loss_s: float | None
    """Wall seconds from the first timed step until the smoothed loss first reached the guard's
    ``target_loss``; None: it never did."""


@dataclass(kw_only=True, slots=True)
class QualityGuard:
    """An approximate plan against the study's best exact configuration, both trained for the
    same optimizer steps on the same real-text batches (the loader does not depend on how the
    global batch is split)."""

    reference_trial: int
    """The study's trial whose exact configuration was run beside the plan."""
    steps: int
    """Optimizer steps both trained and compared (warm-up included)."""
    candidate: LossCurve
    """The approximate plan's run."""
    exact: LossCurve
    """The exact configuration's run."""
    target_loss: float
    """The exact run's final smoothed loss (its ``tail_mean``): what time-to-loss is the time to."""
    tolerance: float
    """--quality-tolerance: how much higher (relative) the candidate's tail mean may be."""
    passed: bool
    """candidate.tail_mean / exact.tail_mean - 1 <= tolerance (learning better always passes)."""
    time_to_loss_ratio: float | None
    """exact.time_to_loss_s / candidate.time_to_loss_s: above 1 the plan reaches the exact run's
    loss sooner; None when it never does."""


@dataclass(kw_only=True, slots=True)
class Comparison:
    """The plan against the baseline, run interleaved (plan, baseline, plan, ...) so that both
    see the same conditions; the figures are the medians of ``measured`` and ``baseline``."""

    rounds: int
    """Rounds of one plan run and one baseline run."""
    speedup: float
    """Median plan tokens/s over median baseline tokens/s."""
    noise: float
    """Relative noise of that ratio: the plan's spread plus the baseline's."""
    beats_baseline: bool
    """speedup - 1 > noise, and the plan is not the baseline itself."""
    verdict: str
    """One line saying so, as the summary prints it."""
    load: list[float] | None = None
    """The machine's 1-minute load average when the confirmation began and when it ended (the
    planner's own runs included: about one a busy core)."""
    cores: int | None = None
    """Cores the planner could use, to read ``load`` against."""
    too_busy: bool = False
    """The runs' spread stayed above the planner's limit (``planning.confirm.BUSY_SPREAD``) after its
    extra rounds: the machine was too busy to measure, and no speed-up is claimed."""


@dataclass(kw_only=True, slots=True)
class Provenance:
    autotune_version: str = __version__
    torch_version: str = ""
    study: str | None = None
    """Optuna study the plan came from, if any."""
    trial: int | None = None
    """Trial number in that study."""
    created_at: str = ""
    """UTC time of writing, ISO 8601."""
    command: str | None = None
    """The command that made the plan."""


@dataclass(kw_only=True, slots=True)
class Adaptation:
    """Where an adapted plan (``autotune run --adapt``) came from, and what it measured there."""

    plan: str
    """Path of the original plan."""
    how: Literal["validated", "replanned"]
    """validated: the original plan, measured again here; replanned: a new search here."""
    hardware: HardwareSpec
    """The machine the original plan was made on."""
    measured: Figures | None = None
    """The original plan's figures, measured on that machine (the new ones are ``measured``)."""
    data_identity: str | None = None
    """The original plan's data identity."""


@dataclass(kw_only=True, slots=True)
class Plan:
    schema_version: int
    workload: WorkloadSpec
    train: TrainSpec
    strategies: list[StrategySpec] = field(default_factory=list)
    hardware: HardwareSpec = field(default_factory=HardwareSpec)
    launch: LaunchSpec = field(default_factory=LaunchSpec)
    measured: Figures | None = None
    baseline: Figures | None = None
    loss_check: LossCheck | None = None
    comparison: Comparison | None = None
    quality_guard: QualityGuard | None = None
    provenance: Provenance = field(default_factory=Provenance)
    data_identity: str | None = None
    """"sha256:<hex>" of the data the figures were measured on (``autotune.data.data_identity``:
    token files, tokenizer, recipe); None: not recorded (random tokens, or an older plan)."""
    adapted_from: Adaptation | None = None
    """Set in a plan written by ``autotune run --adapt``: the original plan and its figures."""

    def strategy_configs(self) -> dict[str, Any]:
        """Strategy name -> typed config, validated against the catalog."""
        out: dict[str, Any] = {}
        for i, spec in enumerate(self.strategies):
            where = f"strategies[{i}]"
            try:
                strategy = catalog.get(spec.name)
            except UserError as e:
                raise SchemaError(f"{where}.name", str(e)) from None
            if spec.name in out:
                raise SchemaError(f"{where}.name", f"strategy {spec.name} listed twice")
            out[spec.name] = strategy.parse(spec.knobs, f"{where}.knobs")
        return out

    def grad_accum(self) -> int:
        """Micro-batches per optimizer step (1 without the grad_accum strategy)."""
        configs = self.strategy_configs()
        return configs[ACCUMULATION].steps if ACCUMULATION in configs else 1

    def global_batch(self) -> int:
        """Samples per optimizer step over all processes: micro-batch x accumulation x the
        data-parallel processes (dp of the mesh: tensor- and pipeline-parallel ranks share a batch)."""
        from autotune.contract.mesh import mesh_shape

        dp, _, _ = mesh_shape(self.launch.nproc_per_node * self.launch.nnodes, self.strategy_configs())
        return self.train.micro_batch_size * self.grad_accum() * dp

    def to_dict(self) -> dict[str, Any]:
        return schema.to_dict(self)

    def save(self, path: str | os.PathLike) -> None:
        schema.write_json_atomic(path, self.to_dict())


def from_dict(data: Any) -> Plan:
    """Validate a parsed plan completely: schema, version, strategies and knobs."""
    if isinstance(data, dict) and "schema_version" in data:
        version = data["schema_version"]
        if version not in SUPPORTED_VERSIONS:
            raise SchemaError(
                "schema_version", f"unsupported version {version!r} (this autotune reads {SUPPORTED_VERSIONS})"
            )
    plan = schema.from_dict(Plan, data)
    plan.strategy_configs()
    return plan


def load(path: str | os.PathLike) -> Plan:
    """Load and validate a plan file; every problem is a one-line UserError."""
    data = schema.read_json(path, "plan")
    try:
        return from_dict(data)
    except SchemaError as e:
        raise UserError(f"plan {path}: {e}") from None


def other_machine(plan: Plan) -> str | None:
    """One line naming how this machine differs from the one ``plan`` was made on (None: the
    same fingerprint, or a plan for any machine): `autotune run` refuses such a plan unless
    ``--adapt``, because its figures and its legality were established there."""
    if plan.hardware.fingerprint is None:
        return None
    from autotune import hardware

    here = hardware.current_summary()
    if here["fingerprint"] == plan.hardware.fingerprint:
        return None
    diffs = hardware.summary_differences(plan.hardware.summary, here)
    what = "; ".join(diffs) if diffs else "same GPUs, links, CUDA major and CPU; the driver or CPU details differ"
    fingerprints = f"fingerprint {plan.hardware.fingerprint}, here {here['fingerprint']}"
    return f"the plan was made on another machine ({fingerprints}): {what}"


def other_data(plan: Plan, identity: str | None) -> str | None:
    """One line if ``plan`` was measured on other data than ``identity`` (None: the same, or
    either is unknown): its figures and losses do not compare with this run's."""
    if plan.data_identity is None or identity is None or identity == plan.data_identity:
        return None
    return (
        f"the plan was measured on other data ({plan.data_identity[:19]}…) than this run's ({identity[:19]}…): "
        "a different text, its losses and figures do not compare"
    )


def new(
    workload: str,
    *,
    train: TrainSpec,
    strategies: dict[str, dict[str, Any]] | None = None,
    overrides: dict[str, Any] | None = None,
    command: str | None = None,
) -> Plan:
    import torch

    plan = Plan(
        schema_version=SCHEMA_VERSION,
        workload=WorkloadSpec(name=workload, overrides=dict(overrides or {})),
        train=train,
        strategies=[StrategySpec(name=n, knobs=dict(k)) for n, k in (strategies or {}).items()],
        provenance=Provenance(torch_version=torch.__version__, created_at=utc_now(), command=command),
    )
    plan.strategy_configs()
    return plan


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
