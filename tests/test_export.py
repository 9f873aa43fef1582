"""`autotune export`: each target loads into the tool it is for (DeepSpeed's and Accelerate's
own config classes, bash for the batch script), the torchrun command trains, and what a target
cannot express is refused with one line and nothing written."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from autotune.plan import LaunchSpec, host_port
from tests.conftest import DEFAULT_PLAN, ROOT

PYTHON = sys.executable


def autotune(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "autotune", *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=timeout
    )


def plan_file(
    tmp_path: Path, name: str, strategies: list[dict], *, nproc: int = 2, device: str = "cpu", **launch
) -> Path:
    data = json.loads(DEFAULT_PLAN.read_text())
    data["strategies"] = strategies
    data["launch"].update(nproc_per_node=nproc, device=device, **launch)
    data["train"].update(micro_batch_size=4, eval_interval=0, checkpoint_interval=0)
    path = tmp_path / f"{name}.plan.json"
    path.write_text(json.dumps(data))
    return path


ZERO = [
    {"name": "precision", "knobs": {"dtype": "bf16"}},
    {"name": "grad_accum", "knobs": {"steps": 2}},
    {"name": "zero", "knobs": {"stage": 2, "offload_optimizer": True}},
]
FSDP = [
    {"name": "precision", "knobs": {"dtype": "bf16"}},
    {"name": "activation_checkpoint", "knobs": {}},
    {"name": "compile", "knobs": {"mode": "default", "scope": "blocks"}},
    {"name": "fsdp2", "knobs": {"reshard_after_forward": False}},
]


def test_the_deepspeed_export_is_the_config_deepspeed_loads(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    out = tmp_path / "ds_config.json"
    r = autotune("export", str(plan_file(tmp_path, "zero", ZERO)), "--to", "deepspeed", "--out", str(out))
    assert r.returncode == 0, r.stderr
    config = DeepSpeedConfig(str(out))  # DeepSpeed's own parser and checks (world size 1 here)
    assert config.train_micro_batch_size_per_gpu == 4
    assert config.gradient_accumulation_steps == 2
    assert config.zero_optimization_stage == 2
    assert config.zero_config.offload_optimizer.device == "cpu"
    assert config.gradient_clipping == 1.0


def test_the_accelerate_export_loads_into_accelerates_config_class(tmp_path):
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType, PrecisionType

    fsdp, zero = tmp_path / "fsdp.yaml", tmp_path / "zero.yaml"
    assert (
        autotune("export", str(plan_file(tmp_path, "fsdp", FSDP)), "--to", "accelerate", "--out", str(fsdp)).returncode
        == 0
    )
    assert (
        autotune("export", str(plan_file(tmp_path, "zero", ZERO)), "--to", "accelerate", "--out", str(zero)).returncode
        == 0
    )
    a = ClusterConfig.from_yaml_file(str(fsdp))
    assert (a.distributed_type, a.mixed_precision, a.num_processes, a.use_cpu) == (
        DistributedType.FSDP,
        PrecisionType.BF16,
        2,
        True,
    )
    assert a.fsdp_config["fsdp_version"] == 2 and a.fsdp_config["fsdp_reshard_after_forward"] is False
    assert a.fsdp_config["fsdp_activation_checkpointing"] is True
    assert a.dynamo_config["dynamo_backend"] == "INDUCTOR"
    b = ClusterConfig.from_yaml_file(str(zero))
    assert b.distributed_type == DistributedType.DEEPSPEED
    assert b.deepspeed_config["zero_stage"] == 2 and b.deepspeed_config["offload_optimizer_device"] == "cpu"
    assert b.deepspeed_config["gradient_accumulation_steps"] == 2


def test_the_slurm_export_is_a_batch_script_for_every_node(tmp_path):
    plan = plan_file(
        tmp_path,
        "two-nodes",
        [{"name": "ddp", "knobs": {}}],
        nproc=4,
        device="cuda",
        nnodes=2,
        rdzv_endpoint="node0:29400",
    )
    out = tmp_path / "job.sbatch"
    r = autotune("export", str(plan), "--to", "slurm", "--out", str(out))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert subprocess.run(["bash", "-n", str(out)]).returncode == 0
    assert os.access(out, os.X_OK)
    directives = dict(
        line.removeprefix("#SBATCH --").split("=", 1) for line in text.splitlines() if line.startswith("#SBATCH")
    )
    assert directives["nodes"] == "2" and directives["gpus-per-node"] == "4" and directives["ntasks-per-node"] == "1"
    srun = shlex.split(next(line for line in text.splitlines() if line.startswith("srun ")))
    assert (
        srun[1] == "torchrun"
        and "--nnodes=2" in srun
        and "--nproc-per-node=4" in srun
        and "--rdzv-backend=c10d" in srun
    )
    assert "--rdzv-endpoint=$endpoint" in srun
    assert srun[-4:-1] == ["run", str(plan), "--out"]


def test_the_torchrun_export_trains_the_plan(tmp_path):
    """The exported command line itself, run as printed (plus a step count): 2 gloo processes."""
    plan = plan_file(tmp_path, "ddp", [{"name": "ddp", "knobs": {}}])
    r = autotune("export", str(plan), "--to", "torchrun")
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout)
    assert argv[:3] == ["torchrun", "--standalone", "--nproc-per-node=2"]
    run = subprocess.run(
        [PYTHON, "-m", "torch.distributed.run", *argv[1:], "--steps", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "ddp" / "summary.json").read_text())
    assert summary["steps_done"] == 2


@pytest.mark.parametrize(
    "strategies, target, needle",
    [
        ([{"name": "ddp", "knobs": {}}], "deepspeed", "has no zero strategy"),
        ([{"name": "tensor_parallel", "knobs": {"degree": 2}}], "accelerate", "tensor_parallel"),
        ([{"name": "ddp", "knobs": {}}], "horovod", "unknown export target"),
        # What a strategy declares no export for is refused, never left out (Strategy.exports).
        (
            [{"name": "ddp", "knobs": {}}, {"name": "int8", "knobs": {}}],
            "accelerate",
            "uses int8, which an Accelerate config cannot express",
        ),
        (
            [{"name": "ddp", "knobs": {}}, {"name": "moe", "knobs": {}}],
            "accelerate",
            "uses moe, which an Accelerate config cannot express",
        ),
        (
            [{"name": "sparse_attention", "knobs": {}}, {"name": "ddp", "knobs": {}}],
            "accelerate",
            "uses sparse_attention, which an Accelerate",
        ),
        (ZERO + [{"name": "fp8", "knobs": {}}], "deepspeed", "uses fp8, which a DeepSpeed config cannot express"),
        # What a declared export cannot state of a strategy's settings is refused by the strategy.
        (
            [{"name": "ddp", "knobs": {}}, {"name": "fp8", "knobs": {"recipe": "rowwise"}}],
            "accelerate",
            "fp8 with recipe rowwise",
        ),
    ],
)
def test_what_a_target_cannot_express_is_one_line_and_nothing_written(tmp_path, strategies, target, needle):
    out = tmp_path / "export.out"
    r = autotune("export", str(plan_file(tmp_path, "p", strategies)), "--to", target, "--out", str(out))
    assert r.returncode == 2
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


NOTHING_TO_SET = [
    {"name": name, "knobs": {}}
    for name in ("attention", "vocab_padding", "triton_kernels", "optimizer", "dataloader", "cpu_threads", "ddp")
]
"""Strategies that declare an Accelerate config has nothing to set for them."""
ZERO3 = [
    {"name": "zero", "knobs": {"stage": 3, "offload_params": True}},
    {"name": "grad_accum", "knobs": {"steps": 4}},
    {"name": "compile", "knobs": {"scope": "blocks"}},
    {"name": "activation_checkpoint", "knobs": {}},
]
FP8 = [*NOTHING_TO_SET, {"name": "fp8", "knobs": {}}, {"name": "precision", "knobs": {"dtype": "bf16"}}]

ACCELERATE_BASE = """compute_environment: LOCAL_MACHINE
debug: false
num_processes: {processes}
num_machines: {nodes}
machine_rank: 0
use_cpu: {cpu}
mixed_precision: {mixed}
downcast_bf16: 'no'
rdzv_backend: {rdzv}
same_network: true
main_training_function: main
enable_cpu_affinity: false
"""
DYNAMO = """dynamo_config:
  dynamo_backend: INDUCTOR
  dynamo_mode: default
  dynamo_use_fullgraph: false
  dynamo_use_dynamic: false
