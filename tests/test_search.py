"""The search with real trials: faults cost one trial each; a killed planner resumes."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from autotune import costmodel
from autotune import plan as planmod
from autotune.contract.strategy import Facts
from autotune.errors import UserError
from autotune.graph import StrategyGraph
from autotune.plan import LaunchSpec, TrainSpec
from autotune.planning.confirm import is_reference
from autotune.planning.first_trials import _with_defaults, ensure_first_trials, expert_priors
from autotune.planning.objective import AUTOTUNE_TIME_FACTOR, PRELAUNCH_PRUNES, Objective, optimize, trial_budget
from autotune.planning.refine import (
    REFINE,
    REFINE_COMPILE_FACTOR,
    predicted_refine_s,
    refine,
    refine_candidates,
    should_refine,
)
from autotune.planning.settings import PlanSettings
from autotune.planning.space import (
    SearchSpace,
    accumulation,
    baseline_params,
    build_space,
    micro_batch_choices,
    parse_layout,
    plan_for,
    suggest_plan,
)
from autotune.planning.study import GRACE_S, open_study
from autotune.planning.summary import BASELINE, plan_of, shortest_like, summarize
from autotune.runtime.trial import TrialBudget
from autotune.workloads import load_workload
from tests import faults
from tests.conftest import ROOT

optuna.logging.set_verbosity(optuna.logging.WARNING)


def fault_space() -> SearchSpace:
    workload = load_workload("tests.faults:build")
    return SearchSpace(
        workload=workload,
        strategies=[],
        graph=StrategyGraph(Facts.of(None, workload)),
        micro_batches=(2, faults.OOM, faults.NAN, faults.HANG, faults.SIGKILL),
        baseline_micro_batch=2,
        train=TrainSpec(micro_batch_size=1),
        launch=LaunchSpec(device="cpu"),
        device_memory=None,
    )


def test_each_fault_costs_one_trial_and_the_search_completes(tmp_path):
    space = fault_space()
    # No throughput pruning: this test is about faults, and on a loaded 2-core machine the
    # last trial can run at under half the baseline's speed and be pruned (tested elsewhere).
    study = open_study("faults", f"sqlite:///{tmp_path}/s.db", "tpe", 0, pruner=optuna.pruners.NopPruner())
    ensure_first_trials(study, space, [])
    # The baseline (micro-batch 2) first, then each fault; the sampler's next proposals are
    # the study's measured configurations again, pruned before launch.
    for mb in (faults.OOM, faults.NAN, faults.HANG, faults.SIGKILL):
        study.enqueue_trial({"micro_batch_size": mb})
    objective = Objective(space=space, budget=TrialBudget(warmup_steps=1, timed_steps=3, timeout_s=12))
    optimize(study, objective, trials=5, time_budget=None)
    by_mb = {t.params["micro_batch_size"]: t for t in reversed(study.trials) if t.user_attrs.get("launched")}
    status = {mb: (t.state.name, t.user_attrs["status"]) for mb, t in by_mb.items()}
    assert status[faults.OOM] == ("PRUNED", "oom")
    assert status[faults.NAN] == ("FAIL", "nan")
    assert status[faults.HANG] == ("FAIL", "timeout")
    assert status[faults.SIGKILL] == ("FAIL", "crash")
    assert "SIGKILL" in by_mb[faults.SIGKILL].user_attrs["error"]
    assert status[2] == ("COMPLETE", "ok")
    assert summarize(study).best.params["micro_batch_size"] == 2


def test_illegal_and_oversized_trials_are_pruned_before_launch(tmp_path):
    workload = load_workload("phase8-small")
    space = SearchSpace(
        workload=workload,
        strategies=[],
        graph=StrategyGraph(Facts.of(None, workload)),
        micro_batches=(128,),
        baseline_micro_batch=128,
        train=TrainSpec(micro_batch_size=1),
        launch=LaunchSpec(device="cpu"),
        device_memory=8 * 2**30,
    )
    study = open_study("prune", f"sqlite:///{tmp_path}/s.db", "tpe", 0)
    optimize(study, Objective(space=space, budget=TrialBudget()), trials=1, time_budget=None)
    # Pruned before launch, they do not count towards --trials, yet the search stops.
    assert len(study.trials) == PRELAUNCH_PRUNES * 2
    assert {t.state for t in study.trials} == {optuna.trial.TrialState.PRUNED}
    trial = study.trials[0]
    assert trial.user_attrs["error"].startswith("predicted")
    assert trial.user_attrs["predicted_peak_memory_bytes"] > 8 * 2**30


def _plan_cmd(db, out):
    # Up to 2 CPU processes: the priors include DDP over both (trial 2), so the study holds a
    # 2-process trial whatever TPE then picks. --trials 3 a run: the baseline and two priors in
    # the first (killed after two), the killed trial's retry and two more in the second.
    return [
        sys.executable,
        "-m",
        "autotune",
        "plan",
        "--workload",
        "tiny",
        "--trials",
        "3",
        "--storage",
        f"sqlite:///{db}",
        "--out",
        str(out),
        "--trial-steps",
        "6",
        "--warmup-steps",
        "2",
        "--cpu-procs",
        "2",
        "--exclude",
        "compile",
    ]


@pytest.mark.slow
def test_tiny_plan_beats_its_baseline_and_resumes_after_sigkill(tmp_path):
    db, out = tmp_path / "studies.db", tmp_path / "tiny.plan.json"
    proc = subprocess.Popen(_plan_cmd(db, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    url = f"sqlite:///{db}"

    def complete() -> int:
        try:
            (name,) = optuna.get_all_study_names(url)
        except (ValueError, KeyError, Exception):
            return 0
        study = optuna.load_study(study_name=name, storage=url)
        return len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))

    while complete() < 2:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (name,) = optuna.get_all_study_names(url)
    before = {
        t.number: t.value for t in optuna.load_study(study_name=name, storage=url).trials if t.state.name == "COMPLETE"
    }
    assert not out.exists()
    time.sleep(GRACE_S)  # until the killed trial's heartbeat is stale

    again = subprocess.run(_plan_cmd(db, out), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    study = optuna.load_study(study_name=name, storage=url)
    after = {t.number: t.value for t in study.trials if t.state.name == "COMPLETE"}
    assert before.items() <= after.items()  # no completed trial lost
    assert study.trials[0].user_attrs["role"] == "baseline"
    assert len([t for t in study.trials if t.state.is_finished()]) >= 5
    assert not [t for t in study.trials if t.state.name == "RUNNING"]  # the killed one was failed

    plan = planmod.load(out)
    assert plan.measured.status == "ok" and plan.baseline.status == "ok"
    # The claim is the interleaved confirmation's: a speed-up only beyond its noise (on a loaded
    # 2-core machine the tiny plan can come out within it, and then says so).
    assert plan.comparison is not None and plan.comparison.rounds >= 3
    if plan.comparison.beats_baseline:
        assert plan.measured.tokens_per_s > plan.baseline.tokens_per_s
    assert plan.loss_check is not None and plan.loss_check.passed
    if is_reference(plan, plan_of(study.trials[0])) and not all(s.name == "grad_accum" for s in plan.strategies):
        # The baseline's rounds trained the plain model on the plan's batches: they are the reference.
        assert plan.loss_check.reference_loss_end == plan.baseline.losses[plan.loss_check.steps - 1]
    assert plan.provenance.study == name

    two = [t for t in study.trials if t.state.name == "COMPLETE" and t.params.get("processes") == 2]
    assert two and plan_of(two[0]).launch.nproc_per_node == 2
    # autotune run executes the plan as written (under torchrun when it has 2 processes).
    run = subprocess.run(
        [sys.executable, "-m", "autotune", "run", str(out), "--steps", "3", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)["steps_done"] == 3


def test_costmodel_flops_match_flop_counter():
    # Naive attention is plain matmuls, so FlopCounterMode counts exactly PaLM's 12 L d s.
    from torch.utils.flop_counter import FlopCounterMode

    from autotune.runtime.trainer import Trainer

    for strategies in (
        [],
        [{"name": "activation_checkpoint", "knobs": {"mode": "full"}}],
        [{"name": "activation_checkpoint", "knobs": {"mode": "selective", "every": 3}}],
    ):
        data = json.loads((ROOT / "profiles/default/tiny.plan.json").read_text())
        data["strategies"] = [{"name": "attention", "knobs": {"backend": "naive"}}, *strategies]
        data["train"]["micro_batch_size"] = 2
        plan = planmod.from_dict(data)
        trainer = Trainer(plan)
        x, y = trainer.batches.get(0)
        with FlopCounterMode(display=False) as counter:
            trainer.ctx.forward(x, y).backward()
        trainer.close()
        predicted = costmodel.flops_per_step(trainer.ctx.workload, 2, plan.strategy_configs())
        assert counter.get_total_flops() == predicted, strategies


def _phase8_space(**kw) -> SearchSpace:
    workload = load_workload("phase8-small")
    kw.setdefault("strategies", [])
    return SearchSpace(
        workload=workload,
        graph=StrategyGraph(Facts.of(None, workload)),
        micro_batches=micro_batch_choices(128, workload.global_batch),
        baseline_micro_batch=16,
        train=TrainSpec(micro_batch_size=1),
        launch=LaunchSpec(device="cpu"),
        device_memory=141e9,
        global_batch=workload.global_batch,
        **kw,
    )


def test_fixed_global_batch_derives_the_accumulation():
    space = _phase8_space()
    assert space.global_batch == 192
    # 128 does not divide 192; 1 and 2 would need more than MAX_ACCUM micro-batches a step.
    assert space.micro_batches == (4, 8, 12, 16, 24, 32, 48, 64, 96)
    for mb in space.micro_batches:
        plan = plan_for(space, mb, [planmod.StrategySpec(name="grad_accum", knobs={"steps": 7})])
        assert plan.global_batch() == 192 and plan.grad_accum() == 192 // mb
        assert [s.name for s in plan.strategies] == ["grad_accum"]
    with pytest.raises(UserError, match="not a multiple of micro-batch 64 x 2 processes"):
        accumulation(192, 64, 2)
    with pytest.raises(UserError, match="global batch 469: no micro-batch"):
        micro_batch_choices(128, 469)  # 7 x 67: only 1 divides it, 469 times


def test_autotuning_compile_modes_get_a_longer_limit():
    space = _phase8_space()
    budget = TrialBudget(timeout_s=100)
    tuned = plan_for(space, 48, [planmod.StrategySpec(name="compile", knobs={"mode": "max-autotune-no-cudagraphs"})])
    plain = plan_for(space, 48, [planmod.StrategySpec(name="compile", knobs={"mode": "default"})])
    assert trial_budget(budget, tuned).timeout_s == 100 * AUTOTUNE_TIME_FACTOR
    assert trial_budget(budget, plain).timeout_s == 100


def test_matmul_rate_follows_the_precision():
    space = _phase8_space()
    assert costmodel.estimate(space.workload, 48, {}).matmul_dtype == "fp32"
    plan = plan_for(space, 48, [planmod.StrategySpec(name="precision", knobs={"dtype": "fp32", "tf32": True})])
    assert costmodel.estimate(space.workload, 48, plan.strategy_configs()).matmul_dtype == "tf32"
    plan = plan_for(space, 48, [planmod.StrategySpec(name="precision", knobs={"dtype": "bf16"})])
    assert costmodel.estimate(space.workload, 48, plan.strategy_configs()).matmul_dtype == "bf16"


def test_expert_priors_on_a_gpu_are_complete_trials():
    # Every enqueued prior must fix every knob of the strategies it turns on (define-by-run).
    from autotune import catalog
    from autotune.hardware import HardwareProfile

    space = _phase8_space(
        strategies=[catalog.get(n) for n in ("precision", "attention", "compile", "vocab_padding", "optimizer")]
    )
    h200 = HardwareProfile.load(ROOT / "profiles/h200-1gpu.json")
    # No optional package (fa4 would race: tested below), whatever this machine has installed.
    space.graph = StrategyGraph(dataclasses.replace(Facts.of(h200, space.workload), modules=frozenset()))
    space.launch = LaunchSpec(device="cuda")
    priors = expert_priors(space)
    assert [p["micro_batch_size"] for p in priors] == [96, 48]
    for params in priors:
        plan = suggest_plan(optuna.trial.FixedTrial(params), space)
        assert {s.name for s in plan.strategies} == {
            "precision",
            "attention",
            "compile",
            "vocab_padding",
            "optimizer",
            "grad_accum",
        }
        assert plan.global_batch() == 192


def test_expert_priors_race_the_fused_loss_against_compiles_on_the_same_settings():
    """triton_kernels' prior races (issue 28): the first prior, then it again with our fused loss."""
    from autotune import catalog
    from autotune.hardware import HardwareProfile

    names = ("precision", "attention", "compile", "vocab_padding", "optimizer", "triton_kernels")
    space = _phase8_space(strategies=[catalog.get(n) for n in names])
    h200 = HardwareProfile.load(ROOT / "profiles/h200-1gpu.json")
    space.graph = StrategyGraph(dataclasses.replace(Facts.of(h200, space.workload), modules=frozenset({"triton"})))
    space.launch = LaunchSpec(device="cuda")
    priors = expert_priors(space)
    assert [p["micro_batch_size"] for p in priors] == [96, 96, 48]
    assert (
        priors[1] == priors[0] | {"triton_kernels": True, "triton_kernels.loss": "autotune"}
        and not priors[0]["triton_kernels"]
    )
    plan = suggest_plan(optuna.trial.FixedTrial(priors[1]), space)
    assert plan.strategy_configs()["triton_kernels"].loss == "autotune"


