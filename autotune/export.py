"""A plan in other launchers' terms (``autotune export``): torchrun's command line, DeepSpeed's
``ds_config.json``, an Accelerate config YAML and a Slurm batch script.

Each export says what the plan says and refuses, with one line, what its target cannot express
(a DeepSpeed config of a plan without ``zero``, Accelerate for tensor or pipeline parallel). The
torchrun, Accelerate and Slurm exports launch ``autotune run PLAN`` itself: under a launcher's
processes it trains as rank of that run, so the strategies are the plan's, applied by the same
executor. The DeepSpeed config and the Accelerate YAML also carry the plan's settings for users
who port them into their own scripts: there each strategy states itself (``Strategy.exports``:
what it sets in that config, or that the config has nothing to say about it), and a strategy that
declares nothing for the target is refused, never left out. This module's code names no strategy.

Plan text never becomes shell code: every word of a command is quoted (``shell_quote``), the
rendezvous endpoint is a validated host:port (``plan.host_port``), names made from the plan's file
name (the job, the run's folder) keep to ``[A-Za-z0-9._-]``, and a comment shows the file name with
its control characters escaped. No export holds a control character but its line ends: no newline
in a file name starts a line of its own, and an export printed to a terminal cannot drive it.

Pure Python: an export imports neither torch nor the executor.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autotune import catalog
from autotune.apply import order
from autotune.contract.strategy import NOTHING_TO_SET, ExportTarget
from autotune.errors import UserError
from autotune.plan import Plan, host_port
from autotune.terminal import visible


def export(plan: Plan, plan_path: Path, target: str) -> str:
    """The text of ``plan`` (read from ``plan_path``) for ``target``; UserError when the target
    cannot express the plan."""
    if target not in EXPORTERS:
        raise UserError(f"unknown export target {target!r} (known: {', '.join(EXPORTERS)})")
    return EXPORTERS[target](plan, plan_path)


def shell_quote(word: str) -> str:
    """``word`` as one word of bash: ``shlex.quote``, or ANSI-C quoting (``$'a\\nb'``) where it
    holds a character that is not printable (a newline, an escape), which stays out of the text
    as its UTF-8 bytes (``\\xHH``: the same in every locale; a file name's undecodable bytes too)."""
    if word.isprintable():
        return shlex.quote(word)
    return "$'" + "".join(_ANSI_C.get(c, c) if c.isprintable() else _bytes(c) for c in word) + "'"


_ANSI_C = {"\\": "\\\\", "'": "\\'"}
"""The printable characters that ANSI-C quoting escapes."""


def _bytes(c: str) -> str:
    return "".join(f"\\x{b:02x}" for b in c.encode("utf-8", "surrogateescape"))


def _name(plan_path: Path) -> str:
    """The plan's file name without ``.plan.json``, in ``[A-Za-z0-9._-]`` (others become ``_``):
    a job's and a run folder's name, safe in any shell or batch directive."""
    stem = plan_path.name.removesuffix(".json").removesuffix(".plan")
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".-") or "plan"


def _run_args(plan: Plan, plan_path: Path) -> list[str]:
    """``autotune run`` of the plan as each rank runs it: the launcher's processes find their
    rank in the environment, and the run keeps its log and checkpoints in a named directory."""
    return ["-m", "autotune", "run", str(plan_path), "--out", f"runs/{_name(plan_path)}"]


def torchrun_args(plan: Plan, plan_path: Path) -> list[str]:
    """torchrun's arguments for ``plan``: standalone on one node; on several, a c10d
    rendezvous at the plan's endpoint, which ranks the nodes as they arrive: the same command
    on every node."""
    launch = plan.launch
    if launch.nnodes == 1:
        where = ["--standalone"]
    else:
        where = [
            f"--nnodes={launch.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={launch.rdzv_endpoint}",
            f"--rdzv-id={launch.rdzv_id}",
        ]
    return ["torchrun", *where, f"--nproc-per-node={launch.nproc_per_node}", *_run_args(plan, plan_path)]


def torchrun(plan: Plan, plan_path: Path) -> str:
    """The command line, one per node (the same on each: the rendezvous ranks the nodes)."""
    return " ".join(map(shell_quote, torchrun_args(plan, plan_path))) + "\n"


_STATED_IN: dict[ExportTarget, str] = {"accelerate": "an Accelerate config", "deepspeed": "a DeepSpeed config"}
"""The configs that state a plan's strategies, as a refusal names them."""


