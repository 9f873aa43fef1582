"""The spmd strategy's declarations and its sharding specs for several devices, without torch-xla
(tests/xla/test_xla_spmd.py puts them on a mesh)."""

from __future__ import annotations

import pytest
import torch

from autotune.catalog import catalog
from autotune.contract.context import TrainContext
from autotune.errors import UserError
from autotune.strategies import spmd
from autotune.workloads import load_workload


def test_fsdpv2_shards_the_first_dimension_over_the_data_axis() -> None:
    assert spmd.mesh_shape(4) == (4, 1) and spmd.AXES == ("fsdp", "model") and spmd.BATCH_SPEC == ("fsdp", None)
    assert spmd.param_spec((2048, 128), shard=True) == ("fsdp", None)
    assert spmd.param_spec((128,), shard=True) == ("fsdp",)
    assert spmd.param_spec((), shard=True) == ()
    assert spmd.param_spec((2048, 128), shard=False) == (None, None)
    spmd.check_batch(8, 4)
    with pytest.raises(UserError, match="spmd splits the micro-batch over 4 XLA devices: 6 does not divide by it"):
        spmd.check_batch(6, 4)


def test_it_needs_two_xla_devices_and_refuses_any_other() -> None:
    strategy = catalog()["spmd"]
    assert strategy.needs.min_devices == 2 and strategy.needs.features == {"gspmd"} and strategy.exact
    workload = load_workload("tiny", {})
    ctx = TrainContext(workload=workload, device=torch.device("cpu"), model=workload.build_model())
    with pytest.raises(UserError, match=r"strategy spmd needs an XLA device \(launch.device xla\), this run trains on"):
        spmd.apply_spmd(ctx, spmd.SpmdConfig())
