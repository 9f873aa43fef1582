"""The device mesh's factorisation dp × tp × pp, checked on the CPU before anything starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autotune import plan as planmod
from autotune.contract.mesh import ParallelDims, mesh_shape
from autotune.errors import UserError
from autotune.runtime.metrics import tokens_per_step
from autotune.strategies.pipeline_parallel import PipelineParallelConfig
from autotune.strategies.tensor_parallel import TensorParallelConfig
from autotune.workloads import Workload, load_workload
from tests.conftest import DEFAULT_PLAN

SMALL = load_workload("phase8-small")  # 8 heads, MLP width 2048, 8 blocks


@pytest.mark.parametrize(
    ("world", "chosen", "shape"),
    [
        (1, {}, (1, 1, 1)),
        (2, {"ddp": {}}, (2, 1, 1)),
        (2, {"tensor_parallel": {}}, (1, 2, 1)),
        (8, {"tensor_parallel": {"degree": 4}, "fsdp2": {}}, (2, 4, 1)),  # 2D, torchtitan's FSDP + TP
        (4, {"pipeline_parallel": {"degree": 4}}, (1, 1, 4)),
        (2, {"pipeline_parallel": PipelineParallelConfig(microbatches=2)}, (1, 1, 2)),  # typed configs too
        (4, {"tensor_parallel": TensorParallelConfig(), "pipeline_parallel": {}}, (1, 2, 2)),
    ],
)
def test_mesh_shapes(world: int, chosen: dict, shape: tuple[int, int, int]) -> None:
    assert mesh_shape(world, chosen, workload=SMALL, micro_batch_size=8) == shape


@pytest.mark.parametrize(
    ("world", "chosen", "kwargs", "message"),
    [
        (
            2,
            {"tensor_parallel": {"degree": 2}, "pipeline_parallel": {}},
            {},
            "tp 2 × pp 2 = 4 does not divide 2 processes",
        ),
        (6, {"tensor_parallel": {"degree": 4}}, {}, "tp 4 × pp 1 = 4 does not divide 6 processes"),
        (
            8,
            {"tensor_parallel": {"degree": 4}},
            {},
            "tp 4 × pp 1 leaves 2 data-parallel groups of 8 processes: add fsdp2, or make tp × pp = 8",
        ),
        (
            2,
            {"tensor_parallel": {}, "fsdp2": {}},
            {},
            "fsdp2 has a data-parallel group of 1 process: tp 2 × pp 1 takes all 2 processes",
        ),
        (4, {"pipeline_parallel": {}, "ddp": {}}, {}, r"pipeline_parallel takes the whole run \(degree 4\)"),
        (
            4,
            {"tensor_parallel": {"degree": 4}},
            {"workload": load_workload("tiny", {"n_heads": 2, "d_model": 128})},
            "does not divide the 2 heads",
        ),
        (
            2,
            {"tensor_parallel": {}},
            {"workload": load_workload("tiny", {"d_ff": 101})},
            "does not divide the MLP width 101",
        ),
        (
            8,
            {"pipeline_parallel": {"degree": 8, "microbatches": 8}},
            {"workload": load_workload("tiny")},
            "degree 8 exceeds the 4 blocks",
        ),
        (
            2,
            {"pipeline_parallel": {"microbatches": 3}},
            {"micro_batch_size": 8},
            "microbatches 3 does not divide the micro-batch size 8",
        ),
        (4, {"pipeline_parallel": {"degree": 4, "microbatches": 2}}, {}, "microbatches 2 is fewer than its 4 stages"),
    ],
)
def test_broken_rules_are_named(world: int, chosen: dict, kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        mesh_shape(world, chosen, **kwargs)


def test_tp_ranks_are_neighbours_and_pp_stages_farthest_apart() -> None:
    dims = ParallelDims(dp=2, tp=2, pp=2)
    assert [dims.coords(r) for r in range(8)] == [(p, d, t) for p in range(2) for d in range(2) for t in range(2)]


def test_tokens_per_step_counts_the_dp_groups_only(tmp_path: Path) -> None:
    data = json.loads(DEFAULT_PLAN.read_text())
    data["launch"]["nproc_per_node"] = 4
    data["strategies"] = [{"name": "tensor_parallel", "knobs": {}}, {"name": "fsdp2", "knobs": {}}]
    plan = planmod.from_dict(data)
    assert tokens_per_step(plan) == plan.train.micro_batch_size * load_workload("tiny").seq_len * plan.grad_accum() * 2


def test_a_plan_with_an_illegal_mesh_fails_before_launch(run_cli, tmp_path: Path) -> None:
    data = json.loads(DEFAULT_PLAN.read_text())
    data["launch"]["nproc_per_node"] = 2
    data["strategies"] = [{"name": "tensor_parallel", "knobs": {"degree": 4}}]
    (tmp_path / "plan.json").write_text(json.dumps(data))
    code, _, err = run_cli("run", tmp_path / "plan.json", "--out", tmp_path / "run")
    assert code == 2
    assert err.strip() == "autotune: error: tp 4 × pp 1 = 4 does not divide 2 processes"
    assert not (tmp_path / "run").exists()


def _hf(**sizes: int) -> Workload:
    """A tiny hf: Llama (4 heads sharing 2 kv heads, gated MLP of width 128, 4 blocks), with ``sizes``."""
    pytest.importorskip("transformers")
    fields = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=250,
        max_position_embeddings=64,
        seq_len=16,
    )
    return load_workload("hf:llama", {**fields, **sizes})


@pytest.mark.parametrize(
    ("world", "chosen", "gpt", "hf", "message"),
    [
        (
            4,
            {"tensor_parallel": {"degree": 4}},
            {"n_heads": 2, "d_model": 128},
            {"num_attention_heads": 2, "num_key_value_heads": 2},
            "tensor_parallel degree 4 does not divide the 2 heads",
        ),
        (
            2,
            {"tensor_parallel": {}},
            {"d_ff": 101},
            {"intermediate_size": 101},
            "tensor_parallel degree 2 does not divide the MLP width 101",
        ),
        (
            8,
            {"pipeline_parallel": {"degree": 8, "microbatches": 8}},
            {},
            {},
            "pipeline_parallel degree 8 exceeds the 4 blocks (a stage needs one at least)",
        ),
    ],
)
def test_an_hf_model_is_refused_as_a_gpt_is(world: int, chosen: dict, gpt: dict, hf: dict, message: str) -> None:
    # The checks read the workload's shape, not a GPT's config: the same line for either.
    for workload in (load_workload("tiny", gpt), _hf(**hf)):
        with pytest.raises(UserError) as refused:
            mesh_shape(world, chosen, workload=workload)
        assert str(refused.value) == message, workload.name


def test_tp_must_divide_the_kv_heads_too() -> None:
    # Grouped-query attention: 4 query heads divide over 4 processes, their 2 kv heads do not.
    assert mesh_shape(2, {"tensor_parallel": {}}, workload=_hf()) == (1, 2, 1)
    with pytest.raises(UserError, match="^tensor_parallel degree 4 does not divide the 2 kv heads$"):
        mesh_shape(4, {"tensor_parallel": {"degree": 4}}, workload=_hf())


def test_an_hf_plan_with_an_illegal_mesh_fails_before_launch(run_cli, tmp_path: Path) -> None:
    data = json.loads(DEFAULT_PLAN.read_text())
    data["workload"] = {
        "name": "hf:llama",
        "overrides": {**_hf().overrides, "num_attention_heads": 2, "num_key_value_heads": 2},
    }
    data["launch"]["nproc_per_node"] = 4
    data["strategies"] = [{"name": "tensor_parallel", "knobs": {"degree": 4}}]
    (tmp_path / "plan.json").write_text(json.dumps(data))
    for command in ("run", "show"):
        code, _, err = run_cli(
            command, tmp_path / "plan.json", *(("--out", tmp_path / "run") if command == "run" else ())
        )
        assert code == 2
        assert err.strip() == "autotune: error: tensor_parallel degree 4 does not divide the 2 heads"
    assert not (tmp_path / "run").exists()