def settings(plan: Plan, plan_path: Path, target: ExportTarget) -> dict[str, Any]:
    """What the plan's strategies set in ``target``'s config: each one's export, merged in
    apply.order(); UserError naming the first strategy that ``target`` cannot express."""
    configs, strategies = plan.strategy_configs(), catalog.catalog()
    merged: dict[str, Any] = {}
    for name in sorted(configs, key=order().index):
        how = strategies[name].exports.get(target)
        if how is None:
            raise UserError(
                f"plan {plan_path} uses {name}, which {_STATED_IN[target]} cannot express; export --to torchrun"
            )
        if how is not NOTHING_TO_SET:
            # A later strategy's key replaces an earlier one's: fp8's mixed precision replaces precision's.
            merged.update(how(configs[name], plan))
    return merged


def deepspeed(plan: Plan, plan_path: Path) -> str:
    """DeepSpeed's JSON config of a plan that runs DeepSpeed's engine (a strategy whose DeepSpeed
    export sets something: zero): the one ``autotune run`` hands to ``deepspeed.initialize``
    (DeepSpeed derives the global batch from it and its world size)."""
    engines = [name for name, s in catalog.catalog().items() if callable(s.exports.get("deepspeed"))]
    if not set(engines) & set(plan.strategy_configs()):
        raise UserError(
            f"plan {plan_path} has no {' or '.join(engines)} strategy: "
            "a DeepSpeed config would describe another run (export --to torchrun)"
        )
    return json.dumps(settings(plan, plan_path, "deepspeed"), indent=2) + "\n"


def accelerate(plan: Plan, plan_path: Path) -> str:
    """An Accelerate config YAML (``accelerate launch --config_file FILE -m autotune run PLAN``):
    processes and machines here, then what the strategies set (mixed precision, fp8 through
    torchao, compile as its dynamo settings, FSDP2 or DeepSpeed ZeRO as its plugins)."""
    stated = settings(plan, plan_path, "accelerate")
    launch = plan.launch
    processes = launch.nproc_per_node * launch.nnodes
    cpu = launch.device == "cpu"
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "num_processes": processes,
        "num_machines": launch.nnodes,
        "machine_rank": 0,
        "use_cpu": cpu,
        "mixed_precision": "no",
        "downcast_bf16": "no",
        "rdzv_backend": "static" if launch.nnodes == 1 else "c10d",
        "same_network": True,
        "main_training_function": "main",
        "enable_cpu_affinity": False,
    }
    if launch.nnodes > 1:
        host, port = host_port(launch.rdzv_endpoint)
        config.update(main_process_ip=host, main_process_port=port)
    config.update(stated)
    # Where no strategy states how the processes share the work (a plugin), Accelerate's own
    # data parallel: DDP over several processes.
    config.setdefault("distributed_type", ("MULTI_CPU" if cpu else "MULTI_GPU") if processes > 1 else "NO")
    import yaml

    header = (
        f"# autotune export --to accelerate {visible(plan_path)}\n"
        f"# accelerate launch --config_file THIS_FILE {' '.join(map(shell_quote, _run_args(plan, plan_path)))}\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)


def slurm(plan: Plan, plan_path: Path) -> str:
    """An sbatch script: one task a node, each running torchrun with the plan's processes, the
    rendezvous on the job's first node."""
    launch = plan.launch
    cpu = launch.device == "cpu"
    lines = [
        "#!/bin/bash",
        f"# autotune export --to slurm {visible(plan_path)}: "
        f"{launch.nnodes} node(s) x {launch.nproc_per_node} process(es)",
        f"#SBATCH --job-name=autotune-{_name(plan_path)}",
        f"#SBATCH --nodes={launch.nnodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={8 * launch.nproc_per_node}" if not cpu else "#SBATCH --exclusive",
    ]
    if not cpu:
        lines.append(f"#SBATCH --gpus-per-node={launch.nproc_per_node}")
    lines += [
        "#SBATCH --output=%x-%j.out",
        "set -euo pipefail",
        "# Never let NCCL use NVLink multicast on shared machines; remove where it is yours.",
        "export NCCL_NVLS_ENABLE=0",
    ]
    words = [shell_quote(arg) for arg in torchrun_args(plan, plan_path)]
    if launch.nnodes > 1:  # the rendezvous on the job's first node, at the plan's port
        lines += [
            'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            f'endpoint="$head:{host_port(launch.rdzv_endpoint)[1]}"',
        ]
        words[words.index(shell_quote(f"--rdzv-endpoint={launch.rdzv_endpoint}"))] = '--rdzv-endpoint="$endpoint"'
    lines.append(f"srun {' '.join(words)}")
    return "\n".join(lines) + "\n"


EXPORTERS: dict[str, Callable[[Plan, Path], str]] = {
    "torchrun": torchrun,
    "deepspeed": deepspeed,
    "accelerate": accelerate,
    "slurm": slurm,
}
"""The launchers a plan exports to, and how."""
