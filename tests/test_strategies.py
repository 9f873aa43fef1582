"""Every single-device strategy through the shared suite (tests/strategy_suite.py).

Tolerances are relative, on each of the 20 losses against the plain run; each says why. CPU
figures were measured on the tiny model (2 blocks, d128, T64, batch 8): the tolerance leaves
about 10x headroom over what was measured. CUDA cases (marked gpu) leave room for atomics in
the attention backward, which make two CUDA runs of the same program differ in the last bits.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from autotune import catalog
from autotune.contract.context import TrainContext
from autotune.contract.strategy import Facts
from autotune.errors import UserError
from autotune.runtime.trainer import Trainer
from autotune.strategies.attention import naive_attention, sdpa_with
from autotune.workloads import load_workload
from autotune.workloads.adapter import GPTAdapter
from autotune.workloads.gpt import sdpa_causal
from tests.strategy_suite import (
    MICRO_BATCH,
    STEPS,
    Case,
    StrategySuite,
    SuiteModel,
    make_plan,
    pytest_generate_tests,
    train_losses,
)

__all__ = ["pytest_generate_tests"]  # the suite's hook: one test item per case

BF16 = {"precision": {"dtype": "bf16"}}
FP32_NO_TF32 = {"precision": {"dtype": "fp32", "tf32": False}}
# Kernels that differ only in the order of fp32 reductions: ~1e-7 measured on the CPU.
FP32_REORDERED = 1e-6
# The same fp32 program on CUDA: atomics in the attention backward change the last bits.
CUDA_FP32 = 1e-5
# Two bf16 runs whose kernels round differently (8-bit mantissa): ~1e-3 expected.
BF16_VS_BF16 = 1e-2


def attention_kernel(adapter: Any, model: SuiteModel) -> Any:
    """The one kernel a strategy set in every block's attention (not the model's own)."""
    kernels = [getattr(adapter.attention(block), model.attend, None) for block in adapter.blocks()]
    assert kernels[0] is not None and kernels[0] is not sdpa_causal and all(k is kernels[0] for k in kernels), kernels
    return kernels[0]


class TestPrecision(StrategySuite):
    name = "precision"
    cpu_cases = (
        Case(knobs={"dtype": "fp32", "tf32": False}, rtol=0.0),  # the plain run's maths exactly
        Case(knobs={"dtype": "bf16"}, rtol=1e-3),  # bf16 matmul inputs: 2e-5 measured
    )
    cuda_cases = (
        Case(knobs={"dtype": "bf16", "tf32": False}, rtol=2e-2),  # bf16 against fp32 on CUDA
        Case(knobs={"dtype": "fp32", "tf32": True}, rtol=1e-2),  # TF32 keeps 10 mantissa bits
        # fp16 keeps 10 mantissa bits; the scaler (initial scale 2^16) skips no step on this model.
        Case(knobs={"dtype": "fp16", "tf32": False}, rtol=2e-2),
    )
    cpu_refused = ({"dtype": "fp16"},)

    def check_applied(self, trainer: Trainer, cfg: Any) -> None:
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]
        assert trainer.ctx.autocast_dtype == dtype
        assert trainer.scaler.is_enabled() == (cfg.dtype == "fp16")
        assert torch.backends.cuda.matmul.allow_tf32 == cfg.tf32


class TestGradAccum(StrategySuite):
    name = "grad_accum"
    # Compared with one batch of 2 x 8 samples, which the loader makes of the same samples (it
    # draws a step's global batch whole): the mean loss over them and its gradient are the same
    # sums, added in another order.
    cpu_cases = (Case(knobs={"steps": 2}, rtol=FP32_REORDERED),)

    def plain_losses(self, case: Case, device: str) -> list[float]:
        plain = Trainer(make_plan({}, device, model=self.model, micro_batch_size=MICRO_BATCH * case.knobs["steps"]))
        try:
            return train_losses(plain, STEPS)
        finally:
            plain.close()

    def check_applied(self, trainer: Trainer, cfg: Any) -> None:
        assert trainer.ctx.grad_accum == cfg.steps == trainer.batches.micro_batches
        assert trainer.tokens_per_step == MICRO_BATCH * self.model.overrides["seq_len"] * cfg.steps


class TestCompile(StrategySuite):
    name = "compile"
    # One compile on the CPU (C++ codegen is slow): per block, whole graph, over the math SDPA
    # backend, so the same test shows that dynamo traces the attention strategy's sdpa_kernel.
    # Inductor fuses and reorders fp32 reductions.
    cpu_cases = (
        Case(knobs={"scope": "blocks", "fullgraph": True}, base={"attention": {"backend": "math"}}, rtol=1e-5),
    )
    cuda_cases = (
        Case(knobs={"mode": "default"}, base=FP32_NO_TF32, rtol=1e-4),
        Case(knobs={"mode": "reduce-overhead"}, base=FP32_NO_TF32, rtol=1e-4),
        Case(knobs={"mode": "reduce-overhead", "scope": "blocks"}, base=FP32_NO_TF32, rtol=1e-4),
        Case(
            knobs={"mode": "default", "fullgraph": True},
            base={**BF16, "attention": {"backend": "flash"}},
            rtol=BF16_VS_BF16,
        ),
    )
    cpu_refused = ({"mode": "reduce-overhead"},)
    check_resume = False  # three more compiles; the executor's resume is tested uncompiled

    def check_applied(self, trainer: Trainer, cfg: Any) -> None:
        if cfg.scope == "blocks":
            assert all(block._compiled_call_impl is not None for block in self.adapter(trainer).blocks())
        else:
            forward = trainer.ctx.forward
            if cfg.mode == "reduce-overhead":  # a step of CUDA graph trees around the compiled forward
                forward = forward.forward
            assert isinstance(forward, torch._dynamo.eval_frame.OptimizedModule)

    def test_cuda_graphs_refuse_accumulation(self) -> None:
        from autotune import validate

        chosen = {
            "compile": self.strategy.parse({"mode": "reduce-overhead"}),
            "grad_accum": catalog.get("grad_accum").parse({"steps": 2}),
        }
        with pytest.raises(UserError, match="reduce-overhead cannot run with gradient accumulation"):
            validate.settings(chosen)
        validate.settings({**chosen, "compile": self.strategy.parse({"mode": "default"})})


class TestActivationCheckpoint(StrategySuite):
    name = "activation_checkpoint"
    # Recomputation runs the same kernels on the same inputs: the same numbers.
    cpu_cases = (
        Case(knobs={"mode": "full"}, rtol=0.0),
        Case(knobs={"mode": "selective", "every": 2}, rtol=0.0),
    )
    cuda_cases = (Case(knobs={"mode": "full"}, base=FP32_NO_TF32, rtol=CUDA_FP32),)

    def check_applied(self, trainer: Trainer, cfg: Any) -> None:
        stride = 1 if cfg.mode == "full" else cfg.every
        wrapped = [isinstance(b, CheckpointWrapper) for b in self.adapter(trainer).blocks()]
        assert wrapped == [i % stride == 0 for i in range(len(wrapped))]


class TestDataloader(StrategySuite):
    name = "dataloader"
    # Batches are a function of (seed, step) and their place in it: the same data, the same numbers.
    cpu_cases = (
        Case(knobs={"pin_memory": False, "prefetch": 0}, rtol=0.0),
        Case(knobs={"pin_memory": False, "prefetch": 5}, rtol=0.0),
    )
    cuda_cases = (Case(knobs={"pin_memory": True, "prefetch": 4}, rtol=CUDA_FP32),)
    cpu_refused = ({"pin_memory": True},)

    def check_applied(self, trainer: Trainer, cfg: Any) -> None:
        assert (trainer.batches.pin_memory, trainer.batches.prefetch) == (cfg.pin_memory, cfg.prefetch)


class TestAttention(StrategySuite):
    name = "attention"
    cpu_cases = (
        Case(knobs={"backend": "math"}, rtol=FP32_REORDERED),
        Case(knobs={"backend": "naive"}, rtol=FP32_REORDERED),
    )
    cuda_cases = (
        Case(knobs={"backend": "naive"}, base=FP32_NO_TF32, rtol=CUDA_FP32),
        Case(knobs={"backend": "math"}, base=FP32_NO_TF32, rtol=CUDA_FP32),
        Case(knobs={"backend": "efficient"}, base=FP32_NO_TF32, rtol=CUDA_FP32),
        Case(knobs={"backend": "efficient"}, base=BF16, rtol=BF16_VS_BF16),
        Case(knobs={"backend": "flash"}, base=BF16, rtol=BF16_VS_BF16),
        Case(knobs={"backend": "cudnn"}, base=BF16, rtol=BF16_VS_BF16),
        Case(knobs={"backend": "fa3"}, base=BF16, rtol=BF16_VS_BF16),  # Hopper, flash_attn_interface
        Case(knobs={"backend": "fa4"}, base=BF16, rtol=BF16_VS_BF16),  # Hopper/Blackwell, flash-attn-4
    )
    cpu_refused = (
        {"backend": "efficient"},
        {"backend": "flash"},
        {"backend": "cudnn"},
        {"backend": "fa3"},
        {"backend": "fa4"},
    )

    def test_half_only_backends_refuse_fp32(self, monkeypatch: pytest.MonkeyPatch) -> None:
        wl = self.model.workload()
        hopper = Facts(
            device="cuda",
            accelerators=1,
            compute_capability=(9, 0),
            gpu_name="H100",
            modules=frozenset({"flash_attn_interface", "flash_attn.cute"}),
            structure=wl.structure,
        )
        monkeypatch.setattr(TrainContext, "facts", lambda self: hopper)
        for backend in ("flash", "cudnn", "fa3", "fa4"):
            ctx = TrainContext(workload=wl, device=torch.device("cpu"), model=wl.build_model())
            with pytest.raises(UserError, match=f"attention {backend} runs in bf16 or fp16 only"):
                self.strategy.apply(ctx, self.strategy.parse({"backend": backend}))

    def check_applied(self, trainer: Trainer, cfg: Any) -> None:
        kernel = attention_kernel(self.adapter(trainer), self.model)
        if cfg.backend == "naive":
            assert kernel is naive_attention
        elif cfg.backend == "fa4":
            assert kernel.__name__ == "fa4_attention"
        elif cfg.backend != "fa3":
            assert isinstance(kernel, functools.partial) and kernel.func is sdpa_with
            assert kernel.args[0].name.lower().startswith(cfg.backend[:4])


def _fa4_context(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], **overrides: Any) -> TrainContext:
    """A bf16 context on a made-up GPU of ``capability`` where flash_attn.cute would import: the
    refusals fa4 makes on the machine it runs on, checked here before any kernel is called."""
    wl = load_workload("tiny", overrides)
    gpu = Facts(
        device="cuda",
        accelerators=1,
        compute_capability=capability,
        gpu_name=f"GPU {capability[0]}.{capability[1]}",
        modules=frozenset({"flash_attn.cute"}),
        structure=wl.structure,
    )
    monkeypatch.setattr(TrainContext, "facts", lambda self: gpu)
    ctx = TrainContext(workload=wl, device=torch.device("cpu"), model=wl.build_model())
    ctx.autocast_dtype = torch.bfloat16
    return ctx


def test_fa4_refuses_in_one_line_what_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    attention = catalog.get("attention")
    fa4 = attention.parse({"backend": "fa4"})
    # Heads 160 wide: FA4 takes them on Hopper, not on Blackwell (up to 128, and 256).
    ctx = _fa4_context(monkeypatch, (10, 0), d_model=320, n_heads=2)
    with pytest.raises(UserError, match="cannot take this model's heads of width 160 on Blackwell") as e:
        attention.apply(ctx, fa4)
    assert "\n" not in str(e.value)
    # Dropout: FA4 has none.
    ctx = _fa4_context(monkeypatch, (9, 0), dropout=0.1)
    with pytest.raises(UserError, match="attention fa4 has no dropout"):
        attention.apply(ctx, fa4)
    # Found but not importable (here: not installed at all): one line, the import's own reason.
    if importlib.util.find_spec("flash_attn") is None:
        ctx = _fa4_context(monkeypatch, (9, 0))
        with pytest.raises(UserError, match="attention fa4: flash_attn.cute does not import here: No module") as e:
            attention.apply(ctx, fa4)
        assert "\n" not in str(e.value)


def test_fa4_head_widths_are_refused_before_launch() -> None:
    from autotune import validate
    from autotune.strategies.attention import fa4_head_dim_refusal

    fa4 = catalog.get("attention").parse({"backend": "fa4"})
    for width in (8, 64, 128, 256):  # both architectures
        assert fa4_head_dim_refusal(width, None) is None
        validate.settings({"attention": fa4}, workload=load_workload("tiny", {"d_model": 2 * width, "n_heads": 2}))
    assert fa4_head_dim_refusal(160, (9, 0)) is None and fa4_head_dim_refusal(160, None) is None
    assert "on Blackwell" in fa4_head_dim_refusal(160, (10, 0))
    for width in (4, 12, 264):  # neither
        with pytest.raises(UserError, match=f"heads of width {width} on Hopper or Blackwell"):
            validate.settings({"attention": fa4}, workload=load_workload("tiny", {"d_model": 2 * width, "n_heads": 2}))
    assert fa4_head_dim_refusal(0, None) is None  # not known (a generic model): FA4 says at its first call


class TestOptimizer(StrategySuite):
    name = "optimizer"
    cpu_cases = (
        Case(knobs={"implementation": "foreach"}, rtol=0.0),  # the executor's CPU default
        Case(knobs={"implementation": "forloop"}, rtol=FP32_REORDERED),
        Case(knobs={"implementation": "fused"}, rtol=FP32_REORDERED),  # CPU fused AdamW (torch 2.4+)
    )
    cuda_cases = (
        Case(knobs={"implementation": "fused"}, rtol=CUDA_FP32),  # the executor's CUDA default
        Case(knobs={"implementation": "foreach"}, rtol=CUDA_FP32),
        Case(knobs={"implementation": "forloop"}, rtol=CUDA_FP32),
    )

    def check_applied(self, trainer: Trainer, cfg: Any) -> None:
        defaults = trainer.optimizer.defaults
        assert (bool(defaults["fused"]), bool(defaults["foreach"])) == (
            cfg.implementation == "fused",
            cfg.implementation == "foreach",
        )


class TestVocabPadding(StrategySuite):
    name = "vocab_padding"
    # The tiny vocab (2048) is already a multiple of 128: 2100 (data ids stay below 2048)
    # pads to 2112 or 2176. The padded logits are dropped before the loss; only the wider
    # matmul may sum in another order.
    cpu_cases = (
        Case(knobs={"multiple": 64}, overrides={"vocab_size": 2100}, rtol=FP32_REORDERED),
        Case(knobs={"multiple": 128}, overrides={"vocab_size": 2100}, rtol=FP32_REORDERED),
    )
    cuda_cases = (
        Case(knobs={"multiple": 64}, base=FP32_NO_TF32, overrides={"vocab_size": 2100}, rtol=CUDA_FP32),
        Case(knobs={"multiple": 64}, base=BF16, overrides={"vocab_size": 2100}, rtol=BF16_VS_BF16),
    )

    def check_applied(self, trainer: Trainer, cfg: Any) -> None:
        adapter = self.adapter(trainer)
        vocab, head, embed = adapter.shape().vocab_size, adapter.head(), adapter.embedding()
        assert (head.weight is embed.weight) == self.model.tied  # tied as before, or not
        for rows in (head.weight.shape[0], embed.num_embeddings):
            assert rows % cfg.multiple == 0 and 0 < rows - vocab < cfg.multiple
        if isinstance(adapter, GPTAdapter):  # HF's resize draws its new rows at random instead
            assert torch.all(embed.weight[vocab:] == 0)  # padded rows: never used, never updated
        idx = torch.zeros(1, 4, dtype=torch.int64, device=trainer.device)
        with torch.no_grad():
            assert trainer.ctx.model(idx).shape == (1, 4, vocab)  # the padded logits dropped


class TestTritonKernels(StrategySuite):
    name = "triton_kernels"
    # Fused losses need a GPU (Triton's kernels; tests/test_kernels.py runs ours in the
    # interpreter). The same cross-entropy in another order of sums: fp32 as close as two CUDA
    # runs; bf16 as two bf16 programs (both round the logits to bf16, the gradients' sums differ).
    cpu_cases = ()
    cuda_cases = (
        Case(knobs={"loss": "autotune"}, base=FP32_NO_TF32, overrides={"vocab_size": 2100}, rtol=CUDA_FP32),
        Case(
            knobs={"loss": "autotune"},
            base={**BF16, "compile": {}, "vocab_padding": {"multiple": 64}},
            rtol=BF16_VS_BF16,
        ),
        Case(knobs={"loss": "liger"}, base=BF16, rtol=BF16_VS_BF16),
        Case(knobs={"loss": "cce"}, base=BF16, rtol=BF16_VS_BF16),
        Case(knobs={"loss": "compile"}, base=BF16, rtol=BF16_VS_BF16),
    )
    cpu_refused = ({"loss": "autotune"}, {"loss": "compile"})
    check_resume = False

    def check_applied(self, trainer: Trainer, cfg: Any) -> None:
        model = trainer.ctx.model
        model = getattr(model, "_orig_mod", model)
        assert (model.head_loss is None) == (cfg.loss == "compile")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux's CPU affinity")
def test_cpu_threads_never_exceed_the_cores_this_process_may_use():
    # A plan measured with 2 threads, run in a process pinned to one core (taskset, a cpuset):
    # one thread, said in the run's notes (issue 27: a plan's threads under another load).
    code = (
        "import os, types, torch\n"
        "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
        "from autotune.strategies.cpu_threads import CpuThreadsConfig, apply_cpu_threads\n"
        "ctx = types.SimpleNamespace(notes=[])\n"
        "apply_cpu_threads(ctx, CpuThreadsConfig(threads=2))\n"
        "print(torch.get_num_threads(), ctx.notes[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1 cpu threads 1 (the plan's 2: this process may use only 1)"
