"""`autotune strategies`: every strategy of the catalog, whether it can be used here (this
machine or a saved profile, with a workload) and why not, its knobs, and their relations."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from autotune.cli.app import app
from autotune.errors import UserError
from autotune.terminal import visible

if TYPE_CHECKING:
    from autotune.contract.strategy import Facts, Knob
    from autotune.graph import StrategyGraph

RENDERED = ("svg", "png", "pdf")
"""--graph suffixes that Graphviz's dot renders; anything else gets DOT text."""


@app.command("strategies")
def strategies_command(
    profile: Annotated[
        Path | None, typer.Option("--profile", help="A saved hardware profile. Default: detect this machine (quick).")
    ] = None,
    workload: Annotated[
        str, typer.Option("--workload", help="Preset name, hf:<model_type> or package.module:factory.")
    ] = "tiny",
    workload_config: Annotated[
        Path | None,
        typer.Option(
            "--workload-config", help="Hugging Face model config: a config.json or a local folder holding one."
        ),
    ] = None,
    processes: Annotated[
        int | None,
        typer.Option("--processes", help="Count runs of this many processes (default: one per GPU, else one)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print every strategy as JSON instead of a table.")] = False,
    explain: Annotated[bool, typer.Option("--explain", help="Say why each strategy or setting is left out.")] = False,
    graph_file: Annotated[
        Path | None, typer.Option("--graph", help="Write the graph as DOT; .svg, .png or .pdf are drawn with Graphviz.")
    ] = None,
    allow_approximate: Annotated[
        bool,
        typer.Option("--allow-approximate", help="Count strategies that change what is learned (INT8, FP8, MoE, ...)."),
    ] = False,
) -> None:
    """List the strategies: usable here, excluded (and why), or not implemented yet; exact or approximate;
    their knobs."""
    from autotune import hardware
    from autotune.contract.strategy import Facts, SearchFacts
    from autotune.graph import StrategyGraph
    from autotune.limits import usable_cores
    from autotune.planning.space import search_left_out
    from autotune.workloads import load_workload

    if processes is not None and processes < 1:
        raise UserError(f"--processes {processes}: expected a positive number of processes")
    overrides: dict[str, Any] = {}
    if workload_config is not None:
        from autotune.workloads.hf_config import from_command_line

        workload, overrides = from_command_line(workload, workload_config)
    wl = load_workload(workload, overrides)
    prof = hardware.HardwareProfile.load(profile) if profile is not None else hardware.detect(quick=True)
    graph = StrategyGraph(Facts.of(prof, wl, processes=processes), allow_approximate=allow_approximate)
    # What `autotune plan` leaves out of its search here, from the function it uses.
    left_out = search_left_out(
        SearchFacts(
            cores=usable_cores(),
            seq_len=wl.seq_len,
            device=graph.facts.device,
            vocab_size=wl.vocab_size,
        )
    )
    if graph_file is not None:
        _write_graph(graph, graph_file)
    if as_json:
        print(json.dumps([_strategy_json(graph, name, left_out) for name in graph.application_order], indent=2))
        return
    _print_table(graph, wl.name, left_out)
    if explain:
        print("\n".join(map(visible, explanations(graph, left_out))))
        if wl.shape is None and wl.no_shape:
            print(visible(f"cost model: no memory or time predictions for workload {wl.name}: {wl.no_shape}"))


def explanations(graph: StrategyGraph, left_out: dict[str, str]) -> list[str]:
    """One line per strategy left out (of the graph, or of a search here: ``left_out``) and per
    knob setting of a usable strategy left out, with the reason."""
    lines = [f"{name}: {reason}" for name, reason in graph.excluded().items()]
    lines += [f"{name} (usable): {reason}" for name, reason in left_out.items() if name in graph.usable()]
    for name in graph.usable():
        for knob, choices in graph.excluded_choices(name).items():
            lines += [f"{name} {knob}={_value(value)}: {reason}" for value, reason in choices.items()]
    return lines


def _status(graph: StrategyGraph, name: str, left_out: dict[str, str]) -> str:
    node = graph.graph.nodes[name]
    if node["usable"]:
        return "not searched" if name in left_out else "usable"
    return "excluded" if node["implemented"] else "not implemented"


