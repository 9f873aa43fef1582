"""A strategy imports from the core only its contract (``autotune.contract``) and the few layers
it is written against; everything else it needs reaches it through ``TrainContext``.

Allowed at run time, in every module of ``strategies/`` (the ``autotune.strategies`` package):

- ``autotune.contract.*``: the declaration, the context, the step engine, the mesh, the order;
- ``autotune.strategies.*``: its own package (``_impl`` modules, helpers two strategies share);
- ``autotune.errors``: UserError, the one way a strategy refuses a setting;
- ``autotune.devices``: the device layer (features, autocast, the kind in use), so that no
  strategy names a device itself;
- ``autotune.kernels.*``: our kernels, which a strategy switches on;
- ``autotune.workloads.adapter`` and ``autotune.workloads.structure``: the adapter protocol,
  the only way a strategy touches the model (STYLE.md 9).

Type-only imports (under ``if TYPE_CHECKING:``) create no dependency and are not judged
(``autotune.plan.Plan`` in the exporters' signatures). What strategies import beyond this today
is listed in ``NOT_YET`` by module and file: the test fails on a new one, and on an entry no
longer true, so the list only shrinks."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ROOT / "strategies"

ALLOWED_PACKAGES = ("autotune.contract", "autotune.strategies", "autotune.kernels")
ALLOWED_MODULES = ("autotune.errors", "autotune.devices", "autotune.workloads.adapter", "autotune.workloads.structure")

NOT_YET = {
    # process-group helpers (by_mesh, the rank's group) for the optimizer, MoE and pipeline
    ("autotune.distributed", "_moe_impl.py"),
    ("autotune.distributed", "_pipeline_impl.py"),
    ("autotune.distributed", "optimizer.py"),
    # cost terms built from the core's counts (issue 29: CostTerms to move into the contract)
    ("autotune.costmodel", "activation_checkpoint.py"),
    ("autotune.costmodel", "attention.py"),
    # the usable cores of this machine, for the thread count's search range
    ("autotune.limits", "cpu_threads.py"),
    # compile's check_with reads the other chosen strategies' takes_model from the catalog
    ("autotune.catalog", "compile.py"),
}


def _runtime_imports(tree: ast.AST) -> list[str]:
    """Modules ``tree`` imports outside ``if TYPE_CHECKING:`` blocks (``from autotune import x``
    counts as ``autotune.x``)."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "autotune":
                found.extend(f"autotune.{alias.name}" for alias in node.names)
            else:
                found.append(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _allowed(module: str) -> bool:
    return module in ALLOWED_MODULES or any(module == p or module.startswith(p + ".") for p in ALLOWED_PACKAGES)


def _imports_from_the_core() -> set[tuple[str, str]]:
    out = set()
    for path in sorted(STRATEGIES.glob("*.py")):
        for module in _runtime_imports(ast.parse(path.read_text())):
            if module.split(".")[0] == "autotune" and not _allowed(module):
                out.add((module, path.name))
    return out


def test_strategies_import_only_the_contract_from_the_core():
    found = _imports_from_the_core()
    assert not found - NOT_YET, f"strategies/ imports beyond the contract: {sorted(found - NOT_YET)}"
    assert not NOT_YET - found, f"no longer imported, strike from NOT_YET: {sorted(NOT_YET - found)}"


def test_type_only_imports_are_not_judged():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from autotune.plan import Plan\n"
        "def f():\n    from autotune import catalog\n"
    )
    assert _runtime_imports(tree) == ["typing", "autotune.catalog"]


def test_the_contract_imports_no_strategy_at_import_time():
    """The contract's modules name no strategy module at their top level (the catalog loads the
    strategies, which import the contract: the other way round would be a circle)."""
    for path in sorted((ROOT / "autotune" / "contract").glob("*.py")):
        top = [n for n in ast.parse(path.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
        modules = _runtime_imports(ast.Module(body=top, type_ignores=[]))
        assert not [m for m in modules if m.startswith(("autotune.strategies", "autotune.catalog"))], (path, modules)
