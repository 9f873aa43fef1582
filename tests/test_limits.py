"""A plan's size against this machine (autotune.limits): refused in one line before anything
is built, the estimate printed by show, and deep models counted from their first blocks."""

import dataclasses
import json
import subprocess
import sys

import pytest

from autotune.workloads import PROBE_LAYERS, gpt_workload, shaped
from tests.conftest import DEFAULT_PLAN, ROOT


def _plan_file(tmp_path, *, workload=None, launch=None, strategies=None) -> str:
    data = json.loads(DEFAULT_PLAN.read_text())
    data["workload"] = workload or data["workload"]
    data["launch"].update(launch or {})
    data["strategies"] = strategies or []
    path = tmp_path / "p.plan.json"
    path.write_text(json.dumps(data))
    return str(path)


def _hf(**changes) -> dict:
    config = json.loads((ROOT / "tests" / "hf_configs" / "llama-3.2-1b.json").read_text())
    model_type = config.pop("model_type")
    for key in ("transformers_version", "architectures", "_name_or_path"):
        config.pop(key, None)
    return {"name": f"hf:{model_type}", "overrides": config | changes}


HF_BAD = [
    # Within the layer bound, too big for this machine: counted from the first blocks, the rest like them.
    ("hf_too_big", {"num_hidden_layers": 60_000}, "in 60,000 layers"),
]


@pytest.mark.parametrize("changes, words", [pytest.param(c, w, id=i) for i, c, w in HF_BAD])
def test_an_hf_model_too_big_is_one_line_before_anything_is_built(tmp_path, run_cli, capsys, changes, words):
    pytest.importorskip("transformers")
    from autotune.workloads.hf import hf_workload

    # transformers' first model imports torchao, which logs its own lines once a process:
    # here, before the commands whose stderr is checked.
    hf_workload("hf:llama", {"hidden_size": 8, "num_attention_heads": 1, "num_hidden_layers": 1, "vocab_size": 8})
    capsys.readouterr()
    bad, out = _plan_file(tmp_path, workload=_hf(**changes)), tmp_path / "out"
    for command in (["show", bad], ["run", bad, "--out", out, "--steps", "1"]):
        code, _, err = run_cli(*command)
        assert code == 2 and err.count("\n") == 1 and err.startswith("autotune: error: ") and words in err, err
    assert not out.exists()


def test_show_prints_the_estimate_it_checked(run_cli):
    code, out, err = run_cli("show", DEFAULT_PLAN)
    assert code == 0, err
    text = " ".join(out.split())  # rich wraps at the terminal's width
    assert "estimate 1.1M parameters, peak memory about " in text and " MiB a process; this machine has " in text, out


def test_more_cpu_processes_than_cores_is_a_warning(tmp_path, run_cli):
    from autotune.limits import usable_cores

    plan = _plan_file(
        tmp_path, launch={"nproc_per_node": usable_cores() + 1}, strategies=[{"name": "ddp", "knobs": {}}]
    )
    code, _, err = run_cli("show", plan)
    assert code == 0 and err == (
        f"autotune: warning: {usable_cores() + 1} processes on {usable_cores()} core(s): each runs slower than alone\n"
    )


@pytest.mark.parametrize(
    "overrides", [{"n_layers": PROBE_LAYERS + 44}, {"tie_embeddings": False, "d_ff": 96, "n_heads": 2}]
)
def test_a_preset_s_shape_counted_from_its_config_is_the_built_model_s(overrides):
    # The GPT's shape is counted from its config (show imports no torch); it equals the shape
    # read off the model built whole (a workload without a config is built on the meta device).
    preset = gpt_workload("tiny", overrides)
    whole = shaped(dataclasses.replace(preset, config=None, shape=None))
    assert preset.shape == whole.shape and preset.shape.n_layers == preset.config.n_layers


def test_a_deep_hf_model_counted_from_its_first_blocks_is_counted_exactly():
    pytest.importorskip("transformers")
    import torch

    from autotune.workloads.hf import build_hf_model, hf_workload
    from autotune.workloads.hf_adapter import HFAdapter, HFCausalLM
    from autotune.workloads.hf_config import build_config, parse

    layers = PROBE_LAYERS + 4
    workload = _hf(
        num_hidden_layers=layers,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
    )
    scaled = hf_workload(workload["name"], workload["overrides"]).shape
    settings = parse(workload["name"], workload["overrides"])
    with torch.device("meta"):
        whole = HFAdapter(HFCausalLM(build_hf_model(settings, build_config(settings)))).shape(scaled.seq_len)
    assert scaled == whole and scaled.n_layers == layers


def test_a_run_too_big_ends_in_one_line_before_anything_is_built(tmp_path):
    # A real `autotune run`: before the check it built blocks until the kernel killed it.
    plan, out = _plan_file(tmp_path, workload={"name": "tiny", "overrides": {"n_layers": 16_777_216}}), tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "autotune", "run", plan, "--out", out], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "3.3T parameters in 16,777,216 layers" in proc.stderr and "this machine has" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "family, key", [("gpt2", "n_layer"), ("gpt2", "num_hidden_layers"), ("qwen3", "num_hidden_layers")]
)
def test_an_hf_layer_count_beyond_any_model_is_refused_by_either_name(family, key):
    pytest.importorskip("transformers")
    from autotune.errors import UserError
    from autotune.workloads.hf import hf_workload

    with pytest.raises(UserError, match=f"hf:{family}: {key} 1,000,000 is more than 65,536 layers"):
        hf_workload(f"hf:{family}", {key: 1_000_000})


def test_a_cuda_plan_is_checked_against_the_gpus_here(monkeypatch):
    # No GPU on the CPU machine: torch is told of one 8 GiB GPU (what the check reads of it).
    import types

    import torch

    from autotune import plan as planmod
    from autotune.errors import UserError
    from autotune.validate import on_this_machine

    gpu = types.SimpleNamespace(name="Imaginary GPU", total_memory=8 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: gpu)
    data = json.loads(DEFAULT_PLAN.read_text()) | {"workload": {"name": "gpt2-124m", "overrides": {}}}
    data["launch"] = {"nproc_per_node": 1, "device": "cuda"}
    data["train"]["micro_batch_size"] = 4
    fits = planmod.from_dict(data)
    assert (
        "this machine has 8.0 GiB of memory on each Imaginary GPU"
        in on_this_machine(fits, gpt_workload("gpt2-124m")).line()
    )
    data["train"]["micro_batch_size"] = 64
    with pytest.raises(
        UserError, match=r"124\.3M parameters in 12 layers.*; this machine has 8\.0 GiB of memory on each Imaginary GPU"
    ):
        on_this_machine(planmod.from_dict(data), gpt_workload("gpt2-124m"))
    data["launch"]["nproc_per_node"], data["strategies"] = 2, [{"name": "ddp", "knobs": {}}]
    with pytest.raises(UserError, match=r"runs 2 processes a node, one per GPU, but this machine has 1 GPU\(s\)"):
        on_this_machine(planmod.from_dict(data), gpt_workload("gpt2-124m"))
