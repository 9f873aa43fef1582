"""The step-engine protocol (autotune/contract/engine.py): its default step, the default loop the
Trainer trains through, and the strategy modules that implement it importing without torch.
The pipeline and DeepSpeed engines train in tests/test_distributed.py (2 processes)."""

import copy
import subprocess
import sys

import torch

from autotune.contract.engine import LoopEngine, StepEngine
from autotune.runtime.trainer import Trainer
from tests.strategy_suite import make_plan, train_losses


class Recording(StepEngine):
    """An engine whose micro-batch losses are their index: what ``train_step`` calls, in order."""

    def __init__(self, grad_accum: int) -> None:
        self.grad_accum = grad_accum
        self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
        self.calls: list[tuple] = []

    def forward_backward(self, x, y, *, last):
        self.calls.append(("forward_backward", int(x), last, self.optimizer.param_groups[0]["lr"]))
        return x.float()

    def step(self):
        self.calls.append(("step",))


def test_train_step_sets_the_lr_runs_every_micro_batch_then_steps_once():
    engine = Recording(grad_accum=3)
    loss = engine.train_step(lambda i: (torch.tensor(i), torch.tensor(i)), 0.5)
    assert engine.calls == [
        ("forward_backward", 0, False, 0.5),
        ("forward_backward", 1, False, 0.5),
        ("forward_backward", 2, True, 0.5),
        ("step",),
    ]
    assert loss.item() == 0 + 1 + 2  # the sum of the micro-batch losses (each already divided by 3)


def test_the_trainer_trains_and_checkpoints_through_the_default_loop():
    plan = make_plan({"grad_accum": {"steps": 2}}, "cpu")
    trainer = Trainer(plan)
    try:
        assert type(trainer.engine) is LoopEngine
        assert trainer.optimizer is trainer.engine.optimizer and trainer.scaler is trainer.engine.scaler
        train_losses(trainer, 2)
        state = copy.deepcopy(trainer.state_dict(2))  # the live tensors train on
        # The whole-model checkpoint's layout is the executor's format, the engine's part included.
        assert set(state) == {"format", "step", "scaler", "rng", "run", "model", "optimizer"}
        expected = train_losses(trainer, 2, start=2)
    finally:
        trainer.close()
    resumed = Trainer(plan)
    try:
        assert resumed.load_state_dict(state) == 2
        assert train_losses(resumed, 2, start=2) == expected
    finally:
        resumed.close()


def test_the_strategies_owning_the_step_import_without_torch():
    code = "import sys, autotune.strategies.zero, autotune.strategies.pipeline_parallel; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