"""
FSDP_YAML = (
    ACCELERATE_BASE.format(processes=2, nodes=1, cpu="true", mixed="bf16", rdzv="static")
    + DYNAMO
    + """distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: false
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_activation_checkpointing: true
  fsdp_offload_params: false
  fsdp_cpu_ram_efficient_loading: false
"""
)
ZERO3_YAML = (
    ACCELERATE_BASE.format(processes=8, nodes=2, cpu="false", mixed="'no'", rdzv="c10d")
    + """main_process_ip: node0
main_process_port: 29400
"""
    + DYNAMO
    + """distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 3
  offload_optimizer_device: none
  offload_param_device: cpu
  gradient_accumulation_steps: 4
  gradient_clipping: 1.0
  zero3_init_flag: false
"""
)
FP8_YAML = (
    ACCELERATE_BASE.format(processes=8, nodes=1, cpu="false", mixed="fp8", rdzv="static")
    + """fp8_config:
  backend: AO
distributed_type: MULTI_GPU
"""
)
H200_YAML = (
    ACCELERATE_BASE.format(processes=1, nodes=1, cpu="false", mixed="bf16", rdzv="static")
    + DYNAMO
    + "distributed_type: 'NO'\n"
)


@pytest.mark.parametrize(
    "strategies, launch, expected",
    [
        (FSDP[::-1], {}, FSDP_YAML),  # listed with the plugin before what it follows
        (ZERO3, {"nproc": 4, "device": "cuda", "nnodes": 2, "rdzv_endpoint": "node0:29400"}, ZERO3_YAML),
        (FP8, {"nproc": 8, "device": "cuda"}, FP8_YAML),
        (None, {}, H200_YAML),  # profiles/h200-phase8-small.plan.json: attention, vocab_padding, optimizer, grad_accum
    ],
    ids=["fsdp", "zero3", "fp8", "h200-phase8-small"],
)
def test_the_strategies_exports_make_the_accelerate_configs_made_before_they_declared_them(
    tmp_path, strategies, launch, expected
):
    """The configs as export.py wrote them when it named each strategy itself, byte for byte: the
    strategies' fragments merged in apply.order() (fp8's mixed precision over the precision's, the
    plugin last) and nothing of those that declare nothing to set."""
    from autotune import export
    from autotune import plan as planmod

    plan = (
        plan_file(tmp_path, "p", strategies, **launch)
        if strategies
        else ROOT / "profiles" / "h200-phase8-small.plan.json"
    )
    text = export.export(planmod.load(plan), plan, "accelerate")
    assert text.split("\n", 2)[2] == expected


def test_the_deepspeed_export_is_zeros_config_and_nothing_else_sets_a_key(tmp_path):
    from autotune import export
    from autotune import plan as planmod

    plan = plan_file(
        tmp_path, "zero", [*ZERO, {"name": "compile", "knobs": {"scope": "blocks"}}, {"name": "attention", "knobs": {}}]
    )
    expected = {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
        "bf16": {"enabled": False}, "fp16": {"enabled": False},
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "optimizer": {"type": "AdamW",
                      "params": {"lr": 0.002, "betas": [0.9, 0.95], "eps": 1e-08, "weight_decay": 0.1}},
        "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False,
    }  # fmt: skip
    assert export.export(planmod.load(plan), plan, "deepspeed") == json.dumps(expected, indent=2) + "\n"


def test_a_plan_of_an_unknown_schema_version_is_not_exported(tmp_path):
    path = plan_file(tmp_path, "future", [])
    data = json.loads(path.read_text())
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    r = autotune("export", str(path), "--to", "torchrun")
    assert r.returncode == 2 and "schema" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


HOSTILE_NAME = "evil\ntouch PWNED\n$(touch PWNED)`touch PWNED`'\";touch PWNED;#\x1b]0;title\x07\\"
"""A plan file name that is shell code on a line of its own, in a substitution and past quotes,
and a terminal's escape sequence."""


