"""The planner driver: the interleaved confirmation, the time budget, its outputs; the
trials and report commands on a small real study."""

import dataclasses
import json
import subprocess
import sys
import time

import pytest

from autotune import plan as planmod
from autotune.plan import Figures
from autotune.planning.clock import budget_margin
from autotune.planning.confirm import _compared, baseline_budget, compare, is_reference, median_figures
from autotune.planning.study import study_name
from autotune.runtime.trial import TrialBudget
from tests.conftest import ROOT

BUDGET = 45.0


@pytest.fixture(scope="module")
def baseline_only(tmp_path_factory):
    """One real `autotune plan` of tiny whose only trial is the baseline (--trials 1), under a
    time budget: the best trial is the baseline itself."""
    tmp = tmp_path_factory.mktemp("plan")
    db, out = tmp / "s.db", tmp / "p.json"
    cmd = [
        sys.executable,
        "-m",
        "autotune",
        "plan",
        "--workload",
        "tiny",
        "--trials",
        "1",
        "--time-budget",
        str(BUDGET),
        "--trial-steps",
        "4",
        "--warmup-steps",
        "1",
        "--storage",
        f"sqlite:///{db}",
        "--out",
        str(out),
    ]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return proc, time.monotonic() - start, db, out


def test_a_plan_within_noise_says_so_and_claims_no_speedup(baseline_only):
    proc, wall, _, out = baseline_only
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = planmod.load(out)
    c = plan.comparison
    assert c is not None and not c.beats_baseline and c.rounds >= 3
    assert c.verdict.startswith("no configuration beat the baseline beyond noise (±")
    assert len(plan.measured.samples) == 3 and plan.measured.spread is not None
    assert "no configuration beat the baseline beyond noise" in proc.stdout
    assert "x its baseline" not in proc.stdout and "no faster than its baseline" in proc.stdout
    assert proc.stdout.count("confirmation round") == 3
    assert wall <= BUDGET + budget_margin(BUDGET)


def test_trials_and_report_read_the_study(baseline_only, tmp_path, run_cli):
    _, _, db, _ = baseline_only
    code, out, err = run_cli("trials", "--storage", f"sqlite:///{db}", "--json")
    assert code == 0, err
    row = json.loads(out)["trials"][0]
    assert (row["number"], row["role"], row["status"]) == (0, "baseline", "ok") and row["tokens_per_s"] > 0
    code, out, err = run_cli("report", "--storage", f"sqlite:///{db}", "--out", tmp_path / "r")
    assert code == 0, err
    html = (tmp_path / "r" / "history.html").read_text()
    assert '<script src="https://' not in html and len(html) > 1_000_000  # plotly inlined: opens offline
    code, _, err = run_cli("trials", "--storage", f"sqlite:///{tmp_path}/none.db")
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "none.db").exists()


def test_interleaved_figures_are_medians_with_their_spread():
    runs = [Figures(status="ok", tokens_per_s=v) for v in (100.0, 104.0, 96.0)] + [Figures(status="timeout")]
    m = median_figures(runs)
    assert (m.tokens_per_s, m.samples, m.spread) == (100.0, [100.0, 104.0, 96.0], 0.04)
    base = Figures(status="ok", tokens_per_s=80.0, samples=[80.0], spread=0.01)
    assert compare(m, base, 3, same=False).beats_baseline  # 1.25x against ±5%
    assert not compare(m, m, 3, same=True).beats_baseline


def _plan(micro_batch: int, accum: int, **train) -> planmod.Plan:
    plan = planmod.load(ROOT / "profiles" / "default" / "tiny.plan.json")
    strategies = [planmod.StrategySpec(name="grad_accum", knobs={"steps": accum})] if accum > 1 else []
    return planmod.Plan(
        **{
            **{f: getattr(plan, f) for f in ("schema_version", "workload", "launch", "hardware")},
            "train": dataclasses.replace(plan.train, micro_batch_size=micro_batch, **train),
            "strategies": strategies,
        }
    )


