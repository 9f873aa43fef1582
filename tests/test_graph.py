"""The strategy graph: catalog validation, exclusions and their reasons, legal sets, the order
of application, and `autotune strategies`."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from autotune import devices, hardware
from autotune.apply import order
from autotune.catalog import catalog
from autotune.contract.strategy import Facts, Needs, Strategy, unmet_needs
from autotune.errors import UserError
from autotune.graph import APPROXIMATE, CatalogError, StrategyGraph, validate_catalog
from autotune.workloads import GPT_STRUCTURE, load_workload

ORDER = order()
"""The catalog's order of application (by phase, then reads/changes)."""

ROOT = Path(__file__).resolve().parent.parent

ROADMAP = (
    "precision", "int8", "fp8", "activation_checkpoint", "dataloader", "grad_accum", "compile", "attention",
    "optimizer", "vocab_padding", "ddp", "fsdp2", "zero", "tensor_parallel", "pipeline_parallel", "moe",
    "sparse_attention", "triton_kernels",
)  # fmt: skip
"""The roadmap's optimizations. Its TPU support is a device, not one of them (autotune/devices/xla.py)."""
APPROXIMATE_ONES = {"int8", "fp8", "moe", "sparse_attention"}
MULTI_PROCESS = ("ddp", "fsdp2", "zero", "tensor_parallel", "pipeline_parallel")

CPU = Facts(structure=GPT_STRUCTURE)
"""This kind of machine: no accelerator, one process, the built-in GPT."""
H200X2 = Facts(
    device="cuda",
    accelerators=2,
    compute_capability=(9, 0),
    gpu_name="NVIDIA H200",
    processes=2,
    modules=frozenset({"deepspeed", "triton", "torchao"}),
    structure=GPT_STRUCTURE,
)
T4 = dataclasses.replace(H200X2, accelerators=1, compute_capability=(7, 5), gpu_name="Tesla T4", processes=1)


def _noop(ctx: Any, cfg: Any) -> None:
    """Stands in for an apply function, to judge declarations as if implemented."""


def implemented_catalog() -> dict[str, Strategy]:
    """The real declarations, every one marked implemented."""
    return {name: dataclasses.replace(s, apply=s.apply or _noop) for name, s in catalog().items()}


@dataclass(kw_only=True, slots=True)
class NoKnobs:
    """A config without settings, for made-up strategies."""


def made_up(name: str, **relations: Any) -> Strategy:
    fields = {
        k: frozenset(v) if k in ("requires", "conflicts", "reads", "changes") else v for k, v in relations.items()
    }
    fields.setdefault("phase", "loop")
    return Strategy(name=name, summary=name, exact=True, config=NoKnobs, apply=_noop, **fields)


def catalog_of(*strategies: Strategy) -> dict[str, Strategy]:
    return {s.name: s for s in strategies}


# ---------------------------------------------------------------------- the real catalog


def test_catalog_holds_every_roadmap_optimization_with_a_place_in_order() -> None:
    names = set(catalog())
    assert set(ROADMAP) <= names
    assert names <= set(ORDER), f"no place in ORDER: {sorted(names - set(ORDER))}"
    validate_catalog(catalog(), ORDER)


def test_every_after_edge_is_respected_by_order() -> None:
    graph = StrategyGraph(CPU)
    for name in graph.strategies:
        for earlier in graph.related(name, "after"):
            assert ORDER.index(earlier) < ORDER.index(name), f"{name} after {earlier}"


def test_approximate_strategies_are_exactly_the_ones_that_change_what_is_learned() -> None:
    assert {name for name, s in catalog().items() if not s.exact} == APPROXIMATE_ONES


def test_multi_process_strategies_need_two_processes_and_the_rest_say_where_they_will_be() -> None:
    for name in MULTI_PROCESS:
        assert catalog()[name].needs.min_devices == 2
    assert all(s.implemented for s in catalog().values())  # the last stub (tpu) became a device