def test_expert_priors_race_fa4_against_cudnn_where_it_can_run():
    """attention's prior races FA4 (issue 28): the first prior, then it again with backend fa4;
    where flash_attn.cute does not import, fa4 is neither raced nor a choice of the search."""
    from autotune import catalog
    from autotune.hardware import HardwareProfile

    names = ("precision", "attention", "compile", "vocab_padding", "optimizer")
    space = _phase8_space(strategies=[catalog.get(n) for n in names])
    h200 = HardwareProfile.load(ROOT / "profiles/h200-1gpu.json")
    facts = Facts.of(h200, space.workload)
    space.launch = LaunchSpec(device="cuda")
    space.graph = StrategyGraph(dataclasses.replace(facts, modules=frozenset({"flash_attn.cute"})))
    priors = expert_priors(space)
    assert [p["micro_batch_size"] for p in priors] == [96, 96, 48]
    assert priors[0]["attention.backend"] == "cudnn"
    assert priors[1] == priors[0] | {"attention.backend": "fa4"}
    plan = suggest_plan(optuna.trial.FixedTrial(priors[1]), space)
    assert plan.strategy_configs()["attention"].backend == "fa4"
    space.graph = StrategyGraph(dataclasses.replace(facts, modules=frozenset()))
    priors = expert_priors(space)
    assert [p["micro_batch_size"] for p in priors] == [96, 48]
    assert all(p["attention.backend"] == "cudnn" for p in priors)
    # The search's choices: what the graph leaves in.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(60):
        trial = study.ask()
        plan = suggest_plan(trial, space)
        study.tell(trial, 0.0)
        if "attention" in plan.strategy_configs():
            seen.add(plan.strategy_configs()["attention"].backend)
    assert "fa4" not in seen and "fa3" not in seen and "cudnn" in seen


