"""MFU and tokens-per-step, one owner each (autotune/runtime/metrics.py): the functions on made-up
numbers, then one real 2-process tensor-parallel plan (gloo) whose trial and run report the
same MFU for their rate. Its multi-process half is this module run under torchrun:

    XDG_CACHE_HOME=DIR python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.test_mfu OUT

with a made-up profile of this machine in DIR (a CPU has no datasheet peak).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autotune import hardware
from autotune.runtime.metrics import global_tokens_per_step, model_flops_utilization, tokens_per_step
from autotune.runtime.trainer import RunOptions, Trainer, run
from tests.conftest import ROOT, worker_failure
from tests.strategy_suite import MICRO_BATCH, TINY, make_plan

PEAK = 1e12
"""The made-up profile's bf16 rate per process (flop/s)."""


def test_mfu_counts_every_process_not_the_data_parallel_groups():
    # 6 GFLOP a token at 100k tokens/s on 4 devices of 1 PFLOP/s: 6e14 / 4e15.
    assert model_flops_utilization(6e9, 1e5, 1e15, 4) == pytest.approx(0.15)
    # tp 2 x dp 2 and dp 4 use the same 4 devices: the same MFU at the same rate.
    assert model_flops_utilization(6e9, 1e5, 1e15, processes=2 * 2) == model_flops_utilization(
        6e9, 1e5, 1e15, processes=4
    )
    assert model_flops_utilization(6e9, None, 1e15, 4) is None
    assert model_flops_utilization(6e9, 1e5, None, 4) is None


def test_tokens_per_step_is_the_global_batch_of_the_data_parallel_groups():
    assert global_tokens_per_step(8, 64, 2, 2) == 2048  # 8 micro x 64 seq x 2 accum x 2 groups
    plan = make_plan({"tensor_parallel": {}}, "cpu")
    plan.launch.nproc_per_node = 2  # tp 2: one data-parallel group
    assert tokens_per_step(plan) == MICRO_BATCH * TINY["seq_len"] == plan.global_batch() * TINY["seq_len"]
    plan = make_plan({"ddp": {}, "grad_accum": {"steps": 2}}, "cpu")
    plan.launch.nproc_per_node = 2
    assert tokens_per_step(plan) == MICRO_BATCH * TINY["seq_len"] * 2 * 2 == plan.global_batch() * TINY["seq_len"]


def made_up_profile(path: Path) -> None:
    """This machine's detected profile with a bf16 rate of PEAK written in."""
    profile = hardware.detect(quick=True)
    rate = hardware.Stat(median=PEAK, min=PEAK, max=PEAK, repeats=1, unit="flop/s")
    profile.measured = hardware.Measurements(
        device="cpu",
        matmul_n=1,
        matmul={"bf16": rate},
        copy_bytes=0,
        copy=None,
        h2d_bytes=None,
        h2d=None,
        allreduce=[],
        seconds=0.0,
    )
    profile.save(path)


def test_trial_and_run_report_one_mfu_under_tensor_parallel(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "autotune").mkdir(parents=True)
    made_up_profile(cache / "autotune" / "hardware.json")
    out = tmp_path / "out"
    out.mkdir()
    from autotune.distributed import torchrun_command

    cmd = torchrun_command(2, "tests.test_mfu", [str(out)])
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}  # trials and runs read the default profile
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, worker_failure(proc)
    got = json.loads((out / "mfu.json").read_text())
    trial, run = got["trial"], got["run"]
    assert trial["mfu_peak_source"] == run["mfu_peak_source"] == "bf16 measured 1 TFLOP/s"
    # Each reports MFU at its own measured rate; per token/s both are the model's FLOPs over
    # both processes' peaks (dividing by dp = 1 would report twice as much).
    expected = got["flops_per_token"] / (PEAK * 2)
    assert trial["mfu"] / trial["tokens_per_s"] == pytest.approx(expected, rel=1e-9)
    assert run["mfu"] / run["tokens_per_s"] == pytest.approx(expected, rel=1e-9)
    assert got["tokens_per_step"] == MICRO_BATCH * TINY["seq_len"]  # tp ranks share one batch


def main(out: Path) -> None:
    """Rank side: one trial (autotune.runtime.measure.measure) and one run (autotune.runtime.trainer.run) of the
    tiny GPT under tp 2; rank 0 writes what both reported."""
    import torch
    import torch.distributed as dist

    from autotune.runtime.measure import measure
    from autotune.runtime.trial import TrialBudget

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    try:
        plan = make_plan({"tensor_parallel": {}}, "cpu", log_interval=1)
        plan.launch.nproc_per_node = 2
        figures = measure(plan, TrialBudget(warmup_steps=1, timed_steps=3)).figures
        summary = run(plan, RunOptions(steps=4, out_dir=out / "run"))
        trainer = Trainer(plan)
        fpt, tokens = trainer.flops_per_token, trainer.tokens_per_step
        trainer.close()
        if dist.get_rank() == 0:
            pick = ("mfu", "tokens_per_s", "mfu_peak_source")
            (out / "mfu.json").write_text(
                json.dumps(
                    {
                        "trial": {k: getattr(figures, k) for k in pick},
                        "run": {k: getattr(summary, k) for k in pick},
                        "flops_per_token": fpt,
                        "tokens_per_step": tokens,
                    }
                )
            )
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
