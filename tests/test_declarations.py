"""Strategies declare their own effects: the order's "after" edges come from the order and the
parts each strategy reads and changes, the mesh's dims from each strategy's ``mesh_dim``, so a
new strategy is its module and its test, with no edit to the core's lists of names."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Any

import pytest

from autotune import apply
from autotune.apply import order
from autotune.catalog import catalog
from autotune.contract.mesh import ParallelDims, data_parallel, mesh_shape, setting
from autotune.contract.strategy import PARTS, Facts, Knob, Needs, Strategy, declared_modules
from autotune.errors import UserError
from autotune.graph import StrategyGraph, after_edges
from autotune.workloads import GPT_STRUCTURE, load_workload

ORDER = order()
"""The catalog's order of application (by phase, then reads/changes)."""

CPU = Facts(structure=GPT_STRUCTURE)

BEFORE = {
    # The after edges as the strategies named them before they declared parts (ddp's
    # WRAP_AFTER, zero's arithmetic on it, the sets of fp8/int8/tp/pp/triton_kernels), less
    # tensor_parallel after triton_kernels: the fused loss replaces no norm (issue 28).
    "fp8": {"vocab_padding", "moe"},
    "int8": {"vocab_padding", "moe"},
    "triton_kernels": {"vocab_padding"},
    "pipeline_parallel": {"vocab_padding"},
    "tensor_parallel": {"vocab_padding", "moe", "int8", "fp8"},
    "ddp": {"vocab_padding", "moe", "int8", "fp8", "triton_kernels", "tensor_parallel", "pipeline_parallel",
            "activation_checkpoint", "compile"},
    "fsdp2": {"vocab_padding", "moe", "int8", "fp8", "triton_kernels", "tensor_parallel", "pipeline_parallel",
              "activation_checkpoint", "compile"},
    "zero": {"vocab_padding", "moe", "int8", "fp8", "triton_kernels", "activation_checkpoint", "compile", "grad_accum"},
}  # fmt: skip


def _noop(ctx: Any, cfg: Any) -> None:
    """Stands in for an apply function."""


@dataclass(kw_only=True, slots=True)
class NoKnobs:
    """A config without settings."""


@dataclass(kw_only=True, slots=True)
class SplitConfig:
    """A made-up expert-parallel split."""

    degree: int = 2
    """Processes the experts are spread over."""


def made_up(name: str, **fields: Any) -> Strategy:
    fields.setdefault("config", NoKnobs)
    fields.setdefault("phase", "loop")
    return Strategy(name=name, summary=name, exact=True, apply=_noop, **fields)


# ---------------------------------------------------------------------- order


def test_the_graphs_after_edges_are_what_order_implies() -> None:
    graph = StrategyGraph(CPU)
    edges = sorted((u, v) for u, v, key in graph.graph.edges(keys=True) if key == "after")
    strategies = catalog()
    implied = sorted(
        (later, earlier)
        for later in strategies
        for earlier in strategies
        if ORDER.index(earlier) < ORDER.index(later) and strategies[later].reads & strategies[earlier].changes
    )
    assert edges == implied == after_edges(strategies, ORDER)


def test_the_derived_edges_are_the_ones_the_strategies_used_to_name() -> None:
    graph = StrategyGraph(CPU)
    derived = {name: set(graph.related(name, "after")) for name in graph.strategies if graph.related(name, "after")}
    assert derived == BEFORE


def test_every_declared_part_is_known() -> None:
    for strategy in catalog().values():
        assert strategy.reads <= PARTS and strategy.changes <= PARTS, strategy.name


@pytest.mark.parametrize(("order", "edges"), [("ab", [("b", "a")]), ("ba", [])])
def test_which_comes_first_is_orders_alone(order: str, edges: list[tuple[str, str]]) -> None:
    # a swaps the MLPs, b needs them final: b is after a when the order applies a first; applied
    # the other way round, b does not read what a changes, so their order does not matter.
    strategies = {"a": made_up("a", changes=frozenset({"mlp"})), "b": made_up("b", reads=frozenset({"mlp"}))}
    assert after_edges(strategies, tuple(order)) == edges
    graph = StrategyGraph(CPU, strategies=strategies, order=tuple(order))
    assert graph.related("b", "after") == [e[1] for e in edges]


