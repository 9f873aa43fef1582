"""autotune.hardware and `autotune profile`: detection with and without devices, the saved format, the CLI.

GPUs are simulated on the CPU with a fake pynvml module and a patched torch.cuda, so the GPU code
paths (matching CUDA to NVML devices, NVLink/NVSwitch topology, failing NVML queries) run here;
tests marked gpu check the same on real GPUs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from autotune import devices, hardware
from autotune.cli import main
from autotune.devices import _nvml
from autotune.devices import cuda as cudamod
from autotune.errors import SchemaError, UserError
from autotune.hardware import AllReducePoint, HardwareProfile, Measurements, Stat
from autotune.hardware import detection as detectmod
from autotune.hardware import profile as profilemod
from autotune.schema import to_dict

REPO = Path(__file__).resolve().parent.parent
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def quick() -> HardwareProfile:
    return hardware.detect(quick=True)


# --------------------------------------------------------------------------- detection, no devices


@no_cuda
def test_detect_without_gpu_gives_a_valid_profile(quick: HardwareProfile, tmp_path: Path) -> None:
    assert quick.schema_version == hardware.SCHEMA_VERSION
    assert quick.gpus == [] and quick.links == [] and quick.measured is None
    assert quick.cpu.logical_cores == psutil.cpu_count()
    assert quick.cpu.ram_bytes > 0 and quick.cpu.model
    assert not quick.tpu.present
    assert quick.software.torch == torch.__version__
    assert quick.summary() == {
        "fingerprint": quick.fingerprint, "gpus": "none", "links": "none", "cuda_major": "none", "tpu": "none",
        "cpu": f"{quick.cpu.model} ({quick.cpu.physical_cores or quick.cpu.logical_cores} cores)",
    }  # fmt: skip
    assert HardwareProfile.load(_saved(quick, tmp_path)) == quick


def test_fingerprint_is_stable_and_short(quick: HardwareProfile) -> None:
    again = hardware.detect(quick=True)
    assert again.fingerprint == quick.fingerprint == hardware.current_fingerprint()
    assert len(quick.fingerprint) == 12 and int(quick.fingerprint, 16) >= 0


def test_fingerprint_ignores_measured_numbers_and_ram() -> None:
    _, machine = detectmod._identify([])
    base = profilemod.fingerprint_of(machine)
    more_ram = dataclasses.replace(machine, cpu=dataclasses.replace(machine.cpu, ram_bytes=machine.cpu.ram_bytes * 2))
    assert profilemod.fingerprint_of(more_ram) == base


@no_cuda
def test_measured_profile_on_cpu(tmp_path: Path) -> None:
    prof = hardware.detect(quick=False)
    m = prof.measured
    assert m is not None and m.device == "cpu"
    assert m.matmul["fp32"].median > 0 and m.matmul["fp32"].min <= m.matmul["fp32"].median <= m.matmul["fp32"].max
    assert m.copy is not None and m.copy.unit == "byte/s" and m.copy.median > 0
    assert m.h2d is None and m.allreduce == []
    assert prof.peak_flops("fp32") == (m.matmul["fp32"].median, "measured")
    assert HardwareProfile.load(_saved(prof, tmp_path)) == prof


# --------------------------------------------------------------------------- NVML missing or failing


def test_nvml_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    prof = hardware.detect(quick=True)
    assert any("cannot import pynvml" in note for note in prof.notes)
    assert prof.driver_version is None


def test_nvml_init_raising(monkeypatch: pytest.MonkeyPatch) -> None:
    pynvml = pytest.importorskip("pynvml")

    def refuse() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", refuse)
    prof = hardware.detect(quick=True)
    assert any("nvmlInit failed" in note and "Driver Not Loaded" in note for note in prof.notes)


# --------------------------------------------------------------------------- simulated GPUs


class FakeNVMLError(Exception):
    pass


H200_UUIDS = ["00000000-0000-0000-0000-00000000000a", "00000000-0000-0000-0000-00000000000b"]


def fake_pynvml(links: dict[int, list[tuple[int, int | None]]], *, broken: bool = False) -> types.ModuleType:
    """NVML with two H200s. links[gpu] lists (device type, PCI bus of the far end) per active NVLink."""
    nv = types.ModuleType("pynvml")
    consts = dict(
        NVMLError=FakeNVMLError, NVML_NVLINK_MAX_LINKS=18, NVML_FEATURE_ENABLED=1, NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2,
        NVML_NVLINK_DEVICE_TYPE_GPU=0, NVML_NVLINK_DEVICE_TYPE_SWITCH=2,
    )  # fmt: skip
    vars(nv).update(consts)
    pci = [types.SimpleNamespace(domain=0, bus=0x18 + 0x10 * i, device=0) for i in range(2)]

    def unsupported(*_: Any) -> Any:
        raise FakeNVMLError("Not Supported")

    def link_end(h: int, link: int) -> tuple[int, int | None]:
        if link >= len(links[h]):
            raise FakeNVMLError("Invalid Argument")
        return links[h][link]

    def remote_pci(h: int, link: int) -> Any:
        bus = link_end(h, link)[1]
        return types.SimpleNamespace(domain=0, bus=bus if bus is not None else 0xFE, device=0)

    vars(nv).update(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByUUID=lambda uuid: [f"GPU-{u}".encode() for u in H200_UUIDS].index(uuid),
        nvmlDeviceGetHandleByIndex=unsupported,  # the UUID must be what matches CUDA and NVML devices
        nvmlSystemGetDriverVersion=lambda: "580.159.04",
        nvmlSystemGetCudaDriverVersion=lambda: 13000,
        nvmlDeviceGetMaxClockInfo=lambda h, kind: 1980 if kind == 1 else 3201,
        nvmlDeviceGetEnforcedPowerLimit=unsupported if broken else (lambda h: 700_000),
        nvmlDeviceGetMaxPcieLinkGeneration=lambda h: 5,
        nvmlDeviceGetMaxPcieLinkWidth=lambda h: 16,
        nvmlDeviceGetNumaNodeId=unsupported if broken else (lambda h: h),
        nvmlDeviceGetCpuAffinity=lambda h, words: [0xFFFF << (16 * h)] + [0] * (words - 1),
        nvmlDeviceGetPciInfo=lambda h: pci[h],
        nvmlDeviceGetNvLinkState=lambda h, link: (link_end(h, link), 1)[1],
        nvmlDeviceGetNvLinkVersion=lambda h, link: 6,
        nvmlDeviceGetNvLinkRemoteDeviceType=unsupported if broken else (lambda h, link: link_end(h, link)[0]),
        nvmlDeviceGetNvLinkRemotePciInfo=remote_pci,
        nvmlDeviceGetTopologyCommonAncestor=unsupported if broken else (lambda a, b: 50),
    )
    return nv


@pytest.fixture
def two_h200s(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.cuda answering as two H200s."""
    props = [
        types.SimpleNamespace(name="NVIDIA H200", major=9, minor=0, total_memory=150_000_000_000,
                              multi_processor_count=132, uuid=uuid)
        for uuid in H200_UUIDS
    ]  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda a, b: True)