def _print_table(graph: StrategyGraph, workload: str, left_out: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    colours = {"usable": "green", "not searched": "yellow", "excluded": "yellow", "not implemented": "red"}
    table = Table("strategy", "status", "maths", "knobs", title="Strategies, in order of application")
    for name in graph.application_order:
        strategy, status = graph.strategies[name], _status(graph, name, left_out)
        table.add_row(
            name,
            f"[{colours[status]}]{status}[/]",
            "exact" if strategy.exact else "approximate",
            "\n".join(_knob_range(k) for k in strategy.knobs) or "-",
        )
    Console().print(table)
    usable, legal = graph.usable(), sum(1 for _ in graph.legal_sets())
    searched = [name for name in usable if name not in left_out]
    print(
        f"{len(usable)} of {len(graph.strategies)} strategies usable here "
        f"({visible(_machine(graph.facts))}; workload {visible(workload)}), "
        f"{legal} legal combinations of them"
        + (f"; `autotune plan` searches {len(searched)} of them." if len(searched) < len(usable) else ".")
        + ("" if len(searched) == len(graph.strategies) else " --explain says why the others are left out.")
    )


def _machine(facts: Facts) -> str:
    parts = [f"{facts.accelerators} x {facts.gpu_name}" if facts.accelerators else "no GPU"]
    if facts.tpu_devices and facts.gpu_name is None:  # XLA's devices beside the accelerator trained on
        parts.append(f"{facts.tpu_devices} XLA devices")
    parts.append(f"{facts.processes} process{'es' if facts.processes != 1 else ''}")
    return ", ".join(parts)


def _knob_range(knob: Knob) -> str:
    if knob.choices:
        return f"{knob.name}: {' | '.join(_value(c) for c in knob.choices)}"
    flags = [word for word, on in (("integer", knob.integer), ("log", knob.log)) if on]
    return f"{knob.name}: {knob.low:g} to {knob.high:g}" + (f" ({', '.join(flags)})" if flags else "")


def _value(value: Any) -> str:
    """A knob value as written in a plan's JSON (true, not True)."""
    return value if isinstance(value, str) else json.dumps(value)


def _strategy_json(graph: StrategyGraph, name: str, left_out: dict[str, str]) -> dict[str, Any]:
    strategy, node = graph.strategies[name], graph.graph.nodes[name]
    excluded_choices = graph.excluded_choices(name)
    return {
        "name": name,
        "summary": strategy.summary,
        "exact": strategy.exact,
        "implemented": strategy.implemented,
        "usable": node["usable"],
        "reason": node["reason"] or None,
        "searched": node["usable"] and name not in left_out,
        "search_left_out": left_out.get(name) if node["usable"] else None,
        "issue": strategy.issue or None,
        "needs": {f.name: _plain(getattr(strategy.needs, f.name)) for f in dataclasses.fields(strategy.needs)},
        **{relation: graph.related(name, relation) for relation in ("requires", "conflicts", "after")},
        "knobs": [_knob_json(knob, excluded_choices.get(knob.name, {})) for knob in strategy.knobs],
    }


def _knob_json(knob: Knob, excluded: dict[Any, str]) -> dict[str, Any]:
    if not knob.choices:
        return {"name": knob.name, "low": knob.low, "high": knob.high, "log": knob.log, "integer": knob.integer}
    return {
        "name": knob.name,
        "choices": list(knob.choices),
        "excluded": [{"value": value, "reason": reason} for value, reason in excluded.items()],
    }


def _plain(value: Any) -> Any:
    """A Needs field as JSON: sets sorted, tuples as lists."""
    if isinstance(value, frozenset):
        return sorted(value)
    return list(value) if isinstance(value, tuple) else value


def _write_graph(graph: StrategyGraph, path: Path) -> None:
    dot, fmt = graph.to_dot(), path.suffix.lstrip(".").lower()
    if fmt not in RENDERED:
        _write_text(path, dot)
        _log(f"wrote {path}")
        return
    exe = shutil.which("dot")
    if exe is None:
        beside = path.with_suffix(".dot")
        _write_text(beside, dot)
        _log(f"Graphviz is missing (no dot program), so no {fmt.upper()}: wrote DOT to {beside}")
        return
    try:
        subprocess.run([exe, f"-T{fmt}", "-o", str(path)], input=dot, text=True, check=True, capture_output=True)
    except subprocess.CalledProcessError as e:
        raise UserError(f"--graph {path}: dot failed: {e.stderr.strip() or e.returncode}") from None
    _log(f"wrote {path}")


def _write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as e:
        raise UserError(f"--graph {path}: cannot write ({e.strerror or e})") from None


def _log(message: str) -> None:
    print(f"autotune: {message}", file=sys.stderr, flush=True)
