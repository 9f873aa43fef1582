"""Multi-process strategies (DDP, FSDP2, ZeRO, tensor and pipeline parallel) on the CPU: gloo, 2 real
processes under torchrun.

Each strategy subclasses the shared suite (tests/strategy_suite.py), whose training tests
read what one launch of tests/dist_worker.py trained: torchrun starts cost seconds on 2
cores, so they are few. That launch runs every case; then come one
``autotune run`` of a 2-process plan, a rank that crashes, a rank that hangs, and a trial
whose rank 1 fails.

Equality with one process. Rank r trains on its slice of the step's global batch (the loader
draws it whole from (seed, step)), so the single-process run that must match, accumulating as
many micro-batches as all ranks hold, trains per step on every rank's micro-batches in turn:
rank 0's, then rank 1's. Both then step on the same mean
gradient. Tolerances, relative, on each of the 10 losses:

- DDP: accumulation computes g0/2 + g1/2; DDP divides each rank's gradient by 2 and
  all-reduces the sum: the same two fp32 additions (a + b == b + a), halving is exact, and
  the logged mean (l0 + l1)/2 is l0/2 + l1/2 exactly. Measured difference 0; stated 1e-6
  (the suite's "fp32 reordered" bound) so that another BLAS blocking still passes.
- DDP with 2 micro-batches per rank against 4 accumulated: (g00/2 + g01/2)/2 + ... against
  ((g00/4 + g01/4) + g10/4) + g11/4, sums in another order: 7e-8 measured, 1e-5 stated.
- FSDP2 with fp32 parameters: the same reduce-scatter sum of halved gradients; only the
  global norm for clipping is summed shard by shard (another order): 0 measured, 1e-5 stated.
- FSDP2 with bf16 parameters against the fp32 run: bf16 matmul inputs (8 mantissa bits):
  8e-5 measured, 1e-3 stated (as the precision strategy's bf16 case).
- ZeRO (DeepSpeed, fp32 weights) stages 1, 2 and 3, with optimizer and parameter offload:
  DeepSpeed averages the ranks' gradients in flat buckets, sums the clipping norm partition by
  partition, and DeepSpeedCPUAdam orders AdamW's operations its own way (all fp32 reorderings):
  1.3e-7 measured (stage 3), 7e-8 for the others, 1e-5 stated (as FSDP2 fp32).
- ZeRO stage 2 under bf16 autocast against one process under bf16 autocast: the same autocast
  forward, but a weight one fp32 ulp apart rounds to another bf16 now and then: 8e-6
  measured, 1e-4 stated.

Tensor and pipeline parallel of degree 2 over the 2 processes leave one data-parallel group
(dp 1): both ranks load dp rank 0's batches, so the run that must match is the plain single
process (``dp1_losses``), its accumulation as in the case.

- TP, with and without sequence parallel: each matmul's inner sum is split in two halves
  summed by all-reduce or reduce-scatter (another order), the clipping norm summed over
  plain and DTensor gradients apart: 6.6e-8 measured, 1e-5 stated.
- PP 1F1B, 4 pieces per micro-batch: the loss is the sum of 4 piece means divided by 4
  instead of one mean over the micro-batch, gradients summed likewise: 1.3e-7 measured,
  1e-5 stated. GPipe, 2 pieces, 2 accumulated micro-batches: 6.6e-8 measured, 1e-5 stated.
- Resume from the DCP checkpoint at step 5, TP and PP: bit for bit (as the others).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from autotune import plan as planmod
from autotune.distributed import torchrun_command
from autotune.runtime.rundir import read_log
from autotune.runtime.trainer import Trainer
from autotune.runtime.trial import TrialBudget, run_trial
from autotune.workloads import flops_per_token, load_workload
from tests import dist_worker, faults
from tests.conftest import DEFAULT_PLAN, ROOT, worker_failure
from tests.strategy_suite import MICRO_BATCH, TINY, Case, StrategySuite, make_plan, pytest_generate_tests, train_losses

__all__ = ["pytest_generate_tests"]  # the suite's hook: one test item per case

pytestmark = pytest.mark.slow

WORKER_TIMEOUT_S = 480
"""The worker trains 26 short runs in 2 processes: about 45 s on 2 cores, plus about 50 s on a
machine where DeepSpeed has not yet built its CPU ops (~/.cache/torch_extensions)."""
FAIL_WITHIN_S = 60
"""A run whose rank fails must have ended within this (start-up included)."""


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory where the one worker launch left its runs."""
    out = tmp_path_factory.mktemp("dist")
    cmd = torchrun_command(2, "tests.dist_worker", [str(out)])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    assert proc.returncode == 0, worker_failure(proc)
    return out


