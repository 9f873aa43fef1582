"""The sparse_attention strategy: its kernel against dense SDPA with the same mask, the block
mask's tile count, and training the tiny GPT through the shared suite (tests/strategy_suite.py).

On the CPU FlexAttention runs forward only (torch 2.13 has no CPU backward): the no-grad tests
run flex_attention itself, the gradient tests the dense-mask SDPA path the kernel takes there.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from autotune.contract.context import TrainContext
from autotune.errors import UserError
from autotune.runtime.trainer import Trainer
from autotune.strategies.sparse_attention import (
    STRATEGY,
    SparseAttentionConfig,
    SparseKernel,
    apply_sparse_attention,
    dense_mask,
    unmasked_fraction,
)
from autotune.workloads import load_workload
from tests.strategy_suite import TINY, Case, StrategySuite, pytest_generate_tests

__all__ = ["pytest_generate_tests"]  # the suite's hook: one test item per case

T = TINY["seq_len"]


def qkv(seq_len: int = T, grad: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 4, seq_len, 16, generator=g).requires_grad_(grad) for _ in range(3))


def grads(y: torch.Tensor, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(y.square().sum(), tensors)


@pytest.mark.parametrize("seq_len", [64, 256])
def test_a_window_over_the_whole_sequence_is_dense_causal_attention(seq_len: int) -> None:
    kernel = SparseKernel(window=seq_len, global_tokens=0)
    q, k, v = qkv(seq_len)
    with torch.no_grad():  # flex_attention itself (forward only on the CPU)
        torch.testing.assert_close(kernel(q, k, v, 0.0), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    q, k, v = qkv(seq_len, grad=True)  # the CPU backward path
    y, ref = kernel(q, k, v, 0.0), F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(grads(y, (q, k, v)), grads(ref, (q, k, v)))


@pytest.mark.parametrize(("seq_len", "window", "global_tokens"), [(64, 8, 3), (256, 20, 4), (256, 130, 0), (300, 1, 1)])
def test_window_and_global_tokens_are_dense_attention_with_that_mask(
    seq_len: int, window: int, global_tokens: int
) -> None:
    kernel = SparseKernel(window=window, global_tokens=global_tokens)
    mask = dense_mask(seq_len, window, global_tokens)
    assert mask[5, 5] and not mask[5, 6] and mask[seq_len - 1, 0] == (global_tokens > 0)
    q, k, v = qkv(seq_len)
    with torch.no_grad():
        torch.testing.assert_close(kernel(q, k, v, 0.0), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    q, k, v = qkv(seq_len, grad=True)
    y, ref = kernel(q, k, v, 0.0), F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(grads(y, (q, k, v)), grads(ref, (q, k, v)))
    assert list(kernel.block_masks) == [(seq_len, torch.device("cpu"))]  # built once, cached


def test_attention_dropout_is_refused() -> None:
    with pytest.raises(UserError, match="no attention dropout"):
        SparseKernel(window=8, global_tokens=0)(*qkv(), 0.1)


@pytest.mark.parametrize(
    ("seq_len", "window", "global_tokens"),
    [(1024, 128, 0), (1024, 200, 7), (2048, 1, 0), (512, 512, 0), (1024, 64, 300)],
)
def test_unmasked_fraction_counts_the_block_mask_tiles(seq_len: int, window: int, global_tokens: int) -> None:
    kernel = SparseKernel(window=window, global_tokens=global_tokens)
    bm = kernel.block_mask(seq_len, torch.device("cpu"))
    kept = int(bm.kv_num_blocks.sum()) + (int(bm.full_kv_num_blocks.sum()) if bm.full_kv_num_blocks is not None else 0)
    n = seq_len // 128
    assert unmasked_fraction(seq_len, window, global_tokens) == kept / (n * (n + 1) // 2)


def test_unmasked_fraction_figures() -> None:
    assert unmasked_fraction(1024, 1024, 0) == 1.0  # the window is the whole sequence
    assert unmasked_fraction(1024, 1, 0) == 8 / 36  # the diagonal tiles only
    assert unmasked_fraction(1024, 128, 0) == 15 / 36  # the diagonal and the one below it
    assert unmasked_fraction(1024, 1, 1) == 15 / 36  # the diagonal and the first column
    assert unmasked_fraction(100, 8, 0) == 1.0  # one tile
    with pytest.raises(ValueError):
        unmasked_fraction(0, 8, 0)


def tiny_ctx() -> TrainContext:
    workload = load_workload("tiny", TINY)
    torch.manual_seed(0)
    return TrainContext(workload=workload, device=torch.device("cpu"), model=workload.build_model())


def batch(ctx: TrainContext) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 2048, (4, T + 1), generator=torch.Generator().manual_seed(1))
    return ids[:, :-1], ids[:, 1:]


def test_a_window_over_the_whole_sequence_gives_the_plain_models_loss() -> None:
    plain, sparse = tiny_ctx(), tiny_ctx()
    apply_sparse_attention(sparse, SparseAttentionConfig(window=T, global_tokens=0))
    ids, targets = batch(plain)
    torch.testing.assert_close(sparse.model(ids, targets), plain.model(ids, targets))


def test_training_steps_have_finite_losses() -> None:
    ctx = tiny_ctx()
    apply_sparse_attention(ctx, SparseAttentionConfig(window=8, global_tokens=2))
    assert "window 8, 2 global tokens" in ctx.notes[-1]
    opt = torch.optim.AdamW(ctx.model.parameters(), lr=1e-3)
    ids, targets = batch(ctx)
    losses = []
    for _ in range(4):
        loss = ctx.model(ids, targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_a_window_longer_than_the_sequence_is_refused() -> None:
    with pytest.raises(UserError, match=f"window {T + 1} is longer than the sequence \\(seq_len {T}\\)"):
        apply_sparse_attention(tiny_ctx(), SparseAttentionConfig(window=T + 1))
    with pytest.raises(ValueError, match="window must be at least 1"):
        SparseAttentionConfig(window=0)


def test_declaration() -> None:
    assert STRATEGY.implemented and not STRATEGY.exact and not STRATEGY.issue
    assert STRATEGY.needs.structure == {"attention"} and STRATEGY.conflicts == {"attention"}


class TestSparseAttention(StrategySuite):
    name = "sparse_attention"
    cpu_cases = (
        # The whole sequence in the window: dense causal attention through the masked SDPA
        # kernel (0 measured: the same losses as is_causal).
        Case(knobs={"window": T, "global_tokens": 0}, rtol=1e-6),
        # A window of 16 of 64 tokens: a different model; its losses drift 8e-4 in 20 steps.
        Case(knobs={"window": 16, "global_tokens": 4}, rtol=1e-2),
    )
    # Compiled flex_attention on CUDA (not run on the CPU-only machine this was written on):
    # fp32 with atomics in the attention backward, and the same drift as on the CPU.
    cuda_cases = (
        Case(knobs={"window": T, "global_tokens": 0}, rtol=1e-5),
        Case(knobs={"window": 16, "global_tokens": 4}, rtol=1e-2),
    )

    def check_applied(self, trainer: Trainer, cfg: Any) -> None:
        for block in trainer.ctx.model.blocks:
            assert isinstance(block.attn.attend, SparseKernel)
            assert (block.attn.attend.window, block.attn.attend.global_tokens) == (cfg.window, cfg.global_tokens)


def test_the_cost_model_counts_only_the_kept_tiles_of_attention() -> None:
    from autotune import catalog, costmodel

    workload = load_workload("tiny", {"seq_len": 1024})
    c = costmodel.shape_of(workload)
    attention = 12 * c.n_layers * c.attn_dim * c.seq_len * 2 * c.seq_len  # micro-batch 2
    dense = costmodel.estimate(workload, 2, {}).flops_per_step
    for window, global_tokens in [(128, 0), (1, 1), (1024, 0)]:
        configs = {
            "sparse_attention": catalog.get("sparse_attention").parse(
                {"window": window, "global_tokens": global_tokens}
            )
        }
        kept = unmasked_fraction(1024, window, global_tokens)
        assert costmodel.estimate(workload, 2, configs).flops_per_step == pytest.approx(
            dense - attention * (1 - kept), rel=1e-12
        )
    assert STRATEGY.cost is not None


def test_the_search_tries_only_windows_shorter_than_the_sequence() -> None:
    from autotune import hardware
    from autotune.planning.settings import PlanSettings
    from autotune.planning.space import build_space
    from autotune.strategies.sparse_attention import knobs_for

    settings = PlanSettings(workload="tiny", allow_approximate=True, device="cpu")
    space, _ = build_space(settings, hardware.detect(quick=True), load_workload("tiny"))
    (strategy,) = [s for s in space.strategies if s.name == "sparse_attention"]
    assert (strategy.knobs[0].low, strategy.knobs[0].high) == (32, 127)  # the preset's 128 tokens: windows 32..127
    assert (knobs_for(8192)[0].low, knobs_for(8192)[0].high) == (32, 1024)  # the catalog's range
    assert knobs_for(16)[0].high == 15 and knobs_for(1) == STRATEGY.knobs
