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
(``autotune.plan.Plan`` in the exporters' signatures). What strategies once imported beyond
this (issue 29) is the contract's now: process-group gradients and AdamW's groups
(``contract.grads``), the cost model's terms (``contract.cost``), the usable cores
(``devices.usable_cores``), the other chosen strategies' declarations (``contract.strategy.Chosen``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ROOT / "strategies"

ALLOWED_PACKAGES = ("autotune.contract", "autotune.strategies", "autotune.kernels")
ALLOWED_MODULES = ("autotune.errors", "autotune.devices", "autotune.workloads.adapter", "autotune.workloads.structure")


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
    assert not found, f"strategies/ imports beyond the contract: {sorted(found)}"


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


# --------------------------------------------------------------------------- no strategy named by the core

OTHER_MEANINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fp8": (
        "the number format, not the strategy: a device feature (fp8 units), a matmul dtype whose rate "
        "a profile measures and saves, its datasheet's key",
        ("autotune/devices/", "autotune/hardware/", "autotune/cli/profile.py"),
    ),
    "int8": (
        "the number format, not the strategy: a datasheet's key for a device's int8 matmul rate",
        ("autotune/devices/",),
    ),
    "attention": (
        "a part of the model, not the strategy: a member of Part (what strategies change and read), "
        "the adapters' module roles and the structure a workload declares",
        ("autotune/contract/strategy.py", "autotune/workloads/"),
    ),
    "optimizer": (
        "the optimizer's state, not the strategy: a checkpoint's key (a saved format) and a part of the "
        "cost model's memory and time breakdown",
        ("autotune/contract/engine.py", "autotune/costmodel.py", "autotune/validate.py"),
    ),
    "grad_accum": (
        "the accumulation count's field in the rows of `autotune trials --json` (an output format), "
        "whichever strategy set it",
        ("autotune/report.py", "autotune/cli/trials.py"),
    ),
}
"""Words that name a strategy and, in these files, something else: word -> (what it means
there, the files or folders where it does)."""
NAMED_YET: set[tuple[str, str]] = set()
"""Strategy names the core still spells, by file: the test fails on a new one, and on an entry no
longer true, so that the merge that removes one strikes it here."""
NAMES_ALLOWED_IN = ("autotune/contract/order.py",)
"""The one module of the core that names strategies: the ties of the order, ACCUMULATION."""


def strategy_names_in(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of each strategy of ``names`` that ``source``'s code names: a string constant
    equal to a name (a key, a comparison, an argument, a literal part of an f-string), or an
    import of a strategy's module (``autotune.strategies.NAME``). Not docstrings (a string standing
    alone as a statement), comments, or prose that mentions a name inside a longer message."""
    tree = ast.parse(source)
    docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
            if id(node) not in docs:
                found.append((node.lineno, node.value))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.module == "autotune.strategies":
                modules = [f"autotune.strategies.{a.name}" for a in node.names]
            for module in modules:
                parts = module.split(".")
                if parts[:2] == ["autotune", "strategies"] and len(parts) > 2 and parts[2] in names:
                    found.append((node.lineno, parts[2]))
    return sorted(found)


def _meaning(rel: str, name: str) -> str | None:
    reason, where = OTHER_MEANINGS.get(name, ("", ()))
    return reason if any(rel == w or (w.endswith("/") and rel.startswith(w)) for w in where) else None


def test_the_name_scan_sees_code_and_not_prose() -> None:
    source = (
        '"""Docstring: compile is fine here."""\n'
        "import autotune.strategies.compile  # a comment: compile\n"
        "from autotune.strategies import ddp, _zero_impl\n"
        "from autotune.strategies.optimizer import adamw_groups\n"
        'x = {"compile": 1}\n'
        "def f(s):\n"
        '    """It says compile."""\n'
        '    return s.name == "grad_accum" or f"{s}" == "compiled" or "ddp: no" == s\n'
        'y = f"{x}compile"\n'
        'z = f"compile{x}"\n'
    )
    names = {"compile", "ddp", "optimizer", "grad_accum"}
    assert strategy_names_in(source, names) == [
        (2, "compile"),
        (3, "ddp"),
        (4, "optimizer"),
        (5, "compile"),
        (8, "grad_accum"),
        (9, "compile"),
        (10, "compile"),
    ]


def test_the_core_names_no_strategy() -> None:
    """No module of ``autotune/`` but ``contract/order.py`` names a strategy: the core reads what
    strategies declare (through the contract), never which one is which. A strategy added or
    removed changes nothing in the core; a rule about one strategy lives in its module."""
    from autotune.catalog import catalog

    names = set(catalog()) | {p.stem for p in STRATEGIES.glob("*.py") if not p.stem.startswith("_")}
    found, other = set(), set()
    for path in sorted((ROOT / "autotune").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in NAMES_ALLOWED_IN:
            continue
        for line, name in strategy_names_in(path.read_text(), names):
            if _meaning(rel, name) is not None:
                other.add((rel, name))
            else:
                found.add((rel, name, line))
    named = {(rel, name) for rel, name, _ in found}
    new = sorted(f"{rel}:{line}: {name!r}" for rel, name, line in found if (rel, name) not in NAMED_YET)
    assert not new, "strategy names in the core (read a declaration through the contract instead):\n" + "\n".join(new)
    assert not NAMED_YET - named, f"no longer named, strike from NAMED_YET: {sorted(NAMED_YET - named)}"
    unused = {
        (w, name)
        for name, (_, where) in OTHER_MEANINGS.items()
        for w in where
        if not any(n == name and (r == w or (w.endswith("/") and r.startswith(w))) for r, n in other)
    }
    assert not unused, f"no longer meant otherwise there, strike from OTHER_MEANINGS: {sorted(unused)}"
