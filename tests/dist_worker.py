"""The multi-process half of tests/test_distributed.py: run under torchrun with 2 processes.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.dist_worker OUT

One launch runs every case of the multi-process strategies' suites (``CASES``) in turn, in
one process group (torchrun starts cost seconds on 2 cores). Each case is a real
``autotune.runtime.trainer.run`` of a 2-process plan writing its log and checkpoints under
``OUT/<strategy>-<i>/``; the first case of each strategy also runs to CUT and is resumed from
that checkpoint to STEPS in ``OUT/<strategy>-0-resumed/``. ``OUT/checks.json`` (rank 0) holds
what can only be seen from inside (wrappers, refusals). The tests read those files and
compare them with single-process runs of their own; tests/test_distributed.py says why each
tolerance is what it is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from autotune.errors import UserError
from autotune.runtime.trainer import RunOptions, Trainer, run
from tests.strategy_suite import Case, make_plan

STEPS = 10
"""Optimizer steps of each compared run."""
CUT = 5
"""Where the interrupted runs stop and resume (a checkpoint is written there)."""

CASES: dict[str, tuple[Case, ...]] = {
    "ddp": (
        Case(knobs={}, rtol=1e-6),  # the same fp32 sums as accumulation: 0 measured
        # no_sync is off under static_graph (a PyTorch bug): a reduction per micro-batch.
        Case(
            knobs={"static_graph": True, "gradient_as_bucket_view": False}, base={"grad_accum": {"steps": 2}}, rtol=1e-5
        ),
        Case(knobs={"bucket_cap_mb": 5}, base={"grad_accum": {"steps": 2}}, rtol=1e-5),  # no_sync on micro-batch 0
    ),
    "fsdp2": (
        Case(knobs={"param_dtype": "fp32"}, rtol=1e-5),  # clipping norm summed by shard: 0 measured
        Case(knobs={"param_dtype": "bf16", "reshard_after_forward": False}, rtol=1e-3),  # bf16 gathers: 8e-5 measured
    ),
    "zero": (
        Case(knobs={"stage": 3}, rtol=1e-5),  # partitioned parameters, the one resumed: 1.3e-7 measured
        Case(knobs={"stage": 1}, rtol=1e-5),  # 7e-8 measured
        Case(knobs={"stage": 2}, base={"grad_accum": {"steps": 2}}, rtol=1e-5),  # DeepSpeed accumulates: 7e-8 measured
        Case(
            knobs={"stage": 2}, base={"precision": {"dtype": "bf16"}}, rtol=1e-4
        ),  # the loop's autocast: 8e-6 measured
        # ZeRO-Offload's DeepSpeedCPUAdam and parameters kept on the host: 7e-8 measured.
        Case(knobs={"stage": 3, "offload_optimizer": True, "offload_params": True}, rtol=1e-5),
    ),
    # tp 2 and pp 2 over 2 processes: dp 1, one process's batches (see test_distributed.py).
    "tensor_parallel": (
        Case(knobs={}, rtol=1e-5),  # sequence parallel: 1.3e-7 measured
        Case(knobs={"sequence_parallel": False}, rtol=1e-5),  # 1.3e-7 measured
    ),
    "pipeline_parallel": (
        Case(knobs={"microbatches": 4}, rtol=1e-5),  # 1f1b: 1.3e-7 measured
        Case(knobs={"schedule": "gpipe", "microbatches": 2}, base={"grad_accum": {"steps": 2}}, rtol=1e-5),
    ),
}
"""Each multi-process strategy's suite cases (2 processes, the suite's tiny model and
micro-batch 8 per rank), each with the tolerance of its losses against one process."""


def run_dir(out: Path, strategy: str, i: int, resumed: bool = False) -> Path:
    return out / f"{strategy}-{i}{'-resumed' if resumed else ''}"


def plan_of(strategies: dict[str, dict[str, Any]], overrides: dict[str, Any] | None = None) -> Any:
    """The suite's plan of ``strategies`` in 2 processes, a checkpoint at CUT."""
    plan = make_plan(strategies, "cpu", overrides, checkpoint_interval=CUT, log_interval=1)
    plan.launch.nproc_per_node = 2
    return plan


def checks() -> dict[str, Any]:
    """What only a process of the group can see: how strategies wrapped the model."""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch.nn.parallel import DistributedDataParallel

    out: dict[str, Any] = {}
    # compile (whole model) then ddp: the DDP module is what gets compiled (built, not run).
    t = Trainer(plan_of({"compile": {}, "ddp": {}}))
    fwd = t.ctx.forward
    out["compiled_ddp"] = (
        isinstance(fwd, OptimizedModule)
        and isinstance(fwd._orig_mod, DistributedDataParallel)
        and fwd._orig_mod.module is t.ctx.model
    )
    out["ddp_no_sync"] = type(t.ctx.sync_context(False)).__name__, type(t.ctx.sync_context(True)).__name__
    t.close()
    try:
        Trainer(plan_of({"compile": {}, "fsdp2": {}}))
    except UserError as e:
        out["fsdp2_whole_compile"] = str(e)
    try:
        Trainer(plan_of({}))
    except UserError as e:
        out["no_parallel_strategy"] = str(e)
    t = Trainer(plan_of({"fsdp2": {"param_dtype": "fp32"}}))
    out["fsdp2_sharded"] = t.ctx.sharded_state
    out["fsdp2_param_type"] = type(next(t.ctx.model.parameters())).__name__
    out["fsdp2_tokens_per_step"] = t.tokens_per_step
    t.close()
    t = Trainer(plan_of({"grad_accum": {"steps": 2}, "zero": {"stage": 3, "offload_optimizer": True}}))
    out["zero_engine"] = type(t.ctx.forward).__name__, type(t.optimizer).__name__, type(t.optimizer.optimizer).__name__
    out["zero_model_is_the_engines"] = t.ctx.forward.module is t.ctx.model
    out["zero_flops_per_token"] = t.flops_per_token
    out["zero_tokens_per_step"] = t.tokens_per_step
    out["zero_note"] = t.ctx.notes[-1]
    t.close()
    t = Trainer(plan_of({"tensor_parallel": {}}))
    out["tp_dims"] = [t.ctx.rank, t.ctx.world_size, t.ctx.dims.tp, t.ctx.dims.pp]
    out["tp_tokens_per_step"] = t.tokens_per_step
    out["tp_qkv_local_shape"] = list(t.ctx.model.blocks[0].attn.qkv.weight.to_local().shape)
    t.close()
    t = Trainer(plan_of({"pipeline_parallel": {}}))
    # The modules each stage holds, by the plain model's names.
    names = sorted({".".join(k.split(".")[: 2 if k.startswith("blocks") else 1]) for k in t.ctx.model.state_dict()})
    stages: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(stages, names)
    out["pp_stage_modules"] = stages
    t.close()
    try:
        Trainer(plan_of({"pipeline_parallel": {}, "compile": {}}))
    except UserError as e:
        out["pp_whole_compile"] = str(e)
    return out


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    try:
        for name, cases in CASES.items():
            for i, case in enumerate(cases):
                plan = plan_of({**case.base, name: case.knobs}, case.overrides)
                run(plan, RunOptions(steps=STEPS, out_dir=run_dir(out, name, i)))
                if i == 0:
                    resumed = run_dir(out, name, i, resumed=True)
                    run(plan, RunOptions(steps=STEPS, stop_at=CUT, out_dir=resumed))
                    run(plan, RunOptions(steps=STEPS, out_dir=resumed, resume=True))
        found = checks()
        if dist.get_rank() == 0:
            (out / "checks.json").write_text(json.dumps(found))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