def _sandboxed(text: str, where: Path) -> list[str]:
    """Run an exported script or command line in bash, in ``where``, with Slurm's and the
    launchers' programs as shell functions that print their arguments (none is installed
    here): the words each program would get, as bash parsed them."""
    script = where / "exported.sh"
    script.write_text(text)
    stand_ins = """srun() { printf '%s\\0' srun "$@"; }
torchrun() { printf '%s\\0' torchrun "$@"; }
scontrol() { echo node7; }
"""
    r = subprocess.run(
        ["bash", "-c", stand_ins + '. "$0"', str(script)],
        capture_output=True,
        text=True,
        cwd=where,
        timeout=30,
        env={**os.environ, "SLURM_JOB_NODELIST": "node[7-8]"},
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.split("\0")[:-1]


@pytest.mark.parametrize("nodes", [1, 2])
def test_a_hostile_plan_file_name_stays_one_word_in_every_export(tmp_path, nodes):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    plan = plan_file(tmp_path, HOSTILE_NAME, [{"name": "ddp", "knobs": {}}], nnodes=nodes, rdzv_endpoint="[::1]:29400")
    slurm = autotune("export", str(plan), "--to", "slurm", cwd=sandbox)
    assert slurm.returncode == 0, slurm.stderr
    assert all(line.isprintable() for line in slurm.stdout.splitlines())  # printed, it drives no terminal
    assert subprocess.run(["bash", "-n"], input=slurm.stdout, text=True).returncode == 0
    directives = [line for line in slurm.stdout.splitlines() if line.startswith("#SBATCH")]
    name = directives[0].removeprefix("#SBATCH --job-name=autotune-")  # the job and the run folder
    assert name.startswith("evil_touch_PWNED_") and re.fullmatch(r"[A-Za-z0-9._-]+", name), directives
    expected_run = ["-m", "autotune", "run", str(plan), "--out", f"runs/{name}"]
    words = _sandboxed(slurm.stdout, sandbox)
    endpoint = ["--standalone"]
    if nodes > 1:  # the rendezvous on the job's first node, at the plan's port
        endpoint = ["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node7:29400", "--rdzv-id=autotune"]
    assert words == ["srun", "torchrun", *endpoint, "--nproc-per-node=2", *expected_run]
    command = autotune("export", str(plan), "--to", "torchrun", cwd=sandbox)
    assert command.returncode == 0, command.stderr
    assert command.stdout.count("\n") == 1 and command.stdout[:-1].isprintable()
    endpoint = [w.replace("node7", "[::1]") for w in endpoint]
    assert _sandboxed(command.stdout, sandbox) == ["torchrun", *endpoint, "--nproc-per-node=2", *expected_run]
    yaml = pytest.importorskip("yaml")
    accelerate = autotune("export", str(plan), "--to", "accelerate", cwd=sandbox)
    assert accelerate.returncode == 0, accelerate.stderr
    assert all(line.isprintable() for line in accelerate.stdout.splitlines())
    header = accelerate.stdout.split("compute_environment:")[0].splitlines()
    assert len(header) == 2 and all(line.startswith("# ") for line in header), header  # the name's newlines escaped
    assert "evil\\ntouch PWNED\\n" in header[0]
    config = yaml.safe_load(accelerate.stdout)
    assert config["num_machines"] == nodes and config.get("main_process_ip", "::1") == "::1"
    assert sorted(p.name for p in sandbox.iterdir()) == ["exported.sh"]  # no PWNED, nothing else


@pytest.mark.parametrize(
    "endpoint",
    [
        '127.0.0.1:1";touch PWNED;"',
        "$(touch PWNED):29400",
        "node0:29400;touch PWNED",
        "node0:abc",
        "node0:0",
        "node0:65536",
        "node0",
        "node 0:29400",
        "[::1:29400",
        "[not-ipv6]:29400",
        "-node0:29400",
        "node0:" + "9" * 5000,
        "node0:٣٣",
    ],
)
def test_a_rendezvous_endpoint_must_be_host_port(endpoint):
    with pytest.raises(ValueError, match="rdzv_endpoint must be host:port"):
        LaunchSpec(nnodes=2, rdzv_endpoint=endpoint)
    assert host_port("node-0.cluster:29400") == ("node-0.cluster", 29400)
    assert host_port("10.0.0.1:1") == ("10.0.0.1", 1) and host_port("[fe80::1]:65535") == ("fe80::1", 65535)