# ---------------------------------------------------------------------- mesh


def test_mesh_roles_come_from_the_declarations() -> None:
    dims = {name: s.mesh_dim for name, s in catalog().items() if s.mesh_dim}
    assert dims == {"ddp": "dp", "fsdp2": "dp", "zero": "dp", "tensor_parallel": "tp", "pipeline_parallel": "pp"}
    assert data_parallel() == ("ddp", "fsdp2", "zero")
    assert apply.distributing() == ("tensor_parallel", "pipeline_parallel", "ddp", "fsdp2", "zero")


def test_a_made_up_strategy_with_a_mesh_dim_needs_no_core_edit() -> None:
    # A made-up tp splitter ("expert parallel" standing in) and dp wrapper, registered beside
    # the real catalog: mesh_shape sizes and checks the mesh from their declarations.
    def check(cfg: Any, dims: ParallelDims, micro_batch_size: int | None) -> None:
        if micro_batch_size is not None and micro_batch_size % setting(cfg, "degree", 2):
            raise UserError("split degree does not divide the micro-batch")

    split = made_up("split", config=SplitConfig, mesh_dim="tp", check_mesh=check)
    replicas = made_up("replicas", mesh_dim="dp", conflicts=frozenset({"split"}))
    strategies = {**catalog(), "split": split, "replicas": replicas}
    assert mesh_shape(8, {"split": {"degree": 4}, "fsdp2": {}}, strategies=strategies) == (2, 4, 1)
    assert mesh_shape(2, {"split": SplitConfig(degree=2)}, strategies=strategies, micro_batch_size=4) == (1, 2, 1)
    assert mesh_shape(4, {"replicas": {}}, strategies=strategies) == (4, 1, 1)
    assert "replicas" in data_parallel(strategies)
    with pytest.raises(UserError, match="split degree does not divide the micro-batch"):
        mesh_shape(2, {"split": {}}, strategies=strategies, micro_batch_size=3)
    with pytest.raises(UserError, match="split and tensor_parallel both split the tp dimension"):
        mesh_shape(4, {"split": {}, "tensor_parallel": {}}, strategies=strategies)
    # The advice names the dp strategies that fit: not the one that conflicts with the split.
    with pytest.raises(
        UserError, match=r"leaves 2 data-parallel groups of 4 processes: add ddp or fsdp2 or zero, or make"
    ):
        mesh_shape(4, {"split": {}}, strategies=strategies)
    with pytest.raises(UserError, match="split degree 2 does not divide the 3 heads"):
        mesh_shape(
            2,
            {"split": {}},
            strategies=strategies,
            workload=dataclasses.replace(load_workload("tiny").shape, n_heads=3),
        )


def test_a_strategy_with_a_degree_knob_its_config_lacks_is_refused() -> None:
    from autotune.contract.strategy import check_knob_fields

    with pytest.raises(UserError, match="degree knob 'degree' is not a field of NoKnobs"):
        check_knob_fields(made_up("split", mesh_dim="pp"))
    check_knob_fields(made_up("wrap", mesh_dim="dp"))  # dp takes the processes left over


# ---------------------------------------------------------------------- search


def test_refine_only_choices_are_declared_on_the_knob_and_must_be_choices() -> None:
    from autotune.contract.strategy import check_knob_fields

    declared = {(s.name, k.name): k.refine_only for s in catalog().values() for k in s.knobs if k.refine_only}
    assert declared == {("compile", "mode"): ("max-autotune-no-cudagraphs",)}

    @dataclass(kw_only=True, slots=True)
    class Modes:
        """A config with one categorical knob."""

        mode: str = "fast"
        """The mode."""

    with pytest.raises(UserError, match="refine-only 'slow' is not a choice of knob mode"):
        check_knob_fields(
            made_up("m", config=Modes, knobs=(Knob(name="mode", choices=("fast",), refine_only=("slow",)),))
        )


