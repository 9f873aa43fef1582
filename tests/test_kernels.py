"""The Triton kernels of kernels/ against their plain-torch references (kernels/reference.py),
forward and both gradients. Without a GPU they run in Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 before triton is first imported), on shapes small enough for it.

Tolerances come from measured error. Each output is compared with the reference computed in
fp64 from the same (bf16- or fp32-valued) inputs: the kernel's largest error must be within
FACTOR of the reference's own in the kernel's dtype (or of fp32's rounding of the largest value,
where the reference's is smaller: the loss is fp32 in both). Worst over seeds 0..2 and SHAPES
(interpreter, triton 3.6, torch 2.13 on the CPU; reproduce with _inputs(..., seed)):

    bf16  reference: loss 6.8e-3, d hidden 3.6e-3, d weight 4.6e-3
          kernel:    loss 6.8e-3, d hidden 5.3e-3, d weight 6.4e-3
          kernel / reference: 2.78 at worst (d weight, two-vocab-splits, seed 0: one bf16 ulp
          where the reference's error was under half of one), 2.66 for d hidden; the loss is
          the reference's (both read the same bf16 logits)
    fp32  reference: loss 4.8e-7, d hidden 6.2e-7, d weight 1.1e-7
          kernel:    loss 9.5e-7, d hidden 7.4e-7, d weight 1.5e-7; kernel / reference <= 1.66

in one chunk and in chunks of 7 tokens alike.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the kernels need the triton package (the dev extra installs it)")

from autotune.kernels import reference  # noqa: E402
from autotune.kernels.fused_linear_cross_entropy import linear_cross_entropy  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FACTOR = 4
"""The kernel's error may be this many times the reference's (2.78 measured at worst, above)."""

SHAPES = [
    # (tokens, d, padded vocab, true vocab): the interpreter's tiles are 16 tokens x 32 columns x 16 of d
    pytest.param(40, 32, 37, None, id="3-token-tiles-vocab-past-a-tile"),
    pytest.param(5, 24, 1100, None, id="two-vocab-splits-d-past-a-tile"),
    pytest.param(1, 16, 50, 45, id="one-token-padded-vocab"),
    pytest.param(24, 48, 100, 90, id="padded-vocab"),
]


def _inputs(tokens: int, d: int, vocab: int, true_vocab: int | None, seed: int = 0):
    """Hidden states, a head's weight (a model's scale: logits of a few units) and targets,
    the first of them ignored where there are several."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, d, generator=gen)
    weight = torch.randn(vocab, d, generator=gen) * 0.5
    targets = torch.randint(0, true_vocab or vocab, (tokens,), generator=gen)
    if tokens > 1:
        targets[0] = -100
    return hidden, weight, targets


def _loss_and_grads(fn, hidden, weight, targets, dtype, **kwargs):
    """fn's loss and its gradients for hidden and weight, on copies in ``dtype``."""
    hidden = hidden.to(DEVICE, dtype, copy=True).requires_grad_()
    weight = weight.to(DEVICE, dtype, copy=True).requires_grad_()
    loss = fn(hidden, weight, targets.to(DEVICE), **kwargs)
    loss.backward()
    return loss, hidden.grad, weight.grad


def _error(got, exact) -> float:
    return (got.double() - exact).abs().max().item()


