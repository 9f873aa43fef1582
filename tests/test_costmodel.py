"""The cost model against peak memory measured on an H200 (committed bench results)."""

import json

import pytest

from autotune import catalog, costmodel
from autotune.workloads import load_workload
from tests.conftest import ROOT

MEASURED = ROOT / "bench" / "results" / "single_device_h200.jsonl"


def rows():
    out = []
    for line in MEASURED.read_text().splitlines():
        row = json.loads(line)
        if row["status"] == "ok" and row["workload"] == "phase8-small":
            out.append(pytest.param(row, id=row["variant"]))
    return out


@pytest.mark.parametrize("row", rows())
def test_peak_memory_within_15_percent_of_h200_measurement(row):
    workload = load_workload(row["workload"])
    configs = {name: catalog.get(name).parse(knobs) for name, knobs in row["strategies"].items()}
    estimate = costmodel.estimate(workload, row["micro_batch"], configs)
    error = estimate.peak_memory_bytes / row["peak_memory_bytes"] - 1
    assert abs(error) < 0.15, (row["variant"], f"{error:+.1%}", estimate.breakdown)


def test_peak_memory_within_15_percent_over_the_h200_study():
    # Every completed trial of the committed phase8-small study (bench/results/plan-phase8-small),
    # predicted again by the current model: block-by-block compile leaves the loss eager.
    import optuna

    from autotune import plan as planmod

    study = optuna.load_study(study_name=None, storage=f"sqlite:///{ROOT / 'bench/results/plan-phase8-small/studies.db'}")
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) >= 5
    for t in trials:
        plan = planmod.from_dict(t.user_attrs["plan"])
        estimate = costmodel.estimate(load_workload(plan.workload.name), plan.train.micro_batch_size, plan.strategy_configs())
        error = estimate.peak_memory_bytes / t.user_attrs["figures"]["peak_memory_bytes"] - 1
        assert abs(error) < 0.15, (t.number, f"{error:+.1%}")


def test_sharded_state_per_process():
    # The state splits as the strategies say; unchecked against measured multi-GPU peaks
    # (see costmodel.estimate), so these are the model's own rules, stated once.
    workload = load_workload("gpt-1b")

    def state(processes, **strategies):
        configs = {name: catalog.get(name).parse(knobs) for name, knobs in strategies.items()}
        b = costmodel.estimate(workload, 4, configs, processes=processes).breakdown
        return b["weights"], b["gradients"], b["optimizer"], b["activations"]

    w, g, o, a = state(1)
    assert state(2, ddp={}) == (w, g, o, a)
    assert state(2, zero={"stage": 1}) == (w, g, o / 2, a)
    assert state(2, zero={"stage": 2}) == (w, g / 2, o / 2, a)
    assert state(2, zero={"stage": 3}) == (w / 2, g / 2, o / 2, a)
    assert state(2, fsdp2={}) == (w / 2, g / 2, o / 2, a)
    assert state(2, zero={"stage": 3, "offload_optimizer": True, "offload_params": True}) == (0, g / 2, 0, a)
    tw, _, _, ta = state(2, tensor_parallel={"degree": 2})
    c = workload.config
    whole = c.vocab_size * c.d_model + c.seq_len * c.d_model + c.d_model  # embedding etc. stay whole
    assert tw == pytest.approx(4 * ((w / 4 - whole) / 2 + whole)) and ta == pytest.approx(a / 2)
    _, _, _, pa = state(2, pipeline_parallel={"degree": 2, "microbatches": 4})
    assert pa == pytest.approx(a / 2 * 2 / 4)  # half the blocks, 2 of 4 pieces in flight (1F1B)


