"""Hugging Face models from the command line (``--workload hf[:<type>] --workload-config PATH``)
and their bad input, through the real CLI, configs written locally, on the CPU. A plan from a
config file or its folder is made and run in tests/test_hf_zoo.py."""

import json

import pytest

pytest.importorskip("transformers")

from tests.conftest import ROOT  # noqa: E402

LLAMA = dict(
    model_type="llama",
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_size=64,
    intermediate_size=128,
    max_position_embeddings=64,
    bos_token_id=0,
    eos_token_id=1,
    seq_len=16,
    vocab_size=512,  # the default corpus' byte-level BPE needs 257+; llama's own default is 32000
)
CPU = ROOT / "profiles" / "cpu-dev.json"
PROCESS_NEEDS = ("fsdp2", "tensor_parallel", "pipeline_parallel")
"""Supported by the model, usable given 2+ processes."""


@pytest.fixture
def llama_json(tmp_path):
    path = tmp_path / "llama.json"
    path.write_text(json.dumps(LLAMA))
    return path


def listing(run_cli, *args) -> dict[str, dict]:
    """`autotune strategies --json` on the committed CPU machine's profile (no accelerator)."""
    code, out, err = run_cli("strategies", "--profile", CPU, *args, "--json")
    assert code == 0, err
    return {s["name"]: s for s in json.loads(out)}


@pytest.mark.parametrize(
    "name",
    ["activation_checkpoint", "compile", "fsdp2", "attention", "vocab_padding", "tensor_parallel", "pipeline_parallel"],
)
def test_strategies_lists_what_the_issue_says_for_hf_llama(run_cli, llama_json, name):
    """Usable with 2 processes; with one, those needing processes say only that, as for the GPT."""
    two = listing(run_cli, "--workload", "hf:llama", "--workload-config", llama_json, "--processes", "2")
    assert two[name]["usable"], two[name]["reason"]
    if name in PROCESS_NEEDS:
        one = listing(run_cli, "--workload", "hf:llama", "--workload-config", llama_json)
        gpt = listing(run_cli, "--workload", "tiny")
        assert one[name]["reason"] == gpt[name]["reason"] == "needs 2+ processes, this run has 1"


def test_strategies_explain_takes_the_type_from_the_config(run_cli, llama_json):
    code, out, err = run_cli(
        "strategies", "--workload", "hf", "--workload-config", llama_json, "--processes", "2", "--explain"
    )
    assert code == 0, err
    assert "workload hf:llama" in out.replace("\n", " ")
    left_out = {line.partition(": ")[0] for line in out.splitlines()}  # "name: reason" per strategy left out
    assert "ddp" not in left_out and not left_out & {
        "activation_checkpoint",
        "compile",
        "fsdp2",
        "attention",
        "vocab_padding",
        "tensor_parallel",
        "pipeline_parallel",
    }
    assert "triton_kernels" in left_out  # the lines are there: this machine has no GPU


def _mkdir(p):
    p.mkdir()


BAD_CONFIGS = [
    pytest.param(lambda p: p.write_text("{not json"), "hf:llama", "not a JSON model config", id="does-not-parse"),
    pytest.param(
        lambda p: p.write_text('{"model_type": "nosuchfamily"}'),
        "hf",
        "knows no model type 'nosuchfamily'",
        id="unknown-type",
    ),
    pytest.param(_mkdir, "hf:llama", "holds no config.json", id="folder-without-config"),
    pytest.param(lambda p: p.write_text(json.dumps(LLAMA)), "hf:gpt2", "is a 'llama' config", id="type-disagrees"),
    pytest.param(lambda p: p.write_text(json.dumps(LLAMA)), "tiny", "is for hf: workloads", id="not-an-hf-workload"),
    pytest.param(
        lambda p: p.write_text(json.dumps({**LLAMA, "hidden_size": "64"})),
        "hf",
        "Field 'hidden_size' expected int",
        id="type-mismatch",
    ),
    pytest.param(
        lambda p: p.write_text(json.dumps({**LLAMA, "num_attention_heads": 5})),
        "hf",
        "not a multiple",
        id="transformers-refuses",
    ),
    pytest.param(
        lambda p: p.write_text(json.dumps({**LLAMA, "max_position_embeddings": 8})),
        "hf",
        "seq_len: 16 must be",
        id="longer-than-positions",
    ),
    pytest.param(lambda p: None, "hf:llama", "no such file", id="missing-file"),
]


