"""The XLA device on torch-xla's real runtime (XLA's CPU backend): what it finds, its sync and
timer, memory, autocast, matmul precision, the optimizer it builds and the model it places."""

from __future__ import annotations

import torch

from autotune import devices
from autotune.devices import xla as xlamod

XLA = devices.get("xla")


def test_the_cpu_backend_is_found_and_named() -> None:
    assert XLA.is_available() and XLA.count() == 1 and not XLA.surely_absent()
    assert devices.available()[0] is XLA and devices.detect() is XLA  # PJRT_DEVICE chose it
    device = XLA.torch_device(None)
    assert device.type == "xla" and XLA.device_name(device) == "CPU (XLA)"
    assert XLA.found_here(device) == devices.Found(count=1, name="CPU (XLA)") and XLA.memories() == []
    assert xlamod.versions() == ("2.9.0", torch.__version__.split("+")[0], None)
    notes: list[str] = []
    assert XLA.detect(notes) == (devices.Found(count=1, name="CPU (XLA)"), "2.9.0")
    assert any("CPU backend" in note for note in notes)


def test_sync_timer_memory_and_rng() -> None:
    device = XLA.torch_device(None)
    a = torch.randn(64, 64, device=device)
    with XLA.timer(device) as t:
        b = a @ a
        XLA.mark_step(device)
    assert t.finished() and t.seconds() > 0
    XLA.synchronize(device)
    assert b.cpu().shape == (64, 64)
    assert XLA.peak_memory_bytes(device) > 1 << 20  # the CPU backend reports none: the host's peak
    state = XLA.rng_state(device)
    XLA.set_rng_state(state, device)
    assert XLA.rng_state(device) == state


def test_autocast_precision_and_the_optimizer() -> None:
    import torch_xla.backends

    device = XLA.torch_device(None)
    a = torch.randn(8, 8, device=device)
    with XLA.autocast(device, torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        with XLA.autocast(device, None):
            assert (a @ a).dtype == torch.float32
    XLA.allow_tf32(True)
    assert torch_xla.backends.get_mat_mul_precision() == "high"
    XLA.allow_tf32(False)
    assert torch_xla.backends.get_mat_mul_precision() == "highest"
    assert XLA.optimizer_kwargs() == {"foreach": False}


def test_a_tied_head_stays_tied_and_adamw_state_is_made_before_the_first_step() -> None:
    device = XLA.torch_device(None)
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16, bias=False))
    model[1].weight = model[0].weight
    XLA.place(model, device)
    assert model[1].weight is model[0].weight and model[0].weight.device.type == "xla"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, **XLA.optimizer_kwargs())
    XLA.prepare_optimizer(optimizer)
    (state,) = optimizer.state.values()  # one parameter: the tied one
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and float(state["step"]) == 0.0
    assert state["exp_avg"].device.type == "xla" and float(state["exp_avg_sq"].abs().sum()) == 0.0
    x = torch.arange(16, device=device).view(2, 8)
    model(x).float().pow(2).mean().backward()
    optimizer.step()  # AdamW takes the state as its own (the step counts on)
    XLA.mark_step(device)
    assert float(state["step"]) == 1.0 and float(state["exp_avg"].abs().sum()) > 0
