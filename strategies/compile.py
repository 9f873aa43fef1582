"""torch.compile: the whole model, or block by block (faster to compile, same kernels inside
a block). Modes: default, max-autotune-no-cudagraphs, reduce-overhead (CUDA graphs).
Inductor fuses and reorders the same operations, so the maths is the plain model's up to
the order of floating-point reductions: an exact strategy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from autotune import devices
from autotune.contract.order import ACCUMULATION
from autotune.contract.strategy import NOTHING_TO_SET, Chosen, Knob, Needs, Prior, PriorFacts, Strategy
from autotune.errors import UserError

if TYPE_CHECKING:
    from autotune.contract.context import TrainContext
    from autotune.plan import Plan


@dataclass(kw_only=True, slots=True)
class CompileConfig:
    mode: Literal["default", "max-autotune-no-cudagraphs", "reduce-overhead"] = "default"
    """Inductor mode; reduce-overhead captures CUDA graphs."""
    scope: Literal["model", "blocks"] = "model"
    """Compile the whole forward (loss included) or each transformer block separately."""
    fullgraph: bool = False
    """Fail rather than fall back to eager at a graph break (for checking a model)."""

    def needs(self) -> Needs:
        """Inductor, on a device it generates kernels for (not XLA, which compiles the step itself);
        CUDA graphs need a device that captures graphs; compiling block by block needs the list of blocks."""
        return Needs(
            features=frozenset({"inductor", "graphs"}) if self.mode == "reduce-overhead" else frozenset({"inductor"}),
            structure=frozenset({"blocks"}) if self.scope == "blocks" else frozenset(),
        )


def apply_compile(ctx: TrainContext, cfg: CompileConfig) -> None:
    import torch

    from autotune.workloads.adapter import adapter_for

    ctx.check_needs(STRATEGY, cfg, "use mode default, or scope model for a model without blocks")
    if cfg.scope == "blocks":
        # Per-block: compile each block in place (Module.compile keeps the state-dict keys),
        # so wrappers applied later (FSDP) and activation checkpointing applied earlier both
        # see the compiled blocks.
        for block in adapter_for(ctx.model).blocks():
            block.compile(mode=cfg.mode, fullgraph=cfg.fullgraph)
    else:
        # Recorded so that a wrapper applied later (DDP) compiles around itself instead.
        ctx.compile_options = {"mode": cfg.mode, "fullgraph": cfg.fullgraph}
        ctx.forward = torch.compile(ctx.forward, **ctx.compile_options)
    if cfg.mode == "reduce-overhead":
        ctx.forward = _GraphStep(ctx.forward, devices.of(ctx.device))
    ctx.notes.append(f"compile {cfg.scope} mode={cfg.mode}")


class _GraphStep:
    """Calls the forward as one step of CUDA graph trees: marks the step's start (so the
    previous micro-batch's buffers may be reused) and clones the loss out of the graph's
    memory, which the next replay overwrites while the loop still holds the loss."""

    def __init__(self, forward: Any, device: devices.Device) -> None:
        self.forward, self.device = forward, device

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.device.graph_step_begin()
        return self.forward(*args, **kwargs).clone()


def check_compile_with(chosen: Chosen) -> None:
    """Settings of other strategies that compile's settings cannot run with: a whole-model
    compile and a strategy that takes the model itself (``Strategy.takes_model``)."""
    cfg = chosen.get("compile")
    accum = getattr(chosen.get(ACCUMULATION), "steps", 1)
    for name in chosen:
        if cfg is not None and cfg.scope == "model" and name != "compile" and chosen.declared[name].takes_model:
            raise UserError(
                f"{name} takes the model itself, not its forward: "
                "compile it block by block (compile scope blocks), not as a whole"
            )
    if cfg is not None and cfg.mode == "reduce-overhead" and accum > 1:
        raise UserError(
            "compile mode reduce-overhead cannot run with gradient accumulation: CUDA graph trees hand a "
            "backward graph's output buffer to .grad and overwrite it at the next micro-batch, silently "
            "(pytorch/pytorch#169545); use mode default or max-autotune-no-cudagraphs"
        )


def export_accelerate(cfg: CompileConfig, plan: Plan) -> dict[str, Any]:
    """Accelerate's dynamo settings: inductor in the plan's mode. Accelerate compiles the whole
    model; block by block is the same kernels inside each block, so the scope is not stated."""
    return {
        "dynamo_config": {
            "dynamo_backend": "INDUCTOR",
            "dynamo_mode": cfg.mode,
            "dynamo_use_fullgraph": cfg.fullgraph,
            "dynamo_use_dynamic": False,
        }
    }


def compile_cost(cfg: CompileConfig, terms: Any) -> None:
    """The cost model's term (``contract.cost.CostTerms``): compiled blocks, and the head and the
    loss with them when the whole model is compiled. Compiled block by block, the head and the
    loss stay eager: their logits cost what eager logits cost (measured: 69 GiB at micro-batch
    96, where the whole-model compile takes 24 GiB; bench/results/plan-phase8-small, trial 7)."""
    terms.compiled = True
    terms.loss_compiled = cfg.scope == "model"


def compile_prior(facts: PriorFacts) -> Prior:
    """The whole model in inductor's default mode (autotuning takes minutes: refine only; CUDA
    graphs cannot run with accumulation: left to the search). On the CPU too: the tiny GPT on
    2 cores ran 1.23x eager at micro-batch 16 (22,857 against 18,562 tokens/s) after a 19 s
    compilation, which inductor's cache pays once per shape (issue 27)."""
    return Prior(knobs={"mode": "default", "scope": "model"})


STRATEGY = Strategy(
    name="compile",
    phase="compile",
    compiles=True,
    summary="torch.compile (inductor), whole model or per block, optional CUDA graphs",
    exact=True,
    config=CompileConfig,
    apply=apply_compile,
    needs=Needs(features=frozenset({"inductor"})),
    changes=frozenset({"blocks"}),
    check_with=check_compile_with,
    cost=compile_cost,
    knobs=(
        Knob(
            name="mode",
            choices=("default", "max-autotune-no-cudagraphs", "reduce-overhead"),
            refine_only=("max-autotune-no-cudagraphs",),
        ),
        Knob(name="scope", choices=("model", "blocks")),
    ),
    prior=compile_prior,
    # The run compiles the blocks before DeepSpeed's engine takes the model: not DeepSpeed's setting.
    exports={"accelerate": export_accelerate, "deepspeed": NOTHING_TO_SET},
)