@pytest.mark.parametrize("chunk", [None, 7], ids=["one-chunk", "chunks-of-7"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens, d, vocab, true_vocab", SHAPES)
def test_fused_linear_cross_entropy_matches_the_reference(tokens, d, vocab, true_vocab, dtype, chunk):
    hidden, weight, targets = _inputs(tokens, d, vocab, true_vocab)
    hidden, weight = hidden.to(dtype), weight.to(dtype)  # the values both sides see
    exact, theirs = (
        _loss_and_grads(reference.linear_cross_entropy, hidden, weight, targets, precision, vocab_size=true_vocab)
        for precision in (torch.float64, dtype)
    )
    ours = _loss_and_grads(linear_cross_entropy, hidden, weight, targets, dtype, vocab_size=true_vocab, chunk=chunk)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == ours[2].dtype == dtype
    for name, got, ref, ex in zip(("loss", "d hidden", "d weight"), ours, theirs, exact):
        floor = torch.finfo(torch.float32).eps * ex.abs().max().item()
        assert _error(got, ex) <= FACTOR * max(_error(ref, ex), floor), name
    if true_vocab is not None:  # a padded head's extra rows take no gradient
        assert not ours[2][true_vocab:].any()


@pytest.mark.parametrize("tokens", [3, 0], ids=["all-ignored", "no-tokens"])
def test_no_counted_target_gives_zero_loss_and_gradients(tokens):
    hidden, weight, targets = _inputs(tokens, 16, 40, None)
    loss, d_hidden, d_weight = _loss_and_grads(
        linear_cross_entropy, hidden, weight, torch.full_like(targets, -7), torch.float32, ignore_index=-7
    )
    assert loss.item() == 0 and not d_hidden.any() and not d_weight.any()


def test_tied_embedding_takes_both_gradients():
    """The head's weight is the embedding's: its gradient is the lookup's plus the loss's."""
    ids, targets = torch.tensor([[3, 1, 4, 1, 5]]), torch.tensor([[1, 5, 9, 2, 6]])
    grads = []
    for loss_fn in (linear_cross_entropy, reference.linear_cross_entropy):
        embedding = torch.nn.Embedding(40, 16, device=DEVICE)
        torch.nn.init.normal_(embedding.weight, generator=torch.Generator(DEVICE).manual_seed(0))
        loss_fn(embedding(ids.to(DEVICE)), embedding.weight, targets.reshape(-1).to(DEVICE)).backward()
        grads.append(embedding.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_autocast_runs_the_head_in_its_dtype():
    """As the unfused head's nn.Linear would: bf16 matmuls, fp32 loss, fp32 parameters' gradients."""
    hidden, weight, targets = _inputs(8, 16, 40, None)
    results = []
    for loss_fn in (linear_cross_entropy, reference.linear_cross_entropy):
        h, w = hidden.to(DEVICE).requires_grad_(), weight.to(DEVICE).requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = loss_fn(h, w, targets.to(DEVICE))
        loss.backward()
        results.append((loss, h.grad, w.grad))
    (loss, d_hidden, d_weight), (ref_loss, ref_d_hidden, ref_d_weight) = results
    assert loss.dtype == d_hidden.dtype == d_weight.dtype == torch.float32
    # Both round the logits to bf16; the gradients' order of sums differs.
    torch.testing.assert_close(loss, ref_loss, atol=1e-2, rtol=0)
    torch.testing.assert_close(d_hidden, ref_d_hidden, atol=1e-2, rtol=0)
    torch.testing.assert_close(d_weight, ref_d_weight, atol=1e-2, rtol=0)


def test_a_compiled_model_calls_it_outside_its_graph():
    """torch.compile stops at the loss (dynamo's eager backend: what is traced, not inductor)."""
    hidden, weight, targets = (t.to(DEVICE) for t in _inputs(8, 16, 40, None))
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU()).to(DEVICE)
    step = torch.compile(lambda h: linear_cross_entropy(model(h), weight, targets), backend="eager")
    torch.testing.assert_close(step(hidden), linear_cross_entropy(model(hidden), weight, targets))


def test_without_gradients_only_the_loss_is_computed():
    """Evaluation (torch.no_grad): the same loss, no gradient pass, nothing saved."""
    hidden, weight, targets = (t.to(DEVICE) for t in _inputs(24, 48, 100, 90))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, vocab_size=90, chunk=5)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference.linear_cross_entropy(hidden, weight, targets, vocab_size=90))


def test_a_vocab_size_past_the_weight_is_refused():
    hidden, weight, targets = _inputs(2, 16, 40, None)
    with pytest.raises(ValueError, match="vocab_size 41 is not in 1..40"):
        linear_cross_entropy(hidden, weight, targets, vocab_size=41)


@pytest.mark.slow
def test_every_config_compiles_for_hopper_without_spilling(python):
    """No GPU here: compile each Hopper config to a cubin (tests/hopper_compile.py) and check
    that none spills registers or asks for more than an H100's 227 KiB of shared memory."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [python, str(Path(__file__).with_name("hopper_compile.py"))],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(kernels) == 2
    for kernel in kernels:
        assert kernel["stack"] == 0 and kernel["shared"] <= 227 * 1024, kernel


def test_the_strategys_fused_loss_trains_a_gpt_as_its_own_loss_does():
    """triton_kernels' loss "autotune" through the GPT's loss hook, compiled (dynamo's eager
    backend: the loss is a graph break): the model's own loss and gradients, padded tied head.
    The fused model is compiled first: dynamo must not reuse its code for the model's own loss
    (it did, calling None, while the hook itself was the disabled function: bench/README.md)."""
    from autotune.strategies.triton_kernels import head_loss
    from autotune.workloads.adapter import adapter_for
    from autotune.workloads.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=90, seq_len=8, d_model=32, n_layers=2, n_heads=4)).to(DEVICE)
    adapter = adapter_for(model)
    adapter.pad_vocab(64)
    ids, targets = torch.randint(0, 90, (2, 8), device=DEVICE), torch.randint(0, 90, (2, 8), device=DEVICE)
    results, names = [], []
    for fn in (head_loss("autotune"), None):
        adapter.set_head_loss(fn)
        model.zero_grad()
        loss = torch.compile(model, backend="eager")(ids, targets)
        names.append(loss.grad_fn.name())
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fused, fused_grads), (own, own_grads) = results
    assert names[0] == "LinearCrossEntropyFunctionBackward" != names[1]
    torch.testing.assert_close(fused, own)
    for name, grad in own_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "others, message",
    [
        ({"pipeline_parallel": None}, "cannot run with pipeline_parallel: the last stage returns logits"),
        ({"tensor_parallel": None}, "cannot run with tensor_parallel"),
        ({"zero": "stage 3"}, "cannot run with zero stage 3"),
    ],
)
def test_a_fused_loss_is_refused_where_the_heads_weight_is_not_whole(others, message):
    from autotune import catalog
    from autotune.errors import UserError

    strategies = catalog.catalog()
    chosen = {"triton_kernels": strategies["triton_kernels"].config(loss="autotune")}
    for name in others:
        chosen[name] = strategies[name].config(stage=3) if name == "zero" else strategies[name].default()
    with pytest.raises(UserError, match=message):
        strategies["triton_kernels"].check_with(chosen)
    chosen["triton_kernels"] = strategies["triton_kernels"].config(loss="compile")
    strategies["triton_kernels"].check_with(chosen)  # the model's own loss runs with any of them