def losses(run_dir: Path) -> list[float]:
    log = read_log(run_dir / "log.jsonl")
    assert [r["step"] for r in log] == list(range(dist_worker.STEPS))
    return [r["loss"] for r in log]


def dp1_losses(case: Case) -> list[float]:
    """One process training the plain model on the batches of dp rank 0 of 1 (tensor and
    pipeline parallel over the 2 processes leave one data-parallel group)."""
    trainer = Trainer(make_plan(case.base, "cpu", case.overrides))
    try:
        return train_losses(trainer, dist_worker.STEPS)
    finally:
        trainer.close()


def one_process_losses(case: Case) -> list[float]:
    """One process training on both ranks' batches, accumulating over all of them: the loader
    draws a step's global batch whole, so its 2k micro-batches are the 2 ranks' k each, in rank
    order (tests/test_data.py checks that split independence)."""
    k = case.base.get("grad_accum", {}).get("steps", 1)
    base = {name: knobs for name, knobs in case.base.items() if name != "grad_accum"}
    trainer = Trainer(make_plan({**base, "grad_accum": {"steps": 2 * k}}, "cpu", case.overrides))
    try:
        return train_losses(trainer, dist_worker.STEPS)
    finally:
        trainer.close()


class DistributedSuite(StrategySuite):
    """The shared suite for a strategy of 2 processes: the declaration, config and needs
    tests as they are; the training tests read what the one worker launch trained."""

    processes = 2
    data_parallel = True
    """The 2 processes train on 2 parts of the batch (False: tp or pp 2, one dp group)."""

    def test_cpu_case(self, case: Case, worker: Path) -> None:  # type: ignore[override]
        i = self.cpu_cases.index(case)
        got = losses(dist_worker.run_dir(worker, self.name, i))
        expected = one_process_losses(case) if self.data_parallel else dp1_losses(case)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=case.rtol, atol=0.0)

    def test_resume_is_exact(self, worker: Path) -> None:  # type: ignore[override]
        # Run to step 5 (checkpoint), then a new run resumed from it to step 10: bit for bit.
        resumed = dist_worker.run_dir(worker, self.name, 0, resumed=True)
        assert losses(resumed) == losses(dist_worker.run_dir(worker, self.name, 0))


class TestDdp(DistributedSuite):
    name = "ddp"
    cpu_cases = dist_worker.CASES["ddp"]


class TestFsdp2(DistributedSuite):
    name = "fsdp2"
    cpu_cases = dist_worker.CASES["fsdp2"]


class TestZero(DistributedSuite):
    name = "zero"
    cpu_cases = dist_worker.CASES["zero"]
    knob_company: ClassVar[dict[str, Any]] = {"stage": 3}  # offload_params needs stage 3


class TestTensorParallel(DistributedSuite):
    name = "tensor_parallel"
    cpu_cases = dist_worker.CASES["tensor_parallel"]
    data_parallel = False


class TestPipelineParallel(DistributedSuite):
    name = "pipeline_parallel"
    cpu_cases = dist_worker.CASES["pipeline_parallel"]
    data_parallel = False


def test_ddp_checkpoint_is_the_plain_model_written_once(worker: Path) -> None:
    ckpts = dist_worker.run_dir(worker, "ddp", 0) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "step_00000005.pt",
        "step_00000005.pt.sha256",
        "step_00000010.pt",
        "step_00000010.pt.sha256",
    ]
    state = torch.load(ckpts / "step_00000010.pt", weights_only=True)
    plain = load_workload("tiny", TINY).build_model().state_dict()
    assert state["model"].keys() == plain.keys() and state["step"] == 10


def test_fsdp2_checkpoint_holds_every_shard_under_plain_names(worker: Path) -> None:
    import torch.distributed.checkpoint as dcp

    ckpts = dist_worker.run_dir(worker, "fsdp2", 0) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000005", "step_00000010"]  # no temporary left
    step = ckpts / "step_00000010"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"} <= {p.name for p in step.iterdir()}
    saved = dcp.FileSystemReader(str(step)).read_metadata().state_dict_metadata
    plain = load_workload("tiny", TINY).build_model().state_dict()
    assert {k.removeprefix("model.") for k in saved if k.startswith("model.")} == set(plain)
    assert saved["model.embed.weight"].size == plain["embed.weight"].shape  # the whole tensor, from two shards
    assert torch.load(step / "meta.pt", weights_only=True)["step"] == 10


