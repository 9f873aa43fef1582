"""The spmd strategy's sharding on torch-xla's SPMD partitioner. XLA's CPU backend has one device
(pytorch/xla#8063), so the annotations are checked on a one-device mesh, in a process of its own
(SPMD mode is for the whole process), and a step runs through them; nothing has run over several
devices yet. The specs for several are tested in tests/test_spmd.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import dataclasses, torch, torch_xla, torch_xla.runtime as xr
    xr.use_spmd()
    from autotune import devices
    from autotune.contract.context import TrainContext
    from autotune.strategies import spmd
    from autotune.workloads import load_workload

    device = devices.get("xla").torch_device(None)
    workload = load_workload("tiny", {"n_layers": 1, "seq_len": 32})  # one block: a compilation of seconds
    torch.manual_seed(0)
    model = devices.get("xla").place(workload.build_model(), device)
    ctx = TrainContext(workload=workload, device=device, model=model)
    for shard_params in (True, False):
        mesh = spmd.shard(ctx, spmd.SpmdConfig(shard_params=shard_params), 1)
        assert mesh.axis_names == spmd.AXES and mesh.mesh_shape == (1, 1)
    specs = {torch_xla._XLAC._get_xla_sharding_spec(p) for p in model.parameters()}
    x = torch.randint(0, workload.vocab_size, (2, workload.seq_len), device=device)
    loss = ctx.forward(x, x)
    loss.backward()
    torch_xla.sync()
    print("specs", sorted(specs), "loss", float(loss))
    """
)


def test_the_sharding_annotations_on_a_one_device_mesh_and_a_step_through_them() -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("specs ['{replicated}'] loss "), line  # one device: every shard is the whole
    assert 6.0 < float(line.rpartition(" ")[2]) < 9.0