def test_conflicts_are_symmetric_in_the_graph() -> None:
    graph = StrategyGraph(CPU)
    for name in graph.strategies:
        for other in graph.related(name, "conflicts"):
            assert name in graph.related(other, "conflicts")
    assert graph.related("fsdp2", "conflicts") == ["pipeline_parallel", "ddp", "zero"]


def test_node_attributes() -> None:
    graph = StrategyGraph(CPU)
    assert graph.graph.nodes["precision"] == {"exact": True, "implemented": True, "usable": True, "reason": ""}
    fp8 = graph.graph.nodes["fp8"]
    assert (fp8["exact"], fp8["implemented"], fp8["usable"]) == (False, True, False)
    assert fp8["reason"].startswith(APPROXIMATE)
    stub = dataclasses.replace(made_up("stub"), apply=None, issue="issue 99")
    stubbed = StrategyGraph(CPU, strategies=catalog_of(stub), order=("stub",)).graph.nodes["stub"]
    assert (stubbed["implemented"], stubbed["usable"]) == (False, False)
    assert stubbed["reason"].startswith("not implemented yet: issue 99")
    kernels = graph.graph.nodes["triton_kernels"]
    assert (kernels["implemented"], kernels["usable"]) == (True, False)
    assert kernels["reason"] == "needs CUDA, none found; needs the triton package, which does not import here"


# ---------------------------------------------------------------------- exclusions


def test_every_exclusion_on_this_machine_has_a_reason() -> None:
    facts = Facts.of(hardware.detect(quick=True), load_workload("tiny"))
    graph = StrategyGraph(facts)
    assert graph.excluded(), "something is always excluded: the unimplemented strategies"
    for name, reason in graph.excluded().items():
        assert reason.strip(), name
    assert set(graph.excluded()) | set(graph.usable()) == set(graph.strategies)
    assert not set(graph.excluded()) & set(graph.usable())


def test_cpu_exclusions_and_their_reasons() -> None:
    excluded = StrategyGraph(CPU).excluded()
    assert excluded["ddp"] == "needs 2+ processes, this run has 1"
    assert excluded["tensor_parallel"] == "needs 2+ processes, this run has 1"
    assert excluded["zero"].startswith("needs 2+ processes, this run has 1")
    assert APPROXIMATE in excluded["moe"]
    assert APPROXIMATE in excluded["fp8"] and "needs CUDA" not in excluded["fp8"]  # a CPU emulates float8
    assert {"precision", "compile", "grad_accum"}.isdisjoint(excluded)


def test_approximate_strategies_only_when_allowed() -> None:
    graph = StrategyGraph(H200X2, strategies=implemented_catalog())
    assert graph.excluded()["moe"] == APPROXIMATE
    allowed = StrategyGraph(H200X2, strategies=implemented_catalog(), allow_approximate=True)
    assert APPROXIMATE_ONES <= set(allowed.usable())


def test_h200s_meet_the_needs_of_fp8_and_tp() -> None:
    graph = StrategyGraph(H200X2, allow_approximate=True)
    for name in ("fp8", "ddp", "fsdp2", "zero", "tensor_parallel", "pipeline_parallel", "int8", "triton_kernels"):
        assert unmet_needs(graph.strategies[name], H200X2) == [], name
    assert {"fp8", "int8"} <= set(graph.usable())
    assert "triton_kernels" in graph.usable()
    # Each fused loss is offered where its package imports (the extras install them).
    assert graph.excluded_choices("triton_kernels") == {
        "loss": {
            "liger": "needs the liger_kernel package, which does not import here",
            "cce": "needs the cut_cross_entropy package, which does not import here",
        }
    }
    t4 = StrategyGraph(T4, allow_approximate=True).excluded()
    assert t4["fp8"] == "needs fp8 tensor cores (compute capability 8.9+), Tesla T4 has none"
    assert {"tensor_parallel", "pipeline_parallel"} <= set(graph.usable())
    assert {"ddp", "fsdp2"} <= set(graph.usable())
    assert graph.excluded_choices("precision") == {}
    assert graph.excluded_choices("attention") == {
        "backend": {
            "fa3": "needs the flash_attn_interface package, which does not import here",
            "fa4": "needs the flash_attn.cute package, which does not import here",
        }
    }