# Hugging Face models through their adapter's shape (configs built locally, as tests/test_hf.py).
HF_SMALL = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=250, bos_token_id=0, eos_token_id=1, seq_len=16)
HF_LLAMA = dict(HF_SMALL, hidden_size=64, intermediate_size=128, num_key_value_heads=2, max_position_embeddings=64)
HF_GPT2 = dict(HF_SMALL, hidden_size=64, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_costmodel_predicts_a_gqa_swiglu_llama_by_hand_count():
    pytest.importorskip("transformers")
    from autotune.workloads.adapter import adapter_for

    workload = load_workload("hf:llama", HF_LLAMA)
    model = workload.build_model()
    P = _params(model)  # untied head: embedding and head are both 250 x 64
    b = costmodel.estimate(workload, 2, {}).breakdown
    assert (b["weights"], b["optimizer"], b["gradients"]) == (4 * P, 8 * P, 4 * P)
    # fp32 eager: 4 bytes for each saved element per token and layer: 5 tensors of width 64
    # (norms, residual, attention output), q 64 + k, v 2 x (2 kv heads x 16), and SwiGLU's
    # four hidden ones of 128 (gate, up, silu(gate), product).
    L, t = 2, 2 * 16
    assert b["activations"] == L * t * 4 * (5 * 64 + 64 + 2 * 2 * 16 + 4 * 128)
    assert b["logits"] == t * 250 * 12 and b["scores"] == 0
    assert costmodel.flops_per_step(workload, 2, {}) == adapter_for(model).flops_per_token() * t
    # Checkpointing every block keeps each block's fp32 input, one block live again.
    ckpt = costmodel.estimate(workload, 2, {"activation_checkpoint": catalog.get("activation_checkpoint").parse({})}).breakdown
    assert ckpt["activations"] == L * t * 4 * 64 + b["activations"] / L


def test_costmodel_of_hf_gpt2_is_the_gpt_of_its_shape():
    # GPT-2 is our GPT's shape plus biases and a longer position table: the same activations,
    # logits and FLOPs; the states differ by exactly those extra parameters.
    pytest.importorskip("transformers")
    hf = load_workload("hf:gpt2", HF_GPT2)
    gpt = load_workload("tiny", {"vocab_size": 250, "seq_len": 16, "d_model": 64, "n_layers": 2, "n_heads": 4})
    cases = ({}, {"precision": {"dtype": "bf16"}, "attention": {"backend": "naive"}}, {"activation_checkpoint": {"mode": "full"}})
    for configs in cases:
        configs = {n: catalog.get(n).parse(k) for n, k in configs.items()}
        a, b = costmodel.estimate(hf, 4, configs), costmodel.estimate(gpt, 4, configs)
        for part in ("activations", "logits", "scores"):
            assert a.breakdown[part] == pytest.approx(b.breakdown[part]), part
        assert a.flops_per_step == b.flops_per_step
        extra = _params(hf.build_model()) - _params(gpt.build_model())
        assert a.breakdown["weights"] - b.breakdown["weights"] == 4 * extra > 0


def test_hf_trial_predicted_over_device_memory_is_pruned_before_launch(tmp_path):
    pytest.importorskip("transformers")
    import optuna

    from autotune import search
    from autotune.graph import StrategyGraph
    from autotune.plan import LaunchSpec, TrainSpec
    from autotune.strategy import Facts
    from autotune.trial import TrialBudget

    workload = load_workload("hf:llama", HF_LLAMA)
    memory = 2**20  # a made-up 1 MiB device: the weights and states alone take 1.3 MiB
    assert costmodel.estimate(workload, 1, {}).peak_memory_bytes > memory
    space = search.SearchSpace(
        workload=workload, strategies=[], graph=StrategyGraph(Facts.of(None, workload)),
        micro_batches=(8,), baseline_micro_batch=8, train=TrainSpec(micro_batch_size=1),
        launch=LaunchSpec(device="cpu"), device_memory=memory,
    )
    study = search.open_study("prune-hf", f"sqlite:///{tmp_path}/s.db", "tpe", 0)
    search.optimize(study, search.Objective(space=space, budget=TrialBudget()), trials=1, time_budget=None)
    assert {t.state for t in study.trials} == {optuna.trial.TrialState.PRUNED}
    assert study.trials[0].user_attrs["error"].startswith("predicted")
    assert study.trials[0].user_attrs["predicted_peak_memory_bytes"] > memory


def test_moe_experts_count_their_active_share_of_flops_and_all_of_memory():
    import torch

    from autotune.context import TrainContext
    from autotune.strategies.moe import MoeConfig, apply_moe
    from autotune.workloads.adapter import adapter_for, params_of

    workload = load_workload("tiny", {"n_layers": 2, "seq_len": 64})
    model = workload.build_model()
    dense = adapter_for(model).shape()
    ctx = TrainContext(workload=workload, device=torch.device("cpu"), model=model)
    apply_moe(ctx, MoeConfig(num_experts=4, top_k=2, every_n_layers=2))
    moe = adapter_for(model).shape()
    d, d_ff = dense.d_model, dense.d_ff
    # Block 0's MLP: 4 experts of fc and proj (d x d_ff each) and a d x 4 router; a token
    # passes through 2 of the 4 experts.
    assert moe.matmul_params == dense.matmul_params - 2 * d * d_ff + 2 * 2 * d * d_ff + d * 4
    assert moe.block_params == dense.block_params - 2 * d * d_ff + 4 * 2 * d * d_ff + d * 4
    assert moe.block_params == sum(params_of(b) for b in model.blocks)
    # The strategy's declared cost term predicts that model from the dense shape alone.
    configs = {"moe": catalog.get("moe").parse({"num_experts": 4, "top_k": 2, "every_n_layers": 2})}
    estimate = costmodel.estimate(workload, 2, configs)
    assert estimate.breakdown["weights"] == 4 * params_of(model)
    assert estimate.flops_per_step == adapter_for(model).flops_per_token() * 2 * 64


def test_chosen_strategies_cost_terms_run_in_apply_order():
    configs = {n: catalog.get(n).parse(k) for n, k in {"zero": {"stage": 2}, "moe": {}, "precision": {"dtype": "bf16"}}.items()}
    names = [name for name, _ in costmodel.strategy_terms(configs)]
    assert names == ["moe", "zero"]  # precision declares none: it picks the core's coefficients
    assert catalog.get("moe").cost is not None and costmodel.strategy_terms(configs)[1][1] is costmodel.zero_cost