def test_a_cpu_search_samples_no_setting_that_changes_nothing_there():
    # Issue 27: the winning CPU plan carried TF32 and a padding of the tiny GPT's 2,048-row
    # vocabulary, neither of which changes anything there.
    from autotune import hardware

    space, _ = build_space(
        PlanSettings(workload="tiny", device="cpu"), hardware.detect(quick=True), load_workload("tiny")
    )
    assert (
        space.left_out["vocab_padding"] == "the vocabulary (2,048) is already a multiple of 64 and 128: nothing to pad"
    )
    assert "vocab_padding" not in {s.name for s in space.strategies}
    if "precision" in {s.name for s in space.strategies}:  # a CPU with native bf16
        knobs = {k.name: k.choices for k in next(s for s in space.strategies if s.name == "precision").knobs}
        assert knobs == {"dtype": ("fp32", "bf16"), "tf32": (False,)}
    space, _ = build_space(
        PlanSettings(workload="tiny", device="cpu"),
        hardware.detect(quick=True),
        load_workload("tiny", {"vocab_size": 2100}),
    )
    (padding,) = [s for s in space.strategies if s.name == "vocab_padding"]
    assert padding.knobs[0].choices == (64, 128)


def test_two_cpu_processes_bring_every_legal_layout_of_the_mesh():
    from autotune import hardware

    settings = PlanSettings(workload="tiny", cpu_procs=2)
    space, _ = build_space(settings, hardware.detect(quick=True), load_workload("tiny"))
    assert space.processes == (1, 2)
    assert sorted(space.layouts[2]) == ["ddp", "fsdp2", "pipeline_parallel:2", "tensor_parallel:2", "zero"]
    for layout in space.layouts[2]:
        params = {"micro_batch_size": 16, "processes": 2, "layout.2": layout} | {
            s.name: False for s in space.strategies
        }
        for name in parse_layout(layout):
            params |= _with_defaults(name, {})
        plan = suggest_plan(optuna.trial.FixedTrial(params), space)
        assert plan.launch.nproc_per_node == 2 and plan.global_batch() == 64
        dp = 1 if ":" in layout else 2  # tp or pp over both processes leaves one batch
        assert plan.grad_accum() == 64 // (16 * dp), layout
    baseline = suggest_plan(optuna.trial.FixedTrial(baseline_params(space)), space)
    assert baseline.launch.nproc_per_node == 1 and [s.name for s in baseline.strategies] == ["grad_accum"]
    priors = expert_priors(space)
    assert [p["processes"] for p in priors] == [1, 2, 1] and priors[1]["layout.2"] == "ddp"
    with pytest.raises(UserError, match="--cpu-procs 0"):
        build_space(PlanSettings(workload="tiny", cpu_procs=0), hardware.detect(quick=True), load_workload("tiny"))