def test_a_fake_h200_profile_reads_as_two_gpus() -> None:
    facts = Facts.of(gpu_profile("NVIDIA H200", "9.0", 2), load_workload("tiny"))
    assert (facts.device, facts.accelerators, facts.compute_capability, facts.processes) == ("cuda", 2, (9, 0), 2)
    assert {"ddp", "fsdp2"} <= set(StrategyGraph(facts).usable())


def test_a_turing_gpu_excludes_what_needs_fp8_or_bf16_with_the_capability_reason() -> None:
    graph = StrategyGraph(T4, strategies=implemented_catalog(), allow_approximate=True)
    assert graph.excluded()["fp8"] == "needs fp8 tensor cores (compute capability 8.9+), Tesla T4 has none"
    assert graph.excluded_choices("precision") == {"dtype": {"bf16": "needs bf16 tensor cores, Tesla T4 has none"}}
    assert graph.excluded_choices("fsdp2") == {"param_dtype": {"bf16": "needs bf16 tensor cores, Tesla T4 has none"}}
    flash = graph.excluded_choices("attention")["backend"]["flash"]
    assert flash == "needs compute capability 8.0+, Tesla T4 has 7.5"
    assert "int8" in graph.usable()


def test_fa4_is_offered_on_hopper_and_blackwell_where_flash_attn_cute_imports() -> None:
    # Issue 28: FlashAttention-4's kernels are built for sm90 and sm100 only (not Ampere, not sm120).
    h100 = dataclasses.replace(
        T4, compute_capability=(9, 0), gpu_name="NVIDIA H100", modules=frozenset({"flash_attn.cute"})
    )

    def why(facts: Facts, **changes: Any) -> str | None:
        graph = StrategyGraph(dataclasses.replace(facts, **changes))
        return graph.excluded_choices("attention").get("backend", {}).get("fa4")

    assert why(h100) is None
    assert why(h100, compute_capability=(10, 0), gpu_name="NVIDIA B200") is None
    assert why(h100, modules=frozenset()) == "needs the flash_attn.cute package, which does not import here"
    assert why(h100, compute_capability=(8, 0), gpu_name="NVIDIA A100") == (
        "needs compute capability 9.x or 10.x, NVIDIA A100 has 8.0"
    )
    assert why(h100, compute_capability=(12, 0), gpu_name="RTX 5090") == (
        "needs compute capability 9.x or 10.x, RTX 5090 has 12.0"
    )
    assert why(CPU) == "needs CUDA, none found; needs the flash_attn.cute package, which does not import here"
    # The package is probed like every declared one (without importing it).
    from autotune.contract.strategy import declared_modules

    assert "flash_attn.cute" in declared_modules(catalog().values())


def test_choice_reasons_shared_by_every_choice_belong_to_another_setting() -> None:
    # precision's default dtype is bf16, which a T4 lacks: that is not tf32's fault.
    graph = StrategyGraph(T4)
    assert "tf32" not in graph.excluded_choices("precision")


def test_cpu_excludes_cuda_only_settings() -> None:
    graph = StrategyGraph(CPU)
    assert graph.excluded_choices("precision") == {"dtype": {"fp16": "needs CUDA, none found"}}
    assert graph.excluded_choices("dataloader") == {"pin_memory": {True: "needs CUDA, none found"}}
    assert set(graph.excluded_choices("attention")["backend"]) == {"efficient", "flash", "cudnn", "fa3", "fa4"}
    assert graph.excluded_choices("grad_accum") == {}


def test_a_workload_without_structure_leaves_out_what_needs_it() -> None:
    facts = dataclasses.replace(H200X2, structure=frozenset())
    excluded = StrategyGraph(facts).excluded()
    assert excluded["activation_checkpoint"] == "needs the workload to declare blocks"
    assert "needs the workload to declare attention, blocks, mlp" in excluded["tensor_parallel"]


