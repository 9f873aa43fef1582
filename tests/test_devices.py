"""The device layer (autotune.devices): the CPU's device in full, the CUDA module's parts that
need no GPU (its datasheet, its capabilities, what it reads off a profile), the registry found
by discovery (a do-nothing device is its module and nothing else), and the rule that keeps
device names inside the layer."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import io
import json
import re
import sys
import textwrap
import tokenize
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from autotune import devices
from autotune.contract.strategy import Facts, Needs, Strategy, unmet_needs
from autotune.devices import cuda as cudamod
from autotune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CPU = devices.get("cpu")
CUDA = devices.get("cuda")


# --------------------------------------------------------------------------- the registry


def test_the_registry_finds_every_kind_the_cpu_last() -> None:
    assert set(devices.names()) >= {"cpu", "cuda"}
    assert devices.names()[-1] == "cpu" and not CPU.accelerator
    assert CUDA in devices.accelerators() and CPU not in devices.accelerators()
    assert devices.of(torch.device("cpu")) is CPU and devices.of("cuda") is CUDA
    assert CPU in devices.available() and devices.available()[-1] is CPU
    with pytest.raises(UserError, match="unknown device 'abacus': expected one of"):
        devices.get("abacus")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_without_an_accelerator_auto_is_the_cpu_and_a_named_one_is_refused() -> None:
    assert devices.detect() is CPU and devices.planned("auto") is CPU and devices.planned("cuda") is CUDA
    assert devices.resolve("auto").torch_device(None) == torch.device("cpu")
    with pytest.raises(UserError, match="the plan asks for CUDA, but no CUDA device is available"):
        devices.resolve("cuda")
    with pytest.raises(UserError, match="no CUDA device is available"):
        CUDA.torch_device(0)
    assert not CUDA.is_available() and CUDA.count() == 0


NULL_DEVICE = '''
"""A device that does nothing: the base class's host answers under another name."""

from autotune.devices.base import Device


class Null(Device):
    name = "null"
    title = "Null"

    def features(self, compute_capability):
        return frozenset({"graphs"})