def test_the_baseline_times_about_as_long_as_the_plan_and_is_its_loss_reference():
    budget = TrialBudget(warmup_steps=5, timed_steps=20)
    plan, baseline = _plan(8, 2), _plan(2, 8)
    fast = Figures(status="ok", step_time_s=1.0)
    # The plan times 10 steps of 1 s; a baseline step takes 4 s: 3 of them (ceil 2.5), after the plan's warm-up.
    b = baseline_budget(budget, plan, baseline, fast, baseline_step_s=4.0)
    assert (b.warmup_steps, b.timed_steps) == (2 * 8, 3 * 8)
    assert (
        baseline_budget(budget, plan, baseline, fast, baseline_step_s=0.5).timed_steps == 10 * 8
    )  # never more than the plan's
    assert baseline_budget(budget, plan, baseline, fast, baseline_step_s=None).timed_steps == 10 * 8
    assert baseline_budget(budget, plan, baseline, fast, baseline_step_s=100.0).timed_steps == 1 * 8
    assert is_reference(plan, baseline)
    assert not is_reference(_plan(8, 2, random_tokens=True), _plan(2, 8, random_tokens=True))  # drawn per micro-batch
    assert not is_reference(plan, _plan(2, 4))  # another global batch
    assert not is_reference(plan, _plan(2, 8, lr=1e-2))


def test_losses_compare_at_the_last_step_both_trained():
    run = Figures(status="ok", loss_start=10.0, loss_end=8.0, losses=[10.0, 9.5, 9.0, 8.0])
    reference = Figures(status="ok", loss_start=10.0, loss_end=9.6, losses=[10.0, 9.6])
    check = _compared(run, reference, 0.02, exact=True)
    assert (check.steps, check.loss_end, check.reference_loss_end, check.passed) == (2, 9.5, 9.6, True)
    worse = Figures(status="ok", loss_start=10.0, loss_end=9.9, losses=[10.0, 9.9])
    assert not _compared(worse, reference, 0.02, exact=False).passed  # 3% worse
    assert _compared(
        Figures(status="ok", loss_start=10.0, loss_end=9.0, losses=[10.0, 9.0]), reference, 0.02, exact=False
    ).passed  # better


@pytest.mark.parametrize(
    "args",
    [
        ["--cpu-procs", "64"],
        ["--trial-timeout", "1"],
        ["--out", "{tmp}/file/p.json"],
        ["--report", "{tmp}/file"],
        ["--quality-tolerance", "0"],
        ["--quality-tolerance", "-0.1"],
    ],
)
def test_bad_planner_input_is_one_line_before_any_trial(run_cli, tmp_path, args):
    (tmp_path / "file").write_text("not a folder")
    args = [a.format(tmp=tmp_path) for a in args]
    code, out, err = run_cli("plan", "--trials", "1", "--storage", f"sqlite:///{tmp_path}/s.db", *args)
    assert code == 2 and err.startswith("autotune: error:") and err.count("\n") == 1, err
    assert not (tmp_path / "s.db").exists()


from tests.strategy_suite import Case, StrategySuite, pytest_generate_tests  # noqa: E402,F401


class TestCpuThreads(StrategySuite):
    name = "cpu_threads"
    # One thread sums each matmul in one order (the plain run's here: OMP_NUM_THREADS=1);
    # two split the reductions, a rounding difference only.
    cpu_cases = (Case(knobs={"threads": 1}, rtol=0.0), Case(knobs={"threads": 2}, rtol=1e-4))

    def check_applied(self, trainer, cfg):
        import torch

        assert torch.get_num_threads() == cfg.threads
        torch.set_num_threads(1)  # process-wide: leave the test process as it was


def test_another_model_config_is_another_study():
    plain = study_name("hf:llama", "abc")
    one = study_name("hf:llama", "abc", overrides={"hidden_size": 64, "num_hidden_layers": 2})
    same = study_name("hf:llama", "abc", overrides={"num_hidden_layers": 2, "hidden_size": 64})
    other = study_name("hf:llama", "abc", overrides={"hidden_size": 128, "num_hidden_layers": 2})
    assert plain == "hf_llama-abc" and one == same and len({plain, one, other}) == 3