SWITCH = 2
GPU = 0
BANDWIDTH = Stat.of([3e12, 1e12, 2e12], "byte/s")
MEASURED = Measurements(
    device="cuda:0", matmul_n=8192, matmul={"bf16": Stat.of([7e14, 8e14], "flop/s")}, copy_bytes=1 << 31,
    copy=BANDWIDTH, h2d_bytes=1 << 28, h2d=BANDWIDTH,
    allreduce=[AllReducePoint(size_bytes=1 << 20, algbw=BANDWIDTH, busbw=BANDWIDTH)], seconds=12.5,
)  # fmt: skip


@pytest.mark.usefixtures("two_h200s")
def test_simulated_gpus_behind_nvswitch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({0: [(SWITCH, 0x80)] * 18, 1: [(SWITCH, 0x81)] * 18}))
    prof = hardware.detect(quick=True)
    g0, g1 = prof.gpus
    assert (g0.name, g0.capability, g0.sm_count, g0.bf16, g0.fp8) == ("NVIDIA H200", "9.0", 132, True, True)
    assert (g0.max_sm_clock_mhz, g0.power_limit_w, g0.pcie_generation, g0.pcie_width) == (1980, 700.0, 5, 16)
    assert (g0.numa_node, g0.cpu_affinity, g1.numa_node, g1.cpu_affinity) == (0, "0-15", 1, "16-31")
    (link,) = prof.links
    assert (link.kind, link.nvlink_count, link.nvlink_generation, link.pcie_path, link.peer_access) == (
        "nvswitch",
        18,
        "4.0",
        "SYS",
        True,
    )
    assert (prof.driver_version, prof.cuda_driver_version) == ("580.159.04", "13.0")
    assert prof.summary()["gpus"] == "2 x NVIDIA H200"
    assert prof.peak_flops("bf16") == (989.4e12, "datasheet")
    assert HardwareProfile.load(_saved(prof, tmp_path)) == prof


