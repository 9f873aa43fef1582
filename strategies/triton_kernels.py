"""Which implementation computes the output head and the cross-entropy: the planner races them.

- "compile": the model's own head and loss, unfused (inductor's kernels where compile is on):
  the yardstick the others are measured against, and what the strategy's absence means too.
- "autotune": our kernel (``autotune.kernels.fused_linear_cross_entropy``): the head in chunks
  of tokens with the loss and both gradients taken in the same pass, so the (tokens x vocab)
  logits never exist whole.
- "liger": Liger-Kernel's ``liger_fused_linear_cross_entropy`` (the ``liger-kernel`` package).
- "cce": Apple's Cut Cross-Entropy (the ``cut-cross-entropy`` package), its "cce" kernel.

Each replaces "head + loss" through the model adapter's ``set_head_loss`` (the built-in GPT,
``hf:`` models whose logits are the head's output), tied or untied heads and a padded
vocabulary alike. Each runs outside torch.compile's graph (a graph break: the model compiles up
to the final norm; Liger's loss fails under compile). They compute the same cross-entropy in
another order of floating-point sums: an exact strategy (the loss check holds every plan that
uses one to the baseline's losses).

The fused norm + residual kernel the issue also names is not here: nothing measured yet shows
it beating inductor's own fusion of the norms (bench/README.md, "Fused loss").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from autotune.contract.strategy import NOTHING_TO_SET, Knob, Needs, Prior, PriorFacts, Strategy
from autotune.errors import UserError

if TYPE_CHECKING:
    import torch

    from autotune.contract.context import TrainContext

_STRUCTURE = frozenset({"head", "loss"})
_NEEDS = Needs(features=frozenset({"triton"}), modules=("triton",), structure=_STRUCTURE)
LOSSES = ("compile", "autotune", "liger", "cce")
_MODULES = {"autotune": ("triton",), "liger": ("triton", "liger_kernel"), "cce": ("triton", "cut_cross_entropy")}
"""The packages each implementation imports (the extras that install them: dev, kernels)."""


@dataclass(kw_only=True, slots=True)
class TritonKernelsConfig:
    loss: Literal["compile", "autotune", "liger", "cce"] = "autotune"
    """Implementation of the head and the cross-entropy (see the module docstring)."""

    def needs(self) -> Needs:
        """A GPU for every fused kernel, and the package of the one chosen."""
        return Needs(features=frozenset({"triton"}), modules=_MODULES.get(self.loss, ("triton",)), structure=_STRUCTURE)


def _autotune_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    from autotune.kernels.fused_linear_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(hidden, weight, targets, vocab_size=vocab_size)


def _in_autocast_dtype(
    hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both flattened and in autocast's dtype (the libraries' kernels take one dtype, and
    autocast does not reach into them), the weight cut to the true vocabulary."""
    import torch

    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return hidden.reshape(-1, hidden.shape[-1]).to(dtype), weight[:vocab_size].to(dtype)


def _liger_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    import torch
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    h, w = _in_autocast_dtype(hidden, weight, vocab_size)
    with torch.autocast(hidden.device.type, enabled=False):
        return liger_fused_linear_cross_entropy(h, w, targets.reshape(-1)).float()


def _cce_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    import torch
    from cut_cross_entropy import linear_cross_entropy

    h, w = _in_autocast_dtype(hidden, weight, vocab_size)
    with torch.autocast(hidden.device.type, enabled=False):
        return linear_cross_entropy(h, w, targets.reshape(-1), impl="cce").float()