def test_zero_runs_deepspeeds_engine_with_the_config_made_from_the_plan(worker: Path) -> None:
    from autotune.strategies.zero import ZeroConfig, ds_config

    checks = json.loads((worker / "checks.json").read_text())
    assert checks["zero_engine"] == ["DeepSpeedEngine", "DeepSpeedZeroOptimizer_Stage3", "DeepSpeedCPUAdam"]
    assert checks["zero_model_is_the_engines"]
    assert checks["zero_tokens_per_step"] == 2 * 2 * MICRO_BATCH * TINY["seq_len"]  # accumulation x processes
    plain = load_workload("tiny", TINY)
    assert checks["zero_flops_per_token"] == flops_per_token(
        plain.build_model(), plain
    )  # stage 3 partitions: counted whole
    config = json.loads(checks["zero_note"].split(" config ", 1)[1])
    plan = make_plan({}, "cpu")
    assert config == ds_config(ZeroConfig(stage=3, offload_optimizer=True), plan.train, 2)
    assert config["optimizer"]["params"] == {
        "lr": plan.train.lr,
        "betas": [plan.train.beta1, plan.train.beta2],
        "eps": 1e-8,
        "weight_decay": plan.train.weight_decay,
    }
    assert config["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert config["gradient_accumulation_steps"] == 2 and config["gradient_clipping"] == plan.train.grad_clip


def test_zero_checkpoint_is_deepspeeds_own_and_converts_to_the_plain_model(worker: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpts = dist_worker.run_dir(worker, "zero", 0) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000005", "step_00000010"]  # no temporary left
    step = ckpts / "step_00000010"
    assert {f"zero_pp_rank_{r}_mp_rank_00_{k}_states.pt" for r in (0, 1) for k in ("model", "optim")} <= {
        p.name for p in (step / "deepspeed").iterdir()
    }
    assert json.loads((step / "deepspeed_config.json").read_text())["zero_optimization"] == {"stage": 3}
    assert torch.load(step / "meta.pt", weights_only=True)["step"] == 10
    whole = get_fp32_state_dict_from_zero_checkpoint(str(step), tag="deepspeed")
    plain = load_workload("tiny", TINY).build_model().state_dict()
    assert whole.keys() == plain.keys()
    assert all(whole[k].shape == v.shape for k, v in plain.items())


def test_zero_refuses_what_it_cannot_do_before_deepspeed_starts() -> None:
    from autotune import validate
    from autotune.contract.context import TrainContext
    from autotune.errors import SchemaError, UserError
    from autotune.strategies.compile import CompileConfig
    from autotune.strategies.zero import STRATEGY, ZeroConfig

    with pytest.raises(SchemaError, match="offload_params needs stage 3"):
        STRATEGY.parse({"stage": 2, "offload_params": True})
    workload = load_workload("tiny", TINY)

    def ctx(**fields) -> TrainContext:
        return TrainContext(
            workload=workload, device=torch.device("cpu"), model=workload.build_model(), world_size=2, **fields
        )

    with pytest.raises(UserError, match="zero with precision fp16 is not supported"):
        STRATEGY.apply(ctx(grad_scaler=True), ZeroConfig())
    # A whole-model compile: refused by the declarations (zero takes the model), before any apply.
    with pytest.raises(UserError, match="zero takes the model itself.*compile scope blocks"):
        validate.settings({"compile": CompileConfig(), "zero": ZeroConfig()})
    with pytest.raises(UserError, match="needs 2\\+ processes, this run has 1"):
        STRATEGY.apply(
            TrainContext(workload=workload, device=torch.device("cpu"), model=workload.build_model()), ZeroConfig()
        )


def test_strategies_compose_and_refuse_inside_the_group(worker: Path) -> None:
    checks = json.loads((worker / "checks.json").read_text())
    assert checks["compiled_ddp"]  # compile + ddp: torch.compile(DDP(model)), DDP holding ctx.model
    assert checks["ddp_no_sync"] == ["_GeneratorContextManager", "nullcontext"]  # no_sync but on the last micro-batch
    assert "compile scope blocks" in checks["fsdp2_whole_compile"]
    assert "needs one of the strategies" in checks["no_parallel_strategy"]
    assert checks["fsdp2_sharded"] and checks["fsdp2_param_type"] == "DTensor"
    assert checks["fsdp2_tokens_per_step"] == 2 * MICRO_BATCH * TINY["seq_len"]  # the global batch
    assert checks["tp_dims"] == [0, 1, 2, 1]  # dp rank 0 of 1: both tp ranks load the same batch
    assert checks["tp_tokens_per_step"] == MICRO_BATCH * TINY["seq_len"]  # dp 1: one micro-batch a step
    assert checks["tp_qkv_local_shape"] == [3 * 128 // 2, 128]  # whole heads: 2 of 4 per rank
    assert checks["pp_stage_modules"] == [["blocks.0", "embed", "pos"], ["blocks.1", "head", "norm"]]
    assert "compile scope blocks" in checks["pp_whole_compile"]


def test_tp_and_pp_checkpoints_hold_every_stage_and_shard_under_plain_names(worker: Path) -> None:
    import torch.distributed.checkpoint as dcp

    plain = load_workload("tiny", TINY).build_model().state_dict()
    for name in ("tensor_parallel", "pipeline_parallel"):
        step = dist_worker.run_dir(worker, name, 0) / "checkpoints" / "step_00000010"
        saved = dcp.FileSystemReader(str(step)).read_metadata().state_dict_metadata
        assert {k.removeprefix("model.") for k in saved if k.startswith("model.")} == set(plain), name
        assert saved["model.blocks.0.attn.qkv.weight"].size == plain["blocks.0.attn.qkv.weight"].shape


# -- the command line and failures ------------------------------------------------------------


def two_process_plan(
    tmp_path: Path, strategies: dict, *, workload: str | None = None, micro_batch: int = MICRO_BATCH, **train_overrides
) -> Path:
    data = json.loads(DEFAULT_PLAN.read_text())
    if workload is None:
        data["workload"]["overrides"] = dict(TINY)
    else:
        data["workload"] = {"name": workload, "overrides": {}}
    data["train"].update(
        {"micro_batch_size": micro_batch, "eval_interval": 0, "checkpoint_interval": 0, **train_overrides}
    )
    data["launch"]["nproc_per_node"] = 2
    data["strategies"] = [{"name": n, "knobs": k} for n, k in strategies.items()]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return path


def autotune_run(
    plan_path: Path, out: Path, *args: str, timeout: float, env: dict | None = None
) -> subprocess.CompletedProcess:
    import os

    cmd = [sys.executable, "-m", "autotune", "run", str(plan_path), "--out", str(out), *args]
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def test_autotune_run_starts_the_processes_itself(tmp_path: Path) -> None:
    plan = two_process_plan(
        tmp_path, {"fsdp2": {"param_dtype": "fp32"}}, eval_interval=4, checkpoint_interval=4, log_interval=2
    )
    out = tmp_path / "run"
    proc = autotune_run(plan, out, "--steps", "4", "--json", timeout=120)
    assert proc.returncode == 0, worker_failure(proc)
    summary = json.loads(proc.stdout)  # rank 0 alone printed
    assert summary["steps_done"] == 4 and summary["val_loss"] is not None
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [0, 1, 2, 3]  # one log, not two
    assert json.loads((out / "summary.json").read_text())["losses"] == [r["loss"] for r in read_log(out / "log.jsonl")]
    assert (out / "checkpoints" / "step_00000004" / "meta.pt").is_file()


def test_a_rank_that_crashes_ends_the_run(tmp_path: Path) -> None:
    plan = two_process_plan(tmp_path, {"ddp": {}}, workload="tests.faults:build", micro_batch=faults.RANK1_RAISES)
    began = time.monotonic()
    proc = autotune_run(plan, tmp_path / "run", "--trust-workload", timeout=FAIL_WITHIN_S)
    assert proc.returncode == 1
    assert "RuntimeError: simulated failure on rank 1" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "autotune: error: the run of 2 processes failed (torchrun exit status 1); the failing rank's error is above"
    )
    assert time.monotonic() - began < FAIL_WITHIN_S


def test_a_rank_that_hangs_ends_the_run_at_the_collective_timeout(tmp_path: Path) -> None:
    # Rank 1 sleeps in its forward; rank 0 waits in DDP's all-reduce until the timeout.
    plan = two_process_plan(tmp_path, {"ddp": {}}, workload="tests.faults:build", micro_batch=faults.RANK1_HANGS)
    began = time.monotonic()
    proc = autotune_run(
        plan, tmp_path / "run", "--trust-workload", timeout=FAIL_WITHIN_S, env={"AUTOTUNE_DIST_TIMEOUT_S": "5"}
    )
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "Timed out waiting 5000ms" in proc.stderr  # gloo's words, on rank 0
    assert time.monotonic() - began < FAIL_WITHIN_S


def test_a_trial_whose_rank_fails_reports_that_rank(tmp_path: Path) -> None:
    plan = planmod.load(
        two_process_plan(tmp_path, {"ddp": {}}, workload="tests.faults:build", micro_batch=faults.RANK1_RAISES)
    )
    result = run_trial(plan, TrialBudget(warmup_steps=1, timed_steps=3, timeout_s=FAIL_WITHIN_S))
    assert result.figures.status == "crash"
    assert result.error.startswith("rank 1: RuntimeError: simulated failure on rank 1"), result.error


def test_a_two_process_plan_without_a_parallel_strategy_is_refused_before_launch(run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli("run", two_process_plan(tmp_path, {}), "--out", tmp_path / "run")
    assert code == 2
    assert err.strip() == (
        "autotune: error: a run of 2 processes needs one of the "
        "strategies tensor_parallel, pipeline_parallel, ddp, fsdp2, zero "
        "(or launch.nproc_per_node 1)"
    )
    assert not (tmp_path / "run").exists()


def test_two_nodes_meet_at_the_plans_rendezvous(tmp_path: Path) -> None:
    # Two "nodes" of one process each on this machine: each runs the same command, torchrun
    # joins the c10d rendezvous named in the plan's launch, and they train as one DDP run.
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = two_process_plan(tmp_path, {"ddp": {}})
    data = json.loads(path.read_text())
    data["launch"].update(nproc_per_node=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}", rdzv_id="two-nodes")
    path.write_text(json.dumps(data))
    cmds = [
        [
            sys.executable,
            "-m",
            "autotune",
            "run",
            str(path),
            "--out",
            str(tmp_path / f"node{r}"),
            "--steps",
            "3",
            "--node-rank",
            str(r),
        ]
        for r in (0, 1)
    ]
    # Output to files, not pipes: waiting on one node while the other fills its pipe deadlocks.
    logs = [tmp_path / f"node{r}.err" for r in (0, 1)]
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=os.environ)
        for cmd, log in zip(cmds, logs, strict=True)
    ]
    for p in procs:
        p.wait(timeout=120)
    assert [p.returncode for p in procs] == [0, 0], logs[0].read_text()[-2000:] + logs[1].read_text()[-2000:]
    assert [r["step"] for r in read_log(tmp_path / "node0" / "log.jsonl")] == [0, 1, 2]
    assert not (tmp_path / "node1" / "log.jsonl").exists()  # global rank 0 alone writes


def test_a_plan_of_several_nodes_needs_a_rendezvous(run_cli, tmp_path: Path) -> None:
    path = two_process_plan(tmp_path, {"ddp": {}})
    data = json.loads(path.read_text())
    data["launch"].update(nproc_per_node=1, nnodes=2)
    path.write_text(json.dumps(data))
    code, _, err = run_cli("run", str(path))
    assert code == 2
    assert "rdzv_endpoint" in err and len(err.strip().splitlines()) == 1


def test_four_processes_fsdp2_and_tensor_parallel_in_2d(tmp_path: Path) -> None:
    # dp 2 x tp 2 on 4 CPU processes (FSDP2 over the dp dim of the mesh, TP within a pair):
    # the two dp groups train on dp ranks 0 and 1's batches, so the run that must match is one
    # process accumulating both (as for DDP above). The same fp32 sums in another order:
    # 1e-5 stated, as for FSDP2 and TP alone.
    path = two_process_plan(
        tmp_path, {"fsdp2": {"param_dtype": "fp32"}, "tensor_parallel": {"degree": 2}}, log_interval=1
    )
    data = json.loads(path.read_text())
    data["launch"]["nproc_per_node"] = 4
    path.write_text(json.dumps(data))
    out = tmp_path / "run"
    proc = autotune_run(path, out, "--steps", str(dist_worker.STEPS), timeout=240)
    assert proc.returncode == 0, worker_failure(proc)
    got = [r["loss"] for r in read_log(out / "log.jsonl")]
    trainer = Trainer(make_plan({"grad_accum": {"steps": 2}}, "cpu", None))  # both dp groups' batches
    try:
        expected = train_losses(trainer, dist_worker.STEPS)
    finally:
        trainer.close()
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=0.0)