@pytest.mark.usefixtures("two_h200s")
def test_summary_tables_show_gpus_links_and_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from autotune.cli.profile import _render

    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({0: [(SWITCH, 0x80)] * 18, 1: [(SWITCH, 0x81)] * 18}))
    prof = dataclasses.replace(hardware.detect(quick=True), measured=MEASURED)
    console = Console(file=io.StringIO(), width=200)
    console.print(*_render(prof))
    text = console.file.getvalue()
    for expected in ("NVIDIA H200", "gen5 x16", "nvswitch", "18 x v4.0", "750.0 TFLOP/s", "all-reduce busbw (1 MiB)"):
        assert expected in text


@pytest.mark.usefixtures("two_h200s")
def test_simulated_direct_nvlink_and_failing_queries(monkeypatch: pytest.MonkeyPatch) -> None:
    # Four links from each GPU straight to the other; NVML cannot name the far end's type.
    nv = fake_pynvml({0: [(GPU, 0x28)] * 4, 1: [(GPU, 0x18)] * 4}, broken=True)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    prof = hardware.detect(quick=True)
    (link,) = prof.links
    assert (link.kind, link.nvlink_count, link.pcie_path) == ("nvlink", 4, None)
    assert prof.gpus[0].power_limit_w is None and prof.gpus[0].numa_node is None
    assert any(note.startswith("gpu 0 power limit: unknown") for note in prof.notes)
    assert any(note.startswith("PCIe path 0<->1: unknown") for note in prof.notes)


@pytest.mark.usefixtures("two_h200s")
def test_simulated_gpus_without_nvlink_and_without_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({0: [], 1: []}))
    (link,) = hardware.detect(quick=True).links
    assert (link.kind, link.nvlink_count) == ("pcie", 0)
    monkeypatch.setitem(sys.modules, "pynvml", None)
    prof = hardware.detect(quick=True)
    assert [g.max_sm_clock_mhz for g in prof.gpus] == [None, None]
    assert (prof.links[0].kind, prof.links[0].peer_access) == ("unknown", True)


def test_fingerprint_changes_when_a_gpu_is_added(monkeypatch: pytest.MonkeyPatch, two_h200s: None) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({0: [], 1: []}))
    two = hardware.current_fingerprint()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    one = hardware.current_fingerprint()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert len({two, one, hardware.current_fingerprint()}) == 3


# --------------------------------------------------------------------------- the saved format


def test_corrupted_profiles_are_rejected_naming_the_field(quick: HardwareProfile, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="invalid JSON at line 1"):
        HardwareProfile.load(bad)
    for edit, where in (
        (lambda d: d["cpu"].update(bogus=1), "cpu.bogus"),
        (lambda d: d["cpu"].update(logical_cores="two"), "cpu.logical_cores"),
        (lambda d: d["software"].pop("torch"), "software.torch"),
        (lambda d: d.update(gpus={}), "gpus"),
        (lambda d: d.update(schema_version=99), "schema_version"),
    ):
        data = to_dict(quick)
        edit(data)
        bad.write_text(json.dumps(data))
        with pytest.raises(SchemaError) as err:
            HardwareProfile.load(bad)
        assert err.value.where == where, str(err.value)


def test_save_load_round_trip_with_measurements(quick: HardwareProfile, tmp_path: Path) -> None:
    stat = Stat.of([3.0, 1.0, 2.0], "byte/s")
    assert (stat.median, stat.min, stat.max, stat.repeats) == (2.0, 1.0, 3.0, 3)
    prof = dataclasses.replace(quick, measured=MEASURED)
    before = to_dict(prof)
    path = tmp_path / "p.json"
    prof.save(path)
    assert to_dict(prof) == before  # saving does not change the object
    assert HardwareProfile.load(path) == prof
    assert prof.peak_flops("bf16") == (7.5e14, "measured")


