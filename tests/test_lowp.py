"""INT8 and FP8 training through torchao (approximate strategies): which linears convert, and
the loss against the plain model on the same batches, through the real Trainer on the CPU
(fp8 there is torchao's emulation: the same float8 rounding, matmuls in high precision)."""

from __future__ import annotations

import math

import pytest
from torch import nn

pytest.importorskip("torchao")

from autotune import catalog  # noqa: E402
from autotune.errors import UserError  # noqa: E402
from autotune.runtime.trainer import Trainer  # noqa: E402
from tests.strategy_suite import make_plan, train_losses  # noqa: E402

STEPS = 20
LOSS_TOLERANCE = 0.01
"""8-bit rounding over 20 steps of the tiny GPT: measured within 0.05% of the plain loss; the
quality guard's default tolerance is the bound asserted."""


def _weights(trainer: Trainer) -> list[nn.Module]:
    return [m for m in trainer.ctx.model.modules() if isinstance(m, nn.Linear)]


def _float8(module: nn.Module) -> bool:
    from torchao.float8.float8_linear import Float8Linear

    return isinstance(module, Float8Linear)


def _int8(module: nn.Module) -> bool:
    from torchao.prototype.quantized_training.int8_mixed_precision import Int8MixedPrecisionTrainingLinear

    return isinstance(module, Int8MixedPrecisionTrainingLinear)


@pytest.fixture(scope="module")
def plain() -> list[float]:
    trainer = Trainer(make_plan({}, "cpu"))
    try:
        return train_losses(trainer, STEPS)
    finally:
        trainer.close()


@pytest.mark.parametrize(
    "name, knobs, converted",
    [
        ("fp8", {}, _float8),
        ("fp8", {"recipe": "rowwise", "layers": "blocks_and_head"}, _float8),
        ("int8", {}, _int8),
        ("int8", {"layers": "blocks_and_head", "backward": False}, _int8),
    ],
)
def test_the_blocks_linears_train_in_8_bits_close_to_the_plain_loss(plain, name, knobs, converted):
    trainer = Trainer(make_plan({name: knobs}, "cpu"))
    try:
        model = trainer.ctx.model
        in_blocks = [m for b in model.blocks for m in b.modules() if isinstance(m, nn.Linear)]
        assert in_blocks and all(converted(m) for m in in_blocks)
        assert converted(model.head) == (knobs.get("layers") == "blocks_and_head")
        assert any(n.startswith(name) for n in trainer.ctx.notes)
        losses = train_losses(trainer, STEPS)
    finally:
        trainer.close()
    assert all(math.isfinite(v) for v in losses)
    assert losses != plain  # it is another computation
    assert abs(losses[-1] / plain[-1] - 1) <= LOSS_TOLERANCE, (losses[-1], plain[-1])


@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_a_model_with_no_aligned_linear_is_refused(name):
    # d_model 24: no linear has both dimensions a multiple of 16.
    with pytest.raises(UserError, match="multiple of 16"):
        Trainer(make_plan({name: {}}, "cpu", {"d_model": 24, "n_heads": 2}))


def test_both_are_approximate_and_exclude_each_other():
    for name, other in (("fp8", "int8"), ("int8", "fp8")):
        strategy = catalog.get(name)
        assert not strategy.exact and other in strategy.conflicts and strategy.apply is not None