DEVICE = Null()
'''


def every_accelerator() -> str:
    """How a reason names every accelerator kind ("CUDA or XLA" today): built from the registry,
    so that a kind added as its module (and its test) edits nothing here."""
    return " or ".join(d.words for d in devices.accelerators())


@pytest.fixture
def null_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> devices.Device:
    """``devices/null.py`` added: a folder on the package's path holding only that module."""
    (tmp_path / "null.py").write_text(NULL_DEVICE)
    monkeypatch.setattr(devices, "__path__", [*devices.__path__, str(tmp_path)])
    devices._registry.cache_clear()
    yield devices.get("null")
    sys.modules.pop("autotune.devices.null", None)
    devices._registry.cache_clear()


def test_a_do_nothing_device_is_its_module(null_device: devices.Device) -> None:
    assert null_device.accelerator and devices.names()[-1] == "cpu" and "null" in devices.names()
    assert not null_device.is_available() and devices.detect() is not null_device
    # Strategies' needs name capabilities, so the messages follow the kinds that have them.
    fp16 = Strategy(
        name="x", summary="", exact=True, config=object, apply=None, phase="loop", needs=Needs(features={"fp16"})
    )
    graphs = dataclasses.replace(fp16, needs=Needs(features=frozenset({"graphs"})))
    anything = dataclasses.replace(fp16, needs=Needs(accelerator=True))
    assert unmet_needs(fp16, Facts()) == ["needs CUDA, none found"]
    assert unmet_needs(graphs, Facts()) == ["needs CUDA or Null, none found"]
    assert unmet_needs(anything, Facts()) == [f"needs {every_accelerator()}, none found"]
    assert {"CUDA", "Null", "XLA"} <= set(every_accelerator().split(" or "))
    on_null = Facts(device="null", accelerators=1, gpu_name="Null 1")
    assert unmet_needs(graphs, on_null) == [] and unmet_needs(anything, on_null) == []
    assert unmet_needs(fp16, on_null) == ["needs fp16 autocast with a dynamic loss scaler, Null 1 has none"]


def test_a_module_without_its_device_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken.py").write_text("DEVICE = None\n")
    monkeypatch.setattr(devices, "__path__", [*devices.__path__, str(tmp_path)])
    devices._registry.cache_clear()
    try:
        with pytest.raises(TypeError, match="autotune.devices.broken must define DEVICE"):
            devices.names()
    finally:
        sys.modules.pop("autotune.devices.broken", None)
        devices._registry.cache_clear()


# --------------------------------------------------------------------------- the CPU


def test_the_cpu_device() -> None:
    device = CPU.torch_device(None)
    assert device == torch.device("cpu") and CPU.torch_device(3) == device
    assert (CPU.backend, CPU.is_available(), CPU.count(), CPU.surely_absent()) == ("gloo", True, 1, False)
    assert CPU.features(None) == {"bf16", "fp8", "inductor", "collectives", "torchao", "foreach"}
    assert CPU.datasheet_flops(CPU.device_name(device), "bf16") is None
    assert CPU.optimizer_kwargs() == {"foreach": True} and CPU.process_group_options(device) == {}
    CPU.make_current(device)
    CPU.synchronize(device)
    CPU.mark_step(device)
    CPU.graph_step_begin()
    CPU.empty_cache()
    CPU.reset_peak_memory(device)
    assert CPU.peak_memory_bytes(device) > 1 << 20  # the process's resident set
    with CPU.timer(device) as t:
        torch.ones(64, 64) @ torch.ones(64, 64)
    assert t.finished() and t.seconds() >= 0
    assert CPU.rng_state(device) is None
    CPU.set_rng_state(None, device)
    a = torch.ones(8, 8)
    with CPU.autocast(device, torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        with CPU.autocast(device, None):  # None turns an outer autocast off
            assert (a @ a).dtype == torch.float32
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        CPU.allow_tf32(True)  # torch's process-wide switches, set on every kind
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        CPU.allow_tf32(before)
    profile = SimpleNamespace(cpu=SimpleNamespace(model="Some CPU"), gpus=[])
    assert CPU.found_in(profile) == devices.Found(count=1, name="Some CPU")
    assert CPU.detect_devices([]) == devices.Inventory() and CPU.probe_software([], []) == devices.Stack()


# --------------------------------------------------------------------------- CUDA without a GPU


def test_the_cuda_datasheet() -> None:
    rate = CUDA.datasheet_flops
    assert rate("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12
    assert rate("NVIDIA H200", "fp8") == 1978.9e12
    assert rate("NVIDIA H100 PCIe", "bf16") == 756e12
    assert rate("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert rate("NVIDIA A100-SXM4-80GB", "fp8") is None
    assert rate("NVIDIA L40S", "bf16") == 362e12
    assert rate("NVIDIA H200 NVL", "bf16") is None  # a different card: not guessed
    assert rate("NVIDIA GeForce RTX 4090", "bf16") is None


@pytest.mark.parametrize(
    ("capability", "bf16", "fp8"),
    [(None, False, False), ((7, 5), False, False), ((8, 0), True, False), ((8, 9), True, True), ((9, 0), True, True)],
)
def test_cuda_capabilities_follow_the_compute_capability(capability, bf16: bool, fp8: bool) -> None:
    features = CUDA.features(capability)
    assert ("bf16" in features, "fp8" in features) == (bf16, fp8)
    assert cudamod.ALWAYS <= features and features <= set(devices.FEATURES)


def test_cuda_reads_a_profile_and_words_what_it_lacks() -> None:
    gpus = [SimpleNamespace(name="Tesla T4", capability="7.5"), SimpleNamespace(name="Tesla T4", capability="8.0")]
    found = CUDA.found_in(SimpleNamespace(gpus=gpus))
    assert found == devices.Found(count=2, name="Tesla T4", compute_capability=(7, 5))
    assert CUDA.found_in(None) == devices.Found(count=0)
    assert devices.in_profile(SimpleNamespace(gpus=gpus, cpu=None)) == (CUDA, found)
    assert devices.in_profile(None)[0] is CPU
    assert CUDA.lacks("bf16", found) == "needs bf16 tensor cores, Tesla T4 has none"
    assert CUDA.lacks("fp8", found) == "needs fp8 tensor cores (compute capability 8.9+), Tesla T4 has none"
    assert (CUDA.backend, CUDA.optimizer_kwargs(), CUDA.words) == ("nccl", {"fused": True}, "CUDA")
    assert cudamod.capability("8.6") == (8, 6)


def test_needs_are_capabilities_and_the_reasons_name_the_kind() -> None:
    strategy = Strategy(name="x", summary="", exact=True, config=object, apply=None, phase="loop")
    t4 = Facts(device="cuda", accelerators=1, compute_capability=(7, 5), gpu_name="Tesla T4")
    h100 = dataclasses.replace(t4, compute_capability=(9, 0), gpu_name="H100")

    def why(facts: Facts, **needs) -> list[str]:
        return unmet_needs(dataclasses.replace(strategy, needs=Needs(**needs)), facts)

    assert why(Facts(), accelerator=True) == [f"needs {every_accelerator()}, none found"]
    assert {"CUDA", "XLA"} <= set(every_accelerator().split(" or "))
    assert why(Facts(), features=frozenset({"triton", "graphs"})) == ["needs CUDA, none found"]  # said once
    assert why(Facts(), features=frozenset({"bf16", "fp8"})) == []  # any CPU runs them (fp8 in software)
    assert why(t4, features=frozenset({"bf16"})) == ["needs bf16 tensor cores, Tesla T4 has none"]
    assert why(h100, accelerator=True, features=frozenset({"bf16", "fp8", "triton"})) == []
    assert why(Facts(), features=frozenset({"warp"})) == ["needs warp, which no kind of device here has"]


# --------------------------------------------------------------------------- no device name outside the layer

SCANNED = ("autotune", "strategies", "kernels")
ALLOWED: set[str] = set()
"""Files allowed to name a device outright: none (the NVIDIA detection and measurement that
hardware.py held are the CUDA device's ``detect_devices``/``probe_software`` since the hardware/ split)."""
PROFILE_KEYS = {
    "autotune/cli/profile.py": {"cuda", "cuda_driver_version", '"cuda"'},
    "autotune/hardware/profile.py": {"cuda", "cuda_driver_version", '"cuda_major"'},
    "autotune/hardware/detection.py": {"cuda", "cuda_driver_version"},
}
"""Names of the saved hardware profile's fields and its summary's keys (a public, versioned
format: renaming one breaks every committed profile and plan), allowed where the profile is
defined, filled and printed."""
NAME = re.compile(r"(?<![A-Za-z])(cuda|Cuda|CUDA)(?![a-z])")
"""The word in code: ``cuda``, ``torch.cuda``, ``is_cuda``, ``on_cuda``, ``CudaClock``,
``CUDA_MEASURE``. Not ``cudagraphs`` or ``cudnn``: other words (torch.compile's mode
"max-autotune-no-cudagraphs" is torch's name of a mode, which plans store)."""
IN_STRINGS = re.compile(r"(?<![A-Za-z])cuda(?![a-z])")
"""The device's name in a string ("cuda", "cuda:0", "--device cuda"). Prose that says CUDA in a
message ("CUDA graph trees overwrite ...") is English about the technology, not a name the code
branches on."""


def device_names_in(source: str) -> list[tuple[int, str]]:
    """(line, token) of each device name in ``source``'s code: identifiers, attributes and
    string literals, not comments or docstrings (any string standing alone as a statement)."""
    tree = ast.parse(source)
    docs = [
        ((n.lineno, n.col_offset), (n.end_lineno, n.end_col_offset))
        for n in ast.walk(tree)
        if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
    ]
    found = []
    string_kinds = {tokenize.STRING} | {getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and NAME.search(tok.string):
            found.append((tok.start[0], tok.string))
        elif tok.type in string_kinds and IN_STRINGS.search(tok.string):
            if not any(start <= tok.start < end for start, end in docs):
                found.append((tok.start[0], tok.string))
    return found


def test_the_scan_sees_code_and_not_prose() -> None:
    source = textwrap.dedent(
        '''
        """Docstring: cuda is fine here."""
        x = torch.cuda.is_available()  # a comment: cuda
        y = "cuda" if x else "cpu"
        class A:
            on_cuda: bool
            """An attribute docstring on cuda."""
        z = f"{x} on cuda:0"
        w = "max-autotune-no-cudagraphs", "CUDA graphs"
        CudaClock, is_cuda = 1, 2
        '''
    )
    assert [line for line, _ in device_names_in(source)] == [3, 4, 6, 8, 10, 10]


def test_no_device_name_outside_the_device_layer() -> None:
    offenders = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("autotune/devices/") or rel in ALLOWED:
                continue
            keys = PROFILE_KEYS.get(rel, set())
            found = [(line, token) for line, token in device_names_in(path.read_text()) if token not in keys]
            offenders += [f"{rel}:{line}: {token}" for line, token in found]
    assert not offenders, "device names outside autotune/devices/:\n" + "\n".join(offenders)


# --------------------------------------------------------------------------- XLA without torch-xla

XLA = devices.get("xla")


def test_the_xla_datasheet_and_what_it_reads_off_a_profile() -> None:
    rate = XLA.datasheet_flops
    assert rate("TPU v4", "bf16") == 275e12 and rate("TPU v5 lite", "bf16") == 197e12
    assert rate("TPU v5e", "int8") == 394e12 and rate("TPU v5p", "bf16") == 459e12 and rate("TPU v5", "int8") == 918e12
    assert rate("TPU v6 lite", "bf16") == 918e12 and rate("TPU v6e", "int8") == 1836e12
    assert rate("CPU (XLA)", "bf16") is None and rate("TPU v7", "bf16") is None  # not guessed
    tpu = SimpleNamespace(present=True, kind="TPU v5 lite", count=8, torch_xla="2.9.0")
    assert XLA.found_in(SimpleNamespace(tpu=tpu, gpus=[])) == devices.Found(count=8, name="TPU v5 lite")
    assert XLA.found_in(SimpleNamespace(tpu=SimpleNamespace(present=False))) == devices.Found(count=0)
    assert XLA.found_in(None) == devices.Found(count=0)
    assert devices.in_profile(SimpleNamespace(tpu=tpu, gpus=[], cpu=None))[0] is XLA


def test_xla_runs_what_a_lazily_traced_device_runs_and_says_why_not_the_rest() -> None:
    assert XLA.features(None) == {"bf16", "gspmd"} and XLA.accelerator and not XLA.foreach
    on_xla = Facts(device="xla", accelerators=1, gpu_name="CPU (XLA)")
    strategy = Strategy(name="x", summary="", exact=True, config=object, apply=None, phase="loop")

    def why(**needs) -> list[str]:
        return unmet_needs(dataclasses.replace(strategy, needs=Needs(**needs)), on_xla)

    assert why(features=frozenset({"bf16"})) == []
    assert why(features=frozenset({"inductor"})) == [
        "needs torch.compile's inductor (XLA compiles the step itself), which CPU (XLA) does not run"
    ]
    assert "which CPU (XLA) does not run" in why(features=frozenset({"collectives"}))[0]
    assert unmet_needs(dataclasses.replace(strategy, needs=Needs(features=frozenset({"gspmd"}))), Facts()) == [
        "needs XLA, none found"
    ]
    if importlib.util.find_spec("torch_xla") is None:
        assert XLA.surely_absent() and not XLA.is_available() and XLA not in devices.available()
        with pytest.raises(UserError, match=r"no XLA device is available: install \.\[xla\]"):
            XLA.torch_device(None)


def test_a_plan_naming_the_removed_tpu_strategy_says_what_to_write_instead(tmp_path: Path) -> None:
    from autotune import plan as planmod

    plan = json.loads((ROOT / "profiles" / "default" / "tiny.plan.json").read_text())
    plan["strategies"] = [{"name": "tpu", "knobs": {"matmul_precision": "high"}}]
    (tmp_path / "old.plan.json").write_text(json.dumps(plan))
    with pytest.raises(
        UserError,
        match=r'strategies\[0\]\.name: strategy tpu was removed: a TPU is a device now .*launch\.device to "xla"$',
    ):
        planmod.load(tmp_path / "old.plan.json")
