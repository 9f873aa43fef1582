"""The strategy graph: which strategies can run here, which combinations are legal, in what
order they are applied, and why a strategy was left out.

A networkx ``MultiDiGraph`` over the catalog: one node per strategy (attributes ``exact``,
``implemented``, ``usable``, ``reason``), one edge ``u -> v`` keyed by its relation for each
declaration "u requires v", "u conflicts with v" (stored both ways: conflicts are
symmetric whichever side declares them), and "u is applied after v". The declarations are
checked when the graph is built (:func:`validate_catalog`); the machine and the workload
(:class:`autotune.contract.strategy.Facts`) then decide what is usable. The order of application is
``autotune.contract.order.application_order`` (each strategy's phase, then reads/changes), the
one the executor follows (``autotune.apply.order``); the ``after`` edges are derived from it
(:func:`after_edges`): u is applied after v when the order puts v first and u reads a part of
the model that v changes (``Strategy.reads`` / ``Strategy.changes``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import networkx as nx

from autotune.apply import order as catalog_order
from autotune.catalog import catalog
from autotune.contract.order import OrderError, application_order
from autotune.contract.strategy import PARTS, Facts, Strategy, unmet_needs
from autotune.errors import UserError

RELATIONS = ("requires", "conflicts", "after")
DECLARED = ("requires", "conflicts")
"""The relations each strategy declares by name; "after" is derived from the order of application."""
APPROXIMATE = "approximate: changes what is learned; pass --allow-approximate"


class CatalogError(RuntimeError):
    """The strategy declarations contradict each other or the order of application."""


def validate_catalog(strategies: Mapping[str, Strategy], order: Sequence[str] | None = None) -> nx.MultiDiGraph:
    """The relation graph of ``strategies``, checked against itself and against ``order``
    (default: their phases' order, ``autotune.contract.order.application_order``).

    Raises CatalogError for a relation naming an unknown strategy or the strategy itself, a
    part (``reads`` / ``changes``) that is not one of ``autotune.contract.strategy.PARTS``, a strategy
    without a place in ``order``, phases that contradict reads/changes, and a strategy whose
    requirements (followed transitively) include two that conflict, itself among them. The
    ``after`` edges come from ``order``.
    """
    graph = _relations(strategies)
    if order is None:
        order = phase_order(strategies)
    _check_order(graph, order)
    graph.add_edges_from((later, earlier, "after") for later, earlier in after_edges(strategies, order))
    _check_requirements(graph)
    return graph


def phase_order(strategies: Mapping[str, Strategy]) -> tuple[str, ...]:
    """``strategies`` in their phases' order of application; CatalogError where the phases
    contradict what they read and change."""
    try:
        return application_order(strategies)
    except OrderError as e:
        raise CatalogError(str(e)) from None


def after_edges(strategies: Mapping[str, Strategy], order: Sequence[str]) -> list[tuple[str, str]]:
    """(later, earlier) for each pair that ``order`` applies earlier-first and whose order
    matters: the later one reads a part that the earlier one changes. Sorted."""
    ordered = [name for name in order if name in strategies]
    return sorted(
        (later, earlier)
        for i, later in enumerate(ordered)
        for earlier in ordered[:i]
        if strategies[later].reads & strategies[earlier].changes
    )


def _relations(strategies: Mapping[str, Strategy]) -> nx.MultiDiGraph:
    graph = nx.MultiDiGraph()
    for name, strategy in strategies.items():
        graph.add_node(name, exact=strategy.exact, implemented=strategy.implemented)
        for what in ("reads", "changes"):
            for part in sorted(getattr(strategy, what) - PARTS):
                raise CatalogError(f"strategy {name}: {what} unknown part {part!r} (known: {', '.join(sorted(PARTS))})")
    for name, strategy in strategies.items():
        for relation in DECLARED:
            for other in sorted(getattr(strategy, relation)):
                if other == name:
                    raise CatalogError(f"strategy {name}: {relation} itself")
                if other not in strategies:
                    raise CatalogError(f"strategy {name}: {relation} unknown strategy {other!r}")
                graph.add_edge(name, other, key=relation)
                if relation == "conflicts":
                    graph.add_edge(other, name, key=relation)
    return graph


def _edges(graph: nx.MultiDiGraph, relation: str) -> nx.DiGraph:
    """The plain digraph of one relation's edges."""
    out = nx.DiGraph()
    out.add_nodes_from(graph)
    out.add_edges_from((u, v) for u, v, key in graph.edges(keys=True) if key == relation)
    return out


def _check_order(graph: nx.MultiDiGraph, order: Sequence[str]) -> None:
    missing = sorted(set(graph) - set(order))
    if missing:
        raise CatalogError(f"strategy {missing[0]} has no place in the order of application")


def _check_requirements(graph: nx.MultiDiGraph) -> None:
    requires, conflicts = _edges(graph, "requires"), _edges(graph, "conflicts")
    for name in sorted(graph):
        needed = {name} | nx.descendants(requires, name)
        for a, b in itertools.combinations(sorted(needed), 2):
            if conflicts.has_edge(a, b):
                chain = ", ".join(sorted(needed - {name}))
                raise CatalogError(
                    f"strategy {name} can never be used: it requires {chain}, and {a} conflicts with {b}"
                )


def _check_relations(chosen: Sequence[str], requires: nx.DiGraph, conflicts: nx.DiGraph) -> None:
    for a, b in itertools.combinations(chosen, 2):
        if conflicts.has_edge(a, b):
            raise UserError(f"{a} conflicts with {b}")
    for name in chosen:
        for required in sorted(requires.successors(name)):
            if required not in chosen:
                raise UserError(f"{name} requires {required}, which is not chosen")


@functools.cache
def _catalog_relations() -> tuple[nx.DiGraph, nx.DiGraph]:
    graph = validate_catalog(catalog(), catalog_order())
    return _edges(graph, "requires"), _edges(graph, "conflicts")


def check_combination(names: Iterable[str]) -> None:
    """Raise UserError if the catalog's strategies ``names`` cannot run together on any
    machine: an unknown or unimplemented one, a conflict, or a requirement left out. What
    the hardware needs is judged where the strategies are applied (a plan made for CUDA
    stays readable on a CPU machine)."""
    strategies = catalog()
    chosen = [name for name in catalog_order() if name in set(names)]
    for name in sorted(set(names) - set(strategies)):
        raise UserError(f"unknown strategy {name!r} (known: {', '.join(sorted(strategies))})")
    for name in chosen:
        if not strategies[name].implemented:
            raise UserError(f"strategy {name} is not implemented yet ({strategies[name].issue})")
    _check_relations(chosen, *_catalog_relations())


class StrategyGraph:
    """The catalog's strategies and their relations, judged against one machine and workload."""

    def __init__(
        self,
        facts: Facts,
        *,
        allow_approximate: bool = False,
        strategies: Mapping[str, Strategy] | None = None,
        order: Sequence[str] | None = None,
    ) -> None:
        """``strategies`` default to the catalog, ``order`` to their phases' (``autotune.apply.order``)."""
        strategies = catalog() if strategies is None else strategies
        order = phase_order(strategies) if order is None else order
        self.facts = facts
        self.allow_approximate = allow_approximate
        self.strategies = dict(strategies)
        self.application_order = tuple(name for name in order if name in self.strategies)
        self.graph = validate_catalog(self.strategies, order)
        self._requires = _edges(self.graph, "requires")
        self._conflicts = _edges(self.graph, "conflicts")
        self._excluded = self._exclusions()
        for name in self.graph:
            self.graph.nodes[name].update(usable=name not in self._excluded, reason=self._excluded.get(name, ""))

    # ------------------------------------------------------------------ what can run here

    def excluded(self) -> dict[str, str]:
        """Strategies that cannot be used here, in order of application, each with its reason."""
        return {name: self._excluded[name] for name in self.application_order if name in self._excluded}

    def usable(self) -> list[str]:
        """Strategies that can be used here, in order of application."""
        return [name for name in self.application_order if name not in self._excluded]

    def _exclusions(self) -> dict[str, str]:
        excluded = {name: "; ".join(why) for name, s in self.strategies.items() if (why := self._direct_reasons(s))}
        # A strategy requiring an excluded one is excluded too, transitively.
        changed = True
        while changed:
            changed = False
            for name, required in sorted(self._requires.edges):
                if name not in excluded and required in excluded:
                    excluded[name] = f"requires {required}, which is excluded: {excluded[required]}"
                    changed = True
        return excluded

    def _direct_reasons(self, strategy: Strategy) -> list[str]:
        why = [] if strategy.implemented else [f"not implemented yet: {strategy.issue}"]
        if not strategy.exact and not self.allow_approximate:
            why.append(APPROXIMATE)
        return why + unmet_needs(strategy, self.facts)

    def excluded_choices(self, name: str) -> dict[str, dict[Any, str]]:
        """Choices of ``name``'s categorical knobs that cannot run here: knob -> {value: reason}.

        A config whose settings need more than its strategy (fp16 needs CUDA) says so in a
        ``needs()`` method. Each choice is judged on the default config with that one knob
        set; reasons that every choice of the knob shares come from another setting and are
        left out.
        """
        self._known([name])
        strategy = self.strategies[name]
        if not hasattr(strategy.config, "needs"):
            return {}
        default = strategy.default()
        out: dict[str, dict[Any, str]] = {}
        for knob in strategy.knobs:
            reasons = {
                v: self._config_reasons(strategy, dataclasses.replace(default, **{knob.name: v})) for v in knob.choices
            }
            if not reasons:
                continue
            shared = set.intersection(*(set(r) for r in reasons.values()))
            bad = {v: "; ".join(r for r in why if r not in shared) for v, why in reasons.items() if set(why) - shared}
            if bad:
                out[knob.name] = bad
        return out

    def _config_reasons(self, strategy: Strategy, cfg: Any) -> list[str]:
        return unmet_needs(dataclasses.replace(strategy, needs=cfg.needs()), self.facts)

    # ------------------------------------------------------------------ combinations

    def check(self, names: Iterable[str]) -> None:
        """Raise UserError naming why ``names`` cannot be used together here: an unknown name,
        an excluded member (with its reason), a conflict, or a requirement left out."""
        chosen = self.order(names)
        for name in chosen:
            if name in self._excluded:
                raise UserError(f"strategy {name} cannot be used here: {self._excluded[name]}")
        _check_relations(chosen, self._requires, self._conflicts)

    def is_legal(self, names: Iterable[str]) -> bool:
        """Whether ``names`` pass :meth:`check`."""
        try:
            self.check(names)
        except UserError:
            return False
        return True

    def order(self, names: Iterable[str]) -> list[str]:
        """``names`` in the order of application (``autotune.apply.order``); unknown names are a UserError."""
        chosen = self._known(names)
        return [name for name in self.application_order if name in chosen]

    def legal_sets(self) -> Iterator[tuple[str, ...]]:
        """Every legal combination of usable strategies, the empty one first, each in order of application."""
        usable = self.usable()

        def extend(i: int, chosen: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
            if i == len(usable):
                if all(set(self._requires.successors(name)) <= set(chosen) for name in chosen):
                    yield chosen
                return
            yield from extend(i + 1, chosen)
            if not any(self._conflicts.has_edge(usable[i], other) for other in chosen):
                yield from extend(i + 1, (*chosen, usable[i]))

        return extend(0, ())

    def _known(self, names: Iterable[str]) -> set[str]:
        chosen = set(names)
        for name in sorted(chosen - set(self.strategies)):
            raise UserError(f"unknown strategy {name!r} (known: {', '.join(sorted(self.strategies))})")
        return chosen

    # ------------------------------------------------------------------ reading the relations

    def related(self, name: str, relation: str) -> list[str]:
        """Strategies ``name`` has ``relation`` ("requires", "conflicts", "after") with, in order of application."""
        targets = {v for _, v, key in self.graph.out_edges(name, keys=True) if key == relation}
        return [n for n in self.application_order if n in targets]

    def to_dot(self) -> str:
        """The graph in Graphviz DOT: usable strategies green, excluded ones orange, those not
        implemented red and dashed; requires blue, conflicts red (undirected), after grey."""
        lines = [
            "digraph strategies {",
            "  rankdir=LR;",
            '  node [shape=box, style="rounded,filled", fontname="Helvetica"];',
            '  edge [fontname="Helvetica", fontsize=9];',
        ]
        for name in self.application_order:
            attrs = self.graph.nodes[name]
            style = _NODE_STYLES[
                "usable" if attrs["usable"] else "excluded" if attrs["implemented"] else "unimplemented"
            ]
            label = name if attrs["exact"] else f"{name}\\n(approximate)"
            tooltip = attrs["reason"] or self.strategies[name].summary
            lines.append(f'  "{name}" [label="{label}", {style}, tooltip="{_escape(tooltip)}"];')
        for u, v, key in sorted(self.graph.edges(keys=True)):
            if key == "conflicts" and u > v:
                continue  # stored both ways, drawn once
            lines.append(f'  "{u}" -> "{v}" [label="{key}", {_EDGE_STYLES[key]}];')
        lines.append("}")
        return "\n".join(lines) + "\n"


_NODE_STYLES = {
    "usable": 'fillcolor="#c8e6c9", color="#2e7d32"',
    "excluded": 'fillcolor="#ffe0b2", color="#ef6c00"',
    "unimplemented": 'fillcolor="#ffcdd2", color="#c62828", style="rounded,filled,dashed"',
}
_EDGE_STYLES = {
    "requires": 'color="#1565c0"',
    "conflicts": 'color="#c62828", dir=none',
    "after": 'color="#9e9e9e", style=dashed',
}


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