@pytest.mark.parametrize("setup, workload, message", BAD_CONFIGS)
@pytest.mark.parametrize("command", ["plan", "strategies"])
def test_bad_hf_configs_are_one_line_exit_2_and_nothing_written(run_cli, tmp_path, command, setup, workload, message):
    cfg = tmp_path / "cfg"
    setup(cfg)
    before = sorted(tmp_path.rglob("*"))
    args = {
        "plan": ["plan", "--trials", "1", "--storage", f"sqlite:///{tmp_path}/s.db", "--out", tmp_path / "p.json"],
        "strategies": ["strategies", "--graph", tmp_path / "g.dot"],
    }[command]
    code, out, err = run_cli(*args, "--workload", workload, "--workload-config", cfg)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(tmp_path.rglob("*")) == before


LLAMA_3_2 = {
    **LLAMA,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}
"""Llama 3.2's positions and rope, at LLAMA's sizes, without a seq_len of its own."""
del LLAMA_3_2["seq_len"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seq-len", "0"], "--seq-len 0: expected a positive number of tokens"),
        (["--seq-len", "131073"], "seq_len: 131073 must be a whole number from 1 to the model's 131072 positions"),
    ],
)
def test_bad_seq_lens_are_one_line_exit_2_and_nothing_written(run_cli, tmp_path, args, message):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_2))
    before = sorted(tmp_path.rglob("*"))
    code, _, err = run_cli(
        "plan",
        "--workload",
        "hf",
        "--workload-config",
        tmp_path / "config.json",
        *args,
        "--trials",
        "1",
        "--storage",
        f"sqlite:///{tmp_path}/s.db",
        "--out",
        tmp_path / "p.json",
    )
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(tmp_path.rglob("*")) == before


def test_seq_len_goes_into_the_overrides_and_the_default_is_not_131072(tmp_path):
    """What `plan --seq-len` hands the planner: the workload the trials rebuild."""
    from autotune.workloads import load_workload
    from autotune.workloads.hf_config import from_command_line

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_2))
    name, overrides = from_command_line("hf", tmp_path / "config.json")
    assert load_workload(name, overrides).seq_len == 1024
    assert load_workload(name, {**overrides, "seq_len": 2048}).seq_len == 2048


def test_fields_the_family_does_not_define_are_accepted_and_named(run_cli, tmp_path):
    """As transformers accepts them (GPT-2's published n_ctx, a typo alike): one note says so."""
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "n_ctx": 1024, "hiden_size": 8}))
    code, _, err = run_cli("strategies", "--workload", "hf", "--workload-config", tmp_path / "config.json")
    assert code == 0, err
    assert "hiden_size, n_ctx: not fields of transformers' llama config, kept as plain attributes" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workload", "hf"], "--workload-config"),  # neither a type nor a config
        (["--processes", "0"], "--processes 0"),
    ],
)
def test_bad_strategies_options_are_one_line(run_cli, args, message):
    code, _, err = run_cli("strategies", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def _hf_plan(tmp_path, name: str, overrides: dict, strategies: list, nproc: int):
    data = json.loads((ROOT / "profiles" / "default" / "tiny.plan.json").read_text())
    data["workload"] = {"name": name, "overrides": overrides}
    data["strategies"] = strategies
    data["launch"]["nproc_per_node"] = nproc
    data["train"].update(micro_batch_size=4, steps=2, random_tokens=True, eval_interval=0, checkpoint_interval=0)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return path


GPT2 = dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64, n_positions=64, vocab_size=512, seq_len=16)


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("hf:nosuchfamily", {}, "knows no model type"),
        ("hf:llama", {"hidden_size": "64"}, "Field 'hidden_size' expected int"),
        (
            "hf:llama",
            {**{k: v for k, v in LLAMA.items() if k != "model_type"}, "seq_len": 65},
            "workload.overrides.seq_len",
        ),
        ("hf:", {}, "expected hf:<model_type>"),
    ],
)
@pytest.mark.parametrize("command", ["run", "show"])
def test_bad_hf_plans_are_one_line_exit_2(run_cli, tmp_path, command, name, overrides, message):
    path = _hf_plan(tmp_path, name, overrides, [], 1)
    args = ["run", path, "--out", tmp_path / "run"] if command == "run" else ["show", path]
    code, _, err = run_cli(*args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["run", "show"])
def test_tp_on_a_model_without_a_tp_plan_is_one_line_exit_2_before_launch(run_cli, tmp_path, command):
    path = _hf_plan(tmp_path, "hf:gpt2", GPT2, [{"name": "tensor_parallel", "knobs": {"degree": 2}}], 2)
    args = ["run", path, "--out", tmp_path / "run"] if command == "run" else ["show", path]
    code, _, err = run_cli(*args)
    assert code == 2 and "tensor_parallel" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