def test_another_global_batch_is_another_study():
    from autotune.planning.study import study_name

    assert study_name("phase8-small", "7403d3bde085") == "phase8-small-7403d3bde085"
    assert study_name("phase8-small", "7403d3bde085", 96) == "phase8-small-gb96-7403d3bde085"
    assert study_name("tests.faults:build", "abc", 0) == "tests.faults_build-gbfree-abc"


def test_a_clearly_slower_trial_is_pruned_while_it_runs(tmp_path):
    # A completed trial at 1e9 tokens/s: the slow one is stopped after 3 timed steps of 10,
    # while the baseline, just as slow, is never pruned.
    space = fault_space()
    space.micro_batches = (2, faults.SLOW)
    study = open_study("pruner", f"sqlite:///{tmp_path}/s.db", "tpe", 0)
    dist = optuna.distributions.CategoricalDistribution(list(space.micro_batches))
    study.add_trial(
        optuna.trial.create_trial(params={"micro_batch_size": 2}, distributions={"micro_batch_size": dist}, value=1e9)
    )
    study.enqueue_trial({"micro_batch_size": faults.SLOW})
    study.enqueue_trial({"micro_batch_size": faults.SLOW}, user_attrs={"role": BASELINE})
    objective = Objective(space=space, budget=TrialBudget(warmup_steps=1, timed_steps=10, timeout_s=60))
    optimize(study, objective, trials=2, time_budget=None)
    pruned, baseline = study.trials[1], study.trials[2]
    assert pruned.state.name == "PRUNED" and pruned.user_attrs["status"] == "pruned"
    assert "below the best so far (1,000,000,000)" in pruned.user_attrs["error"]
    assert 3 <= len(pruned.intermediate_values) < 10
    assert baseline.state.name == "COMPLETE" and len(baseline.intermediate_values) == 10