def test_what_a_search_leaves_out_is_declared_by_each_strategy() -> None:
    from autotune.planning.space import left_out_of

    assert left_out_of("cpu") == {
        "fp8": "left out of CPU searches: emulated on a CPU (no float8 units), never a speed-up",
        "int8": "left out of CPU searches: torchao's int8 training is made for GPU int8 tensor cores",
    }
    assert left_out_of("cuda") == {"cpu_threads": "searched on CPU runs only"}


def test_precision_leaves_a_cpu_search_without_bf16_units(tmp_path) -> None:
    # Its own rule (search_knobs), read from the CPU's flags: bf16 autocast is emulated without them.
    from autotune.contract.strategy import SearchFacts
    from autotune.planning.space import search_left_out
    from autotune.strategies import precision

    plain, bf16 = tmp_path / "plain", tmp_path / "bf16"
    plain.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
    bf16.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert precision.search_knobs("cpu", str(plain)) == (
        f"this CPU has no AMX or AVX512-BF16 ({plain}): bf16 autocast would be emulated, slower than fp32"
    )
    assert [k.choices for k in precision.search_knobs("cpu", str(bf16))] == [("fp32", "bf16"), (False,)]
    assert precision.search_knobs("cuda", str(plain)) == catalog()["precision"].knobs
    here = search_left_out(SearchFacts(cores=2, seq_len=128, device="cpu"))
    assert ("precision" in here) != precision.cpu_has_bf16()


def _priors(
    device: str, processes: int = 1, excluded: dict[str, dict[Any, str]] | None = None, **shape: int
) -> dict[str, Any]:
    from autotune.contract.strategy import PriorFacts

    facts = PriorFacts(device=device, cores=8, processes=processes, excluded=excluded or {}, **shape)  # type: ignore[arg-type]
    found = {name: s.prior(facts) for name, s in catalog().items() if s.prior is not None}
    return {name: (p.knobs, p.own_trial) for name, p in found.items() if p is not None}


def test_the_expert_priors_are_declared_by_each_strategy() -> None:
    assert _priors("cpu") == {
        "precision": ({"dtype": "bf16", "tf32": False}, True),
        "compile": ({"mode": "default", "scope": "model"}, False),
        "cpu_threads": ({"threads": 8}, False),
        "ddp": ({}, False),
    }
    assert _priors("cpu", processes=4)["cpu_threads"] == ({"threads": 2}, False)
    assert _priors("cuda") == {
        "precision": ({"dtype": "bf16", "tf32": True}, False),
        "attention": ({"backend": "cudnn"}, False),
        "compile": ({"mode": "default", "scope": "model"}, False),
        "vocab_padding": ({"multiple": 64}, False),
        "optimizer": ({"implementation": "fused"}, False),
        "triton_kernels": ({"loss": "autotune"}, False),
        "ddp": ({}, False),
    }
    # Our fused loss races compile's (a trial of the first prior plus it), where triton imports.
    from autotune.contract.strategy import PriorFacts

    assert catalog()["triton_kernels"].prior(PriorFacts(device="cuda", cores=8, processes=1)).race
    assert "triton_kernels" not in _priors("cuda", excluded={"loss": {"autotune": "needs the triton package"}})
    # FA4 races cuDNN's attention (a trial of the first prior with it instead), where it can run.
    attention = catalog()["attention"].prior
    assert attention(PriorFacts(device="cuda", cores=8, processes=1)).races == ({"backend": "fa4"},)
    fa4_out = {"backend": {"fa4": "needs the flash_attn.cute package, which does not import here"}}
    assert attention(PriorFacts(device="cuda", cores=8, processes=1, excluded=fa4_out)).races == ()
    # Flash where the graph excludes cuDNN's attention here.
    assert _priors("cuda", excluded={"backend": {"cudnn": "needs sm80"}})["attention"] == ({"backend": "flash"}, False)
    # The approximate priors, where they were measured to pay on one H200: fp8 from d_model 2048,
    # sparse attention from seq 4096; none on a CPU, none below those shapes.
    assert _priors("cuda", d_model=2048)["fp8"] == ({"recipe": "tensorwise", "layers": "blocks"}, False)
    assert _priors("cuda", seq_len=8192)["sparse_attention"] == ({"window": 1024, "global_tokens": 64}, False)
    assert not {"fp8", "sparse_attention"} & set(_priors("cuda", d_model=512, seq_len=1024))
    assert not {"fp8", "sparse_attention"} & set(_priors("cpu", d_model=2048, seq_len=8192))
    # The data-parallel layout of the prior over several processes is the dp strategy with a prior.
    assert [n for n in apply.distributing() if catalog()[n].mesh_dim == "dp" and catalog()[n].prior] == ["ddp"]