def test_committed_profiles_keep_loading() -> None:
    paths = sorted(p for p in (REPO / "profiles").glob("*.json") if not p.name.endswith(".plan.json"))
    assert paths, "profiles/cpu-dev.json is missing"
    for path in paths:
        prof = HardwareProfile.load(path)
        assert prof.measured is not None, path


def test_peak_flops_sources(quick: HardwareProfile) -> None:
    cpu_only = dataclasses.replace(quick, gpus=[], measured=None)
    with pytest.raises(UserError, match="no bf16 matmul rate"):
        cpu_only.peak_flops("bf16")
    with pytest.raises(ValueError, match="unknown dtype"):
        cpu_only.peak_flops("int4")
    assert devices.get("cuda").datasheet_flops("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12
    assert devices.get("cuda").datasheet_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert devices.get("cuda").datasheet_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert devices.get("cuda").datasheet_flops("NVIDIA A100-SXM4-80GB", "fp8") is None
    assert devices.get("cuda").datasheet_flops("NVIDIA L40S", "bf16") == 362e12
    assert devices.get("cuda").datasheet_flops("NVIDIA H200 NVL", "bf16") is None  # a different card: not guessed
    assert devices.get("cuda").datasheet_flops("NVIDIA GeForce RTX 4090", "bf16") is None


def test_small_decoders() -> None:
    assert _nvml.cpu_ranges([0b1011, 1]) == "0-1,3,64"
    assert cudamod.cudnn_version(91002) == "9.10.2" and cudamod.cudnn_version(8907) == "8.9.7"
    assert _nvml.version(12040) == "12.4"


def test_loading_a_profile_needs_no_torch() -> None:
    code = (
        "import sys, autotune.hardware, autotune.cli.profile; "
        "assert 'torch' not in sys.modules; assert 'optuna' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# --------------------------------------------------------------------------- all-reduce worker


@pytest.mark.slow
def test_allreduce_through_torchrun_on_gloo() -> None:
    points = hardware.measure_allreduce(2, [4096, 1 << 20], device="cpu")
    assert [p.size_bytes for p in points] == [4096, 1 << 20]
    for p in points:
        assert p.algbw.median > 0 and p.busbw.repeats == p.algbw.repeats
        assert p.busbw.median == pytest.approx(p.algbw.median)  # 2(n-1)/n = 1 for two ranks


def test_allreduce_children_never_use_nvlink_multicast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    env = hardware.allreduce_env()
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert str(REPO) in env["PYTHONPATH"].split(":")


# --------------------------------------------------------------------------- the command


@no_cuda
def test_cli_profile_quick_writes_the_profile(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "hw.json"
    assert main(["profile", "--quick", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["schema_version"] == hardware.SCHEMA_VERSION
    assert data["cpu"]["logical_cores"] == psutil.cpu_count()
    assert data["gpus"] == [] and data["measured"] is None


def test_cli_profile_json_prints_the_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hw.json"
    assert main(["profile", "--quick", "--json", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())


def test_cli_profile_bad_out_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    for out, message in ((tmp_path, "is a directory"), (a_file / "hw.json", "is not a directory")):
        assert main(["profile", "--quick", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# --------------------------------------------------------------------------- on real GPUs


@pytest.mark.gpu
@needs_cuda
def test_detect_real_gpus() -> None:
    prof = hardware.detect(quick=True)
    assert len(prof.gpus) == torch.cuda.device_count()
    for g in prof.gpus:
        assert (
            g.sm_count > 0
            and g.memory_bytes > 0
            and g.capability == "{}.{}".format(*torch.cuda.get_device_capability(g.index))
        )
        assert g.max_sm_clock_mhz and g.power_limit_w and g.pcie_generation, prof.notes
    assert prof.driver_version and prof.software.cuda and prof.software.nccl
    assert len(prof.links) == len(prof.gpus) * (len(prof.gpus) - 1) // 2
    assert all(link.kind != "unknown" for link in prof.links), prof.notes


def _saved(prof: HardwareProfile, folder: Path) -> Path:
    path = folder / "profile.json"
    prof.save(path)
    return path