def test_a_configuration_the_study_has_measured_is_not_run_again(tmp_path):
    # The sampler proposing a point twice (issue 27: two of 8 trials had the same parameters):
    # the second is pruned before launch, naming the first; the baseline and priors always run.
    space = fault_space()
    study = open_study("twins", f"sqlite:///{tmp_path}/s.db", "tpe", 0)
    study.enqueue_trial({"micro_batch_size": 2})
    study.enqueue_trial({"micro_batch_size": 2})
    study.enqueue_trial({"micro_batch_size": 2}, user_attrs={"role": BASELINE})
    objective = Objective(space=space, budget=TrialBudget(warmup_steps=1, timed_steps=2, timeout_s=30))
    optimize(study, objective, trials=3, time_budget=None)
    first, twin, baseline = study.trials[:3]
    assert first.state.name == "COMPLETE" and baseline.state.name == "COMPLETE"
    assert (
        twin.state.name == "PRUNED" and twin.user_attrs["error"] == "the same configuration as trial 0, measured once"
    )
    assert "launched" in twin.user_attrs and not twin.user_attrs["launched"]


def test_a_trial_that_cannot_finish_in_the_time_left_is_not_launched():
    # The study's one trial like it took 100 s; 30 s are left: pruned before launch, naming it
    # (issue 26: a compiled trial launched with 47 s left timed out after its siblings took 66 s).
    space = fault_space()
    study = optuna.create_study(direction="maximize")
    dist = optuna.distributions.CategoricalDistribution(list(space.micro_batches))
    study.add_trial(
        optuna.trial.create_trial(
            params={"micro_batch_size": 2},
            distributions={"micro_batch_size": dist},
            value=1.0,
            user_attrs={"plan": plan_for(space, 2, []).to_dict(), "wall_s": 100.0},
        )
    )
    assert shortest_like(study, plan_for(space, faults.OOM, [])) == (0, 100.0)
    study.enqueue_trial({"micro_batch_size": 2})
    optimize(study, Objective(space=space, budget=TrialBudget()), trials=1, time_budget=30.0)
    pruned = study.trials[1]
    assert pruned.state.name == "PRUNED" and not pruned.user_attrs["launched"]
    assert pruned.user_attrs["error"].startswith("cannot finish: trial 0, which compiles as it does, took 100 s; ")


