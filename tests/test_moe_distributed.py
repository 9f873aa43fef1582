"""moe's expert parallelism on 2 real gloo processes under torchrun (tests/moe_dist_worker.py)
against one process training both ranks' rows as one batch: ep 2 slots the group's tokens as
one process does, so losses, routers and experts agree to rounding (the all-to-all moves
whole rows; the sums differ in order only: the dense gradients averaged by DDP, the experts'
halved, the clipping norm summed in two parts). Measured after 5 steps: losses 6e-8 relative,
routers 7e-9, experts 1.6e-6 (AdamW's first steps magnify small gradient differences; the
experts have parted by 3e-3 from each other by then), 1e-5 stated. 5% and 12% of the
choices are dropped in the two layers, so the group's slotting is what is compared."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from autotune.contract.mesh import expert_groups, mesh_shape
from autotune.distributed import torchrun_command
from autotune.errors import UserError
from autotune.runtime.trainer import Trainer
from tests import moe_dist_worker as worker
from tests.conftest import ROOT, worker_failure

pytestmark = pytest.mark.slow

TIMEOUT_S = 300


@pytest.fixture(scope="module")
def ep_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("moe_ep")
    proc = subprocess.run(
        torchrun_command(2, "tests.moe_dist_worker", [str(out)]),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, worker_failure(proc)
    return out


def test_expert_parallel_on_2_gloo_processes_matches_one_process(ep_run: Path) -> None:
    got = torch.load(ep_run / "ep.pt", weights_only=True)
    trainer = Trainer(worker.plan(1, 2 * worker.MICRO_BATCH))
    try:
        losses = [float(trainer.train_step(step)) for step in range(worker.STEPS)]
        model_layers = worker.layers(trainer.ctx.model)
    finally:
        trainer.close()
    torch.testing.assert_close(got["losses"], torch.tensor(losses, dtype=torch.float64), rtol=1e-5, atol=0)
    assert len(model_layers) == 2
    for i, layer in enumerate(model_layers):
        for name, param in (("w_fc", layer.w_fc), ("w_proj", layer.w_proj), ("router", layer.router.weight)):
            torch.testing.assert_close(got[f"{i}.{name}"], param.detach(), rtol=0, atol=1e-5)
    assert 0.0 < float(model_layers[0].last_dropped) < 1.0  # the capacity dropped choices
    checks = json.loads((ep_run / "checks.json").read_text())
    assert checks["w_fc"][0] == 2 and checks["routers_alike"]  # 2 of 4 experts per rank
    assert any("expert parallel over 2 processes (2 experts each)" in n for n in checks["notes"])
    assert "cannot load a checkpoint yet" in checks["load_refused"]


def test_expert_groups_are_consecutive_dp_ranks() -> None:
    assert expert_groups(4, 2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    assert expert_groups(2, 2) == ([[0, 1]], [[0], [1]])
    with pytest.raises(UserError, match="ep 3 does not divide the 4"):
        expert_groups(4, 3)


def test_mesh_refuses_ep_it_cannot_lay_out() -> None:
    moe = {"num_experts": 4, "ep": 2}
    assert mesh_shape(2, {"moe": moe, "ddp": {}}) == (2, 1, 1)
    with pytest.raises(UserError, match="moe ep 2 needs a multiple of 2 data-parallel processes"):
        mesh_shape(1, {"moe": moe})
    with pytest.raises(UserError, match="moe ep 4 needs a multiple of 4 data-parallel processes"):
        mesh_shape(6, {"moe": {"num_experts": 4, "ep": 4}, "ddp": {}})
    with pytest.raises(UserError, match="needs ddp"):
        mesh_shape(2, {"moe": moe, "fsdp2": {}})
    with pytest.raises(UserError, match="pp 2"):
        mesh_shape(2, {"moe": moe, "pipeline_parallel": {"degree": 2}})