def test_the_cost_terms_are_declared_by_their_strategies() -> None:
    from autotune import costmodel

    declared = {name for name, s in catalog().items() if s.cost is not None}
    assert declared == {
        "precision",
        "vocab_padding",
        "moe",
        "sparse_attention",
        "attention",
        "triton_kernels",
        "tensor_parallel",
        "pipeline_parallel",
        "activation_checkpoint",
        "compile",
        "grad_accum",
        "fsdp2",
        "zero",
    }
    assert not hasattr(costmodel, "BUILTIN_TERMS")
    assert not hasattr(costmodel, "fsdp2_cost")  # the terms' old names in the core are gone


def test_the_gpts_structure_is_what_its_adapter_serves() -> None:
    # No "gpt" token: the built-in GPT's workloads declare the adapter's tokens, and the fused
    # head + cross-entropy asks for the head and the adapter's loss.
    from autotune.contract.strategy import unmet_needs
    from autotune.workloads.adapter import STRUCTURE, GPTAdapter
    from autotune.workloads.gpt import GPT, GPTConfig

    assert (
        GPT_STRUCTURE
        == STRUCTURE
        == GPTAdapter(GPT(GPTConfig(vocab_size=64, seq_len=8, d_model=16, n_layers=1, n_heads=2))).supports()
    )
    kernels = catalog()["triton_kernels"]
    fused = kernels.config().needs()
    assert fused.structure == {"head", "loss"} and kernels.config(loss="liger").needs().modules == (
        "triton",
        "liger_kernel",
    )
    on_a_gpu = dataclasses.replace(
        CPU, device="cuda", accelerators=1, compute_capability=(9, 0), modules=frozenset({"triton"})
    )
    assert unmet_needs(dataclasses.replace(kernels, needs=fused), on_a_gpu) == []
    assert unmet_needs(
        dataclasses.replace(kernels, needs=fused),
        dataclasses.replace(on_a_gpu, structure=frozenset({"blocks", "head"})),
    ) == ["needs the workload to declare loss"]


# ---------------------------------------------------------------------- export


def test_how_each_strategy_exports_is_declared_by_it() -> None:
    """Per config target (``autotune export --to``): "sets" keys, "nothing" to set, or absent:
    refused. Nothing to set only where the config, without the strategy, still describes the
    plan's training; what it cannot say of a parallel layout or an approximation is refused."""
    from autotune.contract.strategy import NOTHING_TO_SET

    declared = {
        name: {target: "nothing" if how is NOTHING_TO_SET else "sets" for target, how in s.exports.items()}
        for name, s in catalog().items()
    }
    both_nothing = {"accelerate": "nothing", "deepspeed": "nothing"}
    expected = {
        "precision": {"accelerate": "sets", "deepspeed": "nothing"},  # DeepSpeed's own bf16 is off: the loop's autocast
        "fp8": {"accelerate": "sets"},
        "compile": {"accelerate": "sets", "deepspeed": "nothing"},
        "fsdp2": {"accelerate": "sets"},
        "zero": {"accelerate": "sets", "deepspeed": "sets"},
        "ddp": {"accelerate": "nothing"},
        "optimizer": {"accelerate": "nothing"},
        **dict.fromkeys(("activation_checkpoint", "attention", "cpu_threads", "dataloader", "grad_accum",
                         "triton_kernels"), both_nothing),
        "vocab_padding": both_nothing,
        **dict.fromkeys(("int8", "moe", "sparse_attention", "tensor_parallel", "pipeline_parallel"), {}),
    }  # fmt: skip
    # The strategies there were when this was written; one added since declares its own (its test says how).
    assert set(expected) <= set(declared) and {name: declared[name] for name in expected} == expected


