"""Layering: plan and schema (data) <- catalog and graph (declarations) <- executor. Loading
and validating a plan, and ``autotune show``, import neither torch (whose import loads
torch.distributed) nor the executor: each check runs in a fresh interpreter and reads its
``sys.modules``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLANS = sorted(
    str(p) for p in ROOT.glob("**/*.plan.json") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)
)
SHOWN = ROOT / "profiles" / "h200-phase8-small.plan.json"
EXECUTOR = (
    "torch",
    "torch.distributed",
    "autotune.runtime.trainer",
    "autotune.runtime.trial",
    "autotune.runtime.measure",
    "autotune.contract.context",
)

_BLOCK = """
import importlib, json, pkgutil, sys, time

class NoTorch:
    # Any import of torch from here on fails, naming itself.
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"blocked: {name}")
        return None
"""

# With torch blocked, imports the data and declaration layers, then each strategy module on
# its own: those that need torch at import fail, and are named.
_CULPRITS = (
    _BLOCK
    + """
sys.meta_path.insert(0, NoTorch())
for name in ("autotune.plan", "autotune.schema", "autotune.catalog", "autotune.graph", "autotune.apply",
             "autotune.contract.mesh", "autotune.workloads", "autotune.workloads.structure",
             "autotune.workloads.gpt_config", "autotune.cli.show"):
    importlib.import_module(name)
import autotune.strategies as package
culprits = []
for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
    if info.name.startswith("_"):
        continue
    try:
        importlib.import_module(f"{package.__name__}.{info.name}")
    except ModuleNotFoundError as e:
        if not str(e).startswith("blocked"):
            raise
        culprits.append(info.name)
print(json.dumps(culprits))
"""
)

# Loads and validates every committed plan, then runs `autotune show` on one, in-process.
# With "after-catalog", the catalog is read first (whatever its modules import) and torch is
# blocked after it: what the plans' checks and show import on their own.
_SHOW = (
    _BLOCK
    + """
if sys.argv[1] == "after-catalog":
    from autotune.catalog import catalog
    catalog()
    for name in [m for m in sys.modules if m == "torch" or m.startswith("torch.")]:
        del sys.modules[name]  # an import of torch from here on asks the finders again
    sys.meta_path.insert(0, NoTorch())
start = time.perf_counter()
import autotune.plan as planmod
for path in sys.argv[3:]:
    plan = planmod.load(path)
    plan.strategy_configs()
    plan.global_batch()
loaded = time.perf_counter()
from autotune.cli import main
code = main(["show", sys.argv[2]])
shown = time.perf_counter()
print(json.dumps({"code": code, "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "autotune")),
                  "load_s": loaded - start, "show_s": shown - loaded}))
"""
)


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _torch_free(culprits: list[str]) -> None:
    assert not culprits, f"strategy modules import torch at module level: {sorted(culprits)}"


def test_strategy_modules_import_without_torch():
    _torch_free(json.loads(_run(_CULPRITS)))


def _show(mode: str) -> dict:
    assert PLANS and str(SHOWN) in PLANS
    out = _run(_SHOW, mode, str(SHOWN), *PLANS)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["code"] == 0
    assert "phase8-small" in out and "vocab_padding" in out  # the plan was printed
    print(
        f"{mode}: {len(PLANS)} plans loaded and validated in {result['load_s']:.3f} s; show in {result['show_s']:.3f} s"
    )
    return result


def test_plans_validate_and_show_without_torch():
    result = _show("fresh")
    loaded = [m for m in EXECUTOR if m in result["modules"]]
    if loaded:
        _torch_free(json.loads(_run(_CULPRITS)))  # names the module, where one is the cause
    assert not loaded, f"validating plans and `autotune show` imported {loaded}"


def test_past_the_catalog_plans_and_show_import_no_torch():
    """Whatever the catalog's modules import, checking plans and showing one import nothing of
    torch themselves (a lazy import on that path would hit the block), nor the executor."""
    result = _show("after-catalog")
    assert not {"autotune.runtime.trainer", "autotune.runtime.trial", "autotune.runtime.measure"} & set(
        result["modules"]
    )


def test_the_exports_name_no_strategy_module():
    """``autotune export`` asks each strategy for its own part of a launcher's config
    (``Strategy.exports``): the core imports none of their modules."""
    import ast

    tree = ast.parse((ROOT / "autotune" / "export.py").read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith("autotune.strategies")], imported


def test_every_package_of_the_tree_is_in_the_wheel():
    """pyproject.toml names the packages one by one (strategies/ and kernels/ live outside
    autotune/): a package folder missing there is left out of a wheel while an editable install
    still finds it, so a new one must be listed."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "autotune").rglob("__init__.py")} | {
        f"autotune.{name}" for name in config["package-dir"].values()
    }
    assert folders == listed, (
        f"in the tree, not listed: {sorted(folders - listed)}; listed, not there: {sorted(listed - folders)}"
    )


