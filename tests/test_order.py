"""The order of application: each strategy's phase, then reads/changes within a phase, then
``TIES``. Today's order (``autotune.apply.ORDER`` as it stood at 26f7028, before phases) is kept
here as data: the phases must give exactly it, for the whole catalog and so for every subset."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from autotune.apply import order
from autotune.catalog import catalog
from autotune.contract.order import PHASES, TIES, OrderError, application_order
from autotune.contract.strategy import Facts, Strategy
from autotune.graph import CatalogError, StrategyGraph, validate_catalog
from autotune.workloads import GPT_STRUCTURE

BEFORE_PHASES = (  # tpu, first then, is a device since (autotune/devices/xla.py)
    "precision",
    "vocab_padding",
    "moe",
    "sparse_attention",
    "attention",
    "int8",
    "fp8",
    "triton_kernels",
    "tensor_parallel",
    "pipeline_parallel",
    "activation_checkpoint",
    "compile",
    "ddp",
    "fsdp2",
    "grad_accum",
    "optimizer",
    "dataloader",
    "cpu_threads",
    "zero",
)


def test_the_phases_give_the_order_before_phases():
    """For the strategies there were then: a strategy added since takes its place by its phase,
    and this list is not edited for it."""
    then = set(BEFORE_PHASES)
    assert tuple(n for n in order() if n in then) == BEFORE_PHASES
    assert tuple(n for n in application_order(catalog()) if n in then) == BEFORE_PHASES
    assert then <= set(order())


def test_every_pair_and_legal_set_keeps_its_order():
    graph = StrategyGraph(Facts(structure=GPT_STRUCTURE, processes=8), allow_approximate=True)
    for pair in itertools.permutations(BEFORE_PHASES, 2):
        assert graph.order(pair) == [n for n in BEFORE_PHASES if n in pair]
    for names in graph.legal_sets():
        assert [n for n in names if n in BEFORE_PHASES] == [n for n in BEFORE_PHASES if n in names]


def test_every_strategy_declares_a_phase_and_ties_name_their_own():
    strategies = catalog()
    for name, strategy in strategies.items():
        assert strategy.phase in PHASES, name
    for phase, names in TIES.items():
        assert phase in PHASES
        for name in names:
            assert strategies[name].phase == phase, f"TIES[{phase!r}] names {name}, of phase {strategies[name].phase}"


def _noop(ctx: Any, cfg: Any) -> None:
    pass


def made_up(name: str, phase: str, **parts: set[str]) -> Strategy:
    frozen = {k: frozenset(v) for k, v in parts.items()}
    return Strategy(name=name, summary=name, exact=True, config=object, apply=_noop, phase=phase, **frozen)  # type: ignore[arg-type]


def catalog_of(*strategies: Strategy) -> dict[str, Strategy]:
    return {s.name: s for s in strategies}


def test_phase_first_then_reads_then_name():
    strategies = catalog_of(
        made_up("z_loop", "loop"),
        made_up("b_reader", "swap", reads={"mlp"}),
        made_up("c_changer", "swap", changes={"mlp"}),
        made_up("a_plain", "swap"),
        made_up("device", "device"),
    )
    # a_plain and c_changer are ready first (by name), b_reader waits for c_changer.
    assert application_order(strategies) == ("device", "a_plain", "c_changer", "b_reader", "z_loop")


def test_reading_what_a_later_phase_changes_is_refused():
    strategies = catalog_of(made_up("early", "swap", reads={"blocks"}), made_up("late", "compile", changes={"blocks"}))
    with pytest.raises(OrderError, match="early .swap. reads blocks, which late changes in a later phase .compile."):
        application_order(strategies)
    with pytest.raises(CatalogError, match="later phase"):
        validate_catalog(strategies)


def test_a_circle_within_a_phase_is_refused():
    strategies = catalog_of(
        made_up("a", "swap", reads={"mlp"}, changes={"head"}), made_up("b", "swap", reads={"head"}, changes={"mlp"})
    )
    with pytest.raises(OrderError, match="a, b .swap. each read a part another of them changes"):
        application_order(strategies)


def test_an_unknown_phase_is_refused():
    with pytest.raises(OrderError, match="unknown phase 'later'"):
        application_order(catalog_of(made_up("a", "later")))


def test_accumulation_is_the_strategy_that_changes_the_loops_accumulation():
    """``ACCUMULATION`` (named here, the plan's arithmetic reads it) and the declarations agree:
    it is the one strategy that changes ``accumulation``, and its ``steps`` knob is the count."""
    import dataclasses

    from autotune import plan as planmod
    from autotune.contract.order import ACCUMULATION

    strategies = catalog()
    assert [name for name, s in strategies.items() if "accumulation" in s.changes] == [ACCUMULATION]
    assert "steps" in {f.name for f in dataclasses.fields(strategies[ACCUMULATION].config)}
    assert planmod.ACCUMULATION == ACCUMULATION
