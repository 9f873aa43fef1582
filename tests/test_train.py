"""The executor on the CPU: training, logging, checkpoints, exact resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from autotune import plan as planmod
from autotune.contract.engine import make_optimizer
from autotune.runtime.rundir import read_log
from autotune.runtime.trainer import RunOptions, lr_at, run
from tests.conftest import DEFAULT_PLAN, ROOT


def tiny_plan(tmp_path, *, strategies=None, **train_overrides):
    base = planmod.load(DEFAULT_PLAN)
    data = base.to_dict()
    data["train"].update(train_overrides)
    data["strategies"] = [{"name": n, "knobs": k} for n, k in (strategies or {}).items()]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return planmod.load(path), path


def test_lr_schedule_warms_up_then_decays():
    spec = planmod.TrainSpec(micro_batch_size=1, steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, spec) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, spec) == pytest.approx(0.1)


def test_run_trains_logs_and_checkpoints(tmp_path):
    plan, _ = tiny_plan(tmp_path, eval_interval=20, checkpoint_interval=20, log_interval=5)
    out = tmp_path / "run"
    summary = run(plan, RunOptions(steps=40, out_dir=out))
    assert summary.steps_done == 40 and summary.stopped == "steps"
    assert summary.loss_end < summary.loss_start - 0.5  # it learns
    assert summary.val_loss is not None and summary.tokens_per_s > 0
    log = read_log(out / "log.jsonl")
    assert [r["step"] for r in log] == list(range(40))
    assert {"step", "loss", "tokens_per_s", "mfu", "peak_memory_bytes", "lr"} <= set(log[0])
    assert sum("val_loss" in r for r in log) == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000020.pt",
        "step_00000020.pt.sha256",
        "step_00000040.pt",
        "step_00000040.pt.sha256",
    ]


def test_existing_run_dir_needs_resume(tmp_path):
    plan, _ = tiny_plan(tmp_path, eval_interval=0, checkpoint_interval=0)
    out = tmp_path / "run"
    run(plan, RunOptions(steps=2, out_dir=out))
    with pytest.raises(Exception, match="already holds a run"):
        run(plan, RunOptions(steps=2, out_dir=out))


def test_grad_accum_matches_one_big_batch(tmp_path):
    # Accumulating 2 micro-batches of 8 computes the mean gradient over those 16 samples.
    from autotune.runtime.trainer import Trainer

    plan, _ = tiny_plan(tmp_path, micro_batch_size=8, grad_clip=0.0, strategies={"grad_accum": {"steps": 2}})
    t = Trainer(plan)
    x0, y0 = t.batches.get(0, 0)
    x1, y1 = t.batches.get(0, 1)
    ref_plan, _ = tiny_plan(tmp_path, micro_batch_size=16, grad_clip=0.0)
    ref = Trainer(ref_plan)
    # The loader draws a step's global batch whole: the big batch is the two micro-batches.
    torch.testing.assert_close(ref.batches.get(0, 0), (torch.cat([x0, x1]), torch.cat([y0, y1])), rtol=0, atol=0)
    ref.ctx.model.load_state_dict(t.ctx.model.state_dict())
    grads: dict[str, torch.Tensor] = {}
    step = t.optimizer.step

    def record_then_step(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in t.ctx.model.named_parameters()})
        return step(*args, **kwargs)

    t.optimizer.step = record_then_step
    t.train_step(0)
    ref.ctx.forward(torch.cat([x0, x1]), torch.cat([y0, y1])).backward()
    for name, p in ref.ctx.model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7)
    for group in ref.optimizer.param_groups:
        group["lr"] = lr_at(0, ref.spec)
    ref.optimizer.step()
    # AdamW's first step is about lr * g / (|g| + eps): where |g| is near eps, rounding of g
    # moves the update by a share of lr (1e-4 here), so the parameters agree to 5% of it.
    for a, b in zip(t.ctx.model.parameters(), ref.ctx.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-6)
    t.close()
    ref.close()


def test_user_workload_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    data = json.loads(DEFAULT_PLAN.read_text())
    data["workload"] = {"name": "examples.custom_workload:build", "overrides": {}}
    data["train"].update(eval_interval=0, checkpoint_interval=0)
    plan = planmod.from_dict(data)
    summary = run(plan, RunOptions(steps=20))
    assert summary.loss_end < summary.loss_start


def _child(plan_path, out, steps, *extra):
    cmd = [
        sys.executable,
        "-m",
        "autotune",
        "run",
        str(plan_path),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--json",
        *extra,
    ]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_loss_sequence(tmp_path):
    _, plan_path = tiny_plan(tmp_path, eval_interval=0, checkpoint_interval=10, log_interval=1)
    steps = 60
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ref = _child(plan_path, straight, steps)

    proc = _child(plan_path, killed, steps)
    ckpt = killed / "checkpoints" / "step_00000020.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = len(read_log(killed / "log.jsonl"))
    assert done < steps  # it really was cut off mid-way

    resumed = _child(plan_path, killed, steps, "--resume")
    for p in (ref, resumed):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    a = [r["loss"] for r in read_log(straight / "log.jsonl")]
    b = [r["loss"] for r in read_log(killed / "log.jsonl")]
    assert [r["step"] for r in read_log(killed / "log.jsonl")] == list(range(steps))
    assert a == b  # bit-for-bit: same batches, same RNG, same optimizer state


def test_adamw_groups_are_the_one_definition_of_decay():
    # The executor's AdamW and ZeRO's engine take their groups from autotune/contract/grads.py:
    # decay on the matrices only, and one group per DTensor mesh (plain tensors: one).
    from autotune.contract.grads import adamw_groups
    from autotune.workloads import load_workload

    model = load_workload("tiny", {"n_layers": 2}).build_model()
    decay, rest = adamw_groups(model, 0.1)
    assert (decay["weight_decay"], rest["weight_decay"]) == (0.1, 0.0)
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters() if p.dim() >= 2}
    assert {id(p) for p in rest["params"]} == {id(p) for p in model.parameters() if p.dim() < 2}
    opt = make_optimizer(model, planmod.TrainSpec(micro_batch_size=1, weight_decay=0.1), torch.device("cpu"), {})
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == [
        [id(p) for p in g["params"]] for g in (decay, rest)
    ]
