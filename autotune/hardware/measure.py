"""What the machine does, measured on one device (the accelerator's device 0, else the CPU):
dense matmul rate per dtype, memory and host-to-device bandwidth, and all-reduce bus bandwidth
between the accelerator's devices (one process each through torchrun: :mod:`autotune.hardware.allreduce`).

Every figure goes through the device layer: the device made current, its timer (events on an
accelerator, the host clock on a CPU), its sync and its cache. torch is imported inside functions.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from autotune import devices
from autotune.devices import Device, ask
from autotune.hardware.profile import MATMUL_DTYPES, AllReducePoint, GiB, GpuInfo, Measurements, MiB, Stat
from autotune.schema import from_dict, read_json

Log = Callable[[str], None]


@dataclass(kw_only=True, slots=True)
class MeasureConfig:
    """How big and how long each measurement is."""

    matmul_n: int
    """Square matmul size n, large enough to fill the device."""
    copy_bytes: int
    """Buffer of the bandwidth copy, far larger than any cache."""
    h2d_bytes: int
    """Pinned host buffer copied to the device (an accelerator only)."""
    allreduce_bytes: tuple[int, ...]
    """All-reduce message sizes (two or more devices only)."""
    budget_s: float
    """Timed seconds per figure, split over the repeats; a figure whose single run takes longer is skipped."""
    warmup_s: float
    """Untimed running before each figure, so clocks, caches and library choices settle."""
    repeats: int
    """Timed repeats per figure; a figure is their median with min and max."""


ACCELERATOR_MEASURE = MeasureConfig(
    matmul_n=8192,  # 2 * 8192^3 = 1.1 TFLOP a product: about 1.4 ms in bf16 on an H100
    copy_bytes=2 * GiB,  # 2 GiB read + 2 GiB written, ~80x an H100's 50 MiB L2
    h2d_bytes=256 * MiB,
    allreduce_bytes=(MiB, 16 * MiB, 128 * MiB, GiB),
    budget_s=1.0,
    warmup_s=1.0,  # clocks settle after about a second of full load
    repeats=10,
)
CPU_MEASURE = MeasureConfig(
    matmul_n=2048,  # 17 GFLOP a product: about 0.2 s on two cores
    copy_bytes=256 * MiB,
    h2d_bytes=0,
    allreduce_bytes=(),
    budget_s=1.5,
    warmup_s=0.2,
    repeats=5,
)
ALLREDUCE_TIMEOUT_S = 120
"""Longest the all-reduce child processes may take, NCCL start-up included."""


class Clock(Protocol):
    def time(self, fn: Callable[[], object], n: int) -> float:
        """Seconds that ``n`` back-to-back calls of ``fn`` take."""
        ...


class DeviceClock:
    """The device's own timer (``Device.timer``: events on an accelerator, the host clock on a
    CPU) around ``n`` calls, read once the device has finished them."""

    def __init__(self, device: Any) -> None:
        self.device, self.kind = device, devices.of(device)

    def time(self, fn: Callable[[], object], n: int) -> float:
        with self.kind.timer(self.device) as timer:
            for _ in range(n):
                fn()
        self.kind.synchronize(self.device)
        return timer.seconds()


class TooSlow(Exception):
    """One run of a figure takes longer than its whole budget."""


def bench(fn: Callable[[], object], work: float, clock: Clock, cfg: MeasureConfig, unit: str) -> Stat:
    """Rate of ``fn`` in ``work`` units per second: warm up, then the median of cfg.repeats timed runs."""
    fn()  # the first call pays for library set-up and kernel choice
    once = max(clock.time(fn, 1), 1e-9)
    if once > cfg.budget_s:
        raise TooSlow(f"one run takes {once:.1f} s, over the {cfg.budget_s} s budget")
    clock.time(fn, max(1, math.ceil(cfg.warmup_s / once)))
    iters = max(1, round(cfg.budget_s / cfg.repeats / once))
    return Stat.of([work * iters / max(clock.time(fn, iters), 1e-9) for _ in range(cfg.repeats)], unit)


def measure(kind: Device, gpus: list[GpuInfo], notes: list[str], log: Log) -> Measurements:
    """Measure device 0 of ``kind`` (and all-reduce across all of ``gpus``), or the CPU when there is none."""
    import torch

    start = time.perf_counter()
    if gpus:
        device, cfg = kind.torch_device(0), ACCELERATOR_MEASURE
        kind.make_current(device)
        dtypes = [d for d in MATMUL_DTYPES if d == "fp32" or getattr(gpus[0], d)]
    else:
        device, cfg = torch.device(devices.CPU), CPU_MEASURE
        dtypes = ["fp32", "bf16"]
    clock = DeviceClock(device)
    matmul = {}
    for dtype in dtypes:
        log(f"measuring {dtype} matmul ({cfg.matmul_n}^3) on {device}")
        rate = ask(notes, f"{dtype} matmul on {device}", lambda: _bench_matmul(dtype, device, clock, cfg))
        if rate is not None:
            matmul[dtype] = rate
    log(f"measuring memory bandwidth ({cfg.copy_bytes // MiB} MiB copy) on {device}")
    copy = ask(notes, f"copy bandwidth on {device}", lambda: _bench_copy(device, clock, cfg))
    h2d = None
    if gpus:
        log(f"measuring host-to-device bandwidth ({cfg.h2d_bytes // MiB} MiB, pinned)")
        h2d = ask(notes, "host-to-device bandwidth", lambda: _bench_h2d(device, clock, cfg))
        kind.empty_cache()  # give the all-reduce processes the memory back
    allreduce: list[AllReducePoint] = []
    if len(gpus) >= 2:
        log(f"measuring all-reduce across {len(gpus)} GPUs (torchrun, {kind.backend.upper()})")
        allreduce = (
            ask(notes, "all-reduce bandwidth", lambda: measure_allreduce(len(gpus), cfg.allreduce_bytes, kind.name))
            or []
        )
        if allreduce:
            notes.append("all-reduce measured with NVLink SHARP off (NCCL_NVLS_ENABLE=0)")
    return Measurements(
        device=str(device),
        matmul_n=cfg.matmul_n,
        matmul=matmul,
        copy_bytes=cfg.copy_bytes,
        copy=copy,
        h2d_bytes=cfg.h2d_bytes if gpus else None,
        h2d=h2d,
        allreduce=allreduce,
        seconds=time.perf_counter() - start,
    )


@contextmanager
def _fp32_precision(precision: str) -> Iterator[None]:
    """fp32 matmuls in full precision ("highest") or on TF32 units ("high") inside the block."""
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _bench_matmul(dtype: str, device: Any, clock: Clock, cfg: MeasureConfig) -> Stat:
    import torch

    n = cfg.matmul_n
    if dtype == "fp8":
        a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
        one = torch.ones((), device=device)

        def fn() -> object:
            return torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True)

    else:
        tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        a, b = (torch.randn(n, n, device=device, dtype=tdtype) for _ in range(2))

        def fn() -> object:
            # Plain `a @ b` (the caching allocator makes the output free): with out= cuBLAS
            # was seen picking a slower kernel on an H200 (676 against 784 TFLOP/s).
            return a @ b

    with _fp32_precision("high" if dtype == "tf32" else "highest"):
        return bench(fn, 2 * n**3, clock, cfg, "flop/s")


def _bench_copy(device: Any, clock: Clock, cfg: MeasureConfig) -> Stat:
    import torch

    src = torch.randn(cfg.copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src), 2 * cfg.copy_bytes, clock, cfg, "byte/s")


def _bench_h2d(device: Any, clock: Clock, cfg: MeasureConfig) -> Stat:
    import torch

    host = torch.randn(cfg.h2d_bytes // 4).pin_memory()
    dst = torch.empty(host.shape, device=device)
    return bench(lambda: dst.copy_(host, non_blocking=True), cfg.h2d_bytes, clock, cfg, "byte/s")


def allreduce_env() -> dict[str, str]:
    """Environment of the all-reduce processes: NVLink SHARP / multicast off, this autotune importable."""
    env = dict(os.environ)
    # Multicast over NVLink can take a shared host's GPUs out of service: never let it start.
    env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def measure_allreduce(
    nproc: int, sizes: Sequence[int], device: str, timeout_s: float = ALLREDUCE_TIMEOUT_S
) -> list[AllReducePoint]:
    """All-reduce bandwidth at each size, one process per device of the kind named ``device``
    through torchrun, over that kind's backend (NCCL on GPUs; "cpu": gloo, for tests)."""
    with tempfile.TemporaryDirectory(prefix="autotune-allreduce-") as tmp:
        out = Path(tmp) / "allreduce.json"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "autotune.hardware.allreduce", "--device", device, "--out", str(out),
            "--sizes", ",".join(map(str, sizes)),
        ]  # fmt: skip
        _run_process_group(cmd, allreduce_env(), timeout_s)
        data = read_json(out, "all-reduce result")
    if not isinstance(data, list):
        raise RuntimeError("all-reduce result: expected a list")
    return [from_dict(AllReducePoint, p, f"allreduce[{i}]") for i, p in enumerate(data)]


def _run_process_group(cmd: list[str], env: dict[str, str], timeout_s: float) -> None:
    """Run ``cmd`` in its own process group; on a timeout kill the whole group (torchrun and its workers)."""
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"timed out after {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        errors = [line for line in output.splitlines() if "Error" in line] or output.splitlines() or ["no output"]
        raise RuntimeError(f"exit status {proc.returncode}: {errors[-1].strip()}")