# --------------------------------------------------------------------------- the house rules (issue 29)

MAX_LINES = 600
"""No source file longer than this: past it a module holds two things, and is split."""
DEFERRED_CIRCLES = {
    # Registries that find their members at run time: each member imports the registry's base
    # class, the registry imports its members inside the function that looks one up.
    frozenset({"autotune.workloads.adapter", "autotune.workloads.generic", "autotune.workloads.gpt"}),
    frozenset(
        {"autotune.workloads", "autotune.workloads.hf", "autotune.workloads.hf_adapter", "autotune.workloads.hf_config"}
    ),
    frozenset({"autotune.catalog", "autotune.contract.strategy"}),  # Facts.of reads the catalog's declared packages
}
"""Circles closed only by imports inside functions (deferred to a call), each with its reason:
the test fails on a new one and on one no longer there, so the list only shrinks. Circles of
imports at module level are refused outright; type-only imports (``if TYPE_CHECKING:``) are no
dependency and are not judged."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in ("strategies", "kernels"):  # installed as autotune.strategies, autotune.kernels
        parts = ["autotune", *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(*, deferred: bool) -> dict[str, set[str]]:
    """Our modules and those of ours each imports at run time: at module level only, or also
    inside functions (``deferred``); never under ``if TYPE_CHECKING:``."""
    import ast

    files = [p for top in ("autotune", "strategies", "kernels") for p in sorted((ROOT / top).rglob("*.py"))]
    modules = {_module_name(p): p for p in files}

    def ours(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges: set[str] = set()

        def visit(node: ast.AST, in_function: bool) -> None:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for child in node.orelse:
                    visit(child, in_function)
                return
            in_function = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if in_function and not deferred:
                return
            if isinstance(node, ast.Import):
                edges.update(filter(None, (ours(a.name) for a in node.names)))
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                edges.update(filter(None, (ours(f"{node.module}.{a.name}") for a in node.names)))
            for child in ast.iter_child_nodes(node):
                visit(child, in_function)

        visit(ast.parse(path.read_text()), False)
        graph[module] = edges - {module}
    return graph


def circles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module."""
    import networkx as nx

    g = nx.DiGraph([(a, b) for a, targets in graph.items() for b in targets])
    return {frozenset(c) for c in nx.strongly_connected_components(g) if len(c) > 1}


def test_no_import_circle_at_module_level() -> None:
    assert not circles(import_graph(deferred=False))


def test_import_circles_through_functions_are_the_known_ones() -> None:
    found = circles(import_graph(deferred=True))
    assert not found - DEFERRED_CIRCLES, f"new import circles: {[sorted(c) for c in found - DEFERRED_CIRCLES]}"
    assert not DEFERRED_CIRCLES - found, f"gone, strike them: {[sorted(c) for c in DEFERRED_CIRCLES - found]}"


def test_no_source_file_over_600_lines() -> None:
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    long = {
        name: n
        for name in tracked.stdout.split()
        if (ROOT / name).exists() and (n := len((ROOT / name).read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines (split them): {long}"