def test_requiring_an_excluded_strategy_excludes_transitively() -> None:
    strategies = catalog_of(
        made_up("a", requires={"b"}),
        made_up("b", requires={"c"}),
        made_up("c", needs=Needs(accelerator=True)),
        made_up("d"),
    )
    graph = StrategyGraph(CPU, strategies=strategies, order=("a", "b", "c", "d"))
    leaf = f"needs {' or '.join(d.words for d in devices.accelerators())}, none found"  # "CUDA or XLA" today
    assert graph.excluded() == {
        "a": f"requires b, which is excluded: requires c, which is excluded: {leaf}",
        "b": f"requires c, which is excluded: {leaf}",
        "c": leaf,
    }
    assert graph.usable() == ["d"]


# ---------------------------------------------------------------------- combinations and order


@pytest.fixture(scope="module")
def everything() -> StrategyGraph:
    """Every declaration as if implemented, on two H200s, approximate allowed: only spmd (XLA's) is out."""
    return StrategyGraph(H200X2, strategies=implemented_catalog(), allow_approximate=True)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["fsdp2", "ddp"], "ddp conflicts with fsdp2"),
        (["zero", "ddp"], "ddp conflicts with zero"),
        (["fsdp2", "zero", "precision"], "fsdp2 conflicts with zero"),
        (["zero", "pipeline_parallel"], "pipeline_parallel conflicts with zero"),
        (["ddp", "tensor_parallel"], "tensor_parallel conflicts with ddp"),
        (["fsdp2", "pipeline_parallel"], "pipeline_parallel conflicts with fsdp2"),
        (["tensor_parallel", "pipeline_parallel"], "tensor_parallel conflicts with pipeline_parallel"),
        (["int8", "fp8"], "int8 conflicts with fp8"),
        (["attention", "sparse_attention"], "sparse_attention conflicts with attention"),
        (["spmd"], "strategy spmd cannot be used here: needs XLA's GSPMD partitioner"),
        (["precision", "warp_drive"], "unknown strategy 'warp_drive'"),
    ],
)
def test_illegal_sets_are_rejected_with_their_reason(everything: StrategyGraph, names: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        everything.check(names)
    assert not everything.is_legal(names)


def test_legal_sets_pass(everything: StrategyGraph) -> None:
    for names in (
        [],
        ["precision", "compile"],
        ["fsdp2", "tensor_parallel", "fp8", "compile"],
        ["pipeline_parallel", "compile"],
    ):
        everything.check(names)
        assert everything.is_legal(names)


def test_an_excluded_member_is_rejected_with_its_reason() -> None:
    with pytest.raises(UserError, match=r"strategy ddp cannot be used here: needs 2\+ processes, this run has 1"):
        StrategyGraph(CPU).check(["precision", "ddp"])


def test_a_missing_requirement_is_rejected() -> None:
    graph = StrategyGraph(CPU, strategies=catalog_of(made_up("a", requires={"b"}), made_up("b")), order=("b", "a"))
    with pytest.raises(UserError, match="a requires b, which is not chosen"):
        graph.check(["a"])
    graph.check(["a", "b"])


def test_order_is_order_filtered_and_stable(everything: StrategyGraph) -> None:
    names = ["dataloader", "ddp", "compile", "precision", "activation_checkpoint", "grad_accum"]
    expected = [n for n in ORDER if n in names]
    assert everything.order(names) == expected
    assert everything.order(reversed(names)) == expected
    assert everything.order(set(names)) == expected
    assert everything.order(list(everything.strategies)) == [n for n in ORDER if n in everything.strategies]
    with pytest.raises(UserError, match="unknown strategy 'nope'"):
        everything.order(["nope"])


def test_legal_sets_are_every_legal_subset_of_the_usable_ones() -> None:
    strategies = catalog_of(
        made_up("a", requires={"b"}),
        made_up("b"),
        made_up("c", conflicts={"d"}),
        made_up("d"),
        made_up("e", needs=Needs(features=frozenset({"gspmd"}))),
    )
    graph = StrategyGraph(CPU, strategies=strategies, order=("a", "b", "c", "d", "e"))
    brute = {subset for k in range(5) for subset in itertools.combinations(graph.usable(), k) if graph.is_legal(subset)}
    found = list(graph.legal_sets())
    assert found[0] == ()
    assert len(found) == len(set(found)) and set(found) == brute
    assert ("a",) not in brute and ("c", "d") not in brute and ("a", "b", "c") in brute


def test_legal_sets_of_the_catalog_never_pair_conflicts(everything: StrategyGraph) -> None:
    count = 0
    for names in itertools.islice(everything.legal_sets(), 0, None, 97):
        assert everything.is_legal(names) and list(names) == everything.order(names)
        count += 1
    assert count > 10


# ---------------------------------------------------------------------- contradictory declarations


@pytest.mark.parametrize(
    ("strategies", "order", "message"),
    [
        ([made_up("a", requires={"b"}, conflicts={"b"}), made_up("b")], "ab",
         "strategy a can never be used: it requires b, and a conflicts with b"),
        ([made_up("a", requires={"b"}), made_up("b", requires={"c"}), made_up("c", conflicts={"a"})], "abc",
         "strategy a can never be used: it requires b, c, and a conflicts with c"),
        ([made_up("a", requires={"b", "c"}), made_up("b"), made_up("c", conflicts={"b"})], "abc",
         "strategy a can never be used: it requires b, c, and b conflicts with c"),
        ([made_up("a"), made_up("b")], "a",
         "strategy b has no place in the order of application"),
        ([made_up("a", conflicts={"nope"})], "a",
         "strategy a: conflicts unknown strategy 'nope'"),
        ([made_up("a", reads={"nope"})], "a",
         "strategy a: reads unknown part 'nope'"),
        ([made_up("a", changes={"head", "nope"})], "a",
         "strategy a: changes unknown part 'nope'"),
        ([made_up("a", requires={"a"})], "a",
         "strategy a: requires itself"),
    ],
)  # fmt: skip
def test_contradictory_declarations_fail_validation(strategies: list[Strategy], order: str, message: str) -> None:
    with pytest.raises(CatalogError) as info:
        validate_catalog(catalog_of(*strategies), tuple(order))
    assert str(info.value).startswith(message)
    with pytest.raises(CatalogError):
        StrategyGraph(CPU, strategies=catalog_of(*strategies), order=tuple(order))


def test_a_conflict_declared_on_one_side_binds_both() -> None:
    graph = StrategyGraph(CPU, strategies=catalog_of(made_up("a", conflicts={"b"}), made_up("b")), order=("a", "b"))
    assert graph.related("b", "conflicts") == ["a"]
    with pytest.raises(UserError, match="a conflicts with b"):
        graph.check(["b", "a"])


# ---------------------------------------------------------------------- the command


def gpu_profile(name: str, capability: str, count: int) -> hardware.HardwareProfile:
    """This machine's quick profile with ``count`` made-up GPUs."""
    major = tuple(int(x) for x in capability.split("."))
    gpu = hardware.GpuInfo(
        index=0, name=name, uuid=None, memory_bytes=141 * hardware.GiB, capability=capability, sm_count=132,
        tf32=major >= (8, 0), bf16=major >= (8, 0), fp8=major >= (8, 9), max_sm_clock_mhz=None,
        max_memory_clock_mhz=None, power_limit_w=None, pcie_generation=None, pcie_width=None, numa_node=None,
        cpu_affinity=None,
    )  # fmt: skip
    gpus = [dataclasses.replace(gpu, index=i) for i in range(count)]
    return dataclasses.replace(hardware.detect(quick=True), gpus=gpus)


def test_cli_json_lists_every_roadmap_optimization(run_cli) -> None:
    code, out, _ = run_cli("strategies", "--json")
    assert code == 0
    rows = {row["name"]: row for row in json.loads(out)}
    assert set(ROADMAP) <= set(rows)
    assert [r for r in rows] == [n for n in ORDER if n in rows]
    for name, row in rows.items():
        assert set(row) >= {
            "name",
            "exact",
            "implemented",
            "usable",
            "reason",
            "needs",
            "requires",
            "conflicts",
            "after",
            "knobs",
        }
        assert row["exact"] == (name not in APPROXIMATE_ONES)
        assert row["usable"] == (row["reason"] is None)
    precision = {k["name"]: k for k in rows["precision"]["knobs"]}
    assert precision["dtype"]["choices"] == ["fp32", "bf16", "fp16"] and precision["tf32"]["choices"] == [True, False]
    assert rows["ddp"]["conflicts"] == ["tensor_parallel", "pipeline_parallel", "fsdp2", "zero"]
    assert rows["zero"]["needs"]["modules"] == ["deepspeed"] and rows["zero"]["needs"]["min_devices"] == 2
    assert rows["grad_accum"]["knobs"] == [{"name": "steps", "low": 1, "high": 16, "log": True, "integer": True}]


def test_cli_explain_gives_a_reason_for_every_exclusion(run_cli) -> None:
    code, out, _ = run_cli("strategies", "--explain")
    assert code == 0
    _, json_out, _ = run_cli("strategies", "--json")
    lines = out.splitlines()
    for row in json.loads(json_out):
        if not row["usable"]:
            assert f"{row['name']}: {row['reason']}" in lines
    assert "precision dtype=fp16: needs CUDA, none found" in lines
    assert "attention backend=flash: needs CUDA, none found" in lines


def test_cli_with_a_profile_and_a_workload_without_structure(
    run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    path = tmp_path / "h200.json"
    gpu_profile("NVIDIA H200", "9.0", 2).save(path)
    code, out, _ = run_cli("strategies", "--profile", path, "--workload", "examples.custom_workload:build", "--explain")
    assert code == 0
    assert "activation_checkpoint: needs the workload to declare blocks" in out.splitlines()
    assert "fsdp2: needs the workload to declare blocks" in out.splitlines()
    assert "ddp" not in {line.split(":")[0] for line in out.splitlines()}  # usable: 2 GPUs, no structure needed
    assert "2 x NVIDIA H200, 2 processes" in out


def test_cli_allow_approximate(run_cli) -> None:
    _, out, _ = run_cli("strategies", "--json", "--allow-approximate")
    assert all(APPROXIMATE not in (row["reason"] or "") for row in json.loads(out))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workload", "nope"], "unknown workload 'nope'"),
        (["--profile", "/no/such/profile.json"], "no such file"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(run_cli, args: list[str], message: str) -> None:
    code, out, err = run_cli("strategies", *args)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_graph_writes_dot(run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli("strategies", "--graph", tmp_path / "g.dot", "--json")
    assert code == 0 and "wrote" in err
    dot = (tmp_path / "g.dot").read_text()
    assert dot.startswith("digraph strategies {") and dot.rstrip().endswith("}")
    for name in ROADMAP:
        assert f'  "{name}" [' in dot
    assert '"ddp" -> "fsdp2" [label="conflicts"' in dot and '"fsdp2" -> "ddp"' not in dot
    assert 'style="rounded,filled,dashed"' not in dot  # every strategy is implemented (the tpu stub was the last)
    stub = dataclasses.replace(made_up("stub"), apply=None, issue="issue 99")
    stubbed = StrategyGraph(CPU, strategies=catalog_of(stub), order=("stub",)).to_dot()
    assert '"stub" [' in stubbed and 'style="rounded,filled,dashed"' in stubbed  # not implemented yet


def test_cli_graph_svg_needs_graphviz_else_writes_dot_beside(run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli("strategies", "--graph", tmp_path / "g.svg", "--json")
    assert code == 0
    if shutil.which("dot"):
        assert (tmp_path / "g.svg").read_text().lstrip().startswith("<?xml")
    else:
        assert "Graphviz is missing" in err and (tmp_path / "g.dot").exists() and not (tmp_path / "g.svg").exists()
