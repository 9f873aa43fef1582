"""The quality guard: an approximate best trial is run beside the study's best exact one for
--guard-steps optimizer steps on the same real-text batches; the plan records both curves,
the result and the time-to-loss, and a candidate that fails never becomes the plan."""

from __future__ import annotations

import pytest

from autotune import hardware, planner, search
from autotune import plan as planmod
from autotune.plan import Figures
from autotune.trial import TrialBudget
from autotune.workloads import load_workload

OVERRIDES = {"n_layers": 2}
"""The tiny GPT, halved: each run starts and trains in seconds on 2 cores."""


def test_curves_and_time_to_loss_on_hand_built_runs() -> None:
    # One warm-up step (untimed), then 9 timed ones: the candidate at 1 s a step, the exact at 2 s.
    candidate = Figures(status="ok", losses=[8.0, 7.0, 6.0, 5.0, 4.0, 3.5, 3.0, 2.9, 2.8, 2.7], step_times=[1.0] * 9)
    exact = Figures(status="ok", losses=[8.0, 7.5, 7.0, 6.5, 6.0, 5.5, 5.0, 4.5, 4.0, 3.0], step_times=[2.0] * 9)
    g = planner.guard_of(candidate, exact, 3, 0.01)
    assert (g.steps, g.target_loss, g.reference_trial, g.passed) == (10, 3.0, 3, True)  # the tail is one step
    assert (g.candidate.tail_mean, g.candidate.at_fractions, g.candidate.wall_s) == (2.7, [6.0, 3.5, 2.9], 9.0)
    # The candidate reaches 3.0 at its 7th step (6 timed steps), the exact one at its last (9 timed).
    assert (g.candidate.time_to_loss_s, g.exact.time_to_loss_s, g.time_to_loss_ratio) == (6.0, 18.0, 3.0)
    worse = planner.guard_of(exact, candidate, 3, 0.01)
    assert not worse.passed and worse.candidate.time_to_loss_s is None and worse.time_to_loss_ratio is None
    # Twenty steps: the tail is the last two, and the curves are smoothed over two.
    flat = Figures(status="ok", losses=[5.0] * 18 + [4.0, 6.0], step_times=[1.0] * 19)
    assert planner.guard_of(flat, flat, 0, 0.01).target_loss == 5.0 and planner.guard_of(flat, flat, 0, 0.01).candidate.time_to_loss_s == 1.0


def test_the_guard_reserves_its_time_only_for_an_approximate_best():
    settings = planner.PlanSettings(workload="tiny", guard_steps=100)

    class Study:
        def __init__(self, trials):
            self.trials = trials

        def get_trials(self, deepcopy=False, states=None):
            return self.trials

    def trial(strategies, value, step):
        import datetime

        plan = planmod.Plan(schema_version=1, workload=planmod.WorkloadSpec(name="tiny"), train=planmod.TrainSpec(micro_batch_size=8),
                            strategies=[planmod.StrategySpec(name=n, knobs={}) for n in strategies])
        now = datetime.datetime(2026, 1, 1)
        attrs = {"plan": plan.to_dict(), "figures": {"status": "ok", "step_time_s": step}}
        return type("T", (), {"value": value, "user_attrs": attrs, "datetime_start": now, "datetime_complete": now + datetime.timedelta(seconds=10)})()

    exact, sparse = trial([], 100.0, 0.5), trial(["sparse_attention"], 200.0, 0.25)
    assert planner.guard_seconds(Study([exact]), settings) == 0.0
    assert planner.guard_seconds(Study([exact, sparse]), settings) == (10 + 100 * 0.25) + (10 + 100 * 0.5)


@pytest.mark.parametrize("args", [["--guard-steps", "9"], ["--guard-steps", "100001"], ["--quality-tolerance", "0"]])
def test_bad_guard_input_is_one_line(run_cli, tmp_path, args):
    code, _, err = run_cli("plan", "--trials", "1", "--storage", f"sqlite:///{tmp_path}/s.db", *args)
    assert code == 2 and err.startswith("autotune: error:") and err.count("\n") == 1, err
    assert not (tmp_path / "s.db").exists()


