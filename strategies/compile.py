"""torch.compile: the whole model, or block by block (faster to compile, same kernels inside
a block). Modes: default, max-autotune-no-cudagraphs, reduce-overhead (CUDA graphs).
Inductor fuses and reorders the same operations, so the maths is the plain model's up to
the order of floating-point reductions: an exact strategy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from autotune.context import TrainContext
from autotune.errors import UserError
from autotune.strategy import Knob, Needs, Strategy


@dataclass(kw_only=True, slots=True)
class CompileConfig:
    mode: Literal["default", "max-autotune-no-cudagraphs", "reduce-overhead"] = "default"
    """Inductor mode; reduce-overhead captures CUDA graphs."""
    scope: Literal["model", "blocks"] = "model"
    """Compile the whole forward (loss included) or each transformer block separately."""
    fullgraph: bool = False
    """Fail rather than fall back to eager at a graph break (for checking a model)."""

    def needs(self) -> Needs:
        """CUDA graphs need CUDA; compiling block by block needs the list of blocks."""
        return Needs(
            cuda=self.mode == "reduce-overhead",
            structure=frozenset({"blocks"}) if self.scope == "blocks" else frozenset(),
        )


def apply_compile(ctx: TrainContext, cfg: CompileConfig) -> None:
    ctx.check_needs(STRATEGY, cfg, "use mode default, or scope model for a model without blocks")
    if cfg.scope == "blocks":
        # Per-block: compile each block in place (Module.compile keeps the state-dict keys),
        # so wrappers applied later (FSDP) and activation checkpointing applied earlier both
        # see the compiled blocks.
        for block in ctx.model.blocks:
            block.compile(mode=cfg.mode, fullgraph=cfg.fullgraph)
    else:
        if ctx.forward_backward is not None:
            raise UserError("the forward of this run belongs to a strategy (pipeline_parallel): compile it block by block (compile scope blocks)")
        # Recorded so that a wrapper applied later (DDP) compiles around itself instead.
        ctx.compile_options = {"mode": cfg.mode, "fullgraph": cfg.fullgraph}
        ctx.forward = torch.compile(ctx.forward, **ctx.compile_options)
    ctx.notes.append(f"compile {cfg.scope} mode={cfg.mode}")


STRATEGY = Strategy(
    name="compile",
    summary="torch.compile (inductor), whole model or per block, optional CUDA graphs",
    exact=True,
    config=CompileConfig,
    apply=apply_compile,
    knobs=(
        Knob(name="mode", choices=("default", "max-autotune-no-cudagraphs", "reduce-overhead")),
        Knob(name="scope", choices=("model", "blocks")),
    ),
)
