"""Every single-device strategy through the shared suite (tests/strategy_suite.py) on a tiny
Hugging Face Llama (:data:`~tests.strategy_suite.LLAMA`: GQA, SwiGLU, RoPE, untied head).

Each class here is the GPT's class of tests/test_strategies.py (or of the strategy's own test
file) with ``model = LLAMA``: the same settings, checks and needs, its 20 losses against the
plain HF model's, within the GPT's tolerances. Measured on this model (CPU, 20 steps, largest
relative difference of a loss): exactly 0 for fp32 precision, activation checkpointing, the
forloop optimizer and one thread; 6.7e-8 for the math and naive attention kernels through HF's
attention interface, compiled blocks (fullgraph) and padding 2100 to 2112 or 2176; 1.3e-7
fused AdamW; 1.7e-5 bf16 (the GPT: 4.1e-5); sparse attention 6.7e-8 with the whole sequence in
its window and 1.1e-3 with a window of 16 (the GPT: 7.6e-4, rtol 1e-2). CUDA cases are the
GPT's settings, not yet run on a GPU for this model (compiled ones left out).

The approximate ``moe`` refuses Llama's SwiGLU MLP (it converts the GPT's fc, GELU, proj only):
that refusal is tested here instead of training. Resume is checked once per strategy whose
state is the model's (precision, grad_accum, activation checkpoint, attention, padding).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import tests.test_planner as planner_tests  # noqa: E402
import tests.test_sparse_attention as sparse_tests  # noqa: E402
import tests.test_strategies as gpt_tests  # noqa: E402
from autotune import catalog  # noqa: E402
from autotune.contract.context import TrainContext  # noqa: E402
from autotune.errors import UserError  # noqa: E402
from autotune.strategies.sparse_attention import SparseKernel  # noqa: E402
from tests.strategy_suite import LLAMA, pytest_generate_tests  # noqa: E402

__all__ = ["pytest_generate_tests"]  # the suite's hook: one test item per case


class TestPrecision(gpt_tests.TestPrecision):
    model = LLAMA


class TestGradAccum(gpt_tests.TestGradAccum):
    model = LLAMA


class TestCompile(gpt_tests.TestCompile):
    model = LLAMA
    cuda_cases = ()  # CUDA graphs over HF's decoder layers: not measured on a GPU yet


class TestActivationCheckpoint(gpt_tests.TestActivationCheckpoint):
    model = LLAMA


class TestDataloader(gpt_tests.TestDataloader):
    model = LLAMA
    check_resume = False  # the loader is the model's no more than the GPT's: resumed there


class TestAttention(gpt_tests.TestAttention):
    model = LLAMA


class TestOptimizer(gpt_tests.TestOptimizer):
    model = LLAMA
    check_resume = False  # resumed under precision and padding on this model


class TestVocabPadding(gpt_tests.TestVocabPadding):
    model = LLAMA


class TestCpuThreads(planner_tests.TestCpuThreads):
    model = LLAMA
    check_resume = False


class TestSparseAttention(sparse_tests.TestSparseAttention):
    model = LLAMA
    check_resume = False

    def check_applied(self, trainer, cfg) -> None:
        kernel = gpt_tests.attention_kernel(self.adapter(trainer), self.model)
        assert isinstance(kernel, SparseKernel) and (kernel.window, kernel.global_tokens) == (
            cfg.window,
            cfg.global_tokens,
        )


def test_moe_refuses_the_llama_mlp() -> None:
    # moe converts MLPs of fc, GELU, proj (the GPT's); Llama's is gate/up/down (SwiGLU).
    wl = LLAMA.workload()
    ctx = TrainContext(workload=wl, device=torch.device("cpu"), model=wl.build_model())
    moe = catalog.get("moe")
    with pytest.raises(UserError, match="moe converts MLPs of fc, GELU, proj without biases .* block 0's is LlamaMLP"):
        moe.apply(ctx, moe.parse({}))