def test_an_export_to_an_unknown_target_or_an_approximate_strategy_left_out_is_refused_at_catalog_load() -> None:
    from autotune.contract.strategy import NOTHING_TO_SET, check_exports

    with pytest.raises(UserError, match="strategy s: export target 'horovod' is not one of accelerate, deepspeed"):
        check_exports(made_up("s", exports={"horovod": NOTHING_TO_SET}))
    with pytest.raises(UserError, match="strategy a is approximate: accelerate without it trains another model"):
        check_exports(dataclasses.replace(made_up("a", exports={"accelerate": NOTHING_TO_SET}), exact=False))
    check_exports(
        dataclasses.replace(
            made_up("a", exports={"accelerate": lambda cfg, plan: {"mixed_precision": "fp8"}}), exact=False
        )
    )


# ---------------------------------------------------------------------- packages


@dataclass(kw_only=True, slots=True)
class LossConfig:
    """A made-up fused loss whose implementations need packages of their own, as
    triton_kernels' liger (liger_kernel) and cce (cut_cross_entropy) do."""

    loss: str = "plain"
    """The implementation."""

    def needs(self) -> Needs:
        return Needs(modules={"plain": (), "here": ("networkx",), "absent": ("autotune_no_such_package",)}[self.loss])


def test_the_packages_probed_are_the_ones_the_strategies_declare() -> None:
    # Those of the strategy (optuna) and those its config asks for at a knob's choice
    # (networkx, and one that is not installed): probed with no edit to the core.
    losses = made_up(
        "losses",
        config=LossConfig,
        needs=Needs(modules=("optuna",)),
        knobs=(Knob(name="loss", choices=("plain", "here", "absent")),),
    )
    assert declared_modules([losses]) == {"optuna", "networkx", "autotune_no_such_package"}
    facts = Facts.of(None, load_workload("tiny"), strategies=[losses])
    assert facts.modules == {"optuna", "networkx"}
    graph = StrategyGraph(facts, strategies={"losses": losses}, order=("losses",))
    assert graph.usable() == ["losses"]
    assert graph.excluded_choices("losses") == {
        "loss": {"absent": "needs the autotune_no_such_package package, which does not import here"}
    }
    # The catalog's: triton_kernels' liger and cce are probed like deepspeed, installed or not.
    assert {"liger_kernel", "cut_cross_entropy", "deepspeed", "triton"} <= declared_modules(catalog().values())
    here = Facts.of(None, load_workload("tiny")).modules
    for module in ("liger_kernel", "cut_cross_entropy", "deepspeed"):
        assert (module in here) == (importlib.util.find_spec(module) is not None), module


def test_the_planner_tells_compiling_trials_by_the_declaration():
    """``Strategy.compiles``, not a name, is what the planner's time predictions read
    (``planning.summary.shortest_like``, ``planning.confirm``); a study's name the catalog no
    longer knows compiles nothing."""
    from autotune.planning.summary import compiles

    assert [name for name, s in catalog().items() if s.compiles] == ["compile"]
    assert compiles(["precision", "compile"]) and not compiles(["precision", "ddp"]) and not compiles([])
    assert not compiles(["a_strategy_since_removed"])