def test_a_candidate_that_learns_worse_is_recorded_and_never_becomes_the_plan(tmp_path):
    """Sparse attention with a window of 32 of 128 tokens against the plain model, under a
    tolerance no approximation meets: the guard runs both, the study records the failure with
    the figures, and the plan written is the best exact trial."""
    settings = planner.PlanSettings(
        workload="tiny", workload_overrides=OVERRIDES, trials=2, storage=f"sqlite:///{tmp_path}/s.db", study_name="guard",
        global_batch=8, allow_approximate=True, quality_tolerance=1e-9, guard_steps=10, out=tmp_path / "p.json",
        device="cpu", budget=TrialBudget(warmup_steps=1, timed_steps=2, timeout_s=120.0),
    )
    workload = load_workload("tiny", OVERRIDES)
    space, _ = planner.build_space(settings, hardware.detect(quick=True), workload)
    study = search.open_study("guard", settings.storage, "tpe", 0, identity=search.study_identity(settings.budget, space.global_batch))
    # The two trials, enqueued rather than searched: the baseline and the sparse candidate.
    study.enqueue_trial(search.baseline_params(space), user_attrs={"role": search.BASELINE})
    off = {s.name: False for s in space.strategies if s.mesh_dim is None}
    study.enqueue_trial(off | {"micro_batch_size": 8, "sparse_attention": True, "sparse_attention.window": 32, "sparse_attention.global_tokens": 0})
    lines: list[str] = []
    plan, summary, _ = planner.make_plan(settings, log=lines.append)

    assert not planner.is_exact(search.plan_of(summary.best))  # the fastest trial is the sparse one
    assert planner.is_exact(plan) and plan.quality_guard is None and plan.provenance.trial == 0
    assert planmod.load(tmp_path / "p.json").strategies == plan.strategies
    study = search.open_study("guard", settings.storage, "tpe", 0)
    failed = study.user_attrs[f"quality_guard_failed_{summary.best.number}"]
    guard = failed["quality_guard"]
    assert guard["steps"] == 1 + 10 and guard["reference_trial"] == 0 and not guard["passed"]
    assert guard["candidate"]["tail_mean"] > guard["exact"]["tail_mean"] and guard["exact"]["time_to_loss_s"] > 0
    assert failed["figures"]["status"] == "ok" and failed["figures"]["tokens_per_s"] > 0 and failed["why"].startswith("loss ")
    assert any(line.startswith(f"quality guard: trial {summary.best.number} failed (loss ") and "confirming the best exact trial 0 instead" in line
               for line in lines), lines
    # The candidate is never confirmed: only the exact trial is.
    assert [line.split(" against")[0] for line in lines if line.startswith("confirming trial")] == ["confirming trial 0"]


def test_a_plan_keeps_its_guard_and_old_plans_load_without_one(tmp_path):
    from tests.conftest import ROOT

    old = planmod.load(ROOT / "profiles" / "default" / "tiny.plan.json")
    assert old.quality_guard is None and "quality_guard" not in (ROOT / "profiles" / "default" / "tiny.plan.json").read_text()
    run = Figures(status="ok", losses=[8.0] + [7.0] * 10, step_times=[0.5] * 10)
    guarded = planmod.Plan(**{**{f: getattr(old, f) for f in ("schema_version", "workload", "train", "launch")},
                              "strategies": [planmod.StrategySpec(name="sparse_attention", knobs={"window": 32})],
                              "quality_guard": planner.guard_of(run, run, 0, 0.01)})
    guarded.save(tmp_path / "p.json")
    loaded = planmod.load(tmp_path / "p.json")
    assert loaded.quality_guard == guarded.quality_guard and loaded.quality_guard.passed
    assert loaded.quality_guard.time_to_loss_ratio == 1.0 and loaded.quality_guard.candidate.time_to_loss_s == 0.5
