"""The fused residual add + norm kernels (kernels/fused_add_norm.py) against their plain-torch
references (kernels/reference.py): both outputs (the norm and the new residual stream) and the
gradients of x, residual, weight and bias. Without a GPU they run in Triton's interpreter
(conftest.py sets TRITON_INTERPRET=1), on small shapes; the interpreter's tiles are 64 elements,
so every width but 1 and 7 is a row a tile, and the backward's two programs loop over tiles.

Tolerances come from measured error, as in tests/test_kernels.py: each output is compared with
the reference computed in fp64 from the same (bf16- or fp32-valued) inputs, and the kernel's
largest error must be within FACTOR of the reference's own in the kernel's dtype (or of half a
unit in the last place of the largest value, where the reference's is smaller: d=1 is exact in
both). The new residual stream must equal the reference's bit for bit (one rounding of the exact
sum). Worst over seeds 0..2, SHAPES, both norms and weight/bias choices, RMSNorm without a weight
too (interpreter, triton 3.6, torch 2.13 on the CPU; reproduce with _ratios(..., seed)):

    bf16  kernel / reference <= 1.0: y (the same fp32 value rounded once, bit for bit on the
          CPU), d weight; 0.92 d x and d residual, 0.75 d bias (the reference rounds the two
          gradients of s to bf16 before adding them, ours adds in fp32 and rounds once)
    fp32  kernel / reference <= 2.17 (d weight, LayerNorm, d 7, seed 0: 1.3e-6 against 6.1e-7 of 9.2,
          another order of the sum over rows), 1.44 d bias, 1.39 y, 1.23 d x and d residual

The interpreter casts fp32 to bf16 by truncation where a GPU rounds to nearest; the kernels round
by hand there (kernels/fused_add_norm.py, ``_rounded``), or bf16 outputs would be up to one ulp
off. A kernel that drops a term (0.1% of the mean's gradient, 1% of the residual stream's, eps
doubled, the weight's gradient of s instead of x-hat) fails 10 to 24 of these cases.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the kernels need the triton package (the dev extra installs it)")

from autotune.kernels import fused_add_norm, reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FACTOR = 3
"""The kernel's error may be this many times the reference's (2.17 measured at worst, above)."""

SHAPES = [
    # (leading shape, d): the interpreter's tiles are 64 elements (BLOCK_M rows of next_pow2(d))
    pytest.param((5,), 1, id="width-1"),
    pytest.param((2, 9), 7, id="width-7-two-tiles-of-8-rows"),
    pytest.param((3,), 100, id="width-100-three-tiles-two-programs"),
    pytest.param((1,), 1000, id="width-1000-one-row"),
]
AFFINE = [
    pytest.param("layer", True, True, id="layer-weight-bias"),
    pytest.param("layer", True, False, id="layer-weight-no-bias"),
    pytest.param("layer", False, False, id="layer-no-weight"),
    pytest.param("rms", True, False, id="rms-weight"),
]
FUSED = {"layer": fused_add_norm.add_layer_norm, "rms": fused_add_norm.add_rms_norm}
REFERENCE = {"layer": reference.add_layer_norm, "rms": reference.add_rms_norm}


def _inputs(lead: tuple[int, ...], d: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """x (a sublayer's output), the residual stream, the norm's weight and bias, and the two
    gradients that come back: of the norm's output and of the residual stream."""
    gen = torch.Generator().manual_seed(seed)
    shape = (*lead, d)
    return {
        "x": torch.randn(shape, generator=gen),
        "residual": torch.randn(shape, generator=gen) * 2,
        "weight": 1 + 0.1 * torch.randn(d, generator=gen),
        "bias": 0.1 * torch.randn(d, generator=gen),
        "dy": torch.randn(shape, generator=gen),
        "ds": torch.randn(shape, generator=gen),
    }


def _outputs_and_grads(fn, t: dict[str, torch.Tensor], dtype, norm: str, weight: bool, bias: bool):
    """fn's (y, s) and the gradients of x, residual, weight and bias (None where absent), on copies in dtype."""
    x, residual = (t[k].to(DEVICE, dtype, copy=True).requires_grad_() for k in ("x", "residual"))
    w = t["weight"].to(DEVICE, dtype, copy=True).requires_grad_() if weight else None
    b = t["bias"].to(DEVICE, dtype, copy=True).requires_grad_() if bias else None
    y, s = fn(x, residual, w) if norm == "rms" else fn(x, residual, w, b)
    torch.autograd.backward((y, s), (t["dy"].to(DEVICE, dtype), t["ds"].to(DEVICE, dtype)))
    return {
        "y": y,
        "s": s,
        "d x": x.grad,
        "d residual": residual.grad,
        "d weight": None if w is None else w.grad,
        "d bias": None if b is None else b.grad,
    }


def _error(got, exact) -> float:
    return (got.double() - exact).abs().max().item()


def _ratios(norm, weight, bias, lead, d, dtype, seed=0) -> dict[str, float]:
    """Per output: the kernel's error over the reference's (or one ulp of the largest value)."""
    t = {k: v.to(dtype) for k, v in _inputs(lead, d, seed).items()}  # the values both sides see
    exact, theirs = (
        _outputs_and_grads(REFERENCE[norm], t, precision, norm, weight, bias) for precision in (torch.float64, dtype)
    )
    ours = _outputs_and_grads(FUSED[norm], t, dtype, norm, weight, bias)
    assert torch.equal(ours["s"], theirs["s"]), "the residual stream is x + residual rounded once, both sides"
    ratios = {}
    for name, got in ours.items():
        if got is None:
            assert exact[name] is None, name
            continue
        assert got.dtype == dtype and got.shape == exact[name].shape, name
        floor = torch.finfo(dtype).eps / 2 * exact[name].abs().max().item()  # half an ulp of the largest
        ratios[name] = _error(got, exact[name]) / max(_error(theirs[name], exact[name]), floor, 1e-300)
    return ratios


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("norm, weight, bias", AFFINE)
@pytest.mark.parametrize("lead, d", SHAPES)
def test_fused_add_norm_matches_the_reference(norm, weight, bias, lead, d, dtype):
    ratios = _ratios(norm, weight, bias, lead, d, dtype)
    assert max(ratios.values()) <= FACTOR, ratios


def test_only_the_residual_stream_used_passes_its_gradient():
    """y unused (no gradient comes back to it): x and residual get the stream's gradient as is."""
    t = _inputs((4,), 12)
    x, residual = t["x"].to(DEVICE).requires_grad_(), t["residual"].to(DEVICE).requires_grad_()
    weight = t["weight"].to(DEVICE).requires_grad_()
    _, s = fused_add_norm.add_rms_norm(x, residual, weight)
    s.backward(t["ds"].to(DEVICE))
    assert torch.equal(x.grad, t["ds"]) and torch.equal(residual.grad, t["ds"]) and not weight.grad.any()


def test_a_residual_of_another_shape_is_refused():
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"residual \(2, 4\)"):
        fused_add_norm.add_layer_norm(x, torch.zeros(2, 4, device=DEVICE), None)