def head_loss(loss: str) -> Callable[..., Any] | None:
    """The ``HeadLoss`` of implementation ``loss`` (None for "compile": the model's own), its
    kernels outside torch.compile's graph.

    A plain function calling the disabled one: a disabled function held by the model itself
    (``model.head_loss``) is not guarded by dynamo (torch 2.11 to 2.13): a model compiled with it
    then reuses its code for a model without it, calling None (tests/test_kernels.py)."""
    import torch

    fn = {"autotune": _autotune_loss, "liger": _liger_loss, "cce": _cce_loss}.get(loss)
    if fn is None:
        return None
    outside = torch.compiler.disable(fn)

    def fused(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
        return outside(hidden, weight, targets, vocab_size)

    return fused


def apply_triton_kernels(ctx: TrainContext, cfg: TritonKernelsConfig) -> None:
    from autotune.workloads.adapter import NotSupported, adapter_for

    ctx.check_needs(STRATEGY, cfg, "loss compile keeps the model's own head and loss")
    fn = head_loss(cfg.loss)
    if fn is None:
        ctx.notes.append("head and loss: the model's own (compile)")
        return
    try:
        adapter_for(ctx.model).set_head_loss(fn)
    except NotSupported as e:
        raise UserError(f"strategy triton_kernels cannot replace this model's head and loss: {e}") from None
    ctx.notes.append(f"head and loss: fused ({cfg.loss})")


def check_triton_kernels_with(chosen: dict[str, Any]) -> None:
    """A fused loss reads the head's whole weight inside the model's forward: not a pipeline's
    last stage (which returns logits), not a weight ZeRO-3 partitions or tensor parallelism shards."""
    cfg = chosen.get("triton_kernels")
    if cfg is None or cfg.loss == "compile":
        return
    if "pipeline_parallel" in chosen:
        raise UserError(
            f"triton_kernels loss {cfg.loss} cannot run with pipeline_parallel: "
            "the last stage returns logits; use loss compile"
        )
    if getattr(chosen.get("zero"), "stage", None) == 3:
        raise UserError(
            f"triton_kernels loss {cfg.loss} cannot run with zero stage 3: "
            "the head's weight is partitioned outside its own forward; use stage 1 or 2"
        )
    if "tensor_parallel" in chosen:
        raise UserError(
            f"triton_kernels loss {cfg.loss} cannot run with tensor_parallel: "
            "a sharded head's weight is not whole; use loss compile"
        )


def head_loss_bytes(loss: str, shape: Any, tokens: int, vocab: int, *, mixed: bool) -> float:
    """Bytes a fused head + loss holds at its peak instead of the logits, at ``tokens`` tokens a
    micro-batch and ``vocab`` (padded) columns: "autotune" one chunk of logits (about
    ``CHUNK_BYTES``, kernels/fused_linear_cross_entropy.py) and the fp32 weight gradient;
    "liger" a chunk of about tokens x width / vocab tokens' logits and the weight gradient in
    the inputs' dtype; "cce" no logits, the weight gradient in the inputs' dtype. Each also
    holds the hidden states' gradient (tokens x width). Measured on an H100 (bench/README.md,
    "Fused head + cross-entropy", at the issue's three shapes): ours 1.11-2.02 GiB, within 1%
    of this count; liger 0.24-0.67 GiB, within 9% (under); cce 0.14-0.55 GiB, within 2%."""
    a = 2 if mixed else 4
    h = shape.d_model
    if loss == "autotune":
        from autotune.kernels.chunking import chunk_tokens

        return chunk_tokens(tokens, vocab, a) * vocab * a + 4.0 * vocab * h + tokens * h * a
    if loss == "liger":
        return 2.0 * tokens * h * a + vocab * h * a
    return a * vocab * h + a * tokens * h


def triton_kernels_cost(cfg: TritonKernelsConfig, terms: Any) -> None:
    """The cost model's term (``contract.cost.CostTerms``): a fused head + loss holds
    :func:`head_loss_bytes` in place of the logits (loss compile: the model's own)."""
    if cfg.loss != "compile":
        terms.head_loss_bytes = head_loss_bytes(cfg.loss, terms.shape, terms.tokens, terms.vocab, mixed=terms.autocast)


def triton_kernels_prior(facts: PriorFacts) -> Prior | None:
    """On a GPU, our fused loss raced against compile's head and loss (a trial of the first
    prior plus it): measured on an H100 at 0.97x to 1.12x compile's time for 12% to 45% of its
    memory (bench/README.md, "Fused loss"); a whole phase8-small step 1.05x, a gpt-vocab152k
    step 1.02x. Which wins depends on the model: the planner measures it rather than assuming."""
    if not facts.accelerator or "autotune" in facts.excluded.get("loss", {}):
        return None
    return Prior(knobs={"loss": "autotune"}, race=True)


STRATEGY = Strategy(
    name="triton_kernels",
    phase="kernels",
    summary="fused head + cross-entropy: our Triton kernel, Liger or CCE, raced against compile",
    exact=True,
    config=TritonKernelsConfig,
    apply=apply_triton_kernels,
    # The fused loss reads the head's final weight: after what replaces it (vocab padding).
    changes=frozenset({"loss"}),
    reads=frozenset({"head"}),
    needs=_NEEDS,
    check_with=check_triton_kernels_with,
    cost=triton_kernels_cost,
    knobs=(Knob(name="loss", choices=LOSSES),),
    prior=triton_kernels_prior,
    # A kernel of the run's loss: the same maths, no launcher setting.
    exports={"accelerate": NOTHING_TO_SET, "deepspeed": NOTHING_TO_SET},
)