def test_max_autotune_is_refinement_only_and_launched_when_its_predicted_time_fits(tmp_path):
    from autotune import catalog

    space = _phase8_space(strategies=[catalog.get("compile")])
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"micro_batch_size": 48, "compile": True})
    trial = study.ask()
    plan = suggest_plan(trial, space)
    assert trial.distributions["compile.mode"].choices == ("default",)  # never max-autotune (reduce-overhead: no CUDA)
    assert [s.name for s in plan.strategies] == ["compile", "grad_accum"]

    # The decision: predicted = the configuration's measured wall time x the factor.
    assert should_refine(100.0, 101.0) and not should_refine(100.0, 99.0)
    assert should_refine(100.0, None) and not should_refine(None, 1e9)
    dist = optuna.distributions.CategoricalDistribution([48])
    compiled = plan.to_dict()
    for value, wall, data in ((2e6, 30.0, compiled), (3e6, 40.0, plan_for(space, 48, []).to_dict())):
        study.add_trial(
            optuna.trial.create_trial(
                params={"micro_batch_size": 48},
                distributions={"micro_batch_size": dist},
                value=value,
                user_attrs={"plan": data, "wall_s": wall},
            )
        )
    (candidate,) = refine_candidates(study)  # the faster one does not compile
    assert candidate.value == 2e6 and predicted_refine_s(candidate) == 30.0 * REFINE_COMPILE_FACTOR
    objective = Objective(space=space, budget=TrialBudget())
    assert refine(study, objective, deadline=time.monotonic() + 60) == []  # 120 s predicted > 60 s left
    assert not [t for t in study.trials if t.user_attrs.get("role") == REFINE]


@pytest.mark.parametrize(
    "workload, approximate, replaces",
    [("gpt-1b", {"fp8"}, set()), ("phase8-long", {"sparse_attention"}, {"attention"})],
)
def test_allow_approximate_puts_the_measured_approximate_prior_second(workload, approximate, replaces):
    # On the H200 profile: the approximate prior (fp8 at d 2048, sparse attention at seq 8192) is
    # the first exact prior plus it, enqueued right after it as a complete trial, so that the
    # quality guard has its exact reference on the same settings (less what it conflicts with:
    # sparse attention replaces the attention backend); without the flag, none.
    from autotune.hardware import HardwareProfile

    h200 = HardwareProfile.load(ROOT / "profiles/h200-1gpu.json")
    on = build_space(
        PlanSettings(workload=workload, allow_approximate=True, global_batch=8), h200, load_workload(workload)
    )[0]
    priors = expert_priors(on)
    plans = [suggest_plan(optuna.trial.FixedTrial(p), on) for p in priors]
    names = [{s.name for s in plan.strategies} for plan in plans]
    assert names[1] == (names[0] - replaces) | approximate and not any(
        n & approximate for i, n in enumerate(names) if i != 1
    )
    assert plans[1].global_batch() == plans[0].global_batch() == 8
    assert plans[1].launch.device == "cuda"
    off = build_space(PlanSettings(workload=workload, global_batch=8), h200, load_workload(workload))[0]
    assert not any(
        {s.name for s in suggest_plan(optuna.trial.FixedTrial(p), off).strategies}
        & {"fp8", "sparse_attention", "moe", "int8"}
        for p in expert_priors(off)
    )
