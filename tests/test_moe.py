"""The moe strategy (strategies/moe.py) on the CPU: the router, capacity, the aux loss and
its gradient-only trick on hand-built cases, one expert against the dense MLP, and training
the tiny GPT through the real Trainer."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from autotune import catalog
from autotune.contract.context import TrainContext
from autotune.errors import UserError
from autotune.runtime.trainer import Trainer
from autotune.strategies.moe import MoeConfig, MoeMLP, apply_moe, capacity, load_balancing_loss, route, slots
from autotune.workloads import load_workload
from autotune.workloads.gpt import MLP, GPTConfig
from tests.strategy_suite import TINY, bare_workload, make_plan, train_losses

D, D_FF = 8, 16


def tiny_mlp() -> MLP:
    torch.manual_seed(0)
    return MLP(GPTConfig(vocab_size=16, seq_len=8, d_model=D, n_layers=1, n_heads=2, d_ff=D_FF))


def layer(**knobs) -> MoeMLP:
    return MoeMLP(tiny_mlp(), MoeConfig(**knobs))


def test_one_expert_with_room_for_all_is_the_dense_mlp_outputs_and_gradients() -> None:
    dense = tiny_mlp()
    moe = MoeMLP(copy.deepcopy(dense), MoeConfig(num_experts=1, top_k=1, capacity_factor=16, aux_loss_coef=0.0))
    x = torch.randn(3, 5, D, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = dense(x), moe(x2)
    torch.testing.assert_close(y2, y)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x.grad)
    torch.testing.assert_close(moe.w_fc.grad[0], dense.fc.weight.grad.t())
    torch.testing.assert_close(moe.w_proj.grad[0], dense.proj.weight.grad.t())
    assert float(moe.last_dropped) == 0.0
    torch.testing.assert_close(moe.router.weight.grad, torch.zeros_like(moe.router.weight))  # softmax of one is 1


def test_experts_start_as_copies_of_the_mlp() -> None:
    mlp = tiny_mlp()
    moe = MoeMLP(mlp, MoeConfig(num_experts=4, top_k=2))
    assert moe.w_fc.shape == (4, D, D_FF) and moe.w_proj.shape == (4, D_FF, D)
    for e in range(4):
        assert torch.equal(moe.w_fc[e], mlp.fc.weight.t()) and torch.equal(moe.w_proj[e], mlp.proj.weight.t())


def test_router_picks_the_top_k_by_softmax_probability() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
    probs, weights, experts = route(logits, 2)
    torch.testing.assert_close(probs, torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
    assert experts.tolist() == [[1, 2], [0, 2]]
    torch.testing.assert_close(weights, torch.tensor([[0.6, 0.3], [0.5, 0.3]]))  # not renormalised


def test_outputs_are_the_chosen_experts_weighted_by_the_router() -> None:
    moe = layer(num_experts=3, top_k=2, capacity_factor=16)
    with torch.no_grad():
        moe.w_proj[1] *= 2.0  # expert 1 outputs twice the MLP's, expert 2 three times
        moe.w_proj[2] *= 3.0
    x = torch.randn(2, D)
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
    y, _, _ = moe.mix(x, logits)
    dense = tiny_mlp()(x)
    expected = torch.stack([(0.6 * 2 + 0.3 * 3) * dense[0], (0.5 * 1 + 0.3 * 3) * dense[1]])
    torch.testing.assert_close(y, expected)


def test_tokens_over_capacity_get_nothing_from_the_expert() -> None:
    moe = layer(num_experts=2, top_k=1, capacity_factor=0.8)
    assert capacity(5, 2, 1, 0.8) == 2  # ceil(0.8 * 5 * 1 / 2)
    x = torch.randn(5, D)
    logits = torch.tensor([[5.0, 0.0]]).expand(5, -1)  # every token to expert 0
    y, probs, _ = moe.mix(x, logits)
    dense = tiny_mlp()(x)
    torch.testing.assert_close(y[:2], probs[:2, :1] * dense[:2])  # the first two fit
    assert torch.equal(y[2:], torch.zeros(3, D))  # the other three pass through the residual
    assert float(moe.last_dropped) == pytest.approx(0.6)


def test_first_choices_take_the_slots_before_second_choices() -> None:
    experts = torch.tensor([[0, 1], [1, 0], [0, 1]])  # (N=3, k=2)
    slot, keep = slots(experts, 2, 2)
    # choice-major: first choices 0, 1, 0 -> slots 0, 2, 1; second choices 1, 0, 1 -> 3, full, full
    assert slot.tolist() == [0, 2, 1, 3, 4, 4] and keep.tolist() == [True, True, True, True, False, False]


def test_load_balancing_loss_on_a_hand_built_case() -> None:
    logits = torch.log(torch.tensor([[0.75, 0.25]] * 3 + [[0.25, 0.75]]))
    probs, _, experts = route(logits, 1)
    # f = (3/4, 1/4), P = (0.625, 0.375): 2 * (0.75 * 0.625 + 0.25 * 0.375) = 1.125
    assert float(load_balancing_loss(probs, experts, 2)) == pytest.approx(1.125)
    balanced = torch.log(torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    assert float(load_balancing_loss(*route(balanced, 1)[::2], 2)) == pytest.approx(1.0)


def test_aux_loss_reaches_the_router_gradient_but_not_the_output() -> None:
    coef = 0.5
    with_aux, without = (
        layer(num_experts=4, top_k=2, aux_loss_coef=coef),
        layer(num_experts=4, top_k=2, aux_loss_coef=0.0),
    )
    without.load_state_dict(with_aux.state_dict())
    x = torch.randn(2, 6, D)
    y, y0 = with_aux(x), without(x)
    assert torch.equal(y, y0)  # the reported loss is the same
    y.sum().backward()
    # reference: the plain output plus coef times the aux loss, by hand
    probs, _, experts = route(without.router(x.reshape(-1, D)), 2)
    (y0.sum() + coef * load_balancing_loss(probs, experts, 4)).backward()
    torch.testing.assert_close(with_aux.router.weight.grad, without.router.weight.grad)
    torch.testing.assert_close(with_aux.w_fc.grad, without.w_fc.grad)
    assert float(with_aux.last_aux_loss) == pytest.approx(float(load_balancing_loss(probs, experts, 4).detach()))
    plain = layer(num_experts=4, top_k=2, aux_loss_coef=0.0)
    plain.load_state_dict(with_aux.state_dict())
    plain(x).sum().backward()
    assert not torch.allclose(plain.router.weight.grad, with_aux.router.weight.grad)


def test_apply_converts_every_nth_block_and_training_learns() -> None:
    trainer = Trainer(make_plan({"moe": {"num_experts": 4, "top_k": 2, "every_n_layers": 2}}, "cpu"))
    try:
        blocks = trainer.ctx.model.blocks
        assert isinstance(blocks[0].mlp, MoeMLP) and isinstance(blocks[1].mlp, MLP)
        assert any(n.startswith("moe: MLPs of 1 of 2 blocks -> 4 experts") for n in trainer.ctx.notes)
        losses = train_losses(trainer, 20)
    finally:
        trainer.close()
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
    assert 0.0 <= float(blocks[0].mlp.last_dropped) < 1.0


def test_declared_needs_and_a_workload_without_them_is_refused() -> None:
    s = catalog.get("moe")
    assert s.implemented and not s.exact and s.needs.structure == {"mlp", "blocks"}
    bare = bare_workload()
    ctx = TrainContext(workload=bare, device=torch.device("cpu"), model=bare.build_model())
    with pytest.raises(UserError, match="needs the workload to declare"):
        apply_moe(ctx, MoeConfig())


def test_an_mlp_of_another_shape_is_refused() -> None:
    workload = load_workload("tiny", TINY)
    model = workload.build_model()
    for block in model.blocks:
        block.mlp = torch.nn.Sequential(torch.nn.Linear(128, 128))
    ctx = TrainContext(workload=workload, device=torch.device("cpu"), model=model)
    with pytest.raises(UserError, match="converts MLPs of fc, GELU, proj"):
        apply_moe(ctx, MoeConfig())


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="top_k"):
        MoeConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="aux_loss_coef"):
        MoeConfig(aux_loss_coef=2.0)
    with pytest.raises(ValueError, match="aux_loss_coef"):
        MoeConfig(aux_loss_coef=float("nan"))


def test_traces_as_one_graph() -> None:
    # The compile strategy comes after moe: no graph break in routing, slotting or the aux trick.
    moe = layer(num_experts=4, top_k=2)
    x = torch.randn(2, 5, D)
    expected = moe(x)
    y = torch.compile(moe, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert moe.router.weight.grad is not None and moe.w_fc.grad is not None


def test_aux_loss_gradient_is_divided_under_gradient_accumulation() -> None:
    # The Trainer's own step over 4 micro-batches: the router's gradient is the mean of each
    # micro-batch's own gradient (main loss plus coef x aux loss), not 4 times the aux part.
    s = 4
    trainer = Trainer(
        make_plan(
            {"moe": {"num_experts": 4, "top_k": 2, "capacity_factor": 2.0}, "grad_accum": {"steps": s}},
            "cpu",
            micro_batch_size=2,
        )
    )
    try:
        model = trainer.ctx.model
        reference = copy.deepcopy(model)
        for m in reference.modules():
            if isinstance(m, MoeMLP):
                m.aux_loss_scale = None  # one micro-batch per step: scale 1
        router = model.blocks[0].mlp.router.weight
        seen: list[torch.Tensor] = []
        router.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.detach().clone()))
        micro = [trainer.batches.get(0, i) for i in range(s)]
        trainer.train_step(0)
    finally:
        trainer.close()
    assert len(seen) == s
    expected = sum(_router_grad(reference, x, y) for x, y in micro) / s
    torch.testing.assert_close(seen[-1], expected, rtol=0, atol=1e-6)
    unscaled = copy.deepcopy(reference)  # the old bug: the aux part weighs s times more
    for m in unscaled.modules():
        if isinstance(m, MoeMLP):
            m.aux_loss_scale = lambda: float(s)
    assert not torch.allclose(seen[-1], sum(_router_grad(unscaled, x, y) for x, y in micro) / s, atol=1e-6)


def _router_grad(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    model(x, y).backward()
    return model.blocks[0].mlp.router.weight.grad.clone()


def test_accumulated_micro_batches_of_the_same_rows_are_one_batch() -> None:
    # s micro-batches of rows x, each loss / s, give the gradient of one batch of s copies of x.
    s = 3
    moe = layer(num_experts=4, top_k=2, capacity_factor=16, aux_loss_coef=0.1)
    one = copy.deepcopy(moe)
    moe.aux_loss_scale = lambda: 1.0 / s
    x = torch.randn(2, 5, D)
    for _ in range(s):
        (moe(x).square().mean() / s).backward()
    one(x.repeat(s, 1, 1)).square().mean().backward()
    torch.testing.assert_close(moe.router.weight.grad, one.router.weight.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(moe.w_fc.grad, one.w_fc.grad, rtol=0, atol=1e-6)


def test_expert_memory_per_process_divides_by_ep() -> None:
    from autotune import costmodel

    workload = load_workload("tiny", TINY)
    configs = {
        n: catalog.get(n).parse(k) for n, k in {"moe": {"num_experts": 4, "every_n_layers": 2}, "ddp": {}}.items()
    }
    ep2 = {**configs, "moe": catalog.get("moe").parse({"num_experts": 4, "every_n_layers": 2, "ep": 2})}
    whole = costmodel.estimate(workload, 2, configs, processes=2)
    split = costmodel.estimate(workload, 2, ep2, processes=2)
    d, d_ff = workload.config.d_model, workload.config.d_ff
    # 1 converted block of 2: 2 of its 4 experts (fc and proj, d x d_ff each) on each process, fp32
    assert whole.breakdown["weights"] - split.breakdown["weights"] == 4 * 2 * (2 * d * d_ff)
    assert split.flops_per_step == whole.flops_per_step


def test_ep_bounds_and_one_process_is_refused() -> None:
    with pytest.raises(ValueError, match="ep must be from 1 to 256 and divide num_experts"):
        MoeConfig(num_experts=6, ep=4)
    with pytest.raises(ValueError, match="ep must"):
        MoeConfig(ep=0)
    workload = load_workload("tiny", TINY)
    ctx = TrainContext(workload=workload, device=torch.device("cpu"), model=workload.build_model())
    with pytest.raises(UserError, match="moe ep 2 needs a multiple of 2 data-parallel processes"):
        apply_moe(ctx, MoeConfig(num_experts=4, ep=2))


def test_the_strategy_module_imports_without_torch() -> None:
    import subprocess
    import sys

    code = "import sys, autotune.strategies.moe as m; m.STRATEGY; m.MoeConfig(ep=2); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_aux_loss_refuses_the_loss_scales_it_does_not_follow() -> None:
    from autotune import validate

    parse = lambda name, knobs: catalog.get(name).parse(knobs)  # noqa: E731
    with pytest.raises(UserError, match="fp16's loss scale"):
        validate.settings({"precision": parse("precision", {"dtype": "fp16"}), "moe": parse("moe", {})})
    with pytest.raises(UserError, match="pipeline_parallel's pieces"):
        validate.settings({"pipeline_parallel": parse("pipeline_parallel", {}), "moe": parse("moe", {})})
    validate.settings({"precision": parse("precision", {"dtype": "fp16"}), "moe": parse("moe", {"aux_loss_coef": 0.0})})
    validate.settings({"precision": parse("precision", {"dtype": "bf16"}), "moe": parse("moe", {})})
    with pytest.raises(UserError, match="compile scope blocks"):
        validate.settings(
            {"compile": parse("compile", {"scope": "model"}), "moe": parse("moe", {"num_experts": 4, "ep": 2})}
        )
    validate.settings(
        {"compile": parse("compile", {"scope": "blocks"}), "moe": parse("moe", {"num_experts": 4, "ep": 2})}
    )


def test_the_dropped_fraction_is_recorded_in_trial_figures_and_the_run_log(tmp_path) -> None:
    """moe reports ``moe_dropped`` (TrainContext.metrics): a trial's figures hold its mean over
    the timed steps, the run log its mean over each interval; a dense plan reports none."""
    import json

    from autotune.runtime.measure import measure
    from autotune.runtime.trainer import RunOptions, run
    from autotune.runtime.trial import TrialBudget

    budget = TrialBudget(warmup_steps=1, timed_steps=3)
    tight = make_plan({"moe": {"num_experts": 4, "top_k": 2, "capacity_factor": 0.5}}, "cpu")
    figures = measure(tight, budget).figures
    assert figures.status == "ok"
    # Capacity 0.5 holds half the choices at most: at least half are dropped.
    assert set(figures.metrics) == {"moe_dropped"} and 0.5 <= figures.metrics["moe_dropped"] < 1.0
    roomy = make_plan({"moe": {"num_experts": 1, "top_k": 1, "capacity_factor": 8.0}}, "cpu")
    assert measure(roomy, budget).figures.metrics == {"moe_dropped": 0.0}
    assert measure(make_plan({}, "cpu"), budget).figures.metrics is None
    run(tight, RunOptions(steps=4, out_dir=tmp_path / "run"))
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    flushed = [r for r in records if "moe_dropped" in r]
    assert flushed and all(0.5 <= r["moe_dropped"] < 1.0 for r in flushed)


def test_the_trial_table_prints_the_dropped_fraction() -> None:
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from autotune.cli.plan_view import TrialTable
    from autotune.plan import Figures
    from autotune.runtime.trial import TrialResult

    out = io.StringIO()
    table = TrialTable(Console(file=out, width=200))
    plan = make_plan({"moe": {"num_experts": 4, "top_k": 2}}, "cpu")
    figures = Figures(status="ok", tokens_per_s=1000.0, metrics={"moe_dropped": 0.0625})
    table.row(SimpleNamespace(number=3, user_attrs={}), plan, TrialResult(figures=figures), "ok")
    assert "moe_dropped 0.0625" in out.getvalue()
